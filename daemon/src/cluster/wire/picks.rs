//! The payload of a [`FrameType::TokenLogprobs`](super::FrameType) frame: the
//! tokens a last stage sampled with their log-probabilities ([`Picked`]), one row
//! per output row.
//!
//! A row is `token: i32, n: u32`, then, unless `n` is [`NONE`] (a sequence that did
//! not ask), `logprob: f32` and `n` pairs of `id: i32, logprob: f32`.

use super::bytes::Reader;
use super::FrameError;
use crate::engine::sampler::MAX_TOP_LOGPROBS;
use crate::engine::{Picked, TokenLogprobs};

/// `n` of a row without log-probabilities.
const NONE: u32 = u32::MAX;

/// Bytes of `picks` encoded.
pub(super) fn encoded_len(picks: &[Picked]) -> usize {
    picks
        .iter()
        .map(|p| 8 + p.logprobs.as_ref().map_or(0, |l| 4 + 8 * l.top.len()))
        .sum()
}

pub(super) fn encode(picks: &[Picked], out: &mut Vec<u8>) {
    for p in picks {
        out.extend(p.token.to_le_bytes());
        let Some(l) = &p.logprobs else {
            out.extend(NONE.to_le_bytes());
            continue;
        };
        out.extend((l.top.len() as u32).to_le_bytes());
        out.extend(l.logprob.to_le_bytes());
        for &(id, lp) in &l.top {
            out.extend(id.to_le_bytes());
            out.extend(lp.to_le_bytes());
        }
    }
}

/// Parses `rows` rows that must fill `bytes` exactly: ids inside `n_vocab`, at most
/// [`MAX_TOP_LOGPROBS`] alternatives, every log-probability at most 0 (never NaN).
pub(super) fn decode(bytes: &[u8], rows: usize, n_vocab: usize) -> Result<Vec<Picked>, FrameError> {
    let mut r = Reader::new(bytes);
    let mut out = Vec::with_capacity(rows.min(bytes.len() / 8));
    for row in 0..rows {
        let bad = |why: String| FrameError::BadLogprobs { row, why };
        let truncated = || bad("truncated".into());
        let id = |id: i32| {
            if id < 0 || id as u64 >= n_vocab as u64 {
                Err(FrameError::BadToken { id, n_vocab })
            } else {
                Ok(id)
            }
        };
        let lp = |l: f32| {
            if l <= 0.0 {
                Ok(l)
            } else {
                Err(bad(format!("log-probability {l}")))
            }
        };
        let token = id(r.i32().ok_or_else(truncated)?)?;
        let n = r.u32().ok_or_else(truncated)?;
        if n == NONE {
            out.push(Picked::token(token));
            continue;
        }
        if n as usize > MAX_TOP_LOGPROBS {
            return Err(bad(format!("{n} alternatives, at most {MAX_TOP_LOGPROBS}")));
        }
        let logprob = lp(r.f32().ok_or_else(truncated)?)?;
        let mut top = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (i, l) = (r.i32(), r.f32());
            let (Some(i), Some(l)) = (i, l) else {
                return Err(truncated());
            };
            top.push((id(i)?, lp(l)?));
        }
        out.push(Picked {
            token,
            logprobs: Some(TokenLogprobs { logprob, top }),
        });
    }
    if r.remaining() != 0 {
        return Err(FrameError::BadLogprobs {
            row: rows,
            why: format!("{} bytes after the last row", r.remaining()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{FrameKey, FrameType, Limits, Opener, Payload, Sealer};
    use super::*;
    use crate::engine::{BatchSeq, OutputRows};

    const N_VOCAB: usize = 1000;

    fn picks() -> Vec<Picked> {
        vec![
            Picked {
                token: 17,
                logprobs: Some(TokenLogprobs {
                    logprob: -0.25,
                    top: vec![(17, -0.25), (3, -1.5), (999, f32::NEG_INFINITY)],
                }),
            },
            Picked::token(5),
            Picked {
                token: 0,
                logprobs: Some(TokenLogprobs {
                    logprob: 0.0,
                    top: vec![],
                }),
            },
        ]
    }

    #[test]
    fn token_logprobs_frames_roundtrip() {
        let key = FrameKey::derive(b"a secret for the picks test");
        let (mut sealer, mut opener) = (Sealer::new(key.clone(), 1), Opener::new(key));
        let seqs = [
            BatchSeq {
                slot: 0,
                pos0: 0,
                n_tokens: 5,
                output: OutputRows::Last,
            },
            BatchSeq {
                slot: 1,
                pos0: 7,
                n_tokens: 2,
                output: OutputRows::All,
            },
        ];
        let limits = Limits {
            max_seqs: 8,
            max_tokens: 512,
            max_output_rows: 512,
            width: 4,
            n_ctx: 128,
            n_slots: 4,
            n_vocab: N_VOCAB,
            max_control_bytes: 4096,
        };
        let p = picks();
        let bytes = sealer
            .seal(3, &seqs, Payload::TokenLogprobs(&p))
            .expect("seal");
        let f = opener.open(&bytes, &limits).expect("open");
        assert_eq!(f.frame_type, FrameType::TokenLogprobs);
        assert_eq!(f.picks().expect("picks"), p);
        assert!(sealer
            .seal(4, &seqs, Payload::TokenLogprobs(&p[..2]))
            .is_err());
        // a tokens frame reads as picks without log-probabilities
        let bytes = sealer
            .seal(5, &seqs, Payload::Tokens(&[1, 2, 3]))
            .expect("seal");
        let f = opener.open(&bytes, &limits).expect("open");
        assert_eq!(
            f.picks().expect("picks"),
            vec![Picked::token(1), Picked::token(2), Picked::token(3)]
        );
    }

    #[test]
    fn bad_rows_are_refused() {
        let p = picks();
        let mut good = Vec::new();
        encode(&p, &mut good);
        assert_eq!(good.len(), encoded_len(&p));
        assert_eq!(decode(&good, 3, N_VOCAB).expect("decode"), p);
        assert!(decode(&good, 2, N_VOCAB).is_err(), "bytes left over");
        assert!(decode(&good, 4, N_VOCAB).is_err(), "a row missing");
        assert!(decode(&good[..good.len() - 1], 3, N_VOCAB).is_err());
        assert!(
            decode(&good, 3, 18).is_err(),
            "id 999 outside the vocabulary"
        );
        let with = |f: &dyn Fn(&mut TokenLogprobs)| {
            let mut p = picks();
            if let Some(l) = p[0].logprobs.as_mut() {
                f(l);
            }
            let mut b = Vec::new();
            encode(&p, &mut b);
            decode(&b, 3, N_VOCAB)
        };
        assert!(with(&|l| l.logprob = f32::NAN).is_err());
        assert!(with(&|l| l.logprob = 0.5).is_err());
        assert!(with(&|l| l.top[1].1 = f32::INFINITY).is_err());
        assert!(with(&|l| l.top[1].0 = -3).is_err());
        assert!(with(&|l| l.top = vec![(1, -1.0); MAX_TOP_LOGPROBS + 1]).is_err());
        assert!(with(&|l| l.top = vec![(1, -1.0); MAX_TOP_LOGPROBS]).is_ok());
    }
}
