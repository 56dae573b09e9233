//! The configuration's tests: loading, errors with their lines, overrides, clusters and
//! the example file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::file::{find_section, FileConfig, SECTIONS};
use super::*;

/// The sections of the file, in order.
fn sections() -> Vec<&'static str> {
    SECTIONS.iter().map(|s| s.name).collect()
}

/// The keys of a known section.
fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    find_section(section).map(|s| s.keys)
}

/// A section as written in the file: `[api]`, `[[peer]]`.
fn section_header(section: &str) -> String {
    find_section(section).map_or_else(|| format!("[{section}]"), |s| s.header())
}

/// The known keys are the fields of the `File*` structs, as serde names them: serde
/// lists them when it refuses an unknown one.
#[test]
fn sections_name_the_fields_serde_knows() {
    for s in SECTIONS {
        let text = match s.array {
            true => format!("[[{}]]\nzz_unknown = 1\n", s.name),
            false => format!("[{}]\nzz_unknown = 1\n", s.name),
        };
        let e = toml::from_str::<FileConfig>(&text).expect_err("unknown key");
        let listed: Vec<&str> = e.message().split('`').skip(3).step_by(2).collect();
        assert_eq!(listed, s.keys, "[{}]: {}", s.name, e.message());
    }
    let e = toml::from_str::<FileConfig>("zz_unknown = 1\n").expect_err("unknown section");
    let listed: Vec<&str> = e.message().split('`').skip(3).step_by(2).collect();
    assert_eq!(listed, sections(), "{}", e.message());
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A file under the temp dir, removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(contents: &str) -> Temp {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("exo-config-test-{}-{n}.toml", std::process::id()));
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
    assert_eq!(c.model.path.as_deref(), Some(Path::new("/m.gguf")));
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
    assert!(c.api.web);
    let http = c.api.http_limits();
    assert_eq!(http.max_connections, 512);
    assert_eq!(http.max_connections_per_ip, 64);
    assert_eq!(http.header_timeout, Duration::from_secs(10));
    assert_eq!(http.body_timeout, Duration::from_secs(30));
    assert_eq!(http.write_timeout, Duration::from_secs(30));
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
max_connections = 20
max_connections_per_ip = 0
header_timeout_secs = 2
body_timeout_secs = 3
write_timeout_secs = 4
web = false
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
    let a = &c.api;
    assert_eq!(
        (
            a.max_connections,
            a.max_connections_per_ip,
            a.header_timeout_secs,
            a.body_timeout_secs,
            a.write_timeout_secs
        ),
        (20, 0, 2, 3, 4)
    );
    assert!(!a.web);
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
             (known: threads, ctx, max_slots, max_queue, batch, prompt_cache)",
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
        e.ends_with(
            "line 4: unknown key 'cluster.size' (known: key, key_file, activations, head_share)"
        ),
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
    let e = error(&format!("{MODEL}[api]\nweb = \"no\"\n"), &[]);
    assert!(e.contains("line 4: wrong type for 'api.web'"), "{e}");
    assert!(e.contains("expected a boolean"), "{e}");
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
        // bounds that keep a mistake from costing the machine
        ("[engine]\nthreads = 100000\n", "engine.threads"),
        ("[engine]\nctx = 99999999999\n", "engine.ctx"),
        ("[engine]\nbatch = 100000\n", "engine.batch"),
        ("[engine]\nmax_queue = 10000000\n", "engine.max_queue"),
        (
            "[api]\nshutdown_timeout_secs = 9223372036854775807\n",
            "api.shutdown_timeout_secs",
        ),
        ("[api]\nmax_body_bytes = 0\n", "api.max_body_bytes"),
        ("[api]\nmax_connections = 0\n", "api.max_connections"),
        ("[api]\nmax_connections = 1000001\n", "api.max_connections"),
        (
            "[api]\nmax_connections_per_ip = 1000001\n",
            "api.max_connections_per_ip",
        ),
        (
            "[api]\nheader_timeout_secs = 0\n",
            "api.header_timeout_secs",
        ),
        (
            "[api]\nheader_timeout_secs = 3601\n",
            "api.header_timeout_secs",
        ),
        ("[api]\nbody_timeout_secs = 0\n", "api.body_timeout_secs"),
        ("[api]\nwrite_timeout_secs = 0\n", "api.write_timeout_secs"),
        (
            "[api]\nwrite_timeout_secs = 3601\n",
            "api.write_timeout_secs",
        ),
        (
            "[api]\nbody_timeout_secs = 18446744073709551615\n",
            "api.body_timeout_secs",
        ),
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
    let e = error(&format!("{MODEL}[engine]\nthreads = 100000\n"), &[]);
    assert!(e.ends_with("must be in 1..=256, got 100000"), "{e}");
    let big = "[engine]\nthreads = 256\nctx = 1048576\nbatch = 8192\nmax_queue = 100000\n\
               [api]\nshutdown_timeout_secs = 86400\nmax_connections = 1000000\n\
               max_connections_per_ip = 1000000\n\
               header_timeout_secs = 3600\nbody_timeout_secs = 3600\n\
               write_timeout_secs = 3600\n";
    assert!(load(&format!("{MODEL}{big}"), &[]).is_ok());
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
    assert_eq!(c.model.path.as_deref(), Some(Path::new("/env/m.gguf")));
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

    // a device or a directory is not read (/dev/zero would never end)
    for not_a_file in ["/dev/zero", "/dev/urandom", "/tmp"] {
        let e = error(
            &format!("{MODEL}[cluster]\nkey_file = {not_a_file:?}\n"),
            &[],
        );
        assert!(e.contains("not a regular file"), "{not_a_file}: {e}");
    }
    // nor a file far larger than any key
    let big = Temp::new(&"k".repeat(200_000));
    let e = error(
        &format!(
            "{MODEL}[api]\nkey_file = {:?}\n",
            big.0.display().to_string()
        ),
        &[],
    );
    assert!(e.contains("larger than 65536 bytes"), "{e}");
}

#[test]
fn a_config_that_is_not_a_small_regular_file_is_refused() {
    let e =
        Config::load_from_env_map(Path::new("/dev/zero"), &HashMap::new()).expect_err("a device");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let big = Temp::new(&format!("{MODEL}# {}\n", "x".repeat(2 << 20)));
    let e = Config::load_from_env_map(&big.0, &HashMap::new()).expect_err("a huge file");
    assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
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
    assert_eq!(
        section_keys("node"),
        Some(&["name", "listen", "memory"][..])
    );
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
                "shutdown_timeout_secs",
                "max_connections",
                "max_connections_per_ip",
                "header_timeout_secs",
                "body_timeout_secs",
                "write_timeout_secs",
                "web"
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
        !toml.contains("peer") && !toml.contains("[cluster]") && !toml.contains("listen = \"tcp"),
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
fn node_memory_read_checked_and_printed() {
    const GIB: u64 = 1 << 30;
    for (written, bytes) in [
        ("\"1.5 GiB\"", 3 * GIB / 2),
        ("\"800 MB\"", 800_000_000),
        ("\"800MB\"", 800_000_000),
        ("\" 2 gib \"", 2 * GIB),
        ("\"512 MiB\"", 512 << 20),
        ("\"2g\"", 2_000_000_000),
        ("1610612736", 1_610_612_736),
        ("\"1610612736\"", 1_610_612_736),
    ] {
        let c = load(&format!("{MODEL}[node]\nmemory = {written}\n"), &[]).expect(written);
        assert_eq!(c.node.memory.as_ref().map(MemorySize::bytes), Some(bytes));
        // printed as written, and loads back
        let toml = c.effective_toml();
        let shown = written.trim_matches('"').trim();
        assert!(toml.contains(&format!("memory = \"{shown}\"")), "{toml}");
        let again = load(&toml, &[]).expect("load the effective config");
        assert_eq!(again.node.memory, c.node.memory);
    }
    // not set: not printed (the node offers what is available when it starts)
    let c = load(MODEL, &[]).expect("load");
    assert!(c.node.memory.is_none() && !c.effective_toml().contains("memory"));
    for (written, why) in [
        (
            "\"1.5 GiBs\"",
            "'1.5 GiBs' is not a size such as \"1.5 GiB\"",
        ),
        ("\"lots\"", "'lots' is not a size"),
        ("\"\"", "'' is not a size"),
        ("\"-1 GB\"", "'-1 GB' is not a size"),
        ("\"1.5\"", "'1.5' is not a size"),
        ("-5", "'-5' is not a size"),
        ("0", "'0' is no memory at all"),
        ("\"0 GiB\"", "'0 GiB' is no memory at all"),
    ] {
        let e = error(&format!("{MODEL}[node]\nmemory = {written}\n"), &[]);
        assert!(
            e.contains("line 4: invalid value for 'node.memory'") && e.contains(why),
            "{written}: {e}"
        );
    }
    for written in ["1.5", "true", "[1]"] {
        let e = error(&format!("{MODEL}[node]\nmemory = {written}\n"), &[]);
        assert!(
            e.contains("line 4: wrong type for 'node.memory'")
                && e.contains("expected a size such as \"1.5 GiB\""),
            "{written}: {e}"
        );
    }
    // EXO_NODE_MEMORY overrides the file, and is checked the same way
    let text = format!("{MODEL}[node]\nmemory = \"1 GiB\"\n");
    let c = load(&text, &[("EXO_NODE_MEMORY", "700 MB")]).expect("load");
    assert_eq!(
        c.node.memory.as_ref().map(MemorySize::bytes),
        Some(700_000_000)
    );
    let e = error(&text, &[("EXO_NODE_MEMORY", "a lot")]);
    assert!(
        e.starts_with(
            "environment variable EXO_NODE_MEMORY: invalid value for 'node.memory': \
             'a lot' is not a size"
        ),
        "{e}"
    );
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

/// More peers than a cluster may have are refused at the first one past the limit; up to
/// the limit they are checked in one pass (100,000 entries took quadratic time).
#[test]
fn peer_count_is_bounded() {
    let names: Vec<(String, String)> = (0..=super::validate::MAX_PEERS)
        .map(|i| (format!("p{i}"), format!("tcp://h{i}:1")))
        .collect();
    let list = |n: usize| {
        let mut v: Vec<(&str, &str, Option<&str>)> = vec![("a", "tcp://h:1", None)];
        v.extend(
            names[..n]
                .iter()
                .map(|(n, a)| (n.as_str(), a.as_str(), None)),
        );
        peers(&v)
    };
    let e = error(
        &format!("{CLUSTER}{}", list(super::validate::MAX_PEERS)),
        &[],
    );
    assert!(
        e.contains("257 [[peer]] entries: a cluster has at most 256 nodes"),
        "{e}"
    );
    let ok = format!("{CLUSTER}{}", list(super::validate::MAX_PEERS - 1));
    assert!(load(&ok, &[]).is_ok());
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
        e.contains("line 7: peers are listed but there is no cluster key: set [cluster] key_file"),
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
    let model = c.model.path.clone().expect("the example names a model");
    assert!(model.starts_with("/var/lib/exo/models/"), "{model:?}");
    assert_eq!(c.api.listen.to_string(), "0.0.0.0:8080");
    assert!(c.api.key.is_none());
    assert!(!c.is_cluster() && c.is_head() && c.node.listen.is_none());
    assert!(c.cluster.is_empty());
    let defaults = Config::with_model(model);
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

/// A section as an array of values is not read as its fields in order (serde would),
/// and an unknown key anywhere is reported before a wrong type.
#[test]
fn section_shapes_and_error_order() {
    let e = error(&format!("engine = [1, 2]\n{MODEL}"), &[]);
    assert!(
        e.ends_with("line 1: wrong type for 'engine': found [[engine]], expected [engine]"),
        "{e}"
    );
    let e = error("model = [\"/m.gguf\"]\n", &[]);
    assert!(e.contains("line 1: wrong type for 'model'"), "{e}");
    let e = error(
        &format!("{MODEL}[engine]\nthreads = \"x\"\n[api]\nfoo = 1\n"),
        &[],
    );
    assert!(e.contains("line 6: unknown key 'api.foo'"), "{e}");
}
