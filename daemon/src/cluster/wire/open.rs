//! The receiver's side: [`Opener`] checks a frame's structure, MAC, replay and
//! shapes against the receiver's [`Limits`], decodes its payload once and counts
//! every outcome in [`OpenerStats`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::header::{decode_seq, Header, RawHeader};
use super::payload::{decode_data, Body};
use super::{
    DropReason, Dtype, Frame, FrameError, FrameKey, FrameType, HEADER_LEN, MAC_LEN,
    MAX_CHUNK_FRAME_BYTES, MIN_FRAME_LEN, SEQ_DESC_LEN,
};
use crate::engine::sampler::MAX_LM_HEAD_CANDIDATES;
use crate::engine::BatchSeq;

/// What a receiver accepts; everything outside is rejected before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sequences per frame.
    pub max_seqs: usize,
    /// Tokens (rows) per frame, summed over its sequences.
    pub max_tokens: usize,
    /// Output rows per frame, summed over its sequences (a step of the scheduler has
    /// at most one per sequence).
    pub max_output_rows: usize,
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
            max_output_rows: 0,
            width: 0,
            n_ctx: 0,
            n_slots: 0,
            n_vocab: 0,
            max_control_bytes: Limits::DEFAULT_MAX_CONTROL_BYTES,
        }
    }

    /// The longest frame a peer following the protocol sends under these limits, of
    /// any type but a slice chunk (see [`MAX_CHUNK_FRAME_LEN`]): what a socket
    /// receiving under them must take. Head parts count only with a vocabulary: a
    /// row is every logit of the sender's rows, or its best candidates (at most
    /// [`MAX_LM_HEAD_CANDIDATES`]).
    pub fn max_frame_len(&self) -> usize {
        let rows = self.max_tokens;
        let out_rows = self.max_output_rows.min(rows);
        let floats = |rows: usize| {
            rows.saturating_mul(self.width)
                .saturating_mul(Dtype::F32.size())
        };
        let head_row =
            (self.n_vocab.saturating_mul(4).saturating_add(8)).max(4 + 8 * MAX_LM_HEAD_CANDIDATES);
        let head_part = if self.n_vocab == 0 {
            0
        } else {
            out_rows.saturating_mul(head_row)
        };
        let payload = [
            self.max_control_bytes,
            floats(rows),
            floats(out_rows),
            out_rows.saturating_mul(4),
            head_part,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        MIN_FRAME_LEN
            .saturating_add(self.max_seqs.saturating_mul(SEQ_DESC_LEN))
            .saturating_add(payload)
    }
}

/// The longest slice-chunk frame.
pub const MAX_CHUNK_FRAME_LEN: usize = MIN_FRAME_LEN + MAX_CHUNK_FRAME_BYTES;

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

/// How far behind a sender's newest counter a frame may be and still be taken (once):
/// requests sent together (a slice's chunks in flight) may arrive in another order.
pub const REPLAY_WINDOW: u64 = 64;

/// The counters of one sender: the newest accepted, and which of the
/// [`REPLAY_WINDOW`] before it were accepted (bit `i`: counter `newest - i`).
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    newest: u64,
    seen: u64,
}

impl Window {
    /// Takes `counter` if it was not taken before and is not too old.
    fn take(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false; // senders count from 1
        }
        if counter > self.newest {
            let shift = counter - self.newest;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            } | 1;
            self.newest = counter;
            return true;
        }
        let age = self.newest - counter;
        if age >= REPLAY_WINDOW || self.seen & (1 << age) != 0 {
            return false;
        }
        self.seen |= 1 << age;
        true
    }
}

/// Verifies incoming frames: structure, MAC, replay, then the receiver's limits.
pub struct Opener {
    key: FrameKey,
    last_counter: HashMap<u64, Window>,
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

    /// The newest accepted counter of a sender.
    pub fn last_counter(&self, sender_id: u64) -> Option<u64> {
        self.last_counter.get(&sender_id).map(|w| w.newest)
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
        // 1. structure; 2. authenticity
        let parts = Parts::split(bytes)?;
        // a slice chunk's MAC covers its payload's hash: hashed once, here
        let chunk_hash = (parts.raw.frame_type == FrameType::SliceChunk as u8)
            .then(|| *blake3::hash(parts.payload).as_bytes());
        let before_payload =
            &parts.authenticated[..parts.authenticated.len() - parts.payload.len()];
        let authentic = match &chunk_hash {
            Some(hash) => self.key.verify_chunk(before_payload, hash, parts.mac),
            None => self.key.verify(parts.authenticated, parts.mac),
        };
        if !authentic {
            return Err(FrameError::BadMac);
        }
        // 3. replay
        self.check_replay(&parts.raw)?;
        // 4. semantics
        let h = Header::from_raw(&parts.raw)?;
        if h.frame_type.is_control() {
            open_control(&h, parts.descs, parts.payload, chunk_hash, limits)
        } else {
            open_data(&h, parts.descs, parts.payload, limits)
        }
    }

    /// Refuses our own frames, senders outside the allowlist and counters taken
    /// before or too old; records the counter of an accepted one.
    fn check_replay(&mut self, h: &RawHeader) -> Result<(), FrameError> {
        if self.local_sender == Some(h.sender_id) {
            return Err(FrameError::Reflected(h.sender_id));
        }
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&h.sender_id) {
                return Err(FrameError::UnknownSender(h.sender_id));
            }
        }
        let window = self.last_counter.entry(h.sender_id).or_default();
        if !window.take(h.counter) {
            return Err(FrameError::Replayed {
                sender: h.sender_id,
                counter: h.counter,
                last: window.newest,
            });
        }
        Ok(())
    }
}

/// The sections of a frame whose declared lengths add up.
struct Parts<'a> {
    raw: RawHeader,
    descs: &'a [u8],
    payload: &'a [u8],
    /// Everything before the MAC.
    authenticated: &'a [u8],
    mac: &'a [u8],
}

impl<'a> Parts<'a> {
    /// Splits a frame into its raw header, descriptor bytes, payload and MAC.
    fn split(bytes: &'a [u8]) -> Result<Parts<'a>, FrameError> {
        let too_short = || FrameError::TooShort {
            len: bytes.len(),
            min: MIN_FRAME_LEN,
        };
        let head = bytes.first_chunk::<HEADER_LEN>().ok_or_else(too_short)?;
        if bytes.len() < MIN_FRAME_LEN {
            return Err(too_short());
        }
        let raw = RawHeader::decode(head)?;
        let descs_len = raw.n_seqs as usize * SEQ_DESC_LEN;
        let needed = (HEADER_LEN + descs_len + MAC_LEN) as u64;
        if needed > bytes.len() as u64 {
            return Err(FrameError::LengthMismatch {
                needed,
                actual: bytes.len(),
                n_seqs: raw.n_seqs,
            });
        }
        // Lengths add up, so these splits are in bounds.
        let (authenticated, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let (descs, payload) = authenticated[HEADER_LEN..].split_at(descs_len);
        Ok(Parts {
            raw,
            descs,
            payload,
            authenticated,
            mac,
        })
    }
}

/// A control frame: no flags, dtype, descriptors or width; JSON within the limit.
fn open_control<'a>(
    h: &Header,
    descs: &[u8],
    payload: &'a [u8],
    chunk_hash: Option<[u8; 32]>,
    limits: &Limits,
) -> Result<Frame<'a>, FrameError> {
    if h.flags != 0 {
        return Err(FrameError::BadFlags(h.flags));
    }
    if !descs.is_empty() {
        return Err(FrameError::SeqsOnControl {
            frame_type: h.frame_type,
            n: usize::from(h.n_seqs),
        });
    }
    check_dtype_and_width(h, false, 0)?;
    let chunk = h.frame_type == FrameType::SliceChunk;
    let max = if chunk {
        MAX_CHUNK_FRAME_BYTES
    } else {
        limits.max_control_bytes
    };
    if payload.len() > max {
        return Err(FrameError::ControlTooLarge {
            got: payload.len(),
            max,
        });
    }
    let body = match chunk_hash {
        Some(hash) if chunk => Body::Chunk(payload, hash),
        _ => Body::Control(payload),
    };
    Ok(frame(h, Vec::new(), body))
}

/// A data frame: a batch within the limits and a payload of its shape.
fn open_data<'a>(
    h: &Header,
    descs: &[u8],
    payload: &'a [u8],
    limits: &Limits,
) -> Result<Frame<'a>, FrameError> {
    let frame_type = h.frame_type;
    let n_seqs = usize::from(h.n_seqs);
    if n_seqs > limits.max_seqs {
        return Err(FrameError::TooManySeqs {
            n: n_seqs,
            max: limits.max_seqs,
        });
    }
    if n_seqs == 0 {
        return Err(FrameError::EmptyBatch { frame_type });
    }
    let activations = matches!(frame_type, FrameType::Activations | FrameType::Normed);
    let width = if activations { limits.width as u64 } else { 0 };
    check_dtype_and_width(h, activations, width)?;
    let seqs = open_seqs(descs, limits)?;
    let rows = seqs.iter().map(|s| s.n_tokens as u64).sum();
    let out_rows = BatchSeq::output_rows_of(&seqs) as u64;
    if out_rows > limits.max_output_rows as u64 {
        return Err(FrameError::TooManyOutputRows {
            n: out_rows,
            max: limits.max_output_rows,
        });
    }
    let body = decode_data(
        frame_type,
        h.dtype,
        width,
        (rows, out_rows),
        payload,
        limits.n_vocab,
    )?;
    Ok(frame(h, seqs, body))
}

/// Activations have a dtype and the given width; other frames neither.
fn check_dtype_and_width(h: &Header, activations: bool, width: u64) -> Result<(), FrameError> {
    if activations != h.dtype.is_some() {
        return Err(FrameError::WrongDtype {
            frame_type: h.frame_type,
            dtype: h.dtype,
        });
    }
    if h.width as u64 != width {
        return Err(FrameError::WidthMismatch {
            frame_type: h.frame_type,
            got: h.width as u64,
            expected: width,
        });
    }
    Ok(())
}

/// Parses the descriptors and checks them against the limits: tokens in every
/// sequence, slots in range and each once, positions inside the context, and
/// the batch's tokens within the step size.
fn open_seqs(descs: &[u8], limits: &Limits) -> Result<Vec<BatchSeq>, FrameError> {
    let mut seqs = Vec::with_capacity(descs.len() / SEQ_DESC_LEN);
    let mut rows: u64 = 0;
    for (index, chunk) in descs.chunks_exact(SEQ_DESC_LEN).enumerate() {
        let Some(raw) = chunk.first_chunk::<SEQ_DESC_LEN>() else {
            return Err(FrameError::BadPadding { index });
        };
        let s = decode_seq(index, raw)?;
        if s.n_tokens == 0 {
            return Err(FrameError::EmptySeq { index });
        }
        if s.slot >= limits.n_slots {
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
        seqs.push(s);
    }
    if rows > limits.max_tokens as u64 {
        return Err(FrameError::TooManyTokens {
            n: rows,
            max: limits.max_tokens,
        });
    }
    let mut slots: Vec<usize> = seqs.iter().map(|s| s.slot).collect();
    slots.sort_unstable();
    if let Some(w) = slots.windows(2).find(|w| w[0] == w[1]) {
        return Err(FrameError::DuplicateSlot(w[0]));
    }
    Ok(seqs)
}

fn frame<'a>(h: &Header, seqs: Vec<BatchSeq>, body: Body<'a>) -> Frame<'a> {
    Frame {
        frame_type: h.frame_type,
        dtype: h.dtype,
        sender_id: h.sender_id,
        counter: h.counter,
        step_id: h.step_id,
        flags: h.flags,
        width: u32::from(h.width),
        seqs,
        body,
    }
}
