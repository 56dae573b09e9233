//! The frame MAC: a keyed BLAKE3 hash of everything before it, truncated to
//! [`MAC_LEN`] bytes, under a key derived from the shared cluster secret.

use std::fmt;

use super::MAC_LEN;

/// The BLAKE3 key-derivation context of the frame MAC key.
const KEY_CONTEXT: &str = "exo cluster frame v2";

/// The 32-byte MAC key, derived from the shared cluster secret.
#[derive(Clone)]
pub struct FrameKey([u8; 32]);

impl FrameKey {
    /// `blake3::derive_key("exo cluster frame v2", secret)`.
    pub fn derive(secret: &[u8]) -> FrameKey {
        FrameKey(blake3::derive_key(KEY_CONTEXT, secret))
    }

    /// The keyed BLAKE3 hash of `data`, truncated to [`MAC_LEN`] bytes.
    fn mac(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let full = blake3::keyed_hash(&self.0, data);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&full.as_bytes()[..MAC_LEN]);
        mac
    }

    /// Appends the MAC of everything in `out`.
    pub(super) fn append_mac(&self, out: &mut Vec<u8>) {
        let mac = self.mac(out);
        out.extend_from_slice(&mac);
    }

    /// The MAC of a slice chunk frame: of the bytes before its payload, then the
    /// payload's BLAKE3 hash (so the chunk is hashed once, for the MAC and for the
    /// manifest alike; BLAKE3 resists collisions, so this binds the payload as well).
    pub(super) fn chunk_mac(
        &self,
        before_payload: &[u8],
        payload_hash: &[u8; 32],
    ) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(before_payload);
        h.update(payload_hash);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&h.finalize().as_bytes()[..MAC_LEN]);
        mac
    }

    /// Whether `mac` is the chunk MAC of these parts (constant time).
    pub(super) fn verify_chunk(
        &self,
        before_payload: &[u8],
        payload_hash: &[u8; 32],
        mac: &[u8],
    ) -> bool {
        constant_time_eq::constant_time_eq(&self.chunk_mac(before_payload, payload_hash), mac)
    }

    /// Whether `mac` is the MAC of `body` (compared in constant time).
    pub(super) fn verify(&self, body: &[u8], mac: &[u8]) -> bool {
        constant_time_eq::constant_time_eq(&self.mac(body), mac)
    }
}

impl fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FrameKey(..)")
    }
}
