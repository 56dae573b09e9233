//! Text ↔ tokens with llama.cpp's own vocabulary (vocab-only load of the same GGUF),
//! and the model's chat template rendered with a real Jinja engine.

use std::path::Path;

use ggml_shim::llama::{LlamaError, Vocab};
use minijinja::{context, Environment};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Llama(#[from] LlamaError),
    #[error("the model has no chat template (tokenizer.chat_template)")]
    NoTemplate,
    #[error("chat template: {0}")]
    Template(String),
}

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    vocab: Vocab,
    template: Option<String>,
    template_is_builtin: bool,
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
        Ok(Tokenizer {
            vocab,
            template: Some(template),
            template_is_builtin,
        })
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

    /// Renders the chat template for `messages`, ending with the assistant's turn.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, TokenizerError> {
        let source = self.template.as_deref().ok_or(TokenizerError::NoTemplate)?;
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", source)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let piece = |t: Option<i32>| {
            t.and_then(|t| self.vocab.token_to_piece(t, true).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => piece(self.vocab.bos()),
            eos_token => piece(self.vocab.eos()),
        })
        .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
