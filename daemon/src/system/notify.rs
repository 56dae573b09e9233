//! systemd readiness, status and watchdog (`sd_notify`), for `Type=notify` units.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) nothing is sent and no task runs.
//! While the model loads: `STATUS=loading model …` and `EXTEND_TIMEOUT_USEC` every few
//! seconds; `READY=1` + `STATUS=serving` once /health answers 200; watchdog pings only
//! while the engine makes progress or is idle; `STOPPING=1` on shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::api::App;

/// How often the supervisor looks at the app.
const TICK: Duration = Duration::from_secs(1);
/// How often a loading service asks for more start time, and how much.
const EXTEND_EVERY: Duration = Duration::from_secs(5);
const EXTEND_BY_USEC: u32 = 20_000_000;

/// Whether the service manager is listening (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `states`; failures are logged, never fatal.
pub fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    if enabled() {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// The watchdog decision: ping when the engine's progress counter (scheduler steps
/// plus graph nodes computed, so a long step keeps it moving) moved since the last
/// ping, or when the engine is idle (nothing running, nothing queued). Work that
/// makes no progress (a stuck compute or a stuck peer) stops the pings.
pub fn watchdog_ping(last_steps: usize, steps: usize, idle: bool) -> bool {
    steps != last_steps || idle
}

/// What the supervisor sees of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Loading the model or forming the cluster; the status line says which.
    Loading(String),
    /// Loading failed: no pings, no more start time.
    Failed(String),
    /// /health answers 200.
    Ready,
    /// Was ready, now a peer is missing (/health 503).
    Degraded(String),
}

fn phase(app: &App, was_ready: bool) -> Phase {
    if let Some(line) = app.progress.get() {
        // a slice on its way: to a worker (while the head forms the cluster) or to
        // this worker (which answers /health meanwhile)
        return if app.is_ready() && app.worker_of.get().is_none() {
            Phase::Ready
        } else {
            Phase::Loading(line)
        };
    }
    if app.is_ready() {
        return Phase::Ready;
    }
    if let Some(e) = app.load_error.lock().ok().and_then(|e| e.clone()) {
        return Phase::Failed(format!("model failed to load: {e}"));
    }
    let missing = app.missing_peers();
    if !missing.is_empty() {
        let line = format!("waiting for peer {}", missing.join(", "));
        return if was_ready {
            Phase::Degraded(line)
        } else {
            Phase::Loading(line)
        };
    }
    Phase::Loading(format!("loading model {}", app.model_id))
}

/// Engine liveness for the watchdog: (progress counter, idle). The counter adds the
/// scheduler's steps and the graph nodes ggml has computed. A worker has no
/// scheduler here: it counts as idle (it pings while the process runs).
fn engine_progress(app: &App) -> (usize, bool) {
    match app.served.get() {
        Some(s) => {
            let st = s.scheduler.stats();
            let idle =
                st.active.load(Ordering::SeqCst) == 0 && st.queued.load(Ordering::SeqCst) == 0;
            let nodes = ggml_shim::compute_progress() as usize;
            (st.steps.load(Ordering::Relaxed).wrapping_add(nodes), idle)
        }
        None => (0, true),
    }
}

/// The exit status when the model cannot be loaded under systemd (EX_CONFIG): the
/// unit's `RestartPreventExitStatus=78` keeps systemd from retrying a load that
/// will fail the same way until the file or the config is fixed.
pub const EXIT_LOAD_FAILED: u8 = 78;

/// Starts the supervisor task if systemd listens; it ends when `stop` flips to true,
/// or when the model failed to load: then it sends the reason on `load_failed` (the
/// caller decides what to do: `exo serve` drains and exits with [`EXIT_LOAD_FAILED`]).
pub fn spawn(
    app: Arc<App>,
    stop: tokio::sync::watch::Receiver<bool>,
    load_failed: tokio::sync::oneshot::Sender<String>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !enabled() {
        return None;
    }
    Some(tokio::spawn(supervise(app, stop, load_failed)))
}

async fn supervise(
    app: Arc<App>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    load_failed: tokio::sync::oneshot::Sender<String>,
) {
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    if let Some(every) = watchdog {
        tracing::info!("systemd watchdog: pinging every {every:?} while the engine is healthy");
    }
    let mut status = String::new();
    let mut ready = false;
    let mut last_extend: Option<Instant> = None;
    let mut last_ping = Instant::now();
    let mut last_steps = 0usize;
    let mut stuck_logged = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        let ph = phase(&app, ready);
        let line = match &ph {
            Phase::Loading(s) | Phase::Failed(s) | Phase::Degraded(s) => s.clone(),
            Phase::Ready => "serving".to_string(),
        };
        if let Phase::Failed(why) = ph {
            send(&[NotifyState::Status(&why)]);
            let _ = load_failed.send(why);
            return;
        }
        if ph == Phase::Ready && !ready {
            ready = true;
            send(&[NotifyState::Ready, NotifyState::Status("serving")]);
            tracing::info!("systemd: ready");
        } else if line != status {
            send(&[NotifyState::Status(&line)]);
        }
        status = line;
        if let Phase::Loading(_) = ph {
            if !ready && last_extend.is_none_or(|t| now - t >= EXTEND_EVERY) {
                send(&[NotifyState::ExtendTimeoutUsec(EXTEND_BY_USEC)]);
                last_extend = Some(now);
            }
        }
        if let Some(every) = watchdog {
            if now - last_ping >= every {
                let healthy = match ph {
                    Phase::Failed(_) => false,
                    // loading makes its own progress; the start timeout bounds it
                    Phase::Loading(_) => true,
                    Phase::Ready | Phase::Degraded(_) => {
                        let (steps, idle) = engine_progress(&app);
                        let ok = watchdog_ping(last_steps, steps, idle);
                        if ok {
                            last_steps = steps;
                        }
                        ok
                    }
                };
                if healthy {
                    send(&[NotifyState::Watchdog]);
                    last_ping = now;
                    stuck_logged = false;
                } else if !stuck_logged {
                    tracing::warn!("engine made no progress: withholding watchdog pings");
                    stuck_logged = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::watchdog_ping;

    #[test]
    fn progress_pings() {
        assert!(watchdog_ping(10, 11, false));
        assert!(watchdog_ping(10, 11, true));
    }

    #[test]
    fn idle_engine_pings() {
        assert!(watchdog_ping(10, 10, true));
        assert!(watchdog_ping(0, 0, true));
    }

    #[test]
    fn stuck_engine_stops_pinging() {
        assert!(!watchdog_ping(10, 10, false));
    }

    #[test]
    fn counter_wrap_counts_as_progress() {
        assert!(watchdog_ping(usize::MAX, 0, false));
    }
}
