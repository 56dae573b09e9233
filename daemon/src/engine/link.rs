//! The one stage seam: every part of a pipeline, a [`Stage`] computed on this
//! machine or stages running on other machines (`cluster::remote`), is a [`Link`].
//! The [`Pipeline`](super::Pipeline) drives its links in order and never asks
//! where they run.

use std::ops::Range;

use super::sampler::{PartialLogits, Picked, Sampling};
use super::stage::{Stage, StageInput, StageOutput};
use super::EngineError;
use crate::model::{BatchSeq, LayerRange};

/// What a link's step produced.
#[derive(Debug)]
pub enum LinkOutput {
    /// Activations for the next link, `n_embd` values per token.
    Hidden(Vec<f32>),
    /// Logits of the output rows, `n_vocab` values per row.
    Logits(Vec<f32>),
    /// Token ids the last stage sampled (with their log-probabilities when asked
    /// for), one per output row.
    Tokens(Vec<Picked>),
    /// The last stage's normalized final state of the output rows (`n_embd` values
    /// per row), sent first when the `lm_head` is split: this node computes rows
    /// `0..rows` of the `lm_head` while the last stage computes the others.
    Normed { rows: usize, normed: Vec<f32> },
    /// The last stage's part of a split `lm_head`, one entry per output row.
    LmHeadPart(Vec<PartialLogits>),
}

/// A contiguous part of a pipeline: one local stage, or the stages of other nodes.
pub trait Link: Send {
    /// The layers this link computes.
    fn range(&self) -> LayerRange;

    /// The pipeline stages behind this link (a remote link can reach several).
    fn stages(&self) -> usize {
        1
    }

    /// Whether this link's steps run elsewhere: [`Link::launch`] returns at once and
    /// results come back through [`Link::wait`], so several steps can be in flight.
    fn is_remote(&self) -> bool {
        false
    }

    /// Parks or wakes local compute threads.
    fn set_paused(&mut self, _paused: bool) {}

    /// Changes whenever a stage behind this link may have lost the KV cache of its
    /// slots (a peer restarted): what the scheduler knew cached is gone.
    fn kv_generation(&self) -> u64 {
        0
    }

    /// A new sequence in `slot`: a link whose last stage samples takes its sampling
    /// parameters and prompt there.
    fn open_slot(
        &mut self,
        _slot: usize,
        _sampling: &Sampling,
        _prompt: &[i32],
    ) -> Result<(), EngineError> {
        Ok(())
    }

    /// The `lm_head` rows `rows` of normalized states, `rows.len()` values per row
    /// (only a link holding rows of a split `lm_head` can).
    fn project_lm_head(
        &mut self,
        _normed: &[f32],
        _rows: Range<usize>,
        _out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        Err(EngineError::Pipeline(format!(
            "stage {} holds no rows of the lm_head",
            self.range()
        )))
    }

    /// Starts step `step` (a local link computes it before returning).
    fn launch(
        &mut self,
        step: u64,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
    ) -> Result<(), EngineError>;

    /// The result of a launched step (the oldest, for a local link).
    fn wait(&mut self) -> Result<(u64, LinkOutput), EngineError>;
}

impl Link for Stage {
    fn range(&self) -> LayerRange {
        self.config().range
    }

    fn set_paused(&mut self, paused: bool) {
        Stage::set_paused(self, paused)
    }

    fn project_lm_head(
        &mut self,
        normed: &[f32],
        rows: Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        self.project(normed, rows, out)
    }

    fn launch(
        &mut self,
        step: u64,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
    ) -> Result<(), EngineError> {
        let mut out = Vec::new();
        let output = match self.forward(seqs, input, &mut out)? {
            StageOutput::Hidden => LinkOutput::Hidden(out),
            StageOutput::Logits => LinkOutput::Logits(out),
            StageOutput::Normed => {
                return Err(EngineError::Pipeline(format!(
                    "stage {} shares its lm_head, which a local pipeline does not",
                    self.config().range
                )))
            }
        };
        self.finished.push_back((step, output));
        Ok(())
    }

    fn wait(&mut self) -> Result<(u64, LinkOutput), EngineError> {
        self.finished
            .pop_front()
            .ok_or_else(|| EngineError::Pipeline("no step in flight".into()))
    }
}
