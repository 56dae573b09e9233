//! A worker node: answers the head's control requests (hello, plan, ping) and runs
//! its stage on every batch that arrives, passing activations on (or, on the last
//! stage, sampled token ids back to the head).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ggml_shim::llama::{argmax, SamplerChain, SamplingParams};

use super::frame::{Dtype, FrameKey, FrameType, Limits, Opener, Sealer, SeqDesc};
use super::plan::{self, Capabilities, Hello, HelloAck, Plan, PlanAck, Pong, SlotSetup};
use super::transport::{ControlServer, DialOptions, PipelineRx, PipelineTx};
use crate::engine::{BatchSeq, OutputRows, Stage, StageConfig, StageInput, StageOutput};
use crate::model::{LayerRange, ModelFile};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub name: String,
    pub model: PathBuf,
    /// Data-plane URL this node listens on.
    pub listen: String,
    /// Control-plane URL (listen port + 1).
    pub control_listen: String,
    pub key: Vec<u8>,
    pub threads: usize,
}

/// What the control side tells the data side.
enum DataCmd {
    /// Run this stage from now on; the sender is told once it does.
    Run(Box<RunningStage>, std_mpsc::SyncSender<()>),
}

struct RunningStage {
    epoch: u64,
    stage: Stage,
    last: bool,
    tx: PipelineTx,
    limits: Limits,
    width: usize,
    dtype: Dtype,
}

/// Shared state between the control and data sides.
#[derive(Default)]
struct Status {
    epoch: u64,
    ms_per_token: f64,
}

/// Serves as a worker until `shutdown` resolves.
pub async fn run(
    s: WorkerSettings,
    frame_stats: Arc<super::frame::OpenerStats>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let model_path = s.model.clone();
    let threads = s.threads;
    let (mf, caps) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mf = Arc::new(
            ModelFile::open(&model_path)
                .with_context(|| format!("loading {}", model_path.display()))?,
        );
        let caps = Capabilities::measure(&mf, threads);
        Ok((mf, caps))
    })
    .await??;
    let id = plan::model_id(&mf);
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
        "worker {} ready: data {} control {} ({} MB free, {:.2} ms/layer)",
        s.name,
        s.listen,
        s.control_listen,
        caps.free_memory / 1_000_000,
        caps.ms_per_layer
    );
    let status = Arc::new(Mutex::new(Status::default()));
    let (cmd_tx, cmd_rx) = std_mpsc::channel::<DataCmd>();
    let rt = tokio::runtime::Handle::current();
    let control_stats = frame_stats.clone();
    let data = {
        let key = key.clone();
        let status = status.clone();
        let rt = rt.clone();
        std::thread::Builder::new()
            .name("exo-stage".into())
            .spawn(move || data_loop(rt, rx, cmd_rx, key, status, frame_stats.clone()))?
    };
    let control_task = {
        let control = control.clone();
        let handler = Arc::new(tokio::sync::Mutex::new(ControlHandler {
            name: s.name.clone(),
            model_id: id,
            caps,
            mf,
            threads: s.threads,
            opener: Opener::new(key.clone()).with_stats(control_stats),
            sealer: Sealer::with_random_id(key.clone()),
            status,
            cmd_tx,
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
    control_task.abort();
    drop(data);
    Ok(())
}

struct ControlHandler {
    name: String,
    model_id: String,
    caps: Capabilities,
    mf: Arc<ModelFile>,
    threads: usize,
    opener: Opener,
    sealer: Sealer,
    status: Arc<Mutex<Status>>,
    cmd_tx: std_mpsc::Sender<DataCmd>,
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
                if h.model_id != self.model_id {
                    tracing::error!(
                        "head {} runs another model ({}), this node has {}",
                        h.from,
                        h.model_id,
                        self.model_id
                    );
                }
                let ack = HelloAck {
                    name: self.name.clone(),
                    protocol: plan::PROTOCOL,
                    model_id: self.model_id.clone(),
                    caps: self.caps.clone(),
                    planned: epoch != 0,
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
            other => self.error(&format!("unexpected {} frame", other.name())),
        }
    }

    async fn apply(&mut self, p: Plan) -> anyhow::Result<()> {
        use anyhow::{bail, Context};
        if p.model_id != self.model_id {
            bail!(
                "the head serves model {} but this node has {} ({}): install the same GGUF file",
                &p.model_id[..12.min(p.model_id.len())],
                &self.model_id[..12],
                self.mf.gguf.path().display()
            );
        }
        let Some(i) = p.stages.iter().position(|s| s.name == self.name) else {
            bail!("the plan has no stage for node '{}'", self.name);
        };
        let me = &p.stages[i];
        let last = i + 1 == p.stages.len();
        // the next hop: the next stage, or the head for the last one
        let next = if last {
            &p.stages[0].address
        } else {
            &p.stages[i + 1].address
        };
        let range = LayerRange::new(me.start, me.end);
        let mf = self.mf.clone();
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
                },
            )
        })
        .await
        .context("loading the stage")??;
        let tx = PipelineTx::dial(next, &DialOptions::default())
            .await
            .with_context(|| format!("dialing the next hop {next}"))?;
        let width = self.mf.hparams.n_embd;
        let limits = Limits {
            max_seqs: n_slots,
            max_tokens: p.batch.max(1),
            width,
            n_ctx,
            n_slots,
            n_vocab: 0,
            max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
        };
        tracing::info!(
            "plan {}: layers {range} of {}, next hop {next}",
            p.epoch,
            self.mf.hparams.n_layer
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
                }),
                ack_tx,
            ))
            .map_err(|_| anyhow::anyhow!("the stage thread has stopped"))?;
        tokio::task::spawn_blocking(move || ack_rx.recv_timeout(Duration::from_secs(30)))
            .await?
            .map_err(|_| anyhow::anyhow!("the stage thread did not take the plan"))?;
        if let Ok(mut s) = self.status.lock() {
            s.epoch = p.epoch;
        }
        Ok(())
    }

    fn reply<T: serde::Serialize>(&mut self, ft: FrameType, step: u64, body: &T) -> Vec<u8> {
        self.sealer.seal_control(ft, step, body).unwrap_or_default()
    }

    fn error(&mut self, message: &str) -> Vec<u8> {
        let msg = plan::ErrorMsg {
            message: message.to_string(),
        };
        self.sealer
            .seal_control(FrameType::Error, 0, &msg)
            .unwrap_or_default()
    }
}

/// The data side: one thread owning the stage; receives batches, computes, forwards.
fn data_loop(
    rt: tokio::runtime::Handle,
    mut rx: PipelineRx,
    cmds: std_mpsc::Receiver<DataCmd>,
    key: FrameKey,
    status: Arc<Mutex<Status>>,
    stats: Arc<super::frame::OpenerStats>,
) {
    let mut run: Option<Box<RunningStage>> = None;
    let mut opener = Opener::new(key.clone()).with_stats(stats.clone());
    let mut sealer = Sealer::with_random_id(key.clone());
    let mut samplers: HashMap<usize, Option<SamplerChain>> = HashMap::new();
    let (mut hidden, mut out, mut toks) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        // new plans first, also right after a packet arrived (it may belong to the plan
        // that was acknowledged while we waited)
        let mut take_cmds = |run: &mut Option<Box<RunningStage>>| -> bool {
            loop {
                match cmds.try_recv() {
                    Ok(DataCmd::Run(r, ack)) => {
                        // a new plan: fresh replay state and samplers
                        opener = Opener::new(key.clone()).with_stats(stats.clone());
                        samplers.clear();
                        tracing::debug!("stage thread runs plan {}", r.epoch);
                        *run = Some(r);
                        let _ = ack.send(());
                    }
                    Err(std_mpsc::TryRecvError::Disconnected) => return false,
                    Err(std_mpsc::TryRecvError::Empty) => return true,
                }
            }
        };
        if !take_cmds(&mut run) {
            return;
        }
        let pkt = match rt.block_on(rx.recv(Some(Duration::from_millis(200)))) {
            Ok(p) => p,
            Err(e) if e.is_timeout() => continue,
            Err(e) => {
                tracing::warn!("data plane: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !take_cmds(&mut run) {
            return;
        }
        let Some(r) = run.as_mut() else {
            tracing::debug!("batch before any plan: dropped");
            continue;
        };
        if let Err(e) = handle_packet(
            &rt,
            r,
            &mut opener,
            &mut sealer,
            &mut samplers,
            pkt.as_bytes(),
            &mut hidden,
            &mut out,
            &mut toks,
            &status,
        ) {
            tracing::warn!("batch dropped: {e}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_packet(
    rt: &tokio::runtime::Handle,
    r: &mut RunningStage,
    opener: &mut Opener,
    sealer: &mut Sealer,
    samplers: &mut HashMap<usize, Option<SamplerChain>>,
    bytes: &[u8],
    hidden: &mut Vec<f32>,
    out: &mut Vec<f32>,
    toks: &mut Vec<i32>,
    status: &Arc<Mutex<Status>>,
) -> anyhow::Result<()> {
    let frame = opener.open(bytes, &r.limits)?;
    match frame.frame_type {
        FrameType::Setup => {
            if r.last {
                let s: SlotSetup = frame.control()?;
                let params = SamplingParams {
                    temperature: s.temperature,
                    top_k: s.top_k,
                    top_p: s.top_p,
                    min_p: s.min_p,
                    repeat_penalty: s.repeat_penalty,
                    repeat_last_n: s.repeat_last_n,
                    frequency_penalty: s.frequency_penalty,
                    presence_penalty: s.presence_penalty,
                    seed: s.seed,
                };
                let greedy = params.temperature <= 0.0
                    && params.repeat_penalty == 1.0
                    && params.frequency_penalty == 0.0
                    && params.presence_penalty == 0.0;
                let chain = if greedy {
                    None
                } else {
                    let mut c = SamplerChain::new(&params)?;
                    for &t in &s.prompt {
                        c.accept(t);
                    }
                    Some(c)
                };
                samplers.insert(s.slot, chain);
            } else {
                // pass it on, in order with the batches
                let body: serde_json::Value = frame.control()?;
                let sealed = sealer.seal_control(FrameType::Setup, frame.step_id, &body)?;
                rt.block_on(r.tx.send(&sealed))?;
            }
            Ok(())
        }
        FrameType::Error => {
            // a stage before us failed this step: pass the word on towards the head
            let body: serde_json::Value = frame.control()?;
            let sealed = sealer.seal_control(FrameType::Error, frame.step_id, &body)?;
            rt.block_on(r.tx.send(&sealed))?;
            Ok(())
        }
        FrameType::Activations => {
            let step = frame.step_id;
            let result = run_batch(rt, r, sealer, samplers, &frame, hidden, out, toks, status);
            if let Err(e) = &result {
                // tell the head at once instead of letting it wait
                let msg = plan::ErrorMsg {
                    message: format!("stage {}: {e:#}", r.stage.config().range),
                };
                if let Ok(sealed) = sealer.seal_control(FrameType::Error, step, &msg) {
                    let _ = rt.block_on(r.tx.send(&sealed));
                }
            }
            result
        }
        other => anyhow::bail!("unexpected {} frame on the data plane", other.name()),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_batch(
    rt: &tokio::runtime::Handle,
    r: &mut RunningStage,
    sealer: &mut Sealer,
    samplers: &mut HashMap<usize, Option<SamplerChain>>,
    frame: &super::frame::Frame<'_>,
    hidden: &mut Vec<f32>,
    out: &mut Vec<f32>,
    toks: &mut Vec<i32>,
    status: &Arc<Mutex<Status>>,
) -> anyhow::Result<()> {
    {
        {
            frame.activations(hidden)?;
            let seqs: Vec<BatchSeq> = frame.batch();
            let step = frame.step_id;
            let t0 = Instant::now();
            let kind = r.stage.forward(&seqs, StageInput::Hidden(hidden), out)?;
            let descs = SeqDesc::from_batch(&seqs)?;
            let sealed = match kind {
                StageOutput::Hidden => {
                    sealer.seal_activations(step, &descs, out, r.width, r.dtype)?
                }
                StageOutput::Logits => {
                    let n_vocab = r.stage.hparams().n_vocab;
                    toks.clear();
                    let mut row = 0;
                    for s in &seqs {
                        if s.output == OutputRows::None {
                            continue;
                        }
                        let rows = if s.output == OutputRows::All {
                            s.n_tokens
                        } else {
                            1
                        };
                        for _ in 0..rows {
                            let l = out
                                .get(row * n_vocab..(row + 1) * n_vocab)
                                .ok_or_else(|| anyhow::anyhow!("missing logits row"))?;
                            let t = match samplers.get_mut(&s.slot) {
                                Some(Some(c)) => {
                                    let t = c.sample(l)?;
                                    c.accept(t);
                                    t
                                }
                                Some(None) => argmax(l).map(|t| t as i32).unwrap_or(0),
                                None => anyhow::bail!("slot {} has no sampling set-up", s.slot),
                            };
                            toks.push(t);
                            row += 1;
                        }
                    }
                    sealer.seal_tokens(step, &descs, toks)?
                }
            };
            let ms = t0.elapsed().as_secs_f64() * 1e3
                / seqs.iter().map(|s| s.n_tokens).sum::<usize>().max(1) as f64;
            if let Ok(mut st) = status.lock() {
                st.ms_per_token = if st.ms_per_token == 0.0 {
                    ms
                } else {
                    0.9 * st.ms_per_token + 0.1 * ms
                };
            }
            rt.block_on(r.tx.send(&sealed))?;
            Ok(())
        }
    }
}
