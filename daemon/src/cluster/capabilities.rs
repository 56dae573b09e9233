//! What a node offers the planner: free memory, cores, and its speed, measured by
//! timing a few layers and a band of the `lm_head` of the model it serves.

use serde::{Deserialize, Serialize};

use super::planner::ModelCosts;
use crate::model::{LayerRange, ModelFile};

/// What a node offers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Capabilities {
    /// Bytes of memory the node offers for weights, caches and the runtime: its
    /// `[node] memory`, or what the system reports available (the name is the wire's).
    pub free_memory: u64,
    pub cores: usize,
    pub threads: usize,
    /// Measured milliseconds for one transformer layer and one token.
    pub ms_per_layer: f64,
    /// Measured milliseconds for one token through one MB of the `lm_head` (its
    /// kernel differs from the layers'); 0 when not measured: the `lm_head` then counts
    /// by its bytes at the layers' speed.
    #[serde(default, rename = "ms_per_head_mb")]
    pub ms_per_lm_head_mb: f64,
}

impl Capabilities {
    /// The memory offered (`[node] memory`, else what sysinfo reports available),
    /// cores, and measured speeds.
    pub fn measure(mf: &ModelFile, threads: usize, memory: Option<u64>) -> Capabilities {
        let (ms_per_layer, ms_per_lm_head_mb) = measure_speed(mf, threads).unwrap_or((1.0, 0.0));
        Capabilities {
            ms_per_layer,
            ms_per_lm_head_mb,
            ..Capabilities::unmeasured(threads, memory)
        }
    }

    /// What a node without the model offers: its memory (`[node] memory`, else what
    /// sysinfo reports available) and cores; its speed is unknown (0) until it holds
    /// a slice, and the head plans it at its own.
    pub fn unmeasured(threads: usize, memory: Option<u64>) -> Capabilities {
        Capabilities {
            free_memory: offered_memory(memory),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads,
            ms_per_layer: 0.0,
            ms_per_lm_head_mb: 0.0,
        }
    }

    /// A node known only by the memory it offers (its speed unmeasured: 1 ms a
    /// layer), for checks before any peer is asked.
    pub fn offering(free_memory: u64) -> Capabilities {
        Capabilities {
            free_memory,
            cores: 1,
            threads: 1,
            ms_per_layer: 1.0,
            ms_per_lm_head_mb: 0.0,
        }
    }

    /// Whether the node timed the model (else its speed is unknown).
    pub fn is_measured(&self) -> bool {
        self.ms_per_layer > 0.0
    }

    /// Milliseconds for one token through `bytes` of the `lm_head`, given the
    /// average bytes of a layer.
    pub(super) fn lm_head_ms(&self, bytes: f64, avg_layer_bytes: f64) -> f64 {
        if self.ms_per_lm_head_mb > 0.0 {
            bytes / 1e6 * self.ms_per_lm_head_mb
        } else {
            bytes / avg_layer_bytes * self.ms_per_layer.max(1e-3)
        }
    }
}

/// The memory a node offers the planner: `configured` (`[node] memory`), or what
/// sysinfo reports available now.
pub fn offered_memory(configured: Option<u64>) -> u64 {
    configured.unwrap_or_else(|| {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        sys.available_memory()
    })
}

impl std::fmt::Display for Capabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MB offered, {} cores, {:.3} ms/layer, {:.4} ms per MB of head",
            self.free_memory / 1_000_000,
            self.cores,
            self.ms_per_layer,
            self.ms_per_lm_head_mb
        )
    }
}

/// Tokens per measured step: about the micro-batch of a busy pipeline, where the
/// weights read per step are shared by several tokens.
const MEASURE_TOKENS: usize = 4;

/// Timed runs: up to `MEASURE_RUNS` (about 9 ms each, layers and `lm_head` band, for
/// Gemma 3 270M on one x86 core), or fewer, but at least `MEASURE_MIN_RUNS`, once
/// `MEASURE_BUDGET` has passed (a slow node, or one under emulation at ~10 s a run,
/// would otherwise time for minutes).
const MEASURE_RUNS: usize = 48;
const MEASURE_MIN_RUNS: usize = 5;
const MEASURE_BUDGET: std::time::Duration = std::time::Duration::from_millis(400);

/// Bytes of weights the timing loads, of layers and of the `lm_head` each: enough that
/// they are not measured from a much warmer cache than the running model sees.
const MEASURE_BYTES: u64 = 32_000_000;

/// Times a run of middle layers and a band of the `lm_head` on a few tokens, in
/// interleaved runs: ms per layer and token, and ms per MB of `lm_head` and token.
/// A band of the `lm_head` runs a little warmer in the cache than the whole `lm_head`: about
/// 15% with exo's prefetching kernels. ggml's own kernels, which wait on memory,
/// ran a band at half the cost per byte of the whole `lm_head`, so where they do the
/// head's work (other CPUs, other head types) the head is not timed (0): it counts
/// by its bytes at the layers' speed, within about 10% on Gemma 3 270M with them.
fn measure_speed(mf: &ModelFile, threads: usize) -> Option<(f64, f64)> {
    use crate::engine::{BatchSeq, OutputRows, Stage, StageConfig, StageInput};
    let hp = &mf.hparams;
    let n = hp.n_layer;
    if n < 3 {
        return None;
    }
    let costs = ModelCosts::of(mf, 64, 1);
    // layers 1.. (neither the first nor the last), up to MEASURE_BYTES
    let mut end = 2;
    let mut bytes = costs.layer_bytes[1];
    while end < n - 1 && bytes + costs.layer_bytes[end] <= MEASURE_BYTES {
        bytes += costs.layer_bytes[end];
        end += 1;
    }
    let n_layers = end - 1;
    let row_bytes = (costs.lm_head_bytes / hp.n_vocab.max(1) as u64).max(1);
    let band = ((MEASURE_BYTES / row_bytes) as usize).clamp(1, hp.n_vocab.max(1));
    let band_mb = (band as u64 * row_bytes) as f64 / 1e6;
    let time_lm_head = costs.lm_head_bytes > 0
        && mf
            .head_tensor()
            .is_some_and(|t| ggml_shim::qmatmul::takes(t.dtype));
    let mut stage = Stage::load(
        mf,
        StageConfig {
            range: LayerRange::new(1, end),
            n_ctx: 64,
            n_slots: MEASURE_TOKENS,
            n_threads: threads,
            repack: true,
            lm_head_rows: time_lm_head.then_some(0..band),
        },
    )
    .ok()?;
    let hidden = vec![0.01f32; hp.n_embd * MEASURE_TOKENS];
    let mut out = Vec::new();
    let (mut layer_runs, mut lm_head_runs) = (Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    for i in 0..MEASURE_RUNS {
        if i >= MEASURE_MIN_RUNS && started.elapsed() >= MEASURE_BUDGET {
            break;
        }
        let seqs: Vec<BatchSeq> = (0..MEASURE_TOKENS)
            .map(|slot| BatchSeq {
                slot,
                pos0: i,
                n_tokens: 1,
                output: OutputRows::None,
            })
            .collect();
        let t = std::time::Instant::now();
        stage
            .forward(&seqs, StageInput::Hidden(&hidden), &mut out)
            .ok()?;
        layer_runs.push(t.elapsed().as_secs_f64() * 1e3);
        if time_lm_head {
            let t = std::time::Instant::now();
            stage.project(&hidden, 0..band, &mut out).ok()?;
            lm_head_runs.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let per_token = |runs: &mut Vec<f64>, units: f64| -> f64 {
        // the first runs warm the cache; the median of the rest is steadier than the best
        let mut warm = runs.split_off(runs.len() / 4);
        warm.sort_by(f64::total_cmp);
        warm.get(warm.len() / 2)
            .map_or(0.0, |ms| ms / MEASURE_TOKENS as f64 / units)
    };
    let ms_per_layer = per_token(&mut layer_runs, n_layers as f64);
    let ms_per_lm_head_mb = per_token(&mut lm_head_runs, band_mb);
    Some((ms_per_layer, ms_per_lm_head_mb))
}
