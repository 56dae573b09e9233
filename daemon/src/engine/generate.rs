//! One sequence from prompt to completion: chunked prefill, then single-token
//! decode with llama.cpp's samplers.

use std::time::Instant;

use ggml_shim::llama::SamplingParams;

use super::{BatchSeq, EngineError, OutputRows, Pipeline, Sampling, TokenSampler};

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Prefill micro-batch size in tokens.
    pub chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            chunk: 512,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `max_tokens` reached.
    Length,
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// The token callback asked to stop.
    Stopped,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens (an end-of-generation token is not included).
    pub tokens: Vec<i32>,
    pub stop: StopReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Releases a slot when dropped, whatever happens in between.
struct SlotGuard<'p> {
    pipeline: &'p mut Pipeline,
    slot: usize,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.pipeline.slots.release(self.slot);
    }
}

fn check_context(p: &Pipeline, prompt: usize, generate: usize) -> Result<(), EngineError> {
    if prompt == 0 {
        return Err(EngineError::Input("the prompt is empty".into()));
    }
    if prompt + generate > p.n_ctx() {
        return Err(EngineError::ContextFull {
            prompt,
            generate,
            ctx: p.n_ctx(),
        });
    }
    Ok(())
}

/// Feeds the prompt in chunks; returns the logits of the last prompt position, or
/// of every position when `all` is set.
fn prefill(
    p: &mut Pipeline,
    slot: usize,
    prompt: &[i32],
    chunk: usize,
    all: bool,
) -> Result<Vec<f32>, EngineError> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let n_chunks = prompt.len().div_ceil(chunk);
    for (i, part) in prompt.chunks(chunk).enumerate() {
        let output = if all {
            OutputRows::All
        } else if i + 1 == n_chunks {
            OutputRows::Last
        } else {
            OutputRows::None
        };
        let seq = BatchSeq {
            slot,
            pos0: i * chunk,
            n_tokens: part.len(),
            output,
        };
        out.extend_from_slice(&p.step(&[seq], part)?);
    }
    Ok(out)
}

/// Generates up to `params.max_tokens` tokens after `prompt`. `on_token` sees each
/// token as it is produced and returns false to stop early.
pub fn generate(
    p: &mut Pipeline,
    prompt: &[i32],
    params: &GenerateParams,
    is_eog: impl Fn(i32) -> bool,
    mut on_token: impl FnMut(i32) -> bool,
) -> Result<Generation, EngineError> {
    check_context(p, prompt.len(), params.max_tokens)?;
    let mut sampler = TokenSampler::new(&Sampling::from(params.sampling), prompt)?;
    let slot = p.slots.acquire()?;
    let guard = SlotGuard { pipeline: p, slot };
    let t0 = Instant::now();
    let logits = prefill(guard.pipeline, slot, prompt, params.chunk, false)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut tokens = Vec::new();
    let mut stop = StopReason::Length;
    let mut pos = prompt.len();
    let mut next = sampler.pick(&logits)?.token;
    drop(logits);
    while tokens.len() < params.max_tokens {
        if is_eog(next) {
            stop = StopReason::EndOfGeneration;
            break;
        }
        tokens.push(next);
        if !on_token(next) {
            stop = StopReason::Stopped;
            break;
        }
        if tokens.len() == params.max_tokens {
            break;
        }
        let seq = BatchSeq {
            slot,
            pos0: pos,
            n_tokens: 1,
            output: OutputRows::Last,
        };
        next = sampler.pick(&guard.pipeline.step(&[seq], &[next])?)?.token;
        pos += 1;
    }
    Ok(Generation {
        tokens,
        stop,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}

/// Logits for every position of `prompt` (`n_vocab` values per position).
pub fn prompt_logits(
    p: &mut Pipeline,
    prompt: &[i32],
    chunk: usize,
) -> Result<Vec<Vec<f32>>, EngineError> {
    check_context(p, prompt.len(), 0)?;
    let n_vocab = p.n_vocab();
    let slot = p.slots.acquire()?;
    let guard = SlotGuard { pipeline: p, slot };
    let flat = prefill(guard.pipeline, slot, prompt, chunk, true)?;
    Ok(flat.chunks(n_vocab).map(|c| c.to_vec()).collect())
}
