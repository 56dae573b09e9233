//! What frames carry, typed both ways: a [`Payload`] to seal and the [`Body`] an
//! opened frame's payload decodes to (once, while it is opened). Activations go
//! through the engine's one codec ([`crate::engine::codec`]); token ids and the
//! split `lm_head`'s logits ([`PartialLogits`]) are encoded here.

use super::bytes::Reader;
use super::{picks, Dtype, FrameError, FrameType};
use crate::engine::{codec, BatchSeq, Picked};

/// Activation values to seal: `rows × width` f32 values, sent as `dtype` (F16
/// falls back to BF16 for values beyond f16's range: [`Dtype::fitting`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floats<'a> {
    pub values: &'a [f32],
    pub width: usize,
    pub dtype: Dtype,
}

/// The payload of a data frame to seal; its frame type follows from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Payload<'a> {
    /// A stage's output for the next stage: one row per token of the batch.
    Activations(Floats<'a>),
    /// From a last stage with a split `lm_head`: the normalized final hidden
    /// state of every output row.
    Normed(Floats<'a>),
    /// Sampled token ids, one per output row.
    Tokens(&'a [i32]),
    /// A last stage's share of a split `lm_head`: one logits row per output row.
    LmHeadPart(&'a [PartialLogits]),
    /// Sampled tokens with their log-probabilities, one per output row.
    TokenLogprobs(&'a [Picked]),
}

/// An opened frame's payload, decoded and checked against the receiver's limits.
#[derive(Debug, Clone, PartialEq)]
pub enum Body<'a> {
    /// A control frame's JSON (parsed by [`super::Frame::control`]).
    Control(&'a [u8]),
    /// `n_tokens × width` values; decoded by [`super::Frame::activations`].
    Activations { dtype: Dtype, bytes: &'a [u8] },
    /// `output rows × width` values; decoded by [`super::Frame::normed`].
    Normed { dtype: Dtype, bytes: &'a [u8] },
    /// One token id per output row, each inside the vocabulary.
    Tokens(Vec<i32>),
    /// One logits row per output row.
    LmHeadPart(Vec<PartialLogits>),
    /// One sampled token (with log-probabilities, when asked) per output row.
    TokenLogprobs(Vec<Picked>),
    /// A chunk of a model file ([`FrameType::SliceChunk`]) and its BLAKE3 hash.
    Chunk(&'a [u8], [u8; 32]),
}

/// How a payload goes on the wire: the header fields it sets and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) frame_type: FrameType,
    pub(super) dtype: Option<Dtype>,
    pub(super) width: u16,
    pub(super) len: usize,
}

impl<'a> Payload<'a> {
    /// Activations of every token of the batch.
    pub fn activations(values: &'a [f32], width: usize, dtype: Dtype) -> Payload<'a> {
        Payload::Activations(Floats {
            values,
            width,
            dtype,
        })
    }

    /// The normalized state of every output row of the batch.
    pub fn normed(values: &'a [f32], width: usize, dtype: Dtype) -> Payload<'a> {
        Payload::Normed(Floats {
            values,
            width,
            dtype,
        })
    }

    pub fn frame_type(&self) -> FrameType {
        match self {
            Payload::Activations(_) => FrameType::Activations,
            Payload::Normed(_) => FrameType::Normed,
            Payload::Tokens(_) => FrameType::Tokens,
            Payload::LmHeadPart(_) => FrameType::LmHeadPart,
            Payload::TokenLogprobs(_) => FrameType::TokenLogprobs,
        }
    }

    /// Checks the payload's shape against the batch `seqs` and fixes its layout.
    pub(super) fn layout(&self, seqs: &[BatchSeq]) -> Result<Layout, FrameError> {
        let frame_type = self.frame_type();
        let plain = |len| Layout {
            frame_type,
            dtype: None,
            width: 0,
            len,
        };
        let out_rows = BatchSeq::output_rows_of(seqs);
        match *self {
            Payload::Activations(f) => f.layout(frame_type, seqs.iter().map(|s| s.n_tokens).sum()),
            Payload::Normed(f) => f.layout(frame_type, out_rows),
            Payload::Tokens(tokens) if tokens.len() == out_rows => Ok(plain(tokens.len() * 4)),
            Payload::Tokens(tokens) => Err(FrameError::PayloadSize {
                frame_type,
                got: tokens.len() as u64 * 4,
                expected: out_rows as u64 * 4,
            }),
            Payload::LmHeadPart(logits) if logits.len() == out_rows => {
                Ok(plain(logits.iter().map(PartialLogits::encoded_len).sum()))
            }
            Payload::LmHeadPart(logits) => Err(FrameError::BadHeadPart {
                row: logits.len(),
                why: format!("{} logit rows for {out_rows} output rows", logits.len()),
            }),
            Payload::TokenLogprobs(p) if p.len() == out_rows => Ok(plain(picks::encoded_len(p))),
            Payload::TokenLogprobs(p) => Err(FrameError::BadLogprobs {
                row: p.len(),
                why: format!("{} rows for {out_rows} output rows", p.len()),
            }),
        }
    }

    /// Appends the payload as laid out by [`Payload::layout`].
    pub(super) fn encode(&self, layout: &Layout, out: &mut Vec<u8>) {
        match (self, layout.dtype) {
            (Payload::Activations(f) | Payload::Normed(f), Some(dtype)) => {
                codec::encode(f.values, dtype, out)
            }
            (Payload::Tokens(tokens), _) => out.extend(tokens.iter().flat_map(|t| t.to_le_bytes())),
            (Payload::LmHeadPart(logits), _) => {
                for l in logits.iter() {
                    l.encode(out);
                }
            }
            (Payload::TokenLogprobs(p), _) => picks::encode(p, out),
            (Payload::Activations(_) | Payload::Normed(_), None) => {
                debug_assert!(false, "activations are laid out with a dtype")
            }
        }
    }
}

impl Floats<'_> {
    fn layout(&self, frame_type: FrameType, rows: usize) -> Result<Layout, FrameError> {
        let width = self.width;
        if rows.checked_mul(width) != Some(self.values.len()) {
            return Err(FrameError::ActivationShape {
                got: self.values.len(),
                rows,
                width,
            });
        }
        let width = u16::try_from(width).map_err(|_| FrameError::TooLarge {
            what: "width",
            value: width as u64,
            max: u16::MAX as u64,
        })?;
        let dtype = self.dtype.fitting(self.values);
        Ok(Layout {
            frame_type,
            dtype: Some(dtype),
            width,
            len: self.values.len().saturating_mul(dtype.size()),
        })
    }
}

/// Decodes and checks an authentic data frame's payload: `rows` tokens and
/// `out_rows` output rows of `width` (ids checked against `n_vocab`; 0 skips the
/// check of token ids). The header's dtype and width are already checked.
pub(super) fn decode_data(
    frame_type: FrameType,
    dtype: Option<Dtype>,
    width: u64,
    (rows, out_rows): (u64, u64),
    payload: &[u8],
    n_vocab: usize,
) -> Result<Body<'_>, FrameError> {
    let size_error = |expected: Option<u64>| FrameError::PayloadSize {
        frame_type,
        got: payload.len() as u64,
        expected: expected.unwrap_or(u64::MAX),
    };
    match (frame_type, dtype) {
        (FrameType::Activations | FrameType::Normed, Some(dtype)) => {
            let rows = if frame_type == FrameType::Activations {
                rows
            } else {
                out_rows
            };
            let expected = rows
                .checked_mul(width)
                .and_then(|v| v.checked_mul(dtype.size() as u64));
            if expected != Some(payload.len() as u64) {
                return Err(size_error(expected));
            }
            Ok(if frame_type == FrameType::Activations {
                Body::Activations {
                    dtype,
                    bytes: payload,
                }
            } else {
                Body::Normed {
                    dtype,
                    bytes: payload,
                }
            })
        }
        (FrameType::Tokens, None) => {
            let expected = out_rows.checked_mul(4);
            if expected != Some(payload.len() as u64) {
                return Err(size_error(expected));
            }
            Ok(Body::Tokens(decode_tokens(payload, n_vocab)?))
        }
        (FrameType::LmHeadPart, None) => {
            // one logits row per output row, which must parse exactly
            if out_rows == 0 || n_vocab == 0 {
                return Err(FrameError::BadHeadPart {
                    row: 0,
                    why: "no output rows, or no vocabulary to check ids against".into(),
                });
            }
            let rows = PartialLogits::decode_all(payload, out_rows as usize, n_vocab)?;
            Ok(Body::LmHeadPart(rows))
        }
        (FrameType::TokenLogprobs, None) => {
            if out_rows == 0 || n_vocab == 0 {
                return Err(FrameError::BadLogprobs {
                    row: 0,
                    why: "no output rows, or no vocabulary to check ids against".into(),
                });
            }
            Ok(Body::TokenLogprobs(picks::decode(
                payload,
                out_rows as usize,
                n_vocab,
            )?))
        }
        _ => Err(FrameError::WrongDtype { frame_type, dtype }),
    }
}

/// Little-endian i32 ids, each inside `n_vocab` (unless it is 0).
fn decode_tokens(payload: &[u8], n_vocab: usize) -> Result<Vec<i32>, FrameError> {
    let mut r = Reader::new(payload);
    let mut tokens = Vec::with_capacity(payload.len() / 4);
    while let Some(id) = r.i32() {
        if n_vocab > 0 && (id < 0 || id as u64 >= n_vocab as u64) {
            return Err(FrameError::BadToken { id, n_vocab });
        }
        tokens.push(id);
    }
    Ok(tokens)
}

/// One output row's logits from a stage holding part of the `lm_head` (the
/// engine's type; its encoding is here).
pub use crate::engine::PartialLogits;

/// Marks a [`PartialLogits::Top`] row: the high bit of its count.
const TOP_ROW: u32 = 1 << 31;

impl PartialLogits {
    /// Encoded as `n: u32, first: u32` then `n` logits (dense) or as
    /// `n | 1 << 31: u32` then `n` pairs of `id: i32, logit: f32` (candidates; a
    /// greedy row is 12 bytes).
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            PartialLogits::Top(c) => {
                out.extend((c.len() as u32 | TOP_ROW).to_le_bytes());
                for &(id, l) in c {
                    out.extend(id.to_le_bytes());
                    out.extend(l.to_le_bytes());
                }
            }
            PartialLogits::Dense { first, logits } => {
                out.extend((logits.len() as u32).to_le_bytes());
                out.extend(first.to_le_bytes());
                out.extend(logits.iter().flat_map(|l| l.to_le_bytes()));
            }
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            PartialLogits::Top(c) => 4 + c.len() * 8,
            PartialLogits::Dense { logits, .. } => 8 + logits.len() * 4,
        }
    }

    /// Parses `rows` encoded rows that must fill `bytes` exactly, every id inside
    /// `n_vocab` and every logit a number (never +inf, never NaN).
    fn decode_all(
        bytes: &[u8],
        rows: usize,
        n_vocab: usize,
    ) -> Result<Vec<PartialLogits>, FrameError> {
        let mut r = Reader::new(bytes);
        let out = (0..rows)
            .map(|row| PartialLogits::decode_row(&mut r, row, n_vocab))
            .collect::<Result<Vec<_>, _>>()?;
        if r.remaining() != 0 {
            return Err(FrameError::BadHeadPart {
                row: rows,
                why: format!("{} bytes after the last row", r.remaining()),
            });
        }
        Ok(out)
    }

    /// Parses output row `row`.
    fn decode_row(
        r: &mut Reader<'_>,
        row: usize,
        n_vocab: usize,
    ) -> Result<PartialLogits, FrameError> {
        let bad = |why: String| FrameError::BadHeadPart { row, why };
        let truncated = || bad("truncated".into());
        let count = r.u32().ok_or_else(truncated)?;
        let top = count & TOP_ROW != 0;
        let n = (count & !TOP_ROW) as usize;
        let first = if top {
            0
        } else {
            r.u32().ok_or_else(truncated)?
        };
        if n == 0 || n > n_vocab {
            return Err(bad(format!("{n} logits for a vocabulary of {n_vocab}")));
        }
        let pair = if top { 8 } else { 4 };
        let body = n
            .checked_mul(pair)
            .and_then(|len| r.take(len))
            .ok_or_else(truncated)?;
        let mut body = Reader::new(body);
        let check = |l: f32| -> Result<f32, FrameError> {
            if l.is_nan() || l == f32::INFINITY {
                Err(bad(format!("logit {l}")))
            } else {
                Ok(l)
            }
        };
        if top {
            let mut c = Vec::with_capacity(n);
            while let (Some(id), Some(l)) = (body.i32(), body.f32()) {
                if id < 0 || id as u64 >= n_vocab as u64 {
                    return Err(FrameError::BadToken { id, n_vocab });
                }
                c.push((id, check(l)?));
            }
            return Ok(PartialLogits::Top(c));
        }
        let end = first as u64 + n as u64;
        if end > n_vocab as u64 {
            return Err(bad(format!(
                "ids {first}..{end} outside the vocabulary of {n_vocab}"
            )));
        }
        let mut logits = Vec::with_capacity(n);
        while let Some(l) = body.f32() {
            logits.push(check(l)?);
        }
        Ok(PartialLogits::Dense { first, logits })
    }
}
