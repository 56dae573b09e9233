//! A stage: one contiguous layer range of a model with its weights, KV cache and
//! CPU backend, computing one batched step at a time.

use std::collections::VecDeque;
use std::ops::Range;

use ggml_shim::{Allocator, CpuBackend, DType, GraphBuilder};

use crate::model::graph::{project_lm_head, KvCache, StepShape};
use crate::model::{
    BatchSeq, GraphInputs, HParams, LayerRange, LmHeadShare, ModelFile, StageGraph, StageWeights,
};

use super::{EngineError, LinkOutput};

/// What a stage is asked to hold and how to run it.
#[derive(Debug, Clone)]
pub struct StageConfig {
    pub range: LayerRange,
    /// Context length (positions) per sequence slot.
    pub n_ctx: usize,
    /// Sequences that can be in flight at once.
    pub n_slots: usize,
    pub n_threads: usize,
    /// Let ggml repack matmul weights for its fastest CPU kernels (as llama.cpp does).
    pub repack: bool,
    /// The rows (vocabulary entries) of the `lm_head` this stage holds when the
    /// head is split between stages: the last stage computes their logits at the
    /// end of each step, another stage in [`Stage::project`]. None: the whole head
    /// on the last stage, none elsewhere.
    pub lm_head_rows: Option<Range<usize>>,
}

/// The input of one step.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids (first stage).
    Tokens(&'a [i32]),
    /// The previous stage's activations, `n_embd` values per token, token-major.
    Hidden(&'a [f32]),
}

/// What one step wrote into the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutput {
    /// Activations for the next stage, `n_embd` values per token.
    Hidden,
    /// Logits of the requested rows, `n_vocab` values per row.
    Logits,
    /// The last stage of a split `lm_head`: the normalized final hidden state of the
    /// requested rows, `n_embd` values per row, for [`Stage::project`] here and on
    /// the stage holding the other `lm_head` rows.
    Normed,
}

/// Name of the output tensor of every stage graph.
const RESULT: &str = "stage_result";
/// Name of the input of an `lm_head` projection graph.
const PROJECT_INPUT: &str = "inp_normed";

/// The last step's graph, kept while steps keep the same shape.
struct CachedGraph {
    shape: StepShape,
    builder: GraphBuilder,
}

/// Pipeline stage running locally on this machine.
pub struct Stage {
    hp: HParams,
    first: bool,
    last: bool,
    cfg: StageConfig,
    weights: StageWeights,
    kv: KvCache,
    backend: CpuBackend,
    alloc: Allocator,
    inputs: GraphInputs,
    graph: Option<CachedGraph>,
    /// `lm_head` projection graphs (split `lm_head`), by rows, with their own allocator.
    project_alloc: Option<Allocator>,
    project_graph: Option<((usize, Range<usize>), GraphBuilder)>,
    /// Results of launched steps not yet taken ([`Link`](super::Link)).
    pub(super) finished: VecDeque<(u64, LinkOutput)>,
}

impl Stage {
    /// Loads the weights of `cfg.range` (embedding if it starts at layer 0, output
    /// head if it ends at the last layer) and allocates the KV cache.
    pub fn load(mf: &ModelFile, cfg: StageConfig) -> Result<Stage, EngineError> {
        let hp = mf.hparams.clone();
        cfg.range.validate(hp.n_layer)?;
        if cfg.n_ctx == 0 || cfg.n_slots == 0 {
            return Err(EngineError::Config(
                "context length and slots must be positive".into(),
            ));
        }
        let first = cfg.range.start == 0;
        let last = cfg.range.end == hp.n_layer;
        let head = match (&cfg.lm_head_rows, last) {
            (Some(r), _) => LmHeadShare::Rows(r.clone()),
            (None, true) => LmHeadShare::All,
            (None, false) => LmHeadShare::None,
        };
        if first && last && cfg.lm_head_rows.is_some() {
            return Err(EngineError::Config(
                "a stage holding the whole model cannot share its lm_head".into(),
            ));
        }
        let weights = StageWeights::load(mf, cfg.range, first, last, &head, cfg.repack)?;
        let kv = KvCache::new(&hp, cfg.range, cfg.n_ctx, cfg.n_slots)?;
        tracing::info!(
            "stage {} loaded: {:.1} MB of weights, {:.1} MB of KV cache",
            cfg.range,
            weights.buffer_bytes() as f64 / 1e6,
            kv.size_bytes() as f64 / 1e6
        );
        let backend = CpuBackend::new(cfg.n_threads)?;
        let alloc = Allocator::new()?;
        Ok(Stage {
            hp,
            first,
            last,
            cfg,
            weights,
            kv,
            backend,
            alloc,
            inputs: GraphInputs::default(),
            graph: None,
            project_alloc: None,
            project_graph: None,
            finished: VecDeque::new(),
        })
    }

    /// The `lm_head` rows this stage computes logits for, if any.
    pub fn lm_head_rows(&self) -> Option<Range<usize>> {
        self.weights.lm_head_rows()
    }

    /// The `lm_head` rows this stage can compute on request ([`Stage::project`]).
    pub fn lm_head_reach(&self) -> Option<Range<usize>> {
        self.weights.lm_head_reach()
    }

    /// Applies vocabulary rows `rows` of the `lm_head` (inside
    /// [`Stage::lm_head_reach`]) to normalized hidden states (`n_embd` values per row,
    /// the last stage's [`StageOutput::Normed`]): writes `rows.len()` logits per row
    /// into `out`.
    pub fn project(
        &mut self,
        normed: &[f32],
        rows: Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let e = self.hp.n_embd;
        if self.weights.lm_head_reach().is_none() {
            return Err(EngineError::Config(
                "this stage holds no lm_head rows".into(),
            ));
        }
        if normed.is_empty() || !normed.len().is_multiple_of(e) {
            return Err(EngineError::Input(format!(
                "{} values are not whole rows of width {e}",
                normed.len()
            )));
        }
        if normed.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::Input(
                "hidden state contains NaN or infinity".into(),
            ));
        }
        let n = normed.len() / e;
        // rows outside the stage's reach are refused when the graph is built
        let key = (n, rows.clone());
        if self.project_graph.as_ref().is_none_or(|(k, _)| *k != key) {
            self.project_graph = None;
            let g = GraphBuilder::new(64)?;
            {
                let x = g.input(DType::F32, &[e as i64, n as i64]);
                g.name(x, PROJECT_INPUT);
                let logits = project_lm_head(&g, &self.hp, &self.weights, x, rows)?;
                g.name(logits, RESULT);
                g.output(logits);
            }
            let alloc = match self.project_alloc.as_mut() {
                Some(a) => a,
                None => self.project_alloc.insert(Allocator::new()?),
            };
            alloc.alloc(&g)?;
            self.project_graph = Some((key, g));
        }
        let Some((_, g)) = self.project_graph.as_ref() else {
            return Err(EngineError::Pipeline("no projection graph".into()));
        };
        let (Some(input), Some(result)) = (g.find(PROJECT_INPUT), g.find(RESULT)) else {
            return Err(EngineError::Pipeline(
                "projection graph lost a tensor".into(),
            ));
        };
        ggml_shim::set_tensor_data(input, normed)?;
        self.backend.compute(g)?;
        ggml_shim::get_tensor_f32(result, out)?;
        Ok(())
    }

    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    pub fn config(&self) -> &StageConfig {
        &self.cfg
    }

    pub fn is_first(&self) -> bool {
        self.first
    }

    pub fn is_last(&self) -> bool {
        self.last
    }

    /// Parks (or wakes) the compute threads, e.g. while another engine measures.
    pub fn set_paused(&mut self, paused: bool) {
        if paused {
            self.backend.pause();
        } else {
            self.backend.resume();
        }
    }

    /// Bytes of weights, KV cache and compute buffer held by this stage.
    pub fn memory_bytes(&self) -> (usize, usize, usize) {
        (
            self.weights.buffer_bytes(),
            self.kv.size_bytes(),
            self.alloc.buffer_size(),
        )
    }

    /// Runs one step for a batch of sequences, writing activations or logits into
    /// `out` (reused across steps, so a decode step allocates nothing large).
    pub fn forward(
        &mut self,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<StageOutput, EngineError> {
        let n_tokens: usize = seqs.iter().map(|s| s.n_tokens).sum();
        match input {
            StageInput::Tokens(t) => {
                if !self.first {
                    return Err(EngineError::Input(
                        "token ids sent to a stage that expects activations".into(),
                    ));
                }
                if t.len() != n_tokens {
                    return Err(EngineError::Input(format!(
                        "{} token ids for a batch of {n_tokens} tokens",
                        t.len()
                    )));
                }
                if let Some(bad) = t
                    .iter()
                    .find(|&&id| id < 0 || id as usize >= self.hp.n_vocab)
                {
                    return Err(EngineError::Input(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.hp.n_vocab
                    )));
                }
                self.inputs.tokens.clear();
                self.inputs.tokens.extend_from_slice(t);
            }
            StageInput::Hidden(h) => {
                if self.first {
                    return Err(EngineError::Input(
                        "activations sent to the first stage, which expects token ids".into(),
                    ));
                }
                if h.len() != n_tokens * self.hp.n_embd {
                    return Err(EngineError::Input(format!(
                        "activation of {} values for {n_tokens} tokens of width {}",
                        h.len(),
                        self.hp.n_embd
                    )));
                }
                if h.iter().any(|v| !v.is_finite()) {
                    return Err(EngineError::Input(
                        "activation contains NaN or infinity".into(),
                    ));
                }
                self.inputs.hidden.clear();
                self.inputs.hidden.extend_from_slice(h);
            }
        }
        self.inputs.prepare(&self.hp, &self.kv, self.last, seqs)?;
        let reuse = self
            .graph
            .as_ref()
            .is_some_and(|c| c.shape == self.inputs.shape);
        if !reuse {
            // Drop the old graph first: the allocator's buffer is about to be reused.
            self.graph = None;
            let n_seq = seqs.len().max(1);
            // per layer: attention per sequence (24), and up to 8 matrix products
            // of up to n_seq + 1 column runs, each a view, a product of at most 4
            // nodes and a concat (48 per run)
            let per_layer = 64 + 24 * n_seq + 48 * (n_seq + 1);
            let max_nodes = 256 + self.cfg.range.len() * per_layer + 8 * n_seq;
            let g = GraphBuilder::new(max_nodes)?;
            {
                let sg = StageGraph::new(
                    &g,
                    &self.hp,
                    &self.weights,
                    &self.kv,
                    self.first,
                    self.last,
                    &self.inputs,
                )?;
                let result = self.hp.arch.build(&sg)?;
                g.name(result, RESULT);
                g.output(result);
            }
            self.alloc.alloc(&g)?;
            self.graph = Some(CachedGraph {
                shape: self.inputs.shape.clone(),
                builder: g,
            });
        }
        let Some(cached) = self.graph.as_ref() else {
            return Err(EngineError::Pipeline("no graph".into()));
        };
        self.inputs
            .fill(&cached.builder, self.first, self.hp.n_embd)?;
        self.backend.compute(&cached.builder)?;
        let split = self
            .weights
            .lm_head_rows()
            .is_some_and(|r| r.len() != self.hp.n_vocab);
        let kind = match (self.last, split) {
            (true, true) => StageOutput::Normed,
            (true, false) => StageOutput::Logits,
            (false, _) => StageOutput::Hidden,
        };
        if self.last && self.inputs.shape.n_out == 0 {
            out.clear();
            return Ok(kind);
        }
        let result = cached
            .builder
            .find(RESULT)
            .ok_or_else(|| EngineError::Pipeline("graph lost its result".into()))?;
        ggml_shim::get_tensor_f32(result, out)?;
        Ok(kind)
    }
}
