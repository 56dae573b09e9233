//! The frame fuzz target's body (see [`crate::fuzzing`]): any bytes through the opener,
//! and the same bytes as a frame authenticated with the target's key, so the fuzzer
//! reaches every check behind the MAC too.

use super::{FrameKey, FrameType, Limits, Opener};
use crate::cluster::proto;

/// The key of the fuzzed frames (a fixed test secret).
pub fn fuzz_key() -> FrameKey {
    FrameKey::derive(b"exo fuzz key")
}

/// Limits of a plausible plan: 8 sequences of a 4096-token context, 64 wide.
pub fn fuzz_limits() -> Limits {
    Limits {
        max_seqs: 8,
        max_tokens: 512,
        max_output_rows: 512,
        width: 64,
        n_ctx: 4096,
        n_slots: 8,
        n_vocab: 1000,
        max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
    }
}

/// `data` as it came (almost always refused at the MAC), then with a valid MAC appended.
pub fn open_any(data: &[u8]) {
    let key = fuzz_key();
    let limits = fuzz_limits();
    let mut opener = Opener::new(key.clone());
    let _ = opener.open(data, &limits);
    let mut authentic = data.to_vec();
    key.append_mac(&mut authentic);
    let mut opener = Opener::new(key);
    if let Ok(frame) = opener.open(&authentic, &limits) {
        read_everything(&frame);
    }
}

/// Every accessor a receiver may call on an opened frame.
fn read_everything(frame: &super::Frame<'_>) {
    let _ = frame.n_tokens();
    let mut floats = Vec::new();
    let _ = frame.activations(&mut floats);
    let _ = frame.normed(&mut floats);
    let _ = frame.head_part();
    let _ = frame.tokens();
    let _ = frame.picks();
    let _ = frame.chunk();
    if frame.frame_type.is_control() && frame.frame_type != FrameType::SliceChunk {
        let _ = frame.control::<proto::Hello>();
        let _ = frame.control::<proto::HelloAck>();
        let _ = frame.control::<proto::Plan>();
        let _ = frame.control::<proto::PlanAck>();
        let _ = frame.control::<proto::Pong>();
        let _ = frame.control::<proto::SlotSetup>();
        let _ = frame.control::<proto::SliceOffer>();
        let _ = frame.control::<proto::SliceStatus>();
        let _ = frame.control::<proto::ErrorMsg>();
    }
}
