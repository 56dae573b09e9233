//! What the soak counts ([`Tally`]), reads from the nodes (resident memory,
//! `/metrics`) and prints.

use std::collections::BTreeMap;
use std::time::Duration;

use super::http::{Outcome, Shape};
use super::peer::Garbage;
use super::Node;

/// Errors whose details are printed.
const EXAMPLES: usize = 10;

/// The client's side of the soak.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Requests sent, by class.
    pub sent: BTreeMap<&'static str, u64>,
    /// Outcomes by kind.
    pub kinds: BTreeMap<String, u64>,
    pub errors: u64,
    pub hangs: u64,
    pub server_errors: u64,
    pub examples: Vec<String>,
    /// Seconds: plain answers, streams' first events, whole streams.
    pub plain: Vec<f64>,
    pub first_event: Vec<f64>,
    pub stream: Vec<f64>,
    /// What each node's `exo_requests_total` should have counted (endpoint, status).
    pub counted: BTreeMap<(String, u16), u64>,
}

impl Tally {
    pub fn add(&mut self, shape: &Shape, o: &Outcome) {
        let class = match shape {
            Shape::Bad(..) => "malformed",
            Shape::Good(g) if g.cut => "streamed, closed after the first event",
            Shape::Good(g) if g.stream => "streamed",
            Shape::Good(_) => "plain",
        };
        *self.sent.entry(class).or_default() += 1;
        *self.kinds.entry(o.kind.clone()).or_default() += 1;
        if o.error {
            self.errors += 1;
            self.hangs += u64::from(o.hang);
            self.server_errors += u64::from(o.server_error);
            if self.examples.len() < EXAMPLES {
                self.examples.push(format!("{}: {}", o.kind, o.detail));
            }
        }
        if let Some((endpoint, status)) = o.counted {
            *self
                .counted
                .entry((endpoint.to_string(), status))
                .or_default() += 1;
        }
        match (shape, o.first, o.total) {
            (Shape::Good(g), Some(f), total) if g.stream => {
                self.first_event.push(f);
                self.stream.extend(total);
            }
            (Shape::Good(_), Some(f), _) => self.plain.push(f),
            _ => {}
        }
    }
}

/// Resident memory of one process, in kB: all of it, and its anonymous part (the
/// heap; the rest is mapped files such as the model, which a leak does not grow).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resident {
    pub rss: u64,
    pub anon: u64,
}

/// Resident memory of each node's process; None once it is gone.
#[derive(Debug, Clone)]
pub struct Rss(pub Vec<Option<Resident>>);

impl Rss {
    pub fn read(nodes: &[Node]) -> Rss {
        Rss(nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(format!("/proc/{}/status", n.pid))
                    .ok()
                    .and_then(|s| resident(&s))
            })
            .collect())
    }
}

/// `VmRSS:` and `RssAnon:` of a /proc/PID/status text.
fn resident(status: &str) -> Option<Resident> {
    let kb = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Resident {
        rss: kb("VmRSS:")?,
        anon: kb("RssAnon:")?,
    })
}

/// The counters of a node's `/metrics` the soak compares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// `exo_requests_total` by (endpoint, status).
    pub requests: BTreeMap<(String, u16), u64>,
    /// `exo_frames_total` by outcome.
    pub frames: BTreeMap<String, u64>,
    /// `exo_peer_connections_refused_total`, all planes.
    pub peers_refused: u64,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let value = value as u64;
            if let Some(labels) = series.strip_prefix("exo_requests_total{") {
                let (Some(ep), Some(status)) = (label(labels, "endpoint"), label(labels, "status"))
                else {
                    continue;
                };
                if let Ok(status) = status.parse() {
                    m.requests.insert((ep.to_string(), status), value);
                }
            } else if let Some(labels) = series.strip_prefix("exo_frames_total{") {
                if let Some(outcome) = label(labels, "outcome") {
                    m.frames.insert(outcome.to_string(), value);
                }
            } else if series.starts_with("exo_peer_connections_refused_total{") {
                m.peers_refused += value;
            }
        }
        m
    }

    /// Frames dropped, whatever the reason.
    fn dropped(&self) -> u64 {
        self.frames
            .iter()
            .filter(|(k, _)| k.as_str() != "accepted")
            .map(|(_, v)| v)
            .sum()
    }
}

/// The value of `name="…"` in a label set.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// How far each counter moved, against what the client expected: the differences.
fn differences(
    before: &Metrics,
    after: &Metrics,
    expected: &BTreeMap<(String, u16), u64>,
) -> Vec<String> {
    let mut keys: Vec<&(String, u16)> = after.requests.keys().chain(expected.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let get = |m: &Metrics| m.requests.get(k).copied().unwrap_or(0);
            let server = get(after).saturating_sub(get(before));
            let client = expected.get(k).copied().unwrap_or(0);
            (server != client)
                .then(|| format!("{} {}: server +{server}, client {client}", k.0, k.1))
        })
        .collect()
}

/// The `p`th percentile (nearest rank) of `v`, in milliseconds.
pub fn percentile_ms(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1] * 1e3)
}

/// Everything the report shows.
pub struct Report<'a> {
    pub nodes: &'a [Node],
    pub requests: usize,
    pub clients: usize,
    /// Requests of the warm-up, its errors, its wall time.
    pub warm_up: (usize, u64, Duration),
    pub wall: Duration,
    pub tally: &'a Tally,
    /// Start, middle, end.
    pub memory: &'a [Option<Rss>; 3],
    /// Once a second during the soak.
    pub samples: &'a [Rss],
    pub before: &'a BTreeMap<String, Metrics>,
    pub after: &'a BTreeMap<String, Metrics>,
    pub garbage: &'a Garbage,
}

pub fn print(r: &Report) {
    let t = r.tally;
    let secs = r.wall.as_secs_f64();
    println!(
        "soak of {} ({} node{}): {} requests from {} clients in {secs:.0} s ({:.1} requests/s)",
        r.nodes[0].name,
        r.nodes.len(),
        if r.nodes.len() == 1 { "" } else { "s" },
        r.requests,
        r.clients,
        r.requests as f64 / secs.max(1e-9)
    );
    println!(
        "(after a warm-up of {} requests of the same mix, not counted here: {} errors, {:.0} s)",
        r.warm_up.0,
        r.warm_up.1,
        r.warm_up.2.as_secs_f64()
    );
    println!("\nsent");
    for (class, n) in &t.sent {
        println!("  {n:>7}  {class}");
    }
    println!("\noutcomes");
    for (kind, n) in &t.kinds {
        println!("  {n:>7}  {kind}");
    }
    for e in &t.examples {
        println!("  error: {e}");
    }
    println!("\nlatency, ms                    n      p50      p99      max");
    for (name, v) in [
        ("plain (whole answer)", &t.plain),
        ("stream, first event", &t.first_event),
        ("stream, whole", &t.stream),
    ] {
        let f = |p| percentile_ms(v, p).map_or("-".into(), |x| format!("{x:.0}"));
        println!(
            "  {name:<24} {:>6} {:>8} {:>8} {:>8}",
            v.len(),
            f(50.0),
            f(99.0),
            f(100.0)
        );
    }
    let growth = print_memory(r);
    let (agree, lost_frames) = print_metrics(r);
    let alive = r.memory[2]
        .as_ref()
        .map_or(0, |m| m.0.iter().flatten().count());
    println!(
        "\nverdict: {} of {} processes alive at the end, {} hangs, {} unexpected 5xx, {} other errors, \
         RSS growth at most {growth:.1}% (aim < 5%), /metrics {}, peer frames {}",
        alive,
        r.nodes.len(),
        t.hangs,
        t.server_errors,
        t.errors - t.hangs - t.server_errors,
        if agree { "agree" } else { "DIFFER" },
        if lost_frames { "DIFFER" } else { "agree" },
    );
}

/// Growth from `a` to `b`, in %.
fn growth(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a > 0 => Some((b as f64 - a as f64) / a as f64 * 100.0),
        _ => None,
    }
}

/// The median of the first and of the second half of `v`.
fn half_medians(v: &[u64]) -> Option<(u64, u64)> {
    if v.len() < 2 {
        return None;
    }
    let med = |h: &[u64]| {
        let mut h = h.to_vec();
        h.sort_unstable();
        h[h.len() / 2]
    };
    let (a, b) = v.split_at(v.len() / 2);
    Some((med(a), med(b)))
}

/// Prints the memory table; the largest growth of VmRSS from start to end, in %.
fn print_memory(r: &Report) -> f64 {
    println!(
        "\nresident memory (VmRSS), MB  start     mid     end   growth     peak  \
         halves' medians  trend   anon growth"
    );
    let mut worst = 0.0f64;
    for (i, n) in r.nodes.iter().enumerate() {
        let at = |k: usize| {
            r.memory[k]
                .as_ref()
                .and_then(|m| m.0.get(i).copied().flatten())
        };
        let mb =
            |v: Option<u64>| v.map_or("gone".into(), |kb| format!("{:.1}", kb as f64 / 1024.0));
        let rss = |k: usize| at(k).map(|m| m.rss);
        let pct = |g: Option<f64>| g.map_or("-".into(), |g| format!("{g:+.1}%"));
        let series: Vec<u64> = r
            .samples
            .iter()
            .filter_map(|s| s.0.get(i).copied().flatten().map(|m| m.rss))
            .collect();
        let halves = half_medians(&series);
        worst = worst.max(growth(rss(0), rss(2)).unwrap_or(0.0));
        println!(
            "  {:<26} {:>7} {:>7} {:>7} {:>8} {:>8} {:>16} {:>6} {:>13}",
            n.name,
            mb(rss(0)),
            mb(rss(1)),
            mb(rss(2)),
            pct(growth(rss(0), rss(2))),
            mb(series.iter().copied().max()),
            halves.map_or("-".into(), |(a, b)| format!(
                "{} → {}",
                mb(Some(a)),
                mb(Some(b))
            )),
            pct(halves.and_then(|(a, b)| growth(Some(a), Some(b)))),
            pct(growth(at(0).map(|m| m.anon), at(2).map(|m| m.anon))),
        );
    }
    worst
}

/// Prints how /metrics compares with the client; (requests agree, frames differ).
fn print_metrics(r: &Report) -> (bool, bool) {
    let mut agree = true;
    let mut frames_differ = false;
    println!("\n/metrics against the client");
    for (i, n) in r.nodes.iter().enumerate() {
        let (Some(b), Some(a)) = (r.before.get(&n.name), r.after.get(&n.name)) else {
            continue;
        };
        // requests go to the first node; every node answered the client's first /metrics
        let mut expected = if i == 0 {
            r.tally.counted.clone()
        } else {
            BTreeMap::new()
        };
        *expected.entry(("/metrics".into(), 200)).or_default() += 1;
        let diffs = differences(b, a, &expected);
        let total: u64 = expected.values().sum();
        agree &= diffs.is_empty();
        if diffs.is_empty() {
            println!(
                "  {}: requests by endpoint and status agree ({total} counted)",
                n.name
            );
        } else {
            println!("  {}: requests differ: {}", n.name, diffs.join("; "));
        }
        if n.data.is_some() {
            let delivered = r.garbage.delivered.get(&n.name).copied().unwrap_or(0);
            let dropped = a.dropped().saturating_sub(b.dropped());
            let by: Vec<String> = a
                .frames
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k} +{}",
                        v.saturating_sub(b.frames.get(k).copied().unwrap_or(0))
                    )
                })
                .collect();
            // a node answers no unauthenticated control request
            let answered = r.garbage.answered.get(&n.name).copied().unwrap_or(0);
            // A connection over a listener's cap is closed after its handshake: what
            // was written to it is never read (nor counted).
            let refused = a.peers_refused.saturating_sub(b.peers_refused);
            let unread = delivered.saturating_sub(dropped);
            frames_differ |= dropped > delivered
                || unread > refused * super::peer::MAX_MESSAGES_PER_CONNECTION
                || answered > 0;
            println!(
                "  {}: peer garbage delivered {delivered} messages, frames dropped +{dropped} ({}); \
                 forged control requests answered: {answered}",
                n.name,
                by.join(", "),
            );
            if unread > 0 {
                println!(
                    "  {}: {unread} messages not read: the node refused {refused} connections \
                     over its listeners' caps after their handshakes (at most {} messages each)",
                    n.name,
                    super::peer::MAX_MESSAGES_PER_CONNECTION
                );
            }
        }
    }
    if !r.garbage.attacks.is_empty() {
        let kinds: Vec<String> = r
            .garbage
            .attacks
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "  peer garbage: {} (refused or closed at the handshake: {}, timed out: {})",
            kinds.join(", "),
            r.garbage.refused,
            r.garbage.timed_out
        );
    }
    (agree, frames_differ)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP exo_requests_total HTTP requests by endpoint and status.
# TYPE exo_requests_total counter
exo_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 12
exo_requests_total{endpoint=\"other\",status=\"404\"} 3
exo_prompt_tokens_total 99
exo_frames_total{outcome=\"accepted\"} 500
exo_frames_total{outcome=\"forged\"} 7
exo_frames_total{outcome=\"malformed\"} 2
exo_peer_connections_refused_total{plane=\"data\"} 4
exo_peer_connections_refused_total{plane=\"control\"} 1
";

    #[test]
    fn metrics_are_read_from_the_prometheus_text() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.requests.get(&("/v1/completions".into(), 200)), Some(&12));
        assert_eq!(m.requests.get(&("other".into(), 404)), Some(&3));
        assert_eq!(m.requests.len(), 2);
        assert_eq!(m.frames.get("forged"), Some(&7));
        assert_eq!(m.dropped(), 9);
        assert_eq!(m.peers_refused, 5);
    }

    #[test]
    fn differences_name_each_counter_that_moved_otherwise() {
        let before = Metrics::parse(TEXT);
        let after = Metrics::parse(&TEXT.replace("} 12", "} 20").replace("} 3\n", "} 4\n"));
        let mut expected = BTreeMap::new();
        expected.insert(("/v1/completions".to_string(), 200), 8);
        expected.insert(("other".to_string(), 404), 1);
        assert!(differences(&before, &after, &expected).is_empty());
        expected.insert(("/v1/completions".to_string(), 400), 2);
        assert_eq!(
            differences(&before, &after, &expected),
            ["/v1/completions 400: server +0, client 2"]
        );
    }

    #[test]
    fn resident_memory_and_percentiles() {
        let status = "Name:\texo\nVmPeak:\t  900 kB\nVmRSS:\t  312340 kB\n\
                      RssAnon:\t   70000 kB\nRssFile:\t  242340 kB\nThreads:\t5\n";
        let r = resident(status).expect("figures");
        assert_eq!((r.rss, r.anon), (312_340, 70_000));
        assert_eq!(resident("Name: x\nVmRSS: 5 kB\n"), None);
        let v: Vec<f64> = (1..=100).map(|i| i as f64 / 1000.0).collect();
        assert_eq!(percentile_ms(&v, 50.0), Some(50.0));
        assert_eq!(percentile_ms(&v, 99.0), Some(99.0));
        assert_eq!(percentile_ms(&[], 50.0), None);
        assert_eq!(half_medians(&[5, 1, 3, 10, 30, 20]), Some((3, 20)));
        assert_eq!(half_medians(&[5]), None);
        assert_eq!(growth(Some(200), Some(210)), Some(5.0));
    }
}
