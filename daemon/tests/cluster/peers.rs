//! Hostile peers on the cluster ports (issue 14): raw TCP on 127.0.0.1 speaking just
//! enough of nng's SP protocol to get a message buffered, more connections than a
//! listener admits, control frames that fail authentication, a hello of another
//! protocol, and a second peer failing while another rejoins. Each asserts the
//! refusal, the node's resident memory bounded, and the cluster answering as before.

use super::*;
use exo::cluster::admission::Admission;
use exo::cluster::capabilities::Capabilities;
use exo::cluster::proto::{ErrorMsg, Hello, HelloAck, PROTOCOL};
use exo::cluster::{ControlClient, ControlServer, Limits, Opener};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

/// The SP protocol numbers of the sockets that dial exo's listeners: a data plane
/// (PULL) takes PUSH peers, a control plane (REP) REQ peers.
const PUSH0: u16 = 0x50;
const REQ0: u16 = 0x30;
/// What a node may grow by while it is attacked.
const BOUND: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

/// A TCP connection to `port` that has done the 8-byte SP handshake as a `proto`
/// socket (0x00 'S' 'P' 0x00, protocol, two zero bytes) and read the node's.
fn sp_connect(port: u16, proto: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let p = proto.to_be_bytes();
    s.write_all(&[0, b'S', b'P', 0, p[0], p[1], 0, 0])
        .expect("handshake");
    let mut theirs = [0u8; 8];
    s.read_exact(&mut theirs).expect("the node's handshake");
    assert_eq!(&theirs[..4], &[0, b'S', b'P', 0], "{theirs:?}");
    s
}

/// Announces a message of `len` bytes (nng's TCP framing: a big-endian u64) and sends
/// up to `send` bytes of junk in 1 MiB writes; the bytes written before the node cut
/// the connection (all of them if it did not).
fn announce(s: &mut TcpStream, len: u64, send: u64) -> u64 {
    if s.write_all(&len.to_be_bytes()).is_err() {
        return 0;
    }
    let block = vec![0xA5u8; MIB as usize];
    let mut sent = 0;
    while sent < send {
        let n = block.len().min((send - sent) as usize);
        if s.write_all(&block[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    sent
}

/// Whether the node closed `s` (it sends nothing on these: a read that waits 2 s
/// finds the connection open).
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    is_closed(s.read(&mut [0u8; 64]))
}

/// Whether a read's outcome says the connection is closed.
fn is_closed(r: std::io::Result<usize>) -> bool {
    match r {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// Whether the node has closed `s` by now (without waiting).
fn closed_now(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).expect("non-blocking");
    let r = s.read(&mut [0u8; 64]);
    s.set_nonblocking(false).expect("blocking");
    is_closed(r)
}

/// A two-node cluster (a, b) on the real model, ready, and its greedy answer to the
/// test prompt; None (skipped) without the real model.
async fn real_pair(tag: &str) -> Option<(Harness, usize, usize, String)> {
    let path = real_model()?;
    let dir = TempDir::new(&format!("cluster-{tag}")).expect("temp dir");
    let mut h = Harness::with_model(dir, path);
    let c = h.cluster(&[peer("a", None), peer("b", None)], &TINY_ENGINE);
    h.wait_ready(c[0], Duration::from_secs(120)).await;
    let (want, _) = h.complete(c[0], &prompt()).await;
    assert!(!want.trim().is_empty());
    Some((h, c[0], c[1], want))
}

fn prompt() -> Value {
    completion("The capital of France is", 16)
}

/// How much each node grew since `before` (VmRSS).
fn growth(h: &Harness, nodes: &[usize], before: &[u64]) -> Vec<u64> {
    nodes
        .iter()
        .zip(before)
        .map(|(&i, &b)| h.node(i).resident().0.saturating_sub(b))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_a_gigabyte_is_cut_off_before_it_costs_memory() {
    let Some((h, head, worker, want)) = real_pair("gigabyte").await else {
        return;
    };
    let t0 = Instant::now();
    let nodes = [head, worker];
    let before: Vec<u64> = nodes.iter().map(|&i| h.node(i).resident().0).collect();
    let data = h.node(worker).data_port;
    let targets = [
        ("the worker's data plane", data, PUSH0),
        ("the worker's control plane", data + 1, REQ0),
        ("the head's data plane", h.node(head).data_port, PUSH0),
    ];
    for (what, port, proto) in targets {
        // (1 GiB - 1) announced, 600 MiB of junk behind it
        let (sent, cut) = tokio::task::spawn_blocking(move || {
            let mut s = sp_connect(port, proto);
            let sent = announce(&mut s, (1 << 30) - 1, 600 * MIB);
            (sent, closed(&mut s))
        })
        .await
        .expect("attack");
        eprintln!("{what}: {} MiB written before the cut", sent / MIB);
        assert!(cut, "{what} kept the connection");
        assert!(sent < 600 * MIB, "{what} took all 600 MiB of junk");
    }
    let grew = growth(&h, &nodes, &before);
    eprintln!(
        "growth: head {} KiB, worker {} KiB",
        grew[0] >> 10,
        grew[1] >> 10
    );
    assert!(grew.iter().all(|&g| g < BOUND), "{grew:?} bytes");
    let (got, _) = h.complete(head, &prompt()).await;
    assert_eq!(got, want, "after the attack");
    eprintln!(
        "a_peer_announcing_a_gigabyte_is_cut_off_before_it_costs_memory: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_a_listeners_cap_are_refused_and_the_cluster_serves() {
    let Some((h, head, worker, want)) = real_pair("many").await else {
        return;
    };
    let t0 = Instant::now();
    let before = h.node(worker).resident().0;
    let data = h.node(worker).data_port;
    // 30 connections to each plane, each holding a message 1 byte short of 1 MiB
    // (within both planes' caps: nng buffers it)
    let (kept, refused) = tokio::task::spawn_blocking(move || {
        let mut kept = Vec::new();
        let mut refused = [0usize; 2];
        for (k, (port, proto)) in [(data, PUSH0), (data + 1, REQ0)].into_iter().enumerate() {
            let mut conns: Vec<TcpStream> = (0..30).map(|_| sp_connect(port, proto)).collect();
            for s in &mut conns {
                announce(s, MIB, MIB - 1);
            }
            // the refused ones are closed as they arrive: a second is plenty
            std::thread::sleep(Duration::from_secs(1));
            for mut s in conns {
                if closed_now(&mut s) {
                    refused[k] += 1;
                } else {
                    kept.push(s);
                }
            }
        }
        (kept, refused)
    })
    .await
    .expect("connections");
    // two nodes: six connections a listener, one of them the head's
    eprintln!("refused {refused:?}, kept {}", kept.len());
    assert!(refused.iter().all(|&r| r >= 25), "refused {refused:?}");
    assert!(kept.len() <= 10, "kept {}", kept.len());
    let grew = h.node(worker).resident().0.saturating_sub(before);
    eprintln!("worker growth with {} held: {} KiB", kept.len(), grew >> 10);
    assert!(grew < BOUND, "{grew} bytes");
    // and counted, exactly
    let m = h.metrics(worker).await;
    for (plane, n) in ["data", "control"].into_iter().zip(refused) {
        let series = format!("exo_peer_connections_refused_total{{plane=\"{plane}\"}}");
        assert_eq!(metric(&m, &series), Some(n as f64), "{plane}: {m}");
    }
    // the refusals are logged, once for many
    let log = std::fs::read_to_string(&h.node(worker).log).unwrap_or_default();
    let lines = log.lines().filter(|l| l.contains("refused")).count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} refusal lines in the worker's log:\n{log}"
    );
    // the cluster serves while they are held
    let (got, _) = h.complete(head, &prompt()).await;
    assert_eq!(got, want, "with the connections held");
    drop(kept);
    let (got, _) = h.complete(head, &prompt()).await;
    assert_eq!(got, want, "after");
    eprintln!(
        "connections_beyond_a_listeners_cap_are_refused_and_the_cluster_serves: {:?}",
        t0.elapsed()
    );
}

/// A REQ message as it travels: nng's length, the request id (high bit set), `body`.
fn req_message(id: u32, body: &[u8]) -> Vec<u8> {
    let mut m = ((body.len() + 4) as u64).to_be_bytes().to_vec();
    m.extend((id | 1 << 31).to_be_bytes());
    m.extend(body);
    m
}

/// Whether anything comes back on `s` within 3 s.
fn answered(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frames_that_fail_authentication_get_no_answer() {
    let Some((h, head, worker, want)) = real_pair("unanswered").await else {
        return;
    };
    let t0 = Instant::now();
    let port = h.node(worker).data_port + 1;
    let stranger = Sealer::new(FrameKey::derive(b"another-secret-of-32-chars-long!"), 7)
        .seal_control(FrameType::Ping, 0, &json!({}))
        .expect("seal");
    // raw: junk, then a ping under another key
    let (junk, forged) = tokio::task::spawn_blocking(move || {
        let mut s = sp_connect(port, REQ0);
        s.write_all(&req_message(1, b"not a frame at all"))
            .expect("send");
        let junk = answered(&mut s);
        s.write_all(&req_message(2, &stranger)).expect("send");
        (junk, answered(&mut s))
    })
    .await
    .expect("raw requests");
    assert!(!junk, "junk was answered");
    assert!(!forged, "a forged ping was answered");
    // and junk on the data plane, 20 messages
    let data = h.node(worker).data_port;
    tokio::task::spawn_blocking(move || {
        let mut s = sp_connect(data, PUSH0);
        for i in 0..20u8 {
            let body = [b"junk on the data plane ".as_slice(), &[i]].concat();
            s.write_all(&(body.len() as u64).to_be_bytes())
                .expect("length");
            s.write_all(&body).expect("junk");
        }
        // held until the node has taken them
        std::thread::sleep(Duration::from_secs(1));
    })
    .await
    .expect("raw data messages");
    // an authentic ping is answered once; the same bytes again are a replay
    let url = format!("tcp://127.0.0.1:{port}");
    let client = ControlClient::dial(&url, &DialOptions::default())
        .await
        .expect("dial");
    let mut insider = Sealer::new(FrameKey::derive(KEY.as_bytes()), 0x1234);
    let ping = insider
        .seal_control(FrameType::Ping, 0, &json!({}))
        .expect("seal");
    let t = Duration::from_secs(3);
    client.request(&ping, t).await.expect("the first ping");
    let err = client.request(&ping, t).await.expect_err("the replay");
    assert!(err.is_timeout(), "{err}");
    // counted, exactly: malformed (the control junk and the 20), forged, replayed
    let sent = [("malformed", 21.0), ("forged", 1.0), ("replayed", 1.0)];
    let count = |m: &str, outcome: &str| {
        metric(m, &format!("exo_frames_total{{outcome=\"{outcome}\"}}")).unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = h.metrics(worker).await;
        if sent.iter().all(|&(o, n)| count(&m, o) >= n) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (outcome, n) in sent {
        assert_eq!(count(&m, outcome), n, "{outcome}: {m}");
    }
    // each kind logged once, with its count (a line per frame would be a flood)
    let log = std::fs::read_to_string(&h.node(worker).log).unwrap_or_default();
    for kind in ["control frame(s) dropped unanswered", "batch(es) dropped"] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(kind)).collect();
        assert_eq!(lines.len(), 1, "{kind}:\n{log}");
    }
    let (got, _) = h.complete(head, &prompt()).await;
    assert_eq!(got, want, "after the unanswered frames");
    eprintln!(
        "control_frames_that_fail_authentication_get_no_answer: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_of_another_protocol_is_refused_with_the_versions() {
    let Some((h, head, worker, want)) = real_pair("protocol").await else {
        return;
    };
    let url = format!("tcp://127.0.0.1:{}", h.node(worker).data_port + 1);
    let client = ControlClient::dial(&url, &DialOptions::default())
        .await
        .expect("dial");
    let key = FrameKey::derive(KEY.as_bytes());
    let hello = Hello {
        from: "elder".into(),
        protocol: PROTOCOL + 998,
        model_hash: String::new(),
    };
    let frame = Sealer::new(key.clone(), 0x4242)
        .seal_control(FrameType::Hello, 0, &hello)
        .expect("seal");
    let reply = client
        .request(&frame, Duration::from_secs(5))
        .await
        .expect("a refusal comes back");
    let opened = Opener::new(key)
        .open(reply.as_bytes(), &Limits::control_only())
        .expect("an authentic answer");
    assert_eq!(opened.frame_type, FrameType::Error);
    let msg = opened.control::<ErrorMsg>().expect("an error").message;
    let (theirs, ours) = (
        format!("protocol {}", PROTOCOL + 998),
        format!("protocol {PROTOCOL}"),
    );
    assert!(
        msg.contains(&theirs) && msg.contains(&ours) && msg.contains("elder"),
        "{msg}"
    );
    let log = std::fs::read_to_string(&h.node(worker).log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("hello refused") && l.contains(&theirs)),
        "the worker's log:\n{log}"
    );
    // nothing changed for the cluster
    let (got, _) = h.complete(head, &prompt()).await;
    assert_eq!(got, want);
}

/// A stand-in worker at `port` (its control plane) holding the cluster key: every
/// authentic request is answered as `answer` says (a frame type and its JSON), or
/// not at all.
async fn fake_worker(
    port: u16,
    answer: impl Fn(FrameType) -> Option<(FrameType, Value)> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let admission = Admission {
        recv_max: 1 << 20,
        max_conns: 8,
    };
    let url = format!("tcp://127.0.0.1:{port}");
    let server = ControlServer::listen(&url, admission)
        .await
        .expect("listen");
    let key = FrameKey::derive(KEY.as_bytes());
    let opener = std::sync::Mutex::new(Opener::new(key.clone()));
    let sealer = std::sync::Mutex::new(Sealer::new(key, 0x99));
    tokio::spawn(async move {
        let _ = server
            .serve(2, |req| {
                let asked = opener
                    .lock()
                    .unwrap()
                    .open(&req, &Limits::control_only())
                    .map(|f| f.frame_type);
                let reply = asked.ok().and_then(&answer).map(|(ft, body)| {
                    sealer
                        .lock()
                        .unwrap()
                        .seal_control(ft, 0, &body)
                        .expect("seal")
                });
                async move { reply }
            })
            .await;
    })
}

/// A hello-ack from node b.
fn hello_ack(protocol: u32, model_hash: &str) -> Value {
    serde_json::to_value(HelloAck {
        name: "b".into(),
        protocol,
        model_hash: model_hash.into(),
        caps: Capabilities::offering(1 << 30),
        planned: false,
        data_sender: 77,
        full_model: true,
    })
    .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_refuses_a_worker_of_another_protocol() {
    let mut h = Harness::tiny("elder-worker", &tiny_spec());
    let c = h.cluster_unstarted(&[peer("a", None), peer("b", None)], &TINY_ENGINE);
    let port = h.node(c[1]).data_port + 1;
    let fake = fake_worker(port, |ft| {
        (ft == FrameType::Hello).then(|| (FrameType::HelloAck, hello_ack(PROTOCOL + 1, "")))
    })
    .await;
    h.nodes[c[0]].start();
    let v = h.load_failure(c[0], Duration::from_secs(30)).await;
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    let want = format!("peer b speaks protocol {}", PROTOCOL + 1);
    assert!(
        msg.contains(&want) && msg.contains(&format!("protocol {PROTOCOL}")),
        "{v}"
    );
    fake.abort();
}

/// While one peer's rejoin hangs (a restarted b that takes the hello and never
/// answers the plan), the heartbeats go on: c, killed meanwhile, is seen missing at
/// once, not when the rejoin gives up (300 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_peer_failing_during_a_rejoin_is_seen() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("second-failure", &tiny_spec());
    let c = h.cluster(
        &[
            peer("a", Some((0, 2))),
            peer("b", Some((2, 4))),
            peer("c", Some((4, 6))),
        ],
        &TINY_ENGINE,
    );
    h.wait_ready(c[0], Duration::from_secs(60)).await;
    h.complete(c[0], &completion(PROMPTS[1], 8)).await;
    let alive = |ranges: &[(String, usize, usize, bool)], name: &str| {
        ranges.iter().any(|r| r.0 == name && r.3)
    };
    // b goes; the head sees it
    h.nodes[c[1]].kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(&cluster_ranges(&h, c[0]).await, "b") {
        assert!(Instant::now() < deadline, "b's death is not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // "b" comes back without a plan, takes the hello, and never answers the plan
    let mf = exo::model::ModelFile::open(&h.model).expect("model");
    let model_hash = mf.model_hash.clone();
    let fake = fake_worker(h.node(c[1]).data_port + 1, move |ft| match ft {
        FrameType::Hello => Some((FrameType::HelloAck, hello_ack(PROTOCOL, &model_hash))),
        FrameType::Ping => Some((
            FrameType::Pong,
            json!({"name": "b", "epoch": 0, "ms_per_token": 0.0}),
        )),
        _ => None,
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = std::fs::read_to_string(&h.node(c[0]).log).unwrap_or_default();
        if log.contains("peer b runs no plan (restarted?): sending it again") {
            break;
        }
        assert!(Instant::now() < deadline, "no rejoin of b:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // c goes while the rejoin waits for b's answer
    h.nodes[c[2]].kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(20);
    while alive(&cluster_ranges(&h, c[0]).await, "c") {
        assert!(
            Instant::now() < deadline,
            "c, killed during b's rejoin, is still alive after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("c seen missing {:?} after it went", killed.elapsed());
    let log = std::fs::read_to_string(&h.node(c[0]).log).unwrap_or_default();
    assert!(!log.contains("peer b rejoined"), "{log}");
    fake.abort();
    eprintln!(
        "a_second_peer_failing_during_a_rejoin_is_seen: {:?}",
        t0.elapsed()
    );
}
