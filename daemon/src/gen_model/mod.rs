//! `exo gen-model`: GGUF files of published model shapes with random weights, for tests
//! and benchmarks (no 8B GGUF can be fetched where exo is built and tested).
//!
//! A [`Shape`] holds the hyper-parameters of a published model ([`SHAPES`]). [`write`]
//! writes a GGUF with that model's tensor names, shapes and storage types (llama.cpp's
//! Q4_K_M choice, [`q4_k_m_type`]) and its metadata keys; the tokenizer is a synthetic
//! SentencePiece vocabulary of the model's size ([`vocab`]). Quantized blocks are random
//! bytes with a fixed, small f16 super-block scale per tensor ([`blocks`]), so a tensor's
//! values are finite and have a chosen spread: every linear map keeps activations near
//! unit scale, and the model's logits are finite through all layers. The data is
//! generated and streamed to the file tensor by tensor, in bounded memory; nothing is
//! quantized.

mod blocks;
mod vocab;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ggml_shim::writer::{GgufWriter, WriterError, WriterType};

pub use blocks::{quant_unit_std, BlockFiller};

/// `general.file_type` of llama.cpp's `LLAMA_FTYPE_MOSTLY_Q4_K_M`.
pub const FILE_TYPE_Q4_K_M: u32 = 15;

/// Errors of [`write`] and [`find_shape`].
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// No shape of that name.
    #[error("unknown shape {name:?}; known shapes: {}", known.join(", "))]
    UnknownShape {
        /// The name asked for.
        name: String,
        /// Every known shape name.
        known: Vec<&'static str>,
    },
    /// The shape's numbers do not make a model llama.cpp accepts.
    #[error("shape {name}: {why}")]
    BadShape {
        /// Shape name.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The GGUF writer refused a key or tensor.
    #[error(transparent)]
    Writer(#[from] WriterError),
    /// Creating, writing or renaming the file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// File being written.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Architecture (the GGUF `general.architecture`) of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenArch {
    /// `llama`: Llama 3 tokenizer layout and chat template.
    Llama,
    /// `qwen2`: q/k/v biases, Qwen tokenizer layout and ChatML.
    Qwen2,
}

impl GenArch {
    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            GenArch::Llama => "llama",
            GenArch::Qwen2 => "qwen2",
        }
    }
}

/// Llama 3.1/3.2's RoPE frequency scaling, stored as the `rope_freqs.weight` factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    /// `factor`.
    pub factor: f32,
    /// `low_freq_factor`.
    pub low_freq_factor: f32,
    /// `high_freq_factor`.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings`.
    pub original_context: f32,
}

/// Hyper-parameters of a published model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// The `--shape` name.
    pub name: &'static str,
    /// `general.name`.
    pub model_name: &'static str,
    /// Architecture.
    pub arch: GenArch,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Residual width.
    pub n_embd: usize,
    /// Hidden width of the gated FFN.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Vocabulary size (rows of `token_embd`).
    pub n_vocab: usize,
    /// `{arch}.context_length`.
    pub n_ctx_train: usize,
    /// `{arch}.rope.freq_base`.
    pub rope_freq_base: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// No `output.weight`: the head is `token_embd`.
    pub tied_embeddings: bool,
    /// Llama 3.1+ RoPE scaling (`rope_freqs.weight`).
    pub llama3_rope: Option<Llama3Rope>,
    /// Approximate size in MB (10^6 bytes) of the published Q4_K_M GGUF, for
    /// comparison (0: none).
    pub published_mb: u64,
}

const LLAMA_3_2_ROPE: Llama3Rope = Llama3Rope {
    factor: 32.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_context: 8192.0,
};

/// The known shapes: Llama 3 8B, Llama 3.2 1B, Qwen2.5 3B (their `config.json`), and a
/// small Llama-3-like shape for fast tests.
pub const SHAPES: [Shape; 4] = [
    Shape {
        name: "llama3-8b",
        model_name: "Meta Llama 3 8B (random weights)",
        arch: GenArch::Llama,
        n_layer: 32,
        n_embd: 4096,
        n_ff: 14336,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        n_vocab: 128_256,
        n_ctx_train: 8192,
        rope_freq_base: 500_000.0,
        rms_eps: 1e-5,
        tied_embeddings: false,
        llama3_rope: None,
        published_mb: 4920,
    },
    Shape {
        name: "llama3-1b",
        model_name: "Llama 3.2 1B (random weights)",
        arch: GenArch::Llama,
        n_layer: 16,
        n_embd: 2048,
        n_ff: 8192,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 64,
        n_vocab: 128_256,
        n_ctx_train: 131_072,
        rope_freq_base: 500_000.0,
        rms_eps: 1e-5,
        tied_embeddings: true,
        llama3_rope: Some(LLAMA_3_2_ROPE),
        published_mb: 810,
    },
    Shape {
        name: "qwen2.5-3b",
        model_name: "Qwen2.5 3B (random weights)",
        arch: GenArch::Qwen2,
        n_layer: 36,
        n_embd: 2048,
        n_ff: 11008,
        n_head: 16,
        n_head_kv: 2,
        head_dim: 128,
        n_vocab: 151_936,
        n_ctx_train: 32_768,
        rope_freq_base: 1_000_000.0,
        rms_eps: 1e-6,
        tied_embeddings: true,
        llama3_rope: None,
        published_mb: 1930,
    },
    Shape {
        name: "llama3-tiny",
        model_name: "Llama-3-like tiny shape (random weights)",
        arch: GenArch::Llama,
        n_layer: 4,
        n_embd: 256,
        n_ff: 512,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 64,
        n_vocab: 4096,
        n_ctx_train: 8192,
        rope_freq_base: 500_000.0,
        rms_eps: 1e-5,
        tied_embeddings: false,
        llama3_rope: None,
        published_mb: 0,
    },
];

/// The shape called `name`.
pub fn find_shape(name: &str) -> Result<Shape, GenError> {
    SHAPES
        .iter()
        .find(|s| s.name == name)
        .copied()
        .ok_or_else(|| GenError::UnknownShape {
            name: name.to_owned(),
            known: SHAPES.iter().map(|s| s.name).collect(),
        })
}

impl Shape {
    /// Width of the query projection.
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the key (and value) projection.
    pub fn kv_width(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    fn check(&self) -> Result<(), GenError> {
        let bad = |why: String| {
            Err(GenError::BadShape {
                name: self.name,
                why,
            })
        };
        let dims = [
            self.n_layer,
            self.n_embd,
            self.n_ff,
            self.n_head,
            self.n_head_kv,
        ];
        if dims.contains(&0) || self.head_dim == 0 || self.n_vocab < vocab::MIN_VOCAB {
            return bad(format!(
                "every size must be positive and the vocabulary at least {}",
                vocab::MIN_VOCAB
            ));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) || !self.head_dim.is_multiple_of(2) {
            return bad("heads must be a multiple of KV heads and head_dim even".into());
        }
        if self.arch == GenArch::Qwen2 && self.q_width() != self.n_embd {
            return bad("qwen2 needs n_head * head_dim == n_embd".into());
        }
        // Every matrix row (ne0) must hold whole k-quant super-blocks (llama.cpp would
        // otherwise fall back to other types, which this generator does not write).
        for ne0 in [self.n_embd, self.n_ff, self.q_width()] {
            if !ne0.is_multiple_of(WriterType::Q4_K.block_size()) {
                return bad(format!("row length {ne0} is not a multiple of 256"));
            }
        }
        Ok(())
    }
}

/// The role of a tensor, as llama.cpp's quantizer tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `token_embd.weight`.
    TokenEmbd,
    /// `output.weight`.
    Output,
    /// `blk.N.attn_v.weight`.
    AttnV,
    /// `blk.N.ffn_down.weight`.
    FfnDown,
    /// Any other matrix (`attn_q/k/output`, `ffn_gate/up`).
    Matrix,
    /// A vector: norms, biases, `rope_freqs` (never quantized).
    Vector,
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)` (src/llama-quant.cpp).
pub fn use_more_bits(il: usize, n_layer: usize) -> bool {
    il < n_layer / 8 || il >= 7 * n_layer / 8 || (il - n_layer / 8) % 3 == 2
}

/// The storage type llama.cpp's Q4_K_M gives a tensor of `role` in layer `il`.
///
/// The rule, from `llama_tensor_get_type_impl` in src/llama-quant.cpp of the llama.cpp
/// that llama-cpp-sys-2 0.1.161 vendors, reduced to the tensors these shapes have (no
/// experts, no fused QKV, every row a multiple of 256 so no fallback type):
/// - 1-D tensors (norms, biases, `rope_freqs`) are not quantized (`ggml_n_dims < 2`): F32;
/// - `output.weight`, and `token_embd.weight` when the model has no `output.weight`
///   (`has_tied_embeddings`): Q6_K;
/// - `attn_v` (counted in file order, which is layer order here) and `ffn_down`: Q6_K
///   where `use_more_bits(il, n_layer)`, i.e. `il < n/8 || il >= 7n/8 || (il - n/8) % 3 == 2`;
/// - everything else, an untied `token_embd.weight` included: Q4_K, the ftype's default.
pub fn q4_k_m_type(role: Role, il: usize, n_layer: usize, tied: bool) -> WriterType {
    match role {
        Role::Vector => WriterType::F32,
        Role::Output => WriterType::Q6_K,
        Role::TokenEmbd if tied => WriterType::Q6_K,
        Role::AttnV | Role::FfnDown if use_more_bits(il, n_layer) => WriterType::Q6_K,
        _ => WriterType::Q4_K,
    }
}

/// How a tensor's values are made.
#[derive(Debug, Clone, PartialEq)]
pub enum Fill {
    /// Random quantized blocks whose values have this standard deviation.
    Quant {
        /// Target standard deviation of the values.
        std: f32,
    },
    /// F32 values uniform in `[center - half_width, center + half_width]`.
    Uniform {
        /// Middle of the range.
        center: f32,
        /// Half the width of the range.
        half_width: f32,
    },
    /// These F32 values.
    Values(Vec<f32>),
}

/// One tensor of a generated model, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct GenTensor {
    /// GGUF name.
    pub name: String,
    /// ggml shape, `ne0` first.
    pub ne: Vec<usize>,
    /// Storage type.
    pub ty: WriterType,
    /// How its values are made.
    pub fill: Fill,
}

impl GenTensor {
    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> usize {
        self.ty.row_size(self.ne[0]) * self.ne[1..].iter().product::<usize>()
    }
}

/// Logits with standard deviation ~2: peaked, but not one-hot.
const HEAD_GAIN: f32 = 2.0;

/// The tensors of `shape`, in file order: `token_embd`, `rope_freqs` (Llama 3.1+), the
/// blocks layer by layer (`attn_norm`, `attn_q/k/v` (+ biases for qwen2), `attn_output`,
/// `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`), `output_norm`, `output` (untied).
///
/// A linear map of `n_in` inputs gets values of spread `gain / sqrt(n_in)`, so each
/// output is about `gain` times the scale of its (normalized) input: 1 inside the
/// blocks, [`HEAD_GAIN`] for the head (a tied table is the head too; an untied one only
/// feeds the first norm). Norm weights are uniform in 1 ± 0.1, biases in ±0.1.
pub fn plan(shape: &Shape) -> Result<Vec<GenTensor>, GenError> {
    shape.check()?;
    let (e, f, v) = (shape.n_embd, shape.n_ff, shape.n_vocab);
    let (q, kv) = (shape.q_width(), shape.kv_width());
    let (n, tied) = (shape.n_layer, shape.tied_embeddings);
    let norm = Fill::Uniform {
        center: 1.0,
        half_width: 0.1,
    };
    let bias = Fill::Uniform {
        center: 0.0,
        half_width: 0.1,
    };
    let matrix = |name: String, n_in: usize, n_out: usize, role: Role, il: usize, gain: f32| {
        let std = gain / (n_in as f32).sqrt();
        (name, vec![n_in, n_out], role, il, Fill::Quant { std })
    };
    let vector = |name: String, len: usize, il: usize, fill: &Fill| {
        (name, vec![len], Role::Vector, il, fill.clone())
    };
    let embd_gain = if tied { HEAD_GAIN } else { 1.0 };
    let mut list = vec![matrix(
        "token_embd.weight".into(),
        e,
        v,
        Role::TokenEmbd,
        0,
        embd_gain,
    )];
    if let Some(rope) = shape.llama3_rope {
        let factors = llama3_rope_factors(&rope, shape.head_dim, shape.rope_freq_base);
        let fill = Fill::Values(factors);
        list.push(vector(
            "rope_freqs.weight".into(),
            shape.head_dim / 2,
            0,
            &fill,
        ));
    }
    for il in 0..n {
        let b = |t: &str| format!("blk.{il}.{t}");
        list.push(vector(b("attn_norm.weight"), e, il, &norm));
        list.push(matrix(b("attn_q.weight"), e, q, Role::Matrix, il, 1.0));
        list.push(matrix(b("attn_k.weight"), e, kv, Role::Matrix, il, 1.0));
        list.push(matrix(b("attn_v.weight"), e, kv, Role::AttnV, il, 1.0));
        if shape.arch == GenArch::Qwen2 {
            list.push(vector(b("attn_q.bias"), q, il, &bias));
            list.push(vector(b("attn_k.bias"), kv, il, &bias));
            list.push(vector(b("attn_v.bias"), kv, il, &bias));
        }
        list.push(matrix(b("attn_output.weight"), q, e, Role::Matrix, il, 1.0));
        list.push(vector(b("ffn_norm.weight"), e, il, &norm));
        list.push(matrix(b("ffn_gate.weight"), e, f, Role::Matrix, il, 1.0));
        list.push(matrix(b("ffn_up.weight"), e, f, Role::Matrix, il, 1.0));
        list.push(matrix(b("ffn_down.weight"), f, e, Role::FfnDown, il, 1.0));
    }
    list.push(vector("output_norm.weight".into(), e, 0, &norm));
    if !tied {
        list.push(matrix(
            "output.weight".into(),
            e,
            v,
            Role::Output,
            0,
            HEAD_GAIN,
        ));
    }
    Ok(list
        .into_iter()
        .map(|(name, ne, role, il, fill)| GenTensor {
            name,
            ne,
            ty: q4_k_m_type(role, il, n, tied),
            fill,
        })
        .collect())
}

/// `rope_freqs.weight` of Llama 3.1/3.2 (as convert_hf_to_gguf.py computes it): per
/// frequency pair, 1 for short wavelengths, `factor` for long ones, a smooth blend between.
pub fn llama3_rope_factors(rope: &Llama3Rope, head_dim: usize, base: f32) -> Vec<f32> {
    let low_wavelen = rope.original_context / rope.low_freq_factor;
    let high_wavelen = rope.original_context / rope.high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = std::f32::consts::TAU / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                rope.factor
            } else {
                let smooth = (rope.original_context / wavelen - rope.low_freq_factor)
                    / (rope.high_freq_factor - rope.low_freq_factor);
                1.0 / ((1.0 - smooth) / rope.factor + smooth)
            }
        })
        .collect()
}

/// The model keys of `shape` (the ones its published GGUF carries).
fn set_model_keys(w: &mut GgufWriter, shape: &Shape) -> Result<(), GenError> {
    let a = shape.arch.name();
    let k = |s: &str| format!("{a}.{s}");
    let u32_of = |x: usize| {
        u32::try_from(x).map_err(|_| GenError::BadShape {
            name: shape.name,
            why: format!("{x} does not fit a u32 key"),
        })
    };
    w.set_str("general.architecture", a)?;
    w.set_str("general.name", shape.model_name)?;
    w.set_u32("general.file_type", FILE_TYPE_Q4_K_M)?;
    w.set_u32("general.quantization_version", 2)?;
    w.set_u32(&k("block_count"), u32_of(shape.n_layer)?)?;
    w.set_u32(&k("context_length"), u32_of(shape.n_ctx_train)?)?;
    w.set_u32(&k("embedding_length"), u32_of(shape.n_embd)?)?;
    w.set_u32(&k("feed_forward_length"), u32_of(shape.n_ff)?)?;
    w.set_u32(&k("attention.head_count"), u32_of(shape.n_head)?)?;
    w.set_u32(&k("attention.head_count_kv"), u32_of(shape.n_head_kv)?)?;
    w.set_f32(&k("rope.freq_base"), shape.rope_freq_base)?;
    w.set_f32(&k("attention.layer_norm_rms_epsilon"), shape.rms_eps)?;
    if shape.arch == GenArch::Llama {
        w.set_u32(&k("vocab_size"), u32_of(shape.n_vocab)?)?;
        w.set_u32(&k("rope.dimension_count"), u32_of(shape.head_dim)?)?;
        if shape.head_dim * shape.n_head != shape.n_embd {
            w.set_u32(&k("attention.key_length"), u32_of(shape.head_dim)?)?;
            w.set_u32(&k("attention.value_length"), u32_of(shape.head_dim)?)?;
        }
    }
    Ok(())
}

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// Tensors in the file.
    pub n_tensors: usize,
    /// File size in bytes.
    pub bytes: u64,
}

/// Writes a random-weight GGUF of `shape` at `path` (via `path` + `.part`, renamed when
/// complete, so an interrupted run leaves no file that looks whole). The same seed gives
/// the same file.
pub fn write(shape: &Shape, seed: u64, path: &Path) -> Result<Written, GenError> {
    let tensors = plan(shape)?;
    let mut w = GgufWriter::new();
    set_model_keys(&mut w, shape)?;
    vocab::set_tokenizer(&mut w, shape)?;
    let mut fillers = Vec::with_capacity(tensors.len());
    for t in &tensors {
        w.add_tensor_streamed(&t.name, &t.ne, t.ty)?;
        fillers.push(BlockFiller::new(t, seed).ok_or_else(|| GenError::BadShape {
            name: shape.name,
            why: format!("no generator for {} as {}", t.name, t.ty.name()),
        })?);
    }
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| GenError::Io { path: p, source }
    };
    let result = write_data(&w, fillers, &part);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(io(&part)(e));
    }
    std::fs::rename(&part, path).map_err(io(path))?;
    let bytes = std::fs::metadata(path).map_err(io(path))?.len();
    Ok(Written {
        n_tensors: tensors.len(),
        bytes,
    })
}

fn write_data(w: &GgufWriter, mut fillers: Vec<BlockFiller>, part: &Path) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(part)?);
    w.write_streamed(&mut out, |i, chunk| {
        fillers[i].fill(chunk);
        Ok(())
    })?;
    // Not synced to the disk: a fixture is wanted fast, and is remade if a crash loses it.
    out.flush()
}

#[cfg(test)]
mod tests;
