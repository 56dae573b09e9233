//! The malformed requests the soak interleaves, each with the answers it may get:
//! a 4xx, the server closing the connection, or (for a request the server must wait
//! on, such as a body shorter than its Content-Length) nothing until the client
//! closes after a short wait.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use super::http::{exchange, judge, post, Outcome, Plan, Until, CHAT, COMPLETIONS};

/// How long the client waits before closing a request the server must wait on.
const HOLD: Duration = Duration::from_millis(300);

/// The answers a case may get.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub statuses: &'static [u16],
    /// The server closing (or resetting) the connection without an answer.
    pub closed: bool,
    /// No answer before the client closes after [`HOLD`].
    pub held: bool,
    /// What the API counts when the client closed after the hold (it reads a body
    /// that ends early and refuses it).
    pub when_held: Option<u16>,
}

const BAD_REQUEST: Expect = Expect {
    statuses: &[400],
    closed: true,
    held: false,
    when_held: None,
};

/// A request head over hyper's limits.
const TOO_LARGE: Expect = Expect {
    statuses: &[431, 400],
    ..BAD_REQUEST
};

/// A request the server waits on and never reaches the API with.
const HELD_UNCOUNTED: Expect = Expect {
    statuses: &[400, 408],
    closed: true,
    held: true,
    when_held: None,
};

/// A request whose head reaches the API, which then waits on the body: it counts a
/// 400 once the client closes.
const HELD: Expect = Expect {
    when_held: Some(400),
    ..HELD_UNCOUNTED
};

/// One malformed request.
pub struct Case {
    pub name: &'static str,
    /// The endpoint `/metrics` counts it under ("other" for unknown paths).
    pub endpoint: &'static str,
    pub build: fn(&mut fastrand::Rng) -> Vec<u8>,
    pub hold: bool,
    pub expect: Expect,
}

const fn api(statuses: &'static [u16]) -> Expect {
    Expect {
        statuses,
        closed: false,
        held: false,
        when_held: None,
    }
}

pub const CASES: &[Case] = &[
    Case {
        name: "garbage request line",
        endpoint: "other",
        build: |r| {
            let mut b: Vec<u8> = (0..r.usize(1..200)).map(|_| r.u8(..)).collect();
            b.extend_from_slice(b"\r\n\r\n");
            b
        },
        hold: false,
        expect: BAD_REQUEST,
    },
    Case {
        name: "binary garbage",
        endpoint: "other",
        build: |r| (0..2048).map(|_| r.u8(..)).collect(),
        hold: true,
        expect: HELD_UNCOUNTED,
    },
    Case {
        name: "non-numeric Content-Length",
        endpoint: COMPLETIONS,
        build: |_| head(COMPLETIONS, "Content-Length: abc\r\n", b"{}"),
        hold: false,
        expect: BAD_REQUEST,
    },
    Case {
        name: "two different Content-Lengths",
        endpoint: COMPLETIONS,
        build: |_| {
            head(
                COMPLETIONS,
                "Content-Length: 2\r\nContent-Length: 3\r\n",
                b"{}",
            )
        },
        hold: false,
        expect: BAD_REQUEST,
    },
    Case {
        name: "Content-Length past 2^64",
        endpoint: CHAT,
        build: |_| head(CHAT, "Content-Length: 184467440737095516160\r\n", b"{}"),
        hold: false,
        expect: BAD_REQUEST,
    },
    Case {
        name: "declared body over the limit",
        endpoint: COMPLETIONS,
        build: |_| {
            head(
                COMPLETIONS,
                "Content-Length: 1000000000\r\n",
                b"{\"prompt\": \"",
            )
        },
        hold: false,
        expect: api(&[413]),
    },
    Case {
        name: "body shorter than its Content-Length",
        endpoint: CHAT,
        build: |_| {
            let body = br#"{"messages": [{"role": "user", "content": "Hello"#;
            head(CHAT, "Content-Length: 300\r\n", body)
        },
        hold: true,
        expect: HELD,
    },
    Case {
        name: "chunked body without its last chunk",
        endpoint: COMPLETIONS,
        build: |_| {
            head(
                COMPLETIONS,
                "Transfer-Encoding: chunked\r\n",
                b"10\r\n{\"prompt\": \"abc\r\n",
            )
        },
        hold: true,
        expect: HELD,
    },
    Case {
        name: "bare CRLFs",
        endpoint: "other",
        build: |_| b"\r\n".repeat(1000),
        hold: true,
        expect: HELD_UNCOUNTED,
    },
    Case {
        name: "600 KB header",
        endpoint: COMPLETIONS,
        build: |_| {
            let pad = format!("X-Pad: {}\r\n", "a".repeat(600_000));
            head(COMPLETIONS, &(pad + "Content-Length: 2\r\n"), b"{}")
        },
        hold: false,
        expect: TOO_LARGE,
    },
    Case {
        name: "150 headers",
        endpoint: COMPLETIONS,
        build: |_| {
            let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
            head(COMPLETIONS, &(many + "Content-Length: 2\r\n"), b"{}")
        },
        hold: false,
        expect: TOO_LARGE,
    },
    Case {
        name: "100 KB path",
        endpoint: "other",
        build: |_| {
            format!(
                "GET /{} HTTP/1.1\r\nHost: soak\r\n\r\n",
                "a".repeat(100_000)
            )
            .into_bytes()
        },
        hold: false,
        expect: Expect {
            statuses: &[414, 431, 400],
            ..BAD_REQUEST
        },
    },
    Case {
        name: "header line without a colon",
        endpoint: COMPLETIONS,
        build: |_| {
            head(
                COMPLETIONS,
                "Bogus header line\r\nContent-Length: 2\r\n",
                b"{}",
            )
        },
        hold: false,
        expect: BAD_REQUEST,
    },
    Case {
        name: "HTTP/2 preface",
        endpoint: "other",
        build: |_| b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        hold: false,
        expect: BAD_REQUEST,
    },
    Case {
        name: "invalid JSON",
        endpoint: COMPLETIONS,
        build: |_| post(COMPLETIONS, br#"{"prompt": "The sky", "max_tokens": "#),
        hold: false,
        expect: api(&[400]),
    },
    Case {
        name: "random bytes as the body",
        endpoint: CHAT,
        build: |r| {
            post(
                CHAT,
                &(0..r.usize(1..4000)).map(|_| r.u8(..)).collect::<Vec<u8>>(),
            )
        },
        hold: false,
        expect: api(&[400]),
    },
    Case {
        name: "fields of the wrong type",
        endpoint: COMPLETIONS,
        build: |_| {
            post(
                COMPLETIONS,
                br#"{"prompt": 5, "max_tokens": "many", "stream": "yes"}"#,
            )
        },
        hold: false,
        expect: api(&[400]),
    },
    Case {
        name: "chat without messages",
        endpoint: CHAT,
        build: |_| post(CHAT, br#"{"messages": [], "max_tokens": 4}"#),
        hold: false,
        expect: api(&[400]),
    },
    Case {
        name: "negative max_tokens",
        endpoint: COMPLETIONS,
        build: |_| post(COMPLETIONS, br#"{"prompt": "Hi", "max_tokens": -3}"#),
        hold: false,
        expect: api(&[400]),
    },
    Case {
        // exo ignores fields it does not know, as OpenAI clients send many
        name: "unknown fields",
        endpoint: COMPLETIONS,
        build: |r| {
            let body = json!({
                "prompt": "The sky is", "max_tokens": r.i64(2..6), "temperature": 0,
                "x_soak_unknown": {"nested": [1, 2, 3]}, "user": "soak"
            });
            post(COMPLETIONS, body.to_string().as_bytes())
        },
        hold: false,
        expect: api(&[200, 400]),
    },
    Case {
        name: "GET on a POST endpoint",
        endpoint: CHAT,
        build: |_| {
            format!("GET {CHAT} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n").into_bytes()
        },
        hold: false,
        expect: api(&[405]),
    },
    Case {
        name: "unknown path",
        endpoint: "other",
        build: |_| post("/v1/nothing/here", b"{}"),
        hold: false,
        expect: api(&[404]),
    },
];

/// A POST to `path` with its own framing headers (`headers`, each ending in CRLF).
fn head(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n\
         {headers}Connection: close\r\n\r\n"
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Sends case `case` (its random bytes from `seed`) and judges the answer.
pub async fn send(addr: SocketAddr, case: &Case, seed: u64, plan: &Plan) -> Outcome {
    let request = (case.build)(&mut fastrand::Rng::with_seed(seed));
    let until = if case.hold {
        Until::Hold(HOLD)
    } else {
        Until::Eof
    };
    let reply = exchange(addr, &request, until, plan.hang).await;
    judge(case.name, &case.expect, &reply, case.endpoint)
}
