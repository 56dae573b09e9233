//! The file as written: one typed struct per section (`deny_unknown_fields`, every key
//! optional), parsed once; each value remembers where it stands (or which environment
//! variable set it), so that errors name the line.

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Deserializer};
use toml::de::DeTable;

use super::error::{ConfigError, Location};

/// A value of the file (with its span) or of an environment variable.
#[derive(Debug, Clone)]
pub(super) struct Given<T> {
    pub value: T,
    pub from: Source,
}

/// Where a [`Given`] value came from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// The bytes of the value in the file.
    File(Range<usize>),
    /// The environment variable that set it.
    Env(&'static str),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Given<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<T>::deserialize(deserializer)?;
        Ok(Given {
            from: Source::File(spanned.span()),
            value: spanned.into_inner(),
        })
    }
}

/// An optional key of the file.
type Key<T> = Option<Given<T>>;

/// The file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct FileConfig {
    pub node: FileNode,
    pub model: FileModel,
    pub api: FileApi,
    pub engine: FileEngine,
    pub cluster: FileCluster,
    pub peer: Vec<Given<FilePeer>>,
}

/// `[node]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct FileNode {
    pub name: Key<String>,
    pub listen: Key<String>,
    pub memory: Key<SizeText>,
}

/// A size as written: a string such as "1.5 GiB", or an integer of bytes (kept as its
/// digits); `validate` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SizeText(pub String);

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SizeText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as \"1.5 GiB\" or \"800 MB\", or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SizeText, E> {
                Ok(SizeText(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `[model]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct FileModel {
    pub path: Key<String>,
    pub cache_dir: Key<String>,
}

/// `[api]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct FileApi {
    pub listen: Key<String>,
    pub key: Key<String>,
    pub key_file: Key<String>,
    pub max_body_bytes: Key<u64>,
    pub shutdown_timeout_secs: Key<u64>,
    pub max_connections: Key<u64>,
    pub max_connections_per_ip: Key<u64>,
    pub header_timeout_secs: Key<u64>,
    pub body_timeout_secs: Key<u64>,
    pub write_timeout_secs: Key<u64>,
    pub web: Key<bool>,
}

/// `[engine]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct FileEngine {
    pub threads: Key<u64>,
    pub ctx: Key<u64>,
    pub max_slots: Key<u64>,
    pub max_queue: Key<u64>,
    pub batch: Key<u64>,
    pub prompt_cache: Key<bool>,
}

/// `[cluster]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct FileCluster {
    pub key: Key<String>,
    pub key_file: Key<String>,
    pub activations: Key<String>,
    pub head_share: Key<String>,
}

/// One `[[peer]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct FilePeer {
    pub name: Key<String>,
    pub address: Key<String>,
    pub layers: Key<String>,
}

/// A section of the file and its keys, as the structs above name them (a test checks
/// them against serde's field lists).
pub(super) struct Section {
    pub name: &'static str,
    pub keys: &'static [&'static str],
    /// Written as an array of tables (`[[peer]]`).
    pub array: bool,
}

const fn section(name: &'static str, keys: &'static [&'static str], array: bool) -> Section {
    Section { name, keys, array }
}

/// The sections, in order.
pub(super) const SECTIONS: &[Section] = &[
    section("node", &["name", "listen", "memory"], false),
    section("model", &["path", "cache_dir"], false),
    section(
        "api",
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
            "web",
        ],
        false,
    ),
    section(
        "engine",
        &[
            "threads",
            "ctx",
            "max_slots",
            "max_queue",
            "batch",
            "prompt_cache",
        ],
        false,
    ),
    section(
        "cluster",
        &["key", "key_file", "activations", "head_share"],
        false,
    ),
    section("peer", &["name", "address", "layers"], true),
];

impl Section {
    /// As written in the file: `[api]`, `[[peer]]`.
    pub fn header(&self) -> String {
        if self.array {
            format!("[[{}]]", self.name)
        } else {
            format!("[{}]", self.name)
        }
    }
}

/// The section named `name`.
pub(super) fn find_section(name: &str) -> Option<&'static Section> {
    SECTIONS.iter().find(|s| s.name == name)
}

/// Turns byte offsets of the file into locations.
pub(super) struct Origin<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Origin<'_> {
    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let text = self.text;
        let before = text.get(..offset.min(text.len())).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// The line of a byte offset, as a location.
    pub fn line(&self, offset: usize) -> Location {
        Location::Line {
            path: self.path.to_path_buf(),
            line: self.line_col(offset).0,
        }
    }

    /// Where a value came from; the file itself for a value it does not give.
    pub fn at<T>(&self, value: Option<&Given<T>>) -> Location {
        match value.map(|v| &v.from) {
            Some(Source::File(span)) => self.line(span.start),
            Some(Source::Env(var)) => Location::Env(var),
            None => Location::File(self.path.to_path_buf()),
        }
    }

    /// Parses the file once into its sections; a syntax error, an unknown key or a
    /// wrong type is reported with the key and its line.
    pub fn parse(&self) -> Result<FileConfig, ConfigError> {
        let doc = DeTable::parse(self.text).map_err(|e| {
            let (line, column) = self.line_col(e.span().map_or(0, |s| s.start));
            ConfigError::Syntax {
                path: self.path.to_path_buf(),
                line,
                column,
                message: e.message().trim().replace('\n', "; "),
            }
        })?;
        let sites = key_sites(doc.get_ref());
        // serde would read `engine = [1, 2]` as the fields of [engine] in order.
        if let Some(e) = sites.iter().find_map(|site| self.misshapen(site)) {
            return Err(e);
        }
        FileConfig::deserialize(toml::de::Deserializer::from(doc))
            .map_err(|e| self.misfit(&sites, &e))
    }

    /// A section written as a table when it is an array of tables, or the reverse.
    fn misshapen(&self, site: &KeySite) -> Option<ConfigError> {
        let section = find_section(&site.key)?;
        let (table, array) = (
            format!("[{}]", section.name),
            format!("[[{}]]", section.name),
        );
        let message = match (section.array, site.shape) {
            (true, Shape::Table) => format!("found {table}, expected {array}"),
            (false, Shape::Array) => format!("found {array}, expected {table}"),
            _ => return None,
        };
        Some(ConfigError::WrongType {
            at: self.line(site.key_span.start),
            key: site.key.clone(),
            message,
        })
    }

    /// The error for a document that parses but does not fit [`FileConfig`]: the first
    /// unknown key of the file if there is one (whatever serde met first), else the key
    /// whose value has the wrong type.
    fn misfit(&self, sites: &[KeySite], e: &toml::de::Error) -> ConfigError {
        if let Some(site) = sites
            .iter()
            .filter(|s| is_unknown(&s.key))
            .min_by_key(|s| s.key_span.start)
        {
            return self.unknown_key(site);
        }
        let span = e.span().unwrap_or(0..0);
        let site = sites
            .iter()
            .filter(|s| {
                s.value_span.start <= span.start
                    && span.start < s.value_span.end.max(s.value_span.start + 1)
            })
            .min_by_key(|s| s.value_span.len());
        let message = e
            .message()
            .trim()
            .replace("invalid type: ", "found ")
            .replace("invalid value: ", "found ")
            .replace("expected u64", "expected a non-negative integer")
            .replace('\n', "; ");
        match site {
            Some(site) => ConfigError::WrongType {
                at: self.line(site.key_span.start),
                key: site.key.clone(),
                message,
            },
            None => {
                let (line, column) = self.line_col(span.start);
                ConfigError::Syntax {
                    path: self.path.to_path_buf(),
                    line,
                    column,
                    message,
                }
            }
        }
    }

    fn unknown_key(&self, site: &KeySite) -> ConfigError {
        let (known, name) = match site.key.split_once('.') {
            Some((section, name)) => (find_section(section).map_or(&[][..], |s| s.keys), name),
            None => (&[][..], site.key.as_str()),
        };
        let known = if site.key.contains('.') {
            known.join(", ")
        } else {
            let names: Vec<&str> = SECTIONS.iter().map(|s| s.name).collect();
            names.join(", ")
        };
        let belongs: Vec<String> = SECTIONS
            .iter()
            .filter(|s| s.keys.contains(&name))
            .map(Section::header)
            .collect();
        let hint = if belongs.is_empty() {
            String::new()
        } else {
            format!("; '{name}' belongs in {}", belongs.join(" or "))
        };
        ConfigError::UnknownKey {
            at: self.line(site.key_span.start),
            key: site.key.clone(),
            known,
            hint,
        }
    }
}

/// Whether a dotted key (or a section) is not one of [`SECTIONS`]; the keys of an
/// unknown section are not looked at (the section is reported).
fn is_unknown(key: &str) -> bool {
    match key.split_once('.') {
        None => find_section(key).is_none(),
        Some((section, name)) => find_section(section).is_some_and(|s| !s.keys.contains(&name)),
    }
}

/// What a value of the file is, as far as sections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Table,
    Array,
    Other,
}

/// A key of the file (a section, or a key of a section or of one of its entries), where
/// it stands and the bytes of its value.
struct KeySite {
    /// Dotted: `engine.threads`; a section alone: `engine`.
    key: String,
    key_span: Range<usize>,
    value_span: Range<usize>,
    shape: Shape,
}

/// Every section and key of a parsed document (only walked to explain an error).
fn key_sites(doc: &DeTable<'_>) -> Vec<KeySite> {
    let mut sites = Vec::new();
    for (section, value) in doc {
        let name: &str = section.get_ref();
        let shape = match value.get_ref() {
            v if v.is_table() => Shape::Table,
            v if v.as_array().is_some() => Shape::Array,
            _ => Shape::Other,
        };
        sites.push(KeySite {
            key: name.to_owned(),
            key_span: section.span(),
            value_span: value.span(),
            shape,
        });
        let tables: Vec<&DeTable<'_>> = match value.get_ref().as_array() {
            Some(array) => array
                .iter()
                .filter_map(|v| v.get_ref().as_table())
                .collect(),
            None => value.get_ref().as_table().into_iter().collect(),
        };
        for (key, value) in tables.into_iter().flatten() {
            let key_name: &str = key.get_ref();
            sites.push(KeySite {
                key: format!("{name}.{key_name}"),
                key_span: key.span(),
                value_span: value.span(),
                shape: Shape::Other,
            });
        }
    }
    sites
}
