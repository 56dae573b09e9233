//! Control messages, the model's identity, node capabilities, and the planner that
//! assigns contiguous layer ranges.

use serde::{Deserialize, Serialize};

use crate::model::{LayerRange, ModelFile};

/// Protocol version of the control messages.
pub const PROTOCOL: u32 = 1;

/// The identity of a model: BLAKE3 of its GGUF header and tensor table.
pub fn model_id(mf: &ModelFile) -> String {
    blake3::hash(&mf.gguf.meta_bytes()).to_hex().to_string()
}

/// What a node offers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Capabilities {
    /// Bytes of memory available for weights and caches.
    pub free_memory: u64,
    pub cores: usize,
    pub threads: usize,
    /// Measured milliseconds for one transformer layer and one token.
    pub ms_per_layer: f64,
}

impl Capabilities {
    /// Free memory from sysinfo, cores, and a measured ms/layer.
    pub fn measure(mf: &ModelFile, threads: usize) -> Capabilities {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        let free_memory = sys.available_memory();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Capabilities {
            free_memory,
            cores,
            threads,
            ms_per_layer: measure_layer_ms(mf, threads).unwrap_or(1.0),
        }
    }
}

/// Times one middle layer on one token (the layer alone: no embedding, no head).
fn measure_layer_ms(mf: &ModelFile, threads: usize) -> Option<f64> {
    use crate::engine::{BatchSeq, OutputRows, Stage, StageConfig, StageInput};
    let n = mf.hparams.n_layer;
    if n < 3 {
        return None;
    }
    let il = n / 2;
    let mut stage = Stage::load(
        mf,
        StageConfig {
            range: LayerRange::new(il, il + 1),
            n_ctx: 64,
            n_slots: 1,
            n_threads: threads,
            repack: true,
            head_rows: None,
        },
    )
    .ok()?;
    let hidden = vec![0.01f32; mf.hparams.n_embd];
    let mut out = Vec::new();
    let mut best = f64::MAX;
    for i in 0..6 {
        let seq = BatchSeq {
            slot: 0,
            pos0: i,
            n_tokens: 1,
            output: OutputRows::Last,
        };
        let t = std::time::Instant::now();
        stage
            .forward(&[seq], StageInput::Hidden(&hidden), &mut out)
            .ok()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Some(best)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub from: String,
    pub protocol: u32,
    pub model_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloAck {
    pub name: String,
    pub protocol: u32,
    pub model_id: String,
    pub caps: Capabilities,
    /// Whether the node currently runs a plan (false after a restart).
    pub planned: bool,
    /// The sender id of this node's data-plane frames (random per process start).
    pub data_sender: u64,
}

/// The agreed plan, sent by the head to every node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// Identifies this plan (changes when the cluster re-forms).
    pub epoch: u64,
    pub model_id: String,
    /// Ranges in pipeline order, one per peer name.
    pub stages: Vec<PlannedStage>,
    pub n_ctx: usize,
    pub n_slots: usize,
    /// Max tokens per step (frame limit).
    pub batch: usize,
    /// Activations on the wire as f16 (else f32).
    pub f16: bool,
    /// Data-plane sender id of every stage, in order: a node accepts batches only
    /// from the stage before it (the head only from the last stage).
    pub senders: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedStage {
    pub name: String,
    /// Where this stage receives its input (its data address).
    pub address: String,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanAck {
    pub ok: bool,
    pub error: Option<String>,
    pub sender_id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pong {
    pub name: String,
    /// The epoch of the plan the node runs, 0 when none.
    pub epoch: u64,
    /// Milliseconds per token of this node's stage (moving average), 0 if unknown.
    pub ms_per_token: f64,
}

/// A sequence's sampling parameters, for the last stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotSetup {
    pub slot: usize,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: u32,
    pub prompt: Vec<i32>,
}

impl SlotSetup {
    pub fn new(slot: usize, p: &ggml_shim::llama::SamplingParams, prompt: &[i32]) -> SlotSetup {
        SlotSetup {
            slot,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            seed: p.seed,
            prompt: prompt.to_vec(),
        }
    }

    /// The sampling parameters it carries.
    pub fn sampling(&self) -> ggml_shim::llama::SamplingParams {
        ggml_shim::llama::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub message: String,
}

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
    pub head_bytes: u64,
    /// KV cache bytes per layer for the planned context and slots.
    pub kv_bytes_per_layer: u64,
}

impl ModelCosts {
    pub fn of(mf: &ModelFile, n_ctx: usize, n_slots: usize) -> ModelCosts {
        let hp = &mf.hparams;
        let mut layer_bytes = vec![0u64; hp.n_layer];
        let (mut embd_bytes, mut head_bytes) = (0, 0);
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
                head_bytes = t.size;
            }
        }
        if head_bytes == 0 {
            head_bytes = embd_bytes; // tied head: the embedding table is read per token
        }
        ModelCosts {
            layer_bytes,
            embd_bytes,
            head_bytes,
            kv_bytes_per_layer: (2 * hp.n_embd_kv() * 2 * n_ctx * n_slots) as u64,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the model has {layers} layers, fewer than the {nodes} nodes")]
    TooFewLayers { layers: usize, nodes: usize },
    #[error("no split fits: the model needs more memory than the nodes offer ({0})")]
    NoFit(String),
}

/// Contiguous ranges, one per node in order, that keep every node within its memory
/// and make the slowest stage as fast as possible. A stage's time per token is the
/// bytes it reads per token (its layers, plus the output head on the last stage)
/// at that node's measured speed, so a big head counts for what it costs.
pub fn plan_ranges(nodes: &[NodeInfo], costs: &ModelCosts) -> Result<Vec<LayerRange>, PlanError> {
    let n_layer = costs.layer_bytes.len();
    let p = nodes.len();
    if p == 0 || n_layer < p {
        return Err(PlanError::TooFewLayers {
            layers: n_layer,
            nodes: p,
        });
    }
    let avg_layer = (costs.layer_bytes.iter().sum::<u64>() as f64 / n_layer as f64).max(1.0);
    // prefix sums of layer bytes
    let mut pre = vec![0u64; n_layer + 1];
    for i in 0..n_layer {
        pre[i + 1] = pre[i] + costs.layer_bytes[i];
    }
    let stage = |node: usize, a: usize, b: usize| -> Option<f64> {
        let mut bytes = pre[b] - pre[a];
        let mut mem = bytes + costs.kv_bytes_per_layer * (b - a) as u64;
        let mut read = bytes as f64;
        if a == 0 {
            mem += costs.embd_bytes;
        }
        if b == n_layer {
            read += costs.head_bytes as f64;
            bytes += costs.head_bytes;
            if !(a == 0 && costs.head_bytes == costs.embd_bytes) {
                mem += costs.head_bytes;
            }
        }
        let _ = bytes;
        if mem > nodes[node].caps.free_memory {
            return None;
        }
        Some(read / avg_layer * nodes[node].caps.ms_per_layer.max(1e-3))
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
    Ok(ranges)
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
            },
        }
    }

    fn costs(layers: usize, head_mb: u64) -> ModelCosts {
        ModelCosts {
            layer_bytes: vec![4_000_000; layers],
            embd_bytes: head_mb * 1_000_000,
            head_bytes: head_mb * 1_000_000,
            kv_bytes_per_layer: 1_000_000,
        }
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
