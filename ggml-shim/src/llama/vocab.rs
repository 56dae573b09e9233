//! The tokenizer vocabulary: tokenize, detokenize, special tokens, the chat template.

use std::ffi::{c_char, CStr};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use ggml_sys as sys;

use super::{len_i32, LlamaError, ModelHandle, Result, TOKEN_NULL};

/// A tokenizer vocabulary (GGUF loaded with `vocab_only`, or shared with an [`OracleModel`]).
/// Cheap to clone (reference counted).
#[derive(Clone)]
pub struct Vocab {
    model: Arc<ModelHandle>,
    vocab: NonNull<sys::llama_vocab>,
    n_tokens: i32,
    kind: sys::llama_vocab_type,
}

// SAFETY: the llama_vocab is immutable after load and owned by `model`, which the Arc keeps
// alive; its query, tokenize and detokenize functions are const and keep no shared mutable
// state (per-call tokenizer sessions, a token-to-piece cache built at load time).
unsafe impl Send for Vocab {}
// SAFETY: see `Send`: only const llama_vocab functions are called, so shared use is read-only.
unsafe impl Sync for Vocab {}

/// A token that llama.cpp's tokenizer cuts out of a text before it tokenizes the rest
/// (see [`Vocab::special_tokens`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: i32,
    /// Its text as the tokenizer looks for it.
    pub text: Vec<u8>,
    /// Cut out only when special-token parsing is on (CONTROL and UNKNOWN tokens);
    /// otherwise always (USER_DEFINED tokens).
    pub parse_special_only: bool,
    /// Whitespace right before it is dropped (`LLAMA_TOKEN_ATTR_LSTRIP`).
    pub lstrip: bool,
    /// Whitespace right after it is dropped (`LLAMA_TOKEN_ATTR_RSTRIP`).
    pub rstrip: bool,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocab")
            .field("n_tokens", &self.n_tokens)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Vocab {
    /// Loads only the vocabulary of a GGUF file.
    pub fn load(path: &Path) -> Result<Vocab> {
        // SAFETY: returns a plain struct by value.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.vocab_only = true;
        params.n_gpu_layers = 0;
        let model = Arc::new(ModelHandle::load(path, params)?);
        Vocab::from_model(model, path)
    }

    pub(super) fn from_model(model: Arc<ModelHandle>, path: &Path) -> Result<Vocab> {
        // SAFETY: the model pointer is valid (owned by `model`); the vocab lives inside it.
        let raw = unsafe { sys::llama_model_get_vocab(model.ptr()) };
        let vocab = NonNull::new(raw.cast_mut()).ok_or_else(|| LlamaError::Load {
            path: path.to_path_buf(),
            reason: "the model has no vocabulary".into(),
        })?;
        // SAFETY: `vocab` points into the live model.
        let kind = unsafe { sys::llama_vocab_type(vocab.as_ptr()) };
        if kind == sys::LLAMA_VOCAB_TYPE_NONE {
            return Err(LlamaError::NoTokenizer {
                path: path.to_path_buf(),
            });
        }
        // SAFETY: `vocab` points into the live model.
        let n_tokens = unsafe { sys::llama_vocab_n_tokens(vocab.as_ptr()) };
        Ok(Vocab {
            model,
            vocab,
            n_tokens,
            kind,
        })
    }

    fn ptr(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    fn special(token: i32) -> Option<i32> {
        (token != TOKEN_NULL).then_some(token)
    }

    /// Number of tokens in the vocabulary.
    pub fn n_tokens(&self) -> i32 {
        self.n_tokens
    }

    /// Whether `token` is a valid id of this vocabulary.
    pub fn contains(&self, token: i32) -> bool {
        (0..self.n_tokens).contains(&token)
    }

    fn check_token(&self, token: i32) -> Result<()> {
        if self.contains(token) {
            Ok(())
        } else {
            Err(LlamaError::TokenOutOfRange {
                token,
                n_vocab: self.n_tokens,
            })
        }
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the model asks; `parse_special` turns
    /// special-token text (e.g. `<start_of_turn>`) into its token.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>> {
        self.tokenize_bytes(text.as_bytes(), add_special, parse_special)
    }

    /// [`Vocab::tokenize`] of raw bytes (llama.cpp takes any bytes; a piece of a text cut
    /// at special-token boundaries need not be checked as UTF-8 again).
    pub fn tokenize_bytes(
        &self,
        text: &[u8],
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<i32>> {
        let text_len = len_i32(text.len())?;
        if add_special {
            // llama.cpp asserts (aborts) when the special tokens it must add do not exist.
            let wpm = self.kind == sys::LLAMA_VOCAB_TYPE_WPM;
            if (wpm || self.add_bos()) && self.bos().is_none() {
                return Err(LlamaError::MissingSpecialToken("BOS"));
            }
            if self.add_eos() && self.eos().is_none() {
                return Err(LlamaError::MissingSpecialToken("EOS"));
            }
            // SAFETY: the vocab pointer is valid while `self` lives.
            let add_sep = unsafe { sys::llama_vocab_get_add_sep(self.ptr()) };
            // SAFETY: as above.
            let sep = unsafe { sys::llama_vocab_sep(self.ptr()) };
            if (wpm || add_sep) && sep == TOKEN_NULL {
                return Err(LlamaError::MissingSpecialToken("SEP"));
            }
        }
        let mut tokens: Vec<i32> = vec![0; text.len().saturating_add(4).min(i32::MAX as usize)];
        for _ in 0..2 {
            let cap = len_i32(tokens.len())?;
            // SAFETY: `text` provides `text_len` readable bytes, `tokens` provides `cap`
            // writable slots; the vocab is valid and its type is not NONE (checked at load).
            let n = unsafe {
                sys::llama_tokenize(
                    self.ptr(),
                    text.as_ptr().cast::<c_char>(),
                    text_len,
                    tokens.as_mut_ptr(),
                    cap,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN {
                return Err(LlamaError::Tokenize(n));
            }
            tokens.resize(n.unsigned_abs() as usize, 0);
        }
        Err(LlamaError::Tokenize(-1))
    }

    /// The raw bytes of one token (may be partial UTF-8). Control/unknown tokens render as
    /// empty unless `special`.
    pub fn token_to_piece(&self, token: i32, special: bool) -> Result<Vec<u8>> {
        self.check_token(token)?;
        let mut buf: Vec<u8> = vec![0; 32];
        for _ in 0..2 {
            let cap = len_i32(buf.len())?;
            // SAFETY: `token` is in range (checked), `buf` provides `cap` writable bytes.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.ptr(),
                    token,
                    buf.as_mut_ptr().cast::<c_char>(),
                    cap,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
        Err(LlamaError::TokenToPiece { token, code: -1 })
    }

    /// Detokenizes to raw bytes (the exact output of `llama_detokenize`, possibly invalid UTF-8
    /// when the tokens end inside a character).
    pub fn detokenize_bytes(
        &self,
        tokens: &[i32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<Vec<u8>> {
        for &t in tokens {
            self.check_token(t)?;
        }
        let n_tokens = len_i32(tokens.len())?;
        let mut buf: Vec<u8> = vec![0; tokens.len().saturating_mul(8).clamp(16, i32::MAX as usize)];
        for _ in 0..2 {
            let cap = len_i32(buf.len())?;
            // SAFETY: every token is in range (checked); `tokens` has `n_tokens` readable
            // elements and `buf` `cap` writable bytes.
            let n = unsafe {
                sys::llama_detokenize(
                    self.ptr(),
                    tokens.as_ptr(),
                    n_tokens,
                    buf.as_mut_ptr().cast::<c_char>(),
                    cap,
                    remove_special,
                    unparse_special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            if n == i32::MIN {
                return Err(LlamaError::Detokenize(n));
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
        Err(LlamaError::Detokenize(-1))
    }

    /// Detokenizes to a string; invalid UTF-8 (a character cut by the last token) becomes
    /// U+FFFD. Use [`Vocab::detokenize_bytes`] for the exact bytes.
    pub fn detokenize(
        &self,
        tokens: &[i32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<String> {
        let bytes = self.detokenize_bytes(tokens, remove_special, unparse_special)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<i32> {
        // SAFETY: the vocab pointer is valid while `self` lives.
        Self::special(unsafe { sys::llama_vocab_bos(self.ptr()) })
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<i32> {
        // SAFETY: the vocab pointer is valid while `self` lives.
        Self::special(unsafe { sys::llama_vocab_eos(self.ptr()) })
    }

    /// End-of-turn token.
    pub fn eot(&self) -> Option<i32> {
        // SAFETY: the vocab pointer is valid while `self` lives.
        Self::special(unsafe { sys::llama_vocab_eot(self.ptr()) })
    }

    /// Whether `token` ends generation (EOS, EOT, EOM and the model's other end tokens).
    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: the vocab pointer is valid; llama_vocab_is_eog is a set lookup, safe for any id.
        self.contains(token) && unsafe { sys::llama_vocab_is_eog(self.ptr(), token) }
    }

    /// Whether the model wants BOS prepended (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        // SAFETY: the vocab pointer is valid while `self` lives.
        unsafe { sys::llama_vocab_get_add_bos(self.ptr()) }
    }

    /// Whether the model wants EOS appended (`tokenizer.ggml.add_eos_token`).
    pub fn add_eos(&self) -> bool {
        // SAFETY: the vocab pointer is valid while `self` lives.
        unsafe { sys::llama_vocab_get_add_eos(self.ptr()) }
    }

    /// Tokens the model never wants sampled (`tokenizer.ggml.suppress_tokens`); llama.cpp's
    /// common sampler biases them to -inf (see [`SamplerChain::with_logit_bias`]).
    pub fn suppress_tokens(&self) -> Vec<i32> {
        let mut n: i32 = 0;
        // SAFETY: the vocab pointer is valid; `n` is a valid out-pointer.
        let ptr = unsafe { sys::llama_vocab_get_suppress_tokens(self.ptr(), &mut n) };
        if ptr.is_null() || n <= 0 {
            return Vec::new();
        }
        // SAFETY: llama.cpp returns `n` tokens stored in the vocab, alive while `self` lives.
        unsafe { std::slice::from_raw_parts(ptr, n as usize) }.to_vec()
    }

    /// The tokens llama.cpp's tokenizer cuts out of a text before it tokenizes the rest
    /// (its special-token cache: CONTROL, USER_DEFINED and UNKNOWN tokens), in the order
    /// it looks for them: longest text first (equal lengths by id; llama.cpp's order
    /// among those is unspecified). Tokens with an empty text are left out.
    pub fn special_tokens(&self) -> Vec<SpecialToken> {
        let cached = sys::LLAMA_TOKEN_ATTR_CONTROL
            | sys::LLAMA_TOKEN_ATTR_USER_DEFINED
            | sys::LLAMA_TOKEN_ATTR_UNKNOWN;
        let mut out = Vec::new();
        for id in 0..self.n_tokens {
            // SAFETY: `id` is in range; the vocab pointer is valid while `self` lives.
            let attr = unsafe { sys::llama_vocab_get_attr(self.ptr(), id) };
            if attr & cached == 0 {
                continue;
            }
            // SAFETY: `id` is in range; the text is a NUL-terminated string owned by the vocab.
            let ptr = unsafe { sys::llama_vocab_get_text(self.ptr(), id) };
            if ptr.is_null() {
                continue;
            }
            // SAFETY: non-null, NUL-terminated, alive while `self` lives (copied at once).
            let text = unsafe { CStr::from_ptr(ptr) }.to_bytes().to_vec();
            if text.is_empty() {
                continue;
            }
            out.push(SpecialToken {
                id,
                text,
                parse_special_only: attr
                    & (sys::LLAMA_TOKEN_ATTR_CONTROL | sys::LLAMA_TOKEN_ATTR_UNKNOWN)
                    != 0,
                lstrip: attr & sys::LLAMA_TOKEN_ATTR_LSTRIP != 0,
                rstrip: attr & sys::LLAMA_TOKEN_ATTR_RSTRIP != 0,
            });
        }
        out.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        out
    }

    /// The model's default chat template (`tokenizer.chat_template`), if any.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: the model pointer is valid; a null name selects the default template.
        let ptr = unsafe { sys::llama_model_chat_template(self.model.ptr(), std::ptr::null()) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: non-null results point to a NUL-terminated string owned by the model.
        let s = unsafe { CStr::from_ptr(ptr) };
        Some(s.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::tests::test_model;

    #[test]
    fn llama_vocab_with_model() {
        if let Some(path) = test_model() {
            check_vocab(&path);
        }
    }

    /// Vocabulary checks against any GGUF with a tokenizer (for fixture-based tests too).
    pub(crate) fn check_vocab(path: &Path) {
        let vocab = Vocab::load(path).expect("vocab");
        assert!(vocab.n_tokens() > 0);
        let tokens = vocab
            .tokenize("hello world", false, false)
            .expect("tokenize");
        assert!(!tokens.is_empty());
        let text = vocab.detokenize(&tokens, false, false).expect("detokenize");
        assert!(text.contains("hello"), "{text:?}");
        let pieces: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| vocab.token_to_piece(t, false).expect("piece"))
            .collect();
        assert!(!pieces.is_empty());
        assert!(vocab.token_to_piece(vocab.n_tokens(), false).is_err());
        assert!(vocab.token_to_piece(-1, false).is_err());
        assert!(vocab.detokenize(&[-5], false, false).is_err());
        assert!(!vocab.is_eog(-1));
        if let Some(eos) = vocab.eos() {
            assert!(vocab.is_eog(eos));
        }
        let with_bos = vocab.tokenize("hello", true, false).expect("tokenize");
        if vocab.add_bos() {
            assert_eq!(with_bos.first().copied(), vocab.bos());
        }
    }
}
