//! Why a frame is refused: [`FrameError`], and its metrics bucket [`DropReason`].

use super::{Dtype, FrameType, VERSION};
use crate::engine::codec::CodecError;

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

/// Why a frame could not be sealed, opened or decoded.
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
    #[error("{frame_type} frame with dtype {}", .dtype.map_or("none", Dtype::name))]
    WrongDtype {
        frame_type: FrameType,
        dtype: Option<Dtype>,
    },
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
        slot: usize,
        n_slots: usize,
    },
    #[error("sequence {index}: positions {pos0}..{end} exceed the context of {n_ctx}")]
    PastContext {
        index: usize,
        pos0: usize,
        end: u64,
        n_ctx: usize,
    },
    #[error("slot {0} appears twice in one frame")]
    DuplicateSlot(usize),
    #[error("{n} tokens in one frame, at most {max} allowed")]
    TooManyTokens { n: u64, max: usize },
    #[error("{n} output rows in one frame, at most {max} allowed")]
    TooManyOutputRows { n: u64, max: usize },
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
    #[error("token log-probabilities, output row {row}: {why}")]
    BadLogprobs { row: usize, why: String },
    #[error("the frame counter of this sender is exhausted")]
    CounterExhausted,
    #[error("control payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl FrameError {
    /// The metrics bucket of an error returned by [`super::Opener::open`].
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
