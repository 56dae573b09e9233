//! A worker node: answers the head's control requests (hello, plan, ping, slices;
//! [`handler`]) and runs its stage on every batch that arrives, passing activations
//! on (or, on the last stage, sampled token ids back to the head; [`data`]).

mod data;
mod handler;

use std::path::PathBuf;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use super::admission::{Admission, Listeners};
use super::capabilities::Capabilities;
use super::slices::receive::Receiver;
use super::slices::Progress;
use super::transport::{ControlServer, PipelineRx, PipelineTx};
use super::wire::{Dtype, FrameKey, Limits, OpenerStats, MAX_CHUNK_FRAME_LEN};
use crate::engine::Stage;
use crate::model::ModelFile;
use handler::ControlHandler;

/// The longest frame a worker's data plane takes before a plan says how long its
/// batches are (none is used before a plan).
const BEFORE_PLAN_FRAME_MAX: usize = 64 << 10;
/// Control requests a worker answers at a time (a plan being loaded holds one).
const CONTROL_LANES: usize = 4;

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
    /// Nodes of the cluster (`[[peer]]` entries): bounds the connections admitted.
    pub n_peers: usize,
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
    /// Computing a step now.
    busy: bool,
}

/// Serves as a worker until `shutdown` resolves.
/// `progress` shows a slice transfer while it runs.
pub async fn run(
    s: WorkerSettings,
    frame_stats: Arc<OpenerStats>,
    listeners: Listeners,
    progress: Progress,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let (model, caps) = open_model(&s, progress).await?;
    let key = FrameKey::derive(&s.key);
    // control frames, and the model's chunks for a node that receives its slice
    let control_max = match model {
        WorkerModel::Slices(_) => MAX_CHUNK_FRAME_LEN,
        WorkerModel::File(..) => Limits::control_only().max_frame_len(),
    };
    let control = Arc::new(
        ControlServer::listen(
            &s.control_listen,
            Admission::cluster(s.n_peers, control_max),
        )
        .await
        .with_context(|| format!("control plane on {}", s.control_listen))?,
    );
    let rx = PipelineRx::listen(
        &s.listen,
        Admission::cluster(s.n_peers, BEFORE_PLAN_FRAME_MAX),
    )
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
    let data_sender = super::wire::random_sender_id();
    let data_cap = rx.recv_cap();
    listeners.add("control", control.recv_cap());
    listeners.add("data", data_cap.clone());
    let data = {
        let (key, status, stats) = (key.clone(), status.clone(), frame_stats.clone());
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("exo-stage".into())
            .spawn(move || data::data_loop(rt, rx, cmd_rx, key, data_sender, status, stats))?
    };
    let handler = Arc::new(ControlHandler::new(
        &s,
        caps,
        model,
        key,
        frame_stats,
        handler::Links {
            status,
            cmd_tx,
            data_sender,
            data_cap,
        },
    ));
    let control_task = {
        let control = control.clone();
        tokio::spawn(async move {
            let _ = control
                .serve(CONTROL_LANES, move |pkt| {
                    let handler = handler.clone();
                    async move { handler.handle(pkt.as_bytes()).await }
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
        let id = mf.model_hash.clone();
        Ok((WorkerModel::File(mf, id), caps))
    })
    .await?
}
