//! Test fixtures: tiny random-weight GGUF models that llama.cpp and exo both load, and the
//! location of the real model.
//!
//! [`write_tiny_model`] writes a model of one of four architectures ([`TinyArch`]) with a
//! small SentencePiece ("llama") vocabulary ([`tiny_vocab`]), an untied `output` head and
//! a chat template. Weights are deterministic for a given [`TinySpec::seed`]: each tensor
//! draws from its own generator seeded by the spec seed and the tensor name, so the
//! values of one tensor do not depend on which other tensors are written.

use std::path::{Path, PathBuf};

use ggml_shim::writer::{GgufWriter, WriterError, WriterType};

/// Errors of [`write_tiny_model`].
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The spec is inconsistent (e.g. heads that do not divide, a block size that does not fit).
    #[error("invalid tiny model spec: {0}")]
    Spec(String),
    /// The GGUF writer failed.
    #[error(transparent)]
    Writer(#[from] WriterError),
}

/// Architecture of a tiny model (the GGUF `general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TinyArch {
    /// `llama`: RMSNorm, SwiGLU, normal (interleaved-pair) RoPE.
    Llama,
    /// `qwen2`: like llama with q/k/v biases and NeoX RoPE.
    Qwen2,
    /// `qwen3`: like llama with per-head q/k RMSNorm and NeoX RoPE.
    Qwen3,
    /// `gemma3`: scaled embeddings, q/k norms, post-attention/post-FFN norms, GELU gate,
    /// sliding-window attention on most layers, NeoX RoPE.
    Gemma3,
}

impl TinyArch {
    /// All four architectures.
    pub const ALL: [TinyArch; 4] = [
        TinyArch::Llama,
        TinyArch::Qwen2,
        TinyArch::Qwen3,
        TinyArch::Gemma3,
    ];

    /// The `general.architecture` string, also the prefix of the model keys.
    pub fn name(self) -> &'static str {
        match self {
            TinyArch::Llama => "llama",
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Qwen3 => "qwen3",
            TinyArch::Gemma3 => "gemma3",
        }
    }
}

/// The default chat template (a role-tagged, Gemma-like Jinja template).
pub const TINY_CHAT_TEMPLATE: &str = "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// Shape and settings of a tiny model. Build one with [`TinySpec::new`] and adjust fields.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    /// Architecture.
    pub arch: TinyArch,
    /// Number of transformer blocks (`{arch}.block_count`).
    pub n_layer: usize,
    /// Residual width (`{arch}.embedding_length`).
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when < `n_head`).
    pub n_head_kv: usize,
    /// Per-head dimension; `None` means `n_embd / n_head`. Written as `attention.key_length`
    /// and `attention.value_length` (qwen2 requires `n_embd / n_head`).
    pub head_dim: Option<usize>,
    /// Hidden width of the gated FFN (`{arch}.feed_forward_length`).
    pub n_ff: usize,
    /// `{arch}.context_length`.
    pub n_ctx_train: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Storage type of the per-layer matrices (attn q/k/v/output, ffn gate/up/down).
    pub weight_type: WriterType,
    /// Storage type of `token_embd` and `output`; `None` means `weight_type`.
    pub embd_type: Option<WriterType>,
    /// Seed of the weights.
    pub seed: u64,
    /// `{arch}.rope.freq_base` (global layers for gemma3).
    pub rope_freq_base: f32,
    /// Linear RoPE scaling factor: writes `{arch}.rope.scaling.type = "linear"` and
    /// `{arch}.rope.scaling.factor`. (For gemma3 llama.cpp applies it to global layers only.)
    pub rope_scaling_linear: Option<f32>,
    /// gemma3: `{arch}.attention.sliding_window` (tokens a SWA layer sees, itself included).
    pub sliding_window: Option<usize>,
    /// gemma3: `{arch}.attention.sliding_window_pattern` (u32) if set; llama.cpp defaults to
    /// 6 (layer `il` is SWA unless `il % 6 == 5`), which is what the real model relies on.
    pub swa_pattern: Option<u32>,
    /// gemma3: `{arch}.rope.freq_base_swa` if set; llama.cpp defaults to 10000.
    pub rope_freq_base_swa: Option<f32>,
    /// `tokenizer.ggml.add_space_prefix` (true for llama-style SPM, false for Gemma).
    pub add_space_prefix: bool,
    /// `tokenizer.chat_template`; `None` writes no template.
    pub chat_template: Option<String>,
    /// Writes no `output.weight`: the head is the token embedding (as in Gemma 3).
    pub tied_head: bool,
}

impl TinySpec {
    /// Defaults for `arch`: 6 layers, width 64, 4 query / 2 KV heads, FFN 128, context 512,
    /// f32 weights, seed 42. gemma3: head dim 32 (q width 128 != n_embd), sliding window 8,
    /// rope base 1e6, no space prefix; qwen: rope base 1e6; llama: rope base 10000.
    pub fn new(arch: TinyArch) -> Self {
        let gemma = arch == TinyArch::Gemma3;
        TinySpec {
            arch,
            n_layer: 6,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: gemma.then_some(32),
            n_ff: 128,
            n_ctx_train: 512,
            rms_eps: if gemma { 1e-6 } else { 1e-5 },
            weight_type: WriterType::F32,
            embd_type: None,
            seed: 42,
            rope_freq_base: match arch {
                TinyArch::Llama => 10_000.0,
                _ => 1_000_000.0,
            },
            rope_scaling_linear: None,
            sliding_window: gemma.then_some(8),
            swa_pattern: None,
            rope_freq_base_swa: None,
            add_space_prefix: !gemma,
            chat_template: Some(TINY_CHAT_TEMPLATE.to_owned()),
            tied_head: false,
        }
    }

    /// The per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head.max(1))
    }

    /// Whether layer `il` uses sliding-window attention (llama.cpp's rule for gemma3).
    pub fn is_swa_layer(&self, il: usize) -> bool {
        if self.arch != TinyArch::Gemma3 || self.sliding_window.unwrap_or(0) == 0 {
            return false;
        }
        let p = self.swa_pattern.unwrap_or(6) as usize;
        p == 0 || il % p < p - 1
    }

    fn validate(&self) -> Result<(), FixtureError> {
        let err = |m: String| Err(FixtureError::Spec(m));
        if self.n_layer == 0 || self.n_embd == 0 || self.n_head == 0 || self.n_head_kv == 0 {
            return err("n_layer, n_embd, n_head and n_head_kv must be positive".into());
        }
        if self.n_ff == 0 || self.n_ctx_train == 0 {
            return err("n_ff and n_ctx_train must be positive".into());
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return err(format!(
                "n_head {} is not a multiple of n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return err(format!("head_dim {hd} must be positive and even (RoPE)"));
        }
        if self.head_dim.is_none() && !self.n_embd.is_multiple_of(self.n_head) {
            return err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.arch == TinyArch::Qwen2 && hd * self.n_head != self.n_embd {
            return err("qwen2 needs head_dim * n_head == n_embd".into());
        }
        let check = |ty: WriterType, ne0: usize, what: &str| {
            if !ne0.is_multiple_of(ty.block_size()) {
                Err(FixtureError::Spec(format!(
                    "{what} rows of {ne0} do not fit {ty:?} blocks of {}",
                    ty.block_size()
                )))
            } else {
                Ok(())
            }
        };
        check(self.weight_type, self.n_embd, "n_embd")?;
        check(self.weight_type, self.n_ff, "n_ff")?;
        check(self.weight_type, self.n_head * hd, "n_head * head_dim")?;
        check(
            self.embd_type.unwrap_or(self.weight_type),
            self.n_embd,
            "n_embd",
        )?;
        if let Some(f) = self.rope_scaling_linear {
            if !(f.is_finite() && f > 0.0) {
                return err(format!("rope scaling factor {f} must be positive"));
            }
        }
        Ok(())
    }
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec::new(TinyArch::Llama)
    }
}

/// Token ids of the tiny vocabulary's special tokens.
pub mod tokens {
    /// `<unk>`
    pub const UNK: i32 = 0;
    /// `<s>` (BOS, prepended by the tokenizer)
    pub const BOS: i32 = 1;
    /// `</s>` (EOS)
    pub const EOS: i32 = 2;
    /// `<0x00>`; byte `b` is `BYTE_0 + b`.
    pub const BYTE_0: i32 = 3;
    /// `<start_of_turn>` (control)
    pub const START_OF_TURN: i32 = 259;
    /// `<end_of_turn>` (control; llama.cpp detects it as EOT by its text)
    pub const END_OF_TURN: i32 = 260;
}

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp defines them.
pub mod token_type {
    /// Ordinary piece.
    pub const NORMAL: i32 = 1;
    /// `<unk>`.
    pub const UNKNOWN: i32 = 2;
    /// Control token (BOS, EOS, turn markers).
    pub const CONTROL: i32 = 3;
    /// Byte-fallback token `<0xNN>`.
    pub const BYTE: i32 = 6;
}

/// A SentencePiece vocabulary: parallel token texts, scores and types.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyVocab {
    /// Token texts (`tokenizer.ggml.tokens`).
    pub tokens: Vec<String>,
    /// Merge scores (`tokenizer.ggml.scores`): higher merges first.
    pub scores: Vec<f32>,
    /// Token types (`tokenizer.ggml.token_type`), see [`token_type`].
    pub types: Vec<i32>,
}

impl TinyVocab {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty (never, for [`tiny_vocab`]).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Id of a token text.
    pub fn id(&self, text: &str) -> Option<i32> {
        self.tokens.iter().position(|t| t == text).map(|i| i as i32)
    }
}

const WORDS: &[&str] = &[
    "the", "a", "an", "and", "of", "to", "in", "is", "it", "on", "you", "me", "hello", "world",
    "what", "how", "are", "cat", "dog", "sat", "mat", "one", "two", "three", "red", "blue", "tell",
    "story", "once", "upon", "time", "there", "was", "model", "user", "say", "hi", "yes", "no",
    "this",
];

/// The tiny SentencePiece vocabulary shared by all tiny models.
///
/// `<unk>`=0, `<s>`=1, `</s>`=2, `<0x00>`..`<0xFF>`=3..258, `<start_of_turn>`=259,
/// `<end_of_turn>`=260, then `▁`, the letters a-z, a few punctuation marks, and for each of
/// 40 common words every prefix (length >= 2) of the word and of `▁word` (so SentencePiece
/// merges reach whole words from letters); scores favour longer pieces.
pub fn tiny_vocab() -> TinyVocab {
    let mut v = TinyVocab {
        tokens: Vec::new(),
        scores: Vec::new(),
        types: Vec::new(),
    };
    let push = |v: &mut TinyVocab, text: String, score: f32, ty: i32| {
        if !v.tokens.contains(&text) {
            v.tokens.push(text);
            v.scores.push(score);
            v.types.push(ty);
        }
    };
    push(&mut v, "<unk>".into(), 0.0, token_type::UNKNOWN);
    push(&mut v, "<s>".into(), 0.0, token_type::CONTROL);
    push(&mut v, "</s>".into(), 0.0, token_type::CONTROL);
    for b in 0..=255u32 {
        push(&mut v, format!("<0x{b:02X}>"), 0.0, token_type::BYTE);
    }
    push(&mut v, "<start_of_turn>".into(), 0.0, token_type::CONTROL);
    push(&mut v, "<end_of_turn>".into(), 0.0, token_type::CONTROL);
    let singles = std::iter::once('▁')
        .chain('a'..='z')
        .chain(['.', ',', '!', '?', '\'']);
    for c in singles {
        push(&mut v, c.to_string(), -10.0, token_type::NORMAL);
    }
    for w in WORDS {
        for base in [format!("▁{w}"), (*w).to_owned()] {
            let chars: Vec<char> = base.chars().collect();
            for len in 2..=chars.len() {
                let piece: String = chars[..len].iter().collect();
                let n = v.tokens.len() as f32;
                push(&mut v, piece, len as f32 - n * 1e-4, token_type::NORMAL);
            }
        }
    }
    v
}

/// Seeded generator: splitmix64 with Box-Muller normals.
struct Rng(u64);

impl Rng {
    fn for_tensor(seed: u64, name: &str) -> Rng {
        // FNV-1a of the name, mixed with the seed.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        Rng(seed ^ h.rotate_left(17))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

fn normal_vec(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    let mut r = Rng::for_tensor(seed, name);
    (0..n).map(|_| r.normal() * std).collect()
}

/// Norm weights near 1 (1 ± 0.1).
fn norm_vec(seed: u64, name: &str, n: usize) -> Vec<f32> {
    let mut r = Rng::for_tensor(seed, name);
    (0..n).map(|_| 1.0 + 0.2 * (r.uniform() - 0.5)).collect()
}

/// How a tiny model tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TinyInit {
    /// Normal values with this standard deviation.
    Normal {
        /// Standard deviation.
        std: f32,
    },
    /// Uniform in [0.9, 1.1] (norm weights; gemma's stored weights already include the +1).
    NearOne,
}

/// One tensor of a tiny model, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyTensor {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml shape, `ne0` first.
    pub shape: Vec<usize>,
    /// Storage type.
    pub ty: WriterType,
    /// How the values are drawn.
    pub init: TinyInit,
}

/// The tensors [`write_tiny_model`] writes for `spec`, in file order (see there for the list).
pub fn tiny_tensors(spec: &TinySpec) -> Vec<TinyTensor> {
    let (e, v, f) = (spec.n_embd, tiny_vocab().len(), spec.n_ff);
    let d = spec.head_dim();
    let (q, k) = (spec.n_head * d, spec.n_head_kv * d);
    let wt = spec.weight_type;
    let et = spec.embd_type.unwrap_or(wt);
    let gemma = spec.arch == TinyArch::Gemma3;
    // Gemma multiplies embeddings by sqrt(E): keep the scaled rows at unit scale.
    let embd_std = if gemma { 1.0 / (e as f32).sqrt() } else { 1.0 };
    // Linear maps: std 1/sqrt(fan_in), so each block adds O(1) to the residual stream and the
    // context visibly changes the next token.
    let lin = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();

    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, ty: WriterType, init: TinyInit| {
        out.push(TinyTensor {
            name,
            shape,
            ty,
            init,
        })
    };
    let normal = |std: f32| TinyInit::Normal { std };
    let one = TinyInit::NearOne;
    let f32t = WriterType::F32;

    push("token_embd.weight".into(), vec![e, v], et, normal(embd_std));
    for il in 0..spec.n_layer {
        let b = |t: &str| format!("blk.{il}.{t}");
        push(b("attn_norm.weight"), vec![e], f32t, one);
        push(b("attn_q.weight"), vec![e, q], wt, normal(lin(e)));
        push(b("attn_k.weight"), vec![e, k], wt, normal(lin(e)));
        push(b("attn_v.weight"), vec![e, k], wt, normal(lin(e)));
        if spec.arch == TinyArch::Qwen2 {
            push(b("attn_q.bias"), vec![q], f32t, normal(0.1));
            push(b("attn_k.bias"), vec![k], f32t, normal(0.1));
            push(b("attn_v.bias"), vec![k], f32t, normal(0.1));
        }
        if matches!(spec.arch, TinyArch::Qwen3 | TinyArch::Gemma3) {
            push(b("attn_q_norm.weight"), vec![d], f32t, one);
            push(b("attn_k_norm.weight"), vec![d], f32t, one);
        }
        push(b("attn_output.weight"), vec![q, e], wt, normal(lin(q)));
        if gemma {
            push(b("post_attention_norm.weight"), vec![e], f32t, one);
        }
        push(b("ffn_norm.weight"), vec![e], f32t, one);
        push(b("ffn_gate.weight"), vec![e, f], wt, normal(lin(e)));
        push(b("ffn_up.weight"), vec![e, f], wt, normal(lin(e)));
        push(b("ffn_down.weight"), vec![f, e], wt, normal(lin(f)));
        if gemma {
            push(b("post_ffw_norm.weight"), vec![e], f32t, one);
        }
    }
    push("output_norm.weight".into(), vec![e], f32t, one);
    // Logits with std ~2: peaked enough for greedy decoding to depend on the context.
    if !spec.tied_head {
        push("output.weight".into(), vec![e, v], et, normal(2.0 * lin(e)));
    }
    out
}

/// Writes a tiny random-weight model described by `spec` at `path`.
///
/// Keys (with `A` = the architecture name): `general.architecture`, `general.name`,
/// `A.context_length`, `A.embedding_length`, `A.block_count`, `A.feed_forward_length`,
/// `A.attention.head_count`, `A.attention.head_count_kv`, `A.attention.key_length`,
/// `A.attention.value_length`, `A.attention.layer_norm_rms_epsilon`, `A.rope.freq_base`,
/// `A.rope.dimension_count`; optionally `A.rope.scaling.type`/`.factor`; gemma3 adds
/// `A.attention.sliding_window` and optionally `A.attention.sliding_window_pattern` and
/// `A.rope.freq_base_swa`. Tokenizer: `tokenizer.ggml.{model, tokens, scores, token_type,
/// bos_token_id, eos_token_id, unknown_token_id, padding_token_id, add_bos_token,
/// add_eos_token, add_space_prefix}` and `tokenizer.chat_template`.
///
/// Tensors (ggml shapes, `ne0` first; E = n_embd, V = vocab, Q = n_head*head_dim,
/// K = n_head_kv*head_dim, F = n_ff, D = head_dim): `token_embd.weight [E,V]`,
/// `output_norm.weight [E]`, `output.weight [E,V]`, and per layer `blk.N.`
/// `attn_norm [E]`, `attn_q [E,Q]`, `attn_k [E,K]`, `attn_v [E,K]`, `attn_output [Q,E]`,
/// `ffn_norm [E]`, `ffn_gate [E,F]`, `ffn_up [E,F]`, `ffn_down [F,E]` (all `.weight`);
/// qwen2 adds `attn_q.bias [Q]`, `attn_k.bias [K]`, `attn_v.bias [K]`; qwen3 and gemma3
/// add `attn_q_norm.weight [D]`, `attn_k_norm.weight [D]`; gemma3 adds
/// `post_attention_norm.weight [E]`, `post_ffw_norm.weight [E]`.
pub fn write_tiny_model(path: &Path, spec: &TinySpec) -> Result<(), FixtureError> {
    spec.validate()?;
    let a = spec.arch.name();
    let vocab = tiny_vocab();
    let (e, f, d) = (spec.n_embd, spec.n_ff, spec.head_dim());
    let u32_of = |x: usize| {
        u32::try_from(x).map_err(|_| FixtureError::Spec(format!("{x} does not fit u32")))
    };

    let mut w = GgufWriter::new();
    w.set_str("general.architecture", a)?;
    w.set_str("general.name", &format!("exo-tiny-{a}"))?;
    w.set_u32(&format!("{a}.context_length"), u32_of(spec.n_ctx_train)?)?;
    w.set_u32(&format!("{a}.embedding_length"), u32_of(e)?)?;
    w.set_u32(&format!("{a}.block_count"), u32_of(spec.n_layer)?)?;
    w.set_u32(&format!("{a}.feed_forward_length"), u32_of(f)?)?;
    w.set_u32(&format!("{a}.attention.head_count"), u32_of(spec.n_head)?)?;
    w.set_u32(
        &format!("{a}.attention.head_count_kv"),
        u32_of(spec.n_head_kv)?,
    )?;
    w.set_u32(&format!("{a}.attention.key_length"), u32_of(d)?)?;
    w.set_u32(&format!("{a}.attention.value_length"), u32_of(d)?)?;
    w.set_f32(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        spec.rms_eps,
    )?;
    w.set_f32(&format!("{a}.rope.freq_base"), spec.rope_freq_base)?;
    w.set_u32(&format!("{a}.rope.dimension_count"), u32_of(d)?)?;
    if let Some(factor) = spec.rope_scaling_linear {
        w.set_str(&format!("{a}.rope.scaling.type"), "linear")?;
        w.set_f32(&format!("{a}.rope.scaling.factor"), factor)?;
    }
    if spec.arch == TinyArch::Gemma3 {
        if let Some(sw) = spec.sliding_window {
            w.set_u32(&format!("{a}.attention.sliding_window"), u32_of(sw)?)?;
        }
        if let Some(p) = spec.swa_pattern {
            w.set_u32(&format!("{a}.attention.sliding_window_pattern"), p)?;
        }
        if let Some(base) = spec.rope_freq_base_swa {
            w.set_f32(&format!("{a}.rope.freq_base_swa"), base)?;
        }
    }

    w.set_str("tokenizer.ggml.model", "llama")?;
    w.set_arr_str("tokenizer.ggml.tokens", &vocab.tokens)?;
    w.set_arr_f32("tokenizer.ggml.scores", &vocab.scores)?;
    w.set_arr_i32("tokenizer.ggml.token_type", &vocab.types)?;
    w.set_u32("tokenizer.ggml.bos_token_id", tokens::BOS as u32)?;
    w.set_u32("tokenizer.ggml.eos_token_id", tokens::EOS as u32)?;
    w.set_u32("tokenizer.ggml.unknown_token_id", tokens::UNK as u32)?;
    w.set_u32("tokenizer.ggml.padding_token_id", tokens::UNK as u32)?;
    w.set_bool("tokenizer.ggml.add_bos_token", true)?;
    w.set_bool("tokenizer.ggml.add_eos_token", false)?;
    w.set_bool("tokenizer.ggml.add_space_prefix", spec.add_space_prefix)?;
    if let Some(t) = &spec.chat_template {
        w.set_str("tokenizer.chat_template", t)?;
    }

    for t in tiny_tensors(spec) {
        let n: usize = t.shape.iter().product();
        let data = match t.init {
            TinyInit::Normal { std } => normal_vec(spec.seed, &t.name, n, std),
            TinyInit::NearOne => norm_vec(spec.seed, &t.name, n),
        };
        w.add_tensor_f32(&t.name, &t.shape, &data, t.ty)?;
    }

    w.write(path)?;
    Ok(())
}

/// The real Gemma 3 270M GGUF: `$EXO_MODEL` if set, else
/// `<workspace>/models/gemma-3-270m-Q4_K_M.gguf`; `None` if the file does not exist.
pub fn real_model_path() -> Option<PathBuf> {
    let path = match std::env::var_os("EXO_MODEL") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("models")
            .join("gemma-3-270m-Q4_K_M.gguf"),
    };
    path.is_file().then_some(path)
}

/// A directory under the system temp dir, removed on drop (for tests).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory named after `tag`, the process id and a counter.
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("exo-{tag}-{}-{n}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
        }
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_shim::llama::{OracleModel, Vocab};

    const PROMPT: &str = "hello world, tell me a story about the cat and the dog. once upon a time there was a red cat on the blue mat. what is it?";

    struct Run {
        prompt: Vec<i32>,
        last_logits: Vec<f32>,
        greedy: Vec<i32>,
    }

    fn run(path: &Path) -> Run {
        let model = OracleModel::load(path, 1).unwrap();
        let vocab = model.vocab().unwrap();
        let prompt = vocab.tokenize(PROMPT, true, true).unwrap();
        let mut ctx = model.context(128, 64, 1).unwrap();
        let rows = ctx.prompt_logits(&prompt).unwrap();
        let last_logits = rows.last().unwrap().clone();
        let greedy = ctx.greedy_generate(&prompt, 16).unwrap();
        Run {
            prompt,
            last_logits,
            greedy,
        }
    }

    fn check_healthy(what: &str, r: &Run, n_vocab: usize) {
        assert_eq!(r.last_logits.len(), n_vocab, "{what}");
        assert!(
            r.last_logits.iter().all(|v| v.is_finite()),
            "{what}: non-finite logits"
        );
        let (lo, hi) = r
            .last_logits
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(hi - lo > 1.0, "{what}: flat logits [{lo}, {hi}]");
        let mut distinct = r.greedy.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 3,
            "{what}: degenerate greedy output {:?}",
            r.greedy
        );
    }

    #[test]
    fn vocab_layout() {
        let v = tiny_vocab();
        assert_eq!(v.tokens.len(), v.scores.len());
        assert_eq!(v.tokens.len(), v.types.len());
        assert_eq!(v.id("<unk>"), Some(tokens::UNK));
        assert_eq!(v.id("<s>"), Some(tokens::BOS));
        assert_eq!(v.id("</s>"), Some(tokens::EOS));
        assert_eq!(v.id("<0x00>"), Some(tokens::BYTE_0));
        assert_eq!(v.id("<0xFF>"), Some(tokens::BYTE_0 + 255));
        assert_eq!(v.id("<start_of_turn>"), Some(tokens::START_OF_TURN));
        assert_eq!(v.id("<end_of_turn>"), Some(tokens::END_OF_TURN));
        let mut sorted = v.tokens.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), v.len(), "duplicate tokens");
        assert!(v.id("▁the").is_some() && v.id("hello").is_some() && v.id("▁hello").is_some());
        assert!(v.len() > 259 + 60, "{} tokens", v.len());
    }

    #[test]
    fn deterministic_per_seed() {
        let dir = TempDir::new("fixture-seed").unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        let mut spec = TinySpec::new(TinyArch::Qwen3);
        spec.n_layer = 2;
        write_tiny_model(&a, &spec).unwrap();
        write_tiny_model(&b, &spec).unwrap();
        spec.seed += 1;
        write_tiny_model(&c, &spec).unwrap();
        let (a, b, c) = (
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            std::fs::read(c).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), c.len());
        assert_ne!(a, c);
    }

    #[test]
    fn rejects_bad_specs() {
        let dir = TempDir::new("fixture-bad").unwrap();
        let p = dir.path().join("m.gguf");
        let mut s = TinySpec::new(TinyArch::Llama);
        s.weight_type = WriterType::Q4_K;
        assert!(matches!(
            write_tiny_model(&p, &s),
            Err(FixtureError::Spec(_))
        ));
        let mut s = TinySpec::new(TinyArch::Llama);
        s.n_head_kv = 3;
        assert!(matches!(
            write_tiny_model(&p, &s),
            Err(FixtureError::Spec(_))
        ));
        let mut s = TinySpec::new(TinyArch::Qwen2);
        s.head_dim = Some(32);
        assert!(matches!(
            write_tiny_model(&p, &s),
            Err(FixtureError::Spec(_))
        ));
        assert!(!p.exists());
        let e = write_tiny_model(Path::new("/nonexistent-dir/m.gguf"), &TinySpec::default());
        assert!(
            matches!(e, Err(FixtureError::Writer(WriterError::Io { .. }))),
            "{e:?}"
        );
    }

    #[test]
    fn swa_layers_follow_llama_cpp() {
        let s = TinySpec::new(TinyArch::Gemma3);
        let swa: Vec<bool> = (0..6).map(|il| s.is_swa_layer(il)).collect();
        assert_eq!(swa, [true, true, true, true, true, false]);
        assert!(!TinySpec::new(TinyArch::Llama).is_swa_layer(0));
    }

    #[test]
    fn real_model_path_points_at_a_file() {
        if let Some(p) = real_model_path() {
            assert!(p.is_file());
        }
    }

    /// Every architecture loads, tokenizes into word pieces, decodes and generates varied text.
    #[test]
    fn llama_cpp_runs_every_arch() {
        let dir = TempDir::new("fixture-archs").unwrap();
        for arch in TinyArch::ALL {
            let path = dir.path().join(format!("{}.gguf", arch.name()));
            let spec = TinySpec::new(arch);
            write_tiny_model(&path, &spec).unwrap();
            let vocab = Vocab::load(&path).unwrap();
            assert_eq!(vocab.n_tokens() as usize, tiny_vocab().len());
            assert_eq!(vocab.bos(), Some(tokens::BOS));
            assert_eq!(vocab.eos(), Some(tokens::EOS));
            assert_eq!(vocab.eot(), Some(tokens::END_OF_TURN));
            assert_eq!(vocab.chat_template().as_deref(), Some(TINY_CHAT_TEMPLATE));
            let turn = vocab
                .tokenize("<start_of_turn>user\nhi<end_of_turn>", false, true)
                .unwrap();
            assert_eq!(
                turn.first(),
                Some(&tokens::START_OF_TURN),
                "{arch:?}: {turn:?}"
            );
            assert_eq!(
                turn.last(),
                Some(&tokens::END_OF_TURN),
                "{arch:?}: {turn:?}"
            );

            let r = run(&path);
            assert_eq!(r.prompt[0], tokens::BOS);
            let bytes = r
                .prompt
                .iter()
                .filter(|&&t| (tokens::BYTE_0..tokens::BYTE_0 + 256).contains(&t))
                .count();
            assert!(
                bytes <= 2,
                "{arch:?}: {bytes} byte tokens in {:?}",
                r.prompt
            );
            assert!(
                r.prompt.len() < PROMPT.len() / 2,
                "{arch:?}: {} tokens",
                r.prompt.len()
            );
            assert!(
                r.prompt.len() > 30,
                "{arch:?}: prompt of {} tokens should exceed the window",
                r.prompt.len()
            );
            check_healthy(arch.name(), &r, vocab.n_tokens() as usize);
            eprintln!(
                "{arch:?}: prompt {} tokens, greedy {:?}",
                r.prompt.len(),
                r.greedy
            );
        }
    }

    fn check_weight_types(tag: &str, cases: &[(TinyArch, WriterType)]) {
        let dir = TempDir::new(tag).unwrap();
        for &(arch, ty) in cases {
            let path = dir
                .path()
                .join(format!("{}-{}.gguf", arch.name(), ty.name()));
            let mut spec = TinySpec::new(arch);
            spec.weight_type = ty;
            write_tiny_model(&path, &spec).unwrap();
            check_healthy(&format!("{arch:?}/{ty:?}"), &run(&path), tiny_vocab().len());
        }
    }

    /// Half-precision weights load in llama.cpp and stay healthy.
    #[test]
    fn llama_cpp_runs_float_weight_types() {
        check_weight_types(
            "fixture-floats",
            &[
                (TinyArch::Llama, WriterType::F16),
                (TinyArch::Qwen2, WriterType::BF16),
                (TinyArch::Qwen3, WriterType::F16),
                (TinyArch::Gemma3, WriterType::BF16),
            ],
        );
    }

    /// Quantized weights load in llama.cpp and stay healthy. (ggml is built without its
    /// AMX path, which segfaults on quantized weights: see `.cargo/config.toml`.)
    #[test]
    fn llama_cpp_runs_quantized_weight_types() {
        check_weight_types(
            "fixture-quants",
            &[
                (TinyArch::Llama, WriterType::Q8_0),
                (TinyArch::Qwen2, WriterType::Q8_0),
                (TinyArch::Qwen3, WriterType::Q4_0),
                (TinyArch::Gemma3, WriterType::Q8_0),
                (TinyArch::Gemma3, WriterType::Q4_0),
            ],
        );
        // k-quants need 256-wide rows.
        let dir = TempDir::new("fixture-kquant").unwrap();
        let path = dir.path().join("llama-q4k.gguf");
        let mut spec = TinySpec::new(TinyArch::Llama);
        spec.n_layer = 2;
        spec.n_embd = 256;
        spec.n_ff = 512;
        spec.weight_type = WriterType::Q4_K;
        spec.embd_type = Some(WriterType::Q8_0);
        write_tiny_model(&path, &spec).unwrap();
        check_healthy("llama/Q4_K", &run(&path), tiny_vocab().len());
    }

    /// exo's own GGUF reader sees exactly the documented keys and tensors.
    #[test]
    fn gguf_reader_sees_layout() {
        use ggml_shim::gguf::{Gguf, Value};
        let dir = TempDir::new("fixture-layout").unwrap();
        for arch in TinyArch::ALL {
            let mut spec = TinySpec::new(arch);
            spec.weight_type = WriterType::Q8_0;
            spec.rope_scaling_linear = Some(2.0);
            let path = dir.path().join(format!("{}.gguf", arch.name()));
            write_tiny_model(&path, &spec).unwrap();
            let g = Gguf::open(&path).unwrap();
            let a = arch.name();
            let u = |k: &str| g.get(&format!("{a}.{k}")).and_then(|v| v.as_u64());
            let fl = |k: &str| g.get(&format!("{a}.{k}")).and_then(|v| v.as_f64());
            assert_eq!(g.get("general.architecture"), Some(Value::Str(a.into())));
            assert_eq!(u("context_length"), Some(512));
            assert_eq!(u("embedding_length"), Some(64));
            assert_eq!(u("block_count"), Some(6));
            assert_eq!(u("feed_forward_length"), Some(128));
            assert_eq!(u("attention.head_count"), Some(4));
            assert_eq!(u("attention.head_count_kv"), Some(2));
            let hd = if arch == TinyArch::Gemma3 { 32 } else { 16 };
            assert_eq!(u("attention.key_length"), Some(hd));
            assert_eq!(u("attention.value_length"), Some(hd));
            assert_eq!(u("rope.dimension_count"), Some(hd));
            assert!(fl("attention.layer_norm_rms_epsilon").is_some());
            assert!(fl("rope.freq_base").is_some());
            assert_eq!(fl("rope.scaling.factor"), Some(2.0));
            assert_eq!(
                g.get(&format!("{a}.rope.scaling.type")),
                Some(Value::Str("linear".into()))
            );
            let gemma = arch == TinyArch::Gemma3;
            assert_eq!(u("attention.sliding_window"), gemma.then_some(8));
            assert_eq!(
                g.get("tokenizer.ggml.model"),
                Some(Value::Str("llama".into()))
            );
            let vocab = tiny_vocab();
            assert_eq!(
                g.get("tokenizer.ggml.tokens"),
                Some(Value::ArrStr(vocab.tokens.clone()))
            );
            assert_eq!(
                g.get("tokenizer.ggml.scores"),
                Some(Value::ArrF32(vocab.scores.clone()))
            );
            assert_eq!(
                g.get("tokenizer.ggml.token_type"),
                Some(Value::ArrI32(vocab.types.clone()))
            );
            assert_eq!(
                g.get("tokenizer.ggml.add_space_prefix"),
                Some(Value::Bool(!gemma))
            );
            assert_eq!(
                g.get("tokenizer.chat_template"),
                Some(Value::Str(TINY_CHAT_TEMPLATE.into()))
            );
            let want = tiny_tensors(&spec);
            assert_eq!(g.tensors().len(), want.len(), "{arch:?}");
            for (t, info) in want.iter().zip(g.tensors()) {
                assert_eq!(info.name, t.name);
                assert_eq!(info.shape, t.shape, "{}", t.name);
                assert_eq!(info.dtype.raw(), t.ty.to_ggml(), "{}", t.name);
            }
        }
    }

    /// The optional keys change what llama.cpp computes, so they are read.
    #[test]
    fn llama_cpp_reads_optional_keys() {
        let dir = TempDir::new("fixture-keys").unwrap();
        let logits = |name: &str, spec: &TinySpec| {
            let path = dir.path().join(name);
            write_tiny_model(&path, spec).unwrap();
            run(&path).last_logits
        };
        let differs = |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3);

        // Sliding window: 8 vs. wider than the prompt.
        let gemma = TinySpec::new(TinyArch::Gemma3);
        let base = logits("g-base.gguf", &gemma);
        let mut wide = gemma.clone();
        wide.sliding_window = Some(512);
        assert!(
            differs(&base, &logits("g-wide.gguf", &wide)),
            "sliding_window ignored"
        );
        // SWA rope base, written explicitly at llama.cpp's default: no change; otherwise a change.
        let mut swa_base = gemma.clone();
        swa_base.rope_freq_base_swa = Some(10_000.0);
        assert!(!differs(&base, &logits("g-swa10k.gguf", &swa_base)));
        swa_base.rope_freq_base_swa = Some(100.0);
        assert!(
            differs(&base, &logits("g-swa100.gguf", &swa_base)),
            "freq_base_swa ignored"
        );
        // Pattern 6 written explicitly equals the default; pattern 2 changes the layers.
        let mut pat = gemma.clone();
        pat.swa_pattern = Some(6);
        assert!(!differs(&base, &logits("g-p6.gguf", &pat)));
        pat.swa_pattern = Some(2);
        assert!(
            differs(&base, &logits("g-p2.gguf", &pat)),
            "sliding_window_pattern ignored"
        );

        // Linear rope scaling on llama.
        let llama = TinySpec::new(TinyArch::Llama);
        let base = logits("l-base.gguf", &llama);
        let mut scaled = llama.clone();
        scaled.rope_scaling_linear = Some(4.0);
        assert!(
            differs(&base, &logits("l-scaled.gguf", &scaled)),
            "rope scaling ignored"
        );
    }
}
