//! The head node: forms the cluster (hello, capabilities, plan), runs the first
//! stage itself, and drives the pipeline for the scheduler with one step in flight
//! per stage. Heartbeats watch the peers: a missing one fails the steps in flight
//! within about two seconds, and a peer that comes back is given the plan again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ggml_shim::llama::{argmax, SamplerChain, SamplingParams};

use super::capabilities::Capabilities;
use super::planner::{self, ModelCosts, NodeInfo};
use super::proto::{self, Hello, HelloAck, Plan, PlanAck, PlannedStage, Pong, SlotSetup};
use super::transport::{ControlClient, DialOptions, PipelineRx, PipelineTx};
use super::wire::{
    Dtype, Frame, FrameKey, FrameType, HeadLogits, Limits, Opener, Payload, Sealer, FLAG_SOLO,
};
use crate::config::HeadSharePolicy;
use crate::engine::scheduler::{max_step_tokens, StepOutcome, Stepper};
use crate::engine::{BatchSeq, EngineError, SlotPool, Stage, StageConfig, StageInput, StageOutput};
use crate::model::{LayerRange, ModelFile};

/// One peer as the head sees it.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub name: String,
    /// Data-plane URL.
    pub address: String,
    /// Control-plane URL.
    pub control: String,
    pub layers: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
pub struct HeadSettings {
    pub name: String,
    pub listen: String,
    /// Peers in pipeline order; the first is this node.
    pub peers: Vec<PeerSpec>,
    pub key: Vec<u8>,
    pub threads: usize,
    pub n_ctx: usize,
    pub n_slots: usize,
    pub batch: usize,
    pub f16: bool,
    /// Whether (and how much of) the output head this node computes.
    pub head_share: crate::config::HeadSharePolicy,
}

/// Liveness and figures of each peer, shared with /health, /metrics and `exo status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerState {
    pub name: String,
    pub address: String,
    pub start: usize,
    pub end: usize,
    /// The rows of the output head this peer computes, when it computes any.
    pub head_rows: Option<(usize, usize)>,
    /// The rows it computes for a step alone in the pipeline, when those differ.
    pub head_rows_alone: Option<(usize, usize)>,
    pub alive: bool,
    pub rtt_ms: f64,
    pub ms_per_token: f64,
    /// Bytes this node sent to the next hop, and tokens they carried (head only).
    pub bytes_sent: u64,
    pub tokens_sent: u64,
    #[serde(skip)]
    pub last_seen: Option<Instant>,
}

pub type ClusterView = Arc<Mutex<Vec<PeerState>>>;

/// Heartbeat period; a peer silent for `DEAD_AFTER` is missing.
const HEARTBEAT: Duration = Duration::from_millis(250);
const DEAD_AFTER: Duration = Duration::from_millis(1200);
/// A step that never comes back (a frame lost on the way) fails after this.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Control {
    peers: Vec<(PeerSpec, ControlClient)>,
    sealer: Mutex<Sealer>,
    opener: Mutex<Opener>,
}

impl Control {
    /// One control request to a peer: sealed, sent, and the reply opened (an Error
    /// reply becomes an error).
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        client: &ControlClient,
        ft: FrameType,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> anyhow::Result<T> {
        let bytes = self
            .sealer
            .lock()
            .map_err(|_| anyhow::anyhow!("sealer poisoned"))?
            .seal_control(ft, 0, body)?;
        let reply = client.request(&bytes, timeout).await?;
        let mut opener = self
            .opener
            .lock()
            .map_err(|_| anyhow::anyhow!("opener poisoned"))?;
        let frame = opener.open(reply.as_bytes(), &Limits::control_only())?;
        if frame.frame_type == FrameType::Error {
            let e: proto::ErrorMsg = frame.control()?;
            bail!("{}", e.message);
        }
        Ok(frame.control()?)
    }
}

/// Forms the cluster and returns the stepper the scheduler drives.
pub async fn form(
    mf: Arc<ModelFile>,
    s: HeadSettings,
    frame_stats: Arc<super::wire::OpenerStats>,
) -> anyhow::Result<(ClusterStepper, ClusterView)> {
    let key = FrameKey::derive(&s.key);
    let model_hash = proto::model_hash(&mf);
    // our own data plane first: the last stage dials it
    let rx = PipelineRx::listen(&s.listen)
        .await
        .with_context(|| format!("data plane on {}", s.listen))?;
    let mut control = Control {
        peers: Vec::new(),
        sealer: Mutex::new(Sealer::with_random_id(key.clone())),
        opener: Mutex::new(Opener::new(key.clone()).with_stats(frame_stats.clone())),
    };
    // the head's data-plane sealer; every stage's data sender id goes into the plan
    let data_sealer = Sealer::with_random_id(key.clone());
    let mut senders = vec![data_sealer.sender_id()];
    for p in &s.peers[1..] {
        tracing::info!("waiting for peer {} at {}", p.name, p.control);
        let client = ControlClient::dial(
            &p.control,
            &DialOptions {
                connect_timeout: Duration::from_secs(3600),
                ..DialOptions::default()
            },
        )
        .await
        .with_context(|| format!("dialing peer {}", p.name))?;
        control.peers.push((p.clone(), client));
    }
    // hello: identities and capabilities
    let my_caps = {
        let mf = mf.clone();
        let threads = s.threads;
        tokio::task::spawn_blocking(move || Capabilities::measure(&mf, threads)).await?
    };
    tracing::info!("this node ({}): {my_caps}", s.name);
    let mut nodes = vec![NodeInfo {
        name: s.name.clone(),
        caps: my_caps,
    }];
    let hello = Hello {
        from: s.name.clone(),
        protocol: proto::PROTOCOL,
        model_hash: model_hash.clone(),
    };
    for (p, client) in &control.peers {
        let ack: HelloAck = loop {
            match control
                .ask(client, FrameType::Hello, &hello, Duration::from_secs(5))
                .await
            {
                Ok(a) => break a,
                Err(e)
                    if e.downcast_ref::<super::wire::FrameError>()
                        .is_some_and(|f| f.reason() == super::wire::DropReason::Forged) =>
                {
                    bail!(
                        "peer {} does not share the cluster key: its reply fails authentication",
                        p.name
                    );
                }
                Err(e) => {
                    tracing::info!("waiting for peer {}: {e:#}", p.name);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        };
        if ack.model_hash != model_hash {
            bail!(
                "peer {} has a different model (id {}…, ours {}…): every node needs the same GGUF file",
                p.name,
                &ack.model_hash[..12.min(ack.model_hash.len())],
                &model_hash[..12]
            );
        }
        if ack.name != p.name {
            bail!(
                "peer at {} calls itself '{}', the config says '{}'",
                p.control,
                ack.name,
                p.name
            );
        }
        tracing::info!("peer {}: {}", p.name, ack.caps);
        senders.push(ack.data_sender);
        nodes.push(NodeInfo {
            name: p.name.clone(),
            caps: ack.caps,
        });
    }
    // the plan: explicit ranges, or the planner's
    let n_layer = mf.hparams.n_layer;
    let n_vocab = mf.hparams.n_vocab;
    let costs = ModelCosts::of(&mf, s.n_ctx, s.n_slots);
    let (ranges, head_rows): (Vec<LayerRange>, usize) =
        if s.peers.iter().all(|p| p.layers.is_some()) {
            let r: Vec<LayerRange> = s
                .peers
                .iter()
                .filter_map(|p| p.layers.map(|(a, b)| LayerRange::new(a, b)))
                .collect();
            if r.last().map(|l| l.end) != Some(n_layer) {
                bail!(
                    "the configured layer ranges end at {:?}, the model has {n_layer} layers",
                    r.last().map(|l| l.end)
                );
            }
            (r, fixed_head_rows(s.head_share, n_vocab))
        } else {
            match s.head_share {
                HeadSharePolicy::Auto => {
                    let p = planner::plan_cluster(&nodes, &costs, n_vocab)?;
                    (p.ranges, p.head_rows)
                }
                HeadSharePolicy::Off => (planner::plan_ranges(&nodes, &costs)?, 0),
                HeadSharePolicy::Share(f) => (
                    planner::plan_with_head_share(&nodes, &costs, f)?.0,
                    fixed_head_rows(s.head_share, n_vocab),
                ),
            }
        };
    let plan = Plan {
        epoch: rand_epoch(),
        model_hash: model_hash.clone(),
        stages: s
            .peers
            .iter()
            .zip(&ranges)
            .map(|(p, r)| PlannedStage {
                name: p.name.clone(),
                address: p.address.clone(),
                start: r.start,
                end: r.end,
            })
            .collect(),
        n_ctx: s.n_ctx,
        n_slots: s.n_slots,
        batch: s.batch,
        f16: s.f16,
        senders,
        head_rows,
        head_rows_solo: match (nodes.first(), nodes.last()) {
            (Some(a), Some(b)) => planner::solo_head_rows(
                &a.caps,
                &b.caps,
                costs.avg_layer_bytes(),
                head_rows,
                n_vocab,
            ),
            _ => 0,
        },
    };
    for (p, client) in &control.peers {
        let ack: PlanAck = control
            .ask(client, FrameType::Plan, &plan, Duration::from_secs(300))
            .await
            .with_context(|| format!("sending the plan to {}", p.name))?;
        if !ack.ok {
            bail!(
                "peer {} refused the plan: {}",
                p.name,
                ack.error.unwrap_or_default()
            );
        }
    }
    let summary: Vec<String> = plan
        .stages
        .iter()
        .map(|st| format!("{} {}..{}", st.name, st.start, st.end))
        .collect();
    if head_rows > 0 {
        tracing::info!(
            "cluster formed: {}; output head split: {} computes vocabulary rows 0..{head_rows}, {} the other {}",
            summary.join(", "),
            s.name,
            plan.stages.last().map_or("?", |st| st.name.as_str()),
            n_vocab - head_rows
        );
    } else {
        tracing::info!("cluster formed: {}", summary.join(", "));
    }
    // our stage and the link to the next one
    let local = {
        let mf = mf.clone();
        let cfg = StageConfig {
            range: ranges[0],
            n_ctx: s.n_ctx,
            n_slots: s.n_slots,
            n_threads: s.threads,
            repack: true,
            head_rows: (head_rows > 0).then_some(0..head_rows),
        };
        tokio::task::spawn_blocking(move || Stage::load(&mf, cfg)).await??
    };
    // a step alone takes the even split only if this stage reaches those rows
    let solo_rows = match local.head_reach() {
        Some(r)
            if r.start == 0 && plan.head_rows_solo > head_rows && plan.head_rows_solo <= r.end =>
        {
            tracing::info!(
                "a step alone in the pipeline splits the head at row {}",
                plan.head_rows_solo
            );
            plan.head_rows_solo
        }
        _ => head_rows,
    };
    let tx = PipelineTx::dial(&s.peers[1].address, &DialOptions::default()).await?;
    let view: ClusterView = Arc::new(Mutex::new(
        plan.stages
            .iter()
            .enumerate()
            .map(|(i, st)| PeerState {
                name: st.name.clone(),
                address: st.address.clone(),
                start: st.start,
                end: st.end,
                head_rows: if i == 0 && head_rows > 0 {
                    Some((0, head_rows))
                } else if i + 1 == plan.stages.len() {
                    Some((head_rows, n_vocab))
                } else {
                    None
                },
                head_rows_alone: if solo_rows == head_rows {
                    None
                } else if i == 0 {
                    Some((0, solo_rows))
                } else if i + 1 == plan.stages.len() {
                    Some((solo_rows, n_vocab))
                } else {
                    None
                },
                alive: true,
                rtt_ms: 0.0,
                ms_per_token: 0.0,
                bytes_sent: 0,
                tokens_sent: 0,
                last_seen: Some(Instant::now()),
            })
            .collect(),
    ));
    let last_sender = Arc::new(std::sync::atomic::AtomicU64::new(
        plan.senders.last().copied().unwrap_or(0),
    ));
    tokio::spawn(heartbeats(
        Arc::new(control),
        plan.clone(),
        view.clone(),
        last_sender.clone(),
    ));
    let limits = Limits {
        max_seqs: s.n_slots,
        max_tokens: max_step_tokens(s.batch, s.n_slots),
        width: mf.hparams.n_embd,
        n_ctx: s.n_ctx,
        n_slots: s.n_slots,
        n_vocab: mf.hparams.n_vocab,
        max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
    };
    let stepper = ClusterStepper {
        rt: tokio::runtime::Handle::current(),
        local,
        tx,
        rx,
        sealer: data_sealer,
        opener: Opener::new(key).with_stats(frame_stats),
        last_sender,
        allowed_last: 0,
        limits,
        width: mf.hparams.n_embd,
        dtype: if s.f16 { Dtype::F16 } else { Dtype::F32 },
        n_ctx: s.n_ctx,
        n_vocab: mf.hparams.n_vocab,
        n_stages: s.peers.len(),
        slots: SlotPool::new(s.n_slots),
        view: view.clone(),
        hidden: Vec::new(),
        in_flight: 0,
        split: (head_rows > 0).then(|| HeadSplit {
            rows: head_rows,
            solo_rows,
            samplers: HashMap::new(),
            normed: Vec::new(),
            pending: HashMap::new(),
            spare: Vec::new(),
            full: Vec::new(),
        }),
    };
    Ok((stepper, view))
}

/// The head rows of a fixed `[cluster] head_share` (0 for none).
fn fixed_head_rows(policy: HeadSharePolicy, n_vocab: usize) -> usize {
    match policy {
        HeadSharePolicy::Share(f) if n_vocab >= 2 => planner::share_rows(f, n_vocab),
        _ => 0,
    }
}

fn rand_epoch() -> u64 {
    super::wire::random_sender_id()
}

/// Gives a restarted peer (index `i` among the workers) the plan again, with its new
/// data sender id, and tells the stage after it (or the head) to accept that id.
async fn rejoin(
    control: &Control,
    plan: &mut Plan,
    i: usize,
    last_sender: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<PlanAck> {
    let (p, client) = &control.peers[i];
    let hello = Hello {
        from: plan.stages[0].name.clone(),
        protocol: proto::PROTOCOL,
        model_hash: plan.model_hash.clone(),
    };
    let ack: HelloAck = control
        .ask(client, FrameType::Hello, &hello, DEAD_AFTER)
        .await?;
    if ack.model_hash != plan.model_hash {
        bail!("peer {} now has a different model", p.name);
    }
    plan.senders[i + 1] = ack.data_sender;
    let r: PlanAck = control
        .ask(client, FrameType::Plan, &*plan, Duration::from_secs(300))
        .await?;
    if let Some((next, next_client)) = control.peers.get(i + 1) {
        let a: PlanAck = control
            .ask(
                next_client,
                FrameType::Plan,
                &*plan,
                Duration::from_secs(300),
            )
            .await?;
        if !a.ok {
            bail!(
                "peer {} refused the updated plan: {}",
                next.name,
                a.error.unwrap_or_default()
            );
        }
    } else {
        last_sender.store(ack.data_sender, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(r)
}

/// Pings every peer; marks the silent ones missing, and gives the plan again to
/// one that comes back without it (restarted).
async fn heartbeats(
    control: Arc<Control>,
    mut plan: Plan,
    view: ClusterView,
    last_sender: Arc<std::sync::atomic::AtomicU64>,
) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        for (i, (p, client)) in control.peers.iter().enumerate() {
            let t0 = Instant::now();
            let pong: anyhow::Result<Pong> = control
                .ask(client, FrameType::Ping, &serde_json::json!({}), DEAD_AFTER)
                .await;
            let now = Instant::now();
            let mut replan = false;
            if let Ok(mut v) = view.lock() {
                let Some(st) = v.get_mut(i + 1) else { continue };
                match &pong {
                    Ok(pong) => {
                        st.last_seen = Some(now);
                        st.rtt_ms = (now - t0).as_secs_f64() * 1e3;
                        st.ms_per_token = pong.ms_per_token;
                        // alive again only once it runs our plan
                        replan = pong.epoch != plan.epoch;
                        if replan && st.alive {
                            tracing::warn!("peer {} lost its plan (restarted?)", p.name);
                        }
                        st.alive = !replan;
                    }
                    Err(e) => {
                        if st.alive && st.last_seen.is_none_or(|t| now - t > DEAD_AFTER) {
                            tracing::warn!("peer {} is missing: {e:#}", p.name);
                            st.alive = false;
                        }
                    }
                }
            }
            if replan {
                tracing::info!(
                    "peer {} runs no plan (restarted?): sending it again",
                    p.name
                );
                let r = rejoin(&control, &mut plan, i, &last_sender).await;
                match r {
                    Ok(a) if a.ok => {
                        tracing::info!("peer {} rejoined", p.name);
                        if let Ok(mut v) = view.lock() {
                            if let Some(st) = v.get_mut(i + 1) {
                                st.alive = true;
                            }
                        }
                    }
                    Ok(a) => tracing::error!(
                        "peer {} refused the plan: {}",
                        p.name,
                        a.error.unwrap_or_default()
                    ),
                    Err(e) => tracing::warn!("peer {}: {e:#}", p.name),
                }
            }
        }
    }
}

/// The scheduler's view of the cluster.
pub struct ClusterStepper {
    rt: tokio::runtime::Handle,
    local: Stage,
    tx: PipelineTx,
    rx: PipelineRx,
    sealer: Sealer,
    opener: Opener,
    limits: Limits,
    width: usize,
    dtype: Dtype,
    n_ctx: usize,
    n_vocab: usize,
    n_stages: usize,
    slots: SlotPool,
    view: ClusterView,
    hidden: Vec<f32>,
    /// The last stage's data sender id (changes when it restarts) and the one allowed.
    last_sender: Arc<std::sync::atomic::AtomicU64>,
    allowed_last: u64,
    /// When the output head is split: this node's share, and the sampling.
    split: Option<HeadSplit>,
    /// Steps launched and not yet answered.
    in_flight: usize,
}

/// The head node's part of a split output head: it computes the logits of rows
/// `0..rows` from the normalized hidden state the last stage sends back, merges
/// them with the last stage's logits, and samples.
struct HeadSplit {
    rows: usize,
    /// This node's rows for a step launched alone ([`FLAG_SOLO`]; `rows` if the
    /// even split is out of this stage's reach).
    solo_rows: usize,
    /// Per slot: the sampler chain, or None for greedy.
    samplers: HashMap<usize, Option<SamplerChain>>,
    normed: Vec<f32>,
    /// Per step in flight: this node's rows and their logits, computed when the
    /// normalized state arrived, waiting for the last stage's part.
    pending: HashMap<u64, (usize, Vec<f32>)>,
    /// Buffers of finished steps, reused for the next ones (about 1 MB each).
    spare: Vec<Vec<f32>>,
    full: Vec<f32>,
}

impl HeadSplit {
    /// The token of every output row of `seqs`: this node's logits `part` (`rows`
    /// values a row) merged with the last stage's `theirs`.
    fn sample_rows(
        &mut self,
        seqs: &[BatchSeq],
        rows: usize,
        part: &[f32],
        theirs: &[HeadLogits],
        n_vocab: usize,
    ) -> Result<Vec<i32>, EngineError> {
        let mut toks = Vec::with_capacity(theirs.len());
        let slots = seqs
            .iter()
            .flat_map(|d| std::iter::repeat_n(d.slot, d.output_rows()));
        for (r, slot) in slots.enumerate() {
            let (Some(mine), Some(t)) = (part.get(r * rows..(r + 1) * rows), theirs.get(r)) else {
                return Err(EngineError::Pipeline("head part: missing rows".into()));
            };
            toks.push(self.sample(slot, rows, mine, t, n_vocab)?);
        }
        Ok(toks)
    }

    /// One output row's token from this node's logits `mine` (ids `0..rows`) and
    /// the last stage's `theirs`.
    fn sample(
        &mut self,
        slot: usize,
        rows: usize,
        mine: &[f32],
        theirs: &HeadLogits,
        n_vocab: usize,
    ) -> Result<i32, EngineError> {
        let bad = |why: String| EngineError::Pipeline(format!("head part: {why}"));
        if let HeadLogits::Top(c) = theirs {
            if let Some(&(id, _)) = c.iter().find(|(id, _)| (*id as usize) < rows) {
                return Err(bad(format!("candidate {id} belongs to this node's rows")));
            }
        }
        if let HeadLogits::Dense { first, logits } = theirs {
            if *first as usize != rows || rows + logits.len() != n_vocab {
                return Err(bad(format!(
                    "logits for ids {first}..{}, expected {rows}..{n_vocab}",
                    *first as usize + logits.len()
                )));
            }
        }
        let Some(chain) = self.samplers.get_mut(&slot) else {
            return Err(bad(format!("slot {slot} has no sampling set-up")));
        };
        let Some(chain) = chain else {
            // greedy: the better of the two bests; on a tie the lower id, as argmax
            let mine_best = argmax(mine).map(|i| (i as i32, mine[i]));
            let their_best = match theirs {
                HeadLogits::Top(c) => c.iter().copied().reduce(|a, b| {
                    if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) {
                        b
                    } else {
                        a
                    }
                }),
                HeadLogits::Dense { first, logits } => {
                    argmax(logits).map(|i| ((*first as usize + i) as i32, logits[i]))
                }
            };
            return match (mine_best, their_best) {
                (Some(m), Some(t)) => Ok(if m.1 >= t.1 { m.0 } else { t.0 }),
                (Some(m), None) => Ok(m.0),
                (None, Some(t)) => Ok(t.0),
                (None, None) => Err(bad("no logits".into())),
            };
        };
        let t = match theirs {
            HeadLogits::Top(c) => chain.sample_candidates(
                mine.iter()
                    .enumerate()
                    .map(|(i, &l)| (i as i32, l))
                    .chain(c.iter().copied()),
            )?,
            HeadLogits::Dense { logits, .. } => {
                self.full.clear();
                self.full.extend_from_slice(mine);
                self.full.extend_from_slice(logits);
                chain.sample(&self.full)?
            }
        };
        chain.accept(t);
        Ok(t)
    }
}

impl ClusterStepper {
    fn missing_peer(&self) -> Option<String> {
        let v = self.view.lock().ok()?;
        v.iter().skip(1).find(|p| !p.alive).map(|p| p.name.clone())
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.rt
            .block_on(self.tx.send_timeout(bytes, Some(DEAD_AFTER)))
            .map_err(|e| EngineError::Pipeline(format!("sending to the next stage: {e}")))
    }

    /// A split head's normalized state arrived: this node computes its rows of the
    /// head now, while the last stage computes the others.
    fn start_head(&mut self, frame: &Frame<'_>) -> Result<(), EngineError> {
        let Some(split) = self.split.as_mut() else {
            return Err(EngineError::Pipeline("the head is not split".into()));
        };
        frame
            .normed(&mut split.normed)
            .map_err(|e| EngineError::Pipeline(e.to_string()))?;
        if split.pending.len() >= 2 * self.n_stages + 2 {
            // left over from failed steps
            split.pending.clear();
        }
        // The flag comes back with the step from the last stage, which split its
        // rows by it (the frame is authenticated; ids are checked when merging).
        let rows = if frame.flags & FLAG_SOLO != 0 {
            split.solo_rows
        } else {
            split.rows
        };
        let mut part = split.spare.pop().unwrap_or_default();
        self.local.project(&split.normed, 0..rows, &mut part)?;
        split.pending.insert(frame.step_id, (rows, part));
        Ok(())
    }

    /// A split head's step result: this node's logits (from [`Self::start_head`])
    /// merged with the last stage's part, and sampled.
    fn finish_head(&mut self, frame: &Frame<'_>) -> Result<Vec<i32>, EngineError> {
        let Some(split) = self.split.as_mut() else {
            return Err(EngineError::Pipeline("the head is not split".into()));
        };
        let theirs = frame
            .head_part()
            .map_err(|e| EngineError::Pipeline(e.to_string()))?;
        let Some((rows, part)) = split.pending.remove(&frame.step_id) else {
            return Err(EngineError::Pipeline(format!(
                "head part of step {} without its normalized state",
                frame.step_id
            )));
        };
        let toks = split.sample_rows(&frame.seqs, rows, &part, theirs, self.n_vocab);
        split.spare.push(part);
        toks
    }
}

impl Stepper for ClusterStepper {
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }
    fn max_in_flight(&self) -> usize {
        self.n_stages
    }
    fn acquire_slot(&mut self) -> Result<usize, EngineError> {
        self.slots.acquire()
    }
    fn release_slot(&mut self, slot: usize) {
        self.slots.release(slot);
    }
    fn samples_remotely(&self) -> bool {
        true
    }
    fn setup_slot(
        &mut self,
        slot: usize,
        p: &SamplingParams,
        prompt: &[i32],
    ) -> Result<(), EngineError> {
        if let Some(split) = self.split.as_mut() {
            split
                .samplers
                .insert(slot, SamplerChain::for_sequence(p, prompt)?);
        }
        let setup = SlotSetup::new(slot, p, prompt);
        let bytes = self
            .sealer
            .seal_control(FrameType::Setup, 0, &setup)
            .map_err(|e| EngineError::Pipeline(e.to_string()))?;
        self.send(&bytes)
    }
    fn launch(&mut self, step: u64, seqs: &[BatchSeq], tokens: &[i32]) -> Result<(), EngineError> {
        if let Some(p) = self.missing_peer() {
            return Err(EngineError::Pipeline(format!("peer {p} is missing")));
        }
        let t0 = Instant::now();
        let kind = self
            .local
            .forward(seqs, StageInput::Tokens(tokens), &mut self.hidden)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3 / tokens.len().max(1) as f64;
        if kind != StageOutput::Hidden {
            return Err(EngineError::Pipeline(
                "the head's stage must not be the last".into(),
            ));
        }
        // Alone in the pipeline, a step's head is all that both nodes wait for:
        // split it evenly instead of by the plan's balance of whole stages.
        let solo = self.in_flight == 0
            && self
                .split
                .as_ref()
                .is_some_and(|sp| sp.solo_rows != sp.rows);
        self.sealer.set_step_flags(if solo { FLAG_SOLO } else { 0 });
        let bytes = self
            .sealer
            .seal(
                step,
                seqs,
                Payload::activations(&self.hidden, self.width, self.dtype),
            )
            .map_err(|e| EngineError::Pipeline(e.to_string()))?;
        if let Ok(mut v) = self.view.lock() {
            if let Some(me) = v.first_mut() {
                me.ms_per_token = if me.ms_per_token == 0.0 {
                    ms
                } else {
                    0.9 * me.ms_per_token + 0.1 * ms
                };
                me.bytes_sent += bytes.len() as u64;
                me.tokens_sent += tokens.len() as u64;
            }
        }
        self.send(&bytes)?;
        self.in_flight += 1;
        Ok(())
    }
    fn wait(&mut self) -> Result<(u64, StepOutcome), EngineError> {
        let r = self.wait_step();
        self.in_flight = match &r {
            Ok(_) => self.in_flight.saturating_sub(1),
            // the scheduler fails every step in flight (a wrong count only makes a
            // step take the other, equally exact, split of the head)
            Err(_) => 0,
        };
        r
    }
}

impl ClusterStepper {
    fn wait_step(&mut self) -> Result<(u64, StepOutcome), EngineError> {
        let last = self.last_sender.load(std::sync::atomic::Ordering::SeqCst);
        if last != self.allowed_last {
            self.opener.allow_sender(last);
            self.allowed_last = last;
        }
        let started = Instant::now();
        loop {
            if started.elapsed() > STEP_TIMEOUT {
                return Err(EngineError::Pipeline(format!(
                    "no answer from the pipeline in {} s",
                    STEP_TIMEOUT.as_secs()
                )));
            }
            let r = self
                .rt
                .block_on(self.rx.recv(Some(Duration::from_millis(250))));
            let pkt = match r {
                Ok(p) => p,
                Err(e) if e.is_timeout() => {
                    if let Some(p) = self.missing_peer() {
                        return Err(EngineError::Pipeline(format!("peer {p} is missing")));
                    }
                    continue;
                }
                Err(e) => return Err(EngineError::Pipeline(format!("receiving tokens: {e}"))),
            };
            let frame = match self.opener.open(pkt.as_bytes(), &self.limits) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("frame from the pipeline dropped: {e}");
                    continue;
                }
            };
            if matches!(
                frame.frame_type,
                FrameType::Tokens | FrameType::HeadPart | FrameType::Normed
            ) {
                // the return hop, counted where it arrives (a split head's rows once)
                let rows: u64 = if frame.frame_type == FrameType::Normed {
                    0
                } else {
                    BatchSeq::output_rows_of(&frame.seqs) as u64
                };
                if let Ok(mut v) = self.view.lock() {
                    if let Some(last) = v.last_mut() {
                        last.bytes_sent += pkt.as_bytes().len() as u64;
                        last.tokens_sent += rows;
                    }
                }
            }
            if frame.frame_type == FrameType::Error {
                let msg = frame
                    .control::<proto::ErrorMsg>()
                    .map(|m| m.message)
                    .unwrap_or_else(|_| "a stage failed".into());
                return Err(EngineError::Pipeline(msg));
            }
            if frame.frame_type == FrameType::Normed && self.split.is_some() {
                self.start_head(&frame)?;
                continue;
            }
            if frame.frame_type == FrameType::HeadPart && self.split.is_some() {
                let toks = self.finish_head(&frame)?;
                return Ok((frame.step_id, StepOutcome::Tokens(toks)));
            }
            if frame.frame_type != FrameType::Tokens {
                tracing::warn!(
                    "unexpected {} frame on the head's data plane",
                    frame.frame_type.name()
                );
                continue;
            }
            let toks = frame
                .tokens()
                .map_err(|e| EngineError::Pipeline(e.to_string()))?;
            return Ok((frame.step_id, StepOutcome::Tokens(toks.to_vec())));
        }
    }
}
