//! `exo serve` end to end: the real server (hyper, scheduler, engine) runs in-process
//! on 127.0.0.1:0 with a tiny generated Gemma 3 model and is driven over HTTP with
//! reqwest. Every test starts its own server; all generation is greedy, so texts are
//! deterministic and can be compared between plain, streamed, batched and solo runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use exo::serve::{serve, ServeSettings};
use exo_tests::{write_tiny_model, TempDir, TinyArch, TinySpec};
use reqwest::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const MODEL_ID: &str = "m";
const N_CTX: usize = 256;

/// A running server: its address, a client, and the means to stop it.
struct Server {
    base: String,
    addr: SocketAddr,
    http: reqwest::Client,
    settings: ServeSettings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

fn default_settings(model: PathBuf) -> ServeSettings {
    ServeSettings {
        model: Some(model),
        n_ctx: N_CTX,
        max_slots: 4,
        max_queue: 8,
        batch: 64,
        prompt_cache: true,
        threads: 1,
        memory: None,
        api_key: None,
        web: true,
        max_body_bytes: 64 * 1024,
        http: Default::default(),
        shutdown_timeout: Duration::from_secs(2),
        cluster: None,
    }
}

impl Server {
    /// Starts a server on the tiny model and waits until /health says 200.
    async fn start(tag: &str, tweak: impl FnOnce(&mut ServeSettings)) -> Server {
        Server::start_with(tag, TinySpec::new(TinyArch::Gemma3), tweak).await
    }

    /// Starts a server on a model of this shape and waits until it is ready.
    async fn start_with(
        tag: &str,
        spec: TinySpec,
        tweak: impl FnOnce(&mut ServeSettings),
    ) -> Server {
        let server = Server::spawn(tag, Some(spec), tweak).await;
        server.wait_ready().await;
        server
    }

    /// Starts a server; without a spec it points at a file that does not exist.
    async fn spawn(
        tag: &str,
        spec: Option<TinySpec>,
        tweak: impl FnOnce(&mut ServeSettings),
    ) -> Server {
        let dir = TempDir::new(&format!("serve-{tag}")).expect("temp dir");
        let path = dir.path().join(format!("{MODEL_ID}.gguf"));
        if let Some(spec) = spec {
            write_tiny_model(&path, &spec).expect("tiny model");
        }
        let mut settings = default_settings(path);
        tweak(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, settings.clone(), async move {
            let _ = stop_rx.await;
        }));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        Server {
            base: format!("http://{addr}"),
            addr,
            http,
            settings,
            stop: Some(stop_tx),
            task: Some(task),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn model_path(&self) -> &Path {
        self.settings
            .model
            .as_deref()
            .expect("a single node has its model")
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(self.url("/health")).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the server never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    /// POSTs `body` and returns status, headers and the JSON body.
    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self.post(path, body).await;
        json_of(r).await
    }

    async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(self.url(path)).send().await.expect("GET");
        json_of(r).await
    }

    /// A successful non-streamed request: the JSON body.
    async fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post_json(path, body).await;
        assert_eq!(status, StatusCode::OK, "{path} {body}: {v}");
        v
    }

    /// A successful streamed request: the SSE events (without the final `[DONE]`).
    async fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let r = self.post(path, body).await;
        assert_eq!(r.status(), StatusCode::OK, "{path} {body}");
        let ct = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        let text = r.text().await.expect("stream body");
        parse_sse(&text)
    }

    async fn metrics(&self) -> String {
        let r = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.expect("metrics body")
    }

    /// Polls /metrics until `series` equals `want`; false after `within`.
    async fn wait_metric(&self, series: &str, want: f64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if metric(&self.metrics().await, series) == Some(want) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Lets the engine thread wind down; the runtime ends the serve task anyway.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

/// Events of an SSE body: every event is one `data: ` line, the last is `[DONE]`.
fn parse_sse(text: &str) -> Vec<Value> {
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(!events.is_empty(), "empty stream");
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let data = e
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("event without 'data: ': {e:?} in {text:?}"));
        assert!(!data.contains('\n'), "multi-line event {e:?}");
        if i + 1 == events.len() {
            assert_eq!(data, "[DONE]", "the stream must end with [DONE]: {text:?}");
        } else {
            let v: Value = serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("event is not JSON ({err}): {data}"));
            assert!(v.get("error").is_none(), "error event: {v}");
            out.push(v);
        }
    }
    out
}

/// Concatenated text of completion chunks.
fn stream_text(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().expect("chunk text"))
        .collect()
}

/// Concatenated content of chat chunks.
fn stream_content(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The value of one exact series (name with labels) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no choices[0].text: {v}"))
        .to_string()
}

/// An OpenAI-shaped error with this status whose message names the problem.
fn assert_error(
    what: &str,
    (status, body): &(StatusCode, Value),
    want: u16,
    kind: &str,
    needles: &[&str],
) {
    assert_eq!(status.as_u16(), want, "{what}: status; body {body}");
    let e = &body["error"];
    let message = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error.message: {body}"));
    assert!(e["code"].is_string(), "{what}: no error.code: {body}");
    assert_eq!(e["type"].as_str(), Some(kind), "{what}: error.type: {body}");
    for n in needles {
        assert!(
            message.to_lowercase().contains(&n.to_lowercase()),
            "{what}: message {message:?} does not mention {n:?}"
        );
    }
}

/// Sends raw bytes on a fresh connection and returns (status, body) of the answer.
async fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer (and close) before it has read everything.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "no answer within 10 s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let (head, mut body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers: {text:?}"));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, body.to_string());
    }
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return (status, out);
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("chunk end");
    }
}

const PROMPTS: &[&str] = &[
    "hello world",
    "once upon a time there was a cat",
    "tell me a story about the red dog and the blue cat on the mat",
    "what is this",
    "the cat sat on the mat and the dog sat on the cat, what a story. tell me how it is, you and me, one two three",
    "yes",
    "how are you",
    "there was a model, the model was red, the user was blue; say hi to the user and tell the story of the one dog",
];

// ---------------------------------------------------------------- 1. health

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ok_once_the_model_is_loaded() {
    let s = Server::start("health", |_| {}).await;
    let (status, v) = s.get_json("/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({"status": "ok"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_is_reported_as_unavailable() {
    let s = Server::spawn("noload", None, |_| {}).await;
    assert!(!s.model_path().exists());
    // Loading fails quickly; until then /health says "loading" (also a 503).
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let h = s.get_json("/health").await;
        assert_eq!(h.0, StatusCode::SERVICE_UNAVAILABLE, "{}", h.1);
        if h.1["error"]["code"] == "load_failed" || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_error(
        "/health",
        &health,
        503,
        "unavailable",
        &["failed to load", "m.gguf"],
    );
    assert_eq!(health.1["error"]["code"], "load_failed");

    let r = s
        .post_json("/v1/completions", &completion("hello", 4))
        .await;
    assert_error("completions", &r, 503, "unavailable", &[]);
    let c = s.post_json("/v1/chat/completions", &chat("hello", 4)).await;
    assert_error("chat", &c, 503, "unavailable", &[]);
    // The model will never load, so the API must say so rather than "still loading"
    // with Retry-After: 1 (api/mod.rs `ready` ignores `load_error`).
    assert_error(
        "completions after a failed load",
        &r,
        503,
        "unavailable",
        &["failed to load"],
    );
}

// ---------------------------------------------------------------- 2. completions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_is_greedy_deterministic_and_counts_usage() {
    let s = Server::start("compl", |_| {}).await;
    let req = completion("once upon a time there was a cat", 8);
    let a = s.ok("/v1/completions", &req).await;
    assert_eq!(a["object"], "text_completion");
    assert_eq!(a["model"], MODEL_ID);
    assert!(
        a["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")),
        "{a}"
    );
    let text = text_of(&a);
    assert!(!text.is_empty(), "{a}");
    assert_eq!(a["choices"][0]["finish_reason"], "length", "{a}");
    assert_eq!(a["choices"][0]["index"], 0);
    let u = &a["usage"];
    let prompt_tokens = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    let tok = exo::tokenizer::Tokenizer::load(s.model_path(), "gemma3").expect("tokenizer");
    let expected_prompt = tok
        .encode("once upon a time there was a cat")
        .expect("encode")
        .len() as u64;
    assert_eq!(prompt_tokens, expected_prompt, "{a}");
    assert_eq!(u["completion_tokens"], 8, "{a}");
    assert_eq!(u["total_tokens"].as_u64(), Some(prompt_tokens + 8), "{a}");

    // The same request again (the slot is reused) and under the other model names.
    let b = s.ok("/v1/completions", &req).await;
    assert_eq!(text_of(&b), text);
    let c = s
        .ok(
            "/v1/completions",
            &with(req.clone(), "model", json!("default")),
        )
        .await;
    assert_eq!(text_of(&c), text);
    let mut no_model = req.clone();
    no_model.as_object_mut().expect("object").remove("model");
    assert_eq!(text_of(&s.ok("/v1/completions", &no_model).await), text);
    // A shorter request is a prefix of the longer one.
    let short = s
        .ok(
            "/v1/completions",
            &completion("once upon a time there was a cat", 3),
        )
        .await;
    assert!(text.starts_with(&text_of(&short)), "{short} vs {text:?}");
}

// ---------------------------------------------------------------- 3. streamed completions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_completion_equals_the_plain_one() {
    let s = Server::start("stream", |_| {}).await;
    let req = completion("tell me a story about the red dog", 12);
    let plain = s.ok("/v1/completions", &req).await;
    let plain_text = text_of(&plain);

    let events = s
        .stream("/v1/completions", &with(req.clone(), "stream", json!(true)))
        .await;
    assert!(events.len() >= 2, "{events:?}");
    for e in &events {
        assert_eq!(e["object"], "text_completion", "{e}");
        assert_eq!(e["model"], MODEL_ID, "{e}");
        assert_eq!(e["id"], events[0]["id"], "one id per stream");
    }
    assert_eq!(stream_text(&events), plain_text);
    let last = events.last().expect("last");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    for e in &events[..events.len() - 1] {
        assert!(e["choices"][0]["finish_reason"].is_null(), "{e}");
    }
    assert!(
        last.get("usage").is_none(),
        "usage without include_usage: {last}"
    );

    let req = with(req, "stream", json!(true));
    let events = s
        .stream(
            "/v1/completions",
            &with(req, "stream_options", json!({"include_usage": true})),
        )
        .await;
    assert_eq!(stream_text(&events), plain_text);
    let last = events.last().expect("last");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"], plain["usage"], "{last}");
}

// ---------------------------------------------------------------- 4. chat

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_plain_and_streamed_agree() {
    let s = Server::start("chat", |_| {}).await;
    let req = chat("hello, how are you?", 10);
    let plain = s.ok("/v1/chat/completions", &req).await;
    assert_eq!(plain["object"], "chat.completion");
    assert!(plain["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    let msg = &plain["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant", "{plain}");
    let content = msg["content"].as_str().expect("content").to_string();
    assert!(!content.is_empty(), "{plain}");
    let reason = plain["choices"][0]["finish_reason"]
        .as_str()
        .expect("reason");
    assert!(["length", "stop"].contains(&reason), "{plain}");
    let completion_tokens = plain["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=10).contains(&completion_tokens), "{plain}");
    if reason == "length" {
        assert_eq!(completion_tokens, 10);
    }
    // The prompt is the rendered template.
    let tok = exo::tokenizer::Tokenizer::load(s.model_path(), "gemma3").expect("tokenizer");
    let templated = "<start_of_turn>user\nhello, how are you?<end_of_turn>\n<start_of_turn>model\n";
    assert_eq!(
        plain["usage"]["prompt_tokens"].as_u64(),
        Some(tok.encode_templated(templated).expect("encode").len() as u64),
        "{plain}"
    );

    let events = s
        .stream("/v1/chat/completions", &with(req, "stream", json!(true)))
        .await;
    assert_eq!(
        events[0]["choices"][0]["delta"]["role"], "assistant",
        "{}",
        events[0]
    );
    for e in &events {
        assert_eq!(e["object"], "chat.completion.chunk", "{e}");
    }
    for e in &events[1..] {
        assert!(e["choices"][0]["delta"].get("role").is_none(), "{e}");
    }
    assert_eq!(stream_content(&events), content);
    let last = events.last().expect("last");
    assert_eq!(last["choices"][0]["finish_reason"], reason, "{last}");

    // max_completion_tokens is the chat name of max_tokens.
    let mut alt = chat("hello, how are you?", 10);
    alt.as_object_mut().expect("object").remove("max_tokens");
    let alt = s
        .ok(
            "/v1/chat/completions",
            &with(alt, "max_completion_tokens", json!(10)),
        )
        .await;
    assert_eq!(alt["choices"][0]["message"]["content"], content.as_str());
}

// ---------------------------------------------------------------- 5. stop strings

/// A few ASCII letters from the middle of `text` whose first occurrence is not at 0.
fn pick_stop(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    for start in (chars.len() / 2..chars.len().saturating_sub(3)).chain(1..chars.len() / 2) {
        let cand: String = chars[start..start + 3].iter().collect();
        if cand.chars().all(|c| c.is_ascii_alphabetic()) && text.find(&cand).is_some_and(|p| p > 0)
        {
            return cand;
        }
    }
    panic!("no usable stop string in {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_are_never_emitted() {
    let s = Server::start("stop", |_| {}).await;
    let req = completion("the cat sat on the mat and the dog", 24);
    let full = text_of(&s.ok("/v1/completions", &req).await);
    let stop = pick_stop(&full);
    let expected = &full[..full.find(&stop).expect("stop in text")];
    assert!(!expected.is_empty());

    for stop_value in [json!(stop), json!(["zzzzqq", stop, "qqqqzz"])] {
        let r = s
            .ok(
                "/v1/completions",
                &with(req.clone(), "stop", stop_value.clone()),
            )
            .await;
        let text = text_of(&r);
        assert_eq!(text, expected, "stop {stop_value} in {full:?}");
        assert!(!text.contains(&stop));
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
        let ct = r["usage"]["completion_tokens"].as_u64().expect("usage");
        assert!(ct < 24, "generation went on after the stop string: {r}");

        let events = s
            .stream(
                "/v1/completions",
                &with(with(req.clone(), "stop", stop_value), "stream", json!(true)),
            )
            .await;
        for e in &events {
            let t = e["choices"][0]["text"].as_str().expect("text");
            assert!(!t.contains(&stop), "chunk {t:?} holds the stop string");
        }
        assert_eq!(stream_text(&events), expected);
        assert_eq!(
            events.last().expect("last")["choices"][0]["finish_reason"],
            "stop"
        );
    }

    // A stop string that never occurs changes nothing.
    let r = s
        .ok(
            "/v1/completions",
            &with(req.clone(), "stop", json!(["zzzzqq"])),
        )
        .await;
    assert_eq!(text_of(&r), full);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
}

// ---------------------------------------------------------------- 6. models

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_the_served_model() {
    let s = Server::start("models", |_| {}).await;
    let (status, v) = s.get_json("/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{v}");
    let m = &data[0];
    assert_eq!(m["id"], MODEL_ID);
    assert_eq!(m["object"], "model");
    assert_eq!(m["context_length"], N_CTX as u64, "{m}");
    let exo = m["exo"].as_object().expect("exo object");
    assert_eq!(exo["architecture"], "gemma3", "{m}");
    assert_eq!(exo["layers"], 6, "{m}");
    assert_eq!(exo["vocabulary"], exo_tests::tiny_vocab().len(), "{m}");
    assert_eq!(exo["max_slots"], 4, "{m}");
}

// ---------------------------------------------------------------- 7. metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_engine_state() {
    let s = Server::start("metrics", |_| {}).await;
    let before = s.metrics().await;
    assert_eq!(metric(&before, "exo_generated_tokens_total"), Some(0.0));
    s.ok("/v1/completions", &completion("hello world", 8)).await;
    let (status, _) = s.post_json("/v1/completions", &json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let r = s.http.get(s.url("/metrics")).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()[CONTENT_TYPE].to_str().expect("ct").to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let m = r.text().await.expect("body");
    assert_eq!(
        metric(
            &m,
            r#"exo_requests_total{endpoint="/v1/completions",status="200"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"exo_requests_total{endpoint="/v1/completions",status="400"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric(&m, r#"exo_requests_total{endpoint="/health",status="200"}"#)
            .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "exo_generated_tokens_total"), Some(8.0), "{m}");
    assert!(
        metric(&m, "exo_prompt_tokens_total").is_some_and(|n| n >= 2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"exo_time_to_first_token_seconds_bucket{le="+Inf"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "exo_time_to_first_token_seconds_count"),
        Some(1.0)
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("exo_time_to_first_token_seconds_bucket{le=\"0.005\"}")),
        "{m}"
    );
    assert_eq!(
        metric(&m, "exo_inter_token_seconds_count"),
        Some(7.0),
        "{m}"
    );
    assert_eq!(metric(&m, "exo_queue_depth"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "exo_active_slots"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "exo_batch_size"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "exo_max_slots"), Some(4.0), "{m}");
    // 1 prefill step + 7 decode steps for 8 tokens.
    assert_eq!(metric(&m, "exo_step_seconds_count"), Some(8.0), "{m}");
    assert!(m.contains("# TYPE exo_requests_total counter"), "{m}");
    assert!(m.contains("# TYPE exo_active_slots gauge"), "{m}");
    // The metrics request itself is counted too.
    let again = s.metrics().await;
    assert!(
        metric(
            &again,
            r#"exo_requests_total{endpoint="/metrics",status="200"}"#
        )
        .is_some_and(|n| n >= 2.0),
        "{again}"
    );
}

// ---------------------------------------------------------------- 8. errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors() {
    let s = Server::start("errors", |_| {}).await;
    let raw = |path: &str, body: Vec<u8>| {
        s.http
            .post(s.url(path))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
    };
    let send =
        |b: reqwest::RequestBuilder| async move { json_of(b.send().await.expect("send")).await };
    let bad = "invalid_request_error";

    let r = send(raw("/v1/completions", b"{\"prompt\": \"hi\",".to_vec())).await;
    assert_error("malformed JSON", &r, 400, bad, &["JSON"]);
    let r = send(raw("/v1/chat/completions", b"not json".to_vec())).await;
    assert_error("malformed JSON (chat)", &r, 400, bad, &["JSON"]);
    let r = send(raw("/v1/completions", b"[1, 2]".to_vec())).await;
    assert_error("not an object", &r, 400, bad, &["object"]);

    let r = s
        .post_json(
            "/v1/completions",
            &with(completion("hi", 4), "temperature", json!("hot")),
        )
        .await;
    assert_error("temperature type", &r, 400, bad, &["temperature"]);
    let r = s
        .post_json(
            "/v1/completions",
            &with(completion("hi", 4), "max_tokens", json!("8")),
        )
        .await;
    assert_error("max_tokens type", &r, 400, bad, &["max_tokens"]);
    let r = s
        .post_json(
            "/v1/completions",
            &with(completion("hi", 4), "prompt", json!(42)),
        )
        .await;
    assert_error("prompt type", &r, 400, bad, &["prompt"]);
    let r = s
        .post_json(
            "/v1/chat/completions",
            &with(chat("hi", 4), "messages", json!("hi")),
        )
        .await;
    assert_error("messages type", &r, 400, bad, &["messages"]);

    let r = s
        .post_json(
            "/v1/completions",
            &json!({"model": MODEL_ID, "max_tokens": 4}),
        )
        .await;
    assert_error("missing prompt", &r, 400, bad, &["prompt", "required"]);
    let r = s
        .post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL_ID, "max_tokens": 4}),
        )
        .await;
    assert_error("missing messages", &r, 400, bad, &["messages", "required"]);
    let r = s.post_json("/v1/completions", &completion("", 4)).await;
    assert_error("empty prompt", &r, 400, bad, &["prompt", "empty"]);
    let r = s
        .post_json(
            "/v1/chat/completions",
            &with(chat("hi", 4), "messages", json!([])),
        )
        .await;
    assert_error("empty messages", &r, 400, bad, &["messages", "empty"]);

    // A body that is not UTF-8 (bytes 0xff 0xfe inside the prompt string).
    let mut body = b"{\"model\": \"m\", \"max_tokens\": 4, \"prompt\": \"hi ".to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(b"\"}");
    let r = send(raw("/v1/completions", body)).await;
    assert_error("invalid UTF-8", &r, 400, bad, &["unicode"]);

    // Too large: with a Content-Length and chunked (no length announced).
    let limit = s.settings.max_body_bytes;
    let big = json!({"model": MODEL_ID, "prompt": "a ".repeat(limit), "max_tokens": 4});
    let r = s.post_json("/v1/completions", &big).await;
    assert_error("too large", &r, 413, bad, &[&limit.to_string()]);
    let mut chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    let piece = "a".repeat(8192);
    let head = "{\"prompt\": \"";
    chunked.extend_from_slice(format!("{:x}\r\n{head}\r\n", head.len()).as_bytes());
    for _ in 0..(limit / piece.len() + 2) {
        chunked.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
    }
    chunked.extend_from_slice(b"2\r\n\"}\r\n0\r\n\r\n");
    let (status, body) = raw_http(s.addr, &chunked).await;
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_error(
        "too large (chunked)",
        &(StatusCode::from_u16(status).expect("status"), v),
        413,
        bad,
        &[&limit.to_string()],
    );

    // Longer than the context: the message names the prompt's tokens and the context.
    let long = "hello world, tell me a story about the cat and the dog. ".repeat(30);
    let tok = exo::tokenizer::Tokenizer::load(s.model_path(), "gemma3").expect("tokenizer");
    let n_long = tok.encode(&long).expect("encode").len();
    assert!(n_long > N_CTX, "{n_long}");
    let r = s.post_json("/v1/completions", &completion(&long, 4)).await;
    assert_error(
        "prompt too long",
        &r,
        400,
        bad,
        &[&n_long.to_string(), &N_CTX.to_string()],
    );
    assert_eq!(r.1["error"]["code"], "context_length_exceeded");
    let r = s.post_json("/v1/chat/completions", &chat(&long, 4)).await;
    assert_error("chat prompt too long", &r, 400, bad, &[&N_CTX.to_string()]);

    for n in [0, -1] {
        let r = s
            .post_json(
                "/v1/completions",
                &with(completion("hi", 4), "max_tokens", json!(n)),
            )
            .await;
        assert_error("max_tokens", &r, 400, bad, &["max_tokens", &n.to_string()]);
        let r = s
            .post_json(
                "/v1/chat/completions",
                &with(chat("hi", 4), "max_tokens", json!(n)),
            )
            .await;
        assert_error("chat max_tokens", &r, 400, bad, &["max_tokens"]);
    }
    let r = s
        .post_json("/v1/completions", &with(completion("hi", 4), "n", json!(2)))
        .await;
    assert_error("n", &r, 400, bad, &["'n'", "2"]);

    let r = s
        .post_json(
            "/v1/completions",
            &with(completion("hi", 4), "model", json!("gpt-4")),
        )
        .await;
    assert_error("unknown model", &r, 404, bad, &["gpt-4"]);
    assert_eq!(r.1["error"]["code"], "model_not_found");
    let r = s
        .post_json(
            "/v1/chat/completions",
            &with(chat("hi", 4), "model", json!("gpt-4")),
        )
        .await;
    assert_error("unknown model (chat)", &r, 404, bad, &["gpt-4"]);

    let resp = s
        .http
        .get(s.url("/v1/completions"))
        .send()
        .await
        .expect("GET");
    let allow = resp
        .headers()
        .get(ALLOW)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let r = json_of(resp).await;
    assert_error("GET completions", &r, 405, bad, &["POST"]);
    assert_eq!(allow.as_deref(), Some("POST"));

    let r = s.get_json("/v2/x").await;
    assert_error("unknown path", &r, 404, bad, &["/v2/x"]);

    let resp = s.http.post(s.url("/health")).send().await.expect("POST");
    let allow = resp
        .headers()
        .get(ALLOW)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let r = json_of(resp).await;
    assert_error("POST /health", &r, 405, bad, &["GET"]);
    assert_eq!(allow.as_deref(), Some("GET"));

    // After all that the server still serves.
    let ok = s.ok("/v1/completions", &completion("hello", 2)).await;
    assert_eq!(ok["usage"]["completion_tokens"], 2);
}

// ---------------------------------------------------------------- 9. API key

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_configured() {
    let s = Server::start("auth", |c| c.api_key = Some("sekrit".into())).await;
    let req = completion("hello world", 4);
    let call = |auth: Option<&'static str>| {
        let mut b = s.http.post(s.url("/v1/completions")).json(&req);
        if let Some(a) = auth {
            b = b.header("Authorization", a);
        }
        async move { json_of(b.send().await.expect("send")).await }
    };
    let r = call(None).await;
    assert_error("no key", &r, 401, "authentication_error", &["key"]);
    for wrong in [
        "Bearer nope",
        "Bearer sekri",
        "Bearer sekrit2",
        "sekrit",
        "Bearer ",
    ] {
        let r = call(Some(wrong)).await;
        assert_error(wrong, &r, 401, "authentication_error", &["key"]);
    }
    let r = call(Some("Bearer sekrit")).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    assert_eq!(r.1["usage"]["completion_tokens"], 4);

    // Health stays open; the API routes are closed.
    let (status, v) = s.get_json("/health").await;
    assert_eq!((status, v), (StatusCode::OK, json!({"status": "ok"})));
    let r = s.get_json("/v1/models").await;
    assert_error("models without key", &r, 401, "authentication_error", &[]);
    let r = s.post_json("/v1/chat/completions", &chat("hi", 4)).await;
    assert_error("chat without key", &r, 401, "authentication_error", &[]);
}

// ---------------------------------------------------------------- 10. batching

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_equal_solo_runs() {
    // f32 weights: ggml's batched f32 product rounds differently from a one-token
    // one, so this holds only because every sequence's columns are computed as alone
    let spec = TinySpec::new(TinyArch::Gemma3);
    let s = Server::start_with("batch", spec, |c| {
        c.max_slots = 8;
        c.max_queue = 16;
        // prompts span several chunks, fed while other sequences decode
        c.batch = 5;
    })
    .await;
    let req = |p: &str| {
        with(
            with(completion(p, 24), "stream", json!(true)),
            "stream_options",
            json!({"include_usage": true}),
        )
    };
    let mut solo = Vec::new();
    for p in PROMPTS {
        let events = s.stream("/v1/completions", &req(p)).await;
        solo.push(stream_text(&events));
    }
    let steps_before = metric(&s.metrics().await, "exo_step_seconds_count").expect("steps");

    let base = s.base.clone();
    let mut tasks = Vec::new();
    for p in PROMPTS {
        let http = s.http.clone();
        let url = format!("{base}/v1/completions");
        let body = req(p);
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.expect("POST");
            assert_eq!(r.status(), StatusCode::OK);
            parse_sse(&r.text().await.expect("body"))
        }));
    }
    let mut generated = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let events = t.await.expect("task");
        assert_eq!(
            stream_text(&events),
            solo[i],
            "prompt {i} ({:?}) differs when batched",
            PROMPTS[i]
        );
        generated += events.last().expect("last")["usage"]["completion_tokens"]
            .as_u64()
            .expect("usage");
    }
    // The eight streams really were decoded together: far fewer steps than tokens.
    let steps = metric(&s.metrics().await, "exo_step_seconds_count").expect("steps") - steps_before;
    assert!(
        steps * 2.0 < generated as f64,
        "{steps} engine steps for {generated} tokens: not batched"
    );
    let m = s.metrics().await;
    assert_eq!(metric(&m, "exo_active_slots"), Some(0.0));
    assert_eq!(metric(&m, "exo_queue_depth"), Some(0.0));
}

// ---------------------------------------------------------------- 11. disconnect

/// A model some 30 times slower than the default tiny one (still tiny), so that a
/// long generation is certainly still running when a test interferes with it.
fn slow_spec() -> TinySpec {
    let mut spec = TinySpec::new(TinyArch::Gemma3);
    spec.n_layer = 8;
    spec.n_embd = 256;
    spec.n_ff = 1024;
    spec.head_dim = Some(64);
    spec
}

/// Reads the rest of a stream: (text, whether it ended cleanly rather than broke).
fn read_rest(mut r: reqwest::Response, first: &[u8]) -> JoinHandle<(String, bool)> {
    let mut text = String::from_utf8_lossy(first).into_owned();
    tokio::spawn(async move {
        loop {
            match r.chunk().await {
                Ok(Some(c)) => text.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) => return (text, true),
                Err(_) => return (text, false),
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_slot() {
    let s = Server::start_with("gone", slow_spec(), |c| c.n_ctx = 512).await;
    let body = with(completion("once upon a time", 400), "stream", json!(true));
    let mut r = s.post("/v1/completions", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.chunk().await.expect("read").expect("a first chunk");
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(r);
    let t0 = Instant::now();
    assert!(
        s.wait_metric("exo_active_slots", 0.0, Duration::from_secs(2))
            .await,
        "the slot is still busy 2 s after the client left"
    );
    let freed = t0.elapsed();
    // Cancelled, not run to the end (400 tokens take 400 steps), and nothing runs on.
    let m = s.metrics().await;
    let steps = metric(&m, "exo_step_seconds_count").expect("steps");
    let step_secs = metric(&m, "exo_step_seconds_sum").expect("step time") / steps;
    eprintln!(
        "slot freed {freed:?} after the client left, at step {steps} ({step_secs:.5} s/step)"
    );
    assert!(
        steps < 200.0,
        "{steps} steps: the generation was not cancelled"
    );
    assert_eq!(metric(&m, "exo_queue_depth"), Some(0.0));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        metric(&s.metrics().await, "exo_step_seconds_count"),
        Some(steps)
    );

    // A new request works, and the slot is clean: the same 400-token request, not
    // streamed, runs to its full length (so the step count above means something).
    let full = s
        .ok("/v1/completions", &completion("once upon a time", 400))
        .await;
    assert_eq!(full["choices"][0]["finish_reason"], "length", "{full}");
    assert_eq!(full["usage"]["completion_tokens"], 400);
    let first: Value = serde_json::from_slice(
        first
            .strip_prefix(b"data: ")
            .and_then(|d| d.split(|&b| b == b'\n').next())
            .expect("event"),
    )
    .expect("JSON");
    assert!(text_of(&full).starts_with(&text_of(&first)));
}

// ---------------------------------------------------------------- 12. load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_429_and_everything_drains() {
    let s = Server::start("load", |c| {
        c.max_slots = 4;
        c.max_queue = 4;
    })
    .await;
    const TOTAL: usize = 200;
    const CONCURRENT: usize = 16;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..CONCURRENT {
        let http = s.http.clone();
        let url = s.url("/v1/completions");
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in (w..TOTAL).step_by(CONCURRENT) {
                let prompt = format!(
                    "{} {}",
                    PROMPTS[i % PROMPTS.len()],
                    ["cat", "dog", "mat"][i % 3]
                );
                let r = http
                    .post(&url)
                    .json(&completion(&prompt, 4))
                    .send()
                    .await
                    .expect("POST");
                let status = r.status();
                let retry = r.headers().get(RETRY_AFTER).cloned();
                let v: Value = r.json().await.expect("JSON body");
                match status.as_u16() {
                    200 => {
                        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
                        assert!(!text_of(&v).is_empty());
                    }
                    429 => {
                        let retry = retry.expect("429 without Retry-After");
                        let secs: u64 = retry.to_str().expect("ascii").parse().expect("seconds");
                        assert!(secs >= 1);
                        assert_error("429", &(status, v), 429, "rate_limit_error", &["busy"]);
                    }
                    other => panic!("unexpected status {other}: {v}"),
                }
                seen.push(status.as_u16());
            }
            seen
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for w in workers {
        for st in w.await.expect("worker") {
            if st == 200 {
                ok += 1;
            } else {
                refused += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(ok + refused, TOTAL);
    assert!(ok > 0, "no request succeeded");
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    eprintln!("load: {ok} ok, {refused} refused in {elapsed:?}");

    let m = s.metrics().await;
    assert_eq!(metric(&m, "exo_active_slots"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "exo_queue_depth"), Some(0.0), "{m}");
    assert_eq!(
        metric(
            &m,
            r#"exo_requests_total{endpoint="/v1/completions",status="200"}"#
        ),
        Some(ok as f64)
    );
    let counted_429 = metric(
        &m,
        r#"exo_requests_total{endpoint="/v1/completions",status="429"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(counted_429, refused as f64);
    assert_eq!(
        metric(&m, "exo_generated_tokens_total"),
        Some(4.0 * ok as f64)
    );
    // And the server is still fine.
    let r = s.ok("/v1/completions", &completion("hello world", 4)).await;
    assert_eq!(r["choices"][0]["finish_reason"], "length");
}

// ---------------------------------------------------------------- 13. shutdown

/// Sends the stop signal and waits for `serve` to return; returns how long it took.
async fn stop_server(s: &mut Server) -> Duration {
    let t0 = Instant::now();
    s.stop.take().expect("stop").send(()).expect("signal");
    let task = s.task.take().expect("task");
    let limit = s.settings.shutdown_timeout + Duration::from_secs(3);
    let res = tokio::time::timeout(limit, task)
        .await
        .unwrap_or_else(|_| panic!("serve did not return within {limit:?}"));
    res.expect("serve task panicked").expect("serve failed");
    t0.elapsed()
}

async fn assert_listener_closed(s: &Server) {
    assert!(
        tokio::net::TcpStream::connect(s.addr).await.is_err(),
        "the listener still accepts connections"
    );
    assert!(s.http.get(s.url("/health")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_streams_finish_and_closes_the_listener() {
    let mut s = Server::start_with("shutdown", slow_spec(), |_| {}).await;
    let body = with(completion("tell me a story", 200), "stream", json!(true));
    let mut r = s.post("/v1/completions", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.chunk().await.expect("read").expect("a first chunk");
    assert!(first.starts_with(b"data: "), "{first:?}");
    let reader = read_rest(r, &first);

    let took = stop_server(&mut s).await;
    let (text, clean) = tokio::time::timeout(Duration::from_secs(2), reader)
        .await
        .expect("the stream did not end")
        .expect("reader");
    eprintln!(
        "shutdown took {took:?}; the stream ended {}",
        if clean { "cleanly" } else { "abruptly" }
    );
    if clean {
        let events = parse_sse(&text);
        let last = events.last().expect("events");
        assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    }
    assert_listener_closed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_streams_that_outlive_the_grace_period() {
    let mut s = Server::start_with("shutdown-cut", slow_spec(), |c| {
        c.n_ctx = 512;
        c.shutdown_timeout = Duration::from_millis(100);
    })
    .await;
    let body = with(completion("tell me a story", 400), "stream", json!(true));
    let mut r = s.post("/v1/completions", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.chunk().await.expect("read").expect("a first chunk");
    let reader = read_rest(r, &first);

    let took = stop_server(&mut s).await;
    let (text, clean) = tokio::time::timeout(Duration::from_secs(2), reader)
        .await
        .expect("the stream did not end")
        .expect("reader");
    // The engine cancels at the deadline; the stream ends properly, with an OpenAI
    // error event saying why, then [DONE].
    assert!(clean, "the stream broke off: {text:?}");
    let raw: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(raw.last(), Some(&"data: [DONE]"), "{text:?}");
    let err_event = raw[raw.len() - 2]
        .strip_prefix("data: ")
        .expect("data line");
    let last: Value = serde_json::from_str(err_event).expect("JSON event");
    assert_eq!(last["error"]["code"], "shutting_down", "{last}");
    assert!(last["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("shutting down")));
    let n_events = raw.len();
    eprintln!("cut after {took:?}: {n_events} events, last {last}");
    assert!(n_events < 400, "the generation ran to its end");
    assert_listener_closed(&s).await;
}
