//! What `serve` runs with, and how a [`Config`] becomes it (the one place that maps
//! configuration keys to runtime settings).

use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::capabilities::{offered_memory, Capabilities};
use crate::cluster::head::{fixed_lm_head_rows, HeadSettings};
use crate::cluster::planner::{check_own_part, ModelCosts, NodeInfo, OwnPart, PlanError};
use crate::cluster::worker::WorkerSettings;
use crate::config::{ApiKey, Config, MemorySize, WireActivations};
use crate::model::{LayerRange, ModelFile};

/// Everything `serve` needs: built from the configuration by [`ServeSettings::from_config`],
/// or directly by tests and benchmarks.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// The model file (None: a worker that receives its slice from the head).
    pub model: Option<PathBuf>,
    /// Context per sequence (clamped to the model's training context).
    pub n_ctx: usize,
    pub max_slots: usize,
    pub max_queue: usize,
    /// Tokens per engine step (prefill micro-batch).
    pub batch: usize,
    /// `[engine] prompt_cache`: reuse cached prompt prefixes.
    pub prompt_cache: bool,
    pub threads: usize,
    /// `[node] memory` in bytes: what this node may plan on (None: what the system
    /// reports available).
    pub memory: Option<u64>,
    pub api_key: Option<ApiKey>,
    /// `[api] web`: whether `/` serves the web page.
    pub web: bool,
    pub max_body_bytes: usize,
    /// Connections at once, header and body timeouts of the HTTP API.
    pub http: crate::api::HttpLimits,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// This node's part in a cluster (None: a single node).
    pub cluster: Option<ClusterRole>,
}

/// A node's part in a cluster.
#[derive(Debug, Clone)]
pub enum ClusterRole {
    /// The first peer: forms the cluster, runs the first stage, serves HTTP. Its engine
    /// figures (context, slots, batch, threads) are those of the [`ServeSettings`],
    /// clamped once the model is known ([`ServeSettings::clamped`]).
    Head(HeadSettings),
    /// Any other peer: runs its stage; its HTTP port points clients to the head.
    Worker {
        settings: WorkerSettings,
        head: String,
    },
}

/// Why a configuration cannot be served; loading the configuration rules these out, so
/// they mean a `Config` built by hand.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("this node's name '{0}' is not in the peer list")]
    NotAPeer(String),
    #[error("[node] listen is required in a cluster")]
    NoListen,
    #[error("[cluster] key or key_file is required")]
    NoClusterKey,
    #[error("peer {name}: bad address {address}")]
    BadAddress { name: String, address: String },
}

impl ServeSettings {
    /// This node's settings: the engine and API keys, and its part in the cluster the
    /// peer list describes (none for a single node).
    pub fn from_config(cfg: &Config) -> Result<ServeSettings, SettingsError> {
        let mut settings = ServeSettings {
            model: cfg.model.path.clone(),
            n_ctx: cfg.engine.ctx,
            max_slots: cfg.engine.max_slots,
            max_queue: cfg.engine.max_queue,
            batch: cfg.engine.batch,
            prompt_cache: cfg.engine.prompt_cache,
            threads: cfg.engine.threads,
            memory: cfg.node.memory.as_ref().map(MemorySize::bytes),
            api_key: cfg.api.key.clone(),
            web: cfg.api.web,
            max_body_bytes: cfg.api.max_body_bytes,
            http: cfg.api.http_limits(),
            shutdown_timeout: cfg.api.shutdown_timeout(),
            cluster: None,
        };
        settings.cluster = settings.cluster_role(cfg)?;
        Ok(settings)
    }

    /// These settings for a model trained on `n_ctx_train` tokens: the context at most
    /// that (and at least 1), at least one slot, token per step and thread. Both the
    /// single node and the cluster head run with these.
    pub fn clamped(mut self, n_ctx_train: usize) -> ServeSettings {
        self.n_ctx = self.n_ctx.min(n_ctx_train).max(1);
        self.max_slots = self.max_slots.max(1);
        self.batch = self.batch.max(1);
        self.threads = self.threads.max(1);
        self.cluster = match self.cluster.take() {
            Some(ClusterRole::Head(h)) => Some(ClusterRole::Head(self.with_engine_figures(h))),
            other => other,
        };
        self
    }

    /// Refuses, with the numbers, a model that this node cannot hold where its
    /// settings alone can tell: a single node holds the whole model; a cluster head its
    /// given layers, or else at the least the embedding and the first layer. (The
    /// peers' memory is known at formation, which checks the rest; a worker's part is
    /// the head's to plan.) For settings [`ServeSettings::clamped`] to the model.
    pub fn check_own_memory(&self, mf: &ModelFile) -> Result<(), PlanError> {
        let (name, part) = match &self.cluster {
            None => ("this node".to_string(), OwnPart::Whole),
            Some(ClusterRole::Worker { .. }) => return Ok(()),
            Some(ClusterRole::Head(h)) => {
                let given = h.peers.iter().all(|p| p.layers.is_some());
                let part = match h.peers.first().and_then(|p| p.layers) {
                    Some((a, b)) if given => OwnPart::Given {
                        range: LayerRange::new(a, b),
                        lm_head_rows: fixed_lm_head_rows(h.head_share, mf.hparams.n_vocab),
                    },
                    _ => OwnPart::First,
                };
                (h.name.clone(), part)
            }
        };
        let node = NodeInfo {
            name,
            caps: Capabilities::offering(offered_memory(self.memory)),
        };
        let costs = ModelCosts::of(mf, self.n_ctx, self.max_slots);
        check_own_part(&node, &costs, &part, mf.hparams.n_vocab)
    }

    /// `h` with these settings' context, slots, batch and threads.
    pub fn with_engine_figures(&self, h: HeadSettings) -> HeadSettings {
        HeadSettings {
            n_ctx: self.n_ctx,
            n_slots: self.max_slots,
            batch: self.batch,
            threads: self.threads,
            ..h
        }
    }

    /// This node's part in the cluster `cfg` describes (None: a single node).
    fn cluster_role(&self, cfg: &Config) -> Result<Option<ClusterRole>, SettingsError> {
        if !cfg.is_cluster() {
            return Ok(None);
        }
        if cfg.own_peer_index().is_none() {
            return Err(SettingsError::NotAPeer(cfg.node.name.clone()));
        }
        let listen = cfg.node.listen.clone().ok_or(SettingsError::NoListen)?;
        let key = cfg
            .cluster
            .key
            .as_ref()
            .ok_or(SettingsError::NoClusterKey)?;
        let key = key.expose().as_bytes().to_vec();
        if !cfg.is_head() {
            let control_listen = cfg.node.control_listen().ok_or(SettingsError::NoListen)?;
            let head = &cfg.peers[0];
            return Ok(Some(ClusterRole::Worker {
                settings: WorkerSettings {
                    name: cfg.node.name.clone(),
                    model: self.model.clone(),
                    cache_dir: cfg.model.cache_dir.clone(),
                    listen,
                    control_listen,
                    key,
                    threads: self.threads,
                    memory: self.memory,
                    n_peers: cfg.peers.len(),
                },
                head: format!("{} ({})", head.name, head.address),
            }));
        }
        // every peer's control plane must be reachable (the address port + 1)
        if let Some(p) = cfg.peers.iter().find(|p| p.control_address().is_none()) {
            return Err(SettingsError::BadAddress {
                name: p.name.clone(),
                address: p.address.clone(),
            });
        }
        Ok(Some(ClusterRole::Head(HeadSettings {
            name: cfg.node.name.clone(),
            listen,
            peers: cfg.peers.clone(),
            key,
            threads: self.threads,
            n_ctx: self.n_ctx,
            n_slots: self.max_slots,
            batch: self.batch,
            f16: cfg.cluster.activations == WireActivations::F16,
            head_share: cfg.cluster.head_share,
            memory: self.memory,
            cache_dir: cfg.model.cache_dir.clone(),
        })))
    }
}

#[cfg(test)]
mod tests;
