//! SIGHUP: re-read the config file, log which keys changed, apply what can change
//! live (`api.key`) and say what needs a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::api::App;
use crate::config::Config;

/// Keys a running daemon applies on SIGHUP; every other change needs a restart.
pub const LIVE_KEYS: &[&str] = &["api.key"];

/// The dotted keys whose values differ between `old` and `new` (secrets compared by
/// value, never printed), sorted.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (flatten(old), flatten(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    // Secrets serialize as "***": compare them by value.
    if old.api.key != new.api.key {
        keys.push("api.key".into());
    }
    if old.cluster.key != new.cluster.key {
        keys.push("cluster.key".into());
    }
    keys.sort();
    keys.dedup();
    keys
}

fn flatten(c: &Config) -> BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, v: serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(v) = serde_json::to_value(c) {
        walk("", v, &mut out);
    }
    out
}

/// Applies a new config to the running app; returns the changed keys that need a
/// restart.
pub fn apply(app: &App, old: &Config, new: &Config) -> (Vec<String>, Vec<String>) {
    let changed = changed_keys(old, new);
    let (live, restart): (Vec<String>, Vec<String>) = changed
        .into_iter()
        .partition(|k| LIVE_KEYS.contains(&k.as_str()));
    if live.iter().any(|k| k == "api.key") {
        *app.api_key.write().unwrap_or_else(|e| e.into_inner()) = new.api.key.clone();
    }
    (live, restart)
}

/// Re-reads `path` on every SIGHUP, for as long as the process runs.
pub fn spawn(path: PathBuf, initial: Config, app: Arc<App>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch SIGHUP: {e}");
                return;
            }
        };
        let mut current = initial;
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: re-reading {}", path.display());
            let new = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("config reload failed, keeping the running config: {e}");
                    continue;
                }
            };
            let (live, restart) = apply(&app, &current, &new);
            if live.is_empty() && restart.is_empty() {
                tracing::info!("config unchanged");
            }
            for k in &live {
                tracing::info!("{k} changed: applied");
            }
            for k in &restart {
                tracing::warn!("{k} changed: needs a restart");
            }
            // The running config: only live keys take the new value.
            current.api.key = new.api.key.clone();
        }
    });
    #[cfg(not(unix))]
    let _ = (path, initial, app);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;
    use std::collections::HashMap;

    fn load(text: &str) -> Config {
        // one file per call: tests run in parallel, and two texts may share a length
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("exo-reload-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write");
        let c = Config::load_from_env_map(&path, &HashMap::new()).expect("load");
        let _ = std::fs::remove_file(&path);
        c
    }

    const BASE: &str = "[model]\npath = \"/m.gguf\"\n\n[api]\nkey = \"sk-old-key-123\"\n";

    #[test]
    fn same_file_changes_nothing() {
        assert!(changed_keys(&load(BASE), &load(BASE)).is_empty());
    }

    #[test]
    fn api_key_applies_live_the_rest_needs_a_restart() {
        let old = load(BASE);
        let new = load(
            "[model]\npath = \"/other.gguf\"\n\n[api]\nkey = \"sk-new-key-4567\"\n\n[engine]\nmax_slots = 7\n",
        );
        assert_eq!(
            changed_keys(&old, &new),
            vec!["api.key", "engine.max_slots", "model.path"]
        );
        let app = App::new("m".into(), Some("sk-old-key-123".into()), 1 << 20);
        let (live, restart) = apply(&app, &old, &new);
        assert_eq!(live, vec!["api.key"]);
        assert_eq!(restart, vec!["engine.max_slots", "model.path"]);
        assert_eq!(
            app.api_key
                .read()
                .expect("lock")
                .as_ref()
                .map(ApiKey::expose),
            Some("sk-new-key-4567")
        );
    }
}
