//! `exo serve`: load the model in the background while the HTTP API already answers
//! (/health says 503 until it is ready), serve, and shut down gracefully.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, App, Served};
use crate::engine::scheduler::{self, SchedulerConfig, StepObserver};
use crate::engine::{Pipeline, PipelineConfig};
use crate::model::{LayerRange, ModelFile};
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
    let mut app = App::new(
        model_id(&settings.model),
        settings.api_key.clone(),
        settings.max_body_bytes,
    );
    app.drain_timeout = settings.shutdown_timeout + Duration::from_secs(2);
    let app = Arc::new(app);
    let loading = {
        let app = app.clone();
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || {
            let observer: Arc<dyn StepObserver> = app.metrics.clone();
            match load(&settings, Some(observer)) {
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
        })
    };
    let grace = settings.shutdown_timeout;
    let app2 = app.clone();
    let stop = async move {
        shutdown.await;
        if let Some(s) = app2.served.get() {
            s.scheduler.shutdown(grace);
        }
    };
    let served = api::run(listener, app.clone(), stop);
    // Connections get the grace period plus a little to deliver their last bytes.
    served.await?;
    drop(loading);
    Ok(())
}
