//! Prometheus text-format metrics: requests by status, tokens, latency histograms,
//! queue depth, active slots and batch size.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::engine::scheduler::{SchedulerStats, StepObserver};

/// A histogram with fixed upper bounds (seconds or counts).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in micro-units (1e-6 of the observed unit), to stay atomic.
    sum_micro: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if v <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// All counters of the server.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub batch_tokens: Histogram,
    pub step_seconds: Histogram,
    /// HTTP connections being served.
    pub connections_open: AtomicU64,
    /// Connections beyond `max_connections`, answered 503 and closed.
    pub connections_refused: AtomicU64,
    /// Connections beyond `max_connections_per_ip`, answered 503 and closed.
    pub connections_refused_per_ip: AtomicU64,
    /// Clients that did not send their headers or body in time.
    pub client_timeouts: AtomicU64,
    /// Connections closed because a response write made no progress in time.
    pub write_timeouts: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY),
            inter_token: Histogram::new(LATENCY),
            batch_tokens: Histogram::new(BATCH),
            step_seconds: Histogram::new(LATENCY),
            connections_open: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            connections_refused_per_ip: AtomicU64::new(0),
            client_timeouts: AtomicU64::new(0),
            write_timeouts: AtomicU64::new(0),
        }
    }
}

impl StepObserver for Metrics {
    fn step(&self, _seqs: usize, tokens: usize, secs: f64) {
        self.batch_tokens.observe(tokens as f64);
        self.step_seconds.observe(secs);
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    /// The Prometheus exposition text.
    pub fn render(&self, sched: Option<&SchedulerStats>, max_slots: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP exo_requests_total HTTP requests by endpoint and status.\n");
        out.push_str("# TYPE exo_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((ep, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "exo_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}"
                );
            }
        }
        for (name, help, v) in [
            (
                "exo_prompt_tokens_total",
                "Prompt tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "exo_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "exo_http_connections_refused_total",
                "Connections beyond max_connections, answered 503 and closed.",
                &self.connections_refused,
            ),
            (
                "exo_http_connections_refused_per_ip_total",
                "Connections beyond max_connections_per_ip from one address, answered 503 \
                 and closed.",
                &self.connections_refused_per_ip,
            ),
            (
                "exo_http_client_timeouts_total",
                "Clients that did not send their request headers or body in time.",
                &self.client_timeouts,
            ),
            (
                "exo_http_write_timeouts_total",
                "Connections closed because the client stopped reading a response \
                 (its generation cancelled).",
                &self.write_timeouts,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP exo_http_connections HTTP connections being served.\n\
             # TYPE exo_http_connections gauge\nexo_http_connections {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        self.ttft.render(
            &mut out,
            "exo_time_to_first_token_seconds",
            "Time from request to first token.",
        );
        self.inter_token.render(
            &mut out,
            "exo_inter_token_seconds",
            "Time between consecutive tokens of a stream.",
        );
        self.batch_tokens
            .render(&mut out, "exo_batch_tokens", "Tokens per engine step.");
        self.step_seconds
            .render(&mut out, "exo_step_seconds", "Duration of one engine step.");
        if let Some(s) = sched {
            for (name, help, v) in [
                (
                    "exo_queue_depth",
                    "Requests waiting for a slot.",
                    s.queued.load(Ordering::Relaxed),
                ),
                (
                    "exo_active_slots",
                    "Sequences being processed.",
                    s.active.load(Ordering::Relaxed),
                ),
                (
                    "exo_batch_size",
                    "Sequences in the last engine step.",
                    s.last_batch_seqs.load(Ordering::Relaxed),
                ),
                ("exo_max_slots", "Configured sequence slots.", max_slots),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
            for (name, help, v) in [
                (
                    "exo_prompt_tokens_cached_total",
                    "Prompt tokens taken from the KV cache of earlier requests.",
                    &s.prompt_tokens_cached,
                ),
                (
                    "exo_prompt_tokens_prefilled_total",
                    "Prompt tokens prefilled.",
                    &s.prompt_tokens_prefilled,
                ),
            ] {
                let v = v.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
                );
            }
        }
        out
    }
}
