//! The soak's HTTP side, on raw TCP (so that malformed requests and mid-stream
//! disconnects are exactly what is written): which request comes when ([`Plan`]),
//! one exchange with the server, and what came of it ([`Outcome`]).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::malformed::{self, Expect};
use crate::bench_serve::PROMPTS;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub const COMPLETIONS: &str = "/v1/completions";
pub const CHAT: &str = "/v1/chat/completions";

/// The mix of requests and its seed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    /// Fewest and most tokens a request asks for.
    pub tokens: (i64, i64),
    pub malformed: f64,
    pub streamed: f64,
    pub disconnect: f64,
    /// A request not finished by then is a hang.
    pub hang: Duration,
}

/// What request number `i` is.
#[derive(Debug, Clone)]
pub enum Shape {
    Good(Good),
    /// One of [`malformed::CASES`], and the seed of its random bytes.
    Bad(usize, u64),
}

#[derive(Debug, Clone)]
pub struct Good {
    pub chat: bool,
    pub stream: bool,
    /// Closed by the client after the first chunk.
    pub cut: bool,
    pub tokens: i64,
    pub prompt: usize,
    /// None: greedy; else the sampling seed at temperature 0.8.
    pub sample: Option<u64>,
}

impl Plan {
    /// The requests of a run of `n`, in order; the malformed ones take the cases in
    /// turn (a run with as many malformed requests as cases has each once).
    pub fn schedule(&self, n: usize) -> Vec<Shape> {
        let mut case = 0;
        (0..n)
            .map(|i| match self.shape(i) {
                Shape::Bad(_, seed) => {
                    case += 1;
                    Shape::Bad((case - 1) % malformed::CASES.len(), seed)
                }
                good => good,
            })
            .collect()
    }

    fn shape(&self, i: usize) -> Shape {
        let mut rng = fastrand::Rng::with_seed(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64),
        );
        if rng.f64() < self.malformed {
            return Shape::Bad(rng.usize(..malformed::CASES.len()), rng.u64(..));
        }
        let stream = rng.f64() < self.streamed;
        Shape::Good(Good {
            chat: rng.bool(),
            stream,
            cut: stream && rng.f64() < self.disconnect,
            tokens: rng.i64(self.tokens.0..=self.tokens.1),
            prompt: rng.usize(..PROMPTS.len()),
            sample: rng.bool().then(|| rng.u64(..1000)),
        })
    }
}

/// How a request went.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// e.g. "ok plain", "malformed → 400", "5xx 500".
    pub kind: String,
    pub error: bool,
    pub hang: bool,
    /// A 5xx nobody expected.
    pub server_error: bool,
    /// Why it is an error (the first few are printed).
    pub detail: String,
    /// What the server's `exo_requests_total` should count for it.
    pub counted: Option<(&'static str, u16)>,
    /// Seconds to the whole answer (plain) or to the first event (streams).
    pub first: Option<f64>,
    /// Seconds to the end of a whole stream.
    pub total: Option<f64>,
}

impl Outcome {
    fn ok(kind: &str) -> Outcome {
        Outcome {
            kind: kind.to_string(),
            ..Outcome::default()
        }
    }

    fn failed(kind: String, detail: String) -> Outcome {
        Outcome {
            server_error: kind.starts_with("5xx"),
            hang: kind == "hang",
            kind,
            error: true,
            detail,
            ..Outcome::default()
        }
    }
}

/// How long to read the answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Until {
    /// To the end (every request says `Connection: close`).
    Eof,
    /// Until the first server-sent event, then close.
    FirstData,
    /// Close after this long (a request the server must wait on).
    Hold(Duration),
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Eof,
    /// Closed by us after the first event.
    Cut,
    /// Closed by us after [`Until::Hold`].
    Held,
    Timeout,
    Reset(io::ErrorKind),
    Connect(io::ErrorKind),
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: Option<u16>,
    /// The response head, lower-cased.
    pub head: String,
    /// The body (de-chunked).
    pub body: Vec<u8>,
    pub first_data: Option<Duration>,
    pub elapsed: Duration,
    pub end: End,
}

/// Writes `request` to a new connection and reads the answer as `until` says, all
/// within `limit`.
pub async fn exchange(addr: SocketAddr, request: &[u8], until: Until, limit: Duration) -> Reply {
    let t0 = Instant::now();
    let mut reply = Reply {
        status: None,
        head: String::new(),
        body: Vec::new(),
        first_data: None,
        elapsed: Duration::ZERO,
        end: End::Eof,
    };
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            reply.end = End::Connect(e.kind());
            return reply;
        }
        Err(_) => {
            reply.end = End::Connect(io::ErrorKind::TimedOut);
            return reply;
        }
    };
    // a server that refuses early may close while we write: read what it said anyway
    let write_error = stream.write_all(request).await.err();
    let deadline = tokio::time::Instant::from_std(
        t0 + match until {
            Until::Hold(d) => d,
            _ => limit,
        },
    );
    let (mut buf, mut chunk, mut head_len) = (Vec::new(), vec![0u8; 16 << 10], None);
    reply.end = loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) if matches!(until, Until::Hold(_)) => break End::Held,
            Err(_) => break End::Timeout,
            Ok(Err(e)) => break End::Reset(e.kind()),
            Ok(Ok(0)) => break End::Eof,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if head_len.is_none() {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                head_len = Some(p + 4);
                reply.status = parse_status(&buf[..p]);
            }
        }
        if let (Some(h), None) = (head_len, reply.first_data) {
            if find(&buf[h..], b"data: ").is_some() {
                reply.first_data = Some(t0.elapsed());
                if until == Until::FirstData && reply.status == Some(200) {
                    break End::Cut;
                }
            }
        }
    };
    reply.elapsed = t0.elapsed();
    drop(stream);
    if let (Some(e), true) = (write_error, buf.is_empty()) {
        if reply.end == End::Eof {
            reply.end = End::Reset(e.kind());
        }
    }
    if let Some(h) = head_len {
        reply.head = String::from_utf8_lossy(&buf[..h]).to_lowercase();
        let body = &buf[h..];
        reply.body = if reply.head.contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_vec()
        };
    }
    reply
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The status of "HTTP/1.1 200 OK…".
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ');
    words.next().filter(|v| v.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
}

/// The data of a chunked body, as far as it goes.
pub fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(body, b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size.filter(|&s| s > 0) else {
            break;
        };
        let data = &body[eol + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        body = data.get(take + 2..).unwrap_or(&[]);
    }
    out
}

/// A POST of `body` to `path`, closed after the answer.
pub fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The JSON body of a well-formed request.
pub fn body(g: &Good) -> Value {
    let prompt = PROMPTS[g.prompt % PROMPTS.len()];
    let mut v = if g.chat {
        json!({"messages": [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": prompt}
        ]})
    } else {
        json!({"prompt": prompt})
    };
    v["max_tokens"] = json!(g.tokens);
    match g.sample {
        Some(seed) => {
            v["temperature"] = json!(0.8);
            v["seed"] = json!(seed);
        }
        None => v["temperature"] = json!(0),
    }
    if g.stream {
        v["stream"] = json!(true);
        v["stream_options"] = json!({"include_usage": true});
    }
    v
}

/// Sends request `shape` and judges the answer.
pub async fn send(addr: SocketAddr, shape: &Shape, plan: &Plan) -> Outcome {
    match shape {
        Shape::Good(g) => good(addr, g, plan).await,
        Shape::Bad(case, seed) => {
            malformed::send(addr, &malformed::CASES[*case], *seed, plan).await
        }
    }
}

async fn good(addr: SocketAddr, g: &Good, plan: &Plan) -> Outcome {
    let path = if g.chat { CHAT } else { COMPLETIONS };
    let request = post(path, body(g).to_string().as_bytes());
    let until = if g.cut { Until::FirstData } else { Until::Eof };
    let reply = exchange(addr, &request, until, plan.hang).await;
    let mut out = match (&reply.end, reply.status) {
        (End::Connect(k), _) => {
            return Outcome::failed(format!("connect failed: {k}"), String::new())
        }
        (End::Timeout, _) => {
            return Outcome::failed(
                "hang".into(),
                format!("{path}: no answer in {:?}", plan.hang),
            )
        }
        (_, None) => return Outcome::failed(format!("no answer ({:?})", reply.end), path.into()),
        (_, Some(200)) => match check_body(g, &reply) {
            Ok(kind) => Outcome::ok(kind),
            Err(e) => Outcome::failed("bad body".into(), format!("{path}: {e}")),
        },
        (_, Some(s)) => Outcome::failed(
            format!("{}xx {s}", s / 100),
            format!("{path}: {}", String::from_utf8_lossy(&reply.body)),
        ),
    };
    out.counted = reply.status.map(|s| (path, s));
    if !out.error {
        if g.stream {
            out.first = reply.first_data.map(|d| d.as_secs_f64());
            out.total = (!g.cut).then_some(reply.elapsed.as_secs_f64());
        } else {
            out.first = Some(reply.elapsed.as_secs_f64());
        }
    }
    out
}

/// Whether a 200's body is what the request asked for; the outcome's kind.
fn check_body(g: &Good, reply: &Reply) -> Result<&'static str> {
    let text = String::from_utf8_lossy(&reply.body);
    if g.cut {
        if reply.end != End::Cut {
            bail!("the stream ended before its first event ({:?})", reply.end);
        }
        return Ok("ok, closed after the first event");
    }
    if reply.end != End::Eof {
        bail!("the answer ended with {:?}", reply.end);
    }
    if !g.stream {
        let v: Value = serde_json::from_str(&text)?;
        let choice = &v["choices"][0];
        let content = if g.chat {
            &choice["message"]["content"]
        } else {
            &choice["text"]
        };
        if !content.is_string() {
            bail!("no text in {text}");
        }
        let n = v["usage"]["completion_tokens"].as_i64().unwrap_or(-1);
        if !(0..=g.tokens).contains(&n) {
            bail!("{n} completion tokens for max_tokens {}", g.tokens);
        }
        return Ok("ok plain");
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    let Some((last, rest)) = events.split_last() else {
        bail!("no events in {text:?}");
    };
    if *last != "[DONE]" {
        bail!("the stream does not end with [DONE]: {text:?}");
    }
    if let Some(bad) = rest
        .iter()
        .find(|e| serde_json::from_str::<Value>(e).is_err())
    {
        bail!("an event is not JSON: {bad:?}");
    }
    Ok("ok stream")
}

/// The body of a GET answered with 200.
pub async fn get_text(addr: SocketAddr, path: &str) -> Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n");
    let reply = exchange(
        addr,
        request.as_bytes(),
        Until::Eof,
        Duration::from_secs(30),
    )
    .await;
    if reply.status != Some(200) || reply.end != End::Eof {
        bail!("GET {path}: {:?} {:?}", reply.status, reply.end);
    }
    Ok(String::from_utf8_lossy(&reply.body).into_owned())
}

/// What the answer to a malformed request says, against what was expected of it.
pub fn judge(name: &str, expect: &Expect, reply: &Reply, endpoint: &'static str) -> Outcome {
    let mut out = match (&reply.end, reply.status) {
        (End::Connect(k), _) => {
            return Outcome::failed(format!("connect failed: {k}"), name.into())
        }
        (End::Timeout, _) => {
            return Outcome::failed("hang".into(), format!("malformed {name}: no answer"))
        }
        (End::Held, None) if expect.held => Outcome::ok("malformed → held, closed by the client"),
        (End::Eof | End::Reset(_), None) if expect.closed => {
            Outcome::ok("malformed → closed by the server")
        }
        (_, Some(s)) if expect.statuses.contains(&s) => Outcome::ok(&format!("malformed → {s}")),
        (end, status) => Outcome::failed(
            match status {
                Some(s) if s >= 500 => format!("5xx {s}"),
                Some(s) => format!("malformed {name}: unexpected {s}"),
                None => format!("malformed {name}: unexpected {end:?}"),
            },
            format!(
                "malformed {name}: {:?} {:?} {}",
                reply.status,
                reply.end,
                String::from_utf8_lossy(&reply.body)
            ),
        ),
    };
    // the API counts what it answered itself (a JSON body); hyper's own refusals of
    // unparsable requests never reach it
    out.counted = match reply.status {
        Some(s) if reply.body.starts_with(b"{") => Some((endpoint, s)),
        Some(_) => None,
        None if reply.end == End::Held => expect.when_held.map(|s| (endpoint, s)),
        None => None,
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        let body = b"5\r\ndata:\r\n4\r\n 1\n\n\r\n0\r\n\r\n";
        assert_eq!(dechunk(body), b"data: 1\n\n");
        // cut short: what arrived
        assert_eq!(dechunk(b"a\r\n0123"), b"0123");
    }

    #[test]
    fn statuses_are_read_from_the_first_line() {
        assert_eq!(
            parse_status(b"HTTP/1.1 431 Request Header Fields Too Large"),
            Some(431)
        );
        assert_eq!(
            parse_status(b"HTTP/1.1 200 OK\r\ncontent-length: 2"),
            Some(200)
        );
        assert_eq!(parse_status(b"SSH-2.0 x"), None);
    }

    #[test]
    fn the_mix_follows_the_shares() {
        let plan = Plan {
            seed: 3,
            tokens: (4, 16),
            malformed: 0.1,
            streamed: 0.5,
            disconnect: 0.1,
            hang: Duration::from_secs(1),
        };
        let (mut bad, mut streams, mut cut) = (0, 0, 0);
        let mut cases = vec![0; malformed::CASES.len()];
        for shape in plan.schedule(10_000) {
            match shape {
                Shape::Bad(case, _) => {
                    bad += 1;
                    cases[case] += 1;
                }
                Shape::Good(g) => {
                    assert!((4..=16).contains(&g.tokens));
                    streams += usize::from(g.stream);
                    cut += usize::from(g.cut);
                    assert!(!g.cut || g.stream);
                }
            }
        }
        assert!((900..1100).contains(&bad), "{bad}");
        assert!((4000..5000).contains(&streams), "{streams}");
        assert!((350..550).contains(&cut), "{cut}");
        // every case, about as often as any other
        let (least, most) = (cases.iter().min(), cases.iter().max());
        assert!(
            least.zip(most).is_some_and(|(l, m)| m - l <= 1),
            "{cases:?}"
        );
    }
}
