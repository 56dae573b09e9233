//! Which tensors a stage needs, checked against the GGUF tensor table, and loading
//! exactly those (a node never reads another stage's weights).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use ggml_shim::{Placement, Tensor, TensorInfo, TensorSpec, TensorStore};

use super::{Arch, HParams, LayerRange, ModelError, ModelFile};

/// The GGUF name of the `lm_head` when it is tied to the token embedding.
pub const TIED_HEAD: &str = "output.weight";

/// One tensor a stage loads.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Name inside the stage's store.
    pub name: String,
    /// Where its bytes come from in the file.
    pub source: TensorInfo,
    pub placement: Placement,
    /// Layer index, or None for embedding / output tensors.
    pub layer: Option<usize>,
    /// Only these rows (of the last dimension) are loaded: a share of the `lm_head`.
    pub rows: Option<Range<usize>>,
}

impl PlannedTensor {
    /// The bytes of the model file this tensor is read from.
    pub fn file_range(&self) -> std::ops::Range<u64> {
        let (_, offset, size) = self.loaded();
        offset..offset + size
    }

    /// The shape of the loaded tensor and the byte range it is read from.
    fn loaded(&self) -> (Vec<usize>, u64, u64) {
        let shape = &self.source.shape;
        match (&self.rows, shape.last()) {
            (Some(r), Some(&n)) if n > 0 => {
                let row_bytes = self.source.size / n as u64;
                let mut sh = shape.clone();
                if let Some(l) = sh.last_mut() {
                    *l = r.len();
                }
                (
                    sh,
                    self.source.offset + r.start as u64 * row_bytes,
                    r.len() as u64 * row_bytes,
                )
            }
            _ => (shape.clone(), self.source.offset, self.source.size),
        }
    }
}

/// Which rows (vocabulary entries) of the `lm_head` a stage holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LmHeadShare {
    /// No head (a stage that does not end the model and computes no logits).
    None,
    /// The whole head (the last stage of an unsplit pipeline).
    All,
    /// Rows `r` only: the head's vocabulary is split between stages.
    Rows(Range<usize>),
}

/// A tensor the stage needs (or may use, when not `required`).
struct Want {
    name: String,
    shape: Vec<usize>,
    required: bool,
    placement: Placement,
    layer: Option<usize>,
}

/// Lists and validates the tensors for layers `range` (plus the embedding when
/// `first`, the final norm when `last`, and the share `head` of the `lm_head`).
pub fn plan(
    mf: &ModelFile,
    range: LayerRange,
    first: bool,
    last: bool,
    head: &LmHeadShare,
) -> Result<Vec<PlannedTensor>, ModelError> {
    let hp = &mf.hparams;
    range.validate(hp.n_layer)?;
    let lm_head_rows = lm_head_rows_of(hp, head)?;
    let (e, v) = (hp.n_embd, hp.n_vocab);
    if mf.gguf.tensor("blk.0.attn_qkv.weight").is_some() {
        return Err(ModelError::BadKey {
            key: "blk.0.attn_qkv.weight".into(),
            why: "fused QKV weights are not supported".into(),
        });
    }
    let wants = wanted(hp, range, first, last, lm_head_rows.is_some());

    let mut out = Vec::new();
    for w in wants {
        let Some(info) = mf.gguf.tensor(&w.name) else {
            if w.required {
                return Err(ModelError::MissingTensor(w.name));
            }
            continue;
        };
        check(info, &w.name, &w.shape)?;
        let rows = (w.name == "output.bias")
            .then(|| lm_head_rows.clone())
            .flatten();
        out.push(PlannedTensor {
            name: w.name,
            source: info.clone(),
            placement: w.placement,
            layer: w.layer,
            rows: rows.filter(|r| r.len() != v),
        });
    }
    if let Some(rows) = lm_head_rows {
        let Some(info) = mf.head_tensor() else {
            return Err(ModelError::MissingTensor("token_embd.weight".into()));
        };
        check(info, &info.name, &[e, v])?;
        out.push(PlannedTensor {
            name: TIED_HEAD.into(),
            source: info.clone(),
            placement: Placement::MatmulWeight,
            layer: None,
            rows: (rows.len() != v).then_some(rows),
        });
    }
    Ok(out)
}

/// The rows of the `lm_head` a stage with share `head` holds.
fn lm_head_rows_of(hp: &HParams, head: &LmHeadShare) -> Result<Option<Range<usize>>, ModelError> {
    Ok(match head {
        LmHeadShare::None => None,
        LmHeadShare::All => Some(0..hp.n_vocab),
        LmHeadShare::Rows(r) => {
            if r.start >= r.end || r.end > hp.n_vocab {
                return Err(ModelError::BadKey {
                    key: "output.weight".into(),
                    why: format!(
                        "lm_head rows {}..{} are not inside the vocabulary of {}",
                        r.start, r.end, hp.n_vocab
                    ),
                });
            }
            Some(r.clone())
        }
    })
}

/// The tensors of layers `range` (and of the ends of the model a stage holds), by
/// architecture, with their expected shapes.
fn wanted(hp: &HParams, range: LayerRange, first: bool, last: bool, lm_head: bool) -> Vec<Want> {
    let (e, v, f, d) = (hp.n_embd, hp.n_vocab, hp.n_ff, hp.head_dim_k);
    let (nq, nkv) = (hp.n_embd_q(), hp.n_embd_kv());
    let arch = &hp.arch;
    let mut wants: Vec<Want> = Vec::new();
    let mut want = |name: String,
                    shape: Vec<usize>,
                    required: bool,
                    placement: Placement,
                    layer: Option<usize>| {
        wants.push(Want {
            name,
            shape,
            required,
            placement,
            layer,
        });
    };
    use Placement::{MatmulWeight as M, Plain as P};
    if first {
        want("token_embd.weight".into(), vec![e, v], true, P, None);
    }
    for il in range.start..range.end {
        let b = |s: &str| format!("blk.{il}.{s}");
        let l = Some(il);
        want(b("attn_norm.weight"), vec![e], true, P, l);
        want(b("attn_q.weight"), vec![e, nq], true, M, l);
        want(b("attn_k.weight"), vec![e, nkv], true, M, l);
        want(b("attn_v.weight"), vec![e, nkv], true, M, l);
        want(b("attn_output.weight"), vec![nq, e], true, M, l);
        want(b("attn_q.bias"), vec![nq], false, P, l);
        want(b("attn_k.bias"), vec![nkv], false, P, l);
        want(b("attn_v.bias"), vec![nkv], false, P, l);
        want(b("attn_output.bias"), vec![e], false, P, l);
        want(b("ffn_norm.weight"), vec![e], true, P, l);
        want(b("ffn_gate.weight"), vec![e, f], true, M, l);
        want(b("ffn_up.weight"), vec![e, f], true, M, l);
        want(b("ffn_down.weight"), vec![f, e], true, M, l);
        if *arch == Arch::Llama {
            want(b("ffn_gate.bias"), vec![f], false, P, l);
            want(b("ffn_up.bias"), vec![f], false, P, l);
            want(b("ffn_down.bias"), vec![e], false, P, l);
        }
        if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
            want(b("attn_q_norm.weight"), vec![d], true, P, l);
            want(b("attn_k_norm.weight"), vec![d], true, P, l);
        }
        if *arch == Arch::Gemma3 {
            want(b("post_attention_norm.weight"), vec![e], true, P, l);
            want(b("post_ffw_norm.weight"), vec![e], true, P, l);
        }
    }
    if *arch == Arch::Llama {
        want(
            "rope_freqs.weight".into(),
            vec![hp.n_rot / 2],
            false,
            P,
            None,
        );
    }
    if last {
        want("output_norm.weight".into(), vec![e], true, P, None);
    }
    if lm_head && *arch == Arch::Qwen2 {
        want("output.bias".into(), vec![v], false, P, None);
    }
    wants
}

fn check(info: &TensorInfo, name: &str, want: &[usize]) -> Result<(), ModelError> {
    if info.shape != want {
        return Err(ModelError::BadShape {
            name: name.into(),
            got: info.shape.clone(),
            want: want.to_vec(),
        });
    }
    if !info.dtype.is_supported_weight() {
        return Err(ModelError::UnsupportedType {
            name: name.into(),
            dtype: info.dtype.name(),
        });
    }
    let bs = info.dtype.block_size();
    if bs == 0 || !info.shape[0].is_multiple_of(bs) {
        return Err(ModelError::BadShape {
            name: name.into(),
            got: info.shape.clone(),
            want: want.to_vec(),
        });
    }
    Ok(())
}

/// The weights of one stage, loaded into ggml buffers.
pub struct StageWeights {
    store: TensorStore,
    /// When the tied head shares the embedding's memory, the head name maps to it.
    head_alias: Option<String>,
    /// The vocabulary rows of the head this stage computes, if any.
    lm_head_rows: Option<Range<usize>>,
    /// The rows it could compute: its own, or every row of a tied head that is a
    /// view of the embedding table.
    lm_head_reach: Option<Range<usize>>,
    bytes: u64,
}

impl StageWeights {
    pub fn load(
        mf: &ModelFile,
        range: LayerRange,
        first: bool,
        last: bool,
        head: &LmHeadShare,
        allow_repack: bool,
    ) -> Result<StageWeights, ModelError> {
        let planned = plan(mf, range, first, last, head)?;
        let lm_head_rows = match head {
            LmHeadShare::None => None,
            LmHeadShare::All => Some(0..mf.hparams.n_vocab),
            LmHeadShare::Rows(r) => Some(r.clone()),
        };
        // A tied head that would not be repacked shares the embedding tensor.
        let mut head_alias = None;
        let mut specs = Vec::new();
        for p in &planned {
            let (shape, _, _) = p.loaded();
            let spec = TensorSpec {
                name: p.name.clone(),
                dtype: p.source.dtype,
                ne: shape.iter().map(|&d| d as i64).collect(),
                placement: p.placement,
            };
            // The alias is the whole table: the graph takes a view of the head's rows.
            let whole = TensorSpec {
                ne: p.source.shape.iter().map(|&d| d as i64).collect(),
                ..spec.clone()
            };
            if p.name == TIED_HEAD
                && p.source.name == "token_embd.weight"
                && first
                && !(allow_repack && ggml_shim::backend::repack_supported(&whole))
            {
                head_alias = Some("token_embd.weight".to_string());
                continue;
            }
            specs.push(spec);
        }
        let mut store = TensorStore::new(&specs, allow_repack)?;
        let file = File::open(mf.gguf.path()).map_err(|error| ModelError::Read {
            name: "(open)".into(),
            path: mf.gguf.path().display().to_string(),
            error,
        })?;
        let mut buf = Vec::new();
        let mut bytes = 0u64;
        for p in &planned {
            if p.name == TIED_HEAD && head_alias.is_some() {
                continue;
            }
            let (_, offset, size) = p.loaded();
            buf.resize(size as usize, 0);
            file.read_exact_at(&mut buf, offset)
                .map_err(|error| ModelError::Read {
                    name: p.source.name.clone(),
                    path: mf.gguf.path().display().to_string(),
                    error,
                })?;
            store.set(&p.name, &buf)?;
            bytes += size;
        }
        // With the whole embedding table at hand, any rows of a tied head are in reach.
        // (A bias, loaded for the stage's own rows only, keeps it to those.)
        let has_bias = planned.iter().any(|p| p.name == "output.bias");
        let lm_head_reach = match head_alias {
            Some(_) if !has_bias => lm_head_rows.as_ref().map(|_| 0..mf.hparams.n_vocab),
            _ => lm_head_rows.clone(),
        };
        Ok(StageWeights {
            store,
            head_alias,
            lm_head_rows,
            lm_head_reach,
            bytes,
        })
    }

    /// The vocabulary rows of the `lm_head` this stage computes.
    pub fn lm_head_rows(&self) -> Option<Range<usize>> {
        self.lm_head_rows.clone()
    }

    /// The vocabulary rows of the head this stage can compute on request: its own
    /// rows, or, when its head is a view of the whole embedding table, all of them.
    pub fn lm_head_reach(&self) -> Option<Range<usize>> {
        self.lm_head_reach.clone()
    }

    /// The vocabulary row that the stored head tensor (and `output.bias`) starts at.
    pub fn lm_head_base(&self) -> usize {
        match (&self.head_alias, &self.lm_head_rows) {
            (None, Some(r)) => r.start,
            _ => 0,
        }
    }

    /// A weight by its GGUF name.
    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        if name == TIED_HEAD {
            if let Some(a) = &self.head_alias {
                return self.store.get(a);
            }
        }
        self.store.get(name)
    }

    /// Bytes of weights read from the file.
    pub fn file_bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of the ggml buffers holding them.
    pub fn buffer_bytes(&self) -> usize {
        self.store.size_bytes()
    }
}
