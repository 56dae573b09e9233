//! llama.cpp wrappers: vocabulary, samplers and the oracle model.
//!
//! * [`init_backend`] initialises llama.cpp once per process and routes its (and ggml's) log
//!   output: dropped unless `EXO_LLAMA_LOG=1`, then printed to stderr.
//! * [`Vocab`] is a GGUF loaded with `vocab_only`: tokenizer, detokenizer, special tokens.
//! * [`OracleModel`] / [`OracleContext`] run the full model on the CPU with llama.cpp, the
//!   reference implementation for tests and benchmarks.
//! * [`SamplerChain`] samples exactly as llama.cpp's common sampler does.
//!
//! Every input that would make llama.cpp abort (token ids out of range, empty or oversized
//! batches, sequence ids out of range, vocabularies without a tokenizer...) is checked here
//! first and reported as a [`LlamaError`].

use std::ffi::{c_char, c_void, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use ggml_sys as sys;

/// llama.cpp's `LLAMA_TOKEN_NULL`: "no such token".
pub const TOKEN_NULL: i32 = -1;

/// llama.cpp's `LLAMA_DEFAULT_SEED`: the dist sampler draws a random seed.
pub const DEFAULT_SEED: u32 = 0xFFFF_FFFF;

/// Environment variable that turns llama.cpp / ggml logging on (`EXO_LLAMA_LOG=1`).
pub const LOG_ENV: &str = "EXO_LLAMA_LOG";

/// Errors of the llama.cpp layer.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("the vocabulary of {path} has no tokenizer (tokenizer.ggml.model is \"none\")")]
    NoTokenizer { path: PathBuf },
    #[error("input of {len} items is too long for llama.cpp (at most {max})")]
    TooLong { len: usize, max: usize },
    #[error("token id {token} out of range [0, {n_vocab})")]
    TokenOutOfRange { token: i32, n_vocab: i32 },
    #[error("add_special requested but the vocabulary has no {0} token")]
    MissingSpecialToken(&'static str),
    #[error("llama_tokenize failed (returned {0})")]
    Tokenize(i32),
    #[error("llama_token_to_piece failed for token {token} (returned {code})")]
    TokenToPiece { token: i32, code: i32 },
    #[error("llama_detokenize failed (returned {0})")]
    Detokenize(i32),
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    #[error("llama.cpp could not create a context (n_ctx {n_ctx}, n_batch {n_batch}, n_seq_max {n_seq_max})")]
    ContextInit {
        n_ctx: u32,
        n_batch: u32,
        n_seq_max: u32,
    },
    #[error("empty batch")]
    EmptyBatch,
    #[error("batch of {len} tokens exceeds n_batch {n_batch}")]
    BatchTooLarge { len: usize, n_batch: u32 },
    #[error("sequence id {seq} out of range [0, {n_seq_max})")]
    SeqOutOfRange { seq: i32, n_seq_max: u32 },
    #[error("invalid position {0}")]
    InvalidPosition(i64),
    #[error("{needed} positions needed but a sequence holds at most {n_ctx_seq}")]
    ContextFull { needed: usize, n_ctx_seq: u32 },
    #[error("llama_decode failed with {code}: {what}")]
    Decode { code: i32, what: &'static str },
    #[error("no logits for batch index {index} (the last batch had {n_outputs} outputs)")]
    NoLogits { index: i32, n_outputs: usize },
    #[error("the context has no memory module")]
    NoMemory,
    #[error("llama_memory_seq_rm refused to remove sequence {0}")]
    SeqRemove(i32),
    #[error("empty logits")]
    EmptyLogits,
    #[error("logits contain NaN")]
    NanLogits,
    #[error("llama.cpp returned a null sampler")]
    SamplerInit,
    #[error("the sampler chain selected no token")]
    NoSelection,
}

pub type Result<T, E = LlamaError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Process-wide initialisation and logging
// ---------------------------------------------------------------------------------------------

static INIT: Once = Once::new();
static LOG_TO_STDERR: AtomicBool = AtomicBool::new(false);

/// Initialises llama.cpp once per process (`llama_backend_init`) after installing the log
/// callback. Every constructor of this module calls it; calling it again is free.
pub fn init_backend() {
    INIT.call_once(|| {
        let enabled = std::env::var_os(LOG_ENV).is_some_and(|v| v == "1");
        LOG_TO_STDERR.store(enabled, Ordering::Relaxed);
        // SAFETY: `log_callback` is a `'static` function that never unwinds and ignores user_data.
        unsafe { sys::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
        // SAFETY: runs once per process (guarded by `INIT`); takes no arguments.
        unsafe { sys::llama_backend_init() };
    });
}

/// Turns llama.cpp / ggml log output to stderr on or off at run time (overrides `EXO_LLAMA_LOG`).
pub fn set_log_to_stderr(enabled: bool) {
    init_backend();
    LOG_TO_STDERR.store(enabled, Ordering::Relaxed);
}

/// Log sink given to `llama_log_set` (which also sets ggml's): drops everything unless enabled.
unsafe extern "C" fn log_callback(
    _level: sys::ggml_log_level,
    text: *const c_char,
    _user_data: *mut c_void,
) {
    if text.is_null() || !LOG_TO_STDERR.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string that stays valid for the duration of the call.
    let bytes = unsafe { CStr::from_ptr(text) }.to_bytes();
    // Never panic across the FFI boundary: a failed write to stderr is ignored.
    let _ = std::io::stderr().write_all(bytes);
}

fn path_to_cstring(path: &Path) -> Result<CString> {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = path
        .to_str()
        .ok_or_else(|| LlamaError::Load {
            path: path.to_path_buf(),
            reason: "path is not valid UTF-8".into(),
        })?
        .as_bytes()
        .to_vec();
    CString::new(bytes).map_err(|_| LlamaError::Load {
        path: path.to_path_buf(),
        reason: "path contains a NUL byte".into(),
    })
}

fn len_i32(len: usize) -> Result<i32> {
    i32::try_from(len).map_err(|_| LlamaError::TooLong {
        len,
        max: i32::MAX as usize,
    })
}

/// Index of the largest logit, the lowest index on ties; NaNs are skipped. `None` when empty or
/// all NaN.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    // Two vectorisable passes (the maximum, then its first index) beat one branchy
    // pass over a 262k-entry vocabulary by several times. NaN never wins.
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            // `max` ignores NaN operands.
            *a = a.max(v);
        }
    }
    let best = tail
        .iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if best == f32::NEG_INFINITY {
        // all -inf or NaN: the first non-NaN entry, as a plain scan would pick
        return logits.iter().position(|v| !v.is_nan());
    }
    logits.iter().position(|&v| v == best)
}

// ---------------------------------------------------------------------------------------------
// Models and vocabularies
// ---------------------------------------------------------------------------------------------

/// Owner of a `llama_model`; freed on drop.
struct ModelHandle(NonNull<sys::llama_model>);

// SAFETY: a loaded llama_model is never mutated through this handle; llama.cpp shares one model
// between contexts on many threads (llama-server), and freeing it needs no thread affinity.
unsafe impl Send for ModelHandle {}
// SAFETY: see `Send`: all uses through a shared handle are read-only queries of immutable data.
unsafe impl Sync for ModelHandle {}

impl ModelHandle {
    fn load(path: &Path, params: sys::llama_model_params) -> Result<Self> {
        init_backend();
        if !path.is_file() {
            return Err(LlamaError::Load {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        let c_path = path_to_cstring(path)?;
        // SAFETY: `c_path` is a valid NUL-terminated string alive across the call; params come
        // from llama_model_default_params with plain-value edits only.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), params) };
        NonNull::new(raw)
            .map(ModelHandle)
            .ok_or_else(|| LlamaError::Load {
                path: path.to_path_buf(),
                reason: format!("llama.cpp could not load the model (set {LOG_ENV}=1 for details)"),
            })
    }

    fn ptr(&self) -> *mut sys::llama_model {
        self.0.as_ptr()
    }
}

impl Drop for ModelHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_model_load_from_file and is freed exactly once;
        // every context holds an Arc to this handle, so none outlives the model.
        unsafe { sys::llama_model_free(self.0.as_ptr()) };
    }
}

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

    fn from_model(model: Arc<ModelHandle>, path: &Path) -> Result<Vocab> {
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

/// A full model loaded by llama.cpp on the CPU: the reference implementation. Cheap to clone
/// (reference counted); contexts keep it alive.
#[derive(Clone)]
pub struct OracleModel {
    model: Arc<ModelHandle>,
    path: PathBuf,
    n_vocab: i32,
    n_threads: i32,
}

impl std::fmt::Debug for OracleModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OracleModel")
            .field("path", &self.path)
            .field("n_vocab", &self.n_vocab)
            .finish()
    }
}

impl OracleModel {
    /// Loads a GGUF with every layer on the CPU (memory-mapped). `n_threads` is remembered as
    /// the default for [`OracleModel::context`].
    pub fn load(path: &Path, n_threads: i32) -> Result<OracleModel> {
        if n_threads < 1 {
            return Err(LlamaError::InvalidParam(format!(
                "n_threads must be >= 1, got {n_threads}"
            )));
        }
        // SAFETY: returns a plain struct by value.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = 0;
        params.load_mode = sys::LLAMA_LOAD_MODE_MMAP;
        let model = Arc::new(ModelHandle::load(path, params)?);
        // SAFETY: the model is valid; the vocab lives inside it.
        let vocab = unsafe { sys::llama_model_get_vocab(model.ptr()) };
        if vocab.is_null() {
            return Err(LlamaError::Load {
                path: path.to_path_buf(),
                reason: "the model has no vocabulary".into(),
            });
        }
        // SAFETY: `vocab` is non-null and points into the live model.
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab) };
        Ok(OracleModel {
            model,
            path: path.to_path_buf(),
            n_vocab,
            n_threads,
        })
    }

    /// Vocabulary size (length of a logits row).
    pub fn n_vocab(&self) -> i32 {
        self.n_vocab
    }

    /// Training context length from the GGUF.
    pub fn n_ctx_train(&self) -> i32 {
        // SAFETY: the model pointer is valid while `self` lives.
        unsafe { sys::llama_model_n_ctx_train(self.model.ptr()) }
    }

    /// Thread count given to [`OracleModel::load`].
    pub fn n_threads(&self) -> i32 {
        self.n_threads
    }

    /// The model's vocabulary (shares the loaded model).
    pub fn vocab(&self) -> Result<Vocab> {
        Vocab::from_model(Arc::clone(&self.model), &self.path)
    }

    /// A context with this model's default thread count.
    pub fn context(&self, n_ctx: u32, n_batch: u32, n_seq_max: u32) -> Result<OracleContext> {
        OracleContext::new(self, n_ctx, n_batch, n_seq_max, self.n_threads)
    }
}

/// Which logits a [`OracleContext::decode`] call keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Every token of the batch.
    All,
    /// Only the last token of the batch.
    Last,
    /// None (prefill only).
    None,
}

/// A llama.cpp inference context (KV cache + compute buffers) over an [`OracleModel`].
pub struct OracleContext {
    ctx: NonNull<sys::llama_context>,
    // Keeps the model alive until after the context is freed (fields drop after `Drop::drop`).
    _model: Arc<ModelHandle>,
    n_vocab: i32,
    n_ctx: u32,
    n_ctx_seq: u32,
    n_batch: u32,
    n_seq_max: u32,
    /// Per batch index of the last successful decode: whether it produced logits.
    outputs: Vec<bool>,
    n_outputs: usize,
    // Reusable batch storage.
    b_token: Vec<i32>,
    b_pos: Vec<i32>,
    b_n_seq: Vec<i32>,
    b_seq: Vec<i32>,
    b_logits: Vec<i8>,
}

// SAFETY: a llama_context has no thread affinity; it is only used through `&mut self` (or `&self`
// for read-only logits access, and the type is not Sync), so never from two threads at once.
unsafe impl Send for OracleContext {}

impl std::fmt::Debug for OracleContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OracleContext")
            .field("n_ctx", &self.n_ctx)
            .field("n_batch", &self.n_batch)
            .field("n_seq_max", &self.n_seq_max)
            .finish()
    }
}

impl OracleContext {
    /// Creates a context: `n_ctx` KV cells (llama.cpp rounds up to a multiple of 256), at most
    /// `n_batch` tokens per decode (also the micro-batch), `n_seq_max` sequences.
    pub fn new(
        model: &OracleModel,
        n_ctx: u32,
        n_batch: u32,
        n_seq_max: u32,
        n_threads: i32,
    ) -> Result<OracleContext> {
        if n_ctx == 0 || n_batch == 0 || n_seq_max == 0 || n_threads < 1 {
            return Err(LlamaError::InvalidParam(format!(
                "n_ctx {n_ctx}, n_batch {n_batch}, n_seq_max {n_seq_max}, n_threads {n_threads}: \
                 all must be >= 1"
            )));
        }
        if n_seq_max > 256 {
            return Err(LlamaError::InvalidParam(format!(
                "n_seq_max {n_seq_max} exceeds llama.cpp's LLAMA_MAX_SEQ (256)"
            )));
        }
        if n_batch > i32::MAX as u32 || n_ctx > i32::MAX as u32 {
            return Err(LlamaError::InvalidParam("n_ctx / n_batch too large".into()));
        }
        init_backend();
        // SAFETY: returns a plain struct by value.
        let mut params = unsafe { sys::llama_context_default_params() };
        params.n_ctx = n_ctx;
        params.n_batch = n_batch;
        params.n_ubatch = n_batch;
        params.n_seq_max = n_seq_max;
        params.n_threads = n_threads;
        params.n_threads_batch = n_threads;
        params.no_perf = true;
        // SAFETY: the model is valid and outlives the context (the context keeps an Arc to it).
        let raw = unsafe { sys::llama_init_from_model(model.model.ptr(), params) };
        let ctx = NonNull::new(raw).ok_or(LlamaError::ContextInit {
            n_ctx,
            n_batch,
            n_seq_max,
        })?;
        // SAFETY: `ctx` is a valid context just created (same for the next three calls).
        let real_n_ctx = unsafe { sys::llama_n_ctx(ctx.as_ptr()) };
        // SAFETY: as above.
        let n_ctx_seq = unsafe { sys::llama_n_ctx_seq(ctx.as_ptr()) };
        // SAFETY: as above.
        let real_n_batch = unsafe { sys::llama_n_batch(ctx.as_ptr()) };
        // SAFETY: as above.
        let real_n_seq_max = unsafe { sys::llama_n_seq_max(ctx.as_ptr()) };
        Ok(OracleContext {
            ctx,
            _model: Arc::clone(&model.model),
            n_vocab: model.n_vocab,
            n_ctx: real_n_ctx,
            n_ctx_seq,
            n_batch: real_n_batch,
            n_seq_max: real_n_seq_max,
            outputs: Vec::new(),
            n_outputs: 0,
            b_token: Vec::new(),
            b_pos: Vec::new(),
            b_n_seq: Vec::new(),
            b_seq: Vec::new(),
            b_logits: Vec::new(),
        })
    }

    /// Vocabulary size (length of a logits row).
    pub fn n_vocab(&self) -> i32 {
        self.n_vocab
    }

    /// Total KV cells (after llama.cpp's rounding).
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// KV cells available to one sequence.
    pub fn n_ctx_seq(&self) -> u32 {
        self.n_ctx_seq
    }

    /// Largest batch accepted by one decode call.
    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// Number of sequences (valid ids are `0..n_seq_max`).
    pub fn n_seq_max(&self) -> u32 {
        self.n_seq_max
    }

    fn check_seq(&self, seq: i32) -> Result<()> {
        if seq >= 0 && (seq as u32) < self.n_seq_max {
            Ok(())
        } else {
            Err(LlamaError::SeqOutOfRange {
                seq,
                n_seq_max: self.n_seq_max,
            })
        }
    }

    /// Decodes `tokens` at positions `pos0..` of sequence `seq`. Positions must continue the
    /// sequence's cache (llama.cpp rejects gaps with a decode error).
    pub fn decode(
        &mut self,
        tokens: &[i32],
        pos0: i32,
        seq: i32,
        logits: LogitsWanted,
    ) -> Result<()> {
        if tokens.is_empty() {
            return Err(LlamaError::EmptyBatch);
        }
        let n = len_i32(tokens.len())?;
        if pos0 < 0 || pos0.checked_add(n).is_none() {
            return Err(LlamaError::InvalidPosition(i64::from(pos0) + i64::from(n)));
        }
        self.b_token.clear();
        self.b_token.extend_from_slice(tokens);
        self.b_pos.clear();
        self.b_pos.extend(pos0..pos0 + n);
        self.b_seq.clear();
        self.b_seq.resize(tokens.len(), seq);
        self.b_logits.clear();
        self.b_logits.extend((0..tokens.len()).map(|i| {
            let on = match logits {
                LogitsWanted::All => true,
                LogitsWanted::Last => i + 1 == tokens.len(),
                LogitsWanted::None => false,
            };
            i8::from(on)
        }));
        self.run_batch()
    }

    /// Decodes one token per entry `(token, pos, seq)`, with logits for every entry (entry `i`'s
    /// logits are [`OracleContext::logits_ith`]`(i)`). For multi-sequence benchmarks.
    pub fn decode_multi(&mut self, entries: &[(i32, i32, i32)]) -> Result<()> {
        if entries.is_empty() {
            return Err(LlamaError::EmptyBatch);
        }
        self.b_token.clear();
        self.b_pos.clear();
        self.b_seq.clear();
        self.b_logits.clear();
        for &(token, pos, seq) in entries {
            self.b_token.push(token);
            self.b_pos.push(pos);
            self.b_seq.push(seq);
            self.b_logits.push(1);
        }
        self.run_batch()
    }

    /// Validates the batch held in the `b_*` buffers and decodes it.
    fn run_batch(&mut self) -> Result<()> {
        let len = self.b_token.len();
        if len == 0 {
            return Err(LlamaError::EmptyBatch);
        }
        if len > self.n_batch as usize {
            return Err(LlamaError::BatchTooLarge {
                len,
                n_batch: self.n_batch,
            });
        }
        for &t in &self.b_token {
            if !(0..self.n_vocab).contains(&t) {
                return Err(LlamaError::TokenOutOfRange {
                    token: t,
                    n_vocab: self.n_vocab,
                });
            }
        }
        for &p in &self.b_pos {
            if p < 0 {
                return Err(LlamaError::InvalidPosition(i64::from(p)));
            }
        }
        for &s in &self.b_seq {
            self.check_seq(s)?;
        }
        let n_tokens = len_i32(len)?;
        self.b_n_seq.clear();
        self.b_n_seq.resize(len, 1);
        let mut seq_ptrs: Vec<*mut i32> = self.b_seq.iter_mut().map(std::ptr::from_mut).collect();
        let batch = sys::llama_batch {
            n_tokens,
            token: self.b_token.as_mut_ptr(),
            embd: std::ptr::null_mut(),
            pos: self.b_pos.as_mut_ptr(),
            n_seq_id: self.b_n_seq.as_mut_ptr(),
            seq_id: seq_ptrs.as_mut_ptr(),
            logits: self.b_logits.as_mut_ptr(),
        };
        // Logits of an earlier batch are gone whatever happens now.
        self.outputs.clear();
        self.n_outputs = 0;
        // SAFETY: every array of `batch` holds `n_tokens` elements (each seq_id entry points to
        // one valid id) and outlives the call; tokens, positions, sequence ids and the batch
        // size were checked above, so llama.cpp reports bad input instead of asserting.
        let code = unsafe { sys::llama_decode(self.ctx.as_ptr(), batch) };
        drop(seq_ptrs);
        if code != 0 {
            let what = match code {
                1 => "no KV cache slot for the batch (context full)",
                2 => "aborted",
                -1 => "invalid batch (e.g. positions not continuing the sequence)",
                _ => "fatal error",
            };
            return Err(LlamaError::Decode { code, what });
        }
        // Finish the computation and the output reordering now, so that `logits_ith(&self)`
        // only reads.
        // SAFETY: `ctx` is valid; the returned pointer is not used.
        let _ = unsafe { sys::llama_get_logits(self.ctx.as_ptr()) };
        self.outputs.extend(self.b_logits.iter().map(|&l| l != 0));
        self.n_outputs = self.outputs.iter().filter(|&&o| o).count();
        Ok(())
    }

    /// Logits (length `n_vocab`) of batch index `i` of the last decode; negative `i` counts
    /// outputs from the end (`-1` = last output).
    pub fn logits_ith(&self, i: i32) -> Result<&[f32]> {
        let valid = if i < 0 {
            (i.unsigned_abs() as usize) <= self.n_outputs
        } else {
            self.outputs.get(i as usize).copied().unwrap_or(false)
        };
        if !valid {
            return Err(LlamaError::NoLogits {
                index: i,
                n_outputs: self.n_outputs,
            });
        }
        // SAFETY: `ctx` is valid and `i` names an output of the last decode (checked above), so
        // llama.cpp neither logs an error nor asserts; reordering already happened in decode.
        let ptr = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), i) };
        if ptr.is_null() {
            return Err(LlamaError::NoLogits {
                index: i,
                n_outputs: self.n_outputs,
            });
        }
        // SAFETY: llama.cpp returns a row of n_vocab floats in its output buffer, which is only
        // rewritten or freed by decode/drop; those need `&mut self`, so not while this borrow lives.
        Ok(unsafe { std::slice::from_raw_parts(ptr, self.n_vocab as usize) })
    }

    /// Number of logits rows produced by the last decode.
    pub fn n_outputs(&self) -> usize {
        self.n_outputs
    }

    fn memory(&self) -> Result<sys::llama_memory_t> {
        // SAFETY: `ctx` is valid.
        let mem = unsafe { sys::llama_get_memory(self.ctx.as_ptr()) };
        if mem.is_null() {
            Err(LlamaError::NoMemory)
        } else {
            Ok(mem)
        }
    }

    /// Empties the KV cache of every sequence.
    pub fn clear_kv(&mut self) -> Result<()> {
        let mem = self.memory()?;
        // SAFETY: `mem` belongs to the live context.
        unsafe { sys::llama_memory_clear(mem, true) };
        Ok(())
    }

    /// Removes every cached position of sequence `seq`.
    pub fn remove_seq(&mut self, seq: i32) -> Result<()> {
        self.check_seq(seq)?;
        let mem = self.memory()?;
        // SAFETY: `mem` belongs to the live context and `seq` is in range (checked).
        if unsafe { sys::llama_memory_seq_rm(mem, seq, -1, -1) } {
            Ok(())
        } else {
            Err(LlamaError::SeqRemove(seq))
        }
    }

    fn check_fits(&self, needed: usize) -> Result<()> {
        if needed > self.n_ctx_seq as usize {
            Err(LlamaError::ContextFull {
                needed,
                n_ctx_seq: self.n_ctx_seq,
            })
        } else {
            Ok(())
        }
    }

    /// Clears the cache, decodes `prompt` on sequence 0, then generates `n` tokens greedily
    /// (argmax, lowest id on ties). Fails on NaN logits.
    pub fn greedy_generate(&mut self, prompt: &[i32], n: usize) -> Result<Vec<i32>> {
        if prompt.is_empty() {
            return Err(LlamaError::EmptyBatch);
        }
        // The last generated token is never decoded.
        self.check_fits(prompt.len() + n.saturating_sub(1))?;
        self.clear_kv()?;
        let chunk = self.n_batch as usize;
        let mut pos: i32 = 0;
        let n_chunks = prompt.len().div_ceil(chunk);
        for (ci, part) in prompt.chunks(chunk).enumerate() {
            let wanted = if ci + 1 == n_chunks {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            self.decode(part, pos, 0, wanted)?;
            pos += len_i32(part.len())?;
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let logits = self.logits_ith(-1)?;
            if logits.iter().any(|v| v.is_nan()) {
                return Err(LlamaError::NanLogits);
            }
            let next = argmax(logits).ok_or(LlamaError::EmptyLogits)?;
            let next = len_i32(next)?;
            out.push(next);
            if out.len() == n {
                break;
            }
            self.decode(&[next], pos, 0, LogitsWanted::Last)?;
            pos += 1;
        }
        Ok(out)
    }

    /// Clears the cache and returns the logits of every prompt position (decoded on sequence 0
    /// in chunks of `n_batch`).
    pub fn prompt_logits(&mut self, prompt: &[i32]) -> Result<Vec<Vec<f32>>> {
        if prompt.is_empty() {
            return Err(LlamaError::EmptyBatch);
        }
        self.check_fits(prompt.len())?;
        self.clear_kv()?;
        let mut rows = Vec::with_capacity(prompt.len());
        let mut pos: i32 = 0;
        for part in prompt.chunks(self.n_batch as usize) {
            self.decode(part, pos, 0, LogitsWanted::All)?;
            for i in 0..part.len() {
                rows.push(self.logits_ith(len_i32(i)?)?.to_vec());
            }
            pos += len_i32(part.len())?;
        }
        Ok(rows)
    }
}

impl Drop for OracleContext {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from llama_init_from_model and is freed exactly once, before the
        // model (the Arc field drops after this).
        unsafe { sys::llama_free(self.ctx.as_ptr()) };
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

/// Sampling parameters, with llama.cpp's defaults (`common_params_sampling`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// `<= 0` samples greedily.
    pub temperature: f32,
    /// `<= 0` keeps the whole vocabulary.
    pub top_k: i32,
    /// `1.0` disables.
    pub top_p: f32,
    /// `0.0` disables.
    pub min_p: f32,
    /// `1.0` disables.
    pub repeat_penalty: f32,
    /// Tokens considered by the penalties; `0` disables. llama.cpp's `-1` ("context size") must
    /// be resolved by the caller.
    pub repeat_last_n: i32,
    /// `0.0` disables.
    pub frequency_penalty: f32,
    /// `0.0` disables.
    pub presence_penalty: f32,
    /// [`DEFAULT_SEED`] draws a random seed.
    pub seed: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: DEFAULT_SEED,
        }
    }
}

impl SamplingParams {
    /// Whether sampling reduces to the argmax of the raw logits (no temperature, no
    /// penalties), so no sampler chain is needed.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
            && self.repeat_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
    }

    fn validate(&self) -> Result<()> {
        let floats = [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ];
        for (name, v) in floats {
            if !v.is_finite() {
                return Err(LlamaError::InvalidParam(format!(
                    "{name} must be finite, got {v}"
                )));
            }
        }
        if self.repeat_last_n < 0 {
            return Err(LlamaError::InvalidParam(format!(
                "repeat_last_n must be >= 0, got {} (resolve -1 to the context size first)",
                self.repeat_last_n
            )));
        }
        Ok(())
    }
}

/// llama.cpp's sampler chain, built like its common sampler: [logit bias] → penalties → top-k →
/// top-p → min-p → temperature → dist(seed); greedy (penalties → greedy) when temperature <= 0.
pub struct SamplerChain {
    chain: NonNull<sys::llama_sampler>,
    cur: Vec<sys::llama_token_data>,
}

// SAFETY: the chain and its samplers are plain heap objects owned exclusively by this value (no
// thread affinity, no shared state); every call goes through `&mut self` or `&self` getters.
unsafe impl Send for SamplerChain {}

impl std::fmt::Debug for SamplerChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplerChain").finish_non_exhaustive()
    }
}

impl SamplerChain {
    /// Builds the chain for `params`.
    pub fn new(params: &SamplingParams) -> Result<SamplerChain> {
        Self::with_logit_bias(params, 0, &[])
    }

    /// The chain for a sequence with `params` whose tokens so far are `history` (its
    /// penalties see them), or `None` for greedy decoding, which is a plain argmax.
    pub fn for_sequence(params: &SamplingParams, history: &[i32]) -> Result<Option<SamplerChain>> {
        if params.is_greedy() {
            return Ok(None);
        }
        let mut chain = SamplerChain::new(params)?;
        for &t in history {
            chain.accept(t);
        }
        Ok(Some(chain))
    }

    /// Like [`SamplerChain::new`], with `(token, bias)` logit biases applied first, as llama.cpp
    /// does for user biases and the model's suppress tokens (bias `f32::NEG_INFINITY`).
    /// `n_vocab` is only used by llama.cpp's GPU "backend sampling" path (never enabled here);
    /// pass the vocabulary size when known, else 0.
    pub fn with_logit_bias(
        params: &SamplingParams,
        n_vocab: i32,
        logit_bias: &[(i32, f32)],
    ) -> Result<SamplerChain> {
        params.validate()?;
        init_backend();
        // SAFETY: returns a plain struct by value.
        let mut chain_params = unsafe { sys::llama_sampler_chain_default_params() };
        chain_params.no_perf = true;
        // SAFETY: takes a plain struct; returns an owned chain (freed in Drop).
        let raw = unsafe { sys::llama_sampler_chain_init(chain_params) };
        let mut this = SamplerChain {
            chain: NonNull::new(raw).ok_or(LlamaError::SamplerInit)?,
            cur: Vec::new(),
        };
        if !logit_bias.is_empty() {
            let biases: Vec<sys::llama_logit_bias> = logit_bias
                .iter()
                .map(|&(token, bias)| sys::llama_logit_bias { token, bias })
                .collect();
            let n = len_i32(biases.len())?;
            // SAFETY: `biases` holds `n` entries for the duration of the call (llama.cpp copies).
            let s = unsafe { sys::llama_sampler_init_logit_bias(n_vocab, n, biases.as_ptr()) };
            this.push(s)?;
        }
        // SAFETY: plain-value arguments; returns an owned sampler (ownership moves to the chain).
        this.push(unsafe {
            sys::llama_sampler_init_penalties(
                n_vocab,
                params.repeat_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        })?;
        if params.temperature <= 0.0 {
            // SAFETY: no arguments; returns an owned sampler.
            this.push(unsafe { sys::llama_sampler_init_greedy() })?;
        } else {
            // SAFETY: plain-value arguments; returns an owned sampler (ownership moves to the chain).
            this.push(unsafe { sys::llama_sampler_init_top_k(params.top_k) })?;
            // SAFETY: as above (min_keep 0 = llama.cpp's default).
            this.push(unsafe { sys::llama_sampler_init_top_p(params.top_p, 0) })?;
            // SAFETY: as above.
            this.push(unsafe { sys::llama_sampler_init_min_p(params.min_p, 0) })?;
            // SAFETY: as above (dynatemp range 0, exponent 1: llama.cpp's defaults).
            this.push(unsafe { sys::llama_sampler_init_temp_ext(params.temperature, 0.0, 1.0) })?;
            // SAFETY: as above.
            this.push(unsafe { sys::llama_sampler_init_dist(params.seed) })?;
        }
        Ok(this)
    }

    fn push(&mut self, sampler: *mut sys::llama_sampler) -> Result<()> {
        if sampler.is_null() {
            return Err(LlamaError::SamplerInit);
        }
        // SAFETY: both pointers are valid; the chain takes ownership of `sampler`.
        unsafe { sys::llama_sampler_chain_add(self.chain.as_ptr(), sampler) };
        Ok(())
    }

    /// Samples a token id from one row of logits (index = token id). Does not accept it: call
    /// [`SamplerChain::accept`] with the token actually used (needed by the penalties).
    pub fn sample(&mut self, logits: &[f32]) -> Result<i32> {
        len_i32(logits.len())?;
        self.sample_candidates(logits.iter().enumerate().map(|(i, &l)| (i as i32, l)))
    }

    /// Samples a token id from candidates `(token id, logit)`: a part of the vocabulary
    /// that contains every token the chain could pick (for instance the union of the best
    /// `k` of every part of a split vocabulary, for a top-k chain without penalties). Does
    /// not accept it.
    pub fn sample_candidates(
        &mut self,
        candidates: impl Iterator<Item = (i32, f32)>,
    ) -> Result<i32> {
        self.cur.clear();
        self.cur
            .extend(candidates.map(|(id, logit)| sys::llama_token_data { id, logit, p: 0.0 }));
        if self.cur.is_empty() {
            return Err(LlamaError::EmptyLogits);
        }
        len_i32(self.cur.len())?;
        if self.cur.iter().any(|d| d.logit.is_nan()) {
            return Err(LlamaError::NanLogits);
        }
        let data = self.cur.as_mut_ptr();
        let mut arr = sys::llama_token_data_array {
            data,
            size: self.cur.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: `arr.data` points to `arr.size` initialised elements of `self.cur`, which is not
        // touched during the call; the samplers sort and shrink the array in place.
        unsafe { sys::llama_sampler_apply(self.chain.as_ptr(), &mut arr) };
        if arr.data != data || arr.size > self.cur.len() {
            return Err(LlamaError::NoSelection);
        }
        let selected = usize::try_from(arr.selected).map_err(|_| LlamaError::NoSelection)?;
        if selected >= arr.size {
            return Err(LlamaError::NoSelection);
        }
        self.cur
            .get(selected)
            .map(|d| d.id)
            .ok_or(LlamaError::NoSelection)
    }

    /// [`SamplerChain::sample`] then [`SamplerChain::accept`].
    pub fn sample_and_accept(&mut self, logits: &[f32]) -> Result<i32> {
        let token = self.sample(logits)?;
        self.accept(token);
        Ok(token)
    }

    /// Records a token as generated (updates the penalties' history).
    pub fn accept(&mut self, token: i32) {
        // SAFETY: the chain is valid; samplers accept any id (the penalties keep a hash map).
        unsafe { sys::llama_sampler_accept(self.chain.as_ptr(), token) };
    }

    /// Forgets the history and re-seeds the RNG (a random seed again for [`DEFAULT_SEED`]).
    pub fn reset(&mut self) {
        // SAFETY: the chain is valid.
        unsafe { sys::llama_sampler_reset(self.chain.as_ptr()) };
    }

    /// The seed in use (the drawn one when [`DEFAULT_SEED`] was asked); [`DEFAULT_SEED`] for a
    /// greedy chain.
    pub fn seed(&self) -> u32 {
        // SAFETY: the chain is valid; this only reads.
        unsafe { sys::llama_sampler_get_seed(self.chain.as_ptr()) }
    }
}

impl Drop for SamplerChain {
    fn drop(&mut self) {
        // SAFETY: the chain came from llama_sampler_chain_init and is freed exactly once; it
        // frees the samplers it owns.
        unsafe { sys::llama_sampler_free(self.chain.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator for test logits (xorshift32).
    struct Rng(u32);

    impl Rng {
        fn next_f32(&mut self) -> f32 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            self.0 = x;
            (x >> 8) as f32 / (1u32 << 24) as f32
        }

        fn logits(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.next_f32() * scale).collect()
        }
    }

    fn greedy_params() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn llama_argmax_lowest_index_on_ties() {
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn llama_sampler_greedy_is_argmax() {
        let mut chain = SamplerChain::new(&greedy_params()).expect("chain");
        let mut rng = Rng(0x1234_5678);
        for _ in 0..20 {
            let logits = rng.logits(500, 10.0);
            let want = argmax(&logits).expect("non-empty") as i32;
            assert_eq!(chain.sample(&logits).expect("sample"), want);
        }
        // Ties: lowest index.
        let mut logits = vec![0.0f32; 100];
        logits[7] = 5.0;
        logits[42] = 5.0;
        assert_eq!(chain.sample(&logits).expect("sample"), 7);
    }

    #[test]
    fn llama_sampler_rejects_bad_input() {
        let mut chain = SamplerChain::new(&SamplingParams::default()).expect("chain");
        assert!(matches!(chain.sample(&[]), Err(LlamaError::EmptyLogits)));
        assert!(matches!(
            chain.sample(&[1.0, f32::NAN]),
            Err(LlamaError::NanLogits)
        ));
        let bad = SamplingParams {
            top_p: f32::NAN,
            ..SamplingParams::default()
        };
        assert!(SamplerChain::new(&bad).is_err());
        let bad = SamplingParams {
            repeat_last_n: -1,
            ..SamplingParams::default()
        };
        assert!(SamplerChain::new(&bad).is_err());
    }

    fn sample_run(params: &SamplingParams, steps: usize) -> Vec<i32> {
        let mut chain = SamplerChain::new(params).expect("chain");
        let mut rng = Rng(0xdead_beef);
        (0..steps)
            .map(|_| {
                let logits = rng.logits(1000, 1.0);
                chain.sample_and_accept(&logits).expect("sample")
            })
            .collect()
    }

    #[test]
    fn llama_sampler_seed_determinism() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..SamplingParams::default()
        };
        let a = sample_run(&params, 64);
        let b = sample_run(&params, 64);
        assert_eq!(a, b);
        let c = sample_run(&SamplingParams { seed: 43, ..params }, 64);
        assert_ne!(a, c);
        // The default chain (top-k, top-p, min-p) is deterministic too.
        let d = SamplingParams {
            seed: 7,
            ..SamplingParams::default()
        };
        assert_eq!(sample_run(&d, 32), sample_run(&d, 32));
    }

    #[test]
    fn llama_sampler_reset_replays() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 99,
            ..SamplingParams::default()
        };
        let mut chain = SamplerChain::new(&params).expect("chain");
        assert_eq!(chain.seed(), 99);
        let logits = Rng(5).logits(300, 1.0);
        let first: Vec<i32> = (0..16)
            .map(|_| chain.sample(&logits).expect("sample"))
            .collect();
        chain.reset();
        let again: Vec<i32> = (0..16)
            .map(|_| chain.sample(&logits).expect("sample"))
            .collect();
        assert_eq!(first, again);
    }

    #[test]
    fn llama_sampler_penalties_and_bias() {
        let params = SamplingParams {
            repeat_penalty: 100.0,
            ..greedy_params()
        };
        let mut chain = SamplerChain::new(&params).expect("chain");
        let logits = [1.0, 5.0, 4.0];
        assert_eq!(chain.sample_and_accept(&logits).expect("sample"), 1);
        // Token 1 is now penalised (5 / 100).
        assert_eq!(chain.sample_and_accept(&logits).expect("sample"), 2);
        chain.reset();
        assert_eq!(chain.sample(&logits).expect("sample"), 1);

        let mut biased =
            SamplerChain::with_logit_bias(&greedy_params(), 3, &[(1, f32::NEG_INFINITY)])
                .expect("chain");
        assert_eq!(biased.sample(&logits).expect("sample"), 2);
    }

    #[test]
    fn llama_sampler_top_k_one_is_argmax() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: 3,
            ..SamplingParams::default()
        };
        let mut chain = SamplerChain::new(&params).expect("chain");
        let mut rng = Rng(77);
        for _ in 0..10 {
            let logits = rng.logits(200, 4.0);
            let want = argmax(&logits).expect("non-empty") as i32;
            assert_eq!(chain.sample(&logits).expect("sample"), want);
        }
    }

    #[test]
    fn llama_load_errors_are_reported() {
        let missing = Path::new("/nonexistent/exo-llama-test.gguf");
        assert!(matches!(Vocab::load(missing), Err(LlamaError::Load { .. })));
        assert!(matches!(
            OracleModel::load(missing, 1),
            Err(LlamaError::Load { .. })
        ));
        let garbage =
            std::env::temp_dir().join(format!("exo-llama-garbage-{}.gguf", std::process::id()));
        std::fs::write(&garbage, b"this is not a gguf file at all").expect("write temp file");
        let res = Vocab::load(&garbage);
        let _ = std::fs::remove_file(&garbage);
        assert!(matches!(res, Err(LlamaError::Load { .. })));
    }

    /// The model for model-dependent checks: `EXO_LLAMA_TEST_MODEL`, else the real model
    /// fetched by `scripts/setup.sh`. Absent, the checks are skipped with a note, unless
    /// `EXO_REQUIRE_REAL_MODEL` is set (as `scripts/test.sh` and CI do): then they fail.
    fn test_model() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("EXO_LLAMA_TEST_MODEL") {
            return Some(PathBuf::from(p));
        }
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/gemma-3-270m-Q4_K_M.gguf");
        if real.is_file() {
            return Some(real);
        }
        assert!(
            std::env::var_os("EXO_REQUIRE_REAL_MODEL").is_none(),
            "the real model is missing: run scripts/setup.sh"
        );
        eprintln!("note: no test model (run scripts/setup.sh); skipping");
        None
    }

    #[test]
    fn llama_vocab_with_model() {
        if let Some(path) = test_model() {
            check_vocab(&path);
        }
    }

    #[test]
    fn llama_oracle_with_model() {
        if let Some(path) = test_model() {
            check_oracle(&path);
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

    /// Oracle checks against any small GGUF model (for fixture-based tests too).
    pub(crate) fn check_oracle(path: &Path) {
        let model = OracleModel::load(path, 1).expect("model");
        let n_vocab = model.n_vocab();
        let mut ctx = OracleContext::new(&model, 256, 8, 2, 1).expect("context");
        assert_eq!(ctx.n_batch(), 8);
        // Input checks.
        assert!(matches!(
            ctx.decode(&[], 0, 0, LogitsWanted::Last),
            Err(LlamaError::EmptyBatch)
        ));
        assert!(matches!(
            ctx.decode(&[n_vocab], 0, 0, LogitsWanted::Last),
            Err(LlamaError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            ctx.decode(&[1; 9], 0, 0, LogitsWanted::Last),
            Err(LlamaError::BatchTooLarge { .. })
        ));
        assert!(matches!(
            ctx.decode(&[1], 0, 2, LogitsWanted::Last),
            Err(LlamaError::SeqOutOfRange { .. })
        ));
        assert!(ctx.logits_ith(0).is_err());

        let prompt: Vec<i32> = (0..19).map(|i| (i * 7 + 3) % n_vocab).collect();
        let rows = ctx.prompt_logits(&prompt).expect("prompt logits");
        assert_eq!(rows.len(), prompt.len());
        assert!(rows.iter().all(|r| r.len() == n_vocab as usize));
        let generated = ctx.greedy_generate(&prompt, 6).expect("generate");
        assert_eq!(generated.len(), 6);
        let last = rows.last().expect("rows");
        assert_eq!(generated[0], argmax(last).expect("argmax") as i32);
        // Determinism.
        assert_eq!(
            ctx.greedy_generate(&prompt, 6).expect("generate"),
            generated
        );

        // Two sequences in one batch match single-sequence decoding.
        ctx.clear_kv().expect("clear");
        let entries = [(prompt[0], 0, 0), (prompt[0], 0, 1)];
        ctx.decode_multi(&entries).expect("multi");
        let a = ctx.logits_ith(0).expect("row 0").to_vec();
        let b = ctx.logits_ith(1).expect("row 1").to_vec();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4);
        }
        // A batch of two takes other kernels than a 19-token prompt (gemv vs repacked
        // gemm, vector vs tiled flash attention); on a quantized Gemma 3 the logits then
        // differ by up to ~10% of their scale, so only the winner is compared exactly.
        let scale = rows[0].iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&rows[0]) {
            assert!((x - y).abs() / scale < 0.25, "{x} vs {y} (scale {scale})");
        }
        assert_eq!(argmax(&a), argmax(&rows[0]));
        ctx.remove_seq(1).expect("remove");
        assert!(ctx.remove_seq(5).is_err());

        let vocab = model.vocab().expect("vocab");
        assert_eq!(vocab.n_tokens(), n_vocab);
    }
}
