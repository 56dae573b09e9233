//! The engine: stages behind one link trait, a local pipeline of them, sequence
//! slots, chunked prefill and batched decode.

pub mod codec;
mod generate;
pub mod scheduler;
mod stage;

pub use generate::{generate, prompt_logits, GenerateParams, Generation, StopReason};
pub use stage::{Stage, StageConfig, StageInput, StageOutput};

pub use crate::model::graph::OutputRows;
pub use crate::model::BatchSeq;
use crate::model::{HParams, LayerRange, ModelError, ModelFile};

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

/// One stage of a pipeline, local or remote: the scheduler drives every stage
/// through this trait and never sees where it runs.
pub trait StageLink: Send {
    /// Runs one step; writes activations (or, on the last stage, logits) into `out`.
    fn forward(
        &mut self,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<StageOutput, EngineError>;
    fn range(&self) -> LayerRange;
    /// Parks or wakes local compute threads (a no-op for remote stages).
    fn set_paused(&mut self, _paused: bool) {}
}

impl StageLink for Stage {
    fn set_paused(&mut self, paused: bool) {
        Stage::set_paused(self, paused)
    }

    fn forward(
        &mut self,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<StageOutput, EngineError> {
        Stage::forward(self, seqs, input, out)
    }

    fn range(&self) -> LayerRange {
        self.config().range
    }
}

/// Encodes activations for another stage (little-endian f32) into `out`.
pub fn encode_activations(h: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.extend(h.iter().flat_map(|v| v.to_le_bytes()));
}

/// Decodes activations received from another stage into `out`.
pub fn decode_activations(bytes: &[u8], out: &mut Vec<f32>) -> Result<(), EngineError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(EngineError::Input(format!(
            "activation of {} bytes is not whole f32 values",
            bytes.len()
        )));
    }
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(())
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
}

/// A chain of stages covering all layers, driven step by step. Activations cross
/// from stage to stage as bytes, exactly as they would over the network.
pub struct Pipeline {
    links: Vec<Box<dyn StageLink>>,
    hp: HParams,
    n_ctx: usize,
    pub slots: SlotPool,
    /// Reused buffers: a stage's output, the bytes on the "wire", the next input.
    out: Vec<f32>,
    wire: Vec<u8>,
    hidden: Vec<f32>,
}

/// How to build a local pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub n_ctx: usize,
    pub n_slots: usize,
    pub n_threads: usize,
    pub repack: bool,
    /// Layer ranges, in order, covering `0..n_layer`.
    pub ranges: Vec<LayerRange>,
}

impl Pipeline {
    /// Loads every range as a local stage.
    pub fn local(mf: &ModelFile, cfg: &PipelineConfig) -> Result<Pipeline, EngineError> {
        let mut links: Vec<Box<dyn StageLink>> = Vec::new();
        for r in &cfg.ranges {
            links.push(Box::new(Stage::load(
                mf,
                StageConfig {
                    range: *r,
                    n_ctx: cfg.n_ctx,
                    n_slots: cfg.n_slots,
                    n_threads: cfg.n_threads,
                    repack: cfg.repack,
                    head_rows: None,
                },
            )?));
        }
        Pipeline::new(links, mf.hparams.clone(), cfg.n_ctx, cfg.n_slots)
    }

    /// A pipeline over given links, which must cover all layers in order.
    pub fn new(
        links: Vec<Box<dyn StageLink>>,
        hp: HParams,
        n_ctx: usize,
        n_slots: usize,
    ) -> Result<Pipeline, EngineError> {
        let mut expect = 0;
        for l in &links {
            let r = l.range();
            if r.start != expect {
                return Err(EngineError::Pipeline(format!(
                    "stage {r} does not start at layer {expect}"
                )));
            }
            expect = r.end;
        }
        if expect != hp.n_layer || links.is_empty() {
            return Err(EngineError::Pipeline(format!(
                "stages end at layer {expect}, the model has {}",
                hp.n_layer
            )));
        }
        Ok(Pipeline {
            links,
            hp,
            n_ctx,
            slots: SlotPool::new(n_slots),
            out: Vec::new(),
            wire: Vec::new(),
            hidden: Vec::new(),
        })
    }

    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Parks (or wakes) the compute threads of the local stages.
    pub fn set_paused(&mut self, paused: bool) {
        for l in &mut self.links {
            l.set_paused(paused);
        }
    }

    /// Runs one step through all stages; returns logits of the requested rows
    /// (`n_vocab` values per row), valid until the next step.
    pub fn step(&mut self, seqs: &[BatchSeq], tokens: &[i32]) -> Result<&[f32], EngineError> {
        let n = self.links.len();
        for i in 0..n {
            if i > 0 {
                decode_activations(&self.wire, &mut self.hidden)?;
            }
            let input = if i == 0 {
                StageInput::Tokens(tokens)
            } else {
                StageInput::Hidden(&self.hidden)
            };
            let link = &mut self.links[i];
            match link.forward(seqs, input, &mut self.out)? {
                StageOutput::Hidden if i + 1 < n => encode_activations(&self.out, &mut self.wire),
                StageOutput::Logits if i + 1 == n => return Ok(&self.out),
                _ => {
                    return Err(EngineError::Pipeline(format!(
                        "stage {} returned the wrong kind of output",
                        link.range()
                    )))
                }
            }
        }
        Err(EngineError::Pipeline("no stage produced logits".into()))
    }
}
