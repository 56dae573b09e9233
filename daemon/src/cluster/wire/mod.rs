//! The versioned, authenticated frame that every message between exo nodes travels in.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset size  field
//!      0    4  magic b"EXOF"
//!      4    1  version (2)
//!      5    1  frame type (FrameType)
//!      6    1  dtype (0 none, 1 f32, 2 f16, 3 bf16)
//!      7    1  flags (FLAG_SOLO on a step's data frames; 0 on control frames)
//!      8    8  sender id (random per process start)
//!     16    8  counter (per sender from 1; each taken once, at most 64 behind the newest)
//!     24    8  step id
//!     32    2  n_seqs
//!     34    2  width (n_embd for activations, 0 otherwise)
//!     36       n_seqs × 12-byte descriptors: pos0 u32, n_tokens u32, slot u16,
//!              output u8 (0 none, 1 last, 2 all), 1 zero byte
//!              payload (its length is what remains: nng keeps message boundaries)
//!              16-byte MAC: keyed BLAKE3 of everything before it, truncated
//! ```
//!
//! One token of Gemma 3 270M's activations in f16 is 36 + 12 + 1280 + 16 = 1344
//! bytes: 2·n_embd + 64. (Version 1 had 8-byte lengths and widths, 16-byte
//! descriptors and a 32-byte MAC: 90 bytes of framing.) A 128-bit MAC is the usual
//! truncation of a keyed hash; forging one still takes 2^128 tries.
//!
//! By concern: `header.rs` (the header and descriptors), `mac.rs` (the key and
//! MAC), `payload.rs` (what frames carry, typed), `seal.rs` (the sender's side),
//! `open.rs` (the receiver's side) and `error.rs`. [`Opener::open`] validates a frame completely
//! (structure, MAC, replay, shapes against the receiver's [`Limits`]) and decodes its
//! payload once, before the caller sees it, so a [`Frame`] that comes out of it can
//! be handed to ggml as is.

mod bytes;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod header;
mod mac;
mod open;
mod payload;
mod picks;
mod seal;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_limits;

use std::fmt;

use serde::de::DeserializeOwned;

pub use crate::engine::codec::Dtype;
use crate::engine::{codec, BatchSeq, Picked};
pub use error::{DropReason, FrameError};
pub use mac::FrameKey;
pub use open::{Limits, Opener, OpenerStats, StatsSnapshot, MAX_CHUNK_FRAME_LEN, REPLAY_WINDOW};
pub use payload::{Body, Floats, PartialLogits, Payload};
pub use seal::{random_sender_id, Sealer};

pub const MAGIC: [u8; 4] = *b"EXOF";
pub const VERSION: u8 = 2;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 36;
/// Bytes of one sequence descriptor.
pub const SEQ_DESC_LEN: usize = 12;
/// Flag of a step's data frames: the step was alone in the pipeline when the head
/// sent it, so a split `lm_head` divides its rows by the plan's solo share.
pub const FLAG_SOLO: u8 = 0x01;
/// Every flag this version defines.
const KNOWN_FLAGS: u8 = FLAG_SOLO;
/// Bytes of the MAC trailer.
pub const MAC_LEN: usize = 16;
/// Payload bytes of a [`FrameType::SliceChunk`] frame, at most.
pub const MAX_CHUNK_FRAME_BYTES: usize = 8 << 20;
/// The shortest possible frame: a header and a MAC.
pub const MIN_FRAME_LEN: usize = HEADER_LEN + MAC_LEN;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    HelloAck = 2,
    Capabilities = 3,
    Plan = 4,
    PlanAck = 5,
    Ping = 6,
    Pong = 7,
    Cancel = 8,
    Activations = 9,
    Tokens = 10,
    Error = 11,
    /// A new sequence's sampling parameters, sent down the data pipeline ahead of its
    /// first activations to the last stage, which samples.
    Setup = 12,
    /// The last stage's share of the `lm_head` when the head is split: the
    /// logits of its own rows for each output row, as the best candidates or whole.
    LmHeadPart = 13,
    /// A last stage with a split `lm_head` sends the normalized final hidden state of
    /// each output row first, so the head node computes its rows meanwhile.
    Normed = 14,
    /// The head offers a worker the slice of the model its plan needs (JSON:
    /// [`crate::cluster::proto::SliceOffer`]).
    SliceOffer = 15,
    /// A worker's answer to an offer or a chunk: what it still misses (JSON).
    SliceStatus = 16,
    /// One chunk of the model file (raw bytes; the step id is the chunk's index),
    /// at most [`MAX_CHUNK_FRAME_BYTES`].
    SliceChunk = 17,
    /// Sampled tokens with their log-probabilities, one per output row (a last
    /// stage that samples, when some sequence of the step asked for them).
    TokenLogprobs = 18,
}

impl FrameType {
    pub const ALL: [FrameType; 18] = [
        FrameType::Hello,
        FrameType::HelloAck,
        FrameType::Capabilities,
        FrameType::Plan,
        FrameType::PlanAck,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Cancel,
        FrameType::Activations,
        FrameType::Tokens,
        FrameType::Error,
        FrameType::Setup,
        FrameType::LmHeadPart,
        FrameType::Normed,
        FrameType::SliceOffer,
        FrameType::SliceStatus,
        FrameType::SliceChunk,
        FrameType::TokenLogprobs,
    ];

    pub fn from_u8(v: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == v)
    }

    /// Control frames carry no sequence descriptors: JSON, or a model chunk.
    pub fn is_control(self) -> bool {
        !matches!(
            self,
            FrameType::Activations
                | FrameType::Tokens
                | FrameType::LmHeadPart
                | FrameType::Normed
                | FrameType::TokenLogprobs
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "hello",
            FrameType::HelloAck => "hello-ack",
            FrameType::Capabilities => "capabilities",
            FrameType::Plan => "plan",
            FrameType::PlanAck => "plan-ack",
            FrameType::Ping => "ping",
            FrameType::Pong => "pong",
            FrameType::Cancel => "cancel",
            FrameType::Activations => "activations",
            FrameType::Tokens => "tokens",
            FrameType::Error => "error",
            FrameType::Setup => "setup",
            FrameType::LmHeadPart => "head-part",
            FrameType::Normed => "normed",
            FrameType::SliceOffer => "slice-offer",
            FrameType::SliceStatus => "slice-status",
            FrameType::SliceChunk => "slice-chunk",
            FrameType::TokenLogprobs => "token-logprobs",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A verified frame, its payload decoded ([`Body`]); activation bytes borrow the
/// received message.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<'a> {
    pub frame_type: FrameType,
    /// The element type of activations (None on other frames).
    pub dtype: Option<Dtype>,
    pub sender_id: u64,
    pub counter: u64,
    pub step_id: u64,
    /// [`FLAG_SOLO`] or 0.
    pub flags: u8,
    pub width: u32,
    pub seqs: Vec<BatchSeq>,
    pub body: Body<'a>,
}

impl Frame<'_> {
    /// Tokens (rows) of the batch.
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.n_tokens).sum()
    }

    fn wrong_type(&self, expected: &'static str) -> FrameError {
        FrameError::WrongFrameType {
            expected,
            got: self.frame_type,
        }
    }

    /// Decodes an activation payload to f32 (`n_tokens × width` values) into `out`.
    pub fn activations(&self, out: &mut Vec<f32>) -> Result<(), FrameError> {
        match self.body {
            Body::Activations { dtype, bytes } => Ok(codec::decode(bytes, dtype, out)?),
            _ => Err(self.wrong_type(FrameType::Activations.name())),
        }
    }

    /// Decodes a normed frame: the normalized hidden state of every output row.
    pub fn normed(&self, out: &mut Vec<f32>) -> Result<(), FrameError> {
        match self.body {
            Body::Normed { dtype, bytes } => Ok(codec::decode(bytes, dtype, out)?),
            _ => Err(self.wrong_type(FrameType::Normed.name())),
        }
    }

    /// A head part: one logits row per output row (checked when opened).
    pub fn head_part(&self) -> Result<&[PartialLogits], FrameError> {
        match &self.body {
            Body::LmHeadPart(rows) => Ok(rows),
            _ => Err(self.wrong_type(FrameType::LmHeadPart.name())),
        }
    }

    /// The token ids, one per output row (inside the vocabulary when opened).
    pub fn tokens(&self) -> Result<&[i32], FrameError> {
        match &self.body {
            Body::Tokens(tokens) => Ok(tokens),
            _ => Err(self.wrong_type(FrameType::Tokens.name())),
        }
    }

    /// The sampled tokens of a tokens or token-logprobs frame, one per output row.
    pub fn picks(&self) -> Result<Vec<Picked>, FrameError> {
        match &self.body {
            Body::Tokens(tokens) => Ok(tokens.iter().map(|&t| Picked::token(t)).collect()),
            Body::TokenLogprobs(picks) => Ok(picks.clone()),
            _ => Err(self.wrong_type(FrameType::Tokens.name())),
        }
    }

    /// A slice chunk's bytes and their BLAKE3 hash (computed once, when opened).
    pub fn chunk(&self) -> Result<(&[u8], &[u8; 32]), FrameError> {
        match &self.body {
            Body::Chunk(bytes, hash) => Ok((bytes, hash)),
            _ => Err(self.wrong_type(FrameType::SliceChunk.name())),
        }
    }

    /// Parses a control frame's JSON.
    pub fn control<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        match self.body {
            Body::Control(json) => Ok(serde_json::from_slice(json)?),
            _ => Err(self.wrong_type("control")),
        }
    }
}
