//! The worker's control side: answers the head's hello, ping, plan and slice
//! requests. Requests are served several at a time, so a ping is answered while a
//! plan loads; no lock is held across an await (the state is behind short-held
//! `std` mutexes, the slow parts run on blocking threads). A request that fails
//! authentication gets no answer at all (it is counted and dropped, as on the data
//! plane); only key holders hear why a request was refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};

use super::{DataCmd, RunningStage, Status, WorkerModel, WorkerSettings};
use crate::cluster::admission::RecvCap;
use crate::cluster::capabilities::Capabilities;
use crate::cluster::proto::{self, Hello, HelloAck, Plan, PlanAck, Pong, SliceOffer};
use crate::cluster::transport::{DialOptions, PipelineTx};
use crate::cluster::wire::{
    DropReason, Dtype, Frame, FrameKey, FrameType, Limits, Opener, OpenerStats, Sealer,
};
use crate::config::{BATCH_LIMIT, CTX_LIMIT, MAX_SLOTS_LIMIT};
use crate::engine::scheduler::max_step_tokens;
use crate::engine::{Stage, StageConfig};
use crate::log_every::LogEvery;
use crate::model::{LayerRange, ModelFile};

/// How long the stage thread may take to take a command.
const STAGE_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What the control side shares with the data side.
pub(super) struct Links {
    pub status: Arc<Mutex<Status>>,
    pub cmd_tx: std_mpsc::Sender<DataCmd>,
    pub data_sender: u64,
    /// The data plane's receive cap, which follows the plan.
    pub data_cap: RecvCap,
}

struct Frames {
    opener: Opener,
    sealer: Sealer,
}

pub(super) struct ControlHandler {
    name: String,
    caps: Capabilities,
    threads: usize,
    links: Links,
    frames: Mutex<Frames>,
    model: Mutex<WorkerModel>,
    /// The plan the stage thread runs: (epoch, range, next hop).
    current: Mutex<Option<(u64, LayerRange, String)>>,
    /// Whether a hello came (slices travel only after one).
    greeted: AtomicBool,
    /// Whether a plan is being applied (a second one is refused meanwhile).
    applying: AtomicBool,
    /// Lines about frames dropped unanswered, and about frames refused.
    dropped: LogEvery,
    refused: LogEvery,
}

/// Clears a flag when dropped (also when the request's future is).
struct Clears<'a>(&'a AtomicBool);

impl Drop for Clears<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ControlHandler {
    pub(super) fn new(
        s: &WorkerSettings,
        caps: Capabilities,
        model: WorkerModel,
        key: FrameKey,
        stats: Arc<OpenerStats>,
        links: Links,
    ) -> ControlHandler {
        ControlHandler {
            name: s.name.clone(),
            caps,
            threads: s.threads,
            links,
            frames: Mutex::new(Frames {
                opener: Opener::new(key.clone()).with_stats(stats),
                sealer: Sealer::with_random_id(key),
            }),
            model: Mutex::new(model),
            current: Mutex::new(None),
            greeted: AtomicBool::new(false),
            applying: AtomicBool::new(false),
            dropped: LogEvery::default(),
            refused: LogEvery::default(),
        }
    }

    /// The answer to one request; None for a frame that is not authentic (forged,
    /// malformed or replayed): no answer, not even why.
    pub(super) async fn handle(self: &Arc<Self>, bytes: &[u8]) -> Option<Vec<u8>> {
        let opened = lock(&self.frames)
            .opener
            .open(bytes, &Limits::control_only());
        let frame = match opened {
            Ok(f) => f,
            // a key holder's frame outside the limits: it may hear why
            Err(e) if e.reason() == DropReason::Invalid => {
                if let Some(n) = self.refused.hit() {
                    tracing::warn!("{n} control frame(s) refused; the latest: {e}");
                }
                return Some(self.error(&format!("frame refused: {e}")));
            }
            Err(e) => {
                if let Some(n) = self.dropped.hit() {
                    tracing::warn!(
                        "{n} control frame(s) dropped unanswered (not authentic); the latest: {e}"
                    );
                }
                return None;
            }
        };
        Some(self.answer(frame).await)
    }

    async fn answer(self: &Arc<Self>, frame: Frame<'_>) -> Vec<u8> {
        let step = frame.step_id;
        let epoch = lock(&self.links.status).epoch;
        match frame.frame_type {
            FrameType::Hello => match frame.control::<Hello>() {
                Ok(h) => self.hello(&h, epoch, step),
                Err(_) => self.error("bad hello"),
            },
            FrameType::Ping => {
                let status = lock(&self.links.status);
                let pong = Pong {
                    name: self.name.clone(),
                    epoch,
                    ms_per_token: status.ms_per_token,
                    busy: status.busy,
                };
                drop(status);
                self.reply(FrameType::Pong, step, &pong)
            }
            FrameType::Plan => {
                let Ok(p) = frame.control::<Plan>() else {
                    return self.error("bad plan");
                };
                let ack = match self.apply_one(p).await {
                    Ok(()) => PlanAck {
                        ok: true,
                        error: None,
                        sender_id: self.sender_id(),
                    },
                    Err(e) => {
                        tracing::error!("plan refused: {e:#}");
                        PlanAck {
                            ok: false,
                            error: Some(format!("{e:#}")),
                            sender_id: self.sender_id(),
                        }
                    }
                };
                self.reply(FrameType::PlanAck, step, &ack)
            }
            FrameType::SliceOffer => {
                let Ok(offer) = frame.control::<SliceOffer>() else {
                    return self.error("bad slice offer");
                };
                if !self.greeted.load(Ordering::SeqCst) {
                    return self.error("a slice offer before the hello");
                }
                // checking what the node holds reads its slice: off the async threads
                let me = self.clone();
                let r = tokio::task::spawn_blocking(move || match &mut *lock(&me.model) {
                    WorkerModel::Slices(r) => r.offer(&offer).map_err(|e| e.to_string()),
                    WorkerModel::File(..) => Err("this node has the whole model file".into()),
                })
                .await;
                match r {
                    Ok(Ok(status)) => self.reply(FrameType::SliceStatus, step, &status),
                    Ok(Err(e)) => self.error(&format!("slice refused: {e}")),
                    Err(e) => self.error(&format!("slice refused: {e}")),
                }
            }
            FrameType::SliceChunk => {
                let (Ok((bytes, hash)), Ok(index)) = (frame.chunk(), u32::try_from(step)) else {
                    return self.error("bad slice chunk");
                };
                // one chunk's write: short, and the bytes stay in the received frame
                let r = tokio::task::block_in_place(|| match &mut *lock(&self.model) {
                    WorkerModel::Slices(r) => {
                        r.chunk(index, bytes, hash).map_err(|e| e.to_string())
                    }
                    WorkerModel::File(..) => Err("unexpected slice chunk".into()),
                });
                match r {
                    Ok(status) => self.reply(FrameType::SliceStatus, step, &status),
                    Err(e) => self.error(&format!("chunk refused: {e}")),
                }
            }
            other => self.error(&format!("unexpected {} frame", other.name())),
        }
    }

    /// The answer to a hello: who this node is, or a refusal when the head speaks
    /// another protocol.
    fn hello(&self, h: &Hello, epoch: u64, step: u64) -> Vec<u8> {
        if h.protocol != proto::PROTOCOL {
            let why = format!(
                "{} speaks protocol {}, this node ({}) protocol {}: run the same exo version on every node",
                h.from,
                h.protocol,
                self.name,
                proto::PROTOCOL
            );
            tracing::error!("hello refused: {why}");
            return self.error(&why);
        }
        self.greeted.store(true, Ordering::SeqCst);
        let (model_hash, full_model) = match &*lock(&self.model) {
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
            data_sender: self.links.data_sender,
            full_model,
        };
        self.reply(FrameType::HelloAck, step, &ack)
    }

    /// Applies a plan unless another one is being applied.
    async fn apply_one(self: &Arc<Self>, p: Plan) -> anyhow::Result<()> {
        if self.applying.swap(true, Ordering::SeqCst) {
            bail!("another plan is being applied");
        }
        let _done = Clears(&self.applying);
        self.apply(p).await
    }

    /// The model of id `model_hash`: the node's file, or its received slice (opened
    /// on a blocking thread).
    async fn model_for(self: &Arc<Self>, model_hash: &str) -> anyhow::Result<Arc<ModelFile>> {
        let me = self.clone();
        let hash = model_hash.to_string();
        tokio::task::spawn_blocking(move || match &mut *lock(&me.model) {
            WorkerModel::File(mf, id) if *id == hash => Ok(mf.clone()),
            WorkerModel::File(mf, id) => bail!(
                "the head serves model {} but this node has {} ({}): install the same GGUF file",
                proto::short_id(&hash),
                proto::short_id(id),
                mf.gguf.path().display()
            ),
            WorkerModel::Slices(r) => r.model(&hash),
        })
        .await?
    }

    async fn apply(self: &Arc<Self>, p: Plan) -> anyhow::Result<()> {
        check_plan(&p)?;
        let mf = self.model_for(&p.model_hash).await?;
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
        let running = lock(&self.current).clone();
        if running == Some((p.epoch, range, next.clone())) {
            // same plan (a neighbour restarted): keep the stage, accept its new id
            return self
                .command(|ack| DataCmd::Allow(prev_sender, ack), "update")
                .await;
        }
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
        let (n_ctx, n_slots, threads) = (p.n_ctx, p.n_slots, self.threads);
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
            max_output_rows: n_slots,
            width,
            n_ctx,
            n_slots,
            n_vocab: 0,
            max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
        };
        // the data plane takes this plan's batches from now on (a connection accepted
        // under the cap before is reset: the previous stage reconnects)
        self.links
            .data_cap
            .set(limits.max_frame_len())
            .context("capping the data plane")?;
        tracing::info!(
            "plan {}: layers {range} of {}, next hop {next}",
            p.epoch,
            hp.n_layer
        );
        // Acknowledge the plan only once the stage thread runs it: a batch sent right
        // after the ack must find the stage in place.
        let run = RunningStage {
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
        };
        self.command(|ack| DataCmd::Run(Box::new(run), ack), "plan")
            .await?;
        *lock(&self.current) = Some((p.epoch, range, next));
        lock(&self.links.status).epoch = p.epoch;
        Ok(())
    }

    /// Gives the stage thread a command and waits (on a blocking thread) until it
    /// takes it.
    async fn command(
        &self,
        make: impl FnOnce(std_mpsc::SyncSender<()>) -> DataCmd,
        what: &str,
    ) -> anyhow::Result<()> {
        let (ack_tx, ack_rx) = std_mpsc::sync_channel(1);
        self.links
            .cmd_tx
            .send(make(ack_tx))
            .map_err(|_| anyhow::anyhow!("the stage thread has stopped"))?;
        tokio::task::spawn_blocking(move || ack_rx.recv_timeout(STAGE_ACK_TIMEOUT))
            .await?
            .map_err(|_| anyhow::anyhow!("the stage thread did not take the {what}"))
    }

    fn sender_id(&self) -> u64 {
        lock(&self.frames).sealer.sender_id()
    }

    fn reply<T: serde::Serialize>(&self, ft: FrameType, step: u64, body: &T) -> Vec<u8> {
        lock(&self.frames)
            .sealer
            .seal_control(ft, step, body)
            .unwrap_or_default()
    }

    fn error(&self, message: &str) -> Vec<u8> {
        let msg = proto::ErrorMsg {
            message: message.to_string(),
        };
        self.reply(FrameType::Error, 0, &msg)
    }
}

/// A plan's figures within what any node's config could give (the head's own config
/// is checked against the same bounds), and a sender id for every stage.
fn check_plan(p: &Plan) -> anyhow::Result<()> {
    if !(1..=MAX_SLOTS_LIMIT).contains(&p.n_slots)
        || !(1..=BATCH_LIMIT).contains(&p.batch)
        || !(1..=CTX_LIMIT).contains(&p.n_ctx)
    {
        bail!(
            "the plan's figures are out of bounds: {} slots (1..={MAX_SLOTS_LIMIT}), batch {} \
             (1..={BATCH_LIMIT}), context {} (1..={CTX_LIMIT})",
            p.n_slots,
            p.batch,
            p.n_ctx
        );
    }
    if p.senders.len() != p.stages.len() {
        bail!(
            "the plan has {} sender ids for {} stages",
            p.senders.len(),
            p.stages.len()
        );
    }
    Ok(())
}
