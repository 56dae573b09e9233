//! `exo bench-soak` (the soak benchmark's load generator, run by `scripts/soak.sh`)
//! against a real two-node cluster of `exo serve` processes on a tiny model, cut
//! short: half of the requests malformed HTTP (every case at least once), streams
//! closed after their first event, garbage on both nodes' peer ports. The nodes
//! answer every request as expected, keep running, and their `/metrics` counts
//! agree with the client's, requests and dropped frames alike.

mod harness;

use harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_of_a_two_node_cluster_finds_nothing_wrong() {
    let mut h = Harness::tiny("soak", &tiny_spec());
    let c = h.cluster(&[peer("a", None), peer("b", None)], &TINY_ENGINE);
    h.wait_ready(c[0], Duration::from_secs(60)).await;
    let node = |i: usize| {
        let n = h.node(i);
        let pid = n.child.as_ref().map(|c| c.id()).expect("running");
        format!(
            "{},{pid},127.0.0.1:{},127.0.0.1:{}",
            n.name, n.http_port, n.data_port
        )
    };
    let args = [
        "bench-soak",
        "--requests",
        "160",
        "--clients",
        "4",
        "--warm-up",
        "16",
        "--tokens",
        "1,4",
        "--malformed",
        "0.5",
        "--disconnect",
        "0.3",
        "--garbage-interval-ms",
        "5",
        "--hang-secs",
        "60",
    ];
    let (a, b) = (node(c[0]), node(c[1]));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_exo"))
            .args(args)
            .args(["--node", &a, "--node", &b])
            .output()
            .expect("run exo bench-soak")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}\n{err}");
    assert!(
        text.contains(
            "2 of 2 processes alive at the end, 0 hangs, 0 unexpected 5xx, 0 other errors"
        ),
        "{text}"
    );
    assert!(text.contains("/metrics agree, peer frames agree"), "{text}");
    for outcome in [
        "ok plain",
        "ok stream",
        "ok, closed after the first event",
        "malformed → 400",
        "malformed → 431",
        "malformed → held, closed by the client",
    ] {
        assert!(text.contains(outcome), "no {outcome:?} in\n{text}");
    }
    // the garbage reached both nodes and was dropped, every message of it
    for n in ["a", "b"] {
        let line = text
            .lines()
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("{n}: peer garbage delivered"))
            })
            .unwrap_or_else(|| panic!("no garbage line for {n} in\n{text}"));
        assert!(!line.contains("delivered 0 messages"), "{line}");
    }
}
