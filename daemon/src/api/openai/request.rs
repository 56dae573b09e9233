//! The request bodies of the completion endpoints as derived serde types, and their
//! validation into what the engine needs.
//!
//! Every field is a [`Field`]: it records a value of the wrong type instead of failing
//! the whole body, so that validation can name the field in OpenAI's manner ("'top_p'
//! must be a number") and check the fields in a fixed order. OpenAI parameters that
//! exo does not implement are refused unless their value is a no-op ([`unsupported`]);
//! other fields exo does not use (`user`, …) are ignored, as clients such as the
//! `openai` SDK send them. `logit_bias`, `logprobs` and (chat) `top_logprobs` are
//! OpenAI's; the biases' ids are checked against the vocabulary when the request is
//! submitted.

mod unsupported;

use std::ops::RangeInclusive;

use ggml_shim::llama::{SamplingParams, DEFAULT_SEED};
use hyper::StatusCode;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::api::{ApiError, App};
use crate::engine::sampler::{MAX_LOGIT_BIAS, MAX_LOGIT_BIASES, MAX_TOP_LOGPROBS};
use crate::tokenizer::Message;

/// The most stop strings a request may give.
const MAX_STOPS: usize = 16;

/// The roles a chat message may have (`developer` is taken as `system`).
const ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

/// A request field as the client sent it.
#[derive(Debug, Default)]
enum Field<T> {
    /// Missing, or `null`.
    #[default]
    Absent,
    Given(T),
    /// Present with another type than `T`.
    Wrong,
}

/// What a field's type must be, as error messages say it.
trait Expected: DeserializeOwned {
    const WHAT: &'static str;
    /// Only a JSON object will do (a derived struct would take an array as well).
    const OBJECT: bool = false;
}

impl<'de, T: Expected> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(deserializer)? {
            Value::Null => Field::Absent,
            v if T::OBJECT && !v.is_object() => Field::Wrong,
            v => T::deserialize(v).map_or(Field::Wrong, Field::Given),
        })
    }
}

impl<T: Expected> Field<T> {
    /// The value (None when absent), or "'name' must be …".
    fn get(self, name: &str) -> Result<Option<T>, ApiError> {
        self.described(|| format!("'{name}'"))
    }

    /// The value (None when absent), or "`label` must be …".
    fn described(self, label: impl FnOnce() -> String) -> Result<Option<T>, ApiError> {
        match self {
            Field::Absent => Ok(None),
            Field::Given(v) => Ok(Some(v)),
            Field::Wrong => Err(ApiError::bad_request(format!(
                "{} must be {}",
                label(),
                T::WHAT
            ))),
        }
    }
}

impl Expected for f64 {
    const WHAT: &'static str = "a number";
}

impl Expected for i64 {
    const WHAT: &'static str = "an integer";
}

impl Expected for bool {
    const WHAT: &'static str = "true or false";
}

impl Expected for String {
    const WHAT: &'static str = "a string";
}

/// `logit_bias`: token ids (as JSON object keys) to biases.
type BiasMap = serde_json::Map<String, Value>;

impl Expected for BiasMap {
    const WHAT: &'static str = "an object mapping token ids to numbers";
    const OBJECT: bool = true;
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Expected for Stop {
    const WHAT: &'static str = "a string or a list of strings";
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: Field<bool>,
}

impl Expected for StreamOptions {
    const WHAT: &'static str = "an object";
    const OBJECT: bool = true;
}

/// The fields both endpoints share, apart from `model`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GenFields {
    max_tokens: Field<i64>,
    n: Field<i64>,
    temperature: Field<f64>,
    top_p: Field<f64>,
    min_p: Field<f64>,
    top_k: Field<i64>,
    presence_penalty: Field<f64>,
    frequency_penalty: Field<f64>,
    repeat_penalty: Field<f64>,
    /// Another name of `repeat_penalty` (which wins when both are given).
    repetition_penalty: Field<f64>,
    seed: Field<i64>,
    stop: Field<Stop>,
    stream: Field<bool>,
    stream_options: Field<StreamOptions>,
    logit_bias: Field<BiasMap>,
}

/// `prompt` of a completion, in each form the JSON may take.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    /// Any other list (only its being a list matters, for the error message).
    OtherList(#[allow(dead_code)] Vec<IgnoredAny>),
}

impl Expected for PromptField {
    const WHAT: &'static str = "a string";
}

/// The body of `POST /v1/completions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CompletionRequest {
    model: Field<String>,
    #[serde(flatten)]
    gen: GenFields,
    prompt: Field<PromptField>,
    echo: Field<bool>,
    /// How many alternatives' log-probabilities to report per token (0 and up).
    logprobs: Field<i64>,
}

/// A chat message's `content`: text, or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Field<ContentPart>>),
}

impl Expected for Content {
    const WHAT: &'static str = "a string or a list of text parts";
}

/// One part of a message's content (exo takes `{"type": "text", "text": …}` only).
#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: String,
}

impl Expected for ContentPart {
    const WHAT: &'static str = "a text part";
    const OBJECT: bool = true;
}

/// One entry of `messages`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChatMessage {
    role: Field<String>,
    content: Field<Content>,
}

impl Expected for ChatMessage {
    const WHAT: &'static str = "an object";
    const OBJECT: bool = true;
}

impl Expected for Vec<Field<ChatMessage>> {
    const WHAT: &'static str = "a list";
}

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ChatRequest {
    model: Field<String>,
    #[serde(flatten)]
    gen: GenFields,
    max_completion_tokens: Field<i64>,
    messages: Field<Vec<Field<ChatMessage>>>,
    logprobs: Field<bool>,
    top_logprobs: Field<i64>,
}

/// What a valid request asks of the engine, apart from its prompt.
#[derive(Debug)]
pub(super) struct GenParams {
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `(token id, bias)` by id; ids not yet checked against the vocabulary.
    pub logit_bias: Vec<(i32, f32)>,
    /// Log-probabilities of each token and of this many alternatives.
    pub logprobs: Option<usize>,
}

/// A completion's prompt: text to tokenize, or token ids (not yet checked against
/// the vocabulary).
#[derive(Debug, PartialEq)]
pub(super) enum Prompt {
    Text(String),
    Tokens(Vec<i32>),
}

/// Parses a request body: it must be a JSON object.
pub(super) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::bad_request(format!("invalid JSON body: {e}"));
    let value: Value = serde_json::from_slice(body).map_err(invalid)?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    unsupported::check(&value)?;
    serde_json::from_value(value).map_err(invalid)
}

impl CompletionRequest {
    /// Checks the request for `app`'s model.
    pub(super) fn validate(self, app: &App) -> Result<(GenParams, Prompt), ApiError> {
        check_model(app, self.model)?;
        let mut params = self.gen.validate(Field::Absent)?;
        if self.echo.get("echo")? == Some(true) {
            return Err(ApiError::bad_request("'echo' is not supported"));
        }
        params.logprobs = self
            .logprobs
            .get("logprobs")?
            .map(|n| top_logprobs(n, "logprobs"))
            .transpose()?;
        let prompt = match self.prompt.get("prompt")? {
            None => return Err(ApiError::bad_request("'prompt' is required")),
            Some(PromptField::Text(s)) => Prompt::Text(s),
            Some(PromptField::Texts(mut list)) if list.len() == 1 => {
                Prompt::Text(list.swap_remove(0))
            }
            Some(PromptField::Tokens(ids)) if !ids.is_empty() => Prompt::Tokens(
                ids.into_iter()
                    .map(|id| id.clamp(-1, i64::from(i32::MAX)) as i32)
                    .collect(),
            ),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "'prompt' must be a string, a list of one string, or a list of token ids",
                ))
            }
        };
        Ok((params, prompt))
    }
}

impl ChatRequest {
    /// Checks the request for `app`'s model; `developer` messages become `system` ones.
    pub(super) fn validate(self, app: &App) -> Result<(GenParams, Vec<Message>), ApiError> {
        check_model(app, self.model)?;
        let mut params = self.gen.validate(self.max_completion_tokens)?;
        let top = self.top_logprobs.get("top_logprobs")?;
        params.logprobs = match (self.logprobs.get("logprobs")?, top) {
            (Some(true), n) => Some(n.map_or(Ok(0), |n| top_logprobs(n, "top_logprobs"))?),
            (_, None) => None,
            (_, Some(_)) => {
                return Err(ApiError::bad_request(
                    "'top_logprobs' needs 'logprobs' to be true",
                ))
            }
        };
        let messages = match self.messages.get("messages")? {
            Some(list) if !list.is_empty() => list,
            Some(_) => return Err(ApiError::bad_request("'messages' must not be empty")),
            None => return Err(ApiError::bad_request("'messages' is required")),
        };
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| chat_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        if messages.iter().all(|m| m.content.trim().is_empty()) {
            return Err(ApiError::bad_request("the messages have no content"));
        }
        Ok((params, messages))
    }
}

impl GenFields {
    /// Checks the fields in a fixed order (the first error is reported);
    /// `max_completion_tokens`, when given, overrides `max_tokens`.
    fn validate(self, max_completion_tokens: Field<i64>) -> Result<GenParams, ApiError> {
        let d = SamplingParams::default();
        let mut max_tokens = None;
        for (name, field) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", max_completion_tokens),
        ] {
            if let Some(n) = field.get(name)? {
                if n <= 0 {
                    return Err(ApiError::bad_request(format!(
                        "'{name}' must be at least 1, got {n}"
                    )));
                }
                max_tokens = Some(n as usize);
            }
        }
        if let Some(n) = self.n.get("n")? {
            if n != 1 {
                return Err(ApiError::bad_request(format!(
                    "'n' must be 1 (got {n}): one choice per request"
                )));
            }
        }
        let temperature = between(self.temperature, "temperature", d.temperature, 0.0..=2.0)?;
        let top_p = between(self.top_p, "top_p", d.top_p, 0.0..=1.0)?;
        let min_p = between(self.min_p, "min_p", d.min_p, 0.0..=1.0)?;
        let top_k = self
            .top_k
            .get("top_k")?
            .map_or(d.top_k, |k| k.clamp(0, i64::from(i32::MAX)) as i32);
        // both types before either range
        let presence = self.presence_penalty.get("presence_penalty")?;
        let frequency = self.frequency_penalty.get("frequency_penalty")?;
        let presence = in_range(presence.unwrap_or(0.0), "presence_penalty", -2.0..=2.0)?;
        let frequency = in_range(frequency.unwrap_or(0.0), "frequency_penalty", -2.0..=2.0)?;
        let repeat = match self.repeat_penalty.get("repeat_penalty")? {
            Some(r) => Some(r),
            None => self.repetition_penalty.get("repetition_penalty")?,
        }
        .unwrap_or(1.0);
        if !(0.0..=10.0).contains(&repeat) || repeat == 0.0 {
            return Err(ApiError::bad_request("'repeat_penalty' must be in (0, 10]"));
        }
        let seed = self
            .seed
            .get("seed")?
            .map_or(DEFAULT_SEED, |s| (s as u64 & 0xFFFF_FFFF) as u32);
        let stops = match self.stop.get("stop")? {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(list)) => list,
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::bad_request(format!(
                "'stop' may hold at most {MAX_STOPS} strings"
            )));
        }
        let stream = self.stream.get("stream")?.unwrap_or(false);
        let include_usage = match self.stream_options.get("stream_options")? {
            Some(options) => options.include_usage.get("include_usage")?.unwrap_or(false),
            None => false,
        };
        let logit_bias = logit_bias(self.logit_bias.get("logit_bias")?.unwrap_or_default())?;
        Ok(GenParams {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty: repeat as f32,
                frequency_penalty: frequency,
                presence_penalty: presence,
                seed,
                ..d
            },
            stops,
            stream,
            include_usage,
            logit_bias,
            logprobs: None,
        })
    }
}

/// `logit_bias` as `(token id, bias)` by id: keys must be token ids (not negative),
/// values numbers within ±100, at most [`MAX_LOGIT_BIASES`] of them.
fn logit_bias(map: BiasMap) -> Result<Vec<(i32, f32)>, ApiError> {
    if map.len() > MAX_LOGIT_BIASES {
        return Err(ApiError::bad_request(format!(
            "'logit_bias' may hold at most {MAX_LOGIT_BIASES} tokens, got {}",
            map.len()
        )));
    }
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let id = key
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|&id| id >= 0)
            .ok_or_else(|| {
                ApiError::bad_request(format!("'logit_bias' keys must be token ids, got {key:?}"))
            })?;
        let bias = value
            .as_f64()
            .filter(|b| b.abs() <= f64::from(MAX_LOGIT_BIAS))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "'logit_bias' values must be numbers between -100 and 100, got {value} for token {id}"
                ))
            })?;
        out.push((id, bias as f32));
    }
    out.sort_by_key(|&(id, _)| id);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ApiError::bad_request(format!(
            "'logit_bias' names token {} twice",
            w[0].0
        )));
    }
    Ok(out)
}

/// A count of alternatives per token (`name`): 0 to [`MAX_TOP_LOGPROBS`].
fn top_logprobs(n: i64, name: &str) -> Result<usize, ApiError> {
    if !(0..=MAX_TOP_LOGPROBS as i64).contains(&n) {
        return Err(ApiError::bad_request(format!(
            "'{name}' must be between 0 and {MAX_TOP_LOGPROBS}"
        )));
    }
    Ok(n as usize)
}

/// A number field within `range`, or `default` when absent.
fn between(
    field: Field<f64>,
    name: &str,
    default: f32,
    range: RangeInclusive<f64>,
) -> Result<f32, ApiError> {
    in_range(field.get(name)?.unwrap_or(f64::from(default)), name, range)
}

/// `v`, or "'name' must be between A and B".
fn in_range(v: f64, name: &str, range: RangeInclusive<f64>) -> Result<f32, ApiError> {
    if !range.contains(&v) {
        return Err(ApiError::bad_request(format!(
            "'{name}' must be between {} and {}",
            range.start(),
            range.end()
        )));
    }
    Ok(v as f32)
}

/// Entry `i` of `messages`, checked.
fn chat_message(i: usize, message: Field<ChatMessage>) -> Result<Message, ApiError> {
    let Field::Given(message) = message else {
        return Err(ApiError::bad_request(format!(
            "messages[{i}] must be an object"
        )));
    };
    let role = match message.role {
        Field::Given(r) if ROLES.contains(&r.as_str()) => match r.as_str() {
            "developer" => "system".to_string(),
            _ => r,
        },
        Field::Given(r) => {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].role '{r}' is not a known role"
            )))
        }
        Field::Absent | Field::Wrong => {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].role must be a string"
            )))
        }
    };
    let content = match message
        .content
        .described(|| format!("messages[{i}].content"))?
    {
        None => String::new(),
        Some(Content::Text(s)) => s,
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|part| match part {
                Field::Given(ContentPart { kind, text }) if kind == "text" => Ok(text),
                _ => Err(ApiError::bad_request(format!(
                    "messages[{i}].content: only text parts are supported"
                ))),
            })
            .collect::<Result<String, _>>()?,
    };
    Ok(Message { role, content })
}

/// `model`, when given, must name the served model.
fn check_model(app: &App, model: Field<String>) -> Result<(), ApiError> {
    match model.get("model")? {
        Some(m) if !app.knows_model(&m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model '{m}' does not exist; this server serves '{}'",
                app.model_id
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
