//! The oracle: llama.cpp's full model on the CPU, its contexts and batch decoding.

use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use ggml_sys as sys;

use super::{argmax, init_backend, len_i32, LlamaError, ModelHandle, Result, Vocab};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::tests::test_model;

    #[test]
    fn llama_oracle_with_model() {
        if let Some(path) = test_model() {
            check_oracle(&path);
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
