//! A pipeline: links covering all layers in order, driven one step at a time. The
//! scheduler, `exo run` and the benchmarks all drive this one type, whether its
//! links are local stages or stages on other machines.

use std::collections::HashMap;

use super::codec::{self, Dtype};
use super::link::{Link, LinkOutput};
use super::sampler::{PartialLogits, Picked, Sampling};
use super::stage::{Stage, StageConfig, StageInput};
use super::{EngineError, SlotPool};
use crate::model::{BatchSeq, LayerRange, ModelFile};

/// What a step produced, for the sampler.
#[derive(Debug)]
pub enum StepOutcome {
    /// Logits of the output rows, `n_vocab` values per row.
    Logits(Vec<f32>),
    /// Tokens the last stage already sampled, one per output row.
    Tokens(Vec<Picked>),
    /// A split `lm_head`: per output row, this node's logits of ids `0..rows`
    /// (`rows` values a row, in `mine`) and the last stage's part of the others.
    Split {
        rows: usize,
        mine: Vec<f32>,
        theirs: Vec<PartialLogits>,
    },
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

/// A chain of links covering all layers. Activations cross from link to link as
/// bytes, exactly as they cross the network.
pub struct Pipeline {
    links: Vec<Box<dyn Link>>,
    n_vocab: usize,
    n_ctx: usize,
    pub slots: SlotPool,
    /// How activations cross from a local link to the next (as on the network).
    activations: Dtype,
    /// Reused buffers: the bytes on the "wire" and the next link's input.
    wire: Vec<u8>,
    hidden: Vec<f32>,
    /// A split `lm_head`: per step in flight, this node's rows and their logits,
    /// computed when the last stage's normalized state arrived.
    lm_head_parts: HashMap<u64, (usize, Vec<f32>)>,
}

impl Pipeline {
    /// Loads every range as a local stage.
    pub fn local(mf: &ModelFile, cfg: &PipelineConfig) -> Result<Pipeline, EngineError> {
        let mut links: Vec<Box<dyn Link>> = Vec::new();
        for r in &cfg.ranges {
            links.push(Box::new(Stage::load(
                mf,
                StageConfig {
                    range: *r,
                    n_ctx: cfg.n_ctx,
                    n_slots: cfg.n_slots,
                    n_threads: cfg.n_threads,
                    repack: cfg.repack,
                    lm_head_rows: None,
                },
            )?));
        }
        let hp = &mf.hparams;
        Pipeline::new(links, hp.n_layer, hp.n_vocab, cfg.n_ctx, cfg.n_slots)
    }

    /// A pipeline over given links, which must cover layers `0..n_layer` in order.
    pub fn new(
        links: Vec<Box<dyn Link>>,
        n_layer: usize,
        n_vocab: usize,
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
        if expect != n_layer || links.is_empty() {
            return Err(EngineError::Pipeline(format!(
                "stages end at layer {expect}, the model has {n_layer}"
            )));
        }
        Ok(Pipeline {
            links,
            n_vocab,
            n_ctx,
            slots: SlotPool::new(n_slots),
            activations: Dtype::F32,
            wire: Vec::new(),
            hidden: Vec::new(),
            lm_head_parts: HashMap::new(),
        })
    }

    /// Activations between local links travel as `dtype` (f32 unless told).
    pub fn with_activations(mut self, dtype: Dtype) -> Pipeline {
        self.activations = dtype;
        self
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Steps that may be in flight at once: one per stage when some run elsewhere
    /// (so every stage computes at the same time), else one.
    pub fn max_in_flight(&self) -> usize {
        if self.has_remote_links() {
            self.links.iter().map(|l| l.stages()).sum()
        } else {
            1
        }
    }

    /// Whether some stages run on other machines (a step can then be lost on the way;
    /// a local step is computed before [`Pipeline::launch`] returns).
    pub fn has_remote_links(&self) -> bool {
        self.links.iter().any(|l| l.is_remote())
    }

    /// Parks (or wakes) the compute threads of the local stages.
    pub fn set_paused(&mut self, paused: bool) {
        for l in &mut self.links {
            l.set_paused(paused);
        }
    }

    /// A new sequence in `slot`, told to every link (where sampling happens).
    pub fn open_slot(
        &mut self,
        slot: usize,
        sampling: &Sampling,
        prompt: &[i32],
    ) -> Result<(), EngineError> {
        for l in &mut self.links {
            l.open_slot(slot, sampling, prompt)?;
        }
        Ok(())
    }

    /// Starts a step: local links compute in turn, passing activations through the
    /// codec; the last link's result comes from [`Pipeline::wait`].
    pub fn launch(
        &mut self,
        step: u64,
        seqs: &[BatchSeq],
        tokens: &[i32],
    ) -> Result<(), EngineError> {
        let n = self.links.len();
        for i in 0..n {
            let input = if i == 0 {
                StageInput::Tokens(tokens)
            } else {
                StageInput::Hidden(&self.hidden)
            };
            let link = &mut self.links[i];
            link.launch(step, seqs, input)?;
            if i + 1 == n {
                return Ok(());
            }
            // a link in the middle hands its activations on at once
            match link.wait()? {
                (id, LinkOutput::Hidden(h)) if id == step => {
                    // the one codec of the wire, with its f16 → bf16 fallback
                    let dtype = self.activations.fitting(&h);
                    self.wire.clear();
                    codec::encode(&h, dtype, &mut self.wire);
                    codec::decode(&self.wire, dtype, &mut self.hidden)
                        .map_err(|e| EngineError::Input(e.to_string()))?;
                }
                _ => {
                    return Err(EngineError::Pipeline(format!(
                        "stage {} returned the wrong kind of output",
                        link.range()
                    )))
                }
            }
        }
        Err(EngineError::Pipeline("a pipeline without stages".into()))
    }

    /// Waits for a launched step's result. A split `lm_head`'s normalized state is
    /// projected here on the way (while the last stage computes its part).
    pub fn wait(&mut self) -> Result<(u64, StepOutcome), EngineError> {
        loop {
            let Some(last) = self.links.last_mut() else {
                return Err(EngineError::Pipeline("a pipeline without stages".into()));
            };
            let (step, output) = last.wait().inspect_err(|_| self.lm_head_parts.clear())?;
            let outcome = match output {
                LinkOutput::Logits(l) => StepOutcome::Logits(l),
                LinkOutput::Tokens(t) => StepOutcome::Tokens(t),
                LinkOutput::Normed { rows, normed } => {
                    // half a result: this node's rows now, the other part later
                    self.project_lm_head(step, rows, &normed)?;
                    continue;
                }
                LinkOutput::LmHeadPart(theirs) => {
                    let Some((rows, mine)) = self.lm_head_parts.remove(&step) else {
                        return Err(EngineError::Pipeline(format!(
                            "head part of step {step} without its normalized state"
                        )));
                    };
                    StepOutcome::Split { rows, mine, theirs }
                }
                LinkOutput::Hidden(_) => {
                    return Err(EngineError::Pipeline(
                        "the last stage returned activations".into(),
                    ))
                }
            };
            return Ok((step, outcome));
        }
    }

    /// This node's rows `0..rows` of a split `lm_head` for step `step`, computed by
    /// the link that holds them.
    fn project_lm_head(
        &mut self,
        step: u64,
        rows: usize,
        normed: &[f32],
    ) -> Result<(), EngineError> {
        let n = self.links.len();
        if self.lm_head_parts.len() >= 2 * self.max_in_flight() + 2 {
            // left over from failed steps
            self.lm_head_parts.clear();
        }
        let mut part = Vec::new();
        let holder = self.links[..n.saturating_sub(1)]
            .iter_mut()
            .rev()
            .find(|l| !l.is_remote());
        let Some(holder) = holder else {
            return Err(EngineError::Pipeline(
                "no local stage holds rows of the lm_head".into(),
            ));
        };
        holder.project_lm_head(normed, 0..rows, &mut part)?;
        self.lm_head_parts.insert(step, (rows, part));
        Ok(())
    }

    /// Changes whenever a stage may have lost the KV cache of its slots
    /// ([`Link::kv_generation`]).
    pub fn kv_generation(&self) -> u64 {
        self.links
            .iter()
            .fold(0u64, |g, l| g.wrapping_add(l.kv_generation()))
    }

    /// Runs one step to its end (one step in flight); returns the logits of the
    /// output rows (`n_vocab` values per row).
    pub fn step(&mut self, seqs: &[BatchSeq], tokens: &[i32]) -> Result<Vec<f32>, EngineError> {
        self.launch(0, seqs, tokens)?;
        match self.wait()? {
            (_, StepOutcome::Logits(l)) => Ok(l),
            _ => Err(EngineError::Pipeline(
                "the pipeline samples remotely and returns no logits".into(),
            )),
        }
    }
}
