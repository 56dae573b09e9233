//! The sender's side: [`Sealer`] stamps sender id and counter on a typed payload,
//! writes header, descriptors and payload, and appends the MAC.

use std::fmt;

use serde::Serialize;

use super::header::{encode_seq, seq_count, Header};
use super::payload::{Layout, Payload};
use super::{
    FrameError, FrameKey, FrameType, Limits, HEADER_LEN, KNOWN_FLAGS, MAC_LEN,
    MAX_CHUNK_FRAME_BYTES, SEQ_DESC_LEN,
};
use crate::engine::BatchSeq;

/// A fresh random sender id (never 0), for one process lifetime: from the OS
/// random source, or (should that fail) a hash of the clock and the process id.
pub fn random_sender_id() -> u64 {
    let id = getrandom::u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut material = nanos.to_le_bytes().to_vec();
        material.extend_from_slice(&std::process::id().to_le_bytes());
        let hash = blake3::hash(&material);
        let mut id = [0u8; 8];
        id.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(id)
    });
    id.max(1)
}

/// Seals outgoing frames of one sender: stamps sender id and counter, appends the MAC.
pub struct Sealer {
    key: FrameKey,
    sender_id: u64,
    counter: u64,
    /// Flags of the data frames sealed next ([`Sealer::set_step_flags`]).
    step_flags: u8,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("sender_id", &format_args!("{:016x}", self.sender_id))
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `sender_id`; its first frame has counter 1.
    pub fn new(key: FrameKey, sender_id: u64) -> Sealer {
        Sealer {
            key,
            sender_id,
            counter: 0,
            step_flags: 0,
        }
    }

    /// A sealer with a fresh [`random_sender_id`].
    pub fn with_random_id(key: FrameKey) -> Sealer {
        Sealer::new(key, random_sender_id())
    }

    /// Flags (e.g. [`super::FLAG_SOLO`]) that the data frames sealed from now on
    /// carry: a stage sets those of the step it works on. Control frames carry none.
    pub fn set_step_flags(&mut self, flags: u8) {
        self.step_flags = flags & KNOWN_FLAGS;
    }

    pub fn sender_id(&self) -> u64 {
        self.sender_id
    }

    /// The counter of the last sealed frame (0 before the first).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Seals one data frame of step `step_id` for the batch `seqs`; the payload's
    /// shape must match the batch (activations: a row per token; the rest: a row
    /// per output row).
    pub fn seal(
        &mut self,
        step_id: u64,
        seqs: &[BatchSeq],
        payload: Payload<'_>,
    ) -> Result<Vec<u8>, FrameError> {
        let layout = payload.layout(seqs)?;
        self.seal_with(step_id, &layout, seqs, |out| payload.encode(&layout, out))
    }

    /// Seals a control message as JSON.
    pub fn seal_control<T: Serialize + ?Sized>(
        &mut self,
        frame_type: FrameType,
        step_id: u64,
        body: &T,
    ) -> Result<Vec<u8>, FrameError> {
        if !frame_type.is_control() {
            return Err(FrameError::WrongFrameType {
                expected: "control",
                got: frame_type,
            });
        }
        if frame_type == FrameType::SliceChunk {
            return Err(FrameError::WrongFrameType {
                expected: "JSON control",
                got: frame_type,
            });
        }
        let json = serde_json::to_vec(body)?;
        if json.len() > Limits::DEFAULT_MAX_CONTROL_BYTES {
            // the peer would drop it: say so here instead of waiting for its answer
            return Err(FrameError::ControlTooLarge {
                got: json.len(),
                max: Limits::DEFAULT_MAX_CONTROL_BYTES,
            });
        }
        let layout = Layout {
            frame_type,
            dtype: None,
            width: 0,
            len: json.len(),
        };
        self.seal_with(step_id, &layout, &[], |out| out.extend_from_slice(&json))
    }

    /// Seals chunk `index` of a model file ([`FrameType::SliceChunk`]) whose BLAKE3
    /// hash is `hash` (the manifest's: the sender does not hash it again); its MAC
    /// covers the header and that hash ([`super::FrameKey`]).
    pub fn seal_chunk(
        &mut self,
        index: u32,
        bytes: &[u8],
        hash: &[u8; 32],
    ) -> Result<Vec<u8>, FrameError> {
        if bytes.len() > MAX_CHUNK_FRAME_BYTES {
            return Err(FrameError::ControlTooLarge {
                got: bytes.len(),
                max: MAX_CHUNK_FRAME_BYTES,
            });
        }
        let layout = Layout {
            frame_type: FrameType::SliceChunk,
            dtype: None,
            width: 0,
            len: bytes.len(),
        };
        self.seal_framed(u64::from(index), &layout, &[], Some(hash), |out| {
            out.extend_from_slice(bytes)
        })
    }

    /// Seals `payload` as is under a header laid out by `layout`, whatever it says
    /// (for tests of what a receiver refuses).
    #[cfg(test)]
    pub(super) fn seal_bytes(
        &mut self,
        step_id: u64,
        layout: &Layout,
        seqs: &[BatchSeq],
        payload: &[u8],
    ) -> Result<Vec<u8>, FrameError> {
        let layout = Layout {
            len: payload.len(),
            ..*layout
        };
        self.seal_with(step_id, &layout, seqs, |out| out.extend_from_slice(payload))
    }

    fn seal_with(
        &mut self,
        step_id: u64,
        layout: &Layout,
        seqs: &[BatchSeq],
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Vec<u8>, FrameError> {
        self.seal_framed(step_id, layout, seqs, None, write_payload)
    }

    /// Header, descriptors, payload and MAC (a chunk's MAC covers its payload's hash).
    fn seal_framed(
        &mut self,
        step_id: u64,
        layout: &Layout,
        seqs: &[BatchSeq],
        payload_hash: Option<&[u8; 32]>,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Vec<u8>, FrameError> {
        let n_seqs = seq_count(seqs)?;
        let counter = self
            .counter
            .checked_add(1)
            .ok_or(FrameError::CounterExhausted)?;
        let header = Header {
            frame_type: layout.frame_type,
            dtype: layout.dtype,
            flags: if layout.frame_type.is_control() {
                0
            } else {
                self.step_flags
            },
            sender_id: self.sender_id,
            counter,
            step_id,
            n_seqs,
            width: layout.width,
        };
        let mut out =
            Vec::with_capacity(HEADER_LEN + seqs.len() * SEQ_DESC_LEN + layout.len + MAC_LEN);
        header.to_raw().encode(&mut out);
        for s in seqs {
            encode_seq(&mut out, s);
        }
        let before = out.len();
        let chunk_mac = payload_hash.map(|h| self.key.chunk_mac(&out, h));
        write_payload(&mut out);
        debug_assert_eq!(out.len() - before, layout.len);
        match chunk_mac {
            Some(mac) => out.extend_from_slice(&mac),
            None => self.key.append_mac(&mut out),
        }
        self.counter = counter;
        Ok(out)
    }
}
