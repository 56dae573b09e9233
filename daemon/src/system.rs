//! Process glue: logging in a journald-friendly shape, shutdown signals, systemd
//! notifications and config reloads on SIGHUP.

pub mod notify;
pub mod reload;

use std::io::IsTerminal;

/// One line per event, no colours unless a person is watching a terminal; the level
/// comes from `EXO_LOG` (e.g. `info`, `exo=debug`), default `info`. The nng binding's
/// own warnings (one per control request left unanswered, which is what exo does with
/// frames that fail authentication) are off unless `EXO_LOG` names `anng`.
pub fn init_logging() {
    let spec = std::env::var("EXO_LOG").unwrap_or_else(|_| "info".into());
    let spec = if spec.contains("anng") {
        spec
    } else {
        format!("{spec},anng=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,anng=error"));
    let tty = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(tty)
        .with_target(false);
    // journald adds its own timestamps
    let result = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    let _ = result;
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupt received: shutting down"),
        _ = term => tracing::info!("SIGTERM received: shutting down"),
    }
}

/// Raises this process's soft limit of open files to its hard limit (systemd and most
/// shells start services at 1024, which a few hundred clients reach); returns the
/// soft limit now in force, None if it cannot be read.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!("open files limit raised from {soft} to {hard}");
                return Some(hard);
            }
            Err(e) => tracing::warn!("cannot raise the open files limit from {soft}: {e}"),
        }
    }
    Some(soft)
}

/// The soft limit of open files in force, None if it cannot be read.
pub fn open_files_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}
