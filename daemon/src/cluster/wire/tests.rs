//! The frame tests: round trips, golden bytes, and everything a receiver refuses.

use super::header::{encode_seq, seq_count, RawHeader};
use super::payload::Layout;
use super::*;
use crate::engine::{BatchSeq, OutputRows};

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

/// The header fields of a hand-made frame.
struct FrameMeta {
    frame_type: FrameType,
    dtype: Option<Dtype>,
    step_id: u64,
    width: u16,
}

impl FrameMeta {
    /// An activations frame of step 0.
    fn activations(dtype: Option<Dtype>, width: u16) -> FrameMeta {
        FrameMeta {
            frame_type: FrameType::Activations,
            dtype,
            step_id: 0,
            width,
        }
    }

    /// A control or token frame: no dtype, width 0.
    fn plain(frame_type: FrameType, step_id: u64) -> FrameMeta {
        FrameMeta {
            frame_type,
            dtype: None,
            step_id,
            width: 0,
        }
    }
}

/// Seals `payload` as is under `meta`'s header, whatever it says.
fn seal_meta(sealer: &mut Sealer, meta: &FrameMeta, seqs: &[BatchSeq], payload: &[u8]) -> Vec<u8> {
    let layout = Layout {
        frame_type: meta.frame_type,
        dtype: meta.dtype,
        width: meta.width,
        len: payload.len(),
    };
    sealer
        .seal_bytes(meta.step_id, &layout, seqs, payload)
        .expect("seal")
}

const SECRET: &[u8] = b"correct horse battery staple";

fn key() -> FrameKey {
    FrameKey::derive(SECRET)
}

fn limits() -> Limits {
    Limits {
        max_seqs: 8,
        max_tokens: 512,
        max_output_rows: 512,
        width: 4,
        n_ctx: 128,
        n_slots: 4,
        n_vocab: 1000,
        max_control_bytes: 4096,
    }
}

fn seq(slot: usize, pos0: usize, n_tokens: usize, output: OutputRows) -> BatchSeq {
    BatchSeq {
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
        .seal(7, &seqs, Payload::activations(&h, 4, Dtype::F16))
        .expect("seal")
}

/// Seals arbitrary raw header values with a valid MAC, bypassing the typed API.
fn seal_raw(key: &FrameKey, h: RawHeader, descs: &[[u8; 12]], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    h.encode(&mut out);
    for d in descs {
        out.extend_from_slice(d);
    }
    out.extend_from_slice(payload);
    key.append_mac(&mut out);
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
            .seal(5, &seqs, Payload::normed(&normed, 4, dtype))
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
        .seal(5, &seqs, Payload::normed(&[0.0; 24], 4, Dtype::F32))
        .is_err());
    let logits = vec![
        PartialLogits::Top(vec![(999, 3.5), (700, -1.0)]),
        PartialLogits::Dense {
            first: 600,
            logits: (0..400).map(|i| i as f32 * 0.5 - 7.0).collect(),
        },
    ];
    let bytes = sealer
        .seal(5, &seqs, Payload::LmHeadPart(&logits))
        .expect("seal");
    let f = opener.open(&bytes, &limits()).expect("open");
    assert_eq!(f.frame_type, FrameType::LmHeadPart);
    assert_eq!(f.head_part().expect("decode"), logits);
    // a row count that does not match the output rows is refused when sealing
    assert!(sealer
        .seal(5, &seqs, Payload::LmHeadPart(&logits[..1]))
        .is_err());
    // greedy: one candidate, 12 bytes a row
    let one = [seq(2, 9, 1, OutputRows::Last)];
    let bytes = sealer
        .seal(
            6,
            &one,
            Payload::LmHeadPart(&[PartialLogits::Top(vec![(5, 1.0)])]),
        )
        .expect("seal");
    assert_eq!(bytes.len(), HEADER_LEN + SEQ_DESC_LEN + 12 + MAC_LEN);
}

#[test]
fn bad_head_parts_are_refused() {
    let mut sealer = Sealer::new(key(), 42);
    let seqs = [seq(1, 0, 1, OutputRows::Last)];
    let open = |bytes: &[u8]| Opener::new(key()).open(bytes, &limits()).map(|_| ());
    let cases: Vec<(&str, Vec<PartialLogits>)> = vec![
        (
            "id outside the vocabulary",
            vec![PartialLogits::Top(vec![(1000, 1.0)])],
        ),
        ("negative id", vec![PartialLogits::Top(vec![(-1, 1.0)])]),
        ("NaN logit", vec![PartialLogits::Top(vec![(1, f32::NAN)])]),
        ("empty row", vec![PartialLogits::Top(vec![])]),
        (
            "dense rows past the vocabulary",
            vec![PartialLogits::Dense {
                first: 990,
                logits: vec![0.0; 20],
            }],
        ),
    ];
    for (what, logits) in cases {
        let bytes = sealer
            .seal(1, &seqs, Payload::LmHeadPart(&logits))
            .expect("seal");
        assert!(open(&bytes).is_err(), "{what} accepted");
    }
    // a truncated or padded logits section, re-sealed with a valid MAC
    let good = [PartialLogits::Top(vec![(3, 1.0), (4, 0.5)])];
    let mut tail = Vec::new();
    good[0].encode(&mut tail);
    for payload in [
        &tail[..tail.len() - 4],
        &[tail.as_slice(), &[0u8; 4]].concat()[..],
    ] {
        let mut d = Vec::new();
        encode_seq(&mut d, &seqs[0]);
        let raw = seal_raw(
            &key(),
            RawHeader {
                frame_type: FrameType::LmHeadPart as u8,
                dtype: 0,
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
        .seal(
            1,
            &seqs,
            Payload::activations(&vec![0.25f32; n_embd], n_embd, Dtype::F16),
        )
        .expect("seal");
    assert_eq!(bytes.len(), 2 * n_embd + 64);
    // slots travel in 16 bits
    let big = [seq(70_000, 0, 1, OutputRows::Last)];
    let err = sealer
        .seal(2, &big, Payload::activations(&[0.0f32; 4], 4, Dtype::F16))
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
    .encode(&mut out);
    assert_eq!(out.len(), HEADER_LEN);
}

#[test]
fn control_frames_roundtrip() {
    let mut sealer = Sealer::new(key(), 42);
    let mut opener = Opener::new(key());
    for (i, ft) in FrameType::ALL
        .into_iter()
        .filter(|t| t.is_control() && *t != FrameType::SliceChunk)
        .enumerate()
    {
        let body = serde_json::json!({"type": ft.name(), "n": i});
        let bytes = sealer.seal_control(ft, 100 + i as u64, &body).unwrap();
        let f = opener.open(&bytes, &Limits::control_only()).unwrap();
        assert_eq!(f.frame_type, ft);
        assert_eq!(f.dtype, None);
        assert_eq!(f.sender_id, 42);
        assert_eq!(f.counter, i as u64 + 1);
        assert_eq!(f.step_id, 100 + i as u64);
        assert!(f.seqs.is_empty());
        let back: serde_json::Value = f.control().unwrap();
        assert_eq!(back, body);
    }
    let json_types = FrameType::ALL.iter().filter(|t| t.is_control()).count() - 1;
    assert_eq!(opener.stats().snapshot().accepted, json_types as u64);
    // a slice chunk: raw bytes, its index as the step id, not JSON
    assert!(sealer
        .seal_control(FrameType::SliceChunk, 0, &serde_json::json!({}))
        .is_err());
    let chunk: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let hash = *blake3::hash(&chunk).as_bytes();
    let bytes = sealer.seal_chunk(7, &chunk, &hash).unwrap();
    let f = opener.open(&bytes, &Limits::control_only()).unwrap();
    assert_eq!((f.frame_type, f.step_id), (FrameType::SliceChunk, 7));
    assert_eq!(f.chunk().unwrap(), (&chunk[..], &hash));
    assert!(f.control::<serde_json::Value>().is_err());
    // its MAC covers the payload (through its hash): a changed byte is forged
    let mut changed = sealer.seal_chunk(8, &chunk, &hash).unwrap();
    changed[HEADER_LEN + 100] ^= 1;
    assert!(matches!(
        opener.open(&changed, &Limits::control_only()),
        Err(FrameError::BadMac)
    ));
    // a sender that claims a wrong hash is forged too
    let lying = sealer.seal_chunk(9, &chunk, &[0; 32]).unwrap();
    assert!(matches!(
        opener.open(&lying, &Limits::control_only()),
        Err(FrameError::BadMac)
    ));
    assert!(sealer
        .seal_chunk(1, &vec![0; MAX_CHUNK_FRAME_BYTES + 1], &[0; 32])
        .is_err());
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
        .seal(5, &seqs, Payload::activations(&h, 4, Dtype::F32))
        .unwrap();
    let f = opener.open(&bytes, &limits()).unwrap();
    assert_eq!(f.frame_type, FrameType::Activations);
    assert_eq!(f.dtype, Some(Dtype::F32));
    assert_eq!(f.width, 4);
    assert_eq!(f.seqs, seqs);
    assert_eq!(f.n_tokens(), 4);
    let mut out = Vec::new();
    f.activations(&mut out).unwrap();
    assert_eq!(out, h);
    assert_eq!(f.seqs[1].slot, 2);
    assert_eq!(f.seqs[1].pos0, 10);
    assert_eq!(f.seqs[1].output, OutputRows::Last);
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
        .seal(9, &seqs, Payload::activations(&h, 4, Dtype::F16))
        .unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + SEQ_DESC_LEN + 32 * 2 + MAC_LEN);
    let f = opener.open(&bytes, &limits()).unwrap();
    assert_eq!(f.dtype, Some(Dtype::F16));
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
    let bytes = sealer.seal(3, &seqs, Payload::Tokens(&tokens)).unwrap();
    let f = opener.open(&bytes, &limits()).unwrap();
    assert_eq!(f.frame_type, FrameType::Tokens);
    assert_eq!(f.tokens().unwrap(), tokens);
    // wrong number of tokens for the output rows
    assert!(sealer.seal(3, &seqs, Payload::Tokens(&[1, 2])).is_err());
}

#[test]
fn batch_fields_wider_than_the_wire_are_refused() {
    let b = BatchSeq {
        slot: 3,
        pos0: 9,
        n_tokens: 4,
        output: OutputRows::All,
    };
    assert_eq!(seq_count(&[b]).unwrap(), 1);
    let big = BatchSeq {
        pos0: usize::MAX,
        ..b
    };
    if usize::BITS > 32 {
        assert!(matches!(
            seq_count(&[big]),
            Err(FrameError::TooLarge { what: "pos0", .. })
        ));
        let mut sealer = Sealer::new(key(), 1);
        assert!(sealer.seal(1, &[big], Payload::Tokens(&[0; 4])).is_err());
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

/// Frames sent together may arrive out of order: each is taken once, within the
/// window behind the newest; older ones and repeats are refused.
#[test]
fn counters_out_of_order_within_the_window_are_taken_once() {
    let mut sealer = Sealer::new(key(), 9);
    let frames: Vec<Vec<u8>> = (0..REPLAY_WINDOW + 5)
        .map(|_| small_activation_frame(&mut sealer))
        .collect();
    let mut opener = Opener::new(key());
    let n = frames.len();
    opener.open(&frames[2], &limits()).unwrap();
    opener.open(&frames[0], &limits()).unwrap();
    opener.open(&frames[1], &limits()).unwrap();
    assert!(opener.open(&frames[1], &limits()).is_err(), "a repeat");
    opener.open(&frames[n - 1], &limits()).unwrap();
    // counter 4 is now 65 behind the newest (69): too old, though never seen
    assert!(matches!(
        opener.open(&frames[3], &limits()),
        Err(FrameError::Replayed { counter: 4, .. })
    ));
    opener.open(&frames[n - 2], &limits()).unwrap();
    assert_eq!(opener.last_counter(9), Some(n as u64));
    assert_eq!(opener.stats().snapshot().replayed, 2);
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
        .encode(&mut bytes);
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

/// A frame's header fields, descriptors and payload.
type Case = (FrameMeta, Vec<BatchSeq>, Vec<u8>);

/// Activation frames that break the receiver's limits.
fn activation_violations() -> Vec<Case> {
    let ok_f16 = |n: usize| vec![0u8; n * 4 * 2];
    vec![
        // width mismatch
        (
            FrameMeta::activations(Some(Dtype::F16), 8),
            vec![seq(0, 0, 1, OutputRows::Last)],
            vec![0u8; 16],
        ),
        // payload one element short
        (
            FrameMeta::activations(Some(Dtype::F16), 4),
            vec![seq(0, 0, 2, OutputRows::Last)],
            ok_f16(2)[2..].to_vec(),
        ),
        // no tokens
        (
            FrameMeta::activations(Some(Dtype::F16), 4),
            vec![seq(0, 0, 0, OutputRows::Last)],
            vec![],
        ),
        // past the context
        (
            FrameMeta::activations(Some(Dtype::F16), 4),
            vec![seq(0, 127, 2, OutputRows::Last)],
            ok_f16(2),
        ),
        // position overflow is not wrapped
        (
            FrameMeta::activations(Some(Dtype::F16), 4),
            vec![seq(0, u32::MAX as usize, 1, OutputRows::Last)],
            ok_f16(1),
        ),
        // slot out of range
        (
            FrameMeta::activations(Some(Dtype::F16), 4),
            vec![seq(4, 0, 1, OutputRows::Last)],
            ok_f16(1),
        ),
        // duplicate slot
        (
            FrameMeta::activations(Some(Dtype::F16), 4),
            vec![
                seq(1, 0, 1, OutputRows::Last),
                seq(1, 5, 1, OutputRows::Last),
            ],
            ok_f16(2),
        ),
        // too many sequences
        (
            FrameMeta::activations(Some(Dtype::F16), 4),
            (0..9).map(|i| seq(i, 0, 1, OutputRows::None)).collect(),
            ok_f16(9),
        ),
        // activations without a dtype
        (
            FrameMeta::activations(None, 4),
            vec![seq(0, 0, 1, OutputRows::Last)],
            vec![],
        ),
        // empty batch
        (FrameMeta::activations(Some(Dtype::F32), 4), vec![], vec![]),
    ]
}

/// Token and control frames that break the receiver's limits.
fn token_and_control_violations() -> Vec<Case> {
    vec![
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
                dtype: Some(Dtype::F16),
                step_id: 0,
                width: 0,
            },
            vec![],
            vec![],
        ),
    ]
}

/// Authentic frames that break the receiver's limits.
#[test]
fn semantic_violations_are_rejected() {
    let l = limits();
    let mut cases = activation_violations();
    cases.extend(token_and_control_violations());
    let mut sealer = Sealer::new(key(), 9);
    let mut opener = Opener::new(key());
    for (i, (meta, seqs, payload)) in cases.iter().enumerate() {
        let bytes = seal_meta(&mut sealer, meta, seqs, payload);
        let err = opener
            .open(&bytes, &l)
            .expect_err(&format!("case {i} accepted"));
        assert_eq!(err.reason(), DropReason::Invalid, "case {i}: {err}");
    }
    let too_many_tokens = Limits { max_tokens: 3, ..l };
    let bytes = sealer
        .seal(
            0,
            &[seq(0, 0, 4, OutputRows::Last)],
            Payload::activations(&[0.0; 16], 4, Dtype::F32),
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
        dtype: 1,
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
                if f.frame_type == FrameType::Activations {
                    f.activations(&mut v).unwrap();
                    assert_eq!(v.len(), f.n_tokens() * l.width);
                } else {
                    let t = f.tokens().unwrap();
                    assert_eq!(t.len(), BatchSeq::output_rows_of(&f.seqs));
                }
                for s in &f.seqs {
                    assert!(s.slot < l.n_slots);
                    assert!(s.n_tokens >= 1);
                    assert!(s.pos0 + s.n_tokens <= l.n_ctx);
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

/// Frames sealed by the previous implementation (frame.rs before the split), byte
/// for byte: the layout, the payload encodings and the MAC are unchanged.
#[test]
fn golden_bytes_are_unchanged() {
    const GOLDEN: [&str; 7] = [
        "45584f4602090201efcdab8967452301010000000000000007000000000000000200040003000000020000000100010000000000010000000000020033c2b3c066becdba66ae33399a3d4d40cd414d43664426457db21ed9745020f339b4a2172a80de7e",
        "45584f4602090301efcdab8967452301020000000000000008000000000000000200040003000000020000000100010000000000010000000000020046c016c0cdbf5abfcdbd8947b33f0a403a406a408d40a540666eb35d110873ff54e5dcdcaed69d8e",
        "45584f4602090100efcdab89674523010300000000000000090000000000000002000400030000000200000001000100000000000100000000000200666646c0666616c0ccccccbf989959bfc0ccccbd6866263f3433b33f9a9909409a9939409a996940cdcc8c40cdcca44084dba690487b1130c8452705893785bc",
        "45584f46020e0100efcdab896745230104000000000000000a0000000000000002000400030000000200000001000100000000000100000000000200666646c0666616c0ccccccbf989959bfc0ccccbd6866263f3433b33f9a990940c27a0b317c69327f547057a8137aa9b9",
        "45584f46020a0000efcdab896745230105000000000000000b000000000000000200000003000000020000000100010000000000010000000000020005000000e7030000cd5892ad46891a29a73b4fc40b73fbea",
        "45584f46020d0000efcdab896745230106000000000000000c000000000000000200000003000000020000000100010000000000010000000000020002000080030000000000c03f07000000000080be03000000020000000000003f000080bf00001040f3ff04f191134a6c4acde978a7ea6c0f",
        "45584f4602060000efcdab896745230107000000000000000d00000000000000000000007b2261223a317db3c4520688be2f82bfc8f1345fe3354c",
    ];
    let mut s = Sealer::new(FrameKey::derive(b"golden secret"), 0x0123_4567_89ab_cdef);
    let two = [
        seq(1, 3, 2, OutputRows::Last),
        seq(0, 0, 1, OutputRows::All),
    ];
    let h: Vec<f32> = (0..12).map(|i| i as f32 * 0.75 - 3.1).collect();
    let mut big = h.clone();
    big[5] = 70_000.0; // beyond f16: sent as bf16
    let parts = [
        PartialLogits::Top(vec![(3, 1.5), (7, -0.25)]),
        PartialLogits::Dense {
            first: 2,
            logits: vec![0.5, -1.0, 2.25],
        },
    ];
    let mut frames = Vec::new();
    s.set_step_flags(FLAG_SOLO);
    frames.push(s.seal(7, &two, Payload::activations(&h, 4, Dtype::F16)));
    frames.push(s.seal(8, &two, Payload::activations(&big, 4, Dtype::F16)));
    s.set_step_flags(0);
    frames.push(s.seal(9, &two, Payload::activations(&h, 4, Dtype::F32)));
    frames.push(s.seal(10, &two, Payload::normed(&h[..8], 4, Dtype::F32)));
    frames.push(s.seal(11, &two, Payload::Tokens(&[5, 999])));
    frames.push(s.seal(12, &two, Payload::LmHeadPart(&parts)));
    frames.push(s.seal_control(FrameType::Ping, 13, &serde_json::json!({"a": 1})));
    for (i, (frame, want)) in frames.into_iter().zip(GOLDEN).enumerate() {
        let hex: String = frame
            .expect("seal")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, want, "frame {i}");
    }
}
