//! OpenAI's completion and chat completion endpoints, plain and streamed (SSE).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ggml_shim::llama::{SamplingParams, DEFAULT_SEED};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::text::TextStream;
use super::{json_response, ApiBody, ApiError, ApiResponse, App, Served};
use crate::engine::scheduler::{FinishReason, GenEvent, GenRequest, SubmitError};
use crate::tokenizer::Message;

/// The parameters both endpoints share.
struct GenParams {
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn get<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn num(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match get(o, k) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("'{k}' must be a number"))),
    }
}

fn int(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match get(o, k) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("'{k}' must be an integer"))),
    }
}

fn boolean(o: &Map<String, Value>, k: &str) -> Result<bool, ApiError> {
    match get(o, k) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad_request(format!("'{k}' must be true or false"))),
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

fn check_model(app: &App, o: &Map<String, Value>) -> Result<(), ApiError> {
    match get(o, "model") {
        None => Ok(()),
        Some(Value::String(m)) if app.knows_model(m) => Ok(()),
        Some(Value::String(m)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model '{m}' does not exist; this server serves '{}'",
                app.model_id
            ),
        )),
        Some(_) => Err(ApiError::bad_request("'model' must be a string")),
    }
}

fn parse_params(o: &Map<String, Value>, max_tokens_keys: &[&str]) -> Result<GenParams, ApiError> {
    let d = SamplingParams::default();
    let mut max_tokens = None;
    for k in max_tokens_keys {
        if let Some(n) = int(o, k)? {
            if n <= 0 {
                return Err(ApiError::bad_request(format!(
                    "'{k}' must be at least 1, got {n}"
                )));
            }
            max_tokens = Some(n as usize);
        }
    }
    if let Some(n) = int(o, "n")? {
        if n != 1 {
            return Err(ApiError::bad_request(format!(
                "'n' must be 1 (got {n}): one choice per request"
            )));
        }
    }
    let temperature = num(o, "temperature")?.unwrap_or(d.temperature as f64);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "'temperature' must be between 0 and 2",
        ));
    }
    let top_p = num(o, "top_p")?.unwrap_or(d.top_p as f64);
    if !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::bad_request("'top_p' must be between 0 and 1"));
    }
    let min_p = num(o, "min_p")?.unwrap_or(d.min_p as f64);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad_request("'min_p' must be between 0 and 1"));
    }
    let top_k = int(o, "top_k")?
        .unwrap_or(d.top_k as i64)
        .clamp(0, i32::MAX as i64) as i32;
    let presence = num(o, "presence_penalty")?.unwrap_or(0.0);
    let frequency = num(o, "frequency_penalty")?.unwrap_or(0.0);
    for (k, v) in [
        ("presence_penalty", presence),
        ("frequency_penalty", frequency),
    ] {
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::bad_request(format!(
                "'{k}' must be between -2 and 2"
            )));
        }
    }
    let repeat = match num(o, "repeat_penalty")? {
        Some(r) => Some(r),
        None => num(o, "repetition_penalty")?,
    }
    .unwrap_or(1.0);
    if !(0.0..=10.0).contains(&repeat) || repeat == 0.0 {
        return Err(ApiError::bad_request("'repeat_penalty' must be in (0, 10]"));
    }
    let seed = match int(o, "seed")? {
        Some(s) => (s as u64 & 0xFFFF_FFFF) as u32,
        None => DEFAULT_SEED,
    };
    let stops = match get(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad_request("'stop' must be a string or a list of strings"))?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'stop' must be a string or a list of strings",
            ))
        }
    };
    if stops.len() > 16 {
        return Err(ApiError::bad_request("'stop' may hold at most 16 strings"));
    }
    let stream = boolean(o, "stream")?;
    let include_usage = match get(o, "stream_options") {
        Some(Value::Object(so)) => boolean(so, "include_usage")?,
        None => false,
        Some(_) => return Err(ApiError::bad_request("'stream_options' must be an object")),
    };
    Ok(GenParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repeat_penalty: repeat as f32,
            frequency_penalty: frequency as f32,
            presence_penalty: presence as f32,
            seed,
            ..d
        },
        stops,
        stream,
        include_usage,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}{n:04x}", t & 0xFFFF_FFFF_FFFF)
}

pub fn models(app: &App) -> ApiResponse {
    let mut m = json!({
        "id": app.model_id,
        "object": "model",
        "created": unix_now(),
        "owned_by": "exo",
    });
    if let Some(s) = app.served.get() {
        m["context_length"] = json!(s.n_ctx);
        m["exo"] = json!({
            "architecture": s.arch,
            "layers": s.n_layer,
            "vocabulary": s.n_vocab,
            "max_slots": s.max_slots,
        });
    }
    json_response(StatusCode::OK, &json!({"object": "list", "data": [m]}))
}

pub async fn completions(
    app: &Arc<App>,
    served: &Served,
    body: &[u8],
) -> Result<ApiResponse, ApiError> {
    let o = parse_object(body)?;
    check_model(app, &o)?;
    let params = parse_params(&o, &["max_tokens"])?;
    if boolean(&o, "echo")? {
        return Err(ApiError::bad_request("'echo' is not supported"));
    }
    let prompt = match get(&o, "prompt") {
        None => return Err(ApiError::bad_request("'prompt' is required")),
        Some(Value::String(s)) => tokenize(served, s, false)?,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            tokenize(served, a[0].as_str().unwrap_or_default(), false)?
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|v| v.is_i64()) => {
            let ids: Vec<i32> = a
                .iter()
                .filter_map(|v| v.as_i64())
                .map(|v| v.clamp(-1, i32::MAX as i64) as i32)
                .collect();
            if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= served.n_vocab) {
                return Err(ApiError::bad_request(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    served.n_vocab
                )));
            }
            ids
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::bad_request(
                "'prompt' must be a string, a list of one string, or a list of token ids",
            ))
        }
        Some(_) => return Err(ApiError::bad_request("'prompt' must be a string")),
    };
    // OpenAI's default for completions
    let max_tokens = params.max_tokens.unwrap_or(16);
    generate(app, served, prompt, max_tokens, params, Kind::Completion).await
}

pub async fn chat_completions(
    app: &Arc<App>,
    served: &Served,
    body: &[u8],
) -> Result<ApiResponse, ApiError> {
    let o = parse_object(body)?;
    check_model(app, &o)?;
    let params = parse_params(&o, &["max_tokens", "max_completion_tokens"])?;
    let messages = match get(&o, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::bad_request("'messages' must not be empty")),
        None => return Err(ApiError::bad_request("'messages' is required")),
        Some(_) => return Err(ApiError::bad_request("'messages' must be a list")),
    };
    let mut msgs = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::bad_request(format!(
                "messages[{i}] must be an object"
            )));
        };
        let role = match get(m, "role") {
            Some(Value::String(r))
                if ["system", "user", "assistant", "developer", "tool"].contains(&r.as_str()) =>
            {
                if r == "developer" {
                    "system".to_string()
                } else {
                    r.clone()
                }
            }
            Some(Value::String(r)) => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role '{r}' is not a known role"
                )))
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role must be a string"
                )))
            }
        };
        let content = match get(m, "content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}].content: only text parts are supported"
                            )))
                        }
                    }
                }
                s
            }
            None => String::new(),
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].content must be a string or a list of text parts"
                )))
            }
        };
        msgs.push(Message { role, content });
    }
    if msgs.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ApiError::bad_request("the messages have no content"));
    }
    let text = served
        .tokenizer
        .apply_chat_template(&msgs)
        .map_err(|e| ApiError::bad_request(format!("chat template: {e}")))?;
    let prompt = tokenize(served, &text, true)?;
    let max_tokens = params
        .max_tokens
        .unwrap_or_else(|| served.n_ctx.saturating_sub(prompt.len()).max(1));
    generate(app, served, prompt, max_tokens, params, Kind::Chat).await
}

fn tokenize(served: &Served, text: &str, templated: bool) -> Result<Vec<i32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let r = if templated {
        served.tokenizer.encode_templated(text)
    } else {
        served.tokenizer.encode(text)
    };
    r.map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

async fn generate(
    app: &Arc<App>,
    served: &Served,
    prompt: Vec<i32>,
    max_tokens: usize,
    params: GenParams,
    kind: Kind,
) -> Result<ApiResponse, ApiError> {
    if prompt.len() + max_tokens > served.n_ctx {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "context_length_exceeded",
            format!(
                "the prompt has {} tokens and max_tokens is {max_tokens}: together more than the context of {} tokens",
                prompt.len(),
                served.n_ctx
            ),
        ));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let n_prompt = prompt.len();
    served
        .scheduler
        .submit(GenRequest {
            prompt,
            max_tokens,
            sampling: params.sampling,
            events: tx,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => {
                let mut err = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "queue_full",
                    e.to_string(),
                );
                err.retry_after = Some(1);
                err
            }
            SubmitError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "shutting_down",
                e.to_string(),
            ),
            SubmitError::Invalid(m) => ApiError::bad_request(m),
        })?;
    app.metrics
        .prompt_tokens
        .fetch_add(n_prompt as u64, Ordering::Relaxed);
    let run = Run {
        app: app.clone(),
        tokenizer: served.tokenizer.clone(),
        rx,
        text: TextStream::new(params.stops),
        started: Instant::now(),
        last_token: None,
        n_prompt,
        n_generated: 0,
    };
    let id = request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    if params.stream {
        Ok(stream_response(run, id, kind, params.include_usage))
    } else {
        full_response(run, id, kind).await
    }
}

/// One running generation, as the HTTP side sees it.
struct Run {
    app: Arc<App>,
    tokenizer: Arc<crate::tokenizer::Tokenizer>,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    text: TextStream,
    started: Instant,
    last_token: Option<Instant>,
    n_prompt: usize,
    n_generated: usize,
}

enum Step {
    Text(String),
    Done(FinishReason),
    Failed(ApiError),
}

impl Run {
    /// The next piece of output; dropping the run cancels the generation.
    async fn next(&mut self) -> Step {
        loop {
            match self.rx.recv().await {
                Some(GenEvent::Started) => continue,
                Some(GenEvent::Token(t)) => {
                    let now = Instant::now();
                    match self.last_token {
                        None => self
                            .app
                            .metrics
                            .ttft
                            .observe((now - self.started).as_secs_f64()),
                        Some(prev) => self
                            .app
                            .metrics
                            .inter_token
                            .observe((now - prev).as_secs_f64()),
                    }
                    self.last_token = Some(now);
                    self.n_generated += 1;
                    self.app
                        .metrics
                        .generated_tokens
                        .fetch_add(1, Ordering::Relaxed);
                    let bytes = self.tokenizer.piece(t).unwrap_or_default();
                    let s = self.text.push(&bytes);
                    if self.text.stopped() {
                        // Stop string: end here (the engine is cancelled when rx drops).
                        return Step::Text(s);
                    }
                    if !s.is_empty() {
                        return Step::Text(s);
                    }
                }
                Some(GenEvent::Done { reason, .. }) => return Step::Done(reason),
                Some(GenEvent::Error(e)) => return Step::Failed(engine_error(e)),
                Some(GenEvent::ShuttingDown) => return Step::Failed(shutting_down()),
                None => return Step::Failed(engine_error("the engine stopped".into())),
            }
        }
    }
}

fn engine_error(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "engine_error",
        message,
    )
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "shutting_down",
        "the server is shutting down",
    )
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn full_response(mut run: Run, id: String, kind: Kind) -> Result<ApiResponse, ApiError> {
    let mut text = String::new();
    let reason = loop {
        match run.next().await {
            Step::Text(s) => {
                text.push_str(&s);
                if run.text.stopped() {
                    break FinishReason::Stop;
                }
            }
            Step::Done(reason) => {
                text.push_str(&run.text.finish());
                break reason;
            }
            Step::Failed(e) => return Err(e),
        }
    };
    let (prompt, completion) = (run.n_prompt, run.n_generated);
    let choice = match kind {
        Kind::Completion => {
            json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish_str(reason)})
        }
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_str(reason),
        }),
    };
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": object,
            "created": unix_now(),
            "model": run.app.model_id,
            "choices": [choice],
            "usage": usage(prompt, completion),
        }),
    ))
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_response(mut run: Run, id: String, kind: Kind, include_usage: bool) -> ApiResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let created = unix_now();
    let model = run.app.model_id.clone();
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |delta: Value, finish: Option<&str>| -> Value {
        let choice = match kind {
            Kind::Completion => {
                json!({"text": delta, "index": 0, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({"index": 0, "delta": delta, "finish_reason": finish}),
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    tokio::spawn(async move {
        let text_delta = |s: String| {
            if kind == Kind::Chat {
                json!({"content": s})
            } else {
                json!(s)
            }
        };
        if kind == Kind::Chat
            && tx
                .send(sse(&chunk(
                    json!({"role": "assistant", "content": ""}),
                    None,
                )))
                .await
                .is_err()
        {
            return;
        }
        let end = loop {
            match run.next().await {
                Step::Text(s) => {
                    let stopped = run.text.stopped();
                    if !s.is_empty() && tx.send(sse(&chunk(text_delta(s), None))).await.is_err() {
                        return; // client gone: dropping `run` cancels the generation
                    }
                    if stopped {
                        break Ok(FinishReason::Stop);
                    }
                }
                Step::Done(reason) => {
                    let rest = run.text.finish();
                    if !rest.is_empty()
                        && tx.send(sse(&chunk(text_delta(rest), None))).await.is_err()
                    {
                        return;
                    }
                    break Ok(reason);
                }
                Step::Failed(e) => break Err(e),
            }
        };
        let (prompt, completion) = (run.n_prompt, run.n_generated);
        drop(run);
        match end {
            Ok(reason) => {
                let empty = if kind == Kind::Chat {
                    json!({})
                } else {
                    json!("")
                };
                let mut last = chunk(empty, Some(finish_str(reason)));
                if include_usage {
                    last["usage"] = usage(prompt, completion);
                }
                let _ = tx.send(sse(&last)).await;
            }
            Err(e) => {
                let _ = tx.send(sse(&e.body_json())).await;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut r = Response::new(ApiBody::Stream(rx));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
