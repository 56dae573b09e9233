//! Models: GGUF metadata → hyper-parameters, the tensors a layer range needs, and
//! one graph-building file per architecture.

mod gemma3;
pub mod graph;
pub mod hparams;
mod llama;
mod qwen2;
mod qwen3;
pub mod weights;

use std::fmt;
use std::path::Path;

use ggml_shim::{Gguf, GgufError};

pub use graph::{BatchSeq, GraphInputs, StageGraph};
pub use hparams::HParams;
pub use weights::{LmHeadShare, StageWeights};

/// A supported transformer architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// ggml rope mode: 0 = normal (adjacent pairs), 2 = NeoX (split halves).
    pub fn rope_mode(self) -> i32 {
        match self {
            Arch::Llama => 0,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => 2,
        }
    }

    /// Builds the graph of this architecture for one stage.
    pub(crate) fn build<'a>(
        self,
        sg: &StageGraph<'a>,
    ) -> Result<ggml_shim::Tensor<'a>, ModelError> {
        match self {
            Arch::Llama => llama::build(sg),
            Arch::Qwen2 => qwen2::build(sg),
            Arch::Qwen3 => qwen3::build(sg),
            Arch::Gemma3 => gemma3::build(sg),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, qwen3, gemma3)")]
    UnsupportedArch(String),
    #[error("GGUF metadata key '{0}' is missing")]
    MissingKey(String),
    #[error("GGUF metadata key '{key}': {why}")]
    BadKey { key: String, why: String },
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    BadShape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("tensor '{name}' has unsupported type {dtype}")]
    UnsupportedType { name: String, dtype: String },
    #[error("layer range {start}..{end} is out of bounds: the model has {n_layer} layers")]
    BadRange {
        start: usize,
        end: usize,
        n_layer: usize,
    },
    #[error("reading tensor '{name}' from {path}: {error}")]
    Read {
        name: String,
        path: String,
        error: std::io::Error,
    },
    #[error("ggml: {0}")]
    Backend(#[from] ggml_shim::BackendError),
    #[error("ggml: {0}")]
    Graph(#[from] ggml_shim::ggml::GraphAllocError),
    #[error("invalid batch: {0}")]
    BadBatch(String),
}

/// A contiguous range of transformer layers `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
}

impl LayerRange {
    pub fn new(start: usize, end: usize) -> LayerRange {
        LayerRange { start, end }
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn contains(&self, il: usize) -> bool {
        (self.start..self.end).contains(&il)
    }

    /// Checks the range against a model of `n_layer` layers (an empty range is refused).
    pub fn validate(&self, n_layer: usize) -> Result<(), ModelError> {
        if self.start >= self.end || self.end > n_layer {
            return Err(ModelError::BadRange {
                start: self.start,
                end: self.end,
                n_layer,
            });
        }
        Ok(())
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl std::str::FromStr for LayerRange {
    type Err = String;
    /// Parses "A..B" (or "A-B", both end-exclusive).
    fn from_str(s: &str) -> Result<LayerRange, String> {
        let (a, b) = s
            .split_once("..")
            .or_else(|| s.split_once('-'))
            .ok_or_else(|| format!("layer range '{s}' must look like A..B"))?;
        let a: usize = a
            .trim()
            .parse()
            .map_err(|_| format!("bad layer range start '{a}'"))?;
        let b: usize = b
            .trim()
            .parse()
            .map_err(|_| format!("bad layer range end '{b}'"))?;
        if a >= b {
            return Err(format!("layer range '{s}' is empty"));
        }
        Ok(LayerRange::new(a, b))
    }
}

/// An opened model file: the GGUF's tensor table, the hyper-parameters and the
/// model's identity. The rest of the metadata is read once, at open, and not kept
/// (a 262,144-token vocabulary is 12 MB of it): the tokenizer reads its own.
pub struct ModelFile {
    pub gguf: Gguf,
    pub hparams: HParams,
    /// BLAKE3 of the GGUF header (metadata and tensor table), hex: the model's
    /// identity in the cluster (`model_id` on the wire).
    pub model_hash: String,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<ModelFile, ModelError> {
        let mut gguf = Gguf::open(path)?;
        let hparams = HParams::from_gguf(&gguf)?;
        let model_hash = gguf
            .meta_bytes()
            .map(|b| blake3::hash(&b).to_hex().to_string())
            .unwrap_or_default();
        gguf.release_metadata();
        let mf = ModelFile {
            gguf,
            hparams,
            model_hash,
        };
        // Validate the whole tensor table once, so any stage can trust it.
        weights::plan(
            &mf,
            LayerRange::new(0, mf.hparams.n_layer),
            true,
            true,
            &weights::LmHeadShare::All,
        )?;
        Ok(mf)
    }

    /// The `lm_head`'s tensor: `output.weight`, or the token embedding when tied.
    pub fn head_tensor(&self) -> Option<&ggml_shim::TensorInfo> {
        self.gguf
            .tensor("output.weight")
            .or_else(|| self.gguf.tensor("token_embd.weight"))
    }
}
