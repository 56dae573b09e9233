//! The building blocks every architecture file shares: stage inputs, the KV cache,
//! attention over several sequences in one batch, norms and the `lm_head`.
//!
//! A step's graph depends only on its *shape* (which slots, how many tokens, which
//! rows give output, how far each sequence's padded attention window reaches), never
//! on token ids or positions: those arrive through named input tensors, and the KV
//! cache is written through row indices. So consecutive decode steps reuse one graph,
//! as llama.cpp does, and skip building and allocating it.

use std::ops::Range;

use ggml_shim::{DType, GraphBuilder, Placement, RopeParams, Tensor, TensorSpec, TensorStore};

use super::hparams::{HParams, RopeScaling};
use super::weights::{StageWeights, TIED_HEAD};
use super::{LayerRange, ModelError};

/// Attention windows are padded to this many positions (masked), so the graph of a
/// decoding sequence changes only every `KV_PAD` tokens.
pub const KV_PAD: usize = 256;

/// Which rows of a sequence's chunk produce output (logits on the last stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputRows {
    None,
    Last,
    All,
}

impl OutputRows {
    /// Output rows of a chunk of `n_tokens` tokens.
    pub fn count(self, n_tokens: usize) -> usize {
        match self {
            OutputRows::None => 0,
            OutputRows::Last => 1,
            OutputRows::All => n_tokens,
        }
    }
}

/// One sequence's part of a batch: `n_tokens` new tokens at positions `pos0..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSeq {
    /// KV cache slot of the sequence.
    pub slot: usize,
    pub pos0: usize,
    pub n_tokens: usize,
    pub output: OutputRows,
}

impl BatchSeq {
    /// Rows of this sequence that produce output.
    pub fn output_rows(&self) -> usize {
        self.output.count(self.n_tokens)
    }

    /// Output rows of a batch (each sequence's, summed).
    pub fn output_rows_of(seqs: &[BatchSeq]) -> usize {
        seqs.iter().map(BatchSeq::output_rows).sum()
    }
}

/// Per-layer F16 key/value caches for `n_slots` sequences of `n_ctx` positions each
/// (allocated rounded up to `KV_PAD`).
pub struct KvCache {
    store: TensorStore,
    range: LayerRange,
    pub n_ctx: usize,
    n_ctx_alloc: usize,
    pub n_slots: usize,
}

impl KvCache {
    pub fn new(
        hp: &HParams,
        range: LayerRange,
        n_ctx: usize,
        n_slots: usize,
    ) -> Result<KvCache, ModelError> {
        let kv = hp.n_embd_kv() as i64;
        let n_ctx_alloc = n_ctx.div_ceil(KV_PAD) * KV_PAD;
        let mut specs = Vec::new();
        for il in range.start..range.end {
            for kind in ["k", "v"] {
                specs.push(TensorSpec {
                    name: format!("cache_{kind}_l{il}"),
                    dtype: DType::F16,
                    ne: vec![kv, n_ctx_alloc as i64, n_slots as i64],
                    placement: Placement::Plain,
                });
            }
        }
        let mut store = TensorStore::new(&specs, false)?;
        store.clear();
        Ok(KvCache {
            store,
            range,
            n_ctx,
            n_ctx_alloc,
            n_slots,
        })
    }

    fn k(&self, il: usize) -> Result<Tensor<'_>, ModelError> {
        self.store
            .get(&format!("cache_k_l{il}"))
            .ok_or_else(|| ModelError::MissingTensor(format!("cache_k_l{il}")))
    }

    fn v(&self, il: usize) -> Result<Tensor<'_>, ModelError> {
        self.store
            .get(&format!("cache_v_l{il}"))
            .ok_or_else(|| ModelError::MissingTensor(format!("cache_v_l{il}")))
    }

    pub fn size_bytes(&self) -> usize {
        self.store.size_bytes()
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }
}

/// The shape of a step: equal shapes share one graph.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct StepShape {
    /// Per sequence: slot, new tokens, output rows, padded attention window.
    pub seqs: Vec<(usize, usize, OutputRows, usize)>,
    pub n_out: usize,
}

/// Host data for a step's input tensors, and the step's shape.
#[derive(Debug, Default)]
pub struct GraphInputs {
    pub tokens: Vec<i32>,
    pub hidden: Vec<f32>,
    pub positions: Vec<i32>,
    /// Cache row of every new token: `slot * n_ctx_alloc + position`.
    pub kv_rows: Vec<i64>,
    pub masks: Vec<Vec<u16>>,
    pub masks_swa: Vec<Vec<u16>>,
    pub out_ids: Vec<i32>,
    pub shape: StepShape,
    has_global: bool,
    has_swa: bool,
}

const F16_NEG_INF: u16 = 0xFC00;

impl GraphInputs {
    /// Validates the batch against the cache and computes positions, cache rows,
    /// attention masks and output rows (token ids / activations are set by the caller).
    pub fn prepare(
        &mut self,
        hp: &HParams,
        kv: &KvCache,
        last: bool,
        seqs: &[BatchSeq],
    ) -> Result<(), ModelError> {
        let range = kv.range();
        if seqs.iter().map(|s| s.n_tokens).sum::<usize>() == 0 {
            return Err(ModelError::BadBatch("empty batch".into()));
        }
        for (i, s) in seqs.iter().enumerate() {
            if s.n_tokens == 0 || s.slot >= kv.n_slots || s.pos0 + s.n_tokens > kv.n_ctx {
                return Err(ModelError::BadBatch(format!(
                    "sequence slot {} positions {}..{} do not fit {} slots of {} positions",
                    s.slot,
                    s.pos0,
                    s.pos0 + s.n_tokens,
                    kv.n_slots,
                    kv.n_ctx
                )));
            }
            if seqs[..i].iter().any(|o| o.slot == s.slot) {
                return Err(ModelError::BadBatch(format!(
                    "slot {} appears twice in one batch",
                    s.slot
                )));
            }
        }
        self.has_swa = hp.n_swa > 0 && hp.swa_layers[range.start..range.end].iter().any(|&s| s);
        self.has_global =
            hp.n_swa == 0 || hp.swa_layers[range.start..range.end].iter().any(|&s| !s);
        self.positions.clear();
        self.kv_rows.clear();
        self.masks.clear();
        self.masks_swa.clear();
        self.out_ids.clear();
        self.shape.seqs.clear();
        let mut row = 0usize;
        for s in seqs {
            let n_kv = s.pos0 + s.n_tokens;
            let n_kv_pad = (n_kv.div_ceil(KV_PAD) * KV_PAD).min(kv.n_ctx_alloc);
            for i in 0..s.n_tokens {
                self.positions.push((s.pos0 + i) as i32);
                self.kv_rows
                    .push((s.slot * kv.n_ctx_alloc + s.pos0 + i) as i64);
            }
            let build_mask = |window: usize| {
                let mut m = vec![F16_NEG_INF; n_kv_pad * s.n_tokens];
                for i in 0..s.n_tokens {
                    let p = s.pos0 + i;
                    let lo = if window == 0 {
                        0
                    } else {
                        (p + 1).saturating_sub(window)
                    };
                    m[i * n_kv_pad + lo..=i * n_kv_pad + p].fill(0);
                }
                m
            };
            if self.has_global {
                self.masks.push(build_mask(0));
            }
            if self.has_swa {
                self.masks_swa.push(build_mask(hp.n_swa));
            }
            if last {
                match s.output {
                    OutputRows::None => {}
                    OutputRows::Last => self.out_ids.push((row + s.n_tokens - 1) as i32),
                    OutputRows::All => self
                        .out_ids
                        .extend((row..row + s.n_tokens).map(|r| r as i32)),
                }
            }
            self.shape
                .seqs
                .push((s.slot, s.n_tokens, s.output, n_kv_pad));
            row += s.n_tokens;
        }
        self.shape.n_out = self.out_ids.len();
        Ok(())
    }

    fn n_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Copies the host data into the named inputs of an allocated graph.
    pub fn fill(&self, g: &GraphBuilder, first: bool, n_embd: usize) -> Result<(), ModelError> {
        let n_tokens = self.n_tokens();
        let find = |name: &str| {
            g.find(name)
                .ok_or_else(|| ModelError::BadBatch(format!("graph lacks input '{name}'")))
        };
        if first {
            if self.tokens.len() != n_tokens {
                return Err(ModelError::BadBatch(format!(
                    "{} token ids for {n_tokens} positions",
                    self.tokens.len()
                )));
            }
            ggml_shim::set_tensor_data(find("inp_tokens")?, &self.tokens)?;
        } else {
            if self.hidden.len() != n_tokens * n_embd {
                return Err(ModelError::BadBatch(format!(
                    "activation of {} values, expected {n_tokens} tokens x {n_embd}",
                    self.hidden.len()
                )));
            }
            ggml_shim::set_tensor_data(find("inp_hidden")?, &self.hidden)?;
        }
        ggml_shim::set_tensor_data(find("inp_pos")?, &self.positions)?;
        ggml_shim::set_tensor_data(find("inp_kv_rows")?, &self.kv_rows)?;
        for (i, m) in self.masks.iter().enumerate() {
            ggml_shim::set_tensor_data(find(&format!("inp_mask_{i}"))?, m)?;
        }
        for (i, m) in self.masks_swa.iter().enumerate() {
            ggml_shim::set_tensor_data(find(&format!("inp_mask_swa_{i}"))?, m)?;
        }
        if let Some(t) = g.find("inp_out_ids") {
            ggml_shim::set_tensor_data(t, &self.out_ids)?;
        }
        Ok(())
    }
}

/// Everything an architecture file needs to build one step's graph for one stage.
pub struct StageGraph<'a> {
    pub g: &'a GraphBuilder,
    pub hp: &'a HParams,
    w: &'a StageWeights,
    kv: &'a KvCache,
    pub range: LayerRange,
    pub first: bool,
    pub last: bool,
    pub n_tokens: usize,
    shape: &'a StepShape,
    inp_tokens: Option<Tensor<'a>>,
    inp_hidden: Option<Tensor<'a>>,
    pub pos: Tensor<'a>,
    kv_rows: Tensor<'a>,
    masks: Vec<Tensor<'a>>,
    masks_swa: Vec<Tensor<'a>>,
    out_ids: Option<Tensor<'a>>,
    n_out: usize,
}

impl<'a> StageGraph<'a> {
    /// Declares the (named) inputs of a step of the shape `data` was prepared for.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        g: &'a GraphBuilder,
        hp: &'a HParams,
        w: &'a StageWeights,
        kv: &'a KvCache,
        first: bool,
        last: bool,
        data: &'a GraphInputs,
    ) -> Result<StageGraph<'a>, ModelError> {
        let n_tokens = data.n_tokens();
        let t = n_tokens as i64;
        let named = |dtype: DType, ne: &[i64], name: &str| {
            let x = g.input(dtype, ne);
            g.name(x, name);
            x
        };
        let (inp_tokens, inp_hidden) = if first {
            (Some(named(DType::I32, &[t], "inp_tokens")), None)
        } else {
            (
                None,
                Some(named(DType::F32, &[hp.n_embd as i64, t], "inp_hidden")),
            )
        };
        let pos = named(DType::I32, &[t], "inp_pos");
        let kv_rows = named(DType::I64, &[t], "inp_kv_rows");
        let mut masks = Vec::new();
        let mut masks_swa = Vec::new();
        for (i, &(_, n, _, n_kv_pad)) in data.shape.seqs.iter().enumerate() {
            let ne = [n_kv_pad as i64, n as i64];
            if data.has_global {
                masks.push(named(DType::F16, &ne, &format!("inp_mask_{i}")));
            }
            if data.has_swa {
                masks_swa.push(named(DType::F16, &ne, &format!("inp_mask_swa_{i}")));
            }
        }
        // With no output rows (a prompt chunk before the last one) the last stage only
        // fills its KV cache: no head, no row selection.
        let n_out = data.shape.n_out;
        let out_ids = (last && n_out > 0 && n_out < n_tokens)
            .then(|| named(DType::I32, &[n_out as i64], "inp_out_ids"));
        Ok(StageGraph {
            g,
            hp,
            w,
            kv,
            range: kv.range(),
            first,
            last,
            n_tokens,
            shape: &data.shape,
            inp_tokens,
            inp_hidden,
            pos,
            kv_rows,
            masks,
            masks_swa,
            out_ids,
            n_out,
        })
    }

    /// Number of output rows on the last stage.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// A weight of layer `il` (e.g. `attn_q.weight`).
    pub fn lw(&self, il: usize, name: &str) -> Result<Tensor<'a>, ModelError> {
        let full = format!("blk.{il}.{name}");
        self.w.get(&full).ok_or(ModelError::MissingTensor(full))
    }

    /// An optional weight of layer `il` (biases).
    pub fn lw_opt(&self, il: usize, name: &str) -> Option<Tensor<'a>> {
        self.w.get(&format!("blk.{il}.{name}"))
    }

    /// A global weight (`token_embd.weight`, `output_norm.weight`, ...).
    pub fn gw(&self, name: &str) -> Result<Tensor<'a>, ModelError> {
        self.w
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))
    }

    pub fn gw_opt(&self, name: &str) -> Option<Tensor<'a>> {
        self.w.get(name)
    }

    /// The stage input: token embeddings (times `scale`) on the first stage, the
    /// previous stage's activations otherwise. Shape `[n_embd, n_tokens]`.
    pub fn input(&self, embd_scale: Option<f32>) -> Result<Tensor<'a>, ModelError> {
        if let (Some(tok), true) = (self.inp_tokens, self.first) {
            let x = self.g.get_rows(self.gw("token_embd.weight")?, tok);
            return Ok(match embd_scale {
                Some(s) => self.g.scale(x, s),
                None => x,
            });
        }
        self.inp_hidden
            .ok_or_else(|| ModelError::BadBatch("stage has no input".into()))
    }

    /// RMS norm times a weight.
    pub fn rms_norm(&self, x: Tensor<'a>, w: Tensor<'a>) -> Tensor<'a> {
        let n = self.g.rms_norm(x, self.hp.rms_eps);
        self.g.mul(n, w)
    }

    /// `w · x` for the step's activations `x` (`[k, columns]`), batch-invariant: the
    /// columns of a decoding sequence (one token) and of an output row get the bits
    /// of a one-token product; a prompt chunk's columns get ggml's product of that
    /// chunk alone. So each sequence's result is what llama.cpp computes for it
    /// decoding alone, whatever else the step holds.
    pub fn matmul(&self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        let columns = x.ne()[1] as usize;
        let runs = if columns == self.n_tokens {
            column_runs(self.shape.seqs.iter().map(|&(_, n, _, _)| (n, n > 1)))
        } else {
            // the rows kept for output on the last layer (`select_rows`)
            output_runs(self.shape.seqs.iter().map(|&(_, n, o, _)| (n, o)))
        };
        product_by_runs(self.g, w, x, &runs)
    }

    /// `w · x (+ b)`.
    pub fn linear(&self, w: Tensor<'a>, x: Tensor<'a>, b: Option<Tensor<'a>>) -> Tensor<'a> {
        let y = self.matmul(w, x);
        match b {
            Some(b) => self.g.add(y, b),
            None => y,
        }
    }

    /// `blk.{il}.{name}.weight · x (+ blk.{il}.{name}.bias)`.
    pub fn proj(&self, il: usize, name: &str, x: Tensor<'a>) -> Result<Tensor<'a>, ModelError> {
        let w = self.lw(il, &format!("{name}.weight"))?;
        Ok(self.linear(w, x, self.lw_opt(il, &format!("{name}.bias"))))
    }

    /// Q, K, V projections of layer `il`, shaped `[head_dim, heads, n_tokens]`.
    pub fn qkv(
        &self,
        il: usize,
        x: Tensor<'a>,
    ) -> Result<(Tensor<'a>, Tensor<'a>, Tensor<'a>), ModelError> {
        let (d, t) = (self.hp.head_dim_k as i64, self.n_tokens as i64);
        let q = self.proj(il, "attn_q", x)?;
        let k = self.proj(il, "attn_k", x)?;
        let v = self.proj(il, "attn_v", x)?;
        let q = self.g.reshape(q, &[d, self.hp.n_head as i64, t]);
        let k = self.g.reshape(k, &[d, self.hp.n_head_kv as i64, t]);
        let v = self.g.reshape(v, &[d, self.hp.n_head_kv as i64, t]);
        Ok((q, k, v))
    }

    /// RoPE parameters of layer `il`.
    pub fn rope_params(&self, il: usize) -> RopeParams {
        let hp = self.hp;
        let swa = hp.n_swa > 0 && hp.swa_layers[il];
        let (freq_base, freq_scale) = if swa {
            (hp.rope_freq_base_swa, 1.0)
        } else {
            (hp.rope_freq_base, hp.rope_freq_scale)
        };
        let yarn = hp.rope_scaling == RopeScaling::Yarn && !swa;
        RopeParams {
            n_dims: hp.n_rot as i32,
            mode: hp.arch.rope_mode(),
            n_ctx_orig: hp.n_ctx_orig as i32,
            freq_base,
            freq_scale,
            ext_factor: if yarn { 1.0 } else { 0.0 },
            attn_factor: hp.rope_attn_factor,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }
    }

    /// Applies RoPE to `[head_dim, heads, n_tokens]`.
    pub fn rope(&self, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        let ff = self.gw_opt("rope_freqs.weight");
        self.g.rope(x, self.pos, ff, &self.rope_params(il))
    }

    /// Stores K and V of layer `il` in the cache and attends each sequence to its own
    /// past. Returns `[head_dim * n_head, n_tokens]` (before the output projection).
    pub fn attention(
        &self,
        il: usize,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        scale: f32,
    ) -> Result<Tensor<'a>, ModelError> {
        let g = self.g;
        let hp = self.hp;
        let (d, hq, hkv) = (hp.head_dim_k as i64, hp.n_head as i64, hp.n_head_kv as i64);
        let kc = self.kv.k(il)?;
        let vc = self.kv.v(il)?;
        let swa = hp.n_swa > 0 && hp.swa_layers[il];
        let masks = if swa { &self.masks_swa } else { &self.masks };
        let kv_row = kc.nb()[1];
        let slot_bytes = kc.nb()[2];
        let elt = 2usize; // F16 cache
                          // 1. store the new keys and values of all sequences at their cache rows
        let kv_dim = d * hkv;
        let all_rows = self.kv.n_ctx_alloc as i64 * self.kv.n_slots as i64;
        let t = self.n_tokens as i64;
        for (src, cache) in [(k, kc), (v, vc)] {
            let dst = g.reshape(cache, &[kv_dim, all_rows]);
            let cur = g.reshape(src, &[kv_dim, t]);
            g.expand(g.set_rows(dst, cur, self.kv_rows));
        }
        // 2. attend, one sequence at a time, over its padded window
        let mut out: Option<Tensor<'a>> = None;
        let mut t0 = 0usize;
        for (i, &(slot, n_tokens, _, n_kv_pad)) in self.shape.seqs.iter().enumerate() {
            let n = n_tokens as i64;
            let n_kv = n_kv_pad as i64;
            let mask = *masks
                .get(i)
                .ok_or_else(|| ModelError::BadBatch("missing attention mask".into()))?;
            let qs = g.view(q, &[d, hq, n], &[q.nb()[1], q.nb()[2]], t0 * q.nb()[2]);
            let qs = g.permute(qs, [0, 2, 1, 3]);
            let window = [d as usize * elt, kv_row];
            let ks = g.view(kc, &[d, hkv, n_kv], &window, slot * slot_bytes);
            let ks = g.permute(ks, [0, 2, 1, 3]);
            let vs = g.view(vc, &[d, hkv, n_kv], &window, slot * slot_bytes);
            let vs = g.permute(vs, [0, 2, 1, 3]);
            let o = g.flash_attn(qs, ks, vs, mask, scale, 0.0);
            let o = g.reshape(o, &[d * hq, n]);
            out = Some(match out {
                None => o,
                Some(prev) => g.concat(prev, o, 1),
            });
            t0 += n_tokens;
        }
        out.ok_or_else(|| ModelError::BadBatch("empty batch".into()))
    }

    /// SiLU-gated feed-forward of layer `il`: `down(silu(gate(x)) * up(x))`, with
    /// optional biases.
    pub fn ffn_silu(&self, il: usize, x: Tensor<'a>) -> Result<Tensor<'a>, ModelError> {
        let up = self.proj(il, "ffn_up", x)?;
        let gate = self.proj(il, "ffn_gate", x)?;
        let h = self.g.swiglu_split(gate, up);
        self.proj(il, "ffn_down", h)
    }

    /// On the last stage's final model layer, keeps only the rows that produce output.
    pub fn select_rows(&self, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        match self.out_ids {
            Some(ids) if self.last && il + 1 == self.hp.n_layer => self.g.get_rows(x, ids),
            _ => x,
        }
    }

    /// Ends the stage: logits on the last stage when rows are wanted, the
    /// activations otherwise.
    pub fn finish(&self, x: Tensor<'a>) -> Result<Tensor<'a>, ModelError> {
        if self.last && self.n_out > 0 {
            self.lm_head(x)
        } else {
            Ok(x)
        }
    }

    /// Final norm and `lm_head` (last stage): logits `[n_vocab, n_out]`; or, when
    /// the stage holds only part of the head (split by vocabulary), the normalized
    /// hidden state `[n_embd, n_out]`, to which every holder of a part applies its
    /// rows ([`project_lm_head`]).
    pub fn lm_head(&self, x: Tensor<'a>) -> Result<Tensor<'a>, ModelError> {
        let x = self.rms_norm(x, self.gw("output_norm.weight")?);
        if self.split_lm_head() {
            return Ok(x);
        }
        let rows = self
            .w
            .lm_head_rows()
            .ok_or_else(|| ModelError::MissingTensor(TIED_HEAD.into()))?;
        project_lm_head(self.g, self.hp, self.w, x, rows)
    }

    /// Whether this stage holds only part of the `lm_head`.
    pub fn split_lm_head(&self) -> bool {
        self.w
            .lm_head_rows()
            .is_some_and(|r| r.len() != self.hp.n_vocab)
    }
}

/// The `lm_head` applied to normalized hidden states `x` (`[n_embd, n]`): logits
/// of vocabulary rows `rows` (`[rows.len(), n]`, inside the stage's
/// [`StageWeights::lm_head_reach`]), with the bias and soft-cap.
pub fn project_lm_head<'a>(
    g: &'a GraphBuilder,
    hp: &HParams,
    w: &'a StageWeights,
    x: Tensor<'a>,
    rows: Range<usize>,
) -> Result<Tensor<'a>, ModelError> {
    let missing = || ModelError::MissingTensor(TIED_HEAD.into());
    let reach = w.lm_head_reach().ok_or_else(missing)?;
    if rows.is_empty() || rows.start < reach.start || rows.end > reach.end {
        return Err(ModelError::BadKey {
            key: TIED_HEAD.into(),
            why: format!(
                "lm_head rows {}..{} are outside this stage's {}..{}",
                rows.start, rows.end, reach.start, reach.end
            ),
        });
    }
    let mut head = w.get(TIED_HEAD).ok_or_else(missing)?;
    let skip = rows.start - w.lm_head_base();
    if skip != 0 || head.ne()[1] as usize != rows.len() {
        // a band of rows of the stored table: a view, no copy
        let nb1 = head.nb()[1];
        head = g.view(
            head,
            &[hp.n_embd as i64, rows.len() as i64],
            &[nb1],
            skip * nb1,
        );
    }
    // every output row as a one-token product: a row's logits do not depend on the
    // others in the step, nor on how the head is split over nodes
    let mut logits = g.mul_mat_per_column(head, x);
    if let Some(mut b) = w.get("output.bias") {
        // the bias holds the stage's own rows (reach is those rows when it exists)
        let own = w.lm_head_rows().ok_or_else(missing)?;
        if rows != own {
            let nb0 = b.nb()[0];
            b = g.view(b, &[rows.len() as i64], &[], (rows.start - own.start) * nb0);
        }
        logits = g.add(logits, b);
    }
    let cap = hp.final_logit_softcap;
    if cap != 0.0 {
        logits = g.scale(logits, 1.0 / cap);
        logits = g.tanh(logits);
        logits = g.scale(logits, cap);
    }
    Ok(logits)
}

/// A run of consecutive columns of a step's activations: `len` columns that are one
/// prompt chunk (`chunk`: ggml's product of the chunk), or single tokens of
/// sequences (each a one-token product).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ColumnRun {
    len: usize,
    chunk: bool,
}

/// The runs of a step's columns, from each sequence's column count and whether they
/// form one chunk: neighbouring single columns merge into one run.
fn column_runs(seqs: impl Iterator<Item = (usize, bool)>) -> Vec<ColumnRun> {
    let mut runs: Vec<ColumnRun> = Vec::new();
    for (len, chunk) in seqs.filter(|&(len, _)| len > 0) {
        let chunk = chunk && len > 1;
        match runs.last_mut() {
            Some(last) if !chunk && !last.chunk => last.len += len,
            _ => runs.push(ColumnRun { len, chunk }),
        }
    }
    runs
}

/// The runs of the output rows (after `select_rows`): a sequence's last row alone,
/// or all rows of its chunk.
fn output_runs(seqs: impl Iterator<Item = (usize, OutputRows)>) -> Vec<ColumnRun> {
    column_runs(seqs.map(|(n, o)| (o.count(n), o == OutputRows::All)))
}

/// `w · x` over the column runs of `x`: single-token runs by the per-column
/// product, chunks by ggml's product of the chunk alone; the results side by side.
fn product_by_runs<'a>(
    g: &'a GraphBuilder,
    w: Tensor<'a>,
    x: Tensor<'a>,
    runs: &[ColumnRun],
) -> Tensor<'a> {
    let product = |x: Tensor<'a>, chunk: bool| {
        if chunk {
            g.mul_mat(w, x)
        } else {
            g.mul_mat_per_column(w, x)
        }
    };
    if let [only] = runs {
        return product(x, only.chunk);
    }
    let (k, nb1) = (x.ne()[0], x.nb()[1]);
    let mut out: Option<Tensor<'a>> = None;
    let mut first = 0usize;
    for run in runs {
        let part = g.view(x, &[k, run.len as i64], &[nb1], first * nb1);
        let y = product(part, run.chunk);
        out = Some(match out {
            None => y,
            Some(prev) => g.concat(prev, y, 1),
        });
        first += run.len;
    }
    out.unwrap_or_else(|| product(x, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(len: usize, chunk: bool) -> ColumnRun {
        ColumnRun { len, chunk }
    }

    #[test]
    fn decoding_columns_merge_and_prompt_chunks_stand_alone() {
        // three decoding sequences, a prompt chunk, one more decoder, a 1-token prompt
        let seqs = [
            (1, false),
            (1, false),
            (1, false),
            (7, true),
            (1, false),
            (1, true),
        ];
        assert_eq!(
            column_runs(seqs.into_iter()),
            [run(3, false), run(7, true), run(2, false)]
        );
        // two prompt chunks side by side stay two products
        assert_eq!(
            column_runs([(4, true), (5, true)].into_iter()),
            [run(4, true), run(5, true)]
        );
    }

    #[test]
    fn output_rows_are_single_columns_unless_every_row_is_wanted() {
        let seqs = [
            (1, OutputRows::Last),
            (9, OutputRows::None),
            (6, OutputRows::Last),
            (3, OutputRows::All),
            (1, OutputRows::Last),
        ];
        assert_eq!(
            output_runs(seqs.into_iter()),
            [run(2, false), run(3, true), run(1, false)]
        );
    }
}
