//! `logprobs`, `top_logprobs` and `logit_bias` on the real Gemma 3 270M, through
//! `exo serve` in-process over HTTP: the log-probabilities are llama.cpp's logits
//! (decoding the same tokens alone) log-softmaxed, plain and streamed alike; a bias
//! of +100 forces a token, -100 bans one, and biases do not change the reported
//! log-probabilities (those of the model's own distribution).

mod harness;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use exo::serve::{serve, ServeSettings};
use exo::tokenizer::Tokenizer;
use ggml_shim::llama::{argmax, init_backend, LogitsWanted, OracleModel};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Largest difference allowed between exo's log-probabilities and llama.cpp's.
const TOLERANCE: f64 = 2e-3;
/// Prompt tokens per step (and llama.cpp's batch).
const BATCH: usize = 512;

struct Server {
    addr: SocketAddr,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn start(model: &Path) -> Server {
        let settings = ServeSettings {
            model: Some(model.to_path_buf()),
            n_ctx: 512,
            max_slots: 2,
            max_queue: 8,
            batch: BATCH,
            prompt_cache: true,
            threads: 1,
            memory: None,
            api_key: None,
            web: true,
            max_body_bytes: 1 << 20,
            http: Default::default(),
            shutdown_timeout: Duration::from_secs(2),
            cluster: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, settings, async move {
            let _ = stop_rx.await;
        }));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/health")).send().await {
                if r.status() == StatusCode::OK {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the server never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server {
            addr,
            http,
            _stop: stop,
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, String) {
        let r = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = r.status();
        (status, r.text().await.expect("body"))
    }

    async fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "{body}: {text}");
        serde_json::from_str(&text).expect("JSON")
    }

    /// The arrays at `pointer` of a streamed request's events, joined.
    async fn streamed(&self, path: &str, body: &Value, pointer: &str) -> Vec<Value> {
        self.stream(path, body)
            .await
            .iter()
            .filter_map(|e| e.pointer(pointer).and_then(Value::as_array).cloned())
            .flatten()
            .collect()
    }

    /// The data events of a streamed request, without `[DONE]`.
    async fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "{body}: {text}");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|l| *l != "[DONE]")
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    }
}

/// llama.cpp decoding `prompt` alone and greedily for `n` tokens, with `bias` added
/// before each choice: per step, the chosen token and the log-softmax of the raw
/// logits.
fn oracle(model: &Path, prompt: &[i32], n: usize, bias: &[(i32, f32)]) -> Vec<(i32, Vec<f64>)> {
    init_backend();
    let m = OracleModel::load(model, 1).expect("oracle");
    let mut ctx = m.context(512, BATCH as u32, 1).expect("context");
    ctx.decode(prompt, 0, 0, LogitsWanted::Last)
        .expect("prefill");
    let mut out = Vec::new();
    for pos in (prompt.len() as i32..).take(n) {
        let logits = ctx.logits_ith(-1).expect("logits").to_vec();
        let mut biased = logits.clone();
        for &(id, b) in bias {
            biased[id as usize] += b;
        }
        let t = argmax(&biased).expect("argmax") as i32;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lse = f64::from(max)
            + logits
                .iter()
                .map(|&v| (f64::from(v) - f64::from(max)).exp())
                .sum::<f64>()
                .ln();
        out.push((t, logits.iter().map(|&v| f64::from(v) - lse).collect()));
        ctx.decode(&[t], pos, 0, LogitsWanted::Last)
            .expect("decode");
    }
    out
}

fn piece(tok: &Tokenizer, id: i32) -> String {
    String::from_utf8_lossy(&tok.piece(id).expect("piece")).into_owned()
}

/// The `k` most likely ids of a row of log-probabilities, best first.
fn best(lps: &[f64], k: usize) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..lps.len() as i32).collect();
    ids.sort_by(|&a, &b| lps[b as usize].total_cmp(&lps[a as usize]).then(a.cmp(&b)));
    ids.truncate(k);
    ids
}

/// `got` within [`TOLERANCE`] of `want`; returns the difference.
fn close(got: &Value, want: f64, what: &str) -> f64 {
    let g = got
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {got} is not a number"));
    assert!(
        (g - want).abs() <= TOLERANCE,
        "{what}: exo {g}, llama.cpp {want}"
    );
    (g - want).abs()
}

/// A completion's `logprobs` against llama.cpp's steps (`top` alternatives).
fn check_completion(lp: &Value, steps: &[(i32, Vec<f64>)], tok: &Tokenizer, top: usize) {
    // the end-of-generation token ends the answer and has no entry
    let steps = match steps.iter().position(|(t, _)| tok.is_eog(*t)) {
        Some(end) => &steps[..end],
        None => steps,
    };
    let tokens = lp["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), steps.len(), "{lp}");
    let mut worst = 0f64;
    for (i, (t, lps)) in steps.iter().enumerate() {
        assert_eq!(tokens[i], piece(tok, *t), "token {i}");
        let d = close(
            &lp["token_logprobs"][i],
            lps[*t as usize],
            &format!("token {i}"),
        );
        worst = worst.max(d);
        let map = lp["top_logprobs"][i].as_object().expect("top map");
        assert!(map.len() <= top + 1, "{map:?}");
        let mut seen = Vec::new();
        for id in best(lps, top) {
            let p = piece(tok, id);
            if !seen.contains(&p) {
                let what = format!("token {i}, alternative {p:?}");
                worst = worst.max(close(&map[&p], lps[id as usize], &what));
                seen.push(p);
            }
        }
    }
    eprintln!(
        "{} tokens, {top} alternatives each: largest difference from llama.cpp {worst:.2e}",
        steps.len()
    );
}

/// The real model, its server, and a prompt decoded alone by llama.cpp.
struct Case {
    model: std::path::PathBuf,
    server: Server,
    tok: Tokenizer,
    prompt: Vec<i32>,
    /// llama.cpp's greedy steps after `prompt`.
    alone: Vec<(i32, Vec<f64>)>,
}

/// Tokens generated in the greedy cases.
const N: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_llama_cpp_s_and_logit_bias_forces_and_bans() {
    let Some(model) = harness::real_model() else {
        return;
    };
    let tok = Tokenizer::load(&model, "gemma3").expect("tokenizer");
    let prompt = tok.encode("The capital of France is").expect("tokenize");
    let (m, p) = (model.clone(), prompt.clone());
    let alone = tokio::task::spawn_blocking(move || oracle(&m, &p, N, &[]));
    let server = Server::start(&model).await;
    let c = Case {
        alone: alone.await.expect("oracle"),
        model,
        server,
        tok,
        prompt,
    };
    let lp = completions(&c).await;
    cut_by_a_stop_string(&c, &lp).await;
    chat(&c).await;
    forced_and_banned(&c).await;
    // biases outside the vocabulary, or out of range: 400 naming the field
    let n_vocab = 262_144;
    for bias in [json!({n_vocab.to_string(): 1}), json!({"5": -100.5})] {
        let body = json!({"prompt": "x", "logit_bias": bias});
        let (status, text) = c.server.post("/v1/completions", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains("logit_bias"), "{text}");
    }
}

/// Completions, plain and streamed, against llama.cpp: the plain `logprobs`.
async fn completions(c: &Case) -> Value {
    let body = json!({"prompt": c.prompt, "max_tokens": N, "temperature": 0, "logprobs": 5});
    let plain = c.server.ok("/v1/completions", &body).await;
    let lp = plain["choices"][0]["logprobs"].clone();
    check_completion(&lp, &c.alone, &c.tok, 5);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(offsets.len(), lp["tokens"].as_array().map_or(0, Vec::len));
    assert!(
        offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]),
        "{offsets:?}"
    );
    let mut body = body.clone();
    body["stream"] = json!(true);
    let mut joined = json!({});
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let path = format!("/choices/0/logprobs/{key}");
        joined[key] = json!(c.server.streamed("/v1/completions", &body, &path).await);
    }
    assert_eq!(joined, lp, "streamed logprobs vs plain");
    lp
}

/// Cut by a stop string (a token of the answer `lp`), plain and streamed answers
/// carry the entries of every token up to the one completing the stop string.
async fn cut_by_a_stop_string(c: &Case, lp: &Value) {
    let stop = lp["tokens"][4].as_str().expect("a token").to_string();
    let body = json!({"prompt": c.prompt, "max_tokens": N, "temperature": 0, "logprobs": 1,
        "stop": stop});
    let plain = c.server.ok("/v1/completions", &body).await;
    let text = plain["choices"][0]["text"].as_str().expect("text");
    assert!(!text.contains(stop.as_str()), "{plain}");
    let cut = &plain["choices"][0]["logprobs"]["tokens"];
    let texts: Vec<&str> = cut
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let full = lp["tokens"].as_array().expect("tokens");
    assert_eq!(cut, &json!(full[..texts.len()]), "{plain}");
    assert!(texts.concat().contains(stop.as_str()), "{plain}");
    let before = texts[..texts.len() - 1].concat();
    assert!(!before.contains(stop.as_str()), "{plain}");
    let mut body = body.clone();
    body["stream"] = json!(true);
    let path = "/choices/0/logprobs/tokens";
    let tokens = c.server.streamed("/v1/completions", &body, path).await;
    assert_eq!(&json!(tokens), cut, "streamed, cut by a stop string");
}

/// Chat: plain and streamed give the same entries, one per token of the text.
async fn chat(c: &Case) {
    let chat = json!({"messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let plain = c.server.ok("/v1/chat/completions", &chat).await;
    let content = plain["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    assert!(!content.is_empty(), "{plain}");
    let text: String = content
        .iter()
        .map(|c| c["token"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(text, plain["choices"][0]["message"]["content"]);
    for c in &content {
        let top = c["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3, "{c}");
        assert!(c["logprob"].as_f64().is_some_and(|l| l <= 0.0), "{c}");
        assert!(top[0]["logprob"].as_f64() >= c["logprob"].as_f64(), "{c}");
    }
    let mut body = chat.clone();
    body["stream"] = json!(true);
    let path = "/choices/0/logprobs/content";
    let streamed = c.server.streamed("/v1/chat/completions", &body, path).await;
    assert_eq!(streamed, content, "streamed chat logprobs vs plain");
}

/// +100 forces a token at every step and -100 bans the greedy one (as llama.cpp
/// biased alike); the log-probabilities stay the model's.
async fn forced_and_banned(c: &Case) {
    let (tok, prompt) = (&c.tok, &c.prompt);
    let banana = *tok
        .encode(" banana")
        .expect("tokenize")
        .last()
        .expect("a token");
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1,
        "logit_bias": {banana.to_string(): 100}});
    let forced = c.server.ok("/v1/completions", &body).await;
    let text = &forced["choices"][0]["text"];
    assert_eq!(text, &json!(piece(tok, banana).repeat(4)), "{forced}");
    let raw = c.alone[0].1[banana as usize];
    let lp = &forced["choices"][0]["logprobs"]["token_logprobs"][0];
    close(lp, raw, "the forced token's log-probability");
    assert!(raw < -5.0, "banana should be unlikely");
    let first = c.alone[0].0;
    let bias = [(first, -100.0f32)];
    let (m, p) = (c.model.clone(), prompt.clone());
    let banned = tokio::task::spawn_blocking(move || oracle(&m, &p, N, &bias))
        .await
        .expect("oracle");
    let body = json!({"prompt": prompt, "max_tokens": N, "temperature": 0, "logprobs": 1,
        "logit_bias": {first.to_string(): -100}});
    let got = c.server.ok("/v1/completions", &body).await;
    let lp = &got["choices"][0]["logprobs"];
    check_completion(lp, &banned, tok, 1);
    assert!(banned.iter().all(|(t, _)| *t != first));
    // the banned token is still the model's favourite, beside the chosen one
    let top = lp["top_logprobs"][0].as_object().expect("top");
    assert_eq!(top.len(), 2, "{lp}");
    assert!(top.contains_key(&piece(tok, first)), "{lp}");
    // with a seeded sampler too, the banned token never comes
    let body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 1.0, "seed": 3,
        "logit_bias": {first.to_string(): -100}, "logprobs": 0});
    let sampled = c.server.ok("/v1/completions", &body).await;
    let banned_piece = json!(piece(tok, first));
    let tokens = sampled["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens");
    assert!(tokens.iter().all(|t| *t != banned_piece), "{sampled}");
}
