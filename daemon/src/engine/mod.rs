//! The engine: stages behind one link trait ([`Link`]), a pipeline of them,
//! sequence slots and what their KV caches hold for later prompts, the scheduler
//! (chunked prefill and batched decode) and the one sampler.

pub mod codec;
mod generate;
pub mod kv;
mod link;
mod pipeline;
pub mod sampler;
pub mod scheduler;
mod stage;

pub use generate::{generate, prompt_logits, GenerateParams, Generation, StopReason};
pub use link::{Link, LinkOutput};
pub use pipeline::{Pipeline, PipelineConfig, StepOutcome};
pub use sampler::{PartialLogits, Picked, Sampling, TokenLogprobs, TokenSampler};
pub use stage::{Stage, StageConfig, StageInput, StageOutput};

pub use crate::model::graph::OutputRows;
pub use crate::model::BatchSeq;
use crate::model::{LayerRange, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("ggml: {0}")]
    Backend(#[from] ggml_shim::BackendError),
    #[error("ggml: {0}")]
    Graph(#[from] ggml_shim::ggml::GraphAllocError),
    #[error("llama.cpp: {0}")]
    Llama(#[from] ggml_shim::llama::LlamaError),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("the prompt has {prompt} tokens and {generate} more were requested, but the context holds {ctx}")]
    ContextFull {
        prompt: usize,
        generate: usize,
        ctx: usize,
    },
    #[error("all {0} sequence slots are busy")]
    NoFreeSlot(usize),
    #[error("pipeline: {0}")]
    Pipeline(String),
}

/// Splits `n_layer` layers at the given cut points into contiguous ranges.
pub fn split_ranges(n_layer: usize, cuts: &[usize]) -> Result<Vec<LayerRange>, EngineError> {
    let mut points: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < n_layer)
        .collect();
    if cuts.iter().any(|&c| c > n_layer) {
        return Err(ModelError::BadRange {
            start: 0,
            end: *cuts.iter().max().unwrap_or(&0),
            n_layer,
        }
        .into());
    }
    points.sort_unstable();
    points.dedup();
    let mut ranges = Vec::new();
    let mut start = 0;
    for p in points.into_iter().chain(std::iter::once(n_layer)) {
        ranges.push(LayerRange::new(start, p));
        start = p;
    }
    Ok(ranges)
}

/// Free and busy sequence slots.
#[derive(Debug)]
pub struct SlotPool {
    free: Vec<usize>,
    n: usize,
}

impl SlotPool {
    pub fn new(n: usize) -> SlotPool {
        SlotPool {
            free: (0..n).rev().collect(),
            n,
        }
    }

    pub fn acquire(&mut self) -> Result<usize, EngineError> {
        self.free.pop().ok_or(EngineError::NoFreeSlot(self.n))
    }

    pub fn release(&mut self, slot: usize) {
        if slot < self.n && !self.free.contains(&slot) {
            self.free.push(slot);
        }
    }

    pub fn n_busy(&self) -> usize {
        self.n - self.free.len()
    }

    pub fn n_slots(&self) -> usize {
        self.n
    }
}
