//! The fixed header and the sequence descriptors after it: encoded from and decoded
//! to typed values in one place each (the layout is in the [module docs](super)).
//!
//! Decoding has two steps because the MAC is checked between them: [`RawHeader`]
//! checks only what must hold before the MAC can be found (magic, version, flags,
//! the descriptor count), [`Header`] interprets the codes once the frame is known
//! to be authentic.

use super::bytes::Reader;
use super::{
    Dtype, FrameError, FrameType, HEADER_LEN, KNOWN_FLAGS, MAGIC, MIN_FRAME_LEN, SEQ_DESC_LEN,
    VERSION,
};
use crate::engine::{BatchSeq, OutputRows};

/// The fixed header, its frame type and dtype as `T` and `D`: the codes as
/// received ([`RawHeader`]) or interpreted ([`Header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HeaderOf<T, D> {
    pub(super) frame_type: T,
    pub(super) dtype: D,
    pub(super) flags: u8,
    pub(super) sender_id: u64,
    pub(super) counter: u64,
    pub(super) step_id: u64,
    pub(super) n_seqs: u16,
    /// `n_embd` for activations, 0 otherwise.
    pub(super) width: u16,
}

/// The header exactly as on the wire, before any code is interpreted.
pub(super) type RawHeader = HeaderOf<u8, u8>;

/// The header with its codes interpreted (dtype None on frames without activations).
pub(super) type Header = HeaderOf<FrameType, Option<Dtype>>;

impl<T, D> HeaderOf<T, D> {
    /// The same header with other frame type and dtype fields.
    fn with_codes<T2, D2>(&self, frame_type: T2, dtype: D2) -> HeaderOf<T2, D2> {
        HeaderOf {
            frame_type,
            dtype,
            flags: self.flags,
            sender_id: self.sender_id,
            counter: self.counter,
            step_id: self.step_id,
            n_seqs: self.n_seqs,
            width: self.width,
        }
    }
}

impl RawHeader {
    /// Appends the [`HEADER_LEN`] header bytes, magic and version first.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
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
    pub(super) fn decode(bytes: &[u8; HEADER_LEN]) -> Result<RawHeader, FrameError> {
        // (never short: the reads add up to HEADER_LEN)
        let short = || FrameError::TooShort {
            len: bytes.len(),
            min: MIN_FRAME_LEN,
        };
        let mut r = Reader::new(bytes);
        let (Some(magic), Some(version), Some(frame_type), Some(dtype), Some(flags)) =
            (r.array::<4>(), r.u8(), r.u8(), r.u8(), r.u8())
        else {
            return Err(short());
        };
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion { got: version });
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::BadFlags(flags));
        }
        let (Some(sender_id), Some(counter), Some(step_id), Some(n_seqs), Some(width)) =
            (r.u64(), r.u64(), r.u64(), r.u16(), r.u16())
        else {
            return Err(short());
        };
        Ok(RawHeader {
            frame_type,
            dtype,
            flags,
            sender_id,
            counter,
            step_id,
            n_seqs,
            width,
        })
    }
}

impl Header {
    pub(super) fn to_raw(self) -> RawHeader {
        self.with_codes(self.frame_type as u8, dtype_code(self.dtype))
    }

    /// Interprets an authentic header's frame type and dtype.
    pub(super) fn from_raw(h: &RawHeader) -> Result<Header, FrameError> {
        let frame_type =
            FrameType::from_u8(h.frame_type).ok_or(FrameError::UnknownFrameType(h.frame_type))?;
        Ok(h.with_codes(frame_type, dtype_from_code(h.dtype)?))
    }
}

/// The wire code of an element type (0: none).
fn dtype_code(d: Option<Dtype>) -> u8 {
    match d {
        None => 0,
        Some(Dtype::F32) => 1,
        Some(Dtype::F16) => 2,
        Some(Dtype::BF16) => 3,
    }
}

fn dtype_from_code(v: u8) -> Result<Option<Dtype>, FrameError> {
    match v {
        0 => Ok(None),
        1 => Ok(Some(Dtype::F32)),
        2 => Ok(Some(Dtype::F16)),
        3 => Ok(Some(Dtype::BF16)),
        _ => Err(FrameError::UnknownDtype(v)),
    }
}

fn output_code(o: OutputRows) -> u8 {
    match o {
        OutputRows::None => 0,
        OutputRows::Last => 1,
        OutputRows::All => 2,
    }
}

fn output_from_code(v: u8) -> Option<OutputRows> {
    match v {
        0 => Some(OutputRows::None),
        1 => Some(OutputRows::Last),
        2 => Some(OutputRows::All),
        _ => None,
    }
}

/// The descriptor count of `seqs`, if every field fits its width on the wire (a
/// `usize` wider than that is an error, never truncated).
pub(super) fn seq_count(seqs: &[BatchSeq]) -> Result<u16, FrameError> {
    let too_large = |what: &'static str, value: usize, max: u64| FrameError::TooLarge {
        what,
        value: value as u64,
        max,
    };
    for s in seqs {
        if s.slot > u16::MAX as usize {
            return Err(too_large("slot", s.slot, u16::MAX as u64));
        }
        for (what, v) in [("pos0", s.pos0), ("n_tokens", s.n_tokens)] {
            if v > u32::MAX as usize {
                return Err(too_large(what, v, u32::MAX as u64));
            }
        }
    }
    u16::try_from(seqs.len()).map_err(|_| too_large("sequence count", seqs.len(), u16::MAX as u64))
}

/// Appends one descriptor; its fields must fit ([`seq_count`] checks them).
pub(super) fn encode_seq(out: &mut Vec<u8>, s: &BatchSeq) {
    out.extend_from_slice(&(s.pos0 as u32).to_le_bytes());
    out.extend_from_slice(&(s.n_tokens as u32).to_le_bytes());
    out.extend_from_slice(&(s.slot as u16).to_le_bytes());
    out.extend_from_slice(&[output_code(s.output), 0]);
}

/// Parses descriptor `index`; checks its output mode and padding only.
pub(super) fn decode_seq(index: usize, b: &[u8; SEQ_DESC_LEN]) -> Result<BatchSeq, FrameError> {
    let mut r = Reader::new(b);
    let (Some(pos0), Some(n_tokens), Some(slot), Some(output), Some(padding)) =
        (r.u32(), r.u32(), r.u16(), r.u8(), r.u8())
    else {
        // (never: the reads add up to SEQ_DESC_LEN)
        return Err(FrameError::BadPadding { index });
    };
    let output = output_from_code(output).ok_or(FrameError::BadOutput {
        index,
        value: output,
    })?;
    if padding != 0 {
        return Err(FrameError::BadPadding { index });
    }
    Ok(BatchSeq {
        slot: usize::from(slot),
        pos0: pos0 as usize,
        n_tokens: n_tokens as usize,
        output,
    })
}
