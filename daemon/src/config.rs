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
//! Adding a section (`[cluster]`, `[[peer]]`): a `Raw*` struct and a field of
//! `RawFile`, an arm in `section_keys`, a public struct and a field of [`Config`], its
//! defaults and checks in `resolve`, and its variables (if any) in `ENV_OVERRIDES`.
//! A section may be a table (`[api]`) or an array of tables (`[[peer]]`).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
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
}

/// `[node]`: this machine.
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    /// Name in logs (and in the cluster later). Default: the hostname, or "exo".
    pub name: String,
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
    #[error("'api.key' ({key_at}) and 'api.key_file' ({key_file_at}) are both set: set only one")]
    KeyConflict { key_at: String, key_file_at: String },
    #[error("api.key_file {}: {message}", path.display())]
    KeyFile { path: PathBuf, message: String },
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
struct RawNode {
    name: Option<String>,
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
        _ => return None,
    })
}

/// The sections written as arrays of tables (`[[peer]]`); the others are tables.
const ARRAY_SECTIONS: &[&str] = &[];

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

/// One key of the file: its dotted name, the line it stands on, the bytes of its value.
struct KeySite {
    key: String,
    line: usize,
    value: Range<usize>,
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
        }
    }

    /// The effective configuration as TOML, the API key shown as `"***"` (for
    /// `exo check-config`).
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
        let tables: Vec<&DeTable> = match value.get_ref().as_array() {
            Some(array) => array
                .iter()
                .filter_map(|v| v.get_ref().as_table())
                .collect(),
            None => value.get_ref().as_table().into_iter().collect(),
        };
        for table in tables {
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
                .map(|s| format!("[{s}]"))
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

    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(key),
            key,
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

    /// A bearer token must fit an `Authorization` header as one word.
    fn api_key(&self, key: &str) -> Result<ApiKey, &'static str> {
        let key = key.trim();
        if key.is_empty() {
            Err("the key is empty")
        } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
            Err("the key may hold visible ASCII characters only (no spaces)")
        } else {
            Ok(ApiKey::new(key))
        }
    }
}

/// Pass 3: defaults and checks.
fn resolve(raw: RawFile, origins: &Origins<'_>) -> Result<Config, ConfigError> {
    let node = NodeConfig {
        name: match raw.node.name {
            Some(name) if name.trim().is_empty() => {
                return Err(origins.invalid("node.name", "must not be empty"))
            }
            Some(name) => name.trim().to_owned(),
            None => default_node_name(),
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
    let (key, key_file) = match (raw.api.key, raw.api.key_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::KeyConflict {
                key_at: origins.at("api.key"),
                key_file_at: origins.at("api.key_file"),
            })
        }
        (Some(key), None) => (
            Some(
                origins
                    .api_key(&key)
                    .map_err(|m| origins.invalid("api.key", m))?,
            ),
            None,
        ),
        (None, Some(file)) => {
            let key_file_error = |message: String| ConfigError::KeyFile {
                path: file.clone(),
                message,
            };
            let text = std::fs::read_to_string(&file)
                .map_err(|e| key_file_error(format!("cannot read the key: {e}")))?;
            let key = origins
                .api_key(&text)
                .map_err(|m| key_file_error(format!("{m} (the file holds the key alone)")))?;
            (Some(key), Some(file))
        }
        (None, None) => (None, None),
    };
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

    Ok(Config {
        node,
        model,
        api,
        engine,
    })
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

        let e = error(&format!("{MODEL}[cluster]\nsize = 2\n"), &[]);
        assert!(
            e.ends_with("line 3: unknown key 'cluster' (known: node, model, api, engine)"),
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
        assert_eq!(sections(), ["node", "model", "api", "engine"]);
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
        let defaults = Config::with_model(&c.model.path);
        assert_eq!(
            c.effective_toml().replace("0.0.0.0:8080", "127.0.0.1:8080"),
            defaults.effective_toml()
        );
    }

    #[test]
    fn example_file_documents_every_key() {
        let text = std::fs::read_to_string(example_path()).expect("read example");
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .collect();
        for section in sections() {
            let header = format!("[{section}]");
            let start = lines
                .iter()
                .position(|l| *l == header)
                .unwrap_or_else(|| panic!("{header} is missing"));
            let end = lines[start + 1..]
                .iter()
                .position(|l| l.starts_with('['))
                .map_or(lines.len(), |i| start + 1 + i);
            for key in section_keys(section).expect("keys") {
                assert!(
                    lines[start..end]
                        .iter()
                        .any(|l| l.starts_with(&format!("{key} ="))),
                    "{section}.{key} is not shown in the example"
                );
            }
        }
        for (var, _) in env_overrides() {
            assert!(text.contains(var), "{var} is not documented in the example");
        }
    }
}
