//! The planner: pure functions from the nodes' capabilities and the model's
//! costs to contiguous layer ranges and a split of the `lm_head`. No I/O.

use super::capabilities::Capabilities;
use crate::model::{LayerRange, ModelFile};

/// What the planner knows of a node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub caps: Capabilities,
}

/// Bytes read per token by each layer, and by the embedding / head.
#[derive(Debug, Clone)]
pub struct ModelCosts {
    pub layer_bytes: Vec<u64>,
    pub embd_bytes: u64,
    pub lm_head_bytes: u64,
    /// KV cache bytes per layer for the planned context and slots.
    pub kv_bytes_per_layer: u64,
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
        if lm_head_bytes == 0 {
            lm_head_bytes = embd_bytes; // tied `lm_head`: the embedding table is read per token
        }
        ModelCosts {
            layer_bytes,
            embd_bytes,
            lm_head_bytes,
            kv_bytes_per_layer: (2 * hp.n_embd_kv() * 2 * n_ctx * n_slots) as u64,
        }
    }

    /// The average bytes of a layer (at least 1).
    pub fn avg_layer_bytes(&self) -> f64 {
        let n = self.layer_bytes.len().max(1) as f64;
        (self.layer_bytes.iter().sum::<u64>() as f64 / n).max(1.0)
    }
}

/// Why no plan fits the nodes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the model has {layers} layers, fewer than the {nodes} nodes")]
    TooFewLayers { layers: usize, nodes: usize },
    #[error("no split fits: the model needs more memory than the nodes offer ({0})")]
    NoFit(String),
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
    let (ranges, unsplit) = plan_with_lm_head_share(nodes, costs, 0.0)?;
    let whole = ClusterPlan {
        ranges,
        lm_head_rows: 0,
    };
    if nodes.len() < 2 || n_vocab < 2 {
        return Ok(whole);
    }
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
    let Some(fastest) = splits.iter().map(|(_, t)| *t).min_by(f64::total_cmp) else {
        return Ok(whole);
    };
    // a split costs a hop's worth of work: take it only for a clear gain
    if fastest >= unsplit * 0.97 {
        return Ok(whole);
    }
    // Layers and `lm_head` rows trade almost freely, so many splits are about as fast.
    // Prefer the fewest layers on the last node: its normalized state, which the
    // head node's share of the `lm_head` waits for, then leaves the soonest.
    let last = nodes.len() - 1;
    Ok(splits
        .into_iter()
        .filter(|(_, t)| *t <= fastest * (1.0 + SPLIT_SLACK))
        .min_by(|(a, ta), (b, tb)| {
            (a.ranges[last].len(), *ta)
                .partial_cmp(&(b.ranges[last].len(), *tb))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|(p, _)| p)
        .unwrap_or(whole))
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
    let tied = costs.lm_head_bytes == costs.embd_bytes;
    let lm_head_ms = |node: usize, bytes: f64| nodes[node].caps.lm_head_ms(bytes, avg_layer);
    let stage = |node: usize, a: usize, b: usize| -> Option<f64> {
        let layers = pre[b] - pre[a];
        let mut mem = layers + costs.kv_bytes_per_layer * (b - a) as u64;
        let mut ms = layers as f64 / avg_layer * nodes[node].caps.ms_per_layer.max(1e-3);
        if a == 0 {
            mem += costs.embd_bytes;
            if share > 0.0 {
                let h = costs.lm_head_bytes as f64 * share;
                ms += lm_head_ms(node, h);
                if !tied {
                    mem += h as u64;
                }
            }
        }
        if b == n_layer {
            let h = costs.lm_head_bytes as f64 * if a == 0 { 1.0 } else { 1.0 - share };
            ms += lm_head_ms(node, h);
            if !(a == 0 && tied) {
                mem += h as u64;
            }
        }
        if mem > nodes[node].caps.free_memory {
            return None;
        }
        Some(ms)
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
        let offered: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} {} MB", n.name, n.caps.free_memory / 1_000_000))
            .collect();
        return Err(PlanError::NoFit(offered.join(", ")));
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

    fn node(name: &str, mem_mb: u64, ms: f64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            caps: Capabilities {
                free_memory: mem_mb * 1_000_000,
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
            kv_bytes_per_layer: 1_000_000,
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
}
