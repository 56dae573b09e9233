//! The configuration of `exo serve`: a TOML file (`/etc/exo/exo.toml` by default) and an
//! explicit list of `EXO_*` environment variables that override single keys.
//!
//! Loading parses the file once into typed sections ([`file`]: one serde struct per
//! section with `deny_unknown_fields`; each value keeps its span, so an unknown key, a
//! wrong type or an invalid value is reported with its line), applies the environment
//! overrides to that typed value ([`env`]), then fills in the defaults and checks every
//! value and the rules across keys in one pass ([`validate`]) into a [`Config`].
//!
//! Adding a key: a field of its `File*` struct and of its section here (with its
//! default), its name in `file::SECTIONS`, its check in `validate`, and, if it has a
//! variable, a line of `env::ENV_OVERRIDES` and an arm of `FileConfig::slot`.
//!
//! A file without `[[peer]]` entries is a single node. With peers it is a cluster: the
//! peers in pipeline order (the same list on every node, the first one the head that
//! serves HTTP), this node's `[node] listen` URL for the data plane (the control plane
//! listens on the same host, port + 1) and the shared `[cluster]` key.

mod env;
mod error;
mod file;
mod secret;
mod url;
mod validate;

pub use validate::{BATCH_LIMIT, CTX_LIMIT};

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};

pub use error::{ConfigError, Location};
pub use secret::{ApiKey, ClusterKey, Secret, SecretKind};
pub use url::{control_url, parse_tcp_url};

/// Where `exo serve` looks for its configuration when given no `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/exo/exo.toml";
/// `[node] name` when `/etc/hostname` gives none.
pub const FALLBACK_NODE_NAME: &str = "exo";
/// `[api] listen` by default: this machine only.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// `[api] max_body_bytes` by default: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// `[api] shutdown_timeout_secs` by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 10;
/// `[api] max_connections` by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// `[api] max_connections_per_ip` by default.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// `[api] header_timeout_secs` by default.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// `[api] body_timeout_secs` by default.
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 30;
/// `[api] write_timeout_secs` by default.
pub const DEFAULT_WRITE_TIMEOUT_SECS: u64 = 30;
/// `[engine] ctx` by default.
pub const DEFAULT_CTX: usize = 4096;
/// `[engine] max_slots` by default.
pub const DEFAULT_MAX_SLOTS: usize = 4;
/// `[engine] max_slots` at most.
pub const MAX_SLOTS_LIMIT: usize = 64;
/// `[engine] max_queue` by default.
pub const DEFAULT_MAX_QUEUE: usize = 64;
/// `[engine] batch` by default.
pub const DEFAULT_BATCH: usize = 512;
/// `[cluster] key` at least this many characters.
pub const MIN_CLUSTER_KEY_LEN: usize = 16;
/// A node's control plane listens on the port of its data-plane URL plus this.
pub const CONTROL_PORT_OFFSET: u16 = 1;

/// The effective configuration: the file, the environment overrides and the defaults,
/// checked. [`Config::effective_toml`] prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node: NodeConfig,
    pub model: ModelConfig,
    pub api: ApiConfig,
    pub engine: EngineConfig,
    /// `[cluster]`: printed only when a key is set.
    #[serde(skip_serializing_if = "ClusterConfig::is_empty")]
    pub cluster: ClusterConfig,
    /// `[[peer]]`, in pipeline order; empty: a single node.
    #[serde(rename = "peer", skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
}

/// `[node]`: this machine.
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    /// Name in logs and in the cluster (its `[[peer]] name`). Default: the hostname, or
    /// "exo".
    pub name: String,
    /// This node's nng URL for the cluster data plane, such as "tcp://0.0.0.0:5555"
    /// (checked: `tcp://`, a host, a port in 1..=65534). The control plane listens on the
    /// same host, port + 1 ([`NodeConfig::control_listen`]). Required when peers are
    /// listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The memory the planner may plan on this node (weights, KV cache and the
    /// runtime), such as "1.5 GiB", "800 MB" or a number of bytes. `None`: what the
    /// system reports available when the node starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySize>,
}

/// A size in bytes, printed as the file (or its variable) wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySize {
    bytes: u64,
    written: String,
}

impl MemorySize {
    /// Reads "1.5 GiB", "800 MB", "800MB", "2g" (units: B, kB/KiB … EB/EiB, any case;
    /// "k", "m", "g" are SI) or a plain number of bytes; 0 is refused.
    pub fn parse(text: &str) -> Result<MemorySize, String> {
        let written = text.trim();
        let usage = "a size such as \"1.5 GiB\", \"800 MB\" or a number of bytes";
        let bytes = written
            .parse::<bytesize::ByteSize>()
            .map_err(|_| format!("'{written}' is not {usage}"))?
            .as_u64();
        if bytes == 0 {
            return Err(format!("'{written}' is no memory at all: give {usage}"));
        }
        Ok(MemorySize {
            bytes,
            written: written.to_owned(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Serialize for MemorySize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.written)
    }
}

/// `[model]`: the model to serve.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// The GGUF file. Loading the configuration does not check that it exists.
    /// Required on the head and a single node; a worker without one receives its
    /// slice of the head's model into `cache_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Where a worker keeps the slices it receives, and the head the hashes of its
    /// model's chunks.
    pub cache_dir: PathBuf,
}

/// The default `[model] cache_dir`.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/exo/models";

/// `[api]`: the OpenAI-compatible HTTP server.
#[derive(Debug, Clone, Serialize)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The bearer token clients must send, from `key` or read from `key_file`; `None`:
    /// no authentication. Printed as `"***"`, and not at all when it came from a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<ApiKey>,
    /// The file the key was read from, when it came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// On shutdown, how long running requests get to finish.
    pub shutdown_timeout_secs: u64,
    /// Connections served at once (kept below the open-files limit); one more gets a
    /// 503 and is closed.
    pub max_connections: usize,
    /// Connections served at once from one client address (0: no limit); one more
    /// gets a 503 and is closed.
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a request's headers; also how long an idle
    /// kept-alive connection is held.
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a request's body.
    pub body_timeout_secs: u64,
    /// Seconds a response write may make no progress (a client that stops reading)
    /// before the connection is closed and its generation cancelled.
    pub write_timeout_secs: u64,
    /// Whether `/` serves the web page (chat and cluster panel).
    pub web: bool,
}

/// `[engine]`: the inference engine.
#[derive(Debug, Clone, Serialize)]
pub struct EngineConfig {
    /// CPU threads. Default: the available parallelism.
    pub threads: usize,
    /// Context length of each sequence slot, in tokens (prompt and completion).
    pub ctx: usize,
    /// Sequences decoded together in one batched step (1..=64).
    pub max_slots: usize,
    /// Requests waiting for a free slot, at most.
    pub max_queue: usize,
    /// Prompt tokens fed per prefill step (micro-batch).
    pub batch: usize,
    /// Reuse the KV cache of a prompt prefix an earlier request left in a slot.
    pub prompt_cache: bool,
}

/// `[cluster]`: what every node of a cluster shares.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterConfig {
    /// The shared secret, from `key` or read from `key_file` (at least
    /// [`MIN_CLUSTER_KEY_LEN`] visible ASCII characters). Required when peers are listed.
    /// Printed as `"***"`, and not at all when it came from a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<ClusterKey>,
    /// The file the key was read from, when it came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Activations on the wire: "f32" (exact, the default: a cluster answers exactly
    /// as one node) or "f16" (2 bytes a value, bf16 for a frame whose values would
    /// overflow f16; for slow links, answers may differ from one node's).
    pub activations: WireActivations,
    /// Whether the output head is split by vocabulary between the last node and the
    /// head node.
    pub head_share: HeadSharePolicy,
}

/// `[cluster] head_share`: how much of the output head (by vocabulary rows) the
/// head node computes, besides the last node.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum HeadSharePolicy {
    /// The planner decides (when it plans the layers; never with explicit ranges).
    #[default]
    Auto,
    /// Never: the last node computes the whole head.
    Off,
    /// This fraction of the rows, strictly between 0 and 1.
    Share(f64),
}

/// Printed as in the file: "auto", "off" or the fraction as a string.
impl Serialize for HeadSharePolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            HeadSharePolicy::Auto => serializer.serialize_str("auto"),
            HeadSharePolicy::Off => serializer.serialize_str("off"),
            HeadSharePolicy::Share(f) => serializer.serialize_str(&f.to_string()),
        }
    }
}

/// How activations cross the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WireActivations {
    F16,
    #[default]
    F32,
}

/// One `[[peer]]`: a node of the cluster, in pipeline order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerConfig {
    /// Its `[node] name` (unique in the list).
    pub name: String,
    /// The nng URL other nodes dial to reach its data plane, such as
    /// "tcp://192.168.1.20:5555" (unique in the list); its control plane is the same
    /// host, port + 1 ([`PeerConfig::control_address`]).
    pub address: String,
    /// Its layers `start..end` (end exclusive), when the file gives them; then every
    /// peer has them, contiguous from 0 in peer order. `None`: the cluster splits the
    /// layers itself. Printed as in the file: `layers = "A-B"`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_layers"
    )]
    pub layers: Option<(usize, usize)>,
}

/// Explicit `[[peer]] layers` (contiguous from 0, as the config check made them) against a
/// model of `n_layer` layers: the last range must end at the model's last layer. `Ok` when
/// the cluster splits the layers itself.
pub fn check_layers_fit(peers: &[PeerConfig], n_layer: usize) -> Result<(), String> {
    let Some(last) = peers.last() else {
        return Ok(());
    };
    let Some((a, b)) = last.layers else {
        return Ok(());
    };
    if b == n_layer {
        return Ok(());
    }
    let beyond = peers
        .iter()
        .find(|p| p.layers.is_some_and(|(_, b)| b > n_layer))
        .unwrap_or(last);
    let (pa, pb) = beyond.layers.unwrap_or((a, b));
    let how = if b < n_layer {
        format!("layers {b}..{n_layer} are on no peer")
    } else {
        format!(
            "peer '{}' has layers {pa}-{pb}, past the last one",
            beyond.name
        )
    };
    Err(format!(
        "the [[peer]] layers end at {b} but the model has {n_layer} layers ({how}): \
         make the last peer's range end at {n_layer}, or leave out layers to let exo split them"
    ))
}

fn serialize_layers<S: Serializer>(
    layers: &Option<(usize, usize)>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match layers {
        Some((a, b)) => serializer.serialize_str(&format!("{a}-{b}")),
        None => serializer.serialize_none(),
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: default_node_name(),
            listen: None,
            memory: None,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: DEFAULT_LISTEN,
            key: None,
            key_file: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            header_timeout_secs: DEFAULT_HEADER_TIMEOUT_SECS,
            body_timeout_secs: DEFAULT_BODY_TIMEOUT_SECS,
            write_timeout_secs: DEFAULT_WRITE_TIMEOUT_SECS,
            web: true,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: default_threads(),
            ctx: DEFAULT_CTX,
            max_slots: DEFAULT_MAX_SLOTS,
            max_queue: DEFAULT_MAX_QUEUE,
            batch: DEFAULT_BATCH,
            prompt_cache: true,
        }
    }
}

impl NodeConfig {
    /// The nng URL of this node's control plane: `listen` with its port + 1; `None`
    /// without `listen`.
    pub fn control_listen(&self) -> Option<String> {
        control_url(self.listen.as_deref()?).ok()
    }
}

impl PeerConfig {
    /// The nng URL of this peer's control plane: `address` with its port + 1 (`None`
    /// only for an address that loading would have refused).
    pub fn control_address(&self) -> Option<String> {
        control_url(&self.address).ok()
    }
}

impl ApiConfig {
    /// `shutdown_timeout_secs` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }

    /// The connection limits and the client timeouts.
    pub fn http_limits(&self) -> crate::api::HttpLimits {
        crate::api::HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            body_timeout: Duration::from_secs(self.body_timeout_secs),
            write_timeout: Duration::from_secs(self.write_timeout_secs),
        }
    }
}

impl ClusterConfig {
    /// Neither `key` nor `key_file` is set.
    pub fn is_empty(&self) -> bool {
        self.key.is_none() && self.key_file.is_none()
    }
}

impl Config {
    /// Loads `path` with the overrides of the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_from_env_map(path, &env::from_process()?)
    }

    /// Loads `path` with the overrides found in `env` (variable → value), which may hold
    /// anything: only the known `EXO_*` variables are looked at.
    pub fn load_from_env_map(
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let text = read_small_file(path, MAX_CONFIG_BYTES).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                ConfigError::NotFound { path: path.into() }
            } else {
                ConfigError::Read {
                    path: path.into(),
                    error,
                }
            }
        })?;
        Self::parse_text(path, &text, env)
    }

    /// The configuration in `text` (read from `path`, which errors name) with the
    /// overrides found in `env`.
    pub fn parse_text(
        path: &Path,
        text: &str,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let origin = file::Origin { path, text };
        let mut file = origin.parse()?;
        file.apply_env(env)?;
        validate::resolve(file, &origin)
    }

    /// A configuration with every default and this model: for callers without a file.
    pub fn with_model(path: impl Into<PathBuf>) -> Config {
        Config {
            node: NodeConfig::default(),
            model: ModelConfig {
                path: Some(path.into()),
                cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            },
            api: ApiConfig::default(),
            engine: EngineConfig::default(),
            cluster: ClusterConfig::default(),
            peers: Vec::new(),
        }
    }

    /// The effective configuration as TOML, the API and cluster keys shown as `"***"`,
    /// or only as their `key_file` when read from one (for `exo check-config`; the
    /// output is itself a valid configuration).
    pub fn effective_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.api.key_file.is_some() {
            shown.api.key = None;
        }
        if shown.cluster.key_file.is_some() {
            shown.cluster.key = None;
        }
        toml::to_string(&shown)
            .unwrap_or_else(|e| format!("# the configuration cannot be printed as TOML: {e}\n"))
    }

    /// Whether peers are listed (a cluster), rather than a single node.
    pub fn is_cluster(&self) -> bool {
        !self.peers.is_empty()
    }

    /// This node's place in the peer list: the peer named `[node] name` (loading checks
    /// that there is one whenever peers are listed). `None` for a single node.
    pub fn own_peer_index(&self) -> Option<usize> {
        self.peers.iter().position(|p| p.name == self.node.name)
    }

    /// Whether this node serves the HTTP API: a single node, or the first peer.
    pub fn is_head(&self) -> bool {
        !self.is_cluster() || self.own_peer_index() == Some(0)
    }
}

/// The largest configuration file read (a real one is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest key file read.
pub const MAX_KEY_FILE_BYTES: u64 = 64 << 10;

/// The text of the regular file `path`, refused beyond `limit` bytes: a FIFO, a
/// device (`/dev/zero`) or a huge file named by mistake is an error, not a hang or
/// an exhausted machine.
pub fn read_small_file(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    if !std::fs::metadata(path)?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(text)
}

/// The environment variables that override the file, with the key each sets.
pub fn env_overrides() -> impl Iterator<Item = (&'static str, &'static str)> {
    env::ENV_OVERRIDES.iter().copied()
}

/// `[engine] threads` by default: the available parallelism (at least 1).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default `[node] name`: the first line of `/etc/hostname`, or "exo".
pub fn default_node_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| FALLBACK_NODE_NAME.to_owned())
}
