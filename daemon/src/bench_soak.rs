//! `exo bench-soak`: a soak of running `exo serve` nodes (a benchmark, not a test;
//! `scripts/soak.sh` starts the nodes and runs it). Concurrent clients send a fixed
//! number of requests to the first node: plain and streamed completions and chats,
//! some streams closed after their first chunk, malformed HTTP interleaved; a garbage
//! task sends random bytes and forged frames to the nodes' peer ports meanwhile.
//! It reports outcomes by kind, latency percentiles, each node's resident memory at
//! start, middle and end, and whether each node's `/metrics` counts agree with what
//! was sent.

mod http;
mod malformed;
mod peer;
mod report;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use report::{Metrics, Rss, Tally};

#[derive(clap::Args)]
pub struct BenchSoakArgs {
    /// A node: NAME,PID,HTTP_ADDR[,DATA_ADDR] (DATA_ADDR: its peer data port; the
    /// control port is the next one). Requests go to the first node; peer garbage to
    /// every node with a DATA_ADDR. Repeat for each node.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// Requests in all (well-formed and malformed).
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Fewest and most tokens a request asks for: MIN,MAX.
    #[arg(long, default_value = "4,16", value_delimiter = ',')]
    tokens: Vec<i64>,
    /// Share of requests that are malformed HTTP.
    #[arg(long, default_value_t = 0.1)]
    malformed: f64,
    /// Share of well-formed requests that stream.
    #[arg(long, default_value_t = 0.5)]
    streamed: f64,
    /// Share of streams closed by the client after their first chunk.
    #[arg(long, default_value_t = 0.1)]
    disconnect: f64,
    /// Pause of the peer garbage task between two attacks, in milliseconds.
    #[arg(long, default_value_t = 50)]
    garbage_interval_ms: u64,
    /// A request not finished after this many seconds counts as a hang.
    #[arg(long, default_value_t = 120)]
    hang_secs: u64,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Requests of the same mix sent first, not counted, before the first memory
    /// reading (default: 8 per client or 5% of --requests, whichever is more).
    #[arg(long)]
    warm_up: Option<usize>,
}

/// One node under soak.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub pid: u32,
    pub http: SocketAddr,
    pub data: Option<SocketAddr>,
}

impl Node {
    fn parse(s: &str) -> Result<Node> {
        let parts: Vec<&str> = s.split(',').collect();
        let (name, pid, addr, data) = match parts[..] {
            [n, p, a] => (n, p, a, None),
            [n, p, a, d] => (n, p, a, Some(d)),
            _ => bail!("--node {s:?}: expected NAME,PID,HTTP_ADDR[,DATA_ADDR]"),
        };
        let data = data
            .map(|d| {
                d.parse()
                    .with_context(|| format!("--node {s:?}: data address"))
            })
            .transpose()?;
        Ok(Node {
            name: name.to_string(),
            pid: pid.parse().with_context(|| format!("--node {s:?}: pid"))?,
            http: addr
                .parse()
                .with_context(|| format!("--node {s:?}: HTTP address"))?,
            data,
        })
    }
}

/// What the clients of one phase (the warm-up or the soak) share.
struct Soak {
    target: SocketAddr,
    nodes: Vec<Node>,
    plan: http::Plan,
    /// The requests, in order.
    shapes: Vec<http::Shape>,
    next: AtomicUsize,
    done: AtomicUsize,
    tally: Mutex<Tally>,
    /// Resident memory once half of the requests are done.
    mid: Mutex<Option<Rss>>,
    /// Set to stop the peer garbage.
    stop_garbage: AtomicBool,
}

impl Soak {
    /// Sends requests until all have been taken; stops the garbage for the last
    /// tenth, which drains what it left queued on the peer ports.
    async fn client(self: Arc<Self>) {
        let total = self.shapes.len();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(shape) = self.shapes.get(i) else {
                return;
            };
            let outcome = http::send(self.target, shape, &self.plan).await;
            if let Ok(mut t) = self.tally.lock() {
                t.add(shape, &outcome);
            }
            let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
            if done == total / 2 {
                if let Ok(mut m) = self.mid.lock() {
                    *m = Some(Rss::read(&self.nodes));
                }
            }
            if done >= total - total / 10 {
                self.stop_garbage.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// What one phase gave.
struct Phase {
    tally: Tally,
    garbage: peer::Garbage,
    wall: Duration,
    mid: Option<Rss>,
    /// Resident memory once a second.
    samples: Vec<Rss>,
}

/// Sends `total` requests of `plan`'s mix from `clients` clients, with garbage on
/// the peer ports meanwhile.
async fn phase(
    nodes: &[Node],
    plan: http::Plan,
    total: usize,
    clients: usize,
    garbage_interval: Duration,
) -> Result<Phase> {
    let soak = Arc::new(Soak {
        target: nodes[0].http,
        nodes: nodes.to_vec(),
        shapes: plan.schedule(total),
        plan,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        tally: Mutex::new(Tally::default()),
        mid: Mutex::new(None),
        stop_garbage: AtomicBool::new(false),
    });
    let garbage = {
        let soak = soak.clone();
        tokio::spawn(async move {
            let stop = || soak.stop_garbage.load(Ordering::Relaxed);
            peer::run(
                peer_targets(&soak.nodes),
                garbage_interval,
                stop,
                soak.plan.seed,
            )
            .await
        })
    };
    let finished = Arc::new(AtomicBool::new(false));
    let samples = tokio::spawn(sample_memory(nodes.to_vec(), finished.clone()));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|_| tokio::spawn(soak.clone().client()))
        .collect();
    for t in tasks {
        t.await?;
    }
    let wall = t0.elapsed();
    soak.stop_garbage.store(true, Ordering::Relaxed);
    finished.store(true, Ordering::Relaxed);
    let garbage = garbage.await?;
    let samples = samples.await?;
    let tally = soak.tally.lock().map(|t| t.clone()).unwrap_or_default();
    let mid = soak.mid.lock().ok().and_then(|m| m.clone());
    Ok(Phase {
        tally,
        garbage,
        wall,
        mid,
        samples,
    })
}

/// Runs the soak against running nodes and prints its report.
pub fn run(args: BenchSoakArgs) -> Result<()> {
    let nodes: Vec<Node> = args
        .nodes
        .iter()
        .map(|s| Node::parse(s))
        .collect::<Result<_>>()?;
    let tokens = match args.tokens[..] {
        [min, max] if 1 <= min && min <= max => (min, max),
        _ => bail!("--tokens: expected MIN,MAX with 1 <= MIN <= MAX"),
    };
    let plan = http::Plan {
        seed: args.seed,
        tokens,
        malformed: args.malformed,
        streamed: args.streamed,
        disconnect: args.disconnect,
        hang: Duration::from_secs(args.hang_secs),
    };
    let warm_up = args
        .warm_up
        .unwrap_or((8 * args.clients).max(args.requests / 20));
    let interval = Duration::from_millis(args.garbage_interval_ms);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // the same mix first, uncounted: every slot, sampler and connection path has
        // been used and the allocators have settled before the first memory reading
        let warm_plan = http::Plan {
            seed: args.seed.wrapping_add(1),
            ..plan.clone()
        };
        let warm = phase(&nodes, warm_plan, warm_up, args.clients, interval).await?;
        let before = read_metrics(&nodes).await?;
        let start = Rss::read(&nodes);
        let soak = phase(&nodes, plan, args.requests, args.clients, interval).await?;
        // let the servers count the last closed connections
        tokio::time::sleep(Duration::from_millis(500)).await;
        let end = Rss::read(&nodes);
        let after = read_metrics(&nodes).await?;
        report::print(&report::Report {
            nodes: &nodes,
            requests: args.requests,
            clients: args.clients,
            warm_up: (warm_up, warm.tally.errors, warm.wall),
            wall: soak.wall,
            tally: &soak.tally,
            memory: &[Some(start), soak.mid, Some(end)],
            samples: &soak.samples,
            before: &before,
            after: &after,
            garbage: &soak.garbage,
        });
        Ok(())
    })
}

fn peer_targets(nodes: &[Node]) -> Vec<peer::Target> {
    nodes
        .iter()
        .filter_map(|n| {
            n.data.map(|data| peer::Target {
                node: n.name.clone(),
                data,
            })
        })
        .collect()
}

/// The nodes' resident memory once a second until `finished`.
async fn sample_memory(nodes: Vec<Node>, finished: Arc<AtomicBool>) -> Vec<Rss> {
    let mut samples = Vec::new();
    while !finished.load(Ordering::Relaxed) {
        samples.push(Rss::read(&nodes));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    samples
}

/// Each node's `/metrics`, by node name.
async fn read_metrics(nodes: &[Node]) -> Result<BTreeMap<String, Metrics>> {
    let mut out = BTreeMap::new();
    for n in nodes {
        let text = http::get_text(n.http, "/metrics")
            .await
            .with_context(|| format!("/metrics of node {}", n.name))?;
        out.insert(n.name.clone(), Metrics::parse(&text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_parsed_with_and_without_a_data_port() {
        let n = Node::parse("a,42,127.0.0.1:8080,127.0.0.1:17100").expect("node");
        assert_eq!(n.name, "a");
        assert_eq!(n.pid, 42);
        assert_eq!(n.http.port(), 8080);
        assert_eq!(n.data.map(|d| d.port()), Some(17100));
        let n = Node::parse("one,7,127.0.0.1:9").expect("node");
        assert_eq!(n.data, None);
        for bad in ["a", "a,x,127.0.0.1:1", "a,1,nowhere", "a,1,127.0.0.1:1,x,y"] {
            assert!(Node::parse(bad).is_err(), "{bad}");
        }
    }
}
