//! Text ↔ tokens with llama.cpp's own vocabulary (vocab-only load of the same GGUF),
//! and the model's chat template rendered with a real Jinja engine. Chat prompts are
//! tokenized so that only the template's markers are special tokens ([`chat`]).

mod chat;
pub mod template;

use std::collections::HashMap;
use std::path::Path;

use ggml_shim::llama::{LlamaError, Vocab};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Llama(#[from] LlamaError),
    #[error("the model has no chat template (tokenizer.chat_template)")]
    NoTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error(
        "messages[{message}].content holds the special-token text {text:?}, which this \
         model's chat template does not let exo keep apart from its own markers"
    )]
    SpecialText { message: usize, text: String },
    #[error("chat template: {0}")]
    TemplateTooCostly(String),
}

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    vocab: Vocab,
    template: Option<String>,
    template_is_builtin: bool,
    specials: chat::Specials,
}

/// Gemma's turn format, used when a Gemma GGUF carries no template of its own.
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% set role = 'user' %}{% elif m.role == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = m.role %}{% endif %}<start_of_turn>{{ role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// ChatML, llama.cpp's fallback for models without a template.
const CHATML_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

impl Tokenizer {
    /// Loads the vocabulary of the GGUF at `path`. `arch` picks a built-in chat
    /// template when the file has none (Gemma's turns for gemma*, else ChatML).
    pub fn load(path: &Path, arch: &str) -> Result<Tokenizer, TokenizerError> {
        ggml_shim::llama::init_backend();
        let vocab = Vocab::load(path)?;
        let (template, template_is_builtin) = match vocab.chat_template() {
            Some(t) => (t, false),
            None if arch.starts_with("gemma") => (GEMMA_TEMPLATE.to_string(), true),
            None => (CHATML_TEMPLATE.to_string(), true),
        };
        let tokenizer = Tokenizer {
            specials: chat::Specials::new(&vocab),
            vocab,
            template: Some(template),
            template_is_builtin,
        };
        // A template too costly for one short message is refused with the model; other
        // template errors are answered per request (the completions endpoint needs none).
        let probe = Message {
            role: "user".into(),
            content: "hi".into(),
        };
        match tokenizer.apply_chat_template(&[probe]) {
            Err(e @ TokenizerError::TemplateTooCostly(_)) => Err(e),
            Err(e) => {
                tracing::warn!("the model's chat template fails on a one-message chat: {e}");
                Ok(tokenizer)
            }
            Ok(_) => Ok(tokenizer),
        }
    }

    /// Whether the chat template is exo's built-in one (the GGUF has none).
    pub fn template_is_builtin(&self) -> bool {
        self.template_is_builtin
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Tokens of a plain-text prompt (BOS added as the model asks; special tokens
    /// written in the text are parsed).
    pub fn encode(&self, text: &str) -> Result<Vec<i32>, TokenizerError> {
        Ok(self.vocab.tokenize(text, true, true)?)
    }

    /// Tokens of an already templated prompt: the template writes BOS itself when
    /// it wants one, so none is added here.
    pub fn encode_templated(&self, text: &str) -> Result<Vec<i32>, TokenizerError> {
        Ok(self.vocab.tokenize(text, false, true)?)
    }

    /// Text of generated tokens (special tokens are not rendered).
    pub fn decode(&self, tokens: &[i32]) -> Result<String, TokenizerError> {
        Ok(self.vocab.detokenize(tokens, false, false)?)
    }

    /// Raw bytes of one token, for streaming (may be part of a UTF-8 character).
    pub fn piece(&self, token: i32) -> Result<Vec<u8>, TokenizerError> {
        Ok(self.vocab.token_to_piece(token, false)?)
    }

    pub fn is_eog(&self, token: i32) -> bool {
        self.vocab.is_eog(token)
    }

    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders the chat template for `messages`, ending with the assistant's turn
    /// (in the template sandbox when the process set one up: [`template`]).
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, TokenizerError> {
        let source = self.template.as_deref().ok_or(TokenizerError::NoTemplate)?;
        let piece = |t: Option<i32>| {
            t.and_then(|t| self.vocab.token_to_piece(t, true).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let job = template::Job {
            source: source.into(),
            messages: messages.into(),
            bos_token: piece(self.vocab.bos()),
            eos_token: piece(self.vocab.eos()),
        };
        template::render(&job)
    }

    /// Tokens of the chat prompt of `messages` (the template rendered, ending with the
    /// assistant's turn). Only the template's own text is parsed for special tokens:
    /// special-token text in a message's content stays text. A prompt whose contents
    /// hold no special-token text gets exactly the tokens of
    /// `encode_templated(apply_chat_template(messages))`, llama.cpp's.
    ///
    /// A template that changes contents beyond trimming them (so that exo cannot tell
    /// where they stand) is tokenized as a whole, and then a content that holds
    /// special-token text is refused ([`TokenizerError::SpecialText`]).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<i32>, TokenizerError> {
        let text = self.apply_chat_template(messages)?;
        let source = self.template.as_deref().unwrap_or_default();
        let prefix = chat::sentinel_prefix(&[&text, source]);
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message {
                role: m.role.clone(),
                content: chat::sentinel(&prefix, i),
            })
            .collect();
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        let ranges = self
            .apply_chat_template(&marked)
            .ok()
            .and_then(|marked| chat::content_ranges(&text, &marked, &prefix, &contents));
        let Some(ranges) = ranges else {
            for (i, c) in contents.iter().enumerate() {
                if let Some(t) = self.specials.parse_special_text_in(c.as_bytes()) {
                    return Err(TokenizerError::SpecialText {
                        message: i,
                        text: String::from_utf8_lossy(&t.text).into_owned(),
                    });
                }
            }
            return self.encode_templated(&text);
        };
        let bytes = text.as_bytes();
        let mut tokens = Vec::new();
        // a raw piece is tokenized on its own, so equal pieces have equal tokens (a
        // text of many markers repeats a few pieces many times)
        let mut seen: HashMap<&[u8], Vec<i32>> = HashMap::new();
        for piece in chat::partition(bytes, &ranges, &self.specials) {
            match piece {
                chat::Piece::Raw(r) => {
                    let raw = &bytes[r];
                    if let Some(t) = seen.get(raw) {
                        tokens.extend_from_slice(t);
                        continue;
                    }
                    let t = self.vocab.tokenize_bytes(raw, false, false)?;
                    tokens.extend_from_slice(&t);
                    if raw.len() <= 256 {
                        seen.insert(raw, t);
                    }
                }
                chat::Piece::Token(t) => tokens.push(t),
            }
        }
        Ok(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exo_tests::{write_tiny_model, TempDir, TinyArch, TinySpec};

    fn with_template(tok: Tokenizer, template: &str) -> Tokenizer {
        Tokenizer {
            template: Some(template.to_string()),
            ..tok
        }
    }

    fn user(content: &str) -> Message {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// Templates that loop without end or write without end are stopped with a clear
    /// error (they cost 12 s of CPU, and gigabytes, per request).
    #[test]
    fn a_hostile_chat_template_is_stopped() {
        let dir = TempDir::new("tok-template").expect("tempdir");
        let path = dir.path().join("m.gguf");
        write_tiny_model(&path, &TinySpec::new(TinyArch::Llama)).expect("tiny model");
        let tok = Tokenizer::load(&path, "llama").expect("tokenizer");
        let writes = with_template(
            tok,
            r#"{% for i in range(100000) %}{{ "x" * 100000 }}{% endfor %}"#,
        );
        let e = writes.apply_chat_template(&[user("hi")]).unwrap_err();
        assert!(e.to_string().contains("its output passed"), "{e}");
        let loops = with_template(
            writes,
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        );
        let e = loops.apply_chat_template(&[user("hi")]).unwrap_err();
        assert!(e.to_string().contains("steps, the most it may take"), "{e}");
    }

    /// The real model's template (exo's built-in Gemma turns: this GGUF carries none)
    /// renders long conversations within the limits.
    #[test]
    fn the_real_template_renders_long_conversations() {
        let Some(path) = exo_tests::real_model_path() else {
            return;
        };
        let tok = Tokenizer::load(&path, "gemma3").expect("tokenizer");
        let long = "word ".repeat(200_000);
        let many: Vec<Message> = (0..5000)
            .map(|i| Message {
                role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                content: format!("message {i}"),
            })
            .collect();
        for messages in [vec![user(&long)], many] {
            let text = tok.apply_chat_template(&messages).expect("render");
            let last = &messages[messages.len() - 1].content;
            assert!(text.contains(last.trim()), "the last message is rendered");
        }
    }
}
