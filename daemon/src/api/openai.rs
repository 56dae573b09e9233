//! OpenAI's completion and chat completion endpoints, plain and streamed (SSE).

#[doc(hidden)]
pub mod fuzz;
mod logprobs;
mod request;
mod response;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;
use tokio::sync::mpsc;

use super::text::TextStream;
use super::{json_response, ApiBody, ApiError, ApiResponse, App, Served};
use crate::engine::scheduler::{FinishReason, GenEvent, GenRequest, SubmitError};
use crate::engine::Sampling;
use crate::tokenizer::TokenizerError;
use logprobs::{Entries, Entry};
use request::{ChatRequest, CompletionRequest, GenParams, Prompt};
use response::{unix_now, Header, Kind, Piece, Usage};

/// `GET /v1/models`: the one model this server serves.
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

/// `POST /v1/completions`.
pub async fn completions(
    app: &Arc<App>,
    served: &Served,
    body: Bytes,
) -> Result<ApiResponse, ApiError> {
    let (params, prompt) = off_runtime(app, move |app, served| {
        let (params, prompt) = request::parse::<CompletionRequest>(&body)?.validate(app)?;
        let prompt = match prompt {
            Prompt::Text(s) => tokenize(served, &s)?,
            Prompt::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= served.n_vocab) {
                    return Err(ApiError::bad_request(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        served.n_vocab
                    )));
                }
                ids
            }
        };
        Ok((params, prompt))
    })
    .await?;
    // OpenAI's default for completions
    let max_tokens = params.max_tokens.unwrap_or(16);
    generate(app, served, prompt, max_tokens, params, Kind::Completion).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    app: &Arc<App>,
    served: &Served,
    body: Bytes,
) -> Result<ApiResponse, ApiError> {
    let (params, prompt) = off_runtime(app, move |app, served| {
        let (params, messages) = request::parse::<ChatRequest>(&body)?.validate(app)?;
        // Only the template's own markers are special tokens, never a message's text.
        let prompt = served
            .tokenizer
            .encode_chat(&messages)
            .map_err(|e| match e {
                TokenizerError::Llama(e) => {
                    ApiError::bad_request(format!("cannot tokenize the prompt: {e}"))
                }
                e => ApiError::bad_request(e.to_string()),
            })?;
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        Ok((params, prompt))
    })
    .await?;
    let max_tokens = params
        .max_tokens
        .unwrap_or_else(|| served.n_ctx.saturating_sub(prompt.len()).max(1));
    generate(app, served, prompt, max_tokens, params, Kind::Chat).await
}

/// Runs a request's CPU-heavy part (parsing a body of up to `max_body_bytes`,
/// rendering the chat template, tokenizing) on a blocking thread: on the async
/// workers it would stall every other connection for as long.
async fn off_runtime<T: Send + 'static>(
    app: &Arc<App>,
    work: impl FnOnce(&App, &Served) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        let served = super::ready(&app)?;
        work(&app, served)
    })
    .await
    .map_err(|e| engine_error(format!("the request's preparation failed: {e}")))?
}

/// Tokens of a raw completion prompt: special-token text in it is parsed, as
/// llama.cpp's server does (the client writes the whole prompt, markers included).
fn tokenize(served: &Served, text: &str) -> Result<Vec<i32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    served
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))
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
            sampling: Sampling {
                params: params.sampling,
                logit_bias: params.logit_bias,
                logprobs: params.logprobs,
            },
            events: tx,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                e.to_string(),
            )
            .with_retry_after(1),
            SubmitError::ShuttingDown => ApiError::unavailable("shutting_down", e.to_string()),
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
        n_cached: 0,
        n_generated: 0,
        finished: None,
        entries: params.logprobs.map(|_| Entries::new()),
        logprobs: Vec::new(),
    };
    let header = Header::new(kind, &app.model_id);
    if params.stream {
        Ok(stream_response(run, header, kind, params.include_usage))
    } else {
        full_response(run, header, kind).await
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
    /// Prompt tokens the engine took from its prompt cache.
    n_cached: usize,
    n_generated: usize,
    /// How the generation ended, once it has (a stop string ends it early).
    finished: Option<FinishReason>,
    /// Makes the log-probability entries, when the request asked for them.
    entries: Option<Entries>,
    /// Entries of tokens not yet handed on ([`Run::take_logprobs`]).
    logprobs: Vec<Entry>,
}

enum Step {
    Text(String),
    Done(FinishReason),
    Failed(ApiError),
}

impl Run {
    /// The next piece of text (never empty), then how the generation ended; dropping
    /// the run cancels the generation.
    async fn next(&mut self) -> Step {
        loop {
            if let Some(reason) = self.finished {
                return Step::Done(reason);
            }
            match self.rx.recv().await {
                Some(GenEvent::Started { cached }) => {
                    self.n_cached = cached;
                    continue;
                }
                Some(GenEvent::Token(picked)) => {
                    self.count_token();
                    let t = picked.token;
                    if let (Some(lp), Some(e)) = (&picked.logprobs, self.entries.as_mut()) {
                        self.logprobs.push(e.next(&self.tokenizer, t, lp));
                    }
                    let bytes = self.tokenizer.piece(t).unwrap_or_default();
                    let s = self.text.push(&bytes);
                    if self.text.stopped() {
                        // Stop string: end here (the engine is cancelled when rx drops).
                        self.finished = Some(FinishReason::Stop);
                    }
                    if !s.is_empty() {
                        return Step::Text(s);
                    }
                }
                Some(GenEvent::Done { reason, .. }) => {
                    self.finished = Some(reason);
                    let rest = self.text.finish();
                    if !rest.is_empty() {
                        return Step::Text(rest);
                    }
                }
                Some(GenEvent::Error(e)) => return Step::Failed(engine_error(e)),
                Some(GenEvent::ShuttingDown) => {
                    return Step::Failed(ApiError::unavailable(
                        "shutting_down",
                        "the server is shutting down",
                    ))
                }
                None => return Step::Failed(engine_error("the engine stopped".into())),
            }
        }
    }

    /// The log-probability entries of the tokens since the last call (None when the
    /// request did not ask for them).
    fn take_logprobs(&mut self) -> Option<Vec<Entry>> {
        self.entries
            .as_ref()
            .map(|_| std::mem::take(&mut self.logprobs))
    }

    /// Counts a generated token and its latency.
    fn count_token(&mut self) {
        let now = Instant::now();
        let metrics = &self.app.metrics;
        match self.last_token {
            None => metrics.ttft.observe((now - self.started).as_secs_f64()),
            Some(prev) => metrics.inter_token.observe((now - prev).as_secs_f64()),
        }
        self.last_token = Some(now);
        self.n_generated += 1;
        metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
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

async fn full_response(mut run: Run, header: Header, kind: Kind) -> Result<ApiResponse, ApiError> {
    let mut text = String::new();
    let reason = loop {
        match run.next().await {
            Step::Text(s) => text.push_str(&s),
            Step::Done(reason) => break reason,
            Step::Failed(e) => return Err(e),
        }
    };
    let usage = Usage::new(run.n_prompt, run.n_cached, run.n_generated);
    let logprobs = run.take_logprobs();
    let body = response::whole(kind, &header, &text, reason, usage, logprobs.as_deref());
    Ok(json_response(StatusCode::OK, &body))
}

fn stream_response(mut run: Run, header: Header, kind: Kind, include_usage: bool) -> ApiResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let chunk = |piece: Piece<'_>, lp: Option<Vec<Entry>>| {
            response::chunk(kind, &header, piece, lp.as_deref())
        };
        if kind == Kind::Chat && tx.send(chunk(Piece::Role, None)).await.is_err() {
            return;
        }
        let end = loop {
            match run.next().await {
                Step::Text(s) => {
                    if tx
                        .send(chunk(Piece::Text(&s), run.take_logprobs()))
                        .await
                        .is_err()
                    {
                        return; // client gone: dropping `run` cancels the generation
                    }
                }
                Step::Done(reason) => break Ok(reason),
                Step::Failed(e) => break Err(e),
            }
        };
        let usage = Usage::new(run.n_prompt, run.n_cached, run.n_generated);
        // tokens whose text never came (cut by a stop string): on the last chunk
        let rest = run.take_logprobs().filter(|l| !l.is_empty());
        drop(run);
        let last = match end {
            Ok(reason) => chunk(Piece::End(reason, include_usage.then_some(usage)), rest),
            Err(e) => response::sse(&e.body_json()),
        };
        let _ = tx.send(last).await;
        let _ = tx.send(response::DONE).await;
    });
    let mut r = Response::new(ApiBody::Stream(rx));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
