//! The receive caps sockets take from [`Limits::max_frame_len`]: every frame a peer
//! sends under the limits fits, and a frame with more output rows than the limits
//! allow is refused.

use super::*;
use crate::engine::sampler::MAX_LM_HEAD_CANDIDATES;
use crate::engine::{BatchSeq, OutputRows};

fn limits() -> Limits {
    Limits {
        max_seqs: 4,
        max_tokens: 516,
        max_output_rows: 4,
        width: 64,
        n_ctx: 1024,
        n_slots: 4,
        n_vocab: 50_000,
        max_control_bytes: 4096,
    }
}

fn key() -> FrameKey {
    FrameKey::derive(b"the limits of a frame")
}

/// `n` sequences sharing `tokens` tokens, each with its last row as output.
fn batch(n: usize, tokens: usize) -> Vec<BatchSeq> {
    (0..n)
        .map(|i| BatchSeq {
            slot: i,
            pos0: 0,
            n_tokens: tokens / n + usize::from(i < tokens % n),
            output: OutputRows::Last,
        })
        .collect()
}

#[test]
fn the_largest_frames_fit_the_cap() {
    let l = limits();
    let cap = l.max_frame_len();
    let mut sealer = Sealer::new(key(), 1);
    let seqs = batch(l.max_seqs, l.max_tokens);
    let values = vec![0.5f32; l.max_tokens * l.width];
    let activations = sealer
        .seal(1, &seqs, Payload::activations(&values, l.width, Dtype::F32))
        .expect("activations");
    assert!(activations.len() <= cap, "{} > {cap}", activations.len());
    // the last stage's whole rows of a split lm_head, one per sequence
    let dense: Vec<PartialLogits> = (0..l.max_output_rows)
        .map(|_| PartialLogits::Dense {
            first: 0,
            logits: vec![1.0; l.n_vocab],
        })
        .collect();
    let dense_part = sealer
        .seal(2, &seqs, Payload::LmHeadPart(&dense))
        .expect("head part");
    assert!(dense_part.len() <= cap, "{} > {cap}", dense_part.len());
    let top: Vec<PartialLogits> = (0..l.max_output_rows)
        .map(|_| PartialLogits::Top(vec![(1, 1.0); MAX_LM_HEAD_CANDIDATES]))
        .collect();
    let top_part = sealer
        .seal(3, &seqs, Payload::LmHeadPart(&top))
        .expect("head part");
    assert!(top_part.len() <= cap, "{} > {cap}", top_part.len());
    let json = "x".repeat(l.max_control_bytes - 2);
    let control = sealer
        .seal_control(FrameType::Error, 4, &json)
        .expect("control");
    assert!(control.len() <= cap, "{} > {cap}", control.len());
    // and every one of them opens
    let mut opener = Opener::new(key());
    for f in [&activations, &dense_part, &top_part, &control] {
        opener.open(f, &l).expect("opens under its limits");
    }
    // without a vocabulary (no split head) only batches and control frames count
    let unsplit = Limits { n_vocab: 0, ..l }.max_frame_len();
    assert!(unsplit < dense_part.len(), "{unsplit}");
    assert!(activations.len() <= unsplit);
}

#[test]
fn the_cap_is_a_few_mib_at_default_settings() {
    // Gemma 3 270M on the head with a split lm_head, 4 slots, batch 512
    let l = Limits {
        max_seqs: 4,
        max_tokens: 516,
        max_output_rows: 4,
        width: 640,
        n_ctx: 4096,
        n_slots: 4,
        n_vocab: 262_144,
        max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
    };
    assert!(l.max_frame_len() < 5 << 20, "{}", l.max_frame_len());
    assert!(Limits { n_vocab: 0, ..l }.max_frame_len() < 2 << 20);
    assert!(Limits::control_only().max_frame_len() < (1 << 20) + 64);
}

#[test]
fn more_output_rows_than_allowed_are_refused() {
    let l = limits();
    let mut sealer = Sealer::new(key(), 1);
    let seqs = vec![BatchSeq {
        slot: 0,
        pos0: 0,
        n_tokens: 8,
        output: OutputRows::All,
    }];
    let values = vec![0.5f32; 8 * l.width];
    let frame = sealer
        .seal(1, &seqs, Payload::activations(&values, l.width, Dtype::F32))
        .expect("seal");
    let err = Opener::new(key()).open(&frame, &l).unwrap_err();
    assert!(
        matches!(err, FrameError::TooManyOutputRows { n: 8, max: 4 }),
        "{err}"
    );
    assert_eq!(err.reason(), DropReason::Invalid);
    let wide = Limits {
        max_output_rows: 8,
        ..l
    };
    Opener::new(key())
        .open(&frame, &wide)
        .expect("within 8 rows");
}
