//! From the parsed file (with its overrides) to a [`Config`]: the defaults, every value
//! checked, and the rules across keys of a cluster, in one pass.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use super::error::{ConfigError, Location};
use super::file::{FileConfig, FilePeer, Given, Origin};
use super::{
    default_node_name, env, parse_tcp_url, ApiConfig, ClusterConfig, ClusterKey, Config,
    EngineConfig, HeadSharePolicy, MemorySize, ModelConfig, NodeConfig, PeerConfig, Secret,
    WireActivations, MAX_SLOTS_LIMIT, MIN_CLUSTER_KEY_LEN,
};

impl Origin<'_> {
    fn invalid<T>(
        &self,
        key: &'static str,
        value: Option<&Given<T>>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(value),
            key,
            message: message.into(),
        }
    }

    /// `value` (or `default`) if it lies in `range`.
    fn count(
        &self,
        key: &'static str,
        value: Option<&Given<u64>>,
        default: usize,
        range: RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let n = value.map_or(default, |v| usize::try_from(v.value).unwrap_or(usize::MAX));
        if range.contains(&n) {
            Ok(n)
        } else if *range.end() == usize::MAX {
            let message = format!("must be at least {}, got {n}", range.start());
            Err(self.invalid(key, value, message))
        } else {
            let (lo, hi) = (range.start(), range.end());
            Err(self.invalid(key, value, format!("must be in {lo}..={hi}, got {n}")))
        }
    }

    /// A key given inline (`key`) or read from a file (`key_file`), not both; `check`
    /// trims and checks its text. `section` is "api" or "cluster".
    fn secret<K>(
        &self,
        section: &'static str,
        (key_name, key_file_name): (&'static str, &'static str),
        key: Option<Given<String>>,
        key_file: Option<Given<String>>,
        check: impl Fn(&str) -> Result<Secret<K>, String>,
    ) -> Result<(Option<Secret<K>>, Option<PathBuf>), ConfigError> {
        match (key, key_file) {
            (Some(key), Some(file)) => Err(ConfigError::KeyConflict {
                section,
                key_at: self.at(Some(&key)),
                key_file_at: self.at(Some(&file)),
            }),
            (Some(key), None) => match check(&key.value) {
                Ok(secret) => Ok((Some(secret), None)),
                Err(m) => Err(self.invalid(key_name, Some(&key), m)),
            },
            (None, Some(file)) => {
                let path = PathBuf::from(file.value);
                let key_file_error = |message: String| ConfigError::KeyFile {
                    key: key_file_name,
                    path: path.clone(),
                    message,
                };
                let text = super::read_small_file(&path, super::MAX_KEY_FILE_BYTES)
                    .map_err(|e| key_file_error(format!("cannot read the key: {e}")))?;
                let key = check(&text)
                    .map_err(|m| key_file_error(format!("{m} (the file holds the key alone)")))?;
                Ok((Some(key), Some(path)))
            }
            (None, None) => Ok((None, None)),
        }
    }
}

/// A key as one word of visible ASCII, trimmed.
fn key_text<K>(key: &str) -> Result<Secret<K>, String> {
    let key = key.trim();
    if key.is_empty() {
        Err("the key is empty".into())
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Err("the key may hold visible ASCII characters only (no spaces)".into())
    } else {
        Ok(Secret::new(key))
    }
}

/// The cluster secret: one word, long enough not to be guessed.
fn cluster_key(key: &str) -> Result<ClusterKey, String> {
    let key: ClusterKey = key_text(key)?;
    let len = key.expose().len();
    if len < MIN_CLUSTER_KEY_LEN {
        return Err(format!(
            "the cluster key must be at least {MIN_CLUSTER_KEY_LEN} characters long, got {len} \
             (generate one with `openssl rand -hex 32`)"
        ));
    }
    Ok(key)
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

/// The bounds of the numeric keys: beyond them a value is a mistake that would cost
/// the machine (100,000 threads, an instant that overflows on shutdown).
const THREADS_LIMIT: usize = 256;
pub const CTX_LIMIT: usize = 1 << 20;
const MAX_QUEUE_LIMIT: usize = 100_000;
pub const BATCH_LIMIT: usize = 8192;
const MAX_BODY_BYTES_LIMIT: usize = 1 << 30;
const SHUTDOWN_TIMEOUT_LIMIT_SECS: usize = 86_400;
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
/// Header, body and write timeouts: at least a second (0 would refuse everyone), at most an
/// hour (a client that takes longer is holding a connection, not sending a request).
const CLIENT_TIMEOUT_LIMIT_SECS: usize = 3600;

/// The defaults, and every value checked.
pub(super) fn resolve(file: FileConfig, origin: &Origin<'_>) -> Result<Config, ConfigError> {
    let FileConfig {
        node,
        model,
        api,
        engine,
        cluster,
        peer,
    } = file;
    let name = match &node.name {
        Some(name) if name.value.trim().is_empty() => {
            return Err(origin.invalid("node.name", Some(name), "must not be empty"))
        }
        Some(name) => name.value.trim().to_owned(),
        None => default_node_name(),
    };
    let listen = match &node.listen {
        None => None,
        Some(url) => {
            let trimmed = url.value.trim();
            parse_tcp_url(trimmed).map_err(|m| origin.invalid("node.listen", Some(url), m))?;
            Some(trimmed.to_owned())
        }
    };
    let memory = match &node.memory {
        None => None,
        Some(size) => Some(
            MemorySize::parse(&size.value.0)
                .map_err(|m| origin.invalid("node.memory", Some(size), m))?,
        ),
    };

    let model = ModelConfig {
        path: match model.path {
            None => None,
            Some(p) if p.value.is_empty() => {
                return Err(origin.invalid("model.path", Some(&p), "must not be empty"))
            }
            Some(p) => Some(PathBuf::from(p.value)),
        },
        cache_dir: match model.cache_dir {
            None => PathBuf::from(super::DEFAULT_CACHE_DIR),
            Some(d) if d.value.trim().is_empty() => {
                return Err(origin.invalid("model.cache_dir", Some(&d), "must not be empty"))
            }
            Some(d) => PathBuf::from(d.value.trim()),
        },
    };

    let config = Config {
        model,
        api: resolve_api(api, origin)?,
        engine: resolve_engine(&engine, origin)?,
        cluster: resolve_cluster(cluster, origin)?,
        peers: resolve_peers(&peer, origin)?,
        node: NodeConfig {
            name,
            listen,
            memory,
        },
    };
    check_cluster(&config, &node.name, &peer, origin)?;
    // a worker may do without the model file: it receives its slice from the head
    if config.model.path.is_none() && config.is_head() {
        return Err(ConfigError::Missing {
            path: origin.path.into(),
            key: "model.path",
            var: env::var_for("model.path").unwrap_or("EXO_MODEL_PATH"),
        });
    }
    Ok(config)
}

fn resolve_api(api: super::file::FileApi, origin: &Origin<'_>) -> Result<ApiConfig, ConfigError> {
    let defaults = ApiConfig::default();
    let listen = match &api.listen {
        None => defaults.listen,
        Some(s) => s.value.trim().parse().map_err(|e| {
            let message = format!(
                "'{}' is not an IP address and port such as 127.0.0.1:8080, \
                 0.0.0.0:8080 or [::]:8080 ({e})",
                s.value
            );
            origin.invalid("api.listen", Some(s), message)
        })?,
    };
    let max_body_bytes = origin.count(
        "api.max_body_bytes",
        api.max_body_bytes.as_ref(),
        defaults.max_body_bytes,
        1..=MAX_BODY_BYTES_LIMIT,
    )?;
    let shutdown_timeout_secs = origin.count(
        "api.shutdown_timeout_secs",
        api.shutdown_timeout_secs.as_ref(),
        defaults.shutdown_timeout_secs as usize,
        0..=SHUTDOWN_TIMEOUT_LIMIT_SECS,
    )? as u64;
    let max_connections = origin.count(
        "api.max_connections",
        api.max_connections.as_ref(),
        defaults.max_connections,
        1..=MAX_CONNECTIONS_LIMIT,
    )?;
    let max_connections_per_ip = origin.count(
        "api.max_connections_per_ip",
        api.max_connections_per_ip.as_ref(),
        defaults.max_connections_per_ip,
        0..=MAX_CONNECTIONS_LIMIT,
    )?;
    let [header_timeout_secs, body_timeout_secs, write_timeout_secs] = [
        (
            "api.header_timeout_secs",
            &api.header_timeout_secs,
            defaults.header_timeout_secs,
        ),
        (
            "api.body_timeout_secs",
            &api.body_timeout_secs,
            defaults.body_timeout_secs,
        ),
        (
            "api.write_timeout_secs",
            &api.write_timeout_secs,
            defaults.write_timeout_secs,
        ),
    ]
    .map(|(key, value, default)| {
        let range = 1..=CLIENT_TIMEOUT_LIMIT_SECS;
        origin
            .count(key, value.as_ref(), default as usize, range)
            .map(|n| n as u64)
    });
    let keys = ("api.key", "api.key_file");
    let (key, key_file) = origin.secret("api", keys, api.key, api.key_file, key_text)?;
    Ok(ApiConfig {
        listen,
        key,
        key_file,
        max_body_bytes,
        shutdown_timeout_secs,
        max_connections,
        max_connections_per_ip,
        header_timeout_secs: header_timeout_secs?,
        body_timeout_secs: body_timeout_secs?,
        write_timeout_secs: write_timeout_secs?,
        web: api.web.map_or(defaults.web, |w| w.value),
    })
}

fn resolve_engine(
    e: &super::file::FileEngine,
    origin: &Origin<'_>,
) -> Result<EngineConfig, ConfigError> {
    let d = EngineConfig::default();
    Ok(EngineConfig {
        threads: origin.count(
            "engine.threads",
            e.threads.as_ref(),
            d.threads,
            1..=THREADS_LIMIT,
        )?,
        ctx: origin.count("engine.ctx", e.ctx.as_ref(), d.ctx, 1..=CTX_LIMIT)?,
        max_slots: origin.count(
            "engine.max_slots",
            e.max_slots.as_ref(),
            d.max_slots,
            1..=MAX_SLOTS_LIMIT,
        )?,
        max_queue: origin.count(
            "engine.max_queue",
            e.max_queue.as_ref(),
            d.max_queue,
            0..=MAX_QUEUE_LIMIT,
        )?,
        batch: origin.count("engine.batch", e.batch.as_ref(), d.batch, 1..=BATCH_LIMIT)?,
        prompt_cache: e.prompt_cache.as_ref().map_or(d.prompt_cache, |g| g.value),
    })
}

fn resolve_cluster(
    c: super::file::FileCluster,
    origin: &Origin<'_>,
) -> Result<ClusterConfig, ConfigError> {
    let keys = ("cluster.key", "cluster.key_file");
    let (key, key_file) = origin.secret("cluster", keys, c.key, c.key_file, cluster_key)?;
    let activations = match &c.activations {
        None => WireActivations::F32,
        Some(a) => match a.value.as_str() {
            "f16" => WireActivations::F16,
            "f32" => WireActivations::F32,
            other => {
                let message = format!("'{other}' is not one of \"f16\", \"f32\"");
                return Err(origin.invalid("cluster.activations", Some(a), message));
            }
        },
    };
    let head_share = match &c.head_share {
        None => HeadSharePolicy::Auto,
        Some(h) => match h.value.as_str() {
            "auto" => HeadSharePolicy::Auto,
            "off" => HeadSharePolicy::Off,
            other => match other.parse::<f64>() {
                Ok(f) if f > 0.0 && f < 1.0 => HeadSharePolicy::Share(f),
                _ => {
                    let message = format!(
                        "'{other}' is not \"auto\", \"off\" or a fraction strictly between 0 \
                         and 1 (such as \"0.4\")"
                    );
                    return Err(origin.invalid("cluster.head_share", Some(h), message));
                }
            },
        },
    };
    Ok(ClusterConfig {
        key,
        key_file,
        activations,
        head_share,
    })
}

/// Where `[[peer]]` entry `entry` starts.
fn entry_at(origin: &Origin<'_>, peers: &[Given<FilePeer>], entry: usize) -> Location {
    origin.at(peers.get(entry))
}

/// Where a key of `[[peer]]` entry `entry` stands; where the entry starts without it.
fn peer_key_at<T>(
    origin: &Origin<'_>,
    peers: &[Given<FilePeer>],
    entry: usize,
    key: impl Fn(&FilePeer) -> Option<&Given<T>>,
) -> Location {
    match peers.get(entry).and_then(|p| key(&p.value)) {
        Some(value) => origin.at(Some(value)),
        None => entry_at(origin, peers, entry),
    }
}

/// Each `[[peer]]` on its own: a name, an address, maybe layers.
fn resolve_peers(
    peers: &[Given<FilePeer>],
    origin: &Origin<'_>,
) -> Result<Vec<PeerConfig>, ConfigError> {
    let mut out = Vec::with_capacity(peers.len());
    for (i, entry) in peers.iter().enumerate() {
        let p = &entry.value;
        let missing = |key: &str| ConfigError::Cluster {
            at: entry_at(origin, peers, i),
            message: format!("[[peer]] number {} has no '{key}' (required)", i + 1),
        };
        let name = match &p.name {
            None => return Err(missing("name")),
            Some(n) if n.value.trim().is_empty() => {
                return Err(origin.invalid("peer.name", Some(n), "must not be empty"))
            }
            Some(n) => n.value.trim().to_owned(),
        };
        let Some(given_address) = &p.address else {
            return Err(missing("address"));
        };
        let address = given_address.value.trim().to_owned();
        let invalid_address = |m: String| origin.invalid("peer.address", Some(given_address), m);
        let (host, _) = parse_tcp_url(&address).map_err(invalid_address)?;
        let unspecified = host == "0.0.0.0"
            || host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<IpAddr>().ok())
                .is_some_and(|ip| ip.is_unspecified());
        if unspecified {
            return Err(invalid_address(format!(
                "'{address}': other nodes cannot dial {host}; give this peer's LAN \
                 address or host name (0.0.0.0 belongs in its [node] listen)"
            )));
        }
        let layers = match &p.layers {
            None => None,
            Some(l) => Some(
                parse_layers(&l.value).map_err(|m| origin.invalid("peer.layers", Some(l), m))?,
            ),
        };
        out.push(PeerConfig {
            name,
            address,
            layers,
        });
    }
    Ok(out)
}

/// The most `[[peer]]` entries a cluster may list (a pipeline of more nodes than this
/// would spend its time on the network).
pub const MAX_PEERS: usize = 256;

/// The rules across keys of a cluster; nothing to check for a single node.
fn check_cluster(
    config: &Config,
    name: &Option<Given<String>>,
    given: &[Given<FilePeer>],
    origin: &Origin<'_>,
) -> Result<(), ConfigError> {
    let peers = &config.peers;
    if peers.is_empty() {
        return Ok(());
    }
    let cluster = |at: Location, message: String| ConfigError::Cluster { at, message };
    let name_at = |i| peer_key_at(origin, given, i, |p| p.name.as_ref());
    let address_at = |i| peer_key_at(origin, given, i, |p| p.address.as_ref());
    if peers.len() > MAX_PEERS {
        let message = format!(
            "{} [[peer]] entries: a cluster has at most {MAX_PEERS} nodes",
            peers.len()
        );
        return Err(cluster(entry_at(origin, given, MAX_PEERS), message));
    }
    // first index of each name and address: linear in the number of peers
    let mut names: HashMap<&str, usize> = HashMap::with_capacity(peers.len());
    let mut addresses: HashMap<&str, usize> = HashMap::with_capacity(peers.len());
    for (i, p) in peers.iter().enumerate() {
        if let Some(&first) = names.get(p.name.as_str()) {
            let message = format!(
                "duplicate peer name '{}' (already given at {})",
                p.name,
                name_at(first).short(),
            );
            return Err(cluster(name_at(i), message));
        }
        if let Some(&first) = addresses.get(p.address.as_str()) {
            let message = format!(
                "duplicate peer address '{}': peer '{}' and peer '{}' both have it",
                p.address, peers[first].name, p.name
            );
            return Err(cluster(address_at(i), message));
        }
        names.insert(p.name.as_str(), i);
        addresses.insert(p.address.as_str(), i);
    }
    check_layers(peers, given, origin)?;

    let first_peer_at = entry_at(origin, given, 0);
    if config.node.listen.is_none() {
        return Err(cluster(
            first_peer_at,
            "peers are listed but [node] listen is not set: set it to this node's nng URL \
             for the cluster, such as \"tcp://0.0.0.0:5555\" (or set EXO_NODE_LISTEN)"
                .into(),
        ));
    }
    if config.cluster.key.is_none() {
        return Err(cluster(
            first_peer_at,
            "peers are listed but there is no cluster key: set [cluster] key_file or key \
             (or EXO_CLUSTER_KEY_FILE / EXO_CLUSTER_KEY), the same on every node"
                .into(),
        ));
    }
    if config.own_peer_index().is_none() {
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        let source = match name {
            None => " (the hostname: [node] name is not set)",
            Some(_) => "",
        };
        let message = format!(
            "this node's name '{}'{source} is not one of the peers ({}): set [node] name \
             (or EXO_NODE_NAME) to this node's [[peer]] name",
            config.node.name,
            names.join(", ")
        );
        return Err(cluster(origin.at(name.as_ref()), message));
    }
    Ok(())
}

/// Explicit layer ranges: all or none, contiguous from 0 in peer order.
fn check_layers(
    peers: &[PeerConfig],
    given: &[Given<FilePeer>],
    origin: &Origin<'_>,
) -> Result<(), ConfigError> {
    let Some(with) = peers.iter().find(|p| p.layers.is_some()) else {
        return Ok(());
    };
    let cluster = |at: Location, message: String| ConfigError::Cluster { at, message };
    if let Some(i) = peers.iter().position(|p| p.layers.is_none()) {
        let message = format!(
            "peer '{}' has no layers but peer '{}' has: give every peer layers, \
             or none (to let exo split the layers)",
            peers[i].name, with.name
        );
        return Err(cluster(entry_at(origin, given, i), message));
    }
    let mut end = 0;
    for (i, p) in peers.iter().enumerate() {
        let Some((a, b)) = p.layers else { continue };
        let at = || peer_key_at(origin, given, i, |p| p.layers.as_ref());
        if i == 0 && a != 0 {
            let message = format!(
                "gap before peer '{}' (starts at {a}): the first peer's layers must start at 0",
                p.name
            );
            return Err(cluster(at(), message));
        }
        if i > 0 {
            let prev = &peers[i - 1];
            let (pa, pb) = prev.layers.unwrap_or((0, end));
            if a < end {
                let message = format!(
                    "peer '{}' layers {a}-{b} overlap peer '{}' layers {pa}-{pb}",
                    p.name, prev.name
                );
                return Err(cluster(at(), message));
            }
            if a > end {
                let message = format!(
                    "gap between peer '{}' (ends at {end}) and peer '{}' (starts at {a})",
                    prev.name, p.name
                );
                return Err(cluster(at(), message));
            }
        }
        end = b;
    }
    Ok(())
}
