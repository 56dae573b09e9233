//! A secret from the configuration (the API key, the cluster key): never printed,
//! compared in constant time.

use std::fmt;
use std::marker::PhantomData;

use serde::{Serialize, Serializer};

/// What a [`Secret`] is, for its `Debug` form (`ApiKey(***)`).
pub trait SecretKind {
    /// The name `Debug` shows.
    const NAME: &'static str;
}

/// The API bearer token.
#[derive(Debug, Clone, Copy)]
pub enum Api {}
/// The key the nodes of a cluster share.
#[derive(Debug, Clone, Copy)]
pub enum Cluster {}

impl SecretKind for Api {
    const NAME: &'static str = "ApiKey";
}
impl SecretKind for Cluster {
    const NAME: &'static str = "ClusterKey";
}

/// `[api] key`: the bearer token clients must send.
pub type ApiKey = Secret<Api>;
/// `[cluster] key`: the secret the nodes of a cluster share.
pub type ClusterKey = Secret<Cluster>;

/// A secret. Its `Debug` and `Serialize` forms are `***`; it has no `Display`;
/// [`Secret::matches`] compares in constant time.
pub struct Secret<K> {
    text: String,
    kind: PhantomData<K>,
}

impl<K> Secret<K> {
    /// A secret, as given (loading trims and checks it).
    pub fn new(text: impl Into<String>) -> Self {
        Secret {
            text: text.into(),
            kind: PhantomData,
        }
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// Whether `presented` (such as the token of an `Authorization: Bearer` header) is
    /// this secret; the time taken does not depend on where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq::constant_time_eq(self.text.as_bytes(), presented.as_bytes())
    }
}

impl<K> Clone for Secret<K> {
    fn clone(&self) -> Self {
        Secret::new(self.text.clone())
    }
}

impl<K> PartialEq for Secret<K> {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.text)
    }
}

impl<K> From<&str> for Secret<K> {
    fn from(text: &str) -> Self {
        Secret::new(text)
    }
}

impl<K> From<String> for Secret<K> {
    fn from(text: String) -> Self {
        Secret::new(text)
    }
}

impl<K: SecretKind> fmt::Debug for Secret<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(***)", K::NAME)
    }
}

impl<K> Serialize for Secret<K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_same_text() {
        let key = ApiKey::new("sk-secret-123");
        assert!(key.matches("sk-secret-123"));
        assert!(!key.matches("sk-secret-12"));
        assert!(!key.matches("sk-secret-1234"));
        assert!(!key.matches(""));
    }

    #[test]
    fn never_printed() {
        let key = ClusterKey::new("very-secret");
        assert_eq!(format!("{key:?}"), "ClusterKey(***)");
        assert_eq!(format!("{:?}", ApiKey::new("x")), "ApiKey(***)");
        assert_eq!(serde_json::to_string(&key).expect("json"), "\"***\"");
    }
}
