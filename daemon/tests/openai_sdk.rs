//! End to end with the official `openai` Python package (in `.venv-test`, made by
//! `scripts/setup.sh`) against `exo serve` running the real Gemma 3 270M: a
//! completion, a chat completion and a streamed chat completion, and the SDK's
//! typed log-probabilities and logit biases.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIENT: &str = r#"
import json, sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1] + "/v1", api_key="sekrit")
out = {}
r = c.completions.create(model="gemma-3-270m-Q4_K_M", prompt="The capital of France is", max_tokens=12, temperature=0)
out["completion"] = {"text": r.choices[0].text, "finish": r.choices[0].finish_reason, "usage": r.usage.completion_tokens}
r = c.chat.completions.create(model="gemma-3-270m-Q4_K_M", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=10, temperature=0)
out["chat"] = {"text": r.choices[0].message.content, "role": r.choices[0].message.role, "finish": r.choices[0].finish_reason}
parts, finish = [], None
for ch in c.chat.completions.create(model="gemma-3-270m-Q4_K_M", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=10, temperature=0, stream=True):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
    if ch.choices and ch.choices[0].finish_reason:
        finish = ch.choices[0].finish_reason
out["stream"] = {"text": "".join(parts), "finish": finish}
r = c.chat.completions.create(model="gemma-3-270m-Q4_K_M", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
out["chat_logprobs"] = {"n": 1 <= len(lp) <= 4, "top": len(lp[0].top_logprobs), "ok": all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob for t in lp), "text": "".join(t.token for t in lp) == r.choices[0].message.content}
r = c.completions.create(model="gemma-3-270m-Q4_K_M", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2, logit_bias={"9999": 100})
l = r.choices[0].logprobs
out["completion_logprobs"] = {"n": len(l.tokens), "lps": len(l.token_logprobs), "tops": [len(t) for t in l.top_logprobs], "offsets": l.text_offset, "text": r.choices[0].text, "forced": "".join(l.tokens)}
try:
    c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    out["unknown_model"] = "accepted"
except Exception as e:
    out["unknown_model"] = type(e).__name__
bad = OpenAI(base_url=sys.argv[1] + "/v1", api_key="wrong")
try:
    bad.completions.create(model="gemma-3-270m-Q4_K_M", prompt="x", max_tokens=1)
    out["bad_key"] = "accepted"
except Exception as e:
    out["bad_key"] = type(e).__name__
print(json.dumps(out))
"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn openai_python_sdk_against_the_real_model() {
    let Some(model) = exo_tests::real_model_path() else {
        assert!(
            std::env::var_os("EXO_REQUIRE_REAL_MODEL").is_none(),
            "the real model is missing: run scripts/setup.sh"
        );
        eprintln!("note: real model absent (run scripts/setup.sh); skipping");
        return;
    };
    let python = root().join(".venv-test/bin/python");
    if !python.exists() {
        assert!(
            std::env::var_os("EXO_REQUIRE_REAL_MODEL").is_none(),
            "the openai venv is missing: run scripts/setup.sh"
        );
        eprintln!("note: .venv-test absent (run scripts/setup.sh); skipping");
        return;
    }
    let dir = exo_tests::TempDir::new("openai-sdk").expect("tempdir");
    let config = dir.path().join("exo.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\nkey = \"sekrit\"\n[engine]\nthreads = 1\nctx = 512\nmax_slots = 2\n",
            model.display()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_exo"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("EXO_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start exo serve");
    let stderr = child.stderr.take().expect("stderr");
    let server = Server(child);
    // The log line "listening on http://ADDR" tells the port; "serving" that it is ready.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut base = None;
    let mut ready = false;
    while !(base.is_some() && ready) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("exo serve did not become ready in 60 s");
        if let Some(rest) = line.split("listening on ").nth(1) {
            base = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains("serving") {
            ready = true;
        }
        assert!(!line.contains("failed"), "server failed: {line}");
    }
    let base = base.expect("address");
    let out = Command::new(&python)
        .args(["-c", CLIENT, &base])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json from the client");
    let completion = &v["completion"];
    assert!(
        completion["text"]
            .as_str()
            .is_some_and(|t| t.contains("Paris") || t.len() > 10),
        "{v}"
    );
    assert_eq!(completion["finish"], "length");
    assert_eq!(completion["usage"], 12);
    assert_eq!(v["chat"]["role"], "assistant");
    assert!(
        v["chat"]["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(
        v["stream"]["text"], v["chat"]["text"],
        "streamed and plain greedy chat differ: {v}"
    );
    assert!(v["stream"]["finish"].as_str().is_some(), "{v}");
    assert_eq!(v["unknown_model"], "NotFoundError", "{v}");
    assert_eq!(v["bad_key"], "AuthenticationError", "{v}");
    assert_eq!(
        v["chat_logprobs"],
        serde_json::json!({"n": true, "top": 2, "ok": true, "text": true}),
        "{v}"
    );
    let l = &v["completion_logprobs"];
    assert_eq!(
        (l["n"].as_u64(), l["lps"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );
    assert!(
        l["tops"].as_array().is_some_and(|t| t
            .iter()
            .all(|n| n.as_u64().is_some_and(|n| (2..=3).contains(&n)))),
        "{v}"
    );
    assert_eq!(l["text"], l["forced"], "{v}");
    drop(server);
}
