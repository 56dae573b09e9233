//! Log-probabilities in responses, shaped as OpenAI's two endpoints shape them. They
//! are the model's own (the log-softmax of the raw logits, before logit biases,
//! penalties and temperature: see [`crate::engine::sampler`]).
//!
//! - chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
//!   "logprob", "bytes"}, …]}, …]}`, `top_logprobs` the `top_logprobs` most likely;
//! - completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, each
//!   `top_logprobs` entry an object of the `logprobs` most likely tokens' texts and
//!   the chosen one's (so up to `logprobs` + 1, as OpenAI), most likely first;
//!   `text_offset` in characters of the completion's text.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::api::text::TextStream;
use crate::engine::TokenLogprobs;
use crate::tokenizer::Tokenizer;

/// A token's text, raw bytes and log-probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct TokenText {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
}

impl TokenText {
    fn new(tokenizer: &Tokenizer, id: i32, logprob: f32) -> TokenText {
        let bytes = tokenizer.piece(id).unwrap_or_default();
        TokenText {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob,
            bytes,
        }
    }
}

/// One generated token's log-probabilities, as text.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Entry {
    chosen: TokenText,
    top: Vec<TokenText>,
    /// Where the token's text starts in the completion, in characters.
    offset: usize,
}

/// Makes [`Entry`]s of the tokens of one completion, in order.
pub(super) struct Entries {
    /// Counts the completion's characters so far.
    text: TextStream,
    chars: usize,
}

impl Entries {
    pub(super) fn new() -> Entries {
        Entries {
            text: TextStream::new(Vec::new()),
            chars: 0,
        }
    }

    /// The entry of the next generated token, `id`.
    pub(super) fn next(&mut self, tokenizer: &Tokenizer, id: i32, lp: &TokenLogprobs) -> Entry {
        let chosen = TokenText::new(tokenizer, id, lp.logprob);
        let offset = self.chars;
        self.chars += self.text.push(&chosen.bytes).chars().count();
        Entry {
            top: lp
                .top
                .iter()
                .map(|&(t, l)| TokenText::new(tokenizer, t, l))
                .collect(),
            chosen,
            offset,
        }
    }
}

/// The chat form of some entries.
#[derive(Serialize)]
pub(super) struct ChatLogprobs<'a> {
    content: Vec<ChatToken<'a>>,
}

#[derive(Serialize)]
struct ChatToken<'a> {
    #[serde(flatten)]
    chosen: &'a TokenText,
    top_logprobs: &'a [TokenText],
}

impl<'a> ChatLogprobs<'a> {
    pub(super) fn of(entries: &'a [Entry]) -> ChatLogprobs<'a> {
        ChatLogprobs {
            content: entries
                .iter()
                .map(|e| ChatToken {
                    chosen: &e.chosen,
                    top_logprobs: &e.top,
                })
                .collect(),
        }
    }
}

/// The legacy completions form of some entries.
#[derive(Serialize)]
pub(super) struct CompletionLogprobs<'a> {
    tokens: Vec<&'a str>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<TopMap<'a>>,
    text_offset: Vec<usize>,
}

impl<'a> CompletionLogprobs<'a> {
    pub(super) fn of(entries: &'a [Entry]) -> CompletionLogprobs<'a> {
        CompletionLogprobs {
            tokens: entries.iter().map(|e| e.chosen.token.as_str()).collect(),
            token_logprobs: entries.iter().map(|e| e.chosen.logprob).collect(),
            top_logprobs: entries.iter().map(TopMap).collect(),
            text_offset: entries.iter().map(|e| e.offset).collect(),
        }
    }
}

/// An entry's alternatives and chosen token as a JSON object of text to
/// log-probability, most likely first (a text twice: its first, likelier, one).
struct TopMap<'a>(&'a Entry);

impl Serialize for TopMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut seen: Vec<&str> = Vec::with_capacity(e.top.len() + 1);
        let mut map = serializer.serialize_map(None)?;
        for t in e.top.iter().chain(std::iter::once(&e.chosen)) {
            if !seen.contains(&t.token.as_str()) {
                seen.push(&t.token);
                map.serialize_entry(&t.token, &t.logprob)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(token: &str, logprob: f32) -> TokenText {
        TokenText {
            token: token.into(),
            logprob,
            bytes: token.as_bytes().to_vec(),
        }
    }

    fn entries() -> Vec<Entry> {
        vec![
            Entry {
                chosen: text("Hi", -0.5),
                top: vec![text("Hi", -0.5), text("Hello", -1.0)],
                offset: 0,
            },
            Entry {
                chosen: text(" there", -2.0),
                top: vec![text("!", -0.25)],
                offset: 2,
            },
        ]
    }

    #[test]
    fn chat_and_completion_shapes_are_openai_s() {
        let e = entries();
        let chat = serde_json::to_value(ChatLogprobs::of(&e)).expect("json");
        assert_eq!(
            chat["content"][0],
            json!({"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                   "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                    {"token": "Hello", "logprob": -1.0,
                                     "bytes": [72, 101, 108, 108, 111]}]})
        );
        let legacy = serde_json::to_string(&CompletionLogprobs::of(&e)).expect("json");
        assert_eq!(
            legacy,
            r#"{"tokens":["Hi"," there"],"token_logprobs":[-0.5,-2.0],"top_logprobs":[{"Hi":-0.5,"Hello":-1.0},{"!":-0.25," there":-2.0}],"text_offset":[0,2]}"#
        );
    }
}
