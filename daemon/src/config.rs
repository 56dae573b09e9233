//! The configuration of `exo serve`: a TOML file (`/etc/exo/exo.toml` by default) and an
//! explicit list of `EXO_*` environment variables that override single keys.
//!
//! Loading reads the file once and goes through three passes:
//! 1. `toml`'s spanned parser checks the syntax and every key against the known
//!    sections, so a typo is reported with its key and line (the `config` crate
//!    cannot tell lines);
//! 2. `toml` deserializes the file into the `Raw*` structs, so a wrong type is
//!    reported with its key and line;
//! 3. the `config` crate layers the file (a File source in TOML format) under the
//!    environment overrides (`set_override`, values typed here so that a bad one is
//!    reported with its variable), and the merged values get their defaults and are
//!    checked into a [`Config`].
//!
//! The known keys of a section are the fields of its `Raw*` struct, as serde sees them.
//! Adding a section: a `Raw*` struct and a field of `RawFile`, an arm in
//! `section_keys`, a public struct and a field of [`Config`], its defaults and checks in
//! `resolve`, and its variables (if any) in `ENV_OVERRIDES`. A section may be a table
//! (`[api]`) or an array of tables (`[[peer]]`, listed in `ARRAY_SECTIONS`; the key
//! sites of its entries carry the entry's index, so that errors name the right line).
//!
//! A file without `[[peer]]` entries is a single node. With peers it is a cluster: the
//! peers in pipeline order (the same list on every node, the first one the head that
//! serves HTTP), this node's `[node] listen` URL for the data plane (the control plane
//! listens on the same host, port + 1) and the shared `[cluster]` key; the rules across
//! those keys are checked in `check_cluster`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use toml::de::DeTable;

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

// ---------------------------------------------------------------------------------------
// The effective configuration
// ---------------------------------------------------------------------------------------

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
}

/// `[cluster]`: what every node of a cluster shares.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// The shared secret, from `key` or read from `key_file` (at least
    /// [`MIN_CLUSTER_KEY_LEN`] visible ASCII characters). Required when peers are listed.
    pub key: Option<ClusterKey>,
    /// The file the key was read from, when it came from one.
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its `[node] name` (unique in the list).
    pub name: String,
    /// The nng URL other nodes dial to reach its data plane, such as
    /// "tcp://192.168.1.20:5555" (unique in the list); its control plane is the same
    /// host, port + 1 ([`PeerConfig::control_address`]).
    pub address: String,
    /// Its layers `start..end` (end exclusive), when the file gives them; then every
    /// peer has them, contiguous from 0 in peer order. `None`: the cluster splits the
    /// layers itself.
    pub layers: Option<(usize, usize)>,
}

/// `[model]`: the model to serve.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// The GGUF file. Loading the configuration does not check that it exists.
    pub path: PathBuf,
}

/// `[api]`: the OpenAI-compatible HTTP server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The bearer token clients must send, from `key` or read from `key_file`; `None`:
    /// no authentication.
    pub key: Option<ApiKey>,
    /// The file the key was read from, when it came from one.
    pub key_file: Option<PathBuf>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// On shutdown, how long running requests get to finish.
    pub shutdown_timeout_secs: u64,
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
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: default_node_name(),
            listen: None,
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
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ctx: DEFAULT_CTX,
            max_slots: DEFAULT_MAX_SLOTS,
            max_queue: DEFAULT_MAX_QUEUE,
            batch: DEFAULT_BATCH,
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

impl ClusterConfig {
    /// Neither `key` nor `key_file` is set.
    pub fn is_empty(&self) -> bool {
        self.key.is_none() && self.key_file.is_none()
    }
}

impl Config {
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

/// The control-plane URL of a data-plane nng URL: the same host, port + 1.
pub fn control_url(data_url: &str) -> Result<String, String> {
    let (host, port) = parse_tcp_url(data_url)?;
    Ok(format!("tcp://{host}:{}", port + CONTROL_PORT_OFFSET))
}

/// Splits an nng TCP URL (`tcp://HOST:PORT`) into its host (an IPv6 address keeps its
/// brackets) and port, checking that the port leaves room for the control plane.
pub fn parse_tcp_url(url: &str) -> Result<(&str, u16), String> {
    const EXAMPLE: &str = "such as tcp://192.168.1.20:5555";
    let Some(rest) = url.strip_prefix("tcp://") else {
        return Err(format!(
            "'{url}' is not an nng TCP URL {EXAMPLE}: it must start with tcp://"
        ));
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("'{url}' has no port ({EXAMPLE})"));
    };
    if host.is_empty() {
        return Err(format!("'{url}' has no host ({EXAMPLE})"));
    }
    let host_ok = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok()),
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'),
    };
    if !host_ok {
        return Err(format!(
            "'{url}': '{host}' is not a host name or an IP address \
             (an IPv6 address goes in brackets, such as tcp://[fd00::20]:5555)"
        ));
    }
    let max = u16::MAX - CONTROL_PORT_OFFSET;
    match port.parse::<u16>() {
        Ok(port) if (1..=max).contains(&port) => Ok((host, port)),
        Ok(port) => Err(format!(
            "'{url}': the port must be in 1..={max} (the control plane listens on the \
             port + {CONTROL_PORT_OFFSET}), got {port}"
        )),
        Err(_) => Err(format!(
            "'{url}': '{port}' is not a port number ({EXAMPLE})"
        )),
    }
}

impl ApiConfig {
    /// `shutdown_timeout_secs` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// Printed as `key = "***"`, or only as `key_file` when the key came from a file, so
/// that the output of [`Config::effective_toml`] is itself a valid configuration.
impl Serialize for ApiConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            listen: &'a SocketAddr,
            #[serde(skip_serializing_if = "Option::is_none")]
            key: Option<&'a ApiKey>,
            #[serde(skip_serializing_if = "Option::is_none")]
            key_file: Option<&'a Path>,
            max_body_bytes: usize,
            shutdown_timeout_secs: u64,
        }
        View {
            listen: &self.listen,
            key: self.key.as_ref().filter(|_| self.key_file.is_none()),
            key_file: self.key_file.as_deref(),
            max_body_bytes: self.max_body_bytes,
            shutdown_timeout_secs: self.shutdown_timeout_secs,
        }
        .serialize(serializer)
    }
}

/// The API bearer token. Its `Debug` and `Serialize` forms are `***`; it has no
/// `Display`; [`ApiKey::matches`] compares in constant time.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key, as given (loading trims and checks it).
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` (the token of an `Authorization: Bearer` header) is this key;
    /// the time taken depends on the lengths only.
    pub fn matches(&self, presented: &str) -> bool {
        let (key, presented) = (self.0.as_bytes(), presented.as_bytes());
        let mut diff = key.len() ^ presented.len();
        for (i, &b) in key.iter().enumerate() {
            diff |= usize::from(b ^ presented.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl Serialize for ApiKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// Printed as `key = "***"`, or only as `key_file` when the key came from a file.
impl Serialize for ClusterConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            key: Option<&'a ClusterKey>,
            #[serde(skip_serializing_if = "Option::is_none")]
            key_file: Option<&'a Path>,
            activations: WireActivations,
            head_share: HeadSharePolicy,
        }
        View {
            key: self.key.as_ref().filter(|_| self.key_file.is_none()),
            key_file: self.key_file.as_deref(),
            activations: self.activations,
            head_share: self.head_share,
        }
        .serialize(serializer)
    }
}

/// Printed as in the file: `layers = "A-B"`.
impl Serialize for PeerConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            name: &'a str,
            address: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            layers: Option<String>,
        }
        View {
            name: &self.name,
            address: &self.address,
            layers: self.layers.map(|(a, b)| format!("{a}-{b}")),
        }
        .serialize(serializer)
    }
}

/// The secret the nodes of a cluster share. Its `Debug` and `Serialize` forms are
/// `***`; it has no `Display`.
#[derive(Clone)]
pub struct ClusterKey(String);

impl ClusterKey {
    /// A key, as given (loading trims and checks it).
    pub fn new(key: impl Into<String>) -> Self {
        ClusterKey(key.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(***)")
    }
}

impl Serialize for ClusterKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// The default `[node] name`: the first line of `/etc/hostname`, or "exo".
pub fn default_node_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| FALLBACK_NODE_NAME.to_owned())
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why a configuration could not be loaded. Each is one line that names the file (and
/// line), the key or the environment variable at fault. Key values are never printed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} not found", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} line {line}, column {column}: TOML syntax error: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{} line {line}: unknown key '{key}' (known: {known}){hint}", path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        /// Dotted: `engine.thread`.
        key: String,
        /// The keys known where it stands, comma-separated.
        known: String,
        /// Empty, or where a key of that name belongs.
        hint: String,
    },
    #[error("{} line {line}: wrong type for '{key}': {message}", path.display())]
    WrongType {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{}: missing required key '{key}' (set it in the file, or with {var})", path.display())]
    Missing {
        path: PathBuf,
        key: &'static str,
        var: &'static str,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    /// `at` is "FILE line N", "environment variable EXO_…" or "FILE" for a default.
    #[error("{at}: invalid value for '{key}': {message}")]
    Invalid {
        at: String,
        key: &'static str,
        message: String,
    },
    /// `section` is "api" or "cluster".
    #[error(
        "'{section}.key' ({key_at}) and '{section}.key_file' ({key_file_at}) are both set: \
         set only one"
    )]
    KeyConflict {
        section: &'static str,
        key_at: String,
        key_file_at: String,
    },
    /// `key` is "api.key_file" or "cluster.key_file".
    #[error("{key} {}: {message}", path.display())]
    KeyFile {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A rule across keys (the peer list, the cluster keys): `at` is "FILE line N",
    /// "environment variable EXO_…" or "FILE".
    #[error("{at}: {message}")]
    Cluster { at: String, message: String },
    #[error("{}: {error}", path.display())]
    Load {
        path: PathBuf,
        error: config::ConfigError,
    },
}

// ---------------------------------------------------------------------------------------
// The file's structure
// ---------------------------------------------------------------------------------------

/// The file, every key optional; `deny_unknown_fields` backs up the key check.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawFile {
    node: RawNode,
    model: RawModel,
    api: RawApi,
    engine: RawEngine,
    cluster: RawCluster,
    peer: Vec<RawPeer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawNode {
    name: Option<String>,
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawModel {
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawApi {
    listen: Option<String>,
    key: Option<String>,
    key_file: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    shutdown_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawEngine {
    threads: Option<usize>,
    ctx: Option<usize>,
    max_slots: Option<usize>,
    max_queue: Option<usize>,
    batch: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawCluster {
    key: Option<String>,
    key_file: Option<PathBuf>,
    activations: Option<String>,
    head_share: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawPeer {
    name: Option<String>,
    address: Option<String>,
    layers: Option<String>,
}

/// The sections of the file, in order.
fn sections() -> &'static [&'static str] {
    struct_fields::<RawFile>()
}

/// The keys of a known section.
fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    Some(match section {
        "node" => struct_fields::<RawNode>(),
        "model" => struct_fields::<RawModel>(),
        "api" => struct_fields::<RawApi>(),
        "engine" => struct_fields::<RawEngine>(),
        "cluster" => struct_fields::<RawCluster>(),
        "peer" => struct_fields::<RawPeer>(),
        _ => return None,
    })
}

/// The sections written as arrays of tables (`[[peer]]`); the others are tables.
const ARRAY_SECTIONS: &[&str] = &["peer"];

/// A section as written in the file: `[api]`, `[[peer]]`.
fn section_header(section: &str) -> String {
    if ARRAY_SECTIONS.contains(&section) {
        format!("[[{section}]]")
    } else {
        format!("[{section}]")
    }
}

/// The field names of a `#[derive(Deserialize)]` struct as serde sees them (renames
/// applied), so that the known keys never drift from the structs: the derived code
/// hands them to `deserialize_struct`, which this probe records before giving up.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("field probe"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("field probe"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// One key of the file: its dotted name, the line it stands on, the bytes of its value,
/// and for a key of an array section the index of its entry (for an entry itself, `key`
/// is the section's name).
struct KeySite {
    key: String,
    line: usize,
    value: Range<usize>,
    entry: Option<usize>,
}

// ---------------------------------------------------------------------------------------
// Environment overrides
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Count,
}

struct EnvOverride {
    var: &'static str,
    key: &'static str,
    kind: Kind,
}

const fn env(var: &'static str, key: &'static str, kind: Kind) -> EnvOverride {
    EnvOverride { var, key, kind }
}

/// The only variables read: any other `EXO_*` variable is ignored. An empty value counts
/// as unset.
const ENV_OVERRIDES: &[EnvOverride] = &[
    env("EXO_NODE_NAME", "node.name", Kind::Text),
    env("EXO_NODE_LISTEN", "node.listen", Kind::Text),
    env("EXO_MODEL_PATH", "model.path", Kind::Text),
    env("EXO_API_LISTEN", "api.listen", Kind::Text),
    env("EXO_API_KEY", "api.key", Kind::Text),
    env("EXO_API_KEY_FILE", "api.key_file", Kind::Text),
    env(
        "EXO_API_SHUTDOWN_TIMEOUT",
        "api.shutdown_timeout_secs",
        Kind::Count,
    ),
    env("EXO_ENGINE_THREADS", "engine.threads", Kind::Count),
    env("EXO_ENGINE_CTX", "engine.ctx", Kind::Count),
    env("EXO_ENGINE_MAX_SLOTS", "engine.max_slots", Kind::Count),
    env("EXO_ENGINE_MAX_QUEUE", "engine.max_queue", Kind::Count),
    env("EXO_CLUSTER_KEY", "cluster.key", Kind::Text),
    env("EXO_CLUSTER_KEY_FILE", "cluster.key_file", Kind::Text),
];

/// The environment variables that override the file, with the key each sets.
pub fn env_overrides() -> impl Iterator<Item = (&'static str, &'static str)> {
    ENV_OVERRIDES.iter().map(|o| (o.var, o.key))
}

fn env_var_for(key: &str) -> Option<&'static str> {
    ENV_OVERRIDES.iter().find(|o| o.key == key).map(|o| o.var)
}

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

impl Config {
    /// Loads `path` with the overrides of the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut env = HashMap::new();
        for o in ENV_OVERRIDES {
            if let Some(value) = std::env::var_os(o.var) {
                let value = value.into_string().map_err(|_| ConfigError::Env {
                    var: o.var,
                    message: "is not valid UTF-8".into(),
                })?;
                env.insert(o.var.to_owned(), value);
            }
        }
        Self::load_from_env_map(path, &env)
    }

    /// Loads `path` with the overrides found in `env` (variable → value), which may hold
    /// anything: only the known `EXO_*` variables are looked at.
    pub fn load_from_env_map(
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                ConfigError::NotFound { path: path.into() }
            } else {
                ConfigError::Read {
                    path: path.into(),
                    error,
                }
            }
        })?;
        let sites = check_keys(path, &text)?;
        check_types(path, &text, &sites)?;

        let load_error = |error| ConfigError::Load {
            path: path.into(),
            error,
        };
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml));
        let mut from_env = HashMap::new();
        for o in ENV_OVERRIDES {
            let Some(value) = env.get(o.var).filter(|v| !v.is_empty()) else {
                continue;
            };
            builder = match o.kind {
                Kind::Text => builder.set_override(o.key, value.as_str()),
                Kind::Count => {
                    let n: u64 = value.trim().parse().map_err(|_| ConfigError::Env {
                        var: o.var,
                        message: format!(
                            "'{value}' is not a non-negative integer (it sets '{}')",
                            o.key
                        ),
                    })?;
                    builder.set_override(o.key, n)
                }
            }
            .map_err(load_error)?;
            from_env.insert(o.key, o.var);
        }
        let raw: RawFile = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(load_error)?;

        let origins = Origins {
            path,
            sites: &sites,
            env: from_env,
        };
        resolve(raw, &origins)
    }

    /// A configuration with every default and this model: for callers without a file.
    pub fn with_model(path: impl Into<PathBuf>) -> Config {
        Config {
            node: NodeConfig::default(),
            model: ModelConfig { path: path.into() },
            api: ApiConfig::default(),
            engine: EngineConfig::default(),
            cluster: ClusterConfig::default(),
            peers: Vec::new(),
        }
    }

    /// The effective configuration as TOML, the API and cluster keys shown as `"***"`
    /// (for `exo check-config`).
    pub fn effective_toml(&self) -> String {
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# the configuration cannot be printed as TOML: {e}\n"))
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Pass 1: syntax, and every key known. Returns where each key stands.
fn check_keys(path: &Path, text: &str) -> Result<Vec<KeySite>, ConfigError> {
    let doc = DeTable::parse(text).map_err(|e| {
        let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
        ConfigError::Syntax {
            path: path.into(),
            line,
            column,
            message: e.message().trim().replace('\n', "; "),
        }
    })?;

    let mut sites = Vec::new();
    // (line, key, known keys there): the first one in the file is reported.
    let mut unknown: Vec<(usize, String, &'static [&'static str])> = Vec::new();
    for (section, value) in doc.get_ref() {
        let section_name: &str = section.get_ref();
        let line = line_col(text, section.span().start).0;
        let Some(known) = section_keys(section_name) else {
            unknown.push((line, section_name.to_owned(), sections()));
            continue;
        };
        sites.push(KeySite {
            key: section_name.to_owned(),
            line,
            value: value.span(),
            entry: None,
        });
        // A section is a table, or an array of tables; any other value is left to the
        // typed pass, which reports it as a wrong type.
        let is_array = value.get_ref().as_array().is_some();
        let wants_array = ARRAY_SECTIONS.contains(&section_name);
        if is_array != wants_array && (is_array || value.get_ref().is_table()) {
            let (table, array) = (format!("[{section_name}]"), format!("[[{section_name}]]"));
            let (found, expected) = match wants_array {
                true => (table, array),
                false => (array, table),
            };
            return Err(ConfigError::WrongType {
                path: path.into(),
                line,
                key: section_name.to_owned(),
                message: format!("found {found}, expected {expected}"),
            });
        }
        // (entry index for an array section, the table).
        let tables: Vec<(Option<usize>, &DeTable)> = match value.get_ref().as_array() {
            Some(array) => array
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let table = v.get_ref().as_table()?;
                    sites.push(KeySite {
                        key: section_name.to_owned(),
                        line: line_col(text, v.span().start).0,
                        value: v.span(),
                        entry: Some(i),
                    });
                    Some((Some(i), table))
                })
                .collect(),
            None => value
                .get_ref()
                .as_table()
                .into_iter()
                .map(|t| (None, t))
                .collect(),
        };
        for (entry, table) in tables {
            for (key, value) in table {
                let key_name: &str = key.get_ref();
                let dotted = format!("{section_name}.{key_name}");
                let line = line_col(text, key.span().start).0;
                if !known.contains(&key_name) {
                    unknown.push((line, dotted, known));
                    continue;
                }
                sites.push(KeySite {
                    key: dotted,
                    line,
                    value: value.span(),
                    entry,
                });
            }
        }
    }

    match unknown.into_iter().min_by_key(|(line, _, _)| *line) {
        None => Ok(sites),
        Some((line, key, known)) => {
            let name = key.rsplit('.').next().unwrap_or(&key);
            let belongs: Vec<String> = sections()
                .iter()
                .filter(|s| section_keys(s).is_some_and(|keys| keys.contains(&name)))
                .map(|s| section_header(s))
                .collect();
            let hint = if belongs.is_empty() {
                String::new()
            } else {
                format!("; '{name}' belongs in {}", belongs.join(" or "))
            };
            Err(ConfigError::UnknownKey {
                path: path.into(),
                line,
                key,
                known: known.join(", "),
                hint,
            })
        }
    }
}

/// Pass 2: every value of the right type, the error naming the key whose value it is.
fn check_types(path: &Path, text: &str, sites: &[KeySite]) -> Result<(), ConfigError> {
    let Err(e) = toml::from_str::<RawFile>(text) else {
        return Ok(());
    };
    let message = e
        .message()
        .trim()
        .replace("invalid type: ", "found ")
        .replace("invalid value: ", "found ")
        .replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected path string", "expected a string")
        .replace('\n', "; ");
    let span = e.span().unwrap_or(0..0);
    let site = sites
        .iter()
        .filter(|s| s.value.start <= span.start && span.start < s.value.end.max(s.value.start + 1))
        .min_by_key(|s| s.value.len());
    match site {
        Some(site) => Err(ConfigError::WrongType {
            path: path.into(),
            line: site.line,
            key: site.key.clone(),
            message,
        }),
        None => {
            let (line, column) = line_col(text, span.start);
            Err(ConfigError::Syntax {
                path: path.into(),
                line,
                column,
                message,
            })
        }
    }
}

/// Where each value came from, for error messages.
struct Origins<'a> {
    path: &'a Path,
    sites: &'a [KeySite],
    env: HashMap<&'static str, &'static str>,
}

impl Origins<'_> {
    fn at(&self, key: &str) -> String {
        if let Some(var) = self.env.get(key) {
            format!("environment variable {var}")
        } else if let Some(site) = self.sites.iter().find(|s| s.key == key) {
            format!("{} line {}", self.path.display(), site.line)
        } else {
            self.path.display().to_string()
        }
    }

    /// Where `key` of entry `entry` of an array section stands ("FILE line N"); for an
    /// entry without that key, where the entry starts.
    fn at_entry(&self, key: &str, entry: usize) -> String {
        let section = key.split('.').next().unwrap_or(key);
        let site = [key, section].into_iter().find_map(|k| {
            self.sites
                .iter()
                .find(|s| s.key == k && s.entry == Some(entry))
        });
        match site {
            Some(site) => format!("{} line {}", self.path.display(), site.line),
            None => self.path.display().to_string(),
        }
    }

    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(key),
            key,
            message: message.into(),
        }
    }

    fn invalid_entry(
        &self,
        key: &'static str,
        entry: usize,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            at: self.at_entry(key, entry),
            key,
            message: message.into(),
        }
    }

    /// An error across keys, reported at `at`.
    fn cluster(&self, at: String, message: impl Into<String>) -> ConfigError {
        ConfigError::Cluster {
            at,
            message: message.into(),
        }
    }

    /// `value` (or `default`) if it lies in `range`.
    fn count(
        &self,
        key: &'static str,
        value: Option<usize>,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let n = value.unwrap_or(default);
        if range.contains(&n) {
            Ok(n)
        } else if *range.end() == usize::MAX {
            Err(self.invalid(key, format!("must be at least {}, got {n}", range.start())))
        } else {
            let (lo, hi) = (range.start(), range.end());
            Err(self.invalid(key, format!("must be in {lo}..={hi}, got {n}")))
        }
    }

    /// A key given inline (`key`) or read from a file (`key_file`), not both; `check`
    /// trims and checks its text. `section` is "api" or "cluster".
    fn secret<K>(
        &self,
        section: &'static str,
        keys: (&'static str, &'static str),
        key: Option<String>,
        key_file: Option<PathBuf>,
        check: impl Fn(&str) -> Result<K, String>,
    ) -> Result<(Option<K>, Option<PathBuf>), ConfigError> {
        let (key_name, key_file_name) = keys;
        match (key, key_file) {
            (Some(_), Some(_)) => Err(ConfigError::KeyConflict {
                section,
                key_at: self.at(key_name),
                key_file_at: self.at(key_file_name),
            }),
            (Some(key), None) => Ok((
                Some(check(&key).map_err(|m| self.invalid(key_name, m))?),
                None,
            )),
            (None, Some(file)) => {
                let key_file_error = |message: String| ConfigError::KeyFile {
                    key: key_file_name,
                    path: file.clone(),
                    message,
                };
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| key_file_error(format!("cannot read the key: {e}")))?;
                let key = check(&text)
                    .map_err(|m| key_file_error(format!("{m} (the file holds the key alone)")))?;
                Ok((Some(key), Some(file)))
            }
            (None, None) => Ok((None, None)),
        }
    }
}

/// A key as one word of visible ASCII, trimmed.
fn key_text(key: &str) -> Result<&str, String> {
    let key = key.trim();
    if key.is_empty() {
        Err("the key is empty".into())
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Err("the key may hold visible ASCII characters only (no spaces)".into())
    } else {
        Ok(key)
    }
}

/// A bearer token must fit an `Authorization` header as one word.
fn api_key(key: &str) -> Result<ApiKey, String> {
    key_text(key).map(ApiKey::new)
}

/// The cluster secret: one word, long enough not to be guessed.
fn cluster_key(key: &str) -> Result<ClusterKey, String> {
    let key = key_text(key)?;
    if key.len() < MIN_CLUSTER_KEY_LEN {
        return Err(format!(
            "the cluster key must be at least {MIN_CLUSTER_KEY_LEN} characters long, got {} \
             (generate one with `openssl rand -hex 32`)",
            key.len()
        ));
    }
    Ok(ClusterKey::new(key))
}

/// `[[peer]] layers`: "A-B" or "A..B", end exclusive, A < B.
fn parse_layers(text: &str) -> Result<(usize, usize), String> {
    let usage = "a layer range such as \"0-8\" (layers 0 to 7: the end is exclusive)";
    let s = text.trim();
    let (a, b) = s
        .split_once("..")
        .or_else(|| s.split_once('-'))
        .ok_or_else(|| format!("'{text}' is not {usage}"))?;
    let parse = |n: &str| n.trim().parse::<usize>().ok();
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) if a < b => Ok((a, b)),
        (Some(a), Some(b)) => Err(format!(
            "'{text}': the start ({a}) must be below the end ({b}); it is {usage}"
        )),
        _ => Err(format!("'{text}' is not {usage}")),
    }
}

/// Pass 3: defaults and checks.
fn resolve(raw: RawFile, origins: &Origins<'_>) -> Result<Config, ConfigError> {
    let name_is_default = raw.node.name.is_none();
    let node = NodeConfig {
        name: match raw.node.name {
            Some(name) if name.trim().is_empty() => {
                return Err(origins.invalid("node.name", "must not be empty"))
            }
            Some(name) => name.trim().to_owned(),
            None => default_node_name(),
        },
        listen: match raw.node.listen {
            None => None,
            Some(url) => {
                let url = url.trim();
                parse_tcp_url(url).map_err(|m| origins.invalid("node.listen", m))?;
                Some(url.to_owned())
            }
        },
    };

    let model = match raw.model.path {
        None => {
            return Err(ConfigError::Missing {
                path: origins.path.into(),
                key: "model.path",
                var: env_var_for("model.path").unwrap_or("EXO_MODEL_PATH"),
            })
        }
        Some(p) if p.as_os_str().is_empty() => {
            return Err(origins.invalid("model.path", "must not be empty"))
        }
        Some(path) => ModelConfig { path },
    };

    let defaults = ApiConfig::default();
    let listen = match raw.api.listen {
        None => defaults.listen,
        Some(s) => s.trim().parse().map_err(|e| {
            origins.invalid(
                "api.listen",
                format!(
                    "'{s}' is not an IP address and port such as 127.0.0.1:8080, \
                     0.0.0.0:8080 or [::]:8080 ({e})"
                ),
            )
        })?,
    };
    let (key, key_file) = origins.secret(
        "api",
        ("api.key", "api.key_file"),
        raw.api.key,
        raw.api.key_file,
        api_key,
    )?;
    let api = ApiConfig {
        listen,
        key,
        key_file,
        max_body_bytes: origins.count(
            "api.max_body_bytes",
            raw.api.max_body_bytes,
            defaults.max_body_bytes,
            1..=usize::MAX,
        )?,
        shutdown_timeout_secs: raw
            .api
            .shutdown_timeout_secs
            .unwrap_or(defaults.shutdown_timeout_secs),
    };

    let defaults = EngineConfig::default();
    let e = raw.engine;
    let engine = EngineConfig {
        threads: origins.count(
            "engine.threads",
            e.threads,
            defaults.threads,
            1..=usize::MAX,
        )?,
        ctx: origins.count("engine.ctx", e.ctx, defaults.ctx, 1..=usize::MAX)?,
        max_slots: origins.count(
            "engine.max_slots",
            e.max_slots,
            defaults.max_slots,
            1..=MAX_SLOTS_LIMIT,
        )?,
        max_queue: e.max_queue.unwrap_or(defaults.max_queue),
        batch: origins.count("engine.batch", e.batch, defaults.batch, 1..=usize::MAX)?,
    };

    let (key, key_file) = origins.secret(
        "cluster",
        ("cluster.key", "cluster.key_file"),
        raw.cluster.key,
        raw.cluster.key_file,
        cluster_key,
    )?;
    let activations = match raw.cluster.activations.as_deref() {
        Some("f16") => WireActivations::F16,
        None | Some("f32") => WireActivations::F32,
        Some(other) => {
            return Err(ConfigError::Invalid {
                at: origins.at("cluster.activations"),
                key: "cluster.activations",
                message: format!("'{other}' is not one of \"f16\", \"f32\""),
            })
        }
    };
    let head_share = match raw.cluster.head_share.as_deref() {
        None | Some("auto") => HeadSharePolicy::Auto,
        Some("off") => HeadSharePolicy::Off,
        Some(other) => match other.parse::<f64>() {
            Ok(f) if f > 0.0 && f < 1.0 => HeadSharePolicy::Share(f),
            _ => {
                return Err(ConfigError::Invalid {
                    at: origins.at("cluster.head_share"),
                    key: "cluster.head_share",
                    message: format!(
                        "'{other}' is not \"auto\", \"off\" or a fraction strictly between 0 and 1 (such as \"0.4\")"
                    ),
                })
            }
        },
    };
    let cluster = ClusterConfig {
        key,
        key_file,
        activations,
        head_share,
    };
    let peers = resolve_peers(raw.peer, origins)?;

    let config = Config {
        node,
        model,
        api,
        engine,
        cluster,
        peers,
    };
    check_cluster(&config, name_is_default, origins)?;
    Ok(config)
}

/// Each `[[peer]]` on its own: a name, an address, maybe layers.
fn resolve_peers(raw: Vec<RawPeer>, origins: &Origins<'_>) -> Result<Vec<PeerConfig>, ConfigError> {
    let mut peers = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let missing = |key: &str| {
            origins.cluster(
                origins.at_entry("peer", i),
                format!("[[peer]] number {} has no '{key}' (required)", i + 1),
            )
        };
        let name = match p.name {
            None => return Err(missing("name")),
            Some(name) if name.trim().is_empty() => {
                return Err(origins.invalid_entry("peer.name", i, "must not be empty"))
            }
            Some(name) => name.trim().to_owned(),
        };
        let address = match p.address {
            None => return Err(missing("address")),
            Some(address) => address.trim().to_owned(),
        };
        let (host, _) =
            parse_tcp_url(&address).map_err(|m| origins.invalid_entry("peer.address", i, m))?;
        let unspecified = host == "0.0.0.0"
            || host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<IpAddr>().ok())
                .is_some_and(|ip| ip.is_unspecified());
        if unspecified {
            return Err(origins.invalid_entry(
                "peer.address",
                i,
                format!(
                    "'{address}': other nodes cannot dial {host}; give this peer's LAN \
                     address or host name (0.0.0.0 belongs in its [node] listen)"
                ),
            ));
        }
        let layers = match p.layers {
            None => None,
            Some(text) => {
                Some(parse_layers(&text).map_err(|m| origins.invalid_entry("peer.layers", i, m))?)
            }
        };
        peers.push(PeerConfig {
            name,
            address,
            layers,
        });
    }
    Ok(peers)
}

/// The rules across keys of a cluster; nothing to check for a single node.
fn check_cluster(
    config: &Config,
    name_is_default: bool,
    origins: &Origins<'_>,
) -> Result<(), ConfigError> {
    let peers = &config.peers;
    if peers.is_empty() {
        return Ok(());
    }

    for (i, p) in peers.iter().enumerate() {
        if let Some(first) = peers[..i].iter().position(|q| q.name == p.name) {
            return Err(origins.cluster(
                origins.at_entry("peer.name", i),
                format!(
                    "duplicate peer name '{}' (already given at {})",
                    p.name,
                    line_of(&origins.at_entry("peer.name", first)),
                ),
            ));
        }
        if let Some(first) = peers[..i].iter().position(|q| q.address == p.address) {
            return Err(origins.cluster(
                origins.at_entry("peer.address", i),
                format!(
                    "duplicate peer address '{}': peer '{}' and peer '{}' both have it",
                    p.address, peers[first].name, p.name
                ),
            ));
        }
    }

    // Explicit layer ranges: all or none, contiguous from 0 in peer order.
    if let Some(with) = peers.iter().find(|p| p.layers.is_some()) {
        if let Some(i) = peers.iter().position(|p| p.layers.is_none()) {
            return Err(origins.cluster(
                origins.at_entry("peer", i),
                format!(
                    "peer '{}' has no layers but peer '{}' has: give every peer layers, \
                     or none (to let exo split the layers)",
                    peers[i].name, with.name
                ),
            ));
        }
        let mut end = 0;
        for (i, p) in peers.iter().enumerate() {
            let Some((a, b)) = p.layers else { continue };
            let at = || origins.at_entry("peer.layers", i);
            if i == 0 && a != 0 {
                return Err(origins.cluster(
                    at(),
                    format!(
                        "gap before peer '{}' (starts at {a}): the first peer's layers must \
                         start at 0",
                        p.name
                    ),
                ));
            }
            if i > 0 {
                let prev = &peers[i - 1];
                let (pa, pb) = prev.layers.unwrap_or((0, end));
                if a < end {
                    return Err(origins.cluster(
                        at(),
                        format!(
                            "peer '{}' layers {a}-{b} overlap peer '{}' layers {pa}-{pb}",
                            p.name, prev.name
                        ),
                    ));
                }
                if a > end {
                    return Err(origins.cluster(
                        at(),
                        format!(
                            "gap between peer '{}' (ends at {end}) and peer '{}' (starts at {a})",
                            prev.name, p.name
                        ),
                    ));
                }
            }
            end = b;
        }
    }

    let first_peer_at = origins.at_entry("peer", 0);
    if config.node.listen.is_none() {
        return Err(origins.cluster(
            first_peer_at,
            "peers are listed but [node] listen is not set: set it to this node's nng URL \
             for the cluster, such as \"tcp://0.0.0.0:5555\" (or set EXO_NODE_LISTEN)",
        ));
    }
    if config.cluster.key.is_none() {
        return Err(origins.cluster(
            first_peer_at,
            "peers are listed but there is no cluster key: set [cluster] key_file or key \
             (or EXO_CLUSTER_KEY_FILE / EXO_CLUSTER_KEY), the same on every node",
        ));
    }
    if config.own_peer_index().is_none() {
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        let source = if name_is_default {
            " (the hostname: [node] name is not set)"
        } else {
            ""
        };
        return Err(origins.cluster(
            origins.at("node.name"),
            format!(
                "this node's name '{}'{source} is not one of the peers ({}): set [node] name \
                 (or EXO_NODE_NAME) to this node's [[peer]] name",
                config.node.name,
                names.join(", ")
            ),
        ));
    }
    Ok(())
}

/// "line N" of "FILE line N" (or the whole of it).
fn line_of(at: &str) -> &str {
    at.rfind(" line ").map_or(at, |i| &at[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A file under the temp dir, removed on drop.
    struct Temp(PathBuf);

    impl Temp {
        fn new(contents: &str) -> Temp {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("exo-config-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, contents).expect("write temp file");
            Temp(path)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const MODEL: &str = "[model]\npath = \"/var/lib/exo/models/m.gguf\"\n";

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = Temp::new(text);
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from_env_map(&file.0, &env)
    }

    fn error(text: &str, env: &[(&str, &str)]) -> String {
        match load(text, env) {
            Ok(c) => panic!("loaded, expected an error: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_file_is_enough() {
        let c = load(
            "[model]\npath = \"/m.gguf\"\n\n[api]\nlisten = \"0.0.0.0:9000\"\n",
            &[],
        )
        .expect("load");
        assert_eq!(c.model.path, Path::new("/m.gguf"));
        assert_eq!(c.api.listen, "0.0.0.0:9000".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn defaults_applied() {
        let c = load(MODEL, &[]).expect("load");
        assert_eq!(c.node.name, default_node_name());
        assert!(!c.node.name.is_empty());
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:8080");
        assert!(c.api.key.is_none() && c.api.key_file.is_none());
        assert_eq!(c.api.max_body_bytes, 1024 * 1024);
        assert_eq!(c.api.shutdown_timeout(), Duration::from_secs(10));
        let threads = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.engine.threads, threads);
        assert_eq!(c.engine.ctx, 4096);
        assert_eq!(c.engine.max_slots, 4);
        assert_eq!(c.engine.max_queue, 64);
        assert_eq!(c.engine.batch, 512);
        let w = Config::with_model("/var/lib/exo/models/m.gguf");
        assert_eq!(w.effective_toml(), c.effective_toml());
    }

    #[test]
    fn every_key_set() {
        let c = load(
            r#"
[node]
name = "pi-1"
[model]
path = "/m.gguf"
[api]
listen = "[::1]:80"
key = "sk-abc"
max_body_bytes = 4096
shutdown_timeout_secs = 0
[engine]
threads = 3
ctx = 2048
max_slots = 64
max_queue = 0
batch = 32
"#,
            &[],
        )
        .expect("load");
        assert_eq!(c.node.name, "pi-1");
        assert_eq!(c.api.listen.to_string(), "[::1]:80");
        assert_eq!(c.api.key.as_ref().map(ApiKey::expose), Some("sk-abc"));
        assert_eq!(c.api.max_body_bytes, 4096);
        assert_eq!(c.api.shutdown_timeout_secs, 0);
        let e = &c.engine;
        assert_eq!(
            (e.threads, e.ctx, e.max_slots, e.max_queue, e.batch),
            (3, 2048, 64, 0, 32)
        );
    }

    #[test]
    fn dotted_and_inline_forms() {
        let c = load(
            &format!("engine.threads = 2\napi = {{ listen = \"127.0.0.1:1\" }}\n{MODEL}"),
            &[],
        )
        .expect("load");
        assert_eq!(c.engine.threads, 2);
        assert_eq!(c.api.listen.port(), 1);
        let e = error(&format!("engine = {{ thread = 1 }}\n{MODEL}"), &[]);
        assert!(e.contains("line 1: unknown key 'engine.thread'"), "{e}");
    }

    #[test]
    fn missing_file() {
        let path = std::env::temp_dir().join("exo-config-test-does-not-exist.toml");
        let e = Config::load_from_env_map(&path, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("config file {} not found", path.display()));
    }

    #[test]
    fn syntax_error_has_line() {
        let e = error(&format!("{MODEL}[api]\nlisten = \"0.0.0.0:8080\n"), &[]);
        assert!(e.contains(" line 4, column"), "{e}");
        assert!(e.contains("TOML syntax error"), "{e}");
        let e = error(&format!("{MODEL}[engine]\nthreads = 1\nthreads = 2\n"), &[]);
        assert!(
            e.contains(" line 5, column") && e.contains("duplicate key"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("{MODEL}\n[api]\nlisten = \"0.0.0.0:8080\"\n[engine]\nthread = 4\n");
        let file = Temp::new(&text);
        let e = Config::load_from_env_map(&file.0, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{} line 7: unknown key 'engine.thread' \
                 (known: threads, ctx, max_slots, max_queue, batch)",
                file.0.display()
            )
        );

        let e = error(&format!("{MODEL}[clusters]\nsize = 2\n"), &[]);
        assert!(
            e.ends_with(
                "line 3: unknown key 'clusters' \
                 (known: node, model, api, engine, cluster, peer)"
            ),
            "{e}"
        );
        let e = error(&format!("{MODEL}[cluster]\nsize = 2\n"), &[]);
        assert!(
            e.ends_with("line 4: unknown key 'cluster.size' (known: key, key_file, activations, head_share)"),
            "{e}"
        );
        // The first of several, in file order.
        let e = error(&format!("zzz = 1\n{MODEL}[api]\naaa = 2\n"), &[]);
        assert!(e.contains("line 1: unknown key 'zzz'"), "{e}");
        // A key in the wrong section, or outside any.
        let e = error(&format!("threads = 2\n{MODEL}"), &[]);
        assert!(e.contains("line 1: unknown key 'threads'"), "{e}");
        assert!(e.ends_with("; 'threads' belongs in [engine]"), "{e}");
        let e = error(&format!("{MODEL}[api]\nctx = 2\n"), &[]);
        assert!(e.contains("line 4: unknown key 'api.ctx'"), "{e}");
        assert!(e.ends_with("; 'ctx' belongs in [engine]"), "{e}");
        let e = error(&format!("{MODEL}[api]\nname = \"x\"\n"), &[]);
        assert!(e.ends_with("; 'name' belongs in [node] or [[peer]]"), "{e}");
        let e = error(&format!("{MODEL}[engine]\nkey_file = \"/k\"\n"), &[]);
        assert!(
            e.ends_with("; 'key_file' belongs in [api] or [cluster]"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = error(
            &format!("{MODEL}[engine]\nctx = 1\nthreads = \"four\"\n"),
            &[],
        );
        assert!(e.contains("line 5: wrong type for 'engine.threads'"), "{e}");
        assert!(e.contains("expected a non-negative integer"), "{e}");
        let e = error(&format!("{MODEL}[engine]\nmax_slots = -1\n"), &[]);
        assert!(
            e.contains("line 4: wrong type for 'engine.max_slots'"),
            "{e}"
        );
        let e = error(&format!("{MODEL}[api]\nlisten = 8080\n"), &[]);
        assert!(e.contains("line 4: wrong type for 'api.listen'"), "{e}");
        assert!(e.contains("expected a string"), "{e}");
        let e = error("[model]\npath = [\"a\", \"b\"]\n", &[]);
        assert!(e.contains("line 2: wrong type for 'model.path'"), "{e}");
        let e = error(&format!("{MODEL}[[engine]]\nctx = 1\n"), &[]);
        assert!(
            e.ends_with("line 3: wrong type for 'engine': found [[engine]], expected [engine]"),
            "{e}"
        );
        let e = error(&format!("engine = 5\n{MODEL}"), &[]);
        assert!(e.contains("line 1: wrong type for 'engine'"), "{e}");
        assert!(e.contains("expected a table"), "{e}");
    }

    #[test]
    fn invalid_values_name_key_and_line() {
        let e = error("[api]\nlisten = \"0.0.0.0:8080\"\n", &[]);
        assert!(e.contains("missing required key 'model.path'"), "{e}");
        assert!(e.contains("EXO_MODEL_PATH"), "{e}");
        let e = error(&format!("{MODEL}[api]\nlisten = \"localhost:8080\"\n"), &[]);
        assert!(e.contains("line 4: invalid value for 'api.listen'"), "{e}");
        assert!(
            e.contains("'localhost:8080' is not an IP address and port"),
            "{e}"
        );
        let e = error(&format!("{MODEL}[api]\nlisten = \"0.0.0.0\"\n"), &[]);
        assert!(e.contains("invalid value for 'api.listen'"), "{e}");
        for (text, key) in [
            ("[engine]\nmax_slots = 0\n", "engine.max_slots"),
            ("[engine]\nmax_slots = 65\n", "engine.max_slots"),
            ("[engine]\nctx = 0\n", "engine.ctx"),
            ("[engine]\nbatch = 0\n", "engine.batch"),
            ("[engine]\nthreads = 0\n", "engine.threads"),
            ("[api]\nmax_body_bytes = 0\n", "api.max_body_bytes"),
            ("[node]\nname = \" \"\n", "node.name"),
            ("[api]\nkey = \"\"\n", "api.key"),
            ("[api]\nkey = \"two words\"\n", "api.key"),
        ] {
            let e = error(&format!("{MODEL}{text}"), &[]);
            assert!(
                e.contains(&format!("line 4: invalid value for '{key}'")),
                "{e}"
            );
        }
        let e = error(&format!("{MODEL}[engine]\nmax_slots = 65\n"), &[]);
        assert!(e.ends_with("must be in 1..=64, got 65"), "{e}");
        assert!(load(&format!("{MODEL}[engine]\nmax_slots = 64\n"), &[]).is_ok());
    }

    #[test]
    fn env_overrides_applied() {
        let c = load(
            "[api]\nlisten = \"0.0.0.0:8080\"\n[engine]\nthreads = 1\n",
            &[
                ("EXO_MODEL_PATH", "/env/m.gguf"),
                ("EXO_NODE_NAME", "pi-7"),
                ("EXO_API_LISTEN", "127.0.0.1:9999"),
                ("EXO_API_SHUTDOWN_TIMEOUT", "3"),
                ("EXO_ENGINE_THREADS", " 5 "),
                ("EXO_ENGINE_CTX", "1024"),
                ("EXO_ENGINE_MAX_SLOTS", "8"),
                ("EXO_ENGINE_MAX_QUEUE", "0"),
                ("EXO_API_KEY", "sk-env"),
            ],
        )
        .expect("load");
        assert_eq!(c.model.path, Path::new("/env/m.gguf"));
        assert_eq!(c.node.name, "pi-7");
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.api.shutdown_timeout_secs, 3);
        assert_eq!(c.api.key.as_ref().map(ApiKey::expose), Some("sk-env"));
        let e = &c.engine;
        assert_eq!(
            (e.threads, e.ctx, e.max_slots, e.max_queue),
            (5, 1024, 8, 0)
        );
        // An empty variable counts as unset.
        let c = load(MODEL, &[("EXO_ENGINE_CTX", ""), ("EXO_API_KEY", "")]).expect("load");
        assert_eq!(c.engine.ctx, 4096);
        assert!(c.api.key.is_none());
    }

    #[test]
    fn stray_env_ignored() {
        let c = load(
            MODEL,
            &[
                ("EXO_SOMETHING", "x"),
                ("EXO_ENGINE_THREAD", "nope"),
                ("EXO_ENGINE_BATCH", "nope"),
                ("EXO_API_MAX_BODY_BYTES", "nope"),
                ("EXO_CLUSTER__SIZE", "3"),
            ],
        )
        .expect("load");
        assert_eq!(c.engine.batch, 512);
    }

    #[test]
    fn bad_env_value_names_variable() {
        let e = error(MODEL, &[("EXO_ENGINE_THREADS", "four")]);
        assert_eq!(
            e,
            "environment variable EXO_ENGINE_THREADS: 'four' is not a non-negative integer \
             (it sets 'engine.threads')"
        );
        let e = error(MODEL, &[("EXO_ENGINE_MAX_QUEUE", "-1")]);
        assert!(
            e.starts_with("environment variable EXO_ENGINE_MAX_QUEUE: '-1'"),
            "{e}"
        );
        let e = error(MODEL, &[("EXO_ENGINE_MAX_SLOTS", "100")]);
        assert!(
            e.starts_with(
                "environment variable EXO_ENGINE_MAX_SLOTS: invalid value for 'engine.max_slots'"
            ),
            "{e}"
        );
        let e = error(MODEL, &[("EXO_API_LISTEN", "nowhere")]);
        assert!(
            e.starts_with("environment variable EXO_API_LISTEN: invalid value for 'api.listen'"),
            "{e}"
        );
        let e = error(MODEL, &[("EXO_API_KEY", "a b")]);
        assert!(
            e.starts_with("environment variable EXO_API_KEY: invalid value"),
            "{e}"
        );
        assert!(!e.contains("a b"), "{e}");
    }

    #[test]
    fn key_and_key_file_rejected() {
        let e = error(
            &format!("{MODEL}[api]\nkey = \"k\"\nkey_file = \"/k\"\n"),
            &[],
        );
        assert!(e.contains("'api.key' ("), "{e}");
        assert!(e.contains("line 4) and 'api.key_file' ("), "{e}");
        assert!(e.contains("line 5) are both set"), "{e}");
        let e = error(
            &format!("{MODEL}[api]\nkey_file = \"/k\"\n"),
            &[("EXO_API_KEY", "k")],
        );
        assert!(
            e.contains("'api.key' (environment variable EXO_API_KEY)"),
            "{e}"
        );
        assert!(e.contains("are both set"), "{e}");
    }

    #[test]
    fn key_file_read_and_trimmed() {
        let key = Temp::new("  sk-secret-123\n\n");
        let text = format!(
            "{MODEL}[api]\nkey_file = {:?}\n",
            key.0.display().to_string()
        );
        let c = load(&text, &[]).expect("load");
        let api_key = c.api.key.as_ref().expect("key");
        assert_eq!(api_key.expose(), "sk-secret-123");
        assert!(api_key.matches("sk-secret-123"));
        assert!(!api_key.matches("sk-secret-12"));
        assert!(!api_key.matches("sk-secret-1234"));
        assert!(!api_key.matches(""));
        assert_eq!(c.api.key_file.as_deref(), Some(key.0.as_path()));
        // Printed as the file, never as the key.
        let toml = c.effective_toml();
        assert!(toml.contains("key_file = "), "{toml}");
        assert!(
            !toml.contains("sk-secret") && !toml.contains("key = "),
            "{toml}"
        );

        // The same file through the environment.
        let c = load(MODEL, &[("EXO_API_KEY_FILE", &key.0.display().to_string())]).expect("load");
        assert_eq!(
            c.api.key.as_ref().map(ApiKey::expose),
            Some("sk-secret-123")
        );

        let empty = Temp::new(" \n");
        let text = format!(
            "{MODEL}[api]\nkey_file = {:?}\n",
            empty.0.display().to_string()
        );
        let e = error(&text, &[]);
        assert!(
            e.starts_with(&format!("api.key_file {}: ", empty.0.display())),
            "{e}"
        );
        assert!(e.contains("empty"), "{e}");

        let missing = std::env::temp_dir().join("exo-config-test-no-key-file");
        let text = format!(
            "{MODEL}[api]\nkey_file = {:?}\n",
            missing.display().to_string()
        );
        let e = error(&text, &[]);
        assert!(
            e.starts_with(&format!("api.key_file {}: cannot read", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn key_is_redacted() {
        let c = load(&format!("{MODEL}[api]\nkey = \"sk-hidden\"\n"), &[]).expect("load");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("sk-hidden") && debug.contains("ApiKey(***)"),
            "{debug}"
        );
        let toml = c.effective_toml();
        assert!(
            toml.contains("key = \"***\"") && !toml.contains("sk-hidden"),
            "{toml}"
        );
    }

    #[test]
    fn effective_toml_loads_back() {
        let c = load(
            &format!("{MODEL}[api]\nlisten = \"0.0.0.0:8081\"\n[engine]\nctx = 128\n"),
            &[],
        )
        .expect("load");
        let toml = c.effective_toml();
        assert!(
            toml.contains("[engine]") && toml.contains("ctx = 128"),
            "{toml}"
        );
        let again = load(&toml, &[]).expect("load the effective config");
        assert_eq!(again.effective_toml(), toml);
    }

    #[test]
    fn every_section_has_its_keys() {
        assert_eq!(
            sections(),
            ["node", "model", "api", "engine", "cluster", "peer"]
        );
        assert_eq!(section_keys("node"), Some(&["name", "listen"][..]));
        assert_eq!(
            section_keys("cluster"),
            Some(&["key", "key_file", "activations", "head_share"][..])
        );
        assert_eq!(
            section_keys("peer"),
            Some(&["name", "address", "layers"][..])
        );
        assert_eq!(section_header("peer"), "[[peer]]");
        assert_eq!(section_header("api"), "[api]");
        for s in sections() {
            assert!(section_keys(s).is_some_and(|k| !k.is_empty()), "{s}");
        }
        assert_eq!(
            section_keys("api"),
            Some(
                &[
                    "listen",
                    "key",
                    "key_file",
                    "max_body_bytes",
                    "shutdown_timeout_secs"
                ][..]
            )
        );
        for (var, key) in env_overrides() {
            let (section, name) = key.split_once('.').expect("dotted");
            assert!(
                section_keys(section).is_some_and(|k| k.contains(&name)),
                "{var}"
            );
        }
    }

    /// A cluster file up to its peers (7 lines: the peers start at line 8).
    const CLUSTER: &str = "[model]\npath = \"/m.gguf\"\n[node]\nname = \"a\"\n\
                           listen = \"tcp://0.0.0.0:5555\"\n[cluster]\nkey = \"0123456789abcdef\"\n";

    /// `[[peer]]` entries (4 lines each, 3 without layers): (name, address, layers).
    fn peers(list: &[(&str, &str, Option<&str>)]) -> String {
        list.iter()
            .map(|(name, address, layers)| {
                let layers = layers.map_or(String::new(), |l| format!("layers = \"{l}\"\n"));
                format!("[[peer]]\nname = \"{name}\"\naddress = \"{address}\"\n{layers}")
            })
            .collect()
    }

    fn three_peers(layers: [Option<&str>; 3]) -> String {
        let [x, y, z] = layers;
        peers(&[
            ("a", "tcp://192.168.1.20:5555", x),
            ("b", "tcp://192.168.1.21:5555", y),
            ("c", "tcp://pi-c.lan:6000", z),
        ])
    }

    #[test]
    fn single_node_is_not_a_cluster() {
        let c = load(MODEL, &[]).expect("load");
        assert!(!c.is_cluster() && c.is_head());
        assert_eq!(c.own_peer_index(), None);
        assert!(c.peers.is_empty() && c.cluster.is_empty() && c.node.listen.is_none());
        assert_eq!(c.node.control_listen(), None);
        let toml = c.effective_toml();
        assert!(
            !toml.contains("peer")
                && !toml.contains("[cluster]")
                && !toml.contains("listen = \"tcp"),
            "{toml}"
        );
        // A listen URL or a cluster key alone do not make a cluster.
        let c = load(
            &format!("{MODEL}[node]\nlisten = \"tcp://0.0.0.0:5555\"\n[cluster]\nkey = \"0123456789abcdef\"\n"),
            &[],
        )
        .expect("load");
        assert!(!c.is_cluster() && c.is_head());
        assert_eq!(
            c.node.control_listen().as_deref(),
            Some("tcp://0.0.0.0:5556")
        );
    }

    #[test]
    fn three_peers_with_layers_load() {
        let text = format!(
            "{CLUSTER}{}",
            three_peers([Some("0-6"), Some("6..12"), Some(" 12 - 18 ")])
        );
        let c = load(&text, &[]).expect("load");
        assert!(c.is_cluster() && c.is_head());
        assert_eq!(c.own_peer_index(), Some(0));
        assert_eq!(c.node.listen.as_deref(), Some("tcp://0.0.0.0:5555"));
        assert_eq!(
            c.node.control_listen().as_deref(),
            Some("tcp://0.0.0.0:5556")
        );
        assert_eq!(
            c.cluster.key.as_ref().map(ClusterKey::expose),
            Some("0123456789abcdef")
        );
        assert_eq!(
            c.peers,
            [
                PeerConfig {
                    name: "a".into(),
                    address: "tcp://192.168.1.20:5555".into(),
                    layers: Some((0, 6)),
                },
                PeerConfig {
                    name: "b".into(),
                    address: "tcp://192.168.1.21:5555".into(),
                    layers: Some((6, 12)),
                },
                PeerConfig {
                    name: "c".into(),
                    address: "tcp://pi-c.lan:6000".into(),
                    layers: Some((12, 18)),
                },
            ]
        );
        assert_eq!(
            c.peers[2].control_address().as_deref(),
            Some("tcp://pi-c.lan:6001")
        );
        // The end is not checked: the model is not read.
        let text = format!(
            "{CLUSTER}{}",
            three_peers([Some("0-1"), Some("1-2"), Some("2-100000")])
        );
        assert!(load(&text, &[]).is_ok());

        // Another node of the same cluster.
        let text = format!(
            "{}{}",
            CLUSTER.replace("name = \"a\"", "name = \"c\""),
            three_peers([Some("0-6"), Some("6-12"), Some("12-18")])
        );
        let c = load(&text, &[]).expect("load");
        assert!(c.is_cluster() && !c.is_head());
        assert_eq!(c.own_peer_index(), Some(2));
        let c = load(&text, &[("EXO_NODE_NAME", "b")]).expect("load");
        assert_eq!(c.own_peer_index(), Some(1));
    }

    #[test]
    fn two_peers_without_layers_load() {
        let text = format!(
            "{CLUSTER}{}",
            peers(&[
                ("a", "tcp://192.168.1.20:5555", None),
                ("b", "tcp://[fd00::21]:5555", None)
            ])
        );
        let c = load(&text, &[]).expect("load");
        assert!(c.is_cluster() && c.is_head());
        assert_eq!(c.peers.len(), 2);
        assert!(c.peers.iter().all(|p| p.layers.is_none()));
        assert_eq!(
            c.peers[1].control_address().as_deref(),
            Some("tcp://[fd00::21]:5556")
        );
        // Inline tables are the same list.
        let text = format!(
            "peer = [{{ name = \"a\", address = \"tcp://h1:1\" }}, \
             {{ name = \"b\", address = \"tcp://h2:1\" }}]\n{CLUSTER}"
        );
        let c = load(&text, &[]).expect("load");
        assert_eq!(c.peers[1].name, "b");
    }

    #[test]
    fn cluster_effective_toml_loads_back() {
        let key = Temp::new("fedcba9876543210-from-a-file\n");
        let text = format!(
            "{}{}",
            CLUSTER.replace(
                "key = \"0123456789abcdef\"",
                &format!("key_file = {:?}", key.0.display().to_string())
            ),
            three_peers([Some("0-6"), Some("6-12"), Some("12-18")])
        );
        let c = load(&text, &[]).expect("load");
        let toml = c.effective_toml();
        assert!(
            toml.contains("[[peer]]")
                && toml.contains("layers = \"6-12\"")
                && toml.contains("listen = \"tcp://0.0.0.0:5555\"")
                && toml.contains("key_file = ")
                && !toml.contains("from-a-file"),
            "{toml}"
        );
        let again = load(&toml, &[]).expect("load the effective config");
        assert_eq!(again.peers, c.peers);
        assert_eq!(again.effective_toml(), toml);

        // Without layers, with the key inline: printed as "***", the rest loads back.
        let text = format!(
            "{CLUSTER}{}",
            peers(&[("a", "tcp://h1:1", None), ("b", "tcp://h2:1", None)])
        );
        let c = load(&text, &[]).expect("load");
        let toml = c.effective_toml();
        assert!(
            toml.contains("key = \"***\"") && !toml.contains("0123456789abcdef"),
            "{toml}"
        );
        assert!(!toml.contains("layers"), "{toml}");
        let restored = toml.replace("\"***\"", "\"0123456789abcdef\"");
        let again = load(&restored, &[]).expect("load the effective config");
        assert_eq!(again.effective_toml(), toml);
    }

    #[test]
    fn cluster_key_is_redacted() {
        let text = format!(
            "{}{}",
            CLUSTER.replace("0123456789abcdef", "very-secret-cluster-key"),
            peers(&[("a", "tcp://h1:1", None)])
        );
        let c = load(&text, &[]).expect("load");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("very-secret") && debug.contains("ClusterKey(***)"),
            "{debug}"
        );
        assert!(!c.effective_toml().contains("very-secret"));
        assert_eq!(
            c.cluster.key.as_ref().map(ClusterKey::expose),
            Some("very-secret-cluster-key")
        );
    }

    #[test]
    fn node_listen_checked() {
        for (url, why) in [
            ("0.0.0.0:5555", "it must start with tcp://"),
            ("udp://0.0.0.0:5555", "it must start with tcp://"),
            ("tcp://0.0.0.0", "has no port"),
            ("tcp://:5555", "has no host"),
            ("tcp://0.0.0.0:", "'' is not a port number"),
            ("tcp://0.0.0.0:http", "'http' is not a port number"),
            ("tcp://0.0.0.0:70000", "'70000' is not a port number"),
            ("tcp://0.0.0.0:5555/x", "'5555/x' is not a port number"),
            ("tcp://0.0.0.0:0", "must be in 1..=65534"),
            (
                "tcp://0.0.0.0:65535",
                "control plane listens on the port + 1), got 65535",
            ),
            ("tcp://:::5555", "is not a host name or an IP address"),
            (
                "tcp://[fd00::zz]:5555",
                "is not a host name or an IP address",
            ),
            ("tcp://my host:5555", "is not a host name or an IP address"),
            ("", "it must start with tcp://"),
        ] {
            let e = error(&format!("{MODEL}[node]\nlisten = \"{url}\"\n"), &[]);
            assert!(
                e.contains("line 4: invalid value for 'node.listen'"),
                "{url}: {e}"
            );
            assert!(e.contains(why), "{url}: {e}");
        }
        for url in [
            "tcp://0.0.0.0:65534",
            "tcp://[::]:5555",
            "tcp://pi-1.lan:1",
            " tcp://10.0.0.1:5555 ",
        ] {
            let c = load(&format!("{MODEL}[node]\nlisten = \"{url}\"\n"), &[]).expect(url);
            assert_eq!(c.node.listen.as_deref(), Some(url.trim()));
        }
        assert_eq!(
            control_url("tcp://[::]:65534").as_deref(),
            Ok("tcp://[::]:65535")
        );
        let e = error(&format!("{MODEL}[node]\nlisten = 5555\n"), &[]);
        assert!(e.contains("line 4: wrong type for 'node.listen'"), "{e}");
    }

    #[test]
    fn peer_keys_checked() {
        // Each with its line: the peers start at line 8, 4 lines each with layers.
        let with = |b: &str| {
            format!(
                "{CLUSTER}{}",
                peers(&[("a", "tcp://h1:1", Some("0-4")), ("b", b, Some("4-8")),])
            )
        };
        let e = error(&with("tcp://h2:65535"), &[]);
        assert!(
            e.contains("line 14: invalid value for 'peer.address'"),
            "{e}"
        );
        assert!(e.contains("got 65535"), "{e}");
        let e = error(&with("h2:5555"), &[]);
        assert!(
            e.contains("line 14: invalid value for 'peer.address'"),
            "{e}"
        );
        assert!(e.contains("must start with tcp://"), "{e}");
        for unspecified in ["tcp://0.0.0.0:5555", "tcp://[::]:5555"] {
            let e = error(&with(unspecified), &[]);
            assert!(
                e.contains("line 14: invalid value for 'peer.address'"),
                "{e}"
            );
            assert!(e.contains("other nodes cannot dial"), "{e}");
        }

        for (layers, why) in [
            ("4", "is not a layer range"),
            ("4-", "is not a layer range"),
            ("a-b", "is not a layer range"),
            ("-4-8", "is not a layer range"),
            ("4..=8", "is not a layer range"),
            ("8-4", "the start (8) must be below the end (4)"),
            ("4-4", "the start (4) must be below the end (4)"),
        ] {
            let text = format!(
                "{CLUSTER}{}",
                peers(&[
                    ("a", "tcp://h1:1", Some("0-4")),
                    ("b", "tcp://h2:1", Some(layers))
                ])
            );
            let e = error(&text, &[]);
            assert!(
                e.contains("line 15: invalid value for 'peer.layers'"),
                "{layers}: {e}"
            );
            assert!(e.contains(why), "{layers}: {e}");
        }
        let text = format!(
            "{CLUSTER}{}",
            peers(&[("a", "tcp://h1:1", None), ("b", "tcp://h2:1", None)])
        )
        .replace("name = \"b\"", "name = \" \"");
        let e = error(&text, &[]);
        assert!(e.contains("line 12: invalid value for 'peer.name'"), "{e}");

        // Unknown keys and wrong types in the second entry.
        let text = format!(
            "{CLUSTER}{}port = 1\n",
            peers(&[("a", "tcp://h1:1", None), ("b", "tcp://h2:1", None)])
        );
        let e = error(&text, &[]);
        assert!(
            e.ends_with("line 14: unknown key 'peer.port' (known: name, address, layers)"),
            "{e}"
        );
        let text = format!(
            "{CLUSTER}{}layers = 4\n",
            peers(&[("a", "tcp://h1:1", None), ("b", "tcp://h2:1", None)])
        );
        let e = error(&text, &[]);
        assert!(e.contains("line 14: wrong type for 'peer.layers'"), "{e}");
        let e = error(&format!("{CLUSTER}[peer]\nname = \"a\"\n"), &[]);
        assert!(
            e.ends_with("line 8: wrong type for 'peer': found [peer], expected [[peer]]"),
            "{e}"
        );
    }

    #[test]
    fn peer_name_and_address_required() {
        let text = format!(
            "{CLUSTER}{}[[peer]]\naddress = \"tcp://h2:1\"\n",
            peers(&[("a", "tcp://h1:1", None)])
        );
        let e = error(&text, &[]);
        assert!(
            e.ends_with("line 11: [[peer]] number 2 has no 'name' (required)"),
            "{e}"
        );
        let text = format!("{CLUSTER}[[peer]]\nname = \"a\"\n");
        let e = error(&text, &[]);
        assert!(
            e.ends_with("line 8: [[peer]] number 1 has no 'address' (required)"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_peers_rejected() {
        let text = format!(
            "{CLUSTER}{}",
            peers(&[
                ("a", "tcp://h1:1", None),
                ("b", "tcp://h2:1", None),
                ("a", "tcp://h3:1", None)
            ])
        );
        let e = error(&text, &[]);
        assert!(
            e.ends_with("line 15: duplicate peer name 'a' (already given at line 9)"),
            "{e}"
        );
        let text = format!(
            "{CLUSTER}{}",
            peers(&[
                ("a", "tcp://h1:1", None),
                ("b", "tcp://h2:1", None),
                ("c", "tcp://h2:1", None)
            ])
        );
        let e = error(&text, &[]);
        assert!(
            e.ends_with(
                "line 16: duplicate peer address 'tcp://h2:1': peer 'b' and peer 'c' both have it"
            ),
            "{e}"
        );
    }

    #[test]
    fn own_name_must_be_a_peer() {
        let list = peers(&[("a", "tcp://h1:1", None), ("b", "tcp://h2:1", None)]);
        let text = format!("{}{list}", CLUSTER.replace("name = \"a\"", "name = \"z\""));
        let e = error(&text, &[]);
        assert!(
            e.ends_with(
                "line 4: this node's name 'z' is not one of the peers (a, b): set [node] name \
                 (or EXO_NODE_NAME) to this node's [[peer]] name"
            ),
            "{e}"
        );
        let e = error(&format!("{CLUSTER}{list}"), &[("EXO_NODE_NAME", "y")]);
        assert!(
            e.starts_with("environment variable EXO_NODE_NAME: this node's name 'y'"),
            "{e}"
        );
        // The hostname, when [node] name is not set.
        let text = format!("{}{list}", CLUSTER.replace("name = \"a\"\n", ""));
        let e = error(&text, &[]);
        assert!(
            e.contains(&format!(
                ": this node's name '{}' (the hostname: [node] name is not set) is not one of",
                default_node_name()
            )),
            "{e}"
        );
    }

    #[test]
    fn peers_need_a_key_and_listen() {
        let list = peers(&[("a", "tcp://h1:1", None), ("b", "tcp://h2:1", None)]);
        let text = format!(
            "{}{list}",
            CLUSTER.replace("key = \"0123456789abcdef\"\n", "")
        );
        let e = error(&text, &[]);
        assert!(
            e.contains(
                "line 7: peers are listed but there is no cluster key: set [cluster] key_file"
            ),
            "{e}"
        );
        let text = format!(
            "{}{list}",
            CLUSTER.replace("listen = \"tcp://0.0.0.0:5555\"\n", "")
        );
        let e = error(&text, &[]);
        assert!(
            e.contains("line 7: peers are listed but [node] listen is not set"),
            "{e}"
        );
        assert!(e.contains("EXO_NODE_LISTEN"), "{e}");
        // Both from the environment.
        let text = format!(
            "{}{list}",
            CLUSTER
                .replace("listen = \"tcp://0.0.0.0:5555\"\n", "")
                .replace("key = \"0123456789abcdef\"\n", "")
        );
        let c = load(
            &text,
            &[
                ("EXO_NODE_LISTEN", "tcp://10.0.0.1:7000"),
                ("EXO_CLUSTER_KEY", "0123456789abcdef"),
            ],
        )
        .expect("load");
        assert!(c.is_cluster() && c.is_head());
    }

    #[test]
    fn layers_all_or_none() {
        let text = format!(
            "{CLUSTER}{}",
            three_peers([Some("0-6"), None, Some("6-12")])
        );
        let e = error(&text, &[]);
        assert!(
            e.ends_with(
                "line 12: peer 'b' has no layers but peer 'a' has: give every peer layers, \
                 or none (to let exo split the layers)"
            ),
            "{e}"
        );
        let text = format!("{CLUSTER}{}", three_peers([None, None, Some("0-6")]));
        let e = error(&text, &[]);
        assert!(
            e.ends_with("line 8: peer 'a' has no layers but peer 'c' has: give every peer layers, or none (to let exo split the layers)"),
            "{e}"
        );
    }

    #[test]
    fn layers_contiguous_from_zero() {
        // The peers' layers lines: 11, 15, 19.
        let e = error(
            &format!(
                "{CLUSTER}{}",
                three_peers([Some("0-6"), Some("4-8"), Some("8-9")])
            ),
            &[],
        );
        assert!(
            e.ends_with("line 15: peer 'b' layers 4-8 overlap peer 'a' layers 0-6"),
            "{e}"
        );
        let e = error(
            &format!(
                "{CLUSTER}{}",
                three_peers([Some("0-6"), Some("7-8"), Some("8-9")])
            ),
            &[],
        );
        assert!(
            e.ends_with("line 15: gap between peer 'a' (ends at 6) and peer 'b' (starts at 7)"),
            "{e}"
        );
        let e = error(
            &format!(
                "{CLUSTER}{}",
                three_peers([Some("0-6"), Some("6-8"), Some("2-4")])
            ),
            &[],
        );
        assert!(
            e.ends_with("line 19: peer 'c' layers 2-4 overlap peer 'b' layers 6-8"),
            "{e}"
        );
        let e = error(
            &format!(
                "{CLUSTER}{}",
                three_peers([Some("1-6"), Some("6-8"), Some("8-9")])
            ),
            &[],
        );
        assert!(
            e.ends_with(
                "line 11: gap before peer 'a' (starts at 1): the first peer's layers must start at 0"
            ),
            "{e}"
        );
    }

    #[test]
    fn cluster_key_rules() {
        let list = peers(&[("a", "tcp://h1:1", None)]);
        let e = error(&format!("{CLUSTER}key_file = \"/k\"\n{list}"), &[]);
        assert!(e.starts_with("'cluster.key' ("), "{e}");
        assert!(e.contains(" line 7) and 'cluster.key_file' ("), "{e}");
        assert!(e.ends_with(" line 8) are both set: set only one"), "{e}");
        let e = error(
            &format!("{CLUSTER}{list}"),
            &[("EXO_CLUSTER_KEY_FILE", "/k")],
        );
        assert!(
            e.contains("line 7) and 'cluster.key_file' (environment variable EXO_CLUSTER_KEY_FILE) are both set"),
            "{e}"
        );

        let short = CLUSTER.replace("0123456789abcdef", "0123456789abcde");
        let e = error(&format!("{short}{list}"), &[]);
        assert!(e.contains("line 7: invalid value for 'cluster.key'"), "{e}");
        assert!(
            e.contains("the cluster key must be at least 16 characters long, got 15"),
            "{e}"
        );
        assert!(!e.contains("0123456789abcde"), "{e}");
        for bad in ["", "two words but long enough"] {
            let text = CLUSTER.replace("0123456789abcdef", bad);
            let e = error(&format!("{text}{list}"), &[]);
            assert!(e.contains("line 7: invalid value for 'cluster.key'"), "{e}");
        }
        let e = error(&format!("{CLUSTER}{list}"), &[("EXO_CLUSTER_KEY", "short")]);
        assert!(
            e.starts_with("environment variable EXO_CLUSTER_KEY: invalid value for 'cluster.key'"),
            "{e}"
        );
        assert!(!e.contains("short"), "{e}");
        // A key without peers is still checked.
        let e = error(&format!("{MODEL}[cluster]\nkey = \"short\"\n"), &[]);
        assert!(e.contains("line 4: invalid value for 'cluster.key'"), "{e}");
    }

    #[test]
    fn cluster_key_file_read_and_trimmed() {
        let list = peers(&[("a", "tcp://h1:1", None)]);
        let key = Temp::new("\n  0123456789abcdef-in-a-file \n");
        let with_file = |path: &Path| {
            format!(
                "{}{list}",
                CLUSTER.replace(
                    "key = \"0123456789abcdef\"",
                    &format!("key_file = {:?}", path.display().to_string())
                )
            )
        };
        let c = load(&with_file(&key.0), &[]).expect("load");
        assert_eq!(
            c.cluster.key.as_ref().map(ClusterKey::expose),
            Some("0123456789abcdef-in-a-file")
        );
        assert_eq!(c.cluster.key_file.as_deref(), Some(key.0.as_path()));

        let empty = Temp::new(" \n\n");
        let e = error(&with_file(&empty.0), &[]);
        assert!(
            e.starts_with(&format!("cluster.key_file {}: ", empty.0.display())),
            "{e}"
        );
        assert!(e.contains("empty"), "{e}");

        let short = Temp::new("0123456789\n");
        let e = error(&with_file(&short.0), &[]);
        assert!(
            e.starts_with(&format!("cluster.key_file {}: ", short.0.display())),
            "{e}"
        );
        assert!(e.contains("at least 16 characters"), "{e}");
        assert!(!e.contains("0123456789 "), "{e}");

        let missing = std::env::temp_dir().join("exo-config-test-no-cluster-key-file");
        let e = error(&with_file(&missing), &[]);
        assert!(
            e.starts_with(&format!(
                "cluster.key_file {}: cannot read",
                missing.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn cluster_env_overrides_applied() {
        let key = Temp::new("0123456789abcdef-env-file\n");
        let list = peers(&[("a", "tcp://h1:1", None), ("b", "tcp://h2:1", None)]);
        let text = format!(
            "{}{list}",
            CLUSTER.replace("key = \"0123456789abcdef\"\n", "")
        );
        let c = load(
            &text,
            &[
                ("EXO_NODE_LISTEN", "tcp://192.168.1.20:7000"),
                ("EXO_CLUSTER_KEY_FILE", &key.0.display().to_string()),
                ("EXO_NODE_NAME", "b"),
            ],
        )
        .expect("load");
        assert_eq!(c.node.listen.as_deref(), Some("tcp://192.168.1.20:7000"));
        assert_eq!(c.cluster.key_file.as_deref(), Some(key.0.as_path()));
        assert_eq!(
            c.cluster.key.as_ref().map(ClusterKey::expose),
            Some("0123456789abcdef-env-file")
        );
        assert_eq!(c.own_peer_index(), Some(1));
        assert!(!c.is_head());
        // EXO_CLUSTER_KEY replaces the file's key.
        let c = load(
            &format!("{CLUSTER}{list}"),
            &[("EXO_CLUSTER_KEY", "fedcba9876543210")],
        )
        .expect("load");
        assert_eq!(
            c.cluster.key.as_ref().map(ClusterKey::expose),
            Some("fedcba9876543210")
        );
        // Empty counts as unset.
        let c = load(
            &format!("{CLUSTER}{list}"),
            &[("EXO_CLUSTER_KEY", ""), ("EXO_NODE_LISTEN", "")],
        )
        .expect("load");
        assert_eq!(c.node.listen.as_deref(), Some("tcp://0.0.0.0:5555"));
        let e = error(
            &format!("{CLUSTER}{list}"),
            &[("EXO_NODE_LISTEN", "tcp://0.0.0.0:65535")],
        );
        assert!(
            e.starts_with("environment variable EXO_NODE_LISTEN: invalid value for 'node.listen'"),
            "{e}"
        );
    }

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/exo.toml")
    }

    #[test]
    fn example_file_loads() {
        let c = Config::load_from_env_map(&example_path(), &HashMap::new()).expect("load");
        assert!(
            c.model.path.starts_with("/var/lib/exo/models/"),
            "{:?}",
            c.model.path
        );
        assert_eq!(c.api.listen.to_string(), "0.0.0.0:8080");
        assert!(c.api.key.is_none());
        assert!(!c.is_cluster() && c.is_head() && c.node.listen.is_none());
        assert!(c.cluster.is_empty());
        let defaults = Config::with_model(&c.model.path);
        assert_eq!(
            c.effective_toml().replace("0.0.0.0:8080", "127.0.0.1:8080"),
            defaults.effective_toml()
        );
    }

    /// The example's cluster, uncommented: `[node] listen` and everything from
    /// `[cluster]` on but the inline `key` (shown as the alternative to `key_file`).
    #[test]
    fn example_cluster_loads_uncommented() {
        let text = std::fs::read_to_string(example_path()).expect("read example");
        let mut in_cluster = false;
        let mut out = String::new();
        for line in text.lines() {
            let bare = line.trim_start_matches('#').trim();
            let is_header = bare.starts_with('[')
                && bare.ends_with(']')
                && bare
                    .trim_matches(['[', ']'])
                    .bytes()
                    .all(|b| b.is_ascii_lowercase());
            in_cluster |= bare == "[cluster]";
            let is_key = bare.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            });
            let uncomment = (in_cluster && (is_header || (is_key && !bare.starts_with("key ="))))
                || bare.starts_with("listen = \"tcp://");
            out.push_str(if uncomment { bare } else { line });
            out.push('\n');
        }
        assert_eq!(out.matches("\n[[peer]]\n").count(), 3, "{out}");
        let key = Temp::new("0123456789abcdef0123456789abcdef\n");
        let key_var = key.0.display().to_string();
        let env = [
            ("EXO_CLUSTER_KEY_FILE", key_var.as_str()),
            ("EXO_NODE_NAME", "pi-1"),
        ];
        let c = load(&out, &env).expect("load the uncommented cluster");
        assert!(c.is_cluster() && c.is_head());
        assert_eq!(c.node.listen.as_deref(), Some("tcp://0.0.0.0:5555"));
        let names: Vec<&str> = c.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["pi-1", "pi-2", "mini-pc"]);
        assert_eq!(c.peers[2].layers, Some((12, 18)));
        // Without the layers lines, too.
        let without: String = out
            .lines()
            .filter(|l| !l.starts_with("layers = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = load(&without, &[("EXO_NODE_NAME", "mini-pc"), env[0]]).expect("load");
        assert!(c.peers.iter().all(|p| p.layers.is_none()));
        assert_eq!(c.own_peer_index(), Some(2));
    }

    #[test]
    fn example_file_documents_every_key() {
        let text = std::fs::read_to_string(example_path()).expect("read example");
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .collect();
        for section in sections() {
            // Every `[section]` (or `[[section]]` entry), to the next header.
            let header = section_header(section);
            let starts: Vec<usize> = (0..lines.len()).filter(|&i| lines[i] == header).collect();
            assert!(!starts.is_empty(), "{header} is missing");
            for key in section_keys(section).expect("keys") {
                let shown = starts.iter().any(|&start| {
                    lines[start + 1..]
                        .iter()
                        .take_while(|l| !l.starts_with('['))
                        .any(|l| l.starts_with(&format!("{key} =")))
                });
                assert!(shown, "{section}.{key} is not shown in the example");
            }
        }
        for (var, _) in env_overrides() {
            assert!(text.contains(var), "{var} is not documented in the example");
        }
    }
}
