//! Hyper-parameters read from GGUF metadata, with a clear error for anything
//! missing or unsupported.

use ggml_shim::{Gguf, Value};

use super::{Arch, ModelError};

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    Linear,
    Yarn,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HParams {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub n_rot: usize,
    pub rms_eps: f32,
    pub rope_freq_base: f32,
    pub rope_freq_scale: f32,
    pub rope_scaling: RopeScaling,
    pub rope_attn_factor: f32,
    pub n_ctx_orig: usize,
    /// Sliding-window size for SWA layers (0 = none).
    pub n_swa: usize,
    /// Which layers use the sliding window.
    pub swa_layers: Vec<bool>,
    pub rope_freq_base_swa: f32,
    pub final_logit_softcap: f32,
}

impl HParams {
    pub fn from_gguf(g: &Gguf) -> Result<HParams, ModelError> {
        let (arch, arch_name) = arch_of(g)?;
        let a = arch_name.as_str();
        let k = |s: &str| format!("{a}.{s}");

        let n_embd = req_usize(g, &k("embedding_length"))?;
        let n_layer = req_usize(g, &k("block_count"))?;
        let n_ff = req_usize(g, &k("feed_forward_length"))?;
        let n_head = req_usize(g, &k("attention.head_count"))?;
        let n_head_kv = opt_usize(g, &k("attention.head_count_kv"))?.unwrap_or(n_head);
        let n_ctx_train = req_usize(g, &k("context_length"))?;
        let rms_eps = req_f32(g, &k("attention.layer_norm_rms_epsilon"))?;
        for (name, v) in [
            ("embedding_length", n_embd),
            ("block_count", n_layer),
            ("feed_forward_length", n_ff),
            ("attention.head_count", n_head),
            ("attention.head_count_kv", n_head_kv),
            ("context_length", n_ctx_train),
        ] {
            if v == 0 {
                return Err(ModelError::BadKey {
                    key: k(name),
                    why: "must be positive".into(),
                });
            }
        }
        // Bounds before anything is sized by them: every layer has tensors, so a model
        // cannot have more layers than tensors (4294967295 layers grew to 6 GB before).
        if n_layer > g.tensors().len() {
            return Err(ModelError::BadKey {
                key: k("block_count"),
                why: format!(
                    "{n_layer} layers, but the file has {} tensors",
                    g.tensors().len()
                ),
            });
        }
        for (name, v, max) in [
            ("embedding_length", n_embd, 1 << 20),
            ("feed_forward_length", n_ff, 1 << 22),
            ("attention.head_count", n_head, 1 << 12),
            ("context_length", n_ctx_train, 1 << 24),
        ] {
            if v > max {
                return Err(ModelError::BadKey {
                    key: k(name),
                    why: format!("{v} is more than {max}"),
                });
            }
        }
        // ggml asserts eps >= 0 (an abort); NaN and infinity make every output NaN
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(ModelError::BadKey {
                key: k("attention.layer_norm_rms_epsilon"),
                why: format!("{rms_eps} is not a finite number of at least 0"),
            });
        }
        if n_head % n_head_kv != 0 {
            return Err(ModelError::BadKey {
                key: k("attention.head_count_kv"),
                why: format!("{n_head} heads are not a multiple of {n_head_kv} KV heads"),
            });
        }
        let head_dim_k = opt_usize(g, &k("attention.key_length"))?.unwrap_or(n_embd / n_head);
        let head_dim_v = opt_usize(g, &k("attention.value_length"))?.unwrap_or(n_embd / n_head);
        if head_dim_k != head_dim_v || head_dim_k == 0 || head_dim_k % 2 != 0 {
            return Err(ModelError::BadKey {
                key: k("attention.key_length"),
                why: format!("unsupported head sizes k={head_dim_k} v={head_dim_v}"),
            });
        }
        let n_rot = opt_usize(g, &k("rope.dimension_count"))?.unwrap_or(head_dim_k);
        if n_rot == 0 || n_rot > head_dim_k || n_rot % 2 != 0 {
            return Err(ModelError::BadKey {
                key: k("rope.dimension_count"),
                why: format!("{n_rot} does not fit head size {head_dim_k}"),
            });
        }
        let n_vocab = match g.array_len("tokenizer.ggml.tokens") {
            Some(n) => n,
            None => match opt_usize(g, &k("vocab_size"))? {
                Some(v) => v,
                None => return Err(ModelError::MissingKey("tokenizer.ggml.tokens".into())),
            },
        };

        let rope = Rope::of(g, &k, n_ctx_train)?;
        let (mut n_swa, mut swa_layers) = (0, vec![false; n_layer]);
        let (mut rope_freq_base_swa, mut final_logit_softcap) = (10000.0, 0.0);
        if arch == Arch::Gemma3 {
            (n_swa, swa_layers, rope_freq_base_swa) = gemma3_sliding_window(g, &k, n_layer)?;
            final_logit_softcap = opt_f32(g, &k("final_logit_softcapping"))?.unwrap_or(0.0);
        }

        Ok(HParams {
            arch,
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_rot,
            rms_eps,
            rope_freq_base: rope.freq_base,
            rope_freq_scale: rope.freq_scale,
            rope_scaling: rope.scaling,
            rope_attn_factor: rope.attn_factor,
            n_ctx_orig: rope.n_ctx_orig,
            n_swa,
            swa_layers,
            rope_freq_base_swa,
            final_logit_softcap,
        })
    }

    pub fn n_embd_q(&self) -> usize {
        self.head_dim_k * self.n_head
    }

    pub fn n_embd_kv(&self) -> usize {
        self.head_dim_k * self.n_head_kv
    }
}

/// The architecture named by `general.architecture`, and the name (the prefix of
/// the other keys).
fn arch_of(g: &Gguf) -> Result<(Arch, String), ModelError> {
    let arch_name = match g.get("general.architecture") {
        Some(Value::Str(s)) => s,
        Some(v) => {
            return Err(ModelError::BadKey {
                key: "general.architecture".into(),
                why: format!("expected a string, found {}", v.type_name()),
            })
        }
        None => return Err(ModelError::MissingKey("general.architecture".into())),
    };
    let arch = Arch::from_name(&arch_name)
        .ok_or_else(|| ModelError::UnsupportedArch(arch_name.clone()))?;
    Ok((arch, arch_name))
}

/// RoPE settings: frequency base and scaling.
struct Rope {
    freq_base: f32,
    freq_scale: f32,
    scaling: RopeScaling,
    attn_factor: f32,
    n_ctx_orig: usize,
}

impl Rope {
    fn of(g: &Gguf, k: &dyn Fn(&str) -> String, n_ctx_train: usize) -> Result<Rope, ModelError> {
        let rope_freq_base = opt_f32(g, &k("rope.freq_base"))?.unwrap_or(10000.0);
        let scaling_name = match g.get(&k("rope.scaling.type")) {
            Some(Value::Str(s)) => s,
            Some(v) => {
                return Err(ModelError::BadKey {
                    key: k("rope.scaling.type"),
                    why: format!("expected a string, found {}", v.type_name()),
                })
            }
            None => "linear".into(),
        };
        let rope_scaling = match scaling_name.as_str() {
            "none" => RopeScaling::None,
            "linear" => RopeScaling::Linear,
            "yarn" => RopeScaling::Yarn,
            other => {
                return Err(ModelError::BadKey {
                    key: k("rope.scaling.type"),
                    why: format!("unsupported rope scaling '{other}'"),
                })
            }
        };
        let factor = match opt_f32(g, &k("rope.scaling.factor"))? {
            Some(f) => f,
            None => opt_f32(g, &k("rope.scale_linear"))?.unwrap_or(0.0),
        };
        let mut rope_freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
        if rope_scaling == RopeScaling::None {
            rope_freq_scale = 1.0;
        }
        if rope_scaling == RopeScaling::Yarn
            && opt_f32(g, &k("rope.scaling.yarn_log_multiplier"))?.is_some_and(|v| v != 0.0)
        {
            return Err(ModelError::BadKey {
                key: k("rope.scaling.yarn_log_multiplier"),
                why: "YaRN log multiplier is not supported".into(),
            });
        }
        let rope_attn_factor = opt_f32(g, &k("rope.scaling.attn_factor"))?.unwrap_or(1.0);
        let n_ctx_orig =
            opt_usize(g, &k("rope.scaling.original_context_length"))?.unwrap_or(n_ctx_train);
        Ok(Rope {
            freq_base: rope_freq_base,
            freq_scale: rope_freq_scale,
            scaling: rope_scaling,
            attn_factor: rope_attn_factor,
            n_ctx_orig,
        })
    }
}

/// Gemma 3's sliding window: its size, which layers use it, and their RoPE base.
fn gemma3_sliding_window(
    g: &Gguf,
    k: &dyn Fn(&str) -> String,
    n_layer: usize,
) -> Result<(usize, Vec<bool>, f32), ModelError> {
    let mut swa_layers = vec![false; n_layer];
    let n_swa = opt_usize(g, &k("attention.sliding_window"))?.unwrap_or(0);
    if n_swa == 0 {
        return Ok((0, swa_layers, 10000.0));
    }
    match g.get(&k("attention.sliding_window_pattern")) {
        Some(Value::ArrOther(_)) | Some(Value::ArrI32(_)) | Some(Value::ArrU32(_)) => {
            return Err(ModelError::BadKey {
                key: k("attention.sliding_window_pattern"),
                why: "per-layer pattern arrays are not supported".into(),
            });
        }
        _ => {}
    }
    let pattern = opt_usize(g, &k("attention.sliding_window_pattern"))?.unwrap_or(6);
    for (il, s) in swa_layers.iter_mut().enumerate() {
        *s = pattern == 0 || il % pattern < pattern - 1;
    }
    let base = opt_f32(g, &k("rope.freq_base_swa"))?.unwrap_or(10000.0);
    Ok((n_swa, swa_layers, base))
}

fn req_usize(g: &Gguf, key: &str) -> Result<usize, ModelError> {
    opt_usize(g, key)?.ok_or_else(|| ModelError::MissingKey(key.into()))
}

fn opt_usize(g: &Gguf, key: &str) -> Result<Option<usize>, ModelError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= u32::MAX as u64 => Ok(Some(n as usize)),
            _ => Err(ModelError::BadKey {
                key: key.into(),
                why: format!("expected a non-negative integer, found {}", v.type_name()),
            }),
        },
    }
}

fn req_f32(g: &Gguf, key: &str) -> Result<f32, ModelError> {
    opt_f32(g, key)?.ok_or_else(|| ModelError::MissingKey(key.into()))
}

fn opt_f32(g: &Gguf, key: &str) -> Result<Option<f32>, ModelError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(f) if f.is_finite() => Ok(Some(f as f32)),
            _ => Err(ModelError::BadKey {
                key: key.into(),
                why: format!("expected a number, found {}", v.type_name()),
            }),
        },
    }
}
