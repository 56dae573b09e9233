//! The environment overrides: an explicit list of `EXO_*` variables, each setting one
//! key of the parsed file (an empty value counts as unset; no other variable is read).

use std::collections::HashMap;

use super::error::ConfigError;
use super::file::{FileConfig, Given, SizeText, Source};

/// The only variables read, with the key each sets.
pub(super) const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("EXO_NODE_NAME", "node.name"),
    ("EXO_NODE_LISTEN", "node.listen"),
    ("EXO_NODE_MEMORY", "node.memory"),
    ("EXO_MODEL_PATH", "model.path"),
    ("EXO_MODEL_CACHE_DIR", "model.cache_dir"),
    ("EXO_API_LISTEN", "api.listen"),
    ("EXO_API_KEY", "api.key"),
    ("EXO_API_KEY_FILE", "api.key_file"),
    ("EXO_API_SHUTDOWN_TIMEOUT", "api.shutdown_timeout_secs"),
    ("EXO_ENGINE_THREADS", "engine.threads"),
    ("EXO_ENGINE_CTX", "engine.ctx"),
    ("EXO_ENGINE_MAX_SLOTS", "engine.max_slots"),
    ("EXO_ENGINE_MAX_QUEUE", "engine.max_queue"),
    ("EXO_CLUSTER_KEY", "cluster.key"),
    ("EXO_CLUSTER_KEY_FILE", "cluster.key_file"),
];

/// The variable that sets `key`.
pub(super) fn var_for(key: &str) -> Option<&'static str> {
    ENV_OVERRIDES
        .iter()
        .find(|(_, k)| *k == key)
        .map(|(var, _)| *var)
}

/// The known variables of the process environment (variable → value).
pub(super) fn from_process() -> Result<HashMap<String, String>, ConfigError> {
    let mut env = HashMap::new();
    for &(var, _) in ENV_OVERRIDES {
        if let Some(value) = std::env::var_os(var) {
            let value = value.into_string().map_err(|_| ConfigError::Env {
                var,
                message: "is not valid UTF-8".into(),
            })?;
            env.insert(var.to_owned(), value);
        }
    }
    Ok(env)
}

/// A key an override can set: text, a size (both checked by `validate`), or a count
/// (checked when the variable is read).
enum Slot<'a> {
    Text(&'a mut Option<Given<String>>),
    Size(&'a mut Option<Given<SizeText>>),
    Count(&'a mut Option<Given<u64>>),
}

impl FileConfig {
    fn slot(&mut self, key: &str) -> Option<Slot<'_>> {
        Some(match key {
            "node.name" => Slot::Text(&mut self.node.name),
            "node.listen" => Slot::Text(&mut self.node.listen),
            "node.memory" => Slot::Size(&mut self.node.memory),
            "model.path" => Slot::Text(&mut self.model.path),
            "model.cache_dir" => Slot::Text(&mut self.model.cache_dir),
            "api.listen" => Slot::Text(&mut self.api.listen),
            "api.key" => Slot::Text(&mut self.api.key),
            "api.key_file" => Slot::Text(&mut self.api.key_file),
            "api.shutdown_timeout_secs" => Slot::Count(&mut self.api.shutdown_timeout_secs),
            "engine.threads" => Slot::Count(&mut self.engine.threads),
            "engine.ctx" => Slot::Count(&mut self.engine.ctx),
            "engine.max_slots" => Slot::Count(&mut self.engine.max_slots),
            "engine.max_queue" => Slot::Count(&mut self.engine.max_queue),
            "cluster.key" => Slot::Text(&mut self.cluster.key),
            "cluster.key_file" => Slot::Text(&mut self.cluster.key_file),
            _ => return None,
        })
    }

    /// Sets the keys that the variables in `env` (which may hold anything: only the
    /// known `EXO_*` variables are looked at) override.
    pub(super) fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        for &(var, key) in ENV_OVERRIDES {
            let Some(value) = env.get(var).filter(|v| !v.is_empty()) else {
                continue;
            };
            let from = Source::Env(var);
            match self.slot(key) {
                Some(Slot::Text(slot)) => {
                    *slot = Some(Given {
                        value: value.clone(),
                        from,
                    })
                }
                Some(Slot::Size(slot)) => {
                    *slot = Some(Given {
                        value: SizeText(value.clone()),
                        from,
                    })
                }
                Some(Slot::Count(slot)) => {
                    let n: u64 = value.trim().parse().map_err(|_| ConfigError::Env {
                        var,
                        message: format!(
                            "'{value}' is not a non-negative integer (it sets '{key}')"
                        ),
                    })?;
                    *slot = Some(Given { value: n, from })
                }
                None => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_sets_a_key() {
        let mut file = FileConfig::default();
        for (var, key) in ENV_OVERRIDES {
            assert!(
                file.slot(key).is_some(),
                "{var} sets '{key}', which has no slot"
            );
        }
    }
}
