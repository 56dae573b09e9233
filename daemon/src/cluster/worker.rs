//! A worker node: answers the head's control requests (hello, plan, ping) and runs
//! its stage on every batch that arrives, passing activations on (or, on the last
//! stage, sampled token ids back to the head).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::capabilities::Capabilities;
use super::proto::{self, Hello, HelloAck, Plan, PlanAck, Pong, SliceOffer, SlotSetup};
use super::slices::receive::Receiver;
use super::slices::Progress;
use super::transport::{ControlServer, DialOptions, PipelineRx, PipelineTx};
use super::wire::{Dtype, FrameKey, FrameType, Limits, Opener, Payload, Sealer, FLAG_SOLO};
use crate::engine::scheduler::max_step_tokens;
use crate::engine::{
    BatchSeq, PartialLogits, Picked, Sampling, Stage, StageConfig, StageInput, StageOutput,
    TokenSampler,
};
use crate::model::{LayerRange, ModelFile};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub name: String,
    /// The whole model file, when this node has one; else it receives its slice from
    /// the head into `cache_dir`.
    pub model: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// Data-plane URL this node listens on.
    pub listen: String,
    /// Control-plane URL (listen port + 1).
    pub control_listen: String,
    pub key: Vec<u8>,
    pub threads: usize,
    /// `[node] memory` in bytes (None: what the system reports available).
    pub memory: Option<u64>,
}

/// What the control side tells the data side.
enum DataCmd {
    /// Run this stage from now on; the sender is told once it does.
    Run(Box<RunningStage>, std_mpsc::SyncSender<()>),
    /// Same stage, but the previous stage restarted: accept its new sender id.
    Allow(u64, std_mpsc::SyncSender<()>),
}

struct RunningStage {
    epoch: u64,
    stage: Stage,
    last: bool,
    tx: PipelineTx,
    limits: Limits,
    width: usize,
    dtype: Dtype,
    /// The previous stage's data sender id: the only one accepted.
    prev_sender: u64,
    /// The last stage holds `lm_head` rows `lm_head_first..n_vocab` only: it sends them
    /// with the normalized hidden state back, and the head node samples.
    lm_head_first: Option<usize>,
    /// For a step sent alone ([`super::wire::FLAG_SOLO`]): the head node takes rows
    /// `0..lm_head_solo` and this stage computes only `lm_head_solo..n_vocab`.
    lm_head_solo: usize,
}

/// Shared state between the control and data sides.
#[derive(Default)]
struct Status {
    epoch: u64,
    ms_per_token: f64,
}

/// Serves as a worker until `shutdown` resolves.
/// `progress` shows a slice transfer while it runs.
pub async fn run(
    s: WorkerSettings,
    frame_stats: Arc<super::wire::OpenerStats>,
    progress: Progress,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let (model, caps) = open_model(&s, progress).await?;
    let key = FrameKey::derive(&s.key);
    let control = Arc::new(
        ControlServer::listen(&s.control_listen)
            .await
            .with_context(|| format!("control plane on {}", s.control_listen))?,
    );
    let rx = PipelineRx::listen(&s.listen)
        .await
        .with_context(|| format!("data plane on {}", s.listen))?;
    tracing::info!(
        "worker {} ready: data {} control {} ({caps})",
        s.name,
        s.listen,
        s.control_listen,
    );
    let status = Arc::new(Mutex::new(Status::default()));
    let (cmd_tx, cmd_rx) = std_mpsc::channel::<DataCmd>();
    let rt = tokio::runtime::Handle::current();
    let control_stats = frame_stats.clone();
    let data_sender = super::wire::random_sender_id();
    let data = {
        let key = key.clone();
        let status = status.clone();
        let rt = rt.clone();
        std::thread::Builder::new()
            .name("exo-stage".into())
            .spawn(move || {
                data_loop(
                    rt,
                    rx,
                    cmd_rx,
                    key,
                    data_sender,
                    status,
                    frame_stats.clone(),
                )
            })?
    };
    let control_task = {
        let control = control.clone();
        let handler = Arc::new(tokio::sync::Mutex::new(ControlHandler {
            name: s.name.clone(),
            caps,
            model,
            threads: s.threads,
            opener: Opener::new(key.clone()).with_stats(control_stats),
            sealer: Sealer::with_random_id(key.clone()),
            status,
            cmd_tx,
            data_sender,
            current: None,
            greeted: false,
        }));
        tokio::spawn(async move {
            let _ = control
                .serve(move |pkt| {
                    let handler = handler.clone();
                    async move { handler.lock().await.handle(pkt.as_bytes()).await }
                })
                .await;
        })
    };
    shutdown.await;
    // the aborted control task drops the command sender: the stage thread sees it
    // within one receive timeout and ends
    control_task.abort();
    let _ = control_task.await;
    match tokio::task::spawn_blocking(move || data.join()).await {
        Ok(Ok(())) => Ok(()),
        _ => anyhow::bail!("the stage thread panicked"),
    }
}

/// Where a worker's model comes from.
enum WorkerModel {
    /// Its own whole model file, and the file's model id.
    File(Arc<ModelFile>, String),
    /// Slices received from the head.
    Slices(Box<Receiver>),
}

/// The worker's model and what it offers the planner: a node without a model file
/// times nothing (its speed is unknown until it holds a slice).
async fn open_model(
    s: &WorkerSettings,
    progress: Progress,
) -> anyhow::Result<(WorkerModel, Capabilities)> {
    use anyhow::Context;
    let Some(path) = s.model.clone() else {
        let receiver = Receiver::new(s.cache_dir.clone(), progress);
        tracing::info!(
            "no model file: this node receives its slice from the head into {}",
            s.cache_dir.display()
        );
        return Ok((
            WorkerModel::Slices(Box::new(receiver)),
            Capabilities::unmeasured(s.threads, s.memory),
        ));
    };
    let (threads, memory) = (s.threads, s.memory);
    tokio::task::spawn_blocking(move || {
        let mf = Arc::new(
            ModelFile::open(&path).with_context(|| format!("loading {}", path.display()))?,
        );
        let caps = Capabilities::measure(&mf, threads, memory);
        let id = proto::model_hash(&mf);
        Ok((WorkerModel::File(mf, id), caps))
    })
    .await?
}

struct ControlHandler {
    name: String,
    caps: Capabilities,
    model: WorkerModel,
    threads: usize,
    opener: Opener,
    sealer: Sealer,
    status: Arc<Mutex<Status>>,
    cmd_tx: std_mpsc::Sender<DataCmd>,
    data_sender: u64,
    /// The plan the stage thread runs: (epoch, range, next hop).
    current: Option<(u64, LayerRange, String)>,
    /// Whether a hello came (slices travel only after one).
    greeted: bool,
}

impl ControlHandler {
    async fn handle(&mut self, bytes: &[u8]) -> Vec<u8> {
        let frame = match self.opener.open(bytes, &Limits::control_only()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("control frame dropped: {e}");
                return self.error(&format!("frame refused: {e}"));
            }
        };
        let step = frame.step_id;
        let epoch = self.status.lock().map(|s| s.epoch).unwrap_or(0);
        match frame.frame_type {
            FrameType::Hello => {
                let Ok(h) = frame.control::<Hello>() else {
                    return self.error("bad hello");
                };
                self.greeted = true;
                let (model_hash, full_model) = match &self.model {
                    WorkerModel::File(_, id) => (id.clone(), true),
                    WorkerModel::Slices(r) => (r.model_hash(), false),
                };
                if full_model && h.model_hash != model_hash {
                    tracing::error!(
                        "head {} runs another model ({}), this node has {model_hash}",
                        h.from,
                        h.model_hash,
                    );
                }
                let ack = HelloAck {
                    name: self.name.clone(),
                    protocol: proto::PROTOCOL,
                    model_hash,
                    caps: self.caps.clone(),
                    planned: epoch != 0,
                    data_sender: self.data_sender,
                    full_model,
                };
                self.reply(FrameType::HelloAck, step, &ack)
            }
            FrameType::Ping => {
                let ms = self.status.lock().map(|s| s.ms_per_token).unwrap_or(0.0);
                let pong = Pong {
                    name: self.name.clone(),
                    epoch,
                    ms_per_token: ms,
                };
                self.reply(FrameType::Pong, step, &pong)
            }
            FrameType::Plan => {
                let Ok(p) = frame.control::<Plan>() else {
                    return self.error("bad plan");
                };
                let ack = match self.apply(p).await {
                    Ok(()) => PlanAck {
                        ok: true,
                        error: None,
                        sender_id: self.sealer.sender_id(),
                    },
                    Err(e) => {
                        tracing::error!("plan refused: {e:#}");
                        PlanAck {
                            ok: false,
                            error: Some(format!("{e:#}")),
                            sender_id: self.sealer.sender_id(),
                        }
                    }
                };
                self.reply(FrameType::PlanAck, step, &ack)
            }
            FrameType::SliceOffer => {
                let Ok(offer) = frame.control::<SliceOffer>() else {
                    return self.error("bad slice offer");
                };
                if !self.greeted {
                    return self.error("a slice offer before the hello");
                }
                let WorkerModel::Slices(r) = &mut self.model else {
                    return self.error("this node has the whole model file");
                };
                match tokio::task::block_in_place(|| r.offer(&offer)) {
                    Ok(status) => self.reply(FrameType::SliceStatus, step, &status),
                    Err(e) => self.error(&format!("slice refused: {e}")),
                }
            }
            FrameType::SliceChunk => {
                let (WorkerModel::Slices(r), Ok((bytes, hash))) = (&mut self.model, frame.chunk())
                else {
                    return self.error("unexpected slice chunk");
                };
                let Ok(index) = u32::try_from(step) else {
                    return self.error("bad chunk index");
                };
                match tokio::task::block_in_place(|| r.chunk(index, bytes, hash)) {
                    Ok(status) => self.reply(FrameType::SliceStatus, step, &status),
                    Err(e) => self.error(&format!("chunk refused: {e}")),
                }
            }
            other => self.error(&format!("unexpected {} frame", other.name())),
        }
    }

    /// The model of id `model_hash`: the node's file, or its received slice.
    fn model_for(&mut self, model_hash: &str) -> anyhow::Result<Arc<ModelFile>> {
        match &mut self.model {
            WorkerModel::File(mf, id) if id == model_hash => Ok(mf.clone()),
            WorkerModel::File(mf, id) => anyhow::bail!(
                "the head serves model {} but this node has {} ({}): install the same GGUF file",
                &model_hash[..12.min(model_hash.len())],
                &id[..12.min(id.len())],
                mf.gguf.path().display()
            ),
            WorkerModel::Slices(r) => tokio::task::block_in_place(|| r.model(model_hash)),
        }
    }

    async fn apply(&mut self, p: Plan) -> anyhow::Result<()> {
        use anyhow::{bail, Context};
        let mf = self.model_for(&p.model_hash)?;
        let Some(i) = p.stages.iter().position(|s| s.name == self.name) else {
            bail!("the plan has no stage for node '{}'", self.name);
        };
        let me = &p.stages[i];
        let last = i + 1 == p.stages.len();
        // the next hop: the next stage, or the head for the last one
        let next = if last {
            p.stages[0].address.clone()
        } else {
            p.stages[i + 1].address.clone()
        };
        let range = LayerRange::new(me.start, me.end);
        // only the stage before us may feed us (the head feeds the first worker)
        let prev_sender = i
            .checked_sub(1)
            .and_then(|prev| p.senders.get(prev))
            .copied()
            .ok_or_else(|| anyhow::anyhow!("the plan gives this node no stage before it"))?;
        if self.current.as_ref() == Some(&(p.epoch, range, next.clone())) {
            // same plan (a neighbour restarted): keep the stage, accept its new id
            let (ack_tx, ack_rx) = std_mpsc::sync_channel(1);
            self.cmd_tx
                .send(DataCmd::Allow(prev_sender, ack_tx))
                .map_err(|_| anyhow::anyhow!("the stage thread has stopped"))?;
            tokio::task::spawn_blocking(move || ack_rx.recv_timeout(Duration::from_secs(30)))
                .await?
                .map_err(|_| anyhow::anyhow!("the stage thread did not take the update"))?;
            return Ok(());
        }
        let (n_ctx, n_slots, threads) = (p.n_ctx, p.n_slots, self.threads);
        let n_vocab = mf.hparams.n_vocab;
        if p.lm_head_rows >= n_vocab {
            bail!(
                "the plan gives the head node {} of the {n_vocab} lm_head rows",
                p.lm_head_rows
            );
        }
        let lm_head_first = (last && p.lm_head_rows > 0).then_some(p.lm_head_rows);
        let lm_head_solo = p.lm_head_rows_solo.max(p.lm_head_rows);
        if lm_head_solo >= n_vocab {
            bail!(
                "the plan gives the head node {lm_head_solo} of the {n_vocab} lm_head rows for a step alone"
            );
        }
        let hp = mf.hparams.clone();
        let stage = tokio::task::spawn_blocking(move || {
            Stage::load(
                &mf,
                StageConfig {
                    range,
                    n_ctx,
                    n_slots,
                    n_threads: threads,
                    repack: true,
                    lm_head_rows: lm_head_first.map(|a| a..n_vocab),
                },
            )
        })
        .await
        .context("loading the stage")??;
        let tx = PipelineTx::dial(&next, &DialOptions::default())
            .await
            .with_context(|| format!("dialing the next hop {next}"))?;
        let width = hp.n_embd;
        let limits = Limits {
            max_seqs: n_slots,
            max_tokens: max_step_tokens(p.batch, n_slots),
            width,
            n_ctx,
            n_slots,
            n_vocab: 0,
            max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
        };
        tracing::info!(
            "plan {}: layers {range} of {}, next hop {next}",
            p.epoch,
            hp.n_layer
        );
        // Acknowledge the plan only once the stage thread runs it: a batch sent right
        // after the ack must find the stage in place.
        let (ack_tx, ack_rx) = std_mpsc::sync_channel(1);
        self.cmd_tx
            .send(DataCmd::Run(
                Box::new(RunningStage {
                    epoch: p.epoch,
                    stage,
                    last,
                    tx,
                    limits,
                    width,
                    dtype: if p.f16 { Dtype::F16 } else { Dtype::F32 },
                    prev_sender,
                    lm_head_first,
                    lm_head_solo,
                }),
                ack_tx,
            ))
            .map_err(|_| anyhow::anyhow!("the stage thread has stopped"))?;
        tokio::task::spawn_blocking(move || ack_rx.recv_timeout(Duration::from_secs(30)))
            .await?
            .map_err(|_| anyhow::anyhow!("the stage thread did not take the plan"))?;
        self.current = Some((p.epoch, range, next.clone()));
        if let Ok(mut s) = self.status.lock() {
            s.epoch = p.epoch;
        }
        Ok(())
    }

    fn reply<T: serde::Serialize>(&mut self, ft: FrameType, step: u64, body: &T) -> Vec<u8> {
        self.sealer.seal_control(ft, step, body).unwrap_or_default()
    }

    fn error(&mut self, message: &str) -> Vec<u8> {
        let msg = proto::ErrorMsg {
            message: message.to_string(),
        };
        self.sealer
            .seal_control(FrameType::Error, 0, &msg)
            .unwrap_or_default()
    }
}

/// The data side: one thread owning the stage; receives batches, computes, forwards.
struct DataPlane {
    rt: tokio::runtime::Handle,
    key: FrameKey,
    stats: Arc<super::wire::OpenerStats>,
    status: Arc<Mutex<Status>>,
    run: Option<Box<RunningStage>>,
    opener: Opener,
    sealer: Sealer,
    /// Per slot: its sampler (last stage only).
    samplers: HashMap<usize, TokenSampler>,
    /// Per slot with a split `lm_head`: how it samples, which decides what to send.
    split_sampling: HashMap<usize, Sampling>,
    hidden: Vec<f32>,
    out: Vec<f32>,
    /// This stage's `lm_head` rows' logits (split `lm_head`).
    logits: Vec<f32>,
    picks: Vec<Picked>,
}

fn data_loop(
    rt: tokio::runtime::Handle,
    mut rx: PipelineRx,
    cmds: std_mpsc::Receiver<DataCmd>,
    key: FrameKey,
    data_sender: u64,
    status: Arc<Mutex<Status>>,
    stats: Arc<super::wire::OpenerStats>,
) {
    let mut dp = DataPlane {
        rt,
        opener: Opener::new(key.clone()).with_stats(stats.clone()),
        sealer: Sealer::new(key.clone(), data_sender),
        key,
        stats,
        status,
        run: None,
        samplers: HashMap::new(),
        split_sampling: HashMap::new(),
        hidden: Vec::new(),
        out: Vec::new(),
        logits: Vec::new(),
        picks: Vec::new(),
    };
    loop {
        // new plans first, and again right after a packet arrived (it may belong to
        // a plan acknowledged while we waited)
        if !dp.take_commands(&cmds) {
            return;
        }
        let pkt = match dp.rt.block_on(rx.recv(Some(Duration::from_millis(200)))) {
            Ok(p) => p,
            Err(e) if e.is_timeout() => continue,
            Err(e) => {
                tracing::warn!("data plane: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !dp.take_commands(&cmds) {
            return;
        }
        if let Err(e) = dp.handle(pkt.as_bytes()) {
            tracing::warn!("batch dropped: {e:#}");
        }
    }
}

impl DataPlane {
    /// Applies pending plans; false when the control side has gone.
    fn take_commands(&mut self, cmds: &std_mpsc::Receiver<DataCmd>) -> bool {
        loop {
            match cmds.try_recv() {
                Ok(DataCmd::Run(r, ack)) => {
                    // a new plan: fresh replay state and samplers; one feeder
                    self.opener = Opener::new(self.key.clone()).with_stats(self.stats.clone());
                    self.opener.allow_sender(r.prev_sender);
                    self.samplers.clear();
                    self.split_sampling.clear();
                    tracing::debug!("stage thread runs plan {}", r.epoch);
                    self.run = Some(r);
                    let _ = ack.send(());
                }
                Ok(DataCmd::Allow(sender, ack)) => {
                    self.opener.allow_sender(sender);
                    let _ = ack.send(());
                }
                Err(std_mpsc::TryRecvError::Disconnected) => return false,
                Err(std_mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let Some(r) = self.run.as_mut() else {
            anyhow::bail!("no plan")
        };
        self.rt.block_on(r.tx.send(bytes))?;
        Ok(())
    }

    fn handle(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let Some(r) = self.run.as_ref() else {
            anyhow::bail!("a frame arrived before any plan");
        };
        let (limits, last) = (r.limits, r.last);
        let frame = self.opener.open(bytes, &limits)?;
        let step = frame.step_id;
        match frame.frame_type {
            FrameType::Setup if last => {
                let s: SlotSetup = frame.control()?;
                self.setup_slot(s)
            }
            FrameType::Setup | FrameType::Error => {
                // pass it on, in order with the batches: a Setup towards the last
                // stage, an Error (a stage before us failed this step) towards the head
                let ft = frame.frame_type;
                let body: serde_json::Value = frame.control()?;
                let sealed = self.sealer.seal_control(ft, step, &body)?;
                self.send(&sealed)
            }
            FrameType::Activations => {
                let seqs: Vec<BatchSeq> = frame.seqs.clone();
                frame.activations(&mut self.hidden)?;
                self.sealer.set_step_flags(frame.flags);
                let solo = frame.flags & FLAG_SOLO != 0;
                let result = self.run_batch(step, &seqs, solo);
                if let Err(e) = &result {
                    // tell the head at once instead of letting it wait
                    let range = self.run.as_ref().map(|r| r.stage.config().range);
                    let msg = proto::ErrorMsg {
                        message: format!(
                            "stage {}: {e:#}",
                            range.map_or("?".into(), |r| r.to_string())
                        ),
                    };
                    if let Ok(sealed) = self.sealer.seal_control(FrameType::Error, step, &msg) {
                        let _ = self.send(&sealed);
                    }
                }
                result
            }
            other => anyhow::bail!("unexpected {} frame on the data plane", other.name()),
        }
    }

    fn setup_slot(&mut self, s: SlotSetup) -> anyhow::Result<()> {
        let sampling = s.sampling();
        if let Some(r) = self.run.as_ref() {
            sampling
                .check(r.stage.hparams().n_vocab)
                .map_err(|e| anyhow::anyhow!("slot {}: {e}", s.slot))?;
        }
        if self.run.as_ref().is_some_and(|r| r.lm_head_first.is_some()) {
            // the head node samples; we only need to know what to send it
            self.split_sampling.insert(s.slot, sampling);
            return Ok(());
        }
        self.samplers
            .insert(s.slot, TokenSampler::new(&sampling, &s.prompt)?);
        Ok(())
    }

    /// Computes the stage; sends activations on, or (last stage) sampled token ids.
    fn run_batch(&mut self, step: u64, seqs: &[BatchSeq], solo: bool) -> anyhow::Result<()> {
        let Some(r) = self.run.as_mut() else {
            anyhow::bail!("no plan")
        };
        let t0 = Instant::now();
        let kind = r
            .stage
            .forward(seqs, StageInput::Hidden(&self.hidden), &mut self.out)?;
        let sealed = match kind {
            StageOutput::Hidden => self.sealer.seal(
                step,
                seqs,
                Payload::activations(&self.out, r.width, r.dtype),
            )?,
            StageOutput::Normed if seqs.iter().all(|s| s.output_rows() == 0) => {
                // a prompt chunk without output rows: nothing to sample
                self.sealer.seal(step, seqs, Payload::Tokens(&[]))?
            }
            StageOutput::Normed => {
                // the normalized state first: the head node computes its rows of the
                // head while we compute ours
                let n_vocab = r.stage.hparams().n_vocab;
                let own = r.lm_head_first.unwrap_or(0);
                let first = if solo { r.lm_head_solo.max(own) } else { own };
                let normed =
                    self.sealer
                        .seal(step, seqs, Payload::normed(&self.out, r.width, r.dtype))?;
                self.rt.block_on(r.tx.send(&normed))?;
                r.stage
                    .project(&self.out, first..n_vocab, &mut self.logits)?;
                let width = n_vocab - first;
                let mut parts = Vec::new();
                for row in rows_with_slots(seqs, &self.logits, width) {
                    let (slot, l) = row?;
                    let Some(sampling) = self.split_sampling.get(&slot) else {
                        anyhow::bail!("slot {slot} has no sampling set-up");
                    };
                    parts.push(PartialLogits::of_row(sampling, l, first));
                }
                self.sealer.seal(step, seqs, Payload::LmHeadPart(&parts))?
            }
            StageOutput::Logits => {
                let n_vocab = r.stage.hparams().n_vocab;
                self.picks.clear();
                for row in rows_with_slots(seqs, &self.out, n_vocab) {
                    let (slot, l) = row?;
                    let Some(sampler) = self.samplers.get_mut(&slot) else {
                        anyhow::bail!("slot {slot} has no sampling set-up");
                    };
                    self.picks.push(sampler.pick(l)?);
                }
                if self.picks.iter().any(|p| p.logprobs.is_some()) {
                    self.sealer
                        .seal(step, seqs, Payload::TokenLogprobs(&self.picks))?
                } else {
                    let tokens: Vec<i32> = self.picks.iter().map(|p| p.token).collect();
                    self.sealer.seal(step, seqs, Payload::Tokens(&tokens))?
                }
            }
        };
        let n_tokens = seqs.iter().map(|s| s.n_tokens).sum::<usize>().max(1);
        let ms = t0.elapsed().as_secs_f64() * 1e3 / n_tokens as f64;
        if let Ok(mut st) = self.status.lock() {
            st.ms_per_token = if st.ms_per_token == 0.0 {
                ms
            } else {
                0.9 * st.ms_per_token + 0.1 * ms
            };
        }
        self.rt.block_on(r.tx.send(&sealed))?;
        Ok(())
    }
}

/// Each output row of a step's logits (`width` values a row), with its sequence's slot.
fn rows_with_slots<'a>(
    seqs: &'a [BatchSeq],
    logits: &'a [f32],
    width: usize,
) -> impl Iterator<Item = anyhow::Result<(usize, &'a [f32])>> + 'a {
    let mut rows = logits.chunks_exact(width.max(1));
    seqs.iter()
        .flat_map(|s| std::iter::repeat_n(s.slot, s.output_rows()))
        .map(move |slot| {
            rows.next()
                .map(|l| (slot, l))
                .ok_or_else(|| anyhow::anyhow!("missing logits row"))
        })
}
