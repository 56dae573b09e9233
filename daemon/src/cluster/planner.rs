//! The planner: pure functions from the nodes' capabilities and the model's
//! costs to contiguous layer ranges and a split of the `lm_head`. No I/O.

use super::capabilities::Capabilities;
use crate::model::graph::KV_PAD;
use crate::model::{LayerRange, ModelFile};

/// What the planner knows of a node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub caps: Capabilities,
}

/// What a node holds beyond its weights and KV cache: the binary and its libraries,
/// the threads, ggml's compute buffers (they grow with the micro-batch, the model's
/// width and the tokens attended), what the allocator keeps and, on the head, the
/// tokenizer (38 MiB for Gemma's 262k tokens) and the HTTP server. The model file's
/// metadata is not kept after it is read. Measured as VmRSS after a long prompt and a
/// full batch, minus the node's weights and KV cache (`daemon/tests/cluster/memory.rs`
/// prints it), 3 nodes on x86-64 (AMD EPYC, AVX2, 2 cores), threads 1, batch 512, 4
/// slots:
/// - tiny model (64 wide, ctx 512): 13 to 14 MiB on every node;
/// - Gemma 3 270M (640 wide, ctx 4096), three runs: workers 47 to 62 MiB, the head
///   99 MiB. (Before glibc's thresholds were fixed ([`ggml_shim::malloc`]) and the
///   metadata dropped: workers 74 to 118 MiB, the head 115 to 157 MiB, varying from
///   run to run with the same plan.)
///
/// A wider model's compute buffers are larger: measure it there (the test takes the
/// model as its argument). Not counted: loading reads each tensor through a buffer of
/// its size, so the peak (VmHWM) of a node holding the embedding is higher by that
/// table while it loads.
pub const NODE_OVERHEAD_BYTES: u64 = 160 << 20;

/// Bytes read per token by each layer, and by the embedding / head; and the memory
/// they take, with the KV cache.
#[derive(Debug, Clone)]
pub struct ModelCosts {
    pub layer_bytes: Vec<u64>,
    pub embd_bytes: u64,
    pub lm_head_bytes: u64,
    /// The `lm_head` is the token embedding table (no `output.weight`).
    pub lm_head_tied: bool,
    /// The `lm_head` rows of the node that holds the token embedding are a view of that
    /// table (a tied head that ggml does not repack): they take no memory of their own.
    pub lm_head_in_embd: bool,
    /// KV cache bytes per layer for the planned context and slots.
    pub kv_bytes_per_layer: u64,
    /// The planned context and slots (for messages).
    pub n_ctx: usize,
    pub n_slots: usize,
}

impl ModelCosts {
    pub fn of(mf: &ModelFile, n_ctx: usize, n_slots: usize) -> ModelCosts {
        let hp = &mf.hparams;
        let mut layer_bytes = vec![0u64; hp.n_layer];
        let (mut embd_bytes, mut lm_head_bytes) = (0, 0);
        for t in mf.gguf.tensors() {
            if let Some(il) = t
                .name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
            {
                if il < hp.n_layer {
                    layer_bytes[il] += t.size;
                }
            } else if t.name == "token_embd.weight" {
                embd_bytes = t.size;
            } else if t.name == "output.weight" {
                lm_head_bytes = t.size;
            }
        }
        let tied = lm_head_bytes == 0;
        if tied {
            lm_head_bytes = embd_bytes; // tied `lm_head`: the embedding table is read per token
        }
        // as `StageWeights::load` decides: a repacked head is a copy
        let repacked = mf.head_tensor().is_some_and(|t| {
            ggml_shim::backend::repack_supported(&ggml_shim::TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                ne: t.shape.iter().map(|&d| d as i64).collect(),
                placement: ggml_shim::Placement::MatmulWeight,
            })
        });
        let n_ctx_alloc = n_ctx.div_ceil(KV_PAD) * KV_PAD;
        ModelCosts {
            layer_bytes,
            embd_bytes,
            lm_head_bytes,
            lm_head_tied: tied,
            lm_head_in_embd: tied && !repacked,
            kv_bytes_per_layer: (2 * hp.n_embd_kv() * 2 * n_ctx_alloc * n_slots) as u64,
            n_ctx,
            n_slots,
        }
    }

    /// The average bytes of a layer (at least 1).
    pub fn avg_layer_bytes(&self) -> f64 {
        let n = self.layer_bytes.len().max(1) as f64;
        (self.layer_bytes.iter().sum::<u64>() as f64 / n).max(1.0)
    }

    /// The weights of a node with layers `range` and `lm_head_fraction` of the
    /// `lm_head`'s rows: its layers, the token embedding on the first node, and its
    /// rows of the head (none where they are a view of the embedding it holds).
    pub fn stage_weight_bytes(&self, range: LayerRange, lm_head_fraction: f64) -> u64 {
        let layers: u64 = self.layer_bytes[range.start..range.end].iter().sum();
        let first = range.start == 0;
        let embd = if first { self.embd_bytes } else { 0 };
        let lm_head = if first && self.lm_head_in_embd {
            0
        } else {
            (self.lm_head_bytes as f64 * lm_head_fraction).ceil() as u64
        };
        layers + embd + lm_head
    }

    /// What such a node needs: its weights, the KV cache of its layers and
    /// [`NODE_OVERHEAD_BYTES`].
    pub fn stage_memory(&self, range: LayerRange, lm_head_fraction: f64) -> u64 {
        self.stage_weight_bytes(range, lm_head_fraction)
            + self.kv_bytes_per_layer * range.len() as u64
            + NODE_OVERHEAD_BYTES
    }

    /// The weights of the whole model, as stored (a tied head counted once).
    pub fn model_weight_bytes(&self) -> u64 {
        let untied_head = if self.lm_head_tied {
            0
        } else {
            self.lm_head_bytes
        };
        self.layer_bytes.iter().sum::<u64>() + self.embd_bytes + untied_head
    }

    /// The KV cache of every layer.
    pub fn model_kv_bytes(&self) -> u64 {
        self.kv_bytes_per_layer * self.layer_bytes.len() as u64
    }
}

/// The fraction of the `lm_head`'s rows on the node with layers `a..b` of `n_layer`,
/// when the first node computes `share` of them.
fn lm_head_fraction(a: usize, b: usize, n_layer: usize, share: f64) -> f64 {
    match (a == 0, b == n_layer) {
        (true, true) => 1.0,
        (true, false) => share,
        (false, true) => 1.0 - share,
        (false, false) => 0.0,
    }
}

/// A size for messages: GB with one decimal, MB below 1 GB (where a tenth of a GB
/// would hide most of the figure).
pub fn size_text(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e7 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

fn slots_text(n_slots: usize) -> String {
    match n_slots {
        1 => "1 slot".into(),
        n => format!("{n} slots"),
    }
}

/// The model does not fit the memory the nodes offer, however its layers are split.
#[derive(Debug, Clone, PartialEq)]
pub struct NoFit {
    /// The model's weights, as stored.
    pub weights: u64,
    /// The KV cache of every layer at the planned context and slots.
    pub kv: u64,
    pub n_ctx: usize,
    pub n_slots: usize,
    /// Each node's name and the bytes it offers, in pipeline order.
    pub offered: Vec<(String, u64)>,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: u64 = self.offered.iter().map(|(_, b)| b).sum();
        let who = if self.offered.len() == 1 {
            format!("this node offers {}", size_text(total))
        } else {
            let each: Vec<String> = self
                .offered
                .iter()
                .map(|(name, b)| format!("{name} {}", size_text(*b)))
                .collect();
            format!("the peers offer {} ({})", size_text(total), each.join(", "))
        };
        write!(
            f,
            "model needs {} for weights + {} KV at ctx {} ({}) + {} a node for the \
             runtime; {who}: add a node, lower ctx or use a smaller quantisation",
            size_text(self.weights),
            size_text(self.kv),
            self.n_ctx,
            slots_text(self.n_slots),
            size_text(NODE_OVERHEAD_BYTES),
        )
    }
}

/// A node cannot hold the layers it is given (explicit ranges).
#[derive(Debug, Clone, PartialEq)]
pub struct StageTooBig {
    pub name: String,
    pub range: LayerRange,
    /// Its share of the `lm_head`'s rows.
    pub lm_head_fraction: f64,
    pub weights: u64,
    pub kv: u64,
    pub n_ctx: usize,
    pub n_slots: usize,
    pub offers: u64,
}

impl std::fmt::Display for StageTooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.range;
        let mut holds = format!("layers {}..{}", r.start, r.end);
        if r.start == 0 {
            holds.push_str(" and the token embedding");
        }
        if self.lm_head_fraction >= 1.0 {
            holds.push_str(" and the output head");
        } else if self.lm_head_fraction > 0.0 {
            let pct = (self.lm_head_fraction * 100.0).round();
            holds.push_str(&format!(" and {pct}% of the output head"));
        }
        write!(
            f,
            "{} cannot hold {holds}: they need {} for weights + {} KV at ctx {} ({}) + {} \
             for the runtime; it offers {}: give it fewer layers, add a node, lower ctx or \
             use a smaller quantisation",
            self.name,
            size_text(self.weights),
            size_text(self.kv),
            self.n_ctx,
            slots_text(self.n_slots),
            size_text(NODE_OVERHEAD_BYTES),
            size_text(self.offers),
        )
    }
}

/// Why no plan fits the nodes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the model has {layers} layers, fewer than the {nodes} nodes")]
    TooFewLayers { layers: usize, nodes: usize },
    #[error("{0}")]
    NoFit(Box<NoFit>),
    #[error("{0}")]
    StageTooBig(Box<StageTooBig>),
}

impl PlanError {
    fn no_fit(nodes: &[NodeInfo], costs: &ModelCosts) -> PlanError {
        PlanError::NoFit(Box::new(NoFit {
            weights: costs.model_weight_bytes(),
            kv: costs.model_kv_bytes(),
            n_ctx: costs.n_ctx,
            n_slots: costs.n_slots,
            offered: nodes
                .iter()
                .map(|n| (n.name.clone(), n.caps.free_memory))
                .collect(),
        }))
    }
}

/// Checks that `node` can hold layers `range` with `lm_head_fraction` of the head's rows.
pub fn check_stage(
    node: &NodeInfo,
    costs: &ModelCosts,
    range: LayerRange,
    lm_head_fraction: f64,
) -> Result<(), PlanError> {
    if costs.stage_memory(range, lm_head_fraction) <= node.caps.free_memory {
        return Ok(());
    }
    Err(PlanError::StageTooBig(Box::new(StageTooBig {
        name: node.name.clone(),
        range,
        lm_head_fraction,
        weights: costs.stage_weight_bytes(range, lm_head_fraction),
        kv: costs.kv_bytes_per_layer * range.len() as u64,
        n_ctx: costs.n_ctx,
        n_slots: costs.n_slots,
        offers: node.caps.free_memory,
    })))
}

/// Checks given ranges (one per node, contiguous, covering the model) against the
/// nodes' memory, the first node computing rows `0..lm_head_rows` of the head.
pub fn check_ranges(
    nodes: &[NodeInfo],
    costs: &ModelCosts,
    ranges: &[LayerRange],
    lm_head_rows: usize,
    n_vocab: usize,
) -> Result<(), PlanError> {
    let n_layer = costs.layer_bytes.len();
    let share = lm_head_rows as f64 / n_vocab.max(1) as f64;
    for (node, r) in nodes.iter().zip(ranges) {
        let fraction = lm_head_fraction(r.start, r.end, n_layer, share);
        check_stage(node, costs, *r, fraction)?;
    }
    Ok(())
}

/// What one node's configuration says it holds at the least, before any peer is
/// asked (for `exo check-config`, and a single node's start).
#[derive(Debug, Clone, PartialEq)]
pub enum OwnPart {
    /// A single node: the whole model.
    Whole,
    /// A head with given ranges: its layers and its rows `0..lm_head_rows` of the head.
    Given {
        range: LayerRange,
        lm_head_rows: usize,
    },
    /// A head whose layers the cluster plans: the embedding and the first layer.
    First,
}

/// Checks that `node` can hold its part (a single node: the whole model, refused with
/// [`NoFit`]'s numbers; a head: [`StageTooBig`]'s).
pub fn check_own_part(
    node: &NodeInfo,
    costs: &ModelCosts,
    part: &OwnPart,
    n_vocab: usize,
) -> Result<(), PlanError> {
    let n_layer = costs.layer_bytes.len();
    match part {
        OwnPart::Whole => plan_ranges(std::slice::from_ref(node), costs).map(|_| ()),
        OwnPart::Given {
            range,
            lm_head_rows,
        } => {
            let share = *lm_head_rows as f64 / n_vocab.max(1) as f64;
            let fraction = lm_head_fraction(range.start, range.end, n_layer, share);
            check_stage(node, costs, *range, fraction)
        }
        OwnPart::First => check_stage(node, costs, LayerRange::new(0, n_layer.min(1)), 0.0),
    }
}

/// Contiguous ranges, one per node in order, that keep every node within its memory
/// and make the slowest stage as fast as possible. A stage's time per token is the
/// bytes it reads per token (its layers, plus the `lm_head` on the last stage)
/// at that node's measured speed, so a big head counts for what it costs.
pub fn plan_ranges(nodes: &[NodeInfo], costs: &ModelCosts) -> Result<Vec<LayerRange>, PlanError> {
    plan_with_lm_head_share(nodes, costs, 0.0).map(|(r, _)| r)
}

/// A plan: layer ranges, and the rows of the `lm_head` the first node computes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterPlan {
    pub ranges: Vec<LayerRange>,
    /// Vocabulary rows `0..lm_head_rows` of the `lm_head` run on the first node (0: none).
    pub lm_head_rows: usize,
}

/// The head node's rows `0..n` for a `share` of the head (at least one row each;
/// `n_vocab` ≥ 2).
pub fn share_rows(share: f64, n_vocab: usize) -> usize {
    ((n_vocab as f64 * share) as usize).clamp(1, n_vocab - 1)
}

/// Shares of the head tried for the first node, in 64ths.
const LM_HEAD_SHARE_STEPS: usize = 64;

/// Like [`plan_ranges`], and also splits the `lm_head` by vocabulary between the
/// last node and the first (which holds the embedding, and with a tied `lm_head` the
/// very same table) when that makes the slowest stage faster. A model whose head is
/// a large part of its bytes (Gemma 3 270M: about 70%) cannot be balanced by whole
/// layers alone.
pub fn plan_cluster(
    nodes: &[NodeInfo],
    costs: &ModelCosts,
    n_vocab: usize,
) -> Result<ClusterPlan, PlanError> {
    let whole = |(ranges, t): (Vec<LayerRange>, f64)| {
        let plan = ClusterPlan {
            ranges,
            lm_head_rows: 0,
        };
        (plan, t)
    };
    let unsplit = plan_with_lm_head_share(nodes, costs, 0.0).map(whole);
    if nodes.len() < 2 || n_vocab < 2 {
        return unsplit.map(|(plan, _)| plan);
    }
    // Without a split the model may not fit where it does with one (the first
    // node's rows of a tied head are a view of its embedding): only then try them.
    let unsplit = match unsplit {
        Ok(u) => Some(u),
        Err(PlanError::NoFit(_)) => None,
        Err(e) => return Err(e),
    };
    let splits: Vec<(ClusterPlan, f64)> = (1..LM_HEAD_SHARE_STEPS)
        .filter_map(|step| {
            let share = step as f64 / LM_HEAD_SHARE_STEPS as f64;
            let (ranges, t) = plan_with_lm_head_share(nodes, costs, share).ok()?;
            let lm_head_rows = share_rows(share, n_vocab);
            Some((
                ClusterPlan {
                    ranges,
                    lm_head_rows,
                },
                t,
            ))
        })
        .collect();
    let fastest = splits.iter().map(|(_, t)| *t).min_by(f64::total_cmp);
    let fastest = match (unsplit, fastest) {
        (None, None) => return Err(PlanError::no_fit(nodes, costs)),
        (Some((plan, _)), None) => return Ok(plan),
        // a split costs a hop's worth of work: take it only for a clear gain
        (Some((plan, t)), Some(fastest)) if fastest >= t * 0.97 => return Ok(plan),
        (_, Some(fastest)) => fastest,
    };
    // Layers and `lm_head` rows trade almost freely, so many splits are about as fast.
    // Prefer the fewest layers on the last node: its normalized state, which the
    // head node's share of the `lm_head` waits for, then leaves the soonest.
    let last = nodes.len() - 1;
    splits
        .into_iter()
        .filter(|(_, t)| *t <= fastest * (1.0 + SPLIT_SLACK))
        .min_by(|(a, ta), (b, tb)| {
            (a.ranges[last].len(), *ta)
                .partial_cmp(&(b.ranges[last].len(), *tb))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|(p, _)| p)
        .ok_or_else(|| PlanError::no_fit(nodes, costs))
}

/// How much slower than the fastest split a split with fewer layers on the last
/// node may be estimated (the estimate rests on timings that vary by more).
const SPLIT_SLACK: f64 = 0.02;

/// The head node's rows for a step alone in the pipeline, when the head is split at
/// `lm_head_rows` (0: no split, and then none). Such a step leaves both nodes waiting
/// for its head, so the rows go by speed alone (the last node's layers are done by
/// then); a share at or below `lm_head_rows` is no change and gives 0. The last node
/// holds rows `lm_head_rows..`, so it can always take the smaller part; the head node
/// can take more only with the whole table at hand (a tied `lm_head`), which it checks.
pub fn solo_lm_head_rows(
    head: &Capabilities,
    last: &Capabilities,
    avg_layer_bytes: f64,
    lm_head_rows: usize,
    n_vocab: usize,
) -> usize {
    if lm_head_rows == 0 || n_vocab < 2 {
        return 0;
    }
    // relative speeds on the head: 1 MB of it on each node
    let (a, b) = (
        head.lm_head_ms(1e6, avg_layer_bytes).max(1e-9),
        last.lm_head_ms(1e6, avg_layer_bytes).max(1e-9),
    );
    let rows = ((n_vocab as f64 * b / (a + b)) as usize).min(n_vocab - 1);
    if rows > lm_head_rows {
        rows
    } else {
        0
    }
}

/// The DP behind the planners; `share` of the head runs on node 0. Returns the
/// ranges and the time of the slowest stage.
pub fn plan_with_lm_head_share(
    nodes: &[NodeInfo],
    costs: &ModelCosts,
    share: f64,
) -> Result<(Vec<LayerRange>, f64), PlanError> {
    let n_layer = costs.layer_bytes.len();
    let p = nodes.len();
    if p == 0 || n_layer < p {
        return Err(PlanError::TooFewLayers {
            layers: n_layer,
            nodes: p,
        });
    }
    let avg_layer = costs.avg_layer_bytes();
    // prefix sums of layer bytes
    let mut pre = vec![0u64; n_layer + 1];
    for i in 0..n_layer {
        pre[i + 1] = pre[i] + costs.layer_bytes[i];
    }
    let lm_head_ms = |node: usize, bytes: f64| nodes[node].caps.lm_head_ms(bytes, avg_layer);
    let stage = |node: usize, a: usize, b: usize| -> Option<f64> {
        let range = LayerRange::new(a, b);
        let fraction = lm_head_fraction(a, b, n_layer, share);
        if costs.stage_memory(range, fraction) > nodes[node].caps.free_memory {
            return None;
        }
        let layers = pre[b] - pre[a];
        let ms = layers as f64 / avg_layer * nodes[node].caps.ms_per_layer.max(1e-3);
        Some(ms + lm_head_ms(node, costs.lm_head_bytes as f64 * fraction))
    };
    // best[k][b]: minimal max stage time covering layers 0..b with nodes 0..k
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; n_layer + 1]; p + 1];
    let mut cut = vec![vec![0usize; n_layer + 1]; p + 1];
    best[0][0] = 0.0;
    for k in 1..=p {
        for b in k..=n_layer {
            for a in (k - 1)..b {
                if best[k - 1][a] == inf {
                    continue;
                }
                let Some(t) = stage(k - 1, a, b) else {
                    continue;
                };
                let v = best[k - 1][a].max(t);
                if v < best[k][b] {
                    best[k][b] = v;
                    cut[k][b] = a;
                }
            }
        }
    }
    if best[p][n_layer] == inf {
        return Err(PlanError::no_fit(nodes, costs));
    }
    let mut ranges = vec![LayerRange::new(0, 0); p];
    let mut b = n_layer;
    for k in (1..=p).rev() {
        let a = cut[k][b];
        ranges[k - 1] = LayerRange::new(a, b);
        b = a;
    }
    Ok((ranges, best[p][n_layer]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node offering `mem_mb` MB for weights and KV, besides the runtime.
    fn node(name: &str, mem_mb: u64, ms: f64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            caps: Capabilities {
                free_memory: mem_mb * 1_000_000 + NODE_OVERHEAD_BYTES,
                cores: 4,
                threads: 4,
                ms_per_layer: ms,
                ms_per_lm_head_mb: 0.0,
            },
        }
    }

    fn costs(layers: usize, head_mb: u64) -> ModelCosts {
        ModelCosts {
            layer_bytes: vec![4_000_000; layers],
            embd_bytes: head_mb * 1_000_000,
            lm_head_bytes: head_mb * 1_000_000,
            lm_head_tied: true,
            lm_head_in_embd: true,
            kv_bytes_per_layer: 1_000_000,
            n_ctx: 4096,
            n_slots: 4,
        }
    }

    /// A head measured cheaper per byte than the layers (a different kernel) leaves
    /// the first node a smaller share of it; measured at the layers' speed, the plan
    /// is the one counted by bytes.
    #[test]
    fn the_head_counts_at_its_measured_speed() {
        let plan = |ms_per_lm_head_mb: f64| {
            let mut nodes = [node("a", 1000, 1.0), node("b", 1000, 1.0)];
            for n in &mut nodes {
                n.caps.ms_per_lm_head_mb = ms_per_lm_head_mb;
            }
            plan_cluster(&nodes, &costs(18, 178), 262_144).unwrap()
        };
        let by_bytes = plan(0.0);
        // 1 ms per 4 MB layer: the layers' speed per MB
        assert_eq!(plan(0.25), by_bytes);
        let cheap = plan(0.125);
        assert!(cheap.lm_head_rows > 0 && by_bytes.lm_head_rows > 0);
        assert!(
            cheap.lm_head_rows < by_bytes.lm_head_rows,
            "{cheap:?} vs {by_bytes:?}"
        );
        // both stages cost about the same: a = 17 layers + its rows, b = 1 + the rest
        let share = cheap.lm_head_rows as f64 / 262_144.0;
        let a = cheap.ranges[0].len() as f64 + 178.0 * 0.125 * share;
        let b = cheap.ranges[1].len() as f64 + 178.0 * 0.125 * (1.0 - share);
        assert!((a - b).abs() <= 1.5, "a {a} ms, b {b} ms");
    }

    #[test]
    fn equal_nodes_without_head_split_evenly() {
        let r = plan_ranges(&[node("a", 1000, 1.0), node("b", 1000, 1.0)], &costs(18, 0)).unwrap();
        assert_eq!(r, vec![LayerRange::new(0, 9), LayerRange::new(9, 18)]);
    }

    #[test]
    fn a_heavy_head_moves_layers_to_the_first_stage() {
        // Gemma 3 270M: the tied 178 MB head costs as much as ~44 layers of 4 MB.
        let r = plan_ranges(
            &[node("a", 1000, 1.0), node("b", 1000, 1.0)],
            &costs(18, 178),
        )
        .unwrap();
        assert_eq!(r[0], LayerRange::new(0, 17), "{r:?}");
        assert_eq!(r[1], LayerRange::new(17, 18));
    }

    #[test]
    fn a_slower_node_gets_fewer_layers() {
        let r = plan_ranges(
            &[node("fast", 1000, 1.0), node("slow", 1000, 3.0)],
            &costs(16, 0),
        )
        .unwrap();
        assert_eq!(r, vec![LayerRange::new(0, 12), LayerRange::new(12, 16)]);
    }

    #[test]
    fn memory_limits_are_respected() {
        // "small" can hold at most 5 layers (4 MB + 1 MB KV each).
        let r = plan_ranges(
            &[node("small", 26, 1.0), node("big", 1000, 1.0)],
            &costs(18, 0),
        )
        .unwrap();
        assert!(r[0].len() <= 5, "{r:?}");
        assert_eq!(r[1].end, 18);
        let err =
            plan_ranges(&[node("a", 10, 1.0), node("b", 10, 1.0)], &costs(18, 0)).unwrap_err();
        assert!(matches!(err, PlanError::NoFit(_)));
    }

    #[test]
    fn a_heavy_head_is_split_between_the_last_and_the_first_node() {
        // 18 layers of 4 MB and a tied 178 MB head: by layers alone the best is
        // 17 layers (68 MB) against 1 layer + head (182 MB); with the head split,
        // both nodes read about 125 MB per token.
        let nodes = [node("a", 1000, 1.0), node("b", 1000, 1.0)];
        let p = plan_cluster(&nodes, &costs(18, 178), 262_144).unwrap();
        assert!(p.lm_head_rows > 0, "{p:?}");
        let share = p.lm_head_rows as f64 / 262_144.0;
        let a = p.ranges[0].len() as f64 * 4.0 + share * 178.0;
        let b = p.ranges[1].len() as f64 * 4.0 + (1.0 - share) * 178.0;
        assert!((a - b).abs() <= 8.0, "unbalanced: {a} MB vs {b} MB ({p:?})");
        assert_eq!(p.ranges[1].end, 18);
        // without a head worth splitting, no split
        let p = plan_cluster(&nodes, &costs(18, 0), 262_144).unwrap();
        assert_eq!(p.lm_head_rows, 0);
        assert_eq!(
            p.ranges,
            vec![LayerRange::new(0, 9), LayerRange::new(9, 18)]
        );
    }

    #[test]
    fn a_split_head_leaves_the_last_node_few_layers() {
        // the timings of two equal nodes, as measured on one machine (they differ
        // by noise): any layer cut balances with some head share; the last node
        // keeps one layer, so its normalized state goes back at once
        for (a, b) in [(0.173, 0.192), (0.192, 0.173), (0.2, 0.2)] {
            let nodes = [node("a", 1000, a), node("b", 1000, b)];
            let p = plan_cluster(&nodes, &costs(18, 178), 262_144).unwrap();
            assert!(p.lm_head_rows > 0, "{p:?}");
            assert_eq!(p.ranges[1], LayerRange::new(17, 18), "{a} {b}: {p:?}");
        }
    }

    #[test]
    fn a_step_alone_splits_the_head_by_speed() {
        let caps = |ms| node("x", 1000, ms).caps;
        // equal nodes: half each, when that is more than the head node's share
        assert_eq!(
            solo_lm_head_rows(&caps(0.2), &caps(0.2), 4e6, 86_016, 262_144),
            131_072
        );
        // a head node twice as fast takes two thirds
        assert_eq!(
            solo_lm_head_rows(&caps(0.1), &caps(0.2), 4e6, 86_016, 262_144),
            174_762
        );
        // one node timed its head, the other counts it by bytes at its layers' speed
        // (0.2 ms per 4 MB layer = 0.05 ms per MB): the same speed, half each
        let mut timed = caps(0.2);
        timed.ms_per_lm_head_mb = 0.05;
        assert_eq!(
            solo_lm_head_rows(&timed, &caps(0.2), 4e6, 86_016, 262_144),
            131_072
        );
        // no split, or an even split below the share it has: nothing to change
        assert_eq!(
            solo_lm_head_rows(&caps(0.2), &caps(0.2), 4e6, 0, 262_144),
            0
        );
        assert_eq!(
            solo_lm_head_rows(&caps(0.4), &caps(0.1), 4e6, 86_016, 262_144),
            0
        );
    }

    #[test]
    fn a_slower_head_node_gets_a_smaller_share_of_the_head() {
        let fast = node("b", 1000, 1.0);
        let p1 =
            plan_cluster(&[node("a", 1000, 1.0), fast.clone()], &costs(18, 178), 1000).unwrap();
        let p2 = plan_cluster(&[node("a", 1000, 1.5), fast], &costs(18, 178), 1000).unwrap();
        let work = |p: &ClusterPlan| p.ranges[0].len() as f64 * 4.0 + p.lm_head_rows as f64 * 0.178;
        assert!(work(&p2) < work(&p1), "{p1:?} vs {p2:?}");
    }

    #[test]
    fn the_head_share_respects_memory() {
        // an untied `lm_head`: node a's share costs memory there; a has room for none
        let mut c = costs(18, 178);
        c.embd_bytes = 10_000_000;
        (c.lm_head_tied, c.lm_head_in_embd) = (false, false);
        let nodes = [node("a", 110, 1.0), node("b", 1000, 1.0)];
        let p = plan_cluster(&nodes, &c, 1000).unwrap();
        let share_mb = p.lm_head_rows as f64 / 1000.0 * 178.0;
        let a_mb = 10.0 + p.ranges[0].len() as f64 * 5.0 + share_mb;
        assert!(a_mb <= 110.0, "{a_mb} MB on a 110 MB node ({p:?})");
    }

    #[test]
    fn more_nodes_than_layers_is_an_error() {
        let err = plan_ranges(
            &[
                node("a", 100, 1.0),
                node("b", 100, 1.0),
                node("c", 100, 1.0),
            ],
            &costs(2, 0),
        )
        .unwrap_err();
        assert_eq!(
            err,
            PlanError::TooFewLayers {
                layers: 2,
                nodes: 3
            }
        );
    }

    /// An 8B-shaped model: 32 layers of 140 MB, a 200 MB embedding and an untied
    /// 220 MB head (4.9 GB), 9.4 MB of KV cache a layer (301 MB at ctx 4096, 1 slot).
    fn costs_8b() -> ModelCosts {
        ModelCosts {
            layer_bytes: vec![140_000_000; 32],
            embd_bytes: 200_000_000,
            lm_head_bytes: 220_000_000,
            lm_head_tied: false,
            lm_head_in_embd: false,
            kv_bytes_per_layer: 9_400_000,
            n_ctx: 4096,
            n_slots: 1,
        }
    }

    fn offering(name: &str, bytes: u64) -> NodeInfo {
        let mut n = node(name, 0, 1.0);
        n.caps.free_memory = bytes;
        n
    }

    /// What each node of a plan needs, against what it offers.
    fn within_offers(nodes: &[NodeInfo], costs: &ModelCosts, plan: &ClusterPlan) {
        let n_vocab = 128_000;
        check_ranges(nodes, costs, &plan.ranges, plan.lm_head_rows, n_vocab)
            .unwrap_or_else(|e| panic!("{plan:?}: {e}"));
    }

    #[test]
    fn a_node_needs_its_weights_kv_and_the_runtime() {
        let c = costs(18, 178);
        let mb = 1_000_000;
        // the first node: its layers, the embedding; its head rows are a view of it
        assert_eq!(
            c.stage_weight_bytes(LayerRange::new(0, 2), 0.5),
            8 * mb + 178 * mb
        );
        // the last node: its layers and its rows of the head
        assert_eq!(
            c.stage_weight_bytes(LayerRange::new(2, 18), 0.5),
            64 * mb + 89 * mb
        );
        // one node: the tied head is the embedding
        assert_eq!(
            c.stage_weight_bytes(LayerRange::new(0, 18), 1.0),
            72 * mb + 178 * mb
        );
        assert_eq!(
            c.stage_memory(LayerRange::new(2, 18), 0.5),
            153 * mb + 16 * mb + NODE_OVERHEAD_BYTES
        );
        // a repacked (copied) tied head costs the first node its rows too
        let mut copied = c.clone();
        copied.lm_head_in_embd = false;
        assert_eq!(
            copied.stage_weight_bytes(LayerRange::new(0, 2), 0.5),
            8 * mb + 178 * mb + 89 * mb
        );
        // the model as stored: a tied head counted once, an untied one on its own
        assert_eq!(c.model_weight_bytes(), 250 * mb);
        assert_eq!(costs_8b().model_weight_bytes(), 4_900 * mb);
        assert_eq!(costs_8b().model_kv_bytes(), 300_800_000);
    }

    #[test]
    fn three_nodes_each_offering_a_third_fit() {
        let c = costs_8b();
        let total = c.model_weight_bytes() + c.model_kv_bytes();
        let third = total / 3 + NODE_OVERHEAD_BYTES + 300_000_000;
        let nodes = [
            offering("a", third),
            offering("b", third),
            offering("c", third),
        ];
        let plan = plan_cluster(&nodes, &c, 128_000).expect("fits");
        within_offers(&nodes, &c, &plan);
        assert_eq!(plan.ranges.last().map(|r| r.end), Some(32));
    }

    #[test]
    fn a_cluster_too_small_is_refused_with_the_numbers() {
        let c = costs_8b();
        let gb = 1_000_000_000;
        let nodes = [
            offering("a", gb),
            offering("b", gb),
            offering("c", 1_100_000_000),
        ];
        let err = plan_cluster(&nodes, &c, 128_000).expect_err("4.9 GB in 3.1 GB");
        assert!(matches!(err, PlanError::NoFit(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "model needs 4.9 GB for weights + 301 MB KV at ctx 4096 (1 slot) + {} a \
                 node for the runtime; the peers offer 3.1 GB (a 1.0 GB, b 1.0 GB, c 1.1 GB): \
                 add a node, lower ctx or use a smaller quantisation",
                size_text(NODE_OVERHEAD_BYTES)
            )
        );
        // the same for one node, and for the plain planner
        let err = plan_ranges(&nodes[..1], &c).expect_err("4.9 GB in 1 GB");
        assert!(
            err.to_string()
                .contains("; this node offers 1.0 GB: add a node"),
            "{err}"
        );
        // every offer is listed; more such nodes make it fit
        let small: Vec<NodeInfo> = (0..7)
            .map(|i| offering(&format!("n{i}"), 1_100_000_000))
            .collect();
        let err = plan_cluster(&small[..5], &c, 128_000).expect_err("5 nodes of 1.1 GB");
        assert!(
            err.to_string().contains(
                "the peers offer 5.5 GB (n0 1.1 GB, n1 1.1 GB, n2 1.1 GB, n3 1.1 GB, n4 1.1 GB)"
            ),
            "{err}"
        );
        assert!(plan_cluster(&small, &c, 128_000).is_ok());
    }

    #[test]
    fn a_split_tied_head_fits_where_the_whole_head_does_not() {
        // the last node cannot hold the whole 178 MB head, but the first node's share
        // of it is a view of its embedding
        let c = costs(18, 178);
        let nodes = [node("a", 1000, 1.0), node("b", 120, 1.0)];
        assert!(matches!(
            plan_with_lm_head_share(&nodes, &c, 0.0),
            Err(PlanError::NoFit(_))
        ));
        let p = plan_cluster(&nodes, &c, 262_144).expect("a split fits");
        assert!(p.lm_head_rows > 0, "{p:?}");
        check_ranges(&nodes, &c, &p.ranges, p.lm_head_rows, 262_144)
            .unwrap_or_else(|e| panic!("{p:?}: {e}"));
    }

    #[test]
    fn given_ranges_are_checked_node_by_node() {
        let c = costs_8b();
        let gb = 1_000_000_000;
        let nodes = [offering("a", 3 * gb), offering("b", 3 * gb)];
        let halves = [LayerRange::new(0, 16), LayerRange::new(16, 32)];
        assert!(check_ranges(&nodes, &c, &halves, 0, 128_000).is_ok());
        let lopsided = [LayerRange::new(0, 24), LayerRange::new(24, 32)];
        let err = check_ranges(&nodes, &c, &lopsided, 0, 128_000).expect_err("24 layers");
        assert_eq!(
            err.to_string(),
            format!(
                "a cannot hold layers 0..24 and the token embedding: they need 3.6 GB for \
                 weights + 226 MB KV at ctx 4096 (1 slot) + {} for the runtime; it offers \
                 3.0 GB: give it fewer layers, add a node, lower ctx or use a smaller \
                 quantisation",
                size_text(NODE_OVERHEAD_BYTES)
            )
        );
        // the first node's share of the head counts on it
        let err = check_stage(&nodes[1], &c, LayerRange::new(12, 32), 1.0).expect_err("head");
        assert!(
            err.to_string()
                .starts_with("b cannot hold layers 12..32 and the output head: they need 3.0 GB"),
            "{err}"
        );
    }

    #[test]
    fn sizes_read_in_gb_or_mb() {
        assert_eq!(size_text(4_900_000_000), "4.9 GB");
        assert_eq!(size_text(1_000_000_000), "1.0 GB");
        assert_eq!(size_text(300_400_000), "300 MB");
        assert_eq!(size_text(67_108_864), "67 MB");
        assert_eq!(size_text(2_500_000), "2.5 MB");
    }
}
