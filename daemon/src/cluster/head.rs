//! The head node: forms the cluster (hello, capabilities, plan), runs the first
//! stage itself, and drives the pipeline for the scheduler with one step in flight
//! per stage. Heartbeats watch the peers (all at once, every period): a missing one
//! fails the steps in flight within about two seconds, and a peer that comes back is
//! given the plan again, in a task of its own while the heartbeats go on.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::admission::{Admission, Listeners};
use super::capabilities::Capabilities;
use super::control::{Control, Refused};
use super::planner::{self, ModelCosts, NodeInfo};
use super::proto::{self, Hello, HelloAck, Plan, PlanAck, PlannedStage, Pong};
use super::remote::{FirstStage, LmHeadSplit, RemoteStages, SEND_TIMEOUT};
use super::slices::send::{self, Delivered, Source};
use super::slices::{Manifest, Progress};
use super::transport::{ControlClient, DialOptions, PipelineRx, PipelineTx, TransportError};
use super::wire::{DropReason, Dtype, FrameError, FrameKey, FrameType, Limits, Opener, Sealer};
use crate::config::{HeadSharePolicy, PeerConfig};
use crate::engine::scheduler::max_step_tokens;
use crate::engine::{Pipeline, Stage, StageConfig};
use crate::log_every::LogEvery;
use crate::model::{LayerRange, ModelFile};

#[derive(Debug, Clone)]
pub struct HeadSettings {
    pub name: String,
    pub listen: String,
    /// Peers in pipeline order (as configured); the first is this node.
    pub peers: Vec<PeerConfig>,
    pub key: Vec<u8>,
    pub threads: usize,
    pub n_ctx: usize,
    pub n_slots: usize,
    pub batch: usize,
    pub f16: bool,
    /// Whether (and how much of) the `lm_head` this node computes.
    pub head_share: crate::config::HeadSharePolicy,
    /// `[node] memory` in bytes (None: what the system reports available).
    pub memory: Option<u64>,
    /// Where the manifest of the model's chunks is cached (for workers that receive
    /// their slices from this node).
    pub cache_dir: PathBuf,
}

/// What the head needs to give workers without a model file their slices.
struct Slicer {
    mf: Arc<ModelFile>,
    model_hash: String,
    name: String,
    cache_dir: PathBuf,
    progress: Progress,
    /// Hashed once, when a worker first needs a slice.
    manifest: tokio::sync::OnceCell<Manifest>,
}

impl Slicer {
    /// Gives worker stage `i` of `plan` what it misses of its slice.
    async fn deliver(
        &self,
        control: &Control,
        client: &ControlClient,
        plan: &Plan,
        i: usize,
    ) -> anyhow::Result<Delivered> {
        let manifest = self
            .manifest
            .get_or_try_init(|| {
                let (path, hash, dir) = (
                    self.mf.gguf.path().to_path_buf(),
                    self.model_hash.clone(),
                    self.cache_dir.clone(),
                );
                async move {
                    tokio::task::spawn_blocking(move || {
                        Manifest::load_or_compute(&path, &hash, &dir)
                    })
                    .await?
                    .map_err(anyhow::Error::from)
                }
            })
            .await?;
        let src = Source {
            mf: &self.mf,
            manifest,
            model_hash: &self.model_hash,
            from: &self.name,
            progress: &self.progress,
        };
        send::deliver(control, client, &src, plan, i).await
    }
}

/// Liveness and figures of each peer, shared with /health, /metrics and `exo status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerState {
    pub name: String,
    pub address: String,
    pub start: usize,
    pub end: usize,
    /// The rows of the `lm_head` this peer computes, when it computes any.
    #[serde(rename = "head_rows")]
    pub lm_head_rows: Option<(usize, usize)>,
    /// The rows it computes for a step alone in the pipeline, when those differ.
    #[serde(rename = "head_rows_alone")]
    pub lm_head_rows_alone: Option<(usize, usize)>,
    pub alive: bool,
    pub rtt_ms: f64,
    pub ms_per_token: f64,
    /// Computing a step at its last pong.
    #[serde(skip)]
    pub busy: bool,
    /// Bytes this node sent to the next hop, and tokens they carried (head only).
    pub bytes_sent: u64,
    pub tokens_sent: u64,
    #[serde(skip)]
    pub last_seen: Option<Instant>,
    /// Times the peer was found without our plan (restarted, its KV cache empty).
    #[serde(skip)]
    pub rejoins: u64,
}

pub type ClusterView = Arc<Mutex<Vec<PeerState>>>;

/// Heartbeat period; a peer silent for `DEAD_AFTER` is missing.
const HEARTBEAT: Duration = Duration::from_millis(250);
const DEAD_AFTER: Duration = SEND_TIMEOUT;
/// How long a hello may take to be answered during formation.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Hellos unanswered in a row, the peer connected all along, after which it is taken
/// not to share the cluster key (a node drops what it cannot authenticate unanswered).
const SILENT_HELLOS: u32 = 3;

/// Forms the cluster (connect, hello, plan) and returns the pipeline the scheduler
/// drives: this node's first stage, then the other nodes' stages as one link.
/// `progress` shows slice transfers to workers while they run.
pub async fn form(
    mf: Arc<ModelFile>,
    s: HeadSettings,
    frame_stats: Arc<super::wire::OpenerStats>,
    listeners: Listeners,
    progress: Progress,
) -> anyhow::Result<(Pipeline, ClusterView)> {
    let key = FrameKey::derive(&s.key);
    let hp = &mf.hparams;
    // what comes back: tokens, or (with a split lm_head) the last stage's rows of it
    let limits = Limits {
        max_seqs: s.n_slots,
        max_tokens: max_step_tokens(s.batch, s.n_slots),
        max_output_rows: s.n_slots,
        width: hp.n_embd,
        n_ctx: s.n_ctx,
        n_slots: s.n_slots,
        n_vocab: hp.n_vocab,
        max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
    };
    // our own data plane first: the last stage dials it (head parts of the lm_head
    // come back only if the plan splits it)
    let unsplit = Limits {
        n_vocab: 0,
        ..limits
    }
    .max_frame_len();
    let rx = PipelineRx::listen(&s.listen, Admission::cluster(s.peers.len(), unsplit))
        .await
        .with_context(|| format!("data plane on {}", s.listen))?;
    listeners.add("data", rx.recv_cap());
    let control = Control::connect(&s.peers[1..], &key, frame_stats.clone()).await?;
    // the head's data-plane sealer; every stage's data sender id goes into the plan
    let data_sealer = Sealer::with_random_id(key.clone());
    let model_hash = mf.model_hash.clone();
    let (nodes, senders, slice_peers) =
        greet(&control, &s, &mf, &model_hash, data_sealer.sender_id()).await?;
    let slicer = Arc::new(Slicer {
        mf: mf.clone(),
        model_hash: model_hash.clone(),
        name: s.name.clone(),
        cache_dir: s.cache_dir.clone(),
        progress,
        manifest: tokio::sync::OnceCell::new(),
    });
    let mut plan = make_plan(&s, &mf, &nodes, senders, model_hash)?;
    if plan.lm_head_rows > 0 {
        rx.recv_cap()
            .set(limits.max_frame_len())
            .context("capping the data plane")?;
    }
    for (i, &needs_slice) in slice_peers.iter().enumerate() {
        if needs_slice {
            give_slice(&control, &slicer, &mut plan, i).await?;
        }
    }
    // last stage first: each stage takes its plan's batches before the stage before it
    // dials it
    for (p, client) in control.peers.iter().rev() {
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
    log_formed(&s.name, &plan, mf.hparams.n_vocab);
    let lm_head_rows = plan.lm_head_rows;
    let stage = {
        let mf = mf.clone();
        let cfg = StageConfig {
            range: LayerRange::new(plan.stages[0].start, plan.stages[0].end),
            n_ctx: s.n_ctx,
            n_slots: s.n_slots,
            n_threads: s.threads,
            repack: true,
            lm_head_rows: (lm_head_rows > 0).then_some(0..lm_head_rows),
        };
        tokio::task::spawn_blocking(move || Stage::load(&mf, cfg)).await??
    };
    // a step alone takes the even split only if this stage reaches those rows
    let solo_rows = match stage.lm_head_reach() {
        Some(r)
            if r.start == 0
                && plan.lm_head_rows_solo > lm_head_rows
                && plan.lm_head_rows_solo <= r.end =>
        {
            tracing::info!(
                "a step alone in the pipeline splits the head at row {}",
                plan.lm_head_rows_solo
            );
            plan.lm_head_rows_solo
        }
        _ => lm_head_rows,
    };
    let view = initial_view(&plan, mf.hparams.n_vocab, solo_rows);
    let last_sender = Arc::new(AtomicU64::new(plan.senders.last().copied().unwrap_or(0)));
    let remote = RemoteStages {
        rt: tokio::runtime::Handle::current(),
        range: LayerRange::new(plan.stages[0].end, hp.n_layer),
        n_stages: plan.stages.len() - 1,
        tx: PipelineTx::dial(&s.peers[1].address, &DialOptions::default()).await?,
        rx,
        sealer: data_sealer,
        opener: Opener::new(key).with_stats(frame_stats),
        limits,
        width: hp.n_embd,
        dtype: if s.f16 { Dtype::F16 } else { Dtype::F32 },
        view: view.clone(),
        last_sender: last_sender.clone(),
        allowed_last: 0,
        split: (lm_head_rows > 0).then_some(LmHeadSplit {
            rows: lm_head_rows,
            solo_rows,
        }),
        in_flight: Default::default(),
        dropped: LogEvery::default(),
        unexpected: LogEvery::default(),
    };
    tokio::spawn(heartbeats(
        Arc::new(control),
        slicer,
        plan,
        view.clone(),
        last_sender,
    ));
    let first = FirstStage {
        stage,
        view: view.clone(),
    };
    let pipeline = Pipeline::new(
        vec![Box::new(first), Box::new(remote)],
        hp.n_layer,
        hp.n_vocab,
        s.n_ctx,
        s.n_slots,
    )?;
    Ok((pipeline, view))
}

/// Attempts at giving a worker its slice during formation; between two, the head waits
/// up to [`SLICE_RETRY_WAIT`] for the worker to answer again (it may have restarted: a
/// restarted worker resumes with what it holds).
const SLICE_ATTEMPTS: usize = 20;
const SLICE_RETRY_WAIT: Duration = Duration::from_secs(300);

/// Gives worker `i` (0-based among the workers) its slice of the model.
async fn give_slice(
    control: &Control,
    slicer: &Slicer,
    plan: &mut Plan,
    i: usize,
) -> anyhow::Result<()> {
    let (p, client) = &control.peers[i];
    let hello = Hello {
        from: slicer.name.clone(),
        protocol: proto::PROTOCOL,
        model_hash: slicer.model_hash.clone(),
    };
    for attempt in 1.. {
        let Err(e) = slicer.deliver(control, client, plan, i + 1).await else {
            return Ok(());
        };
        if attempt >= SLICE_ATTEMPTS {
            return Err(e.context(format!("giving {} its slice of the model", p.name)));
        }
        tracing::warn!("giving {} its slice: {e:#}; trying again", p.name);
        // a restarted worker has a new data sender id: the plan takes it
        let t0 = Instant::now();
        let ack: HelloAck = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match control
                .ask(client, FrameType::Hello, &hello, Duration::from_secs(5))
                .await
            {
                Ok(ack) => break ack,
                Err(e) if t0.elapsed() > SLICE_RETRY_WAIT => {
                    return Err(e.context(format!("{} did not come back", p.name)))
                }
                Err(_) => {}
            }
        };
        plan.senders[i + 1] = ack.data_sender;
    }
    Ok(())
}

/// Hello to every peer (in order): checks that each has our model (or none: it
/// receives its slice) and the name the config gives it; returns every node's
/// capabilities (this node's first, measured now; a peer without the model is
/// planned at this node's speed), data sender ids, and which peers need a slice.
async fn greet(
    control: &Control,
    s: &HeadSettings,
    mf: &Arc<ModelFile>,
    model_hash: &str,
    own_sender: u64,
) -> anyhow::Result<(Vec<NodeInfo>, Vec<u64>, Vec<bool>)> {
    let my_caps = {
        let mf = mf.clone();
        let (threads, memory) = (s.threads, s.memory);
        tokio::task::spawn_blocking(move || Capabilities::measure(&mf, threads, memory)).await?
    };
    tracing::info!("this node ({}): {my_caps}", s.name);
    let mut nodes = vec![NodeInfo {
        name: s.name.clone(),
        caps: my_caps,
    }];
    let mut senders = vec![own_sender];
    let mut slice_peers = Vec::new();
    let hello = Hello {
        from: s.name.clone(),
        protocol: proto::PROTOCOL,
        model_hash: model_hash.to_string(),
    };
    for (p, client) in &control.peers {
        let ack = hello_peer(control, p, client, &hello).await?;
        if ack.full_model && ack.model_hash != model_hash {
            bail!(
                "peer {} has a different model (id {}…, ours {}…): every node needs the same GGUF file",
                p.name,
                proto::short_id(&ack.model_hash),
                proto::short_id(model_hash)
            );
        }
        if ack.name != p.name {
            bail!(
                "peer at {} calls itself '{}', the config says '{}'",
                p.control_address().unwrap_or_else(|| p.address.clone()),
                ack.name,
                p.name
            );
        }
        let mut caps = ack.caps;
        if !caps.is_measured() {
            tracing::info!(
                "peer {} has no model file: it receives its slice, planned at this node's speed",
                p.name
            );
            caps.ms_per_layer = nodes[0].caps.ms_per_layer;
            caps.ms_per_lm_head_mb = nodes[0].caps.ms_per_lm_head_mb;
        }
        tracing::info!("peer {}: {caps}", p.name);
        senders.push(ack.data_sender);
        slice_peers.push(!ack.full_model);
        nodes.push(NodeInfo {
            name: p.name.clone(),
            caps,
        });
    }
    Ok((nodes, senders, slice_peers))
}

/// A peer's answer to our hello, waiting while it is not up. Refused, with why, when
/// the peer refuses the hello, speaks another protocol, or is connected but answers
/// none of [`SILENT_HELLOS`] hellos.
async fn hello_peer(
    control: &Control,
    p: &PeerConfig,
    client: &ControlClient,
    hello: &Hello,
) -> anyhow::Result<HelloAck> {
    let mut silent = 0;
    loop {
        let e = match control
            .ask::<HelloAck>(client, FrameType::Hello, hello, HELLO_TIMEOUT)
            .await
        {
            Ok(ack) if ack.protocol != proto::PROTOCOL => bail!(
                "peer {} speaks protocol {}, this node ({}) protocol {}: run the same exo version on every node",
                p.name,
                ack.protocol,
                hello.from,
                proto::PROTOCOL
            ),
            Ok(ack) => return Ok(ack),
            Err(e) => e,
        };
        if e.downcast_ref::<FrameError>()
            .is_some_and(|f| f.reason() == DropReason::Forged)
        {
            bail!(
                "peer {} does not share the cluster key: its reply fails authentication",
                p.name
            );
        }
        if let Some(why) = e.downcast_ref::<Refused>() {
            bail!("peer {} refused the hello: {why}", p.name);
        }
        let timed_out = e
            .downcast_ref::<TransportError>()
            .is_some_and(TransportError::is_timeout);
        silent = if timed_out && client.connected() {
            silent + 1
        } else {
            0
        };
        if silent >= SILENT_HELLOS {
            bail!(
                "peer {} is connected but answered none of {SILENT_HELLOS} hellos in {} s: it does \
                 not share the cluster key ([cluster] key), or is not an exo node of this version",
                p.name,
                (HELLO_TIMEOUT * SILENT_HELLOS).as_secs()
            );
        }
        tracing::info!("waiting for peer {}: {e:#}", p.name);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The plan: the configured layer ranges, or the planner's from the nodes'
/// capabilities; and how the `lm_head` is split. A plan that does not fit the memory
/// the nodes offer is refused with the numbers ([`planner::PlanError`]).
fn make_plan(
    s: &HeadSettings,
    mf: &ModelFile,
    nodes: &[NodeInfo],
    senders: Vec<u64>,
    model_hash: String,
) -> anyhow::Result<Plan> {
    let n_layer = mf.hparams.n_layer;
    let n_vocab = mf.hparams.n_vocab;
    let costs = ModelCosts::of(mf, s.n_ctx, s.n_slots);
    let (ranges, lm_head_rows): (Vec<LayerRange>, usize) =
        if s.peers.iter().all(|p| p.layers.is_some()) {
            let r: Vec<LayerRange> = s
                .peers
                .iter()
                .filter_map(|p| p.layers.map(|(a, b)| LayerRange::new(a, b)))
                .collect();
            crate::config::check_layers_fit(&s.peers, n_layer).map_err(anyhow::Error::msg)?;
            let rows = fixed_lm_head_rows(s.head_share, n_vocab);
            planner::check_ranges(nodes, &costs, &r, rows, n_vocab)?;
            (r, rows)
        } else {
            match s.head_share {
                HeadSharePolicy::Auto => {
                    let p = planner::plan_cluster(nodes, &costs, n_vocab)?;
                    (p.ranges, p.lm_head_rows)
                }
                HeadSharePolicy::Off => (planner::plan_ranges(nodes, &costs)?, 0),
                HeadSharePolicy::Share(f) => (
                    planner::plan_with_lm_head_share(nodes, &costs, f)?.0,
                    fixed_lm_head_rows(s.head_share, n_vocab),
                ),
            }
        };
    Ok(Plan {
        epoch: rand_epoch(),
        model_hash,
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
        lm_head_rows,
        lm_head_rows_solo: match (nodes.first(), nodes.last()) {
            (Some(a), Some(b)) => planner::solo_lm_head_rows(
                &a.caps,
                &b.caps,
                costs.avg_layer_bytes(),
                lm_head_rows,
                n_vocab,
            ),
            _ => 0,
        },
    })
}

fn log_formed(name: &str, plan: &Plan, n_vocab: usize) {
    let summary: Vec<String> = plan
        .stages
        .iter()
        .map(|st| format!("{} {}..{}", st.name, st.start, st.end))
        .collect();
    let rows = plan.lm_head_rows;
    if rows > 0 {
        tracing::info!(
            "cluster formed: {}; output head split: {name} computes vocabulary rows 0..{rows}, {} the other {}",
            summary.join(", "),
            plan.stages.last().map_or("?", |st| st.name.as_str()),
            n_vocab - rows
        );
    } else {
        tracing::info!("cluster formed: {}", summary.join(", "));
    }
}

/// Every node as /health first shows it: alive, with its layers and `lm_head` rows.
fn initial_view(plan: &Plan, n_vocab: usize, solo_rows: usize) -> ClusterView {
    let rows = plan.lm_head_rows;
    let n = plan.stages.len();
    // the first node's and the last node's share of the lm_head, split at `at`
    let share = |i: usize, at: usize| {
        if i == 0 && at > 0 {
            Some((0, at))
        } else if i + 1 == n {
            Some((at, n_vocab))
        } else {
            None
        }
    };
    Arc::new(Mutex::new(
        plan.stages
            .iter()
            .enumerate()
            .map(|(i, st)| PeerState {
                name: st.name.clone(),
                address: st.address.clone(),
                start: st.start,
                end: st.end,
                lm_head_rows: share(i, rows),
                lm_head_rows_alone: if solo_rows == rows {
                    None
                } else {
                    share(i, solo_rows)
                },
                alive: true,
                rtt_ms: 0.0,
                ms_per_token: 0.0,
                busy: false,
                bytes_sent: 0,
                tokens_sent: 0,
                last_seen: Some(Instant::now()),
                rejoins: 0,
            })
            .collect(),
    ))
}

/// The `lm_head` rows of a fixed `[cluster] head_share` (0 for none).
pub fn fixed_lm_head_rows(policy: HeadSharePolicy, n_vocab: usize) -> usize {
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
    slicer: &Slicer,
    plan: &mut Plan,
    i: usize,
    last_sender: &AtomicU64,
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
    if ack.protocol != proto::PROTOCOL {
        bail!(
            "peer {} now speaks protocol {}, this node protocol {}",
            p.name,
            ack.protocol,
            proto::PROTOCOL
        );
    }
    if ack.full_model && ack.model_hash != plan.model_hash {
        bail!("peer {} now has a different model", p.name);
    }
    if !ack.full_model {
        slicer
            .deliver(control, client, plan, i + 1)
            .await
            .with_context(|| format!("giving {} its slice of the model", p.name))?;
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

/// A rejoin under way: the worker's index, and its task (which gives the plan back).
type Rejoining = (
    usize,
    tokio::task::JoinHandle<(Plan, anyhow::Result<PlanAck>)>,
);

/// Pings every peer at once each period; marks the silent ones missing, and gives
/// the plan again to one that comes back without it (restarted). A rejoin runs in a
/// task of its own, one at a time (each updates the plan), so that the heartbeats go
/// on meanwhile: a second peer that goes missing is seen at once.
async fn heartbeats(
    control: Arc<Control>,
    slicer: Arc<Slicer>,
    mut plan: Plan,
    view: ClusterView,
    last_sender: Arc<AtomicU64>,
) {
    let mut rejoining: Option<Rejoining> = None;
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if let Some((i, task)) = rejoining.take_if(|(_, task)| task.is_finished()) {
            match task.await {
                Ok((updated, r)) => {
                    plan = updated;
                    rejoined(&control, &view, i, r);
                }
                Err(e) => tracing::warn!("the rejoin of a peer failed: {e}"),
            }
        }
        let replan = ping_all(&control, &plan, &view).await;
        if let (None, Some(i)) = (&rejoining, replan) {
            let name = &control.peers[i].0.name;
            tracing::info!("peer {name} runs no plan (restarted?): sending it again");
            // its KV cache is empty: the head's prompt cache must not count on it
            if let Ok(mut v) = view.lock() {
                if let Some(st) = v.get_mut(i + 1) {
                    st.rejoins += 1;
                }
            }
            let (control, slicer, last_sender) =
                (control.clone(), slicer.clone(), last_sender.clone());
            let mut p = plan.clone();
            rejoining = Some((
                i,
                tokio::spawn(async move {
                    let r = rejoin(&control, &slicer, &mut p, i, &last_sender).await;
                    (p, r)
                }),
            ));
        }
    }
}

/// Pings every peer at once and updates the view; returns the first peer that answers
/// without our plan (restarted), if any.
async fn ping_all(control: &Control, plan: &Plan, view: &ClusterView) -> Option<usize> {
    let pongs = futures_util::future::join_all(control.peers.iter().map(|(_, client)| async {
        let t0 = Instant::now();
        let pong: anyhow::Result<Pong> = control
            .ask(client, FrameType::Ping, &serde_json::json!({}), DEAD_AFTER)
            .await;
        (pong, t0)
    }))
    .await;
    let now = Instant::now();
    let mut replan = None;
    let Ok(mut v) = view.lock() else {
        return None;
    };
    for (i, ((p, _), (pong, t0))) in control.peers.iter().zip(&pongs).enumerate() {
        let Some(st) = v.get_mut(i + 1) else { continue };
        match pong {
            Ok(pong) => {
                st.last_seen = Some(now);
                st.rtt_ms = (now - *t0).as_secs_f64() * 1e3;
                st.ms_per_token = pong.ms_per_token;
                st.busy = pong.busy;
                // alive again only once it runs our plan
                let lost = pong.epoch != plan.epoch;
                if lost && st.alive {
                    tracing::warn!("peer {} lost its plan (restarted?)", p.name);
                }
                st.alive = !lost;
                if lost && replan.is_none() {
                    replan = Some(i);
                }
            }
            Err(e) => {
                st.busy = false;
                if st.alive && st.last_seen.is_none_or(|t| now - t > DEAD_AFTER) {
                    tracing::warn!("peer {} is missing: {e:#}", p.name);
                    st.alive = false;
                }
            }
        }
    }
    replan
}

/// Reports how the rejoin of peer `i` ended.
fn rejoined(control: &Control, view: &ClusterView, i: usize, r: anyhow::Result<PlanAck>) {
    let name = &control.peers[i].0.name;
    match r {
        Ok(a) if a.ok => {
            tracing::info!("peer {name} rejoined");
            if let Ok(mut v) = view.lock() {
                if let Some(st) = v.get_mut(i + 1) {
                    st.alive = true;
                }
            }
        }
        Ok(a) => tracing::error!(
            "peer {name} refused the plan: {}",
            a.error.unwrap_or_default()
        ),
        Err(e) => tracing::warn!("peer {name}: {e:#}"),
    }
}
