//! The versioned, authenticated frame that every message between exo nodes travels in.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset size  field
//!      0    4  magic b"EXOF"
//!      4    1  version (2)
//!      5    1  frame type (FrameType)
//!      6    1  dtype (0 none, 1 f32, 2 f16)
//!      7    1  flags (FLAG_SOLO on a step's data frames; 0 on control frames)
//!      8    8  sender id (random per process start)
//!     16    8  counter (strictly increasing per sender)
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
//! [`Opener::open`] validates a frame completely (structure, MAC, replay, shapes
//! against the receiver's [`Limits`]) before any payload byte is interpreted, so a
//! [`Frame`] that comes out of it can be handed to ggml as is.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::engine::{BatchSeq, OutputRows};

pub const MAGIC: [u8; 4] = *b"EXOF";
pub const VERSION: u8 = 2;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 36;
/// Bytes of one sequence descriptor.
pub const SEQ_DESC_LEN: usize = 12;
/// Flag of a step's data frames: the step was alone in the pipeline when the head
/// sent it, so a split output head divides its rows by the plan's solo share.
pub const FLAG_SOLO: u8 = 0x01;
/// Every flag this version defines.
const KNOWN_FLAGS: u8 = FLAG_SOLO;
/// Bytes of the MAC trailer.
pub const MAC_LEN: usize = 16;
/// The shortest possible frame: a header and a MAC.
pub const MIN_FRAME_LEN: usize = HEADER_LEN + MAC_LEN;
/// Rounds an f32 to bfloat16 (nearest, ties to even; NaN stays NaN).
fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The BLAKE3 key-derivation context of the frame MAC key.
const KEY_CONTEXT: &str = "exo cluster frame v2";

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
    /// The last stage's share of the output head when the head is split: the
    /// logits of its own rows for each output row, as the best candidates or whole.
    HeadPart = 13,
    /// A last stage with a split head sends the normalized final hidden state of
    /// each output row first, so the head node computes its rows meanwhile.
    Normed = 14,
}

impl FrameType {
    pub const ALL: [FrameType; 14] = [
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
        FrameType::HeadPart,
        FrameType::Normed,
    ];

    pub fn from_u8(v: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == v)
    }

    /// Control frames carry JSON and no sequence descriptors.
    pub fn is_control(self) -> bool {
        !matches!(
            self,
            FrameType::Activations | FrameType::Tokens | FrameType::HeadPart | FrameType::Normed
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
            FrameType::HeadPart => "head-part",
            FrameType::Normed => "normed",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Element type of an activation payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Dtype {
    None = 0,
    F32 = 1,
    F16 = 2,
    /// bfloat16: f32's range in 2 bytes; used instead of F16 for a frame whose values
    /// would overflow f16 (Gemma's residual stream does).
    BF16 = 3,
}

impl Dtype {
    pub fn from_u8(v: u8) -> Option<Dtype> {
        match v {
            0 => Some(Dtype::None),
            1 => Some(Dtype::F32),
            2 => Some(Dtype::F16),
            3 => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// Bytes per element (0 for `None`).
    pub fn size(self) -> usize {
        match self {
            Dtype::None => 0,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::None => "none",
            Dtype::F32 => "f32",
            Dtype::BF16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

/// One sequence's part of a batch on the wire (mirror of [`BatchSeq`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqDesc {
    pub slot: u32,
    pub pos0: u32,
    pub n_tokens: u32,
    pub output: OutputRows,
}

/// Output rows of a batch (each sequence's, summed).
pub fn output_rows_of(seqs: &[SeqDesc]) -> usize {
    seqs.iter().map(|s| s.output_rows() as usize).sum()
}

impl SeqDesc {
    /// Rows of this sequence that produce output.
    pub fn output_rows(&self) -> u32 {
        // n_tokens is a u32: so is the count
        self.output.count(self.n_tokens as usize) as u32
    }

    /// Converts a batch for the wire; fails if a field does not fit 32 bits.
    pub fn from_batch(seqs: &[BatchSeq]) -> Result<Vec<SeqDesc>, FrameError> {
        seqs.iter().map(|s| SeqDesc::try_from(*s)).collect()
    }

    pub fn to_batch(seqs: &[SeqDesc]) -> Vec<BatchSeq> {
        seqs.iter().map(|s| BatchSeq::from(*s)).collect()
    }
}

impl From<SeqDesc> for BatchSeq {
    fn from(s: SeqDesc) -> BatchSeq {
        BatchSeq {
            slot: s.slot as usize,
            pos0: s.pos0 as usize,
            n_tokens: s.n_tokens as usize,
            output: s.output,
        }
    }
}

/// Fallible: a `usize` wider than the wire's 32 bits is an error, never truncated.
impl TryFrom<BatchSeq> for SeqDesc {
    type Error = FrameError;

    fn try_from(s: BatchSeq) -> Result<SeqDesc, FrameError> {
        let field = |what: &'static str, v: usize| {
            u32::try_from(v).map_err(|_| FrameError::TooLarge {
                what,
                value: v as u64,
                max: u32::MAX as u64,
            })
        };
        Ok(SeqDesc {
            slot: field("slot", s.slot)?,
            pos0: field("pos0", s.pos0)?,
            n_tokens: field("n_tokens", s.n_tokens)?,
            output: s.output,
        })
    }
}

fn output_to_u8(o: OutputRows) -> u8 {
    match o {
        OutputRows::None => 0,
        OutputRows::Last => 1,
        OutputRows::All => 2,
    }
}

fn output_from_u8(v: u8) -> Option<OutputRows> {
    match v {
        0 => Some(OutputRows::None),
        1 => Some(OutputRows::Last),
        2 => Some(OutputRows::All),
        _ => None,
    }
}

/// Why a frame was dropped, for the `/metrics` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed frame (short, wrong magic or version, lengths that do not add up).
    Malformed,
    /// The MAC does not verify: wrong key or altered bytes.
    Forged,
    /// Authentic but already seen, our own frame reflected back, or from a sender
    /// outside the allowed set.
    Replayed,
    /// Authentic but outside the receiver's limits (shapes, slots, positions, types).
    Invalid,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::Malformed,
        DropReason::Forged,
        DropReason::Replayed,
        DropReason::Invalid,
    ];

    /// Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Forged => "forged",
            DropReason::Replayed => "replayed",
            DropReason::Invalid => "invalid",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is shorter than the minimum of {min}")]
    TooShort { len: usize, min: usize },
    #[error("bad frame magic {0:02x?} (expected \"EXOF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported frame version {got} (this node speaks {VERSION})")]
    UnsupportedVersion { got: u8 },
    #[error("frame of {actual} bytes is too short for its {n_seqs} sequence descriptors (needs {needed})")]
    LengthMismatch {
        needed: u64,
        actual: usize,
        n_seqs: u16,
    },
    #[error("frame MAC does not verify (wrong cluster secret or altered frame)")]
    BadMac,
    #[error("replayed frame: counter {counter} of sender {sender:016x} is not above {last}")]
    Replayed {
        sender: u64,
        counter: u64,
        last: u64,
    },
    #[error("frame carries this node's own sender id {0:016x} (reflected)")]
    Reflected(u64),
    #[error("frame from sender {0:016x}, which is not part of this session")]
    UnknownSender(u64),
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    #[error("unknown dtype {0}")]
    UnknownDtype(u8),
    #[error("{frame_type} frame with dtype {dtype}")]
    WrongDtype { frame_type: FrameType, dtype: Dtype },
    #[error("{n} sequences in one frame, at most {max} allowed")]
    TooManySeqs { n: usize, max: usize },
    #[error("{frame_type} frame without sequences")]
    EmptyBatch { frame_type: FrameType },
    #[error("{frame_type} frame carries {n} sequence descriptors")]
    SeqsOnControl { frame_type: FrameType, n: usize },
    #[error("{frame_type} frame of width {got}, expected {expected}")]
    WidthMismatch {
        frame_type: FrameType,
        got: u64,
        expected: u64,
    },
    #[error("{frame_type} payload of {got} bytes, expected {expected}")]
    PayloadSize {
        frame_type: FrameType,
        got: u64,
        expected: u64,
    },
    #[error("control payload of {got} bytes exceeds the limit of {max}")]
    ControlTooLarge { got: usize, max: usize },
    #[error("sequence {index}: invalid output mode {value}")]
    BadOutput { index: usize, value: u8 },
    #[error("sequence {index}: non-zero padding")]
    BadPadding { index: usize },
    #[error("frame flags {0:#04x} are not defined for this frame")]
    BadFlags(u8),
    #[error("sequence {index}: no tokens")]
    EmptySeq { index: usize },
    #[error("sequence {index}: slot {slot} out of range (the stage has {n_slots} slots)")]
    BadSlot {
        index: usize,
        slot: u32,
        n_slots: usize,
    },
    #[error("sequence {index}: positions {pos0}..{end} exceed the context of {n_ctx}")]
    PastContext {
        index: usize,
        pos0: u32,
        end: u64,
        n_ctx: usize,
    },
    #[error("slot {0} appears twice in one frame")]
    DuplicateSlot(u32),
    #[error("{n} tokens in one frame, at most {max} allowed")]
    TooManyTokens { n: u64, max: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: i32, n_vocab: usize },
    #[error("expected a {expected} frame, got {got}")]
    WrongFrameType {
        expected: &'static str,
        got: FrameType,
    },
    #[error("{what} of {value} exceeds the frame format's maximum of {max}")]
    TooLarge {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{got} activation values for {rows} rows of width {width}")]
    ActivationShape {
        got: usize,
        rows: usize,
        width: usize,
    },
    #[error("head part, output row {row}: {why}")]
    BadHeadPart { row: usize, why: String },
    #[error("the frame counter of this sender is exhausted")]
    CounterExhausted,
    #[error("control payload: {0}")]
    Json(#[from] serde_json::Error),
}

impl FrameError {
    /// The metrics bucket of an error returned by [`Opener::open`].
    pub fn reason(&self) -> DropReason {
        match self {
            FrameError::TooShort { .. }
            | FrameError::BadMagic(_)
            | FrameError::UnsupportedVersion { .. }
            | FrameError::BadFlags(_)
            | FrameError::LengthMismatch { .. } => DropReason::Malformed,
            FrameError::BadMac => DropReason::Forged,
            FrameError::Replayed { .. }
            | FrameError::Reflected(_)
            | FrameError::UnknownSender(_) => DropReason::Replayed,
            _ => DropReason::Invalid,
        }
    }
}

/// The 32-byte MAC key, derived from the shared cluster secret.
#[derive(Clone)]
pub struct FrameKey([u8; 32]);

impl FrameKey {
    /// `blake3::derive_key("exo cluster frame v1", secret)`.
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
}

impl fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FrameKey(..)")
    }
}

/// A fresh random sender id (never 0), for one process lifetime.
pub fn random_sender_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut material = Vec::with_capacity(64);
    // RandomState is keyed from the OS random source once per thread.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x6578_6f00);
    material.extend_from_slice(&h.finish().to_le_bytes());
    let mut urandom = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut urandom).is_ok() {
            material.extend_from_slice(&urandom);
        }
    }
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        material.extend_from_slice(&d.as_nanos().to_le_bytes());
    }
    material.extend_from_slice(&std::process::id().to_le_bytes());
    let hash = blake3::hash(&material);
    let mut id = [0u8; 8];
    id.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(id).max(1)
}

/// The header fields a sender chooses (sender id and counter come from the [`Sealer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    pub frame_type: FrameType,
    pub dtype: Dtype,
    pub step_id: u64,
    /// `n_embd` for activations, 0 otherwise.
    pub width: u16,
}

impl FrameMeta {
    /// A control or token frame: no dtype, width 0.
    pub fn plain(frame_type: FrameType, step_id: u64) -> FrameMeta {
        FrameMeta {
            frame_type,
            dtype: Dtype::None,
            step_id,
            width: 0,
        }
    }
}

/// The header exactly as on the wire, before any field is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawHeader {
    frame_type: u8,
    dtype: u8,
    flags: u8,
    sender_id: u64,
    counter: u64,
    step_id: u64,
    n_seqs: u16,
    width: u16,
}

impl RawHeader {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.frame_type);
        out.push(self.dtype);
        out.push(self.flags);
        out.extend_from_slice(&self.sender_id.to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes());
        out.extend_from_slice(&self.step_id.to_le_bytes());
        out.extend_from_slice(&self.n_seqs.to_le_bytes());
        out.extend_from_slice(&self.width.to_le_bytes());
    }

    /// Parses the fixed header; checks magic, version and flags only.
    fn read(b: &[u8; HEADER_LEN]) -> Result<RawHeader, FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(FrameError::UnsupportedVersion { got: b[4] });
        }
        if b[7] & !KNOWN_FLAGS != 0 {
            return Err(FrameError::BadFlags(b[7]));
        }
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        Ok(RawHeader {
            frame_type: b[5],
            dtype: b[6],
            flags: b[7],
            sender_id: u64_at(8),
            counter: u64_at(16),
            step_id: u64_at(24),
            n_seqs: u16::from_le_bytes([b[32], b[33]]),
            width: u16::from_le_bytes([b[34], b[35]]),
        })
    }
}

/// Writes one descriptor; `slot` must fit in 16 bits (checked by the sealer).
fn write_desc(out: &mut Vec<u8>, s: &SeqDesc) {
    out.extend_from_slice(&s.pos0.to_le_bytes());
    out.extend_from_slice(&s.n_tokens.to_le_bytes());
    out.extend_from_slice(&(s.slot as u16).to_le_bytes());
    out.extend_from_slice(&[output_to_u8(s.output), 0]);
}

fn read_desc(index: usize, b: &[u8; SEQ_DESC_LEN]) -> Result<SeqDesc, FrameError> {
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let output = output_from_u8(b[10]).ok_or(FrameError::BadOutput {
        index,
        value: b[10],
    })?;
    if b[11] != 0 {
        return Err(FrameError::BadPadding { index });
    }
    Ok(SeqDesc {
        pos0: u32_at(0),
        n_tokens: u32_at(4),
        slot: u16::from_le_bytes([b[8], b[9]]) as u32,
        output,
    })
}

/// Appends the MAC of everything in `out` from `start` on.
fn append_mac(key: &FrameKey, out: &mut Vec<u8>, start: usize) {
    let mac = key.mac(&out[start..]);
    out.extend_from_slice(&mac);
}

/// One output row's logits from a stage holding part of the `lm_head`.
pub use crate::engine::PartialLogits as HeadLogits;

/// Marks a [`HeadLogits::Top`] row in the head-part encoding (in place of `first`).
/// Marks a [`HeadLogits::Top`] row: the high bit of its count.
const TOP_ROW: u32 = 1 << 31;

impl HeadLogits {
    /// Encoded as `n: u32, first: u32` then `n` logits (dense) or as
    /// `n | 1 << 31: u32` then `n` pairs of `id: i32, logit: f32` (candidates; a
    /// greedy row is 12 bytes).
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            HeadLogits::Top(c) => {
                out.extend((c.len() as u32 | TOP_ROW).to_le_bytes());
                for &(id, l) in c {
                    out.extend(id.to_le_bytes());
                    out.extend(l.to_le_bytes());
                }
            }
            HeadLogits::Dense { first, logits } => {
                out.extend((logits.len() as u32).to_le_bytes());
                out.extend(first.to_le_bytes());
                out.extend(logits.iter().flat_map(|l| l.to_le_bytes()));
            }
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            HeadLogits::Top(c) => 4 + c.len() * 8,
            HeadLogits::Dense { logits, .. } => 8 + logits.len() * 4,
        }
    }

    /// Parses `rows` encoded rows that must fill `bytes` exactly, every id inside
    /// `n_vocab` and every logit a number (never +inf, never NaN).
    fn decode_all(
        bytes: &[u8],
        rows: usize,
        n_vocab: usize,
    ) -> Result<Vec<HeadLogits>, FrameError> {
        let u32_at = |b: &[u8], at: usize| -> Option<u32> {
            b.get(at..at + 4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        };
        let bad = |row: usize, why: String| FrameError::BadHeadPart { row, why };
        let mut out = Vec::with_capacity(rows);
        let mut at = 0usize;
        for row in 0..rows {
            let Some(head) = u32_at(bytes, at) else {
                return Err(bad(row, "truncated".into()));
            };
            at += 4;
            let top = head & TOP_ROW != 0;
            let n = (head & !TOP_ROW) as usize;
            let first = if top {
                0
            } else {
                let Some(first) = u32_at(bytes, at) else {
                    return Err(bad(row, "truncated".into()));
                };
                at += 4;
                first
            };
            if n == 0 || n > n_vocab {
                return Err(bad(
                    row,
                    format!("{n} logits for a vocabulary of {n_vocab}"),
                ));
            }
            let width = if top { 8 } else { 4 };
            let Some(body) = n.checked_mul(width).and_then(|len| bytes.get(at..at + len)) else {
                return Err(bad(row, "truncated".into()));
            };
            at += body.len();
            let check = |l: f32| -> Result<f32, FrameError> {
                if l.is_nan() || l == f32::INFINITY {
                    Err(bad(row, format!("logit {l}")))
                } else {
                    Ok(l)
                }
            };
            if top {
                let mut c = Vec::with_capacity(n);
                for p in body.chunks_exact(8) {
                    let id = i32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    if id < 0 || id as u64 >= n_vocab as u64 {
                        return Err(FrameError::BadToken { id, n_vocab });
                    }
                    c.push((id, check(f32::from_le_bytes([p[4], p[5], p[6], p[7]]))?));
                }
                out.push(HeadLogits::Top(c));
            } else {
                if first as u64 + n as u64 > n_vocab as u64 {
                    return Err(bad(
                        row,
                        format!(
                            "ids {first}..{} outside the vocabulary of {n_vocab}",
                            first as u64 + n as u64
                        ),
                    ));
                }
                let logits = body
                    .chunks_exact(4)
                    .map(|c| check(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect::<Result<Vec<f32>, _>>()?;
                out.push(HeadLogits::Dense { first, logits });
            }
        }
        if at != bytes.len() {
            return Err(bad(
                rows,
                format!("{} bytes after the last row", bytes.len() - at),
            ));
        }
        Ok(out)
    }
}

/// Seals outgoing frames of one sender: stamps sender id and counter, appends the MAC.
pub struct Sealer {
    key: FrameKey,
    sender_id: u64,
    counter: u64,
    /// Flags of the data frames sealed next ([`Sealer::set_step_flags`]).
    step_flags: u8,
    half: Vec<u16>,
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
            half: Vec::new(),
        }
    }

    /// Flags (e.g. [`FLAG_SOLO`]) that the data frames sealed from now on carry: a
    /// stage sets those of the step it works on. Control frames carry none.
    pub fn set_step_flags(&mut self, flags: u8) {
        self.step_flags = flags & KNOWN_FLAGS;
    }

    /// A sealer with a fresh [`random_sender_id`].
    pub fn with_random_id(key: FrameKey) -> Sealer {
        Sealer::new(key, random_sender_id())
    }

    pub fn sender_id(&self) -> u64 {
        self.sender_id
    }

    /// The counter of the last sealed frame (0 before the first).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Seals one frame. The payload is taken as is: the typed helpers
    /// ([`Sealer::seal_activations`], [`Sealer::seal_tokens`], [`Sealer::seal_control`])
    /// produce payloads that match their descriptors.
    pub fn seal(
        &mut self,
        meta: &FrameMeta,
        seqs: &[SeqDesc],
        payload: &[u8],
    ) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.seal_into(meta, seqs, payload, &mut out)?;
        Ok(out)
    }

    /// As [`Sealer::seal`], into a reused buffer (cleared first).
    pub fn seal_into(
        &mut self,
        meta: &FrameMeta,
        seqs: &[SeqDesc],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        self.seal_with(meta, seqs, payload.len(), out, |o| {
            o.extend_from_slice(payload)
        })
    }

    /// Seals activations (`rows × width` f32 values, rows = the sum of the
    /// sequences' tokens), converted to `dtype` (F16 or F32) on the way.
    pub fn seal_activations(
        &mut self,
        step_id: u64,
        seqs: &[SeqDesc],
        h: &[f32],
        width: usize,
        dtype: Dtype,
    ) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.seal_activations_into(step_id, seqs, h, width, dtype, &mut out)?;
        Ok(out)
    }

    /// As [`Sealer::seal_activations`], into a reused buffer (cleared first).
    pub fn seal_activations_into(
        &mut self,
        step_id: u64,
        seqs: &[SeqDesc],
        h: &[f32],
        width: usize,
        dtype: Dtype,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let rows: usize = seqs.iter().map(|s| s.n_tokens as usize).sum();
        self.seal_floats(
            FrameType::Activations,
            step_id,
            seqs,
            h,
            rows,
            width,
            dtype,
            out,
        )
    }

    /// Seals the normalized final hidden state of every output row of `seqs`
    /// (`width` values each, sent as `dtype`), from a last stage with a split head.
    pub fn seal_normed(
        &mut self,
        step_id: u64,
        seqs: &[SeqDesc],
        normed: &[f32],
        width: usize,
        dtype: Dtype,
    ) -> Result<Vec<u8>, FrameError> {
        let rows = output_rows_of(seqs);
        let mut out = Vec::new();
        self.seal_floats(
            FrameType::Normed,
            step_id,
            seqs,
            normed,
            rows,
            width,
            dtype,
            &mut out,
        )?;
        Ok(out)
    }

    /// Seals a last stage's share of a split output head: its logits for every
    /// output row of `seqs`.
    pub fn seal_head_part(
        &mut self,
        step_id: u64,
        seqs: &[SeqDesc],
        logits: &[HeadLogits],
    ) -> Result<Vec<u8>, FrameError> {
        let rows = output_rows_of(seqs);
        if logits.len() != rows {
            return Err(FrameError::BadHeadPart {
                row: logits.len(),
                why: format!("{} logit rows for {rows} output rows", logits.len()),
            });
        }
        let len = logits.iter().map(HeadLogits::encoded_len).sum();
        let mut out = Vec::new();
        let meta = FrameMeta::plain(FrameType::HeadPart, step_id);
        self.seal_with(&meta, seqs, len, &mut out, |o| {
            for l in logits {
                l.encode(o);
            }
        })?;
        Ok(out)
    }

    /// Seals `rows × width` f32 values converted to `dtype` (F16 falls back to BF16
    /// for values beyond f16's range).
    #[allow(clippy::too_many_arguments)]
    fn seal_floats(
        &mut self,
        frame_type: FrameType,
        step_id: u64,
        seqs: &[SeqDesc],
        h: &[f32],
        rows: usize,
        width: usize,
        dtype: Dtype,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        if dtype == Dtype::None {
            return Err(FrameError::WrongDtype { frame_type, dtype });
        }
        if rows.checked_mul(width) != Some(h.len()) {
            return Err(FrameError::ActivationShape {
                got: h.len(),
                rows,
                width,
            });
        }
        let width16 = u16::try_from(width).map_err(|_| FrameError::TooLarge {
            what: "width",
            value: width as u64,
            max: u16::MAX as u64,
        })?;
        // f16 tops out at 65504: a frame with larger values goes as bf16 (same size).
        let dtype = if dtype == Dtype::F16 && h.iter().any(|v| v.abs() > 65000.0) {
            Dtype::BF16
        } else {
            dtype
        };
        let meta = FrameMeta {
            frame_type,
            dtype,
            step_id,
            width: width16,
        };
        let n_bytes = h.len().saturating_mul(dtype.size());
        match dtype {
            Dtype::BF16 => self.seal_with(&meta, seqs, n_bytes, out, |o| {
                o.extend(h.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()))
            }),
            Dtype::F16 => {
                let mut half = std::mem::take(&mut self.half);
                half.clear();
                half.resize(h.len(), 0);
                ggml_shim::f32_to_f16_bits(h, &mut half);
                let r = self.seal_with(&meta, seqs, n_bytes, out, |o| {
                    o.extend(half.iter().flat_map(|v| v.to_le_bytes()))
                });
                self.half = half;
                r
            }
            _ => self.seal_with(&meta, seqs, n_bytes, out, |o| {
                o.extend(h.iter().flat_map(|v| v.to_le_bytes()))
            }),
        }
    }

    /// Seals token ids, one per output row of `seqs` (little-endian i32).
    pub fn seal_tokens(
        &mut self,
        step_id: u64,
        seqs: &[SeqDesc],
        tokens: &[i32],
    ) -> Result<Vec<u8>, FrameError> {
        let rows = output_rows_of(seqs) as u64;
        if rows != tokens.len() as u64 {
            return Err(FrameError::PayloadSize {
                frame_type: FrameType::Tokens,
                got: tokens.len() as u64 * 4,
                expected: rows * 4,
            });
        }
        let mut out = Vec::new();
        let meta = FrameMeta::plain(FrameType::Tokens, step_id);
        self.seal_with(&meta, seqs, tokens.len() * 4, &mut out, |o| {
            o.extend(tokens.iter().flat_map(|t| t.to_le_bytes()))
        })?;
        Ok(out)
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
        let json = serde_json::to_vec(body)?;
        self.seal(&FrameMeta::plain(frame_type, step_id), &[], &json)
    }

    fn seal_with(
        &mut self,
        meta: &FrameMeta,
        seqs: &[SeqDesc],
        payload_len: usize,
        out: &mut Vec<u8>,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), FrameError> {
        let n_seqs = u16::try_from(seqs.len()).map_err(|_| FrameError::TooLarge {
            what: "sequence count",
            value: seqs.len() as u64,
            max: u16::MAX as u64,
        })?;
        if let Some(s) = seqs.iter().find(|s| s.slot > u16::MAX as u32) {
            return Err(FrameError::TooLarge {
                what: "slot",
                value: s.slot as u64,
                max: u16::MAX as u64,
            });
        }
        let counter = self
            .counter
            .checked_add(1)
            .ok_or(FrameError::CounterExhausted)?;
        let header = RawHeader {
            frame_type: meta.frame_type as u8,
            dtype: meta.dtype as u8,
            flags: if meta.frame_type.is_control() {
                0
            } else {
                self.step_flags
            },
            sender_id: self.sender_id,
            counter,
            step_id: meta.step_id,
            n_seqs,
            width: meta.width,
        };
        out.clear();
        out.reserve(HEADER_LEN + seqs.len() * SEQ_DESC_LEN + payload_len + MAC_LEN);
        header.write(out);
        for s in seqs {
            write_desc(out, s);
        }
        let before = out.len();
        write_payload(out);
        debug_assert_eq!(out.len() - before, payload_len);
        append_mac(&self.key, out, 0);
        self.counter = counter;
        Ok(())
    }
}

/// What a receiver accepts; everything outside is rejected before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sequences per frame.
    pub max_seqs: usize,
    /// Tokens (rows) per frame, summed over its sequences.
    pub max_tokens: usize,
    /// Activation width (`n_embd`).
    pub width: usize,
    /// Context length: `pos0 + n_tokens` must not exceed it.
    pub n_ctx: usize,
    /// Sequence slots of the stage: `slot < n_slots`.
    pub n_slots: usize,
    /// Vocabulary size for token frames; 0 skips the token id check.
    pub n_vocab: usize,
    /// Payload bytes of a control (JSON) frame.
    pub max_control_bytes: usize,
}

impl Limits {
    /// Default bound on a control frame's JSON.
    pub const DEFAULT_MAX_CONTROL_BYTES: usize = 1 << 20;

    /// Before a plan is agreed: control frames only, any batch is rejected.
    pub fn control_only() -> Limits {
        Limits {
            max_seqs: 0,
            max_tokens: 0,
            width: 0,
            n_ctx: 0,
            n_slots: 0,
            n_vocab: 0,
            max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
        }
    }
}

/// Counters of opened and dropped frames (shared with `/metrics`).
#[derive(Debug, Default)]
pub struct OpenerStats {
    pub accepted: AtomicU64,
    pub malformed: AtomicU64,
    pub forged: AtomicU64,
    pub replayed: AtomicU64,
    pub invalid: AtomicU64,
}

/// A point-in-time copy of [`OpenerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub malformed: u64,
    pub forged: u64,
    pub replayed: u64,
    pub invalid: u64,
}

impl StatsSnapshot {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Malformed => self.malformed,
            DropReason::Forged => self.forged,
            DropReason::Replayed => self.replayed,
            DropReason::Invalid => self.invalid,
        }
    }
}

impl OpenerStats {
    fn counter(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::Malformed => &self.malformed,
            DropReason::Forged => &self.forged,
            DropReason::Replayed => &self.replayed,
            DropReason::Invalid => &self.invalid,
        }
    }

    pub fn record_drop(&self, reason: DropReason) {
        self.counter(reason).fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            forged: self.forged.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }
}

/// A verified frame; the payload borrows the received bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<'a> {
    pub frame_type: FrameType,
    pub dtype: Dtype,
    pub sender_id: u64,
    pub counter: u64,
    pub step_id: u64,
    /// [`FLAG_SOLO`] or 0.
    pub flags: u8,
    pub width: u32,
    pub seqs: Vec<SeqDesc>,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// The descriptors as an engine batch.
    pub fn batch(&self) -> Vec<BatchSeq> {
        SeqDesc::to_batch(&self.seqs)
    }

    /// Tokens (rows) of the batch.
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.n_tokens as usize).sum()
    }

    fn expect(&self, want: FrameType) -> Result<(), FrameError> {
        if self.frame_type != want {
            return Err(FrameError::WrongFrameType {
                expected: want.name(),
                got: self.frame_type,
            });
        }
        Ok(())
    }

    /// Decodes an activation payload to f32 (`n_tokens × width` values) into `out`.
    pub fn activations(&self, out: &mut Vec<f32>) -> Result<(), FrameError> {
        self.expect(FrameType::Activations)?;
        self.floats(self.payload, out)
    }

    /// Decodes a normed frame: the normalized hidden state of every output row.
    pub fn normed(&self, out: &mut Vec<f32>) -> Result<(), FrameError> {
        self.expect(FrameType::Normed)?;
        self.floats(self.payload, out)
    }

    /// Decodes a head part: one logits row per output row (checked when the frame
    /// was opened).
    pub fn head_part(&self) -> Result<Vec<HeadLogits>, FrameError> {
        self.expect(FrameType::HeadPart)?;
        let rows = output_rows_of(&self.seqs);
        HeadLogits::decode_all(self.payload, rows, usize::MAX >> 1)
    }

    fn floats(&self, payload: &[u8], out: &mut Vec<f32>) -> Result<(), FrameError> {
        out.clear();
        match self.dtype {
            Dtype::F32 => out.extend(
                payload
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Dtype::BF16 => out.extend(
                payload
                    .chunks_exact(2)
                    .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
            ),
            Dtype::F16 => {
                let half: Vec<u16> = payload
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                out.resize(half.len(), 0.0);
                ggml_shim::f16_bits_to_f32(&half, out);
            }
            Dtype::None => {
                return Err(FrameError::WrongDtype {
                    frame_type: self.frame_type,
                    dtype: self.dtype,
                })
            }
        }
        Ok(())
    }

    /// Decodes a token payload (one id per output row) into `out`.
    pub fn tokens(&self, out: &mut Vec<i32>) -> Result<(), FrameError> {
        self.expect(FrameType::Tokens)?;
        out.clear();
        out.extend(
            self.payload
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }

    /// Parses a control frame's JSON.
    pub fn control<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        if !self.frame_type.is_control() {
            return Err(FrameError::WrongFrameType {
                expected: "control",
                got: self.frame_type,
            });
        }
        Ok(serde_json::from_slice(self.payload)?)
    }
}

/// Verifies incoming frames: structure, MAC, replay, then the receiver's limits.
pub struct Opener {
    key: FrameKey,
    last_counter: HashMap<u64, u64>,
    local_sender: Option<u64>,
    allowed: Option<HashSet<u64>>,
    stats: Arc<OpenerStats>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("senders", &self.last_counter.len())
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

impl Opener {
    pub fn new(key: FrameKey) -> Opener {
        Opener {
            key,
            last_counter: HashMap::new(),
            local_sender: None,
            allowed: None,
            stats: Arc::new(OpenerStats::default()),
        }
    }

    /// Counts into shared statistics (kept across openers, e.g. for /metrics).
    pub fn with_stats(mut self, stats: Arc<OpenerStats>) -> Opener {
        self.stats = stats;
        self
    }

    /// Rejects frames carrying this node's own sender id (a frame of ours reflected
    /// back at us would otherwise look like a fresh sender).
    pub fn with_local_sender(mut self, sender_id: u64) -> Opener {
        self.local_sender = Some(sender_id);
        self
    }

    /// The counters, to share with `/metrics`.
    pub fn stats(&self) -> &Arc<OpenerStats> {
        &self.stats
    }

    /// Accepts frames only from allowed senders from now on (the first call turns
    /// the allowlist on). Without it any key holder's new sender id starts fresh,
    /// so a frame recorded from an earlier session, or sent by a node to another
    /// node, would be accepted by an opener that never saw that sender; allowing
    /// just the senders of the current session (learnt in the handshake) closes that.
    pub fn allow_sender(&mut self, sender_id: u64) {
        self.allowed
            .get_or_insert_with(HashSet::new)
            .insert(sender_id);
    }

    /// Forgets a sender: its counter and its place in the allowlist.
    pub fn forget_sender(&mut self, sender_id: u64) {
        self.last_counter.remove(&sender_id);
        if let Some(a) = self.allowed.as_mut() {
            a.remove(&sender_id);
        }
    }

    /// The last accepted counter of a sender.
    pub fn last_counter(&self, sender_id: u64) -> Option<u64> {
        self.last_counter.get(&sender_id).copied()
    }

    /// Verifies one frame. Checks, in order: minimum length, magic, version,
    /// declared lengths against the actual length, MAC, replay, then `limits`.
    /// Every rejection is counted in [`Opener::stats`].
    pub fn open<'a>(&mut self, bytes: &'a [u8], limits: &Limits) -> Result<Frame<'a>, FrameError> {
        match self.open_inner(bytes, limits) {
            Ok(f) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(f)
            }
            Err(e) => {
                self.stats.record_drop(e.reason());
                Err(e)
            }
        }
    }

    fn open_inner<'a>(
        &mut self,
        bytes: &'a [u8],
        limits: &Limits,
    ) -> Result<Frame<'a>, FrameError> {
        // 1. structure
        let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::TooShort {
                len: bytes.len(),
                min: MIN_FRAME_LEN,
            });
        };
        if bytes.len() < MIN_FRAME_LEN {
            return Err(FrameError::TooShort {
                len: bytes.len(),
                min: MIN_FRAME_LEN,
            });
        }
        let h = RawHeader::read(head)?;
        let needed = (HEADER_LEN + h.n_seqs as usize * SEQ_DESC_LEN + MAC_LEN) as u64;
        if needed > bytes.len() as u64 {
            return Err(FrameError::LengthMismatch {
                needed,
                actual: bytes.len(),
                n_seqs: h.n_seqs,
            });
        }
        // Lengths add up, so these splits are in bounds.
        let body_len = bytes.len() - MAC_LEN;
        let (body, mac) = bytes.split_at(body_len);

        // 2. authenticity (constant-time comparison)
        if !constant_time_eq::constant_time_eq(&self.key.mac(body), mac) {
            return Err(FrameError::BadMac);
        }

        // 3. replay
        if self.local_sender == Some(h.sender_id) {
            return Err(FrameError::Reflected(h.sender_id));
        }
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&h.sender_id) {
                return Err(FrameError::UnknownSender(h.sender_id));
            }
        }
        let last = self.last_counter.get(&h.sender_id).copied().unwrap_or(0);
        if h.counter <= last {
            return Err(FrameError::Replayed {
                sender: h.sender_id,
                counter: h.counter,
                last,
            });
        }
        self.last_counter.insert(h.sender_id, h.counter);

        // 4. semantics
        let frame_type =
            FrameType::from_u8(h.frame_type).ok_or(FrameError::UnknownFrameType(h.frame_type))?;
        let dtype = Dtype::from_u8(h.dtype).ok_or(FrameError::UnknownDtype(h.dtype))?;
        let n_seqs = h.n_seqs as usize;
        let desc_end = HEADER_LEN + n_seqs * SEQ_DESC_LEN;
        let descs = &body[HEADER_LEN..desc_end];
        let payload = &body[desc_end..];

        if frame_type.is_control() {
            if h.flags != 0 {
                return Err(FrameError::BadFlags(h.flags));
            }
            if dtype != Dtype::None {
                return Err(FrameError::WrongDtype { frame_type, dtype });
            }
            if n_seqs != 0 {
                return Err(FrameError::SeqsOnControl {
                    frame_type,
                    n: n_seqs,
                });
            }
            if h.width != 0 {
                return Err(FrameError::WidthMismatch {
                    frame_type,
                    got: h.width as u64,
                    expected: 0,
                });
            }
            if payload.len() > limits.max_control_bytes {
                return Err(FrameError::ControlTooLarge {
                    got: payload.len(),
                    max: limits.max_control_bytes,
                });
            }
            return Ok(Frame {
                frame_type,
                dtype,
                sender_id: h.sender_id,
                counter: h.counter,
                step_id: h.step_id,
                flags: h.flags,
                width: u32::from(h.width),
                seqs: Vec::new(),
                payload,
            });
        }

        if n_seqs > limits.max_seqs {
            return Err(FrameError::TooManySeqs {
                n: n_seqs,
                max: limits.max_seqs,
            });
        }
        if n_seqs == 0 {
            return Err(FrameError::EmptyBatch { frame_type });
        }
        let (expected_width, elem_size) = match frame_type {
            FrameType::Activations | FrameType::Normed => {
                if dtype == Dtype::None {
                    return Err(FrameError::WrongDtype { frame_type, dtype });
                }
                (limits.width as u64, dtype.size() as u64)
            }
            _ => {
                if dtype != Dtype::None {
                    return Err(FrameError::WrongDtype { frame_type, dtype });
                }
                (0, 4)
            }
        };
        if h.width as u64 != expected_width {
            return Err(FrameError::WidthMismatch {
                frame_type,
                got: h.width as u64,
                expected: expected_width,
            });
        }

        let mut seqs = Vec::with_capacity(n_seqs);
        let mut rows: u64 = 0;
        let mut out_rows: u64 = 0;
        for (index, chunk) in descs.chunks_exact(SEQ_DESC_LEN).enumerate() {
            let Some(raw) = chunk.first_chunk::<SEQ_DESC_LEN>() else {
                return Err(FrameError::BadPadding { index });
            };
            let s = read_desc(index, raw)?;
            if s.n_tokens == 0 {
                return Err(FrameError::EmptySeq { index });
            }
            if s.slot as u64 >= limits.n_slots as u64 {
                return Err(FrameError::BadSlot {
                    index,
                    slot: s.slot,
                    n_slots: limits.n_slots,
                });
            }
            let end = s.pos0 as u64 + s.n_tokens as u64;
            if end > limits.n_ctx as u64 {
                return Err(FrameError::PastContext {
                    index,
                    pos0: s.pos0,
                    end,
                    n_ctx: limits.n_ctx,
                });
            }
            rows += s.n_tokens as u64;
            out_rows += s.output_rows() as u64;
            seqs.push(s);
        }
        if rows > limits.max_tokens as u64 {
            return Err(FrameError::TooManyTokens {
                n: rows,
                max: limits.max_tokens,
            });
        }
        let mut slots: Vec<u32> = seqs.iter().map(|s| s.slot).collect();
        slots.sort_unstable();
        if let Some(w) = slots.windows(2).find(|w| w[0] == w[1]) {
            return Err(FrameError::DuplicateSlot(w[0]));
        }

        let expected_payload = match frame_type {
            FrameType::Activations => rows
                .checked_mul(expected_width)
                .and_then(|v| v.checked_mul(elem_size)),
            FrameType::Normed => out_rows
                .checked_mul(expected_width)
                .and_then(|v| v.checked_mul(elem_size)),
            FrameType::HeadPart => {
                // one logits row per output row, which must parse exactly
                if out_rows == 0 || limits.n_vocab == 0 {
                    return Err(FrameError::BadHeadPart {
                        row: 0,
                        why: "no output rows, or no vocabulary to check ids against".into(),
                    });
                }
                HeadLogits::decode_all(payload, out_rows as usize, limits.n_vocab)?;
                Some(payload.len() as u64)
            }
            _ => out_rows.checked_mul(elem_size),
        };
        if expected_payload != Some(payload.len() as u64) {
            return Err(FrameError::PayloadSize {
                frame_type,
                got: payload.len() as u64,
                expected: expected_payload.unwrap_or(u64::MAX),
            });
        }
        if frame_type == FrameType::Tokens && limits.n_vocab > 0 {
            for c in payload.chunks_exact(4) {
                let id = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if id < 0 || id as u64 >= limits.n_vocab as u64 {
                    return Err(FrameError::BadToken {
                        id,
                        n_vocab: limits.n_vocab,
                    });
                }
            }
        }

        Ok(Frame {
            frame_type,
            dtype,
            sender_id: h.sender_id,
            counter: h.counter,
            step_id: h.step_id,
            flags: h.flags,
            width: u32::from(h.width),
            seqs,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a small seeded generator for the fuzz tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    const SECRET: &[u8] = b"correct horse battery staple";

    fn key() -> FrameKey {
        FrameKey::derive(SECRET)
    }

    fn limits() -> Limits {
        Limits {
            max_seqs: 8,
            max_tokens: 512,
            width: 4,
            n_ctx: 128,
            n_slots: 4,
            n_vocab: 1000,
            max_control_bytes: 4096,
        }
    }

    fn seq(slot: u32, pos0: u32, n_tokens: u32, output: OutputRows) -> SeqDesc {
        SeqDesc {
            slot,
            pos0,
            n_tokens,
            output,
        }
    }

    fn small_activation_frame(sealer: &mut Sealer) -> Vec<u8> {
        let seqs = [seq(1, 3, 2, OutputRows::Last)];
        let h = [0.5f32, -1.0, 2.0, 0.25, 1.5, -0.125, 3.0, 0.0];
        sealer
            .seal_activations(7, &seqs, &h, 4, Dtype::F16)
            .expect("seal")
    }

    /// Seals arbitrary raw header values with a valid MAC, bypassing the typed API.
    fn seal_raw(key: &FrameKey, h: RawHeader, descs: &[[u8; 12]], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        h.write(&mut out);
        for d in descs {
            out.extend_from_slice(d);
        }
        out.extend_from_slice(payload);
        append_mac(key, &mut out, 0);
        out
    }

    #[test]
    fn head_parts_and_normed_states_roundtrip() {
        let mut sealer = Sealer::new(key(), 42);
        let mut opener = Opener::new(key());
        // two sequences, one output row each (a prompt's last chunk and a decode)
        let seqs = [
            seq(0, 0, 5, OutputRows::Last),
            seq(2, 9, 1, OutputRows::Last),
        ];
        let normed = [0.5f32, -1.0, 2.0, 0.25, 1.5, -0.125, 3.0, 0.0];
        for dtype in [Dtype::F32, Dtype::F16] {
            let bytes = sealer
                .seal_normed(5, &seqs, &normed, 4, dtype)
                .expect("seal");
            assert_eq!(
                bytes.len(),
                HEADER_LEN + 2 * SEQ_DESC_LEN + 8 * dtype.size() + MAC_LEN
            );
            let f = opener.open(&bytes, &limits()).expect("open");
            assert_eq!(f.frame_type, FrameType::Normed);
            let mut got = Vec::new();
            f.normed(&mut got).expect("decode");
            assert_eq!(got, normed, "these values are exact in f16 too");
        }
        // one row per output row, not per token
        assert!(sealer
            .seal_normed(5, &seqs, &[0.0; 24], 4, Dtype::F32)
            .is_err());
        let logits = vec![
            HeadLogits::Top(vec![(999, 3.5), (700, -1.0)]),
            HeadLogits::Dense {
                first: 600,
                logits: (0..400).map(|i| i as f32 * 0.5 - 7.0).collect(),
            },
        ];
        let bytes = sealer.seal_head_part(5, &seqs, &logits).expect("seal");
        let f = opener.open(&bytes, &limits()).expect("open");
        assert_eq!(f.frame_type, FrameType::HeadPart);
        assert_eq!(f.head_part().expect("decode"), logits);
        // a row count that does not match the output rows is refused when sealing
        assert!(sealer.seal_head_part(5, &seqs, &logits[..1]).is_err());
        // greedy: one candidate, 12 bytes a row
        let one = [seq(2, 9, 1, OutputRows::Last)];
        let bytes = sealer
            .seal_head_part(6, &one, &[HeadLogits::Top(vec![(5, 1.0)])])
            .expect("seal");
        assert_eq!(bytes.len(), HEADER_LEN + SEQ_DESC_LEN + 12 + MAC_LEN);
    }

    #[test]
    fn bad_head_parts_are_refused() {
        let mut sealer = Sealer::new(key(), 42);
        let seqs = [seq(1, 0, 1, OutputRows::Last)];
        let open = |bytes: &[u8]| Opener::new(key()).open(bytes, &limits()).map(|_| ());
        let cases: Vec<(&str, Vec<HeadLogits>)> = vec![
            (
                "id outside the vocabulary",
                vec![HeadLogits::Top(vec![(1000, 1.0)])],
            ),
            ("negative id", vec![HeadLogits::Top(vec![(-1, 1.0)])]),
            ("NaN logit", vec![HeadLogits::Top(vec![(1, f32::NAN)])]),
            ("empty row", vec![HeadLogits::Top(vec![])]),
            (
                "dense rows past the vocabulary",
                vec![HeadLogits::Dense {
                    first: 990,
                    logits: vec![0.0; 20],
                }],
            ),
        ];
        for (what, logits) in cases {
            let bytes = sealer.seal_head_part(1, &seqs, &logits).expect("seal");
            assert!(open(&bytes).is_err(), "{what} accepted");
        }
        // a truncated or padded logits section, re-sealed with a valid MAC
        let good = [HeadLogits::Top(vec![(3, 1.0), (4, 0.5)])];
        let mut tail = Vec::new();
        good[0].encode(&mut tail);
        for payload in [
            &tail[..tail.len() - 4],
            &[tail.as_slice(), &[0u8; 4]].concat()[..],
        ] {
            let mut d = Vec::new();
            write_desc(&mut d, &seqs[0]);
            let raw = seal_raw(
                &key(),
                RawHeader {
                    frame_type: FrameType::HeadPart as u8,
                    dtype: Dtype::None as u8,
                    flags: 0,
                    sender_id: 9,
                    counter: 1,
                    step_id: 1,
                    n_seqs: 1,
                    width: 0,
                },
                &[d.try_into().expect("12 bytes")],
                payload,
            );
            let err = Opener::new(key()).open(&raw, &limits()).unwrap_err();
            assert!(matches!(err, FrameError::BadHeadPart { .. }), "{err}");
            assert_eq!(err.reason(), DropReason::Invalid);
        }
    }

    /// The aim for the pipeline hop: a token's activations in at most 2·n_embd + 64 bytes.
    #[test]
    fn one_token_of_f16_activations_costs_2_n_embd_plus_64() {
        let mut sealer = Sealer::new(key(), 42);
        let n_embd = 640;
        let seqs = [seq(3, 17, 1, OutputRows::Last)];
        let bytes = sealer
            .seal_activations(1, &seqs, &vec![0.25f32; n_embd], n_embd, Dtype::F16)
            .expect("seal");
        assert_eq!(bytes.len(), 2 * n_embd + 64);
        // slots travel in 16 bits
        let big = [seq(70_000, 0, 1, OutputRows::Last)];
        let err = sealer
            .seal_activations(2, &big, &[0.0f32; 4], 4, Dtype::F16)
            .unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { what: "slot", .. }),
            "{err}"
        );
    }

    #[test]
    fn header_is_36_bytes() {
        let mut out = Vec::new();
        RawHeader {
            frame_type: 1,
            dtype: 0,
            flags: 0,
            sender_id: 1,
            counter: 1,
            step_id: 0,
            n_seqs: 0,
            width: 0,
        }
        .write(&mut out);
        assert_eq!(out.len(), HEADER_LEN);
    }

    #[test]
    fn control_frames_roundtrip() {
        let mut sealer = Sealer::new(key(), 42);
        let mut opener = Opener::new(key());
        for (i, ft) in FrameType::ALL
            .into_iter()
            .filter(|t| t.is_control())
            .enumerate()
        {
            let body = serde_json::json!({"type": ft.name(), "n": i});
            let bytes = sealer.seal_control(ft, 100 + i as u64, &body).unwrap();
            let f = opener.open(&bytes, &Limits::control_only()).unwrap();
            assert_eq!(f.frame_type, ft);
            assert_eq!(f.dtype, Dtype::None);
            assert_eq!(f.sender_id, 42);
            assert_eq!(f.counter, i as u64 + 1);
            assert_eq!(f.step_id, 100 + i as u64);
            assert!(f.seqs.is_empty());
            let back: serde_json::Value = f.control().unwrap();
            assert_eq!(back, body);
        }
        assert_eq!(
            opener.stats().snapshot().accepted,
            FrameType::ALL.iter().filter(|t| t.is_control()).count() as u64
        );
    }

    #[test]
    fn activations_f32_roundtrip_exactly() {
        let mut sealer = Sealer::new(key(), 1);
        let mut opener = Opener::new(key());
        let seqs = [
            seq(0, 0, 3, OutputRows::None),
            seq(2, 10, 1, OutputRows::Last),
        ];
        let h: Vec<f32> = (0..16).map(|i| i as f32 * 0.37 - 2.0).collect();
        let bytes = sealer
            .seal_activations(5, &seqs, &h, 4, Dtype::F32)
            .unwrap();
        let f = opener.open(&bytes, &limits()).unwrap();
        assert_eq!(f.frame_type, FrameType::Activations);
        assert_eq!(f.dtype, Dtype::F32);
        assert_eq!(f.width, 4);
        assert_eq!(f.seqs, seqs);
        assert_eq!(f.n_tokens(), 4);
        let mut out = Vec::new();
        f.activations(&mut out).unwrap();
        assert_eq!(out, h);
        let batch = f.batch();
        assert_eq!(batch[1].slot, 2);
        assert_eq!(batch[1].pos0, 10);
        assert_eq!(batch[1].output, OutputRows::Last);
    }

    #[test]
    fn activations_f16_roundtrip_within_precision() {
        let mut sealer = Sealer::new(key(), 1);
        let mut opener = Opener::new(key());
        let seqs = [seq(3, 0, 8, OutputRows::All)];
        let mut rng = Rng(99);
        let h: Vec<f32> = (0..32)
            .map(|_| (rng.below(20001) as f32 - 10000.0) / 997.0)
            .collect();
        let bytes = sealer
            .seal_activations(9, &seqs, &h, 4, Dtype::F16)
            .unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + SEQ_DESC_LEN + 32 * 2 + MAC_LEN);
        let f = opener.open(&bytes, &limits()).unwrap();
        assert_eq!(f.dtype, Dtype::F16);
        let mut out = Vec::new();
        f.activations(&mut out).unwrap();
        assert_eq!(out.len(), h.len());
        for (a, b) in h.iter().zip(&out) {
            // f16 has an 11-bit significand: relative error ≤ 2^-11.
            assert!(
                (a - b).abs() <= a.abs() * (1.0 / 2048.0) + 1e-7,
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn tokens_roundtrip() {
        let mut sealer = Sealer::new(key(), 1);
        let mut opener = Opener::new(key());
        let seqs = [
            seq(0, 0, 5, OutputRows::Last),
            seq(1, 7, 2, OutputRows::All),
            seq(2, 1, 3, OutputRows::None),
        ];
        let tokens = [17, 999, 0];
        let bytes = sealer.seal_tokens(3, &seqs, &tokens).unwrap();
        let f = opener.open(&bytes, &limits()).unwrap();
        assert_eq!(f.frame_type, FrameType::Tokens);
        let mut out = Vec::new();
        f.tokens(&mut out).unwrap();
        assert_eq!(out, tokens);
        // wrong number of tokens for the output rows
        assert!(sealer.seal_tokens(3, &seqs, &[1, 2]).is_err());
    }

    #[test]
    fn batchseq_conversions() {
        let b = BatchSeq {
            slot: 3,
            pos0: 9,
            n_tokens: 4,
            output: OutputRows::All,
        };
        let s = SeqDesc::try_from(b).unwrap();
        assert_eq!(BatchSeq::from(s), b);
        let big = BatchSeq {
            pos0: usize::MAX,
            ..b
        };
        if usize::BITS > 32 {
            assert!(SeqDesc::try_from(big).is_err());
        }
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let mut sealer = Sealer::new(key(), 5);
        let bytes = small_activation_frame(&mut sealer);
        assert!(Opener::new(key()).open(&bytes, &limits()).is_ok());
        for pos in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[pos] ^= mask;
                let mut opener = Opener::new(key());
                let err = opener
                    .open(&bad, &limits())
                    .expect_err(&format!("flip at {pos} accepted"));
                // Everything but magic, version, flags and the descriptor count
                // (checked before the MAC) fails authentication.
                if pos >= 5 && pos != 7 && !(32..34).contains(&pos) {
                    assert!(matches!(err, FrameError::BadMac), "{pos}: {err}");
                }
            }
        }
    }

    #[test]
    fn other_key_is_forged() {
        let mut mallory = Sealer::new(FrameKey::derive(b"not the secret"), 5);
        let bytes = small_activation_frame(&mut mallory);
        let mut opener = Opener::new(key());
        let err = opener.open(&bytes, &limits()).unwrap_err();
        assert!(matches!(err, FrameError::BadMac));
        assert_eq!(err.reason(), DropReason::Forged);
        assert_eq!(opener.stats().snapshot().forged, 1);
    }

    #[test]
    fn replays_are_rejected_and_counted() {
        let mut sealer = Sealer::new(key(), 77);
        let first = small_activation_frame(&mut sealer);
        let second = small_activation_frame(&mut sealer);
        let mut opener = Opener::new(key());
        opener.open(&first, &limits()).unwrap();
        let err = opener.open(&first, &limits()).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Replayed {
                sender: 77,
                counter: 1,
                last: 1
            }
        ));
        opener.open(&second, &limits()).unwrap();
        // an older frame after a newer one
        assert!(opener.open(&first, &limits()).is_err());
        let s = opener.stats().snapshot();
        assert_eq!(s.replayed, 2);
        assert_eq!(s.accepted, 2);
        assert_eq!(opener.last_counter(77), Some(2));

        // a new sender id starts fresh
        let mut other = Sealer::new(key(), 78);
        opener
            .open(&small_activation_frame(&mut other), &limits())
            .unwrap();

        // our own frames reflected back are rejected
        let mut me = Sealer::new(key(), 500);
        let mut opener = Opener::new(key()).with_local_sender(500);
        let err = opener
            .open(&small_activation_frame(&mut me), &limits())
            .unwrap_err();
        assert!(matches!(err, FrameError::Reflected(500)));
        assert_eq!(err.reason(), DropReason::Replayed);
    }

    #[test]
    fn allowlist_rejects_other_senders() {
        let mut a = Sealer::new(key(), 10);
        let mut b = Sealer::new(key(), 11);
        let mut opener = Opener::new(key());
        opener.allow_sender(10);
        opener
            .open(&small_activation_frame(&mut a), &limits())
            .unwrap();
        let err = opener
            .open(&small_activation_frame(&mut b), &limits())
            .unwrap_err();
        assert!(matches!(err, FrameError::UnknownSender(11)));
        opener.forget_sender(10);
        assert!(opener
            .open(&small_activation_frame(&mut a), &limits())
            .is_err());
        assert_eq!(opener.stats().snapshot().replayed, 2);
    }

    #[test]
    fn truncations_are_rejected() {
        let mut sealer = Sealer::new(key(), 5);
        let bytes = small_activation_frame(&mut sealer);
        let mut opener = Opener::new(key());
        for len in 0..bytes.len() {
            assert!(opener.open(&bytes[..len], &limits()).is_err(), "{len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(opener.open(&longer, &limits()).is_err());
        // Too short for the header and descriptors: malformed. Longer: the payload
        // is what remains, so the MAC no longer verifies.
        let s = opener.stats().snapshot();
        assert_eq!(s.malformed, (HEADER_LEN + SEQ_DESC_LEN + MAC_LEN) as u64);
        assert_eq!(s.malformed + s.forged, bytes.len() as u64 + 1);
        assert_eq!(s.accepted, 0);
        assert!(opener.open(&bytes, &limits()).is_ok());
    }

    #[test]
    fn oversize_declared_lengths_are_rejected() {
        let k = key();
        let mut opener = Opener::new(k.clone());
        // 64 bytes after the header: room for at most 4 descriptors and the MAC
        for n_seqs in [u16::MAX, 1000, 5, 6] {
            let mut bytes = Vec::new();
            RawHeader {
                frame_type: FrameType::Activations as u8,
                dtype: 2,
                flags: 0,
                sender_id: 1,
                counter: 1,
                step_id: 0,
                n_seqs,
                width: 4,
            }
            .write(&mut bytes);
            bytes.extend_from_slice(&[0u8; 64]);
            let err = opener.open(&bytes, &limits()).unwrap_err();
            assert!(matches!(err, FrameError::LengthMismatch { .. }), "{err}");
        }
        assert_eq!(opener.stats().snapshot().malformed, 4);
    }

    #[test]
    fn bad_magic_and_version() {
        let mut sealer = Sealer::new(key(), 5);
        let mut bytes = small_activation_frame(&mut sealer);
        bytes[0] = b'X';
        assert!(matches!(
            Opener::new(key()).open(&bytes, &limits()),
            Err(FrameError::BadMagic(_))
        ));
        let mut bytes = small_activation_frame(&mut sealer);
        bytes[4] = 1;
        assert!(matches!(
            Opener::new(key()).open(&bytes, &limits()),
            Err(FrameError::UnsupportedVersion { got: 1 })
        ));
        let mut bytes = small_activation_frame(&mut sealer);
        bytes[7] = 4;
        assert!(matches!(
            Opener::new(key()).open(&bytes, &limits()),
            Err(FrameError::BadFlags(4))
        ));
    }

    /// Authentic frames that break the receiver's limits.
    #[test]
    fn semantic_violations_are_rejected() {
        let l = limits();
        let ok_f16 = |n: usize| vec![0u8; n * 4 * 2];
        let cases: Vec<(FrameMeta, Vec<SeqDesc>, Vec<u8>)> = vec![
            // width mismatch
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 8,
                },
                vec![seq(0, 0, 1, OutputRows::Last)],
                vec![0u8; 16],
            ),
            // payload one element short
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 4,
                },
                vec![seq(0, 0, 2, OutputRows::Last)],
                ok_f16(2)[2..].to_vec(),
            ),
            // no tokens
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 4,
                },
                vec![seq(0, 0, 0, OutputRows::Last)],
                vec![],
            ),
            // past the context
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 4,
                },
                vec![seq(0, 127, 2, OutputRows::Last)],
                ok_f16(2),
            ),
            // position overflow is not wrapped
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 4,
                },
                vec![seq(0, u32::MAX, 1, OutputRows::Last)],
                ok_f16(1),
            ),
            // slot out of range
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 4,
                },
                vec![seq(4, 0, 1, OutputRows::Last)],
                ok_f16(1),
            ),
            // duplicate slot
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 4,
                },
                vec![
                    seq(1, 0, 1, OutputRows::Last),
                    seq(1, 5, 1, OutputRows::Last),
                ],
                ok_f16(2),
            ),
            // too many sequences
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 4,
                },
                (0..9).map(|i| seq(i, 0, 1, OutputRows::None)).collect(),
                ok_f16(9),
            ),
            // activations without a dtype
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::None,
                    step_id: 0,
                    width: 4,
                },
                vec![seq(0, 0, 1, OutputRows::Last)],
                vec![],
            ),
            // empty batch
            (
                FrameMeta {
                    frame_type: FrameType::Activations,
                    dtype: Dtype::F32,
                    step_id: 0,
                    width: 4,
                },
                vec![],
                vec![],
            ),
            // tokens: payload not one id per output row
            (
                FrameMeta::plain(FrameType::Tokens, 0),
                vec![seq(0, 0, 3, OutputRows::All)],
                vec![0u8; 4],
            ),
            // tokens outside the vocabulary
            (
                FrameMeta::plain(FrameType::Tokens, 0),
                vec![seq(0, 0, 3, OutputRows::Last)],
                1000i32.to_le_bytes().to_vec(),
            ),
            (
                FrameMeta::plain(FrameType::Tokens, 0),
                vec![seq(0, 0, 3, OutputRows::Last)],
                (-1i32).to_le_bytes().to_vec(),
            ),
            // control frame with descriptors
            (
                FrameMeta::plain(FrameType::Cancel, 0),
                vec![seq(0, 0, 1, OutputRows::None)],
                b"{}".to_vec(),
            ),
            // control frame too large
            (
                FrameMeta::plain(FrameType::Plan, 0),
                vec![],
                vec![b' '; 4097],
            ),
            // control frame with a dtype
            (
                FrameMeta {
                    frame_type: FrameType::Ping,
                    dtype: Dtype::F16,
                    step_id: 0,
                    width: 0,
                },
                vec![],
                vec![],
            ),
        ];
        let mut sealer = Sealer::new(key(), 9);
        let mut opener = Opener::new(key());
        for (i, (meta, seqs, payload)) in cases.iter().enumerate() {
            let bytes = sealer.seal(meta, seqs, payload).unwrap();
            let err = opener
                .open(&bytes, &l)
                .expect_err(&format!("case {i} accepted"));
            assert_eq!(err.reason(), DropReason::Invalid, "case {i}: {err}");
        }
        let too_many_tokens = Limits { max_tokens: 3, ..l };
        let bytes = sealer
            .seal_activations(
                0,
                &[seq(0, 0, 4, OutputRows::Last)],
                &[0.0; 16],
                4,
                Dtype::F32,
            )
            .unwrap();
        assert!(matches!(
            opener.open(&bytes, &too_many_tokens),
            Err(FrameError::TooManyTokens { n: 4, max: 3 })
        ));
        assert_eq!(opener.stats().snapshot().invalid, cases.len() as u64 + 1);
    }

    #[test]
    fn bad_descriptor_bytes_are_rejected() {
        let k = key();
        let header = |counter| RawHeader {
            frame_type: FrameType::Activations as u8,
            dtype: Dtype::F32 as u8,
            flags: 0,
            sender_id: 3,
            counter,
            step_id: 0,
            n_seqs: 1,
            width: 4,
        };
        let mut desc = [0u8; 12];
        desc[4] = 1; // n_tokens = 1
        desc[10] = 3; // invalid output mode
        let mut opener = Opener::new(k.clone());
        let bytes = seal_raw(&k, header(1), &[desc], &[0u8; 16]);
        assert!(matches!(
            opener.open(&bytes, &limits()),
            Err(FrameError::BadOutput { index: 0, value: 3 })
        ));
        desc[10] = 1;
        desc[11] = 1; // non-zero padding
        let bytes = seal_raw(&k, header(2), &[desc], &[0u8; 16]);
        assert!(matches!(
            opener.open(&bytes, &limits()),
            Err(FrameError::BadPadding { index: 0 })
        ));
        desc[11] = 0;
        let bytes = seal_raw(&k, header(3), &[desc], &[0u8; 16]);
        assert!(opener.open(&bytes, &limits()).is_ok());
        // unknown frame type and dtype
        let mut h = header(4);
        h.frame_type = 0;
        let bytes = seal_raw(&k, h, &[desc], &[0u8; 16]);
        assert!(matches!(
            opener.open(&bytes, &limits()),
            Err(FrameError::UnknownFrameType(0))
        ));
        let mut h = header(5);
        h.dtype = 9;
        let bytes = seal_raw(&k, h, &[desc], &[0u8; 16]);
        assert!(matches!(
            opener.open(&bytes, &limits()),
            Err(FrameError::UnknownDtype(9))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut opener = Opener::new(key());
        for i in 0..4000 {
            let len = rng.below(200) as usize;
            let mut bytes = rng.bytes(len);
            // Half of them get a plausible header so the length checks are reached.
            if i % 2 == 0 && bytes.len() >= HEADER_LEN {
                bytes[..4].copy_from_slice(&MAGIC);
                bytes[4] = VERSION;
                bytes[7] = 0;
            }
            assert!(opener.open(&bytes, &limits()).is_err());
        }
        assert_eq!(opener.stats().snapshot().accepted, 0);
    }

    /// Random headers, descriptors and payloads with a valid MAC: exercises every
    /// semantic check; whatever is accepted must be internally consistent.
    #[test]
    fn random_authentic_frames_never_panic() {
        let k = key();
        let mut rng = Rng(0xfeed_beef_0000_0042);
        let mut opener = Opener::new(k.clone());
        let l = limits();
        let mut accepted = 0;
        for counter in 1..=4000u64 {
            let n_seqs = rng.below(4) as usize;
            let descs: Vec<[u8; 12]> = (0..n_seqs)
                .map(|_| {
                    let mut d = [0u8; 12];
                    d[0..4].copy_from_slice(&(rng.below(140) as u32).to_le_bytes());
                    d[4..8].copy_from_slice(&(rng.below(4) as u32).to_le_bytes());
                    d[8..10].copy_from_slice(&(rng.below(6) as u16).to_le_bytes());
                    d[10] = rng.below(4) as u8;
                    if rng.below(20) == 0 {
                        d[11] = 1;
                    }
                    d
                })
                .collect();
            let payload_len = rng.below(80) as usize;
            let payload = rng.bytes(payload_len);
            let h = RawHeader {
                frame_type: rng.below(13) as u8,
                dtype: rng.below(4) as u8,
                flags: 0,
                sender_id: 1,
                counter,
                step_id: rng.next(),
                n_seqs: n_seqs as u16,
                width: if rng.below(2) == 0 {
                    4
                } else {
                    rng.below(6) as u16
                },
            };
            let bytes = seal_raw(&k, h, &descs, &payload);
            if let Ok(f) = opener.open(&bytes, &l) {
                accepted += 1;
                if !f.frame_type.is_control() {
                    let mut v = Vec::new();
                    let mut t = Vec::new();
                    if f.frame_type == FrameType::Activations {
                        f.activations(&mut v).unwrap();
                        assert_eq!(v.len(), f.n_tokens() * l.width);
                    } else {
                        f.tokens(&mut t).unwrap();
                        let rows: u32 = f.seqs.iter().map(|s| s.output_rows()).sum();
                        assert_eq!(t.len(), rows as usize);
                    }
                    for s in &f.seqs {
                        assert!((s.slot as usize) < l.n_slots);
                        assert!(s.n_tokens >= 1);
                        assert!((s.pos0 + s.n_tokens) as usize <= l.n_ctx);
                    }
                }
            }
        }
        let s = opener.stats().snapshot();
        assert_eq!(s.accepted, accepted);
        assert_eq!(s.accepted + s.invalid, 4000);
        assert!(accepted > 0);
    }

    #[test]
    fn random_sender_ids_differ() {
        let a = random_sender_id();
        let b = random_sender_id();
        assert_ne!(a, 0);
        assert_ne!(a, b);
    }
}
