//! The response bodies of the completion endpoints as derived serde types: a whole
//! completion, and the chunks of a streamed one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use super::logprobs::{ChatLogprobs, CompletionLogprobs, Entry};
use crate::engine::scheduler::FinishReason;

/// Which endpoint answers.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Kind {
    Completion,
    Chat,
}

/// Token counts of a request.
#[derive(Serialize, Debug)]
pub(super) struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
    prompt_tokens_details: PromptDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Serialize, Debug)]
struct PromptDetails {
    /// Prompt tokens taken from the KV cache of an earlier request.
    cached_tokens: usize,
}

impl Usage {
    /// `cached` of the `prompt` tokens came from the prompt cache.
    pub(super) fn new(prompt: usize, cached: usize, completion: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptDetails {
                cached_tokens: cached,
            },
        }
    }
}

/// The fields every response and chunk carries.
#[derive(Serialize, Debug)]
pub(super) struct Header {
    id: String,
    created: u64,
    model: String,
}

impl Header {
    /// A new response's id and time.
    pub(super) fn new(kind: Kind, model: &str) -> Header {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        Header {
            id: format!("{prefix}-{:x}{n:04x}", nanos & 0xFFFF_FFFF_FFFF),
            created: unix_now(),
            model: model.to_string(),
        }
    }
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A whole response, or one chunk of a stream.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(flatten)]
    header: &'a Header,
    object: &'static str,
    choices: [Choice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// The one choice of a response (exo answers `n` = 1 only).
#[derive(Serialize)]
#[serde(untagged)]
enum Choice<'a> {
    /// A completion's text, whole or a chunk of it.
    Text {
        text: &'a str,
        index: u32,
        logprobs: Option<CompletionLogprobs<'a>>,
        finish_reason: Option<&'static str>,
    },
    /// A whole chat completion.
    Message {
        index: u32,
        message: Delta<'a>,
        logprobs: Option<ChatLogprobs<'a>>,
        finish_reason: &'static str,
    },
    /// A chunk of a streamed chat completion.
    Delta {
        index: u32,
        delta: Delta<'a>,
        logprobs: Option<ChatLogprobs<'a>>,
        finish_reason: Option<&'static str>,
    },
}

/// A chat message, or the part of one a chunk adds.
#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// What one chunk of a stream adds.
pub(super) enum Piece<'a> {
    /// The opening chunk of a chat stream: the assistant's role.
    Role,
    Text(&'a str),
    /// The closing chunk, with the reason and (when asked for) the usage.
    End(FinishReason, Option<Usage>),
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// A whole (not streamed) response; `logprobs` when the request asked for them.
pub(super) fn whole<'a>(
    kind: Kind,
    header: &'a Header,
    text: &'a str,
    reason: FinishReason,
    usage: Usage,
    logprobs: Option<&'a [Entry]>,
) -> impl Serialize + 'a {
    let finish_reason = finish_str(reason);
    let (object, choice) = match kind {
        Kind::Completion => (
            "text_completion",
            Choice::Text {
                text,
                index: 0,
                logprobs: logprobs.map(CompletionLogprobs::of),
                finish_reason: Some(finish_reason),
            },
        ),
        Kind::Chat => (
            "chat.completion",
            Choice::Message {
                index: 0,
                message: Delta {
                    role: Some("assistant"),
                    content: Some(text),
                },
                logprobs: logprobs.map(ChatLogprobs::of),
                finish_reason,
            },
        ),
    };
    Body {
        header,
        object,
        choices: [choice],
        usage: Some(usage),
    }
}

/// One server-sent event of a stream; `logprobs`, those of the tokens it adds, when
/// the request asked for them.
pub(super) fn chunk(
    kind: Kind,
    header: &Header,
    piece: Piece<'_>,
    logprobs: Option<&[Entry]>,
) -> Bytes {
    let (text, role, finish, usage) = match piece {
        Piece::Role => (Some(""), Some("assistant"), None, None),
        Piece::Text(s) => (Some(s), None, None, None),
        Piece::End(reason, usage) => (None, None, Some(finish_str(reason)), usage),
    };
    let (object, choice) = match kind {
        Kind::Completion => (
            "text_completion",
            Choice::Text {
                text: text.unwrap_or(""),
                index: 0,
                logprobs: logprobs.map(CompletionLogprobs::of),
                finish_reason: finish,
            },
        ),
        Kind::Chat => (
            "chat.completion.chunk",
            Choice::Delta {
                index: 0,
                delta: Delta {
                    role,
                    content: text,
                },
                logprobs: logprobs.map(ChatLogprobs::of),
                finish_reason: finish,
            },
        ),
    };
    sse(&Body {
        header,
        object,
        choices: [choice],
        usage,
    })
}

/// `value` as a server-sent event.
pub(super) fn sse(value: &impl Serialize) -> Bytes {
    // exo's own types always serialize (no maps with non-string keys)
    let json = serde_json::to_string(value).unwrap_or_default();
    Bytes::from(format!("data: {json}\n\n"))
}

/// The event that ends every stream.
pub(super) const DONE: Bytes = Bytes::from_static(b"data: [DONE]\n\n");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn header() -> Header {
        Header {
            id: "cmpl-1".into(),
            created: 7,
            model: "m".into(),
        }
    }

    #[test]
    fn ids_are_prefixed_by_kind_and_differ() {
        let (a, b) = (Header::new(Kind::Chat, "m"), Header::new(Kind::Chat, "m"));
        assert!(a.id.starts_with("chatcmpl-"), "{}", a.id);
        assert_ne!(a.id, b.id);
        assert!(Header::new(Kind::Completion, "m").id.starts_with("cmpl-"));
    }

    fn event(b: Bytes) -> Value {
        let s = std::str::from_utf8(&b).expect("utf-8");
        let json = s
            .strip_prefix("data: ")
            .and_then(|s| s.strip_suffix("\n\n"));
        serde_json::from_str(json.expect("an SSE event")).expect("JSON")
    }

    #[test]
    fn whole_completion_and_chat_have_openai_shape() {
        let h = header();
        let v = serde_json::to_value(whole(
            Kind::Completion,
            &h,
            "hi",
            FinishReason::Length,
            Usage::new(3, 1, 2),
            None,
        ))
        .expect("json");
        assert_eq!(
            v,
            json!({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                "choices": [{"text": "hi", "index": 0, "logprobs": null, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                    "prompt_tokens_details": {"cached_tokens": 1}}})
        );
        let v = serde_json::to_value(whole(
            Kind::Chat,
            &h,
            "hi",
            FinishReason::Cancelled,
            Usage::new(3, 1, 2),
            None,
        ))
        .expect("json");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"],
            json!([{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": null,
                "finish_reason": "stop"}])
        );
    }

    #[test]
    fn chat_chunks_open_with_the_role_and_close_with_an_empty_delta() {
        let h = header();
        let first = event(chunk(Kind::Chat, &h, Piece::Role, None));
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(
            first["choices"],
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                "finish_reason": null}])
        );
        let text = event(chunk(Kind::Chat, &h, Piece::Text("a"), None));
        assert_eq!(text["choices"][0]["delta"], json!({"content": "a"}));
        let last = event(chunk(
            Kind::Chat,
            &h,
            Piece::End(FinishReason::Stop, Some(Usage::new(1, 0, 1))),
            None,
        ));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["usage"]["total_tokens"], 2);
        assert!(text.get("usage").is_none());
    }

    #[test]
    fn completion_chunks_carry_text() {
        let h = header();
        let v = event(chunk(Kind::Completion, &h, Piece::Text("x"), None));
        assert_eq!(
            v["choices"],
            json!([{"text": "x", "index": 0, "logprobs": null, "finish_reason": null}])
        );
        let v = event(chunk(
            Kind::Completion,
            &h,
            Piece::End(FinishReason::Length, None),
            None,
        ));
        assert_eq!(v["choices"][0]["text"], "");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(v.get("usage").is_none());
    }
}
