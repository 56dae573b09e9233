//! `exo serve`: load the model in the background while the HTTP API already answers
//! (/health says 503 until it is ready), serve, and shut down gracefully.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, App, Served};
use crate::cluster::head::{self, HeadSettings};
use crate::cluster::worker::{self, WorkerSettings};
use crate::engine::scheduler::{self, SchedulerConfig, StepObserver};
use crate::engine::{Pipeline, PipelineConfig};
use crate::model::{LayerRange, ModelFile};
use crate::system::notify;

use crate::tokenizer::Tokenizer;

/// Everything `serve` needs (built from the config file by the binary, or by tests).
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub model: PathBuf,
    /// Context per sequence (clamped to the model's training context).
    pub n_ctx: usize,
    pub max_slots: usize,
    pub max_queue: usize,
    /// Tokens per engine step (prefill micro-batch).
    pub batch: usize,
    pub threads: usize,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// This node's part in a cluster (None: a single node).
    pub cluster: Option<ClusterRole>,
}

/// A node's part in a cluster.
#[derive(Debug, Clone)]
pub enum ClusterRole {
    /// The first peer: forms the cluster, runs the first stage, serves HTTP.
    Head(HeadSettings),
    /// Any other peer: runs its stage; its HTTP port points clients to the head.
    Worker {
        settings: WorkerSettings,
        head: String,
    },
}

/// The model id clients use: the file name without `.gguf`.
pub fn model_id(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Loads model, tokenizer and engine, and starts the scheduler thread.
pub fn load(s: &ServeSettings, observer: Option<Arc<dyn StepObserver>>) -> anyhow::Result<Served> {
    use anyhow::Context;
    let mf = ModelFile::open(&s.model).with_context(|| format!("loading {}", s.model.display()))?;
    let hp = mf.hparams.clone();
    let tokenizer = Arc::new(
        Tokenizer::load(&s.model, hp.arch.name())
            .with_context(|| format!("loading the vocabulary of {}", s.model.display()))?,
    );
    let n_ctx = s.n_ctx.min(hp.n_ctx_train).max(1);
    let max_slots = s.max_slots.max(1);
    let pipeline = Pipeline::local(
        &mf,
        &PipelineConfig {
            n_ctx,
            n_slots: max_slots,
            n_threads: s.threads.max(1),
            repack: true,
            ranges: vec![LayerRange::new(0, hp.n_layer)],
        },
    )?;
    let tok = tokenizer.clone();
    let (scheduler, _join) = scheduler::spawn(
        pipeline,
        SchedulerConfig {
            max_slots,
            max_queue: s.max_queue,
            batch: s.batch.max(1),
        },
        Arc::new(move |t| tok.is_eog(t)),
        observer,
    )?;
    Ok(Served {
        tokenizer,
        scheduler,
        n_ctx,
        n_vocab: hp.n_vocab,
        arch: hp.arch.name().to_string(),
        n_layer: hp.n_layer,
        max_slots,
    })
}

/// Serves on `listener` until `shutdown` resolves; loads the model in the background.
/// After the signal: no new connections or requests, running generations may finish
/// for `shutdown_timeout`, then are cancelled; returns once connections are closed.
pub async fn serve(
    listener: TcpListener,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = new_app(&settings);
    serve_app(app, listener, settings, shutdown).await
}

/// The shared state `serve_app` serves (the caller may keep a handle, e.g. for SIGHUP).
pub fn new_app(settings: &ServeSettings) -> Arc<App> {
    let mut app = App::new(
        model_id(&settings.model),
        settings.api_key.clone(),
        settings.max_body_bytes,
    );
    app.drain_timeout = settings.shutdown_timeout + Duration::from_secs(2);
    Arc::new(app)
}

/// `serve` on an app made by [`new_app`]. Under systemd (`NOTIFY_SOCKET`), reports
/// readiness, status and watchdog pings (see [`crate::system::notify`]).
pub async fn serve_app(
    app: Arc<App>,
    listener: TcpListener,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Shutdown reaches the HTTP server, the scheduler and (on a worker) the stage.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let loading = match settings.cluster.clone() {
        None => local_loading(app.clone(), settings.clone()),
        Some(ClusterRole::Head(h)) => head_loading(app.clone(), settings.clone(), h),
        Some(ClusterRole::Worker { settings: w, head }) => {
            let _ = app.worker_of.set(head);
            let stop = stopped();
            let stats = app.frames.clone();
            tokio::spawn(async move {
                if let Err(e) = worker::run(w, stats, stop).await {
                    tracing::error!("worker stopped: {e:#}");
                }
            })
        }
    };
    let supervisor = notify::spawn(app.clone(), stop_tx.subscribe());
    let grace = settings.shutdown_timeout;
    let app2 = app.clone();
    let stop = async move {
        shutdown.await;
        notify::stopping();
        let _ = stop_tx.send(true);
        if let Some(s) = app2.served.get() {
            s.scheduler.shutdown(grace);
        }
    };
    let served = api::run(listener, app.clone(), stop);
    served.await?;
    loading.abort();
    if let Some(s) = supervisor {
        s.abort();
    }
    Ok(())
}

fn loaded(app: &App, r: anyhow::Result<Served>) {
    match r {
        Ok(served) => {
            tracing::info!(
                "model {} loaded: {} layers, context {}, {} slots; serving",
                app.model_id,
                served.n_layer,
                served.n_ctx,
                served.max_slots
            );
            let _ = app.served.set(served);
        }
        Err(e) => {
            tracing::error!("model failed to load: {e:#}");
            if let Ok(mut slot) = app.load_error.lock() {
                *slot = Some(format!("{e:#}"));
            }
        }
    }
}

fn local_loading(app: Arc<App>, settings: ServeSettings) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        let observer: Arc<dyn StepObserver> = app.metrics.clone();
        loaded(&app, load(&settings, Some(observer)));
    })
}

fn head_loading(
    app: Arc<App>,
    settings: ServeSettings,
    h: HeadSettings,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let r = async {
            use anyhow::Context;
            let path = settings.model.clone();
            let mf = tokio::task::spawn_blocking(move || ModelFile::open(&path))
                .await?
                .with_context(|| format!("loading {}", settings.model.display()))?;
            let mf = Arc::new(mf);
            let hp = mf.hparams.clone();
            let tokenizer = Arc::new(
                Tokenizer::load(&settings.model, hp.arch.name()).with_context(|| {
                    format!("loading the vocabulary of {}", settings.model.display())
                })?,
            );
            let (pipeline, view) = head::form(mf, h.clone(), app.frames.clone()).await?;
            let _ = app.cluster.set(view);
            let tok = tokenizer.clone();
            let observer: Arc<dyn StepObserver> = app.metrics.clone();
            let (scheduler, _join) = scheduler::spawn(
                pipeline,
                SchedulerConfig {
                    max_slots: h.n_slots,
                    max_queue: settings.max_queue,
                    batch: h.batch,
                },
                Arc::new(move |t| tok.is_eog(t)),
                Some(observer),
            )?;
            Ok(Served {
                tokenizer,
                scheduler,
                n_ctx: h.n_ctx,
                n_vocab: hp.n_vocab,
                arch: hp.arch.name().to_string(),
                n_layer: hp.n_layer,
                max_slots: h.n_slots,
            })
        }
        .await;
        loaded(&app, r);
    })
}
