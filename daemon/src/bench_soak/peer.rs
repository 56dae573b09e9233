//! Garbage on the peer ports during the soak: random bytes, wrong SP protocols,
//! junk and forged frames on the data port (PULL) and forged requests on the
//! control port (REP, the data port + 1), all over raw TCP with nng's SP framing
//! written by hand. Every message delivered whole must be dropped by the node and
//! counted in its `exo_frames_total`; nothing must reach a stage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use exo::cluster::{FrameKey, FrameType, Sealer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most messages one attack writes on one connection.
pub const MAX_MESSAGES_PER_CONNECTION: u64 = 8;

/// nng's SP protocol numbers (major × 16 + minor).
const PUSH0: u16 = 0x50;
const REQ0: u16 = 0x30;
/// The pair protocol: neither port speaks it.
const PAIR1: u16 = 0x11;

/// Kinds of attack.
const KINDS: usize = 7;
/// No attack waits on a node longer than this.
const ATTACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a forged control request waits for an answer (a node never answers an
/// unauthenticated request: any answer is counted and reported).
const REPLY_WAIT: Duration = Duration::from_millis(300);

/// A node's peer ports.
#[derive(Debug, Clone)]
pub struct Target {
    pub node: String,
    /// The data port; the control port is the next one.
    pub data: SocketAddr,
}

/// What the garbage task did.
#[derive(Debug, Clone, Default)]
pub struct Garbage {
    /// Attacks by kind.
    pub attacks: BTreeMap<&'static str, u64>,
    /// Per node: messages delivered whole, each of which the node must drop and count.
    pub delivered: BTreeMap<String, u64>,
    /// Per node: forged control requests it answered.
    pub answered: BTreeMap<String, u64>,
    /// Connections refused, or closed by the node during the SP handshake.
    pub refused: u64,
    /// Attacks cut short by [`ATTACK_TIMEOUT`].
    pub timed_out: u64,
}

/// Attacks `targets` every `interval` until `stop()`.
pub async fn run(
    targets: Vec<Target>,
    interval: Duration,
    stop: impl Fn() -> bool,
    seed: u64,
) -> Garbage {
    let mut g = Garbage::default();
    if targets.is_empty() {
        return g;
    }
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5EED_6A4B);
    let mut forger = Sealer::with_random_id(FrameKey::derive(b"soak: not the cluster key"));
    // every kind on every target first, then at random
    let mut first = (0..targets.len() * KINDS).map(|j| (j / KINDS, j % KINDS));
    while !stop() {
        let (target, kind) = first
            .next()
            .unwrap_or_else(|| (rng.usize(..targets.len()), rng.usize(..KINDS)));
        let t = &targets[target];
        let control = SocketAddr::new(t.data.ip(), t.data.port().wrapping_add(1));
        // counted as the attack goes, so that one cut short by the timeout still
        // counts the messages it delivered
        let mut sent = Sent::default();
        let attack = async {
            match kind {
                0 => (
                    "random bytes",
                    raw_bytes(if rng.bool() { t.data } else { control }, &mut rng).await,
                ),
                1 => ("wrong SP protocol", wrong_protocol(t.data, &mut rng).await),
                2 => (
                    "junk messages, data port",
                    messages(t.data, false, &mut rng, &mut forger, &mut sent).await,
                ),
                3 => (
                    "forged frames, data port",
                    messages(t.data, true, &mut rng, &mut forger, &mut sent).await,
                ),
                4 => (
                    "forged requests, control port",
                    requests(control, &mut rng, &mut forger, &mut sent).await,
                ),
                5 => (
                    "1 MiB announced, 1 KiB sent",
                    announce(t.data, &mut rng).await,
                ),
                _ => (
                    "idle connection",
                    idle(if rng.bool() { t.data } else { control }).await,
                ),
            }
        };
        match tokio::time::timeout(ATTACK_TIMEOUT, attack).await {
            Ok((name, result)) => {
                *g.attacks.entry(name).or_default() += 1;
                if result.is_err() {
                    g.refused += 1;
                }
            }
            Err(_) => g.timed_out += 1,
        }
        *g.delivered.entry(t.node.clone()).or_default() += sent.delivered;
        *g.answered.entry(t.node.clone()).or_default() += sent.answered;
        tokio::time::sleep(interval).await;
    }
    g
}

/// Messages of one attack the node must count, and control answers it gave.
#[derive(Debug, Default)]
struct Sent {
    delivered: u64,
    answered: u64,
}

/// An attack's end: an error if the node refused the connection or closed it.
type Attack = std::io::Result<()>;

fn junk(rng: &mut fastrand::Rng, max: usize) -> Vec<u8> {
    (0..rng.usize(..max)).map(|_| rng.u8(..)).collect()
}

async fn raw_bytes(addr: SocketAddr, rng: &mut fastrand::Rng) -> Attack {
    let mut s = TcpStream::connect(addr).await?;
    let _ = s.write_all(&junk(rng, 4096)).await;
    Ok(())
}

async fn idle(addr: SocketAddr) -> Attack {
    let _s = TcpStream::connect(addr).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// Connects and exchanges SP headers as `proto`; an error if the node refuses.
async fn handshake(addr: SocketAddr, proto: u16) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let [hi, lo] = proto.to_be_bytes();
    s.write_all(&[0, b'S', b'P', 0, hi, lo, 0, 0]).await?;
    let mut theirs = [0u8; 8];
    s.read_exact(&mut theirs).await?;
    if theirs[..4] != [0, b'S', b'P', 0] {
        return Err(std::io::Error::other("not an SP header"));
    }
    Ok(s)
}

async fn send_message(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut m = (body.len() as u64).to_be_bytes().to_vec();
    m.extend_from_slice(body);
    s.write_all(&m).await
}

async fn wrong_protocol(addr: SocketAddr, rng: &mut fastrand::Rng) -> Attack {
    // the node closes the connection: either at the handshake or before the message
    if let Ok(mut s) = handshake(addr, PAIR1).await {
        let _ = send_message(&mut s, &junk(rng, 512)).await;
    }
    Ok(())
}

/// A frame sealed with the wrong key, sometimes with a byte flipped or cut short.
fn forged(rng: &mut fastrand::Rng, forger: &mut Sealer) -> Vec<u8> {
    let types = [
        FrameType::Hello,
        FrameType::Ping,
        FrameType::Plan,
        FrameType::Cancel,
        FrameType::Setup,
    ];
    let ty = types[rng.usize(..types.len())];
    let protocol = exo::cluster::proto::PROTOCOL;
    let body = json!({"from": "soak", "protocol": protocol, "model_id": "x", "epoch": rng.u64(..)});
    let mut f = forger
        .seal_control(ty, rng.u64(..1000), &body)
        .unwrap_or_else(|_| junk(rng, 256));
    match rng.usize(..3) {
        0 if !f.is_empty() => {
            let i = rng.usize(..f.len());
            f[i] ^= 1 << rng.u8(..8);
        }
        1 => f.truncate(rng.usize(..=f.len())),
        _ => {}
    }
    f
}

/// 1–8 junk or forged messages to a data port (PULL).
async fn messages(
    addr: SocketAddr,
    forge: bool,
    rng: &mut fastrand::Rng,
    forger: &mut Sealer,
    sent: &mut Sent,
) -> Attack {
    let mut s = handshake(addr, PUSH0).await?;
    for _ in 0..rng.usize(1..=MAX_MESSAGES_PER_CONNECTION as usize) {
        let m = if forge {
            forged(rng, forger)
        } else {
            junk(rng, 3000)
        };
        send_message(&mut s, &m).await?;
        sent.delivered += 1;
    }
    Ok(())
}

/// 1–4 forged or junk requests to a control port (REP), each waiting for its answer.
async fn requests(
    addr: SocketAddr,
    rng: &mut fastrand::Rng,
    forger: &mut Sealer,
    sent: &mut Sent,
) -> Attack {
    let mut s = handshake(addr, REQ0).await?;
    for id in 0..rng.usize(1..=4) as u32 {
        let mut m = (0x8000_0000u32 | id).to_be_bytes().to_vec();
        if rng.bool() {
            m.extend_from_slice(&forged(rng, forger));
        } else {
            m.extend_from_slice(&junk(rng, 600));
        }
        send_message(&mut s, &m).await?;
        sent.delivered += 1;
        let mut len = [0u8; 8];
        match tokio::time::timeout(REPLY_WAIT, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {
                let n = u64::from_be_bytes(len).min(1 << 20) as usize;
                let mut reply = vec![0u8; n];
                s.read_exact(&mut reply).await?;
                sent.answered += 1;
            }
            Ok(Err(e)) => return Err(e),
            // no answer: the next request on the same connection
            Err(_) => {}
        }
    }
    Ok(())
}

/// Announces a 1 MiB message, sends 1 KiB of it and hangs up.
async fn announce(addr: SocketAddr, rng: &mut fastrand::Rng) -> Attack {
    let mut s = handshake(addr, PUSH0).await?;
    let mut m = (1u64 << 20).to_be_bytes().to_vec();
    m.extend((0..1024).map(|_| rng.u8(..)));
    s.write_all(&m).await?;
    Ok(())
}
