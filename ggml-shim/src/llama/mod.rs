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
//!
//! Files by concern: this one holds the errors, process-wide initialisation and the model
//! handle both loaders share; `vocab.rs` the tokenizer and chat template, `oracle.rs` the
//! reference model, its contexts and batch decoding, `sampler.rs` the sampling parameters
//! and chain.

mod oracle;
mod sampler;
mod vocab;
mod vocab_check;

pub use oracle::{LogitsWanted, OracleContext, OracleModel};
pub use sampler::{argmax, SamplerChain, SamplingParams};
pub use vocab::{SpecialToken, Vocab};

use std::ffi::{c_char, c_void, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

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

// ---------------------------------------------------------------------------------------------
// The model handle shared by vocabularies and oracles
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
        // What llama.cpp would assert on is refused here first.
        let gguf = crate::gguf::Gguf::open(path).map_err(|e| LlamaError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        vocab_check::check_vocabulary(&gguf).map_err(|reason| LlamaError::Load {
            path: path.to_path_buf(),
            reason,
        })?;
        drop(gguf);
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

#[cfg(test)]
mod tests {
    use super::*;

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
    pub(crate) fn test_model() -> Option<PathBuf> {
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
}
