//! `exo serve`: load the model in the background while the HTTP API already answers
//! (/health says 503 until it is ready), serve, and shut down gracefully.
//!
//! [`run`] is the whole of it for a configuration file: the settings from the config
//! ([`ServeSettings::from_config`]), the listener, SIGHUP reloads, then [`serve_app`].

mod settings;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, App, Served};
use crate::cluster::head::{self, HeadSettings};
use crate::cluster::worker;
use crate::config::Config;
use crate::engine::scheduler::{self, SchedulerConfig, StepObserver};
use crate::engine::{Pipeline, PipelineConfig};
use crate::model::{HParams, LayerRange, ModelFile};
use crate::system::{notify, reload};
use crate::tokenizer::Tokenizer;

pub use settings::{ClusterRole, ServeSettings, SettingsError};

/// How serving ended (after the drain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future resolved.
    Shutdown,
    /// Under systemd, the model could not be loaded (the reason): the process should
    /// exit with [`notify::EXIT_LOAD_FAILED`].
    LoadFailed(String),
}

/// The engine thread of a loaded model, joined on shutdown.
type EngineThread = Arc<Mutex<Option<std::thread::JoinHandle<()>>>>;

/// The model id clients use: the file name without `.gguf`.
pub fn model_id(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Serves the configuration `config` (read from `path`, which SIGHUP re-reads) until
/// `shutdown` resolves or, under systemd, the model fails to load.
pub async fn run(
    path: &Path,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Stopped> {
    let settings = ServeSettings::from_config(&config)?;
    // each client holds a descriptor: the connection limit stays below this
    crate::system::raise_open_files_limit();
    let listener = TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("listening on {}", config.api.listen))?;
    tracing::info!(
        "node {} listening on http://{} (model {})",
        config.node.name,
        listener.local_addr()?,
        match &config.model.path {
            Some(p) => p.display().to_string(),
            None => format!("slices in {}", config.model.cache_dir.display()),
        }
    );
    let app = new_app(&settings);
    reload::spawn(path.to_path_buf(), config, app.clone());
    serve_app(app, listener, settings, shutdown).await
}

/// Loads model, tokenizer and engine of a single node, and starts the scheduler thread.
fn load_local(
    s: &ServeSettings,
    observer: Option<Arc<dyn StepObserver>>,
) -> anyhow::Result<(Served, std::thread::JoinHandle<()>)> {
    let path = model_path(s)?;
    let mf = ModelFile::open(path).with_context(|| format!("loading {}", path.display()))?;
    let hp = mf.hparams.clone();
    let tokenizer = load_tokenizer(path, &hp)?;
    let s = s.clone().clamped(hp.n_ctx_train);
    s.check_own_memory(&mf)?;
    let pipeline = Pipeline::local(
        &mf,
        &PipelineConfig {
            n_ctx: s.n_ctx,
            n_slots: s.max_slots,
            n_threads: s.threads,
            repack: true,
            ranges: vec![LayerRange::new(0, hp.n_layer)],
        },
    )?;
    start_engine(pipeline, tokenizer, &hp, &s, observer)
}

/// The model file of a single node or head.
fn model_path(s: &ServeSettings) -> anyhow::Result<&Path> {
    s.model
        .as_deref()
        .context("no [model] path: a single node and a cluster's head need the model file")
}

fn load_tokenizer(model: &Path, hp: &HParams) -> anyhow::Result<Arc<Tokenizer>> {
    let tokenizer = Tokenizer::load(model, hp.arch.name())
        .with_context(|| format!("loading the vocabulary of {}", model.display()))?;
    Ok(Arc::new(tokenizer))
}

/// Starts the scheduler thread over `pipeline`: the one place a [`Served`] is made.
/// `s` is clamped to the model ([`ServeSettings::clamped`]).
fn start_engine(
    pipeline: Pipeline,
    tokenizer: Arc<Tokenizer>,
    hp: &HParams,
    s: &ServeSettings,
    observer: Option<Arc<dyn StepObserver>>,
) -> anyhow::Result<(Served, std::thread::JoinHandle<()>)> {
    let tok = tokenizer.clone();
    let (scheduler, join) = scheduler::spawn(
        pipeline,
        SchedulerConfig {
            max_slots: s.max_slots,
            max_queue: s.max_queue,
            batch: s.batch,
            prompt_cache: s.prompt_cache,
            step_secs: scheduler::STEP_SECS,
            decode_share: scheduler::DECODE_SHARE,
        },
        Arc::new(move |t| tok.is_eog(t)),
        observer,
    )?;
    let served = Served {
        tokenizer,
        scheduler,
        n_ctx: s.n_ctx,
        n_vocab: hp.n_vocab,
        arch: hp.arch.name().to_string(),
        n_layer: hp.n_layer,
        max_slots: s.max_slots,
    };
    Ok((served, join))
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
    serve_app(app, listener, settings, shutdown).await?;
    Ok(())
}

/// The shared state `serve_app` serves (the caller may keep a handle, e.g. for SIGHUP).
pub fn new_app(settings: &ServeSettings) -> Arc<App> {
    let mut app = App::new(
        settings
            .model
            .as_deref()
            .map_or_else(|| "model".into(), model_id),
        settings.api_key.clone(),
        settings.max_body_bytes,
    );
    app.drain_timeout = settings.shutdown_timeout + Duration::from_secs(2);
    app.http = settings.http;
    app.web = settings.web;
    Arc::new(app)
}

/// `serve` on an app made by [`new_app`]. Under systemd (`NOTIFY_SOCKET`), reports
/// readiness, status and watchdog pings (see [`crate::system::notify`]); a model that
/// fails to load there ends serving ([`Stopped::LoadFailed`]). On the way out, the
/// loading task and the engine thread get the shutdown timeout to finish.
pub async fn serve_app(
    app: Arc<App>,
    listener: TcpListener,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Stopped> {
    // Shutdown reaches the HTTP server, the scheduler and (on a worker) the stage.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let engine = EngineThread::default();
    let loading = match settings.cluster.clone() {
        None => local_loading(app.clone(), settings.clone(), engine.clone()),
        Some(ClusterRole::Head(h)) => {
            head_loading(app.clone(), settings.clone(), h, engine.clone())
        }
        Some(ClusterRole::Worker { settings: w, head }) => {
            let _ = app.worker_of.set(head);
            let mut rx = stop_rx.clone();
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let (stats, progress) = (app.frames.clone(), app.progress.clone());
            let listeners = app.listeners.clone();
            tokio::spawn(async move {
                if let Err(e) = worker::run(w, stats, listeners, progress, stop).await {
                    tracing::error!("worker stopped: {e:#}");
                }
            })
        }
    };
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
    let supervisor = notify::spawn(app.clone(), stop_rx, failed_tx);
    let grace = settings.shutdown_timeout;
    let stopped = Arc::new(OnceLock::new());
    let stop = {
        let (app, stopped) = (app.clone(), stopped.clone());
        async move {
            let load_failed = async {
                match failed_rx.await {
                    Ok(why) => why,
                    // no supervisor: only the shutdown future ends serving
                    Err(_) => std::future::pending().await,
                }
            };
            let _ = stopped.set(tokio::select! {
                () = shutdown => Stopped::Shutdown,
                why = load_failed => Stopped::LoadFailed(why),
            });
            notify::stopping();
            let _ = stop_tx.send(true);
            if let Some(s) = app.served.get() {
                s.scheduler.shutdown(grace);
            }
        }
    };
    api::run(listener, app.clone(), stop).await?;
    if let Some(s) = supervisor {
        s.abort();
    }
    wind_down(loading, engine, grace).await;
    Ok(stopped.get().cloned().unwrap_or(Stopped::Shutdown))
}

/// Waits up to `grace` for the loading task (a worker's stage) and the engine thread
/// to end; what is still running then is left behind (the loading task aborted).
async fn wind_down(
    mut loading: tokio::task::JoinHandle<()>,
    engine: EngineThread,
    grace: Duration,
) {
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout_at(deadline, &mut loading)
        .await
        .is_err()
    {
        loading.abort();
    }
    let thread = engine.lock().ok().and_then(|mut t| t.take());
    if let Some(thread) = thread {
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout_at(deadline, joined).await.is_err() {
            tracing::warn!("the engine thread is still running after {grace:?}; leaving it");
        }
    }
}

fn loaded(
    app: &App,
    engine: &EngineThread,
    r: anyhow::Result<(Served, std::thread::JoinHandle<()>)>,
) {
    match r {
        Ok((served, thread)) => {
            tracing::info!(
                "model {} loaded: {} layers, context {}, {} slots; serving",
                app.model_id,
                served.n_layer,
                served.n_ctx,
                served.max_slots
            );
            if let Ok(mut slot) = engine.lock() {
                *slot = Some(thread);
            }
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

fn local_loading(
    app: Arc<App>,
    settings: ServeSettings,
    engine: EngineThread,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        let observer: Arc<dyn StepObserver> = app.metrics.clone();
        loaded(&app, &engine, load_local(&settings, Some(observer)));
    })
}

fn head_loading(
    app: Arc<App>,
    settings: ServeSettings,
    h: HeadSettings,
    engine: EngineThread,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let r = async {
            let path: PathBuf = model_path(&settings)?.to_path_buf();
            let mf = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || ModelFile::open(&path)).await?
            }
            .with_context(|| format!("loading {}", path.display()))?;
            let mf = Arc::new(mf);
            let hp = mf.hparams.clone();
            let tokenizer = {
                let (path, hp) = (path.clone(), hp.clone());
                tokio::task::spawn_blocking(move || load_tokenizer(&path, &hp)).await??
            };
            let settings = settings.clamped(hp.n_ctx_train);
            let h = settings.with_engine_figures(h);
            let progress = app.progress.clone();
            let (frames, listeners) = (app.frames.clone(), app.listeners.clone());
            let (pipeline, view) = head::form(mf, h, frames, listeners, progress).await?;
            let _ = app.cluster.set(view);
            let observer: Arc<dyn StepObserver> = app.metrics.clone();
            start_engine(pipeline, tokenizer, &hp, &settings, Some(observer))
        }
        .await;
        loaded(&app, &engine, r);
    })
}
