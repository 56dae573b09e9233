//! The head's links of a cluster pipeline: its own first stage ([`FirstStage`],
//! timed for /health) and every later stage, on other nodes, as one
//! [`RemoteStages`] link over the nng data plane. The scheduler drives them like
//! any local pipeline.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::head::ClusterView;
use super::proto::{self, SlotSetup};
use super::transport::{PipelineRx, PipelineTx};
use super::wire::{
    Dtype, Frame, FrameError, FrameType, Limits, Opener, Payload, Sealer, FLAG_SOLO,
};
use crate::engine::{BatchSeq, EngineError, Link, LinkOutput, Sampling, Stage, StageInput};
use crate::log_every::LogEvery;
use crate::model::LayerRange;

/// Sending to the next stage gives up after this (a missing peer).
pub(super) const SEND_TIMEOUT: Duration = Duration::from_millis(1200);

/// With steps in flight and no answer, no stage after this node computing (their
/// pongs) and every peer present for this long, a step was lost on the way (a frame
/// dropped). A missing peer is noticed sooner.
const IDLE_PIPELINE_LIMIT: Duration = Duration::from_secs(60);

/// The head node's own stage: a local stage whose speed goes into the cluster view.
pub struct FirstStage {
    pub stage: Stage,
    pub view: ClusterView,
}

impl Link for FirstStage {
    fn range(&self) -> LayerRange {
        self.stage.range()
    }

    fn set_paused(&mut self, paused: bool) {
        self.stage.set_paused(paused)
    }

    fn project_lm_head(
        &mut self,
        normed: &[f32],
        rows: Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        self.stage.project(normed, rows, out)
    }

    fn launch(
        &mut self,
        step: u64,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
    ) -> Result<(), EngineError> {
        let t0 = Instant::now();
        self.stage.launch(step, seqs, input)?;
        let n_tokens = seqs.iter().map(|s| s.n_tokens).sum::<usize>().max(1);
        let ms = t0.elapsed().as_secs_f64() * 1e3 / n_tokens as f64;
        if let Ok(mut v) = self.view.lock() {
            if let Some(me) = v.first_mut() {
                me.ms_per_token = if me.ms_per_token == 0.0 {
                    ms
                } else {
                    0.9 * me.ms_per_token + 0.1 * ms
                };
            }
        }
        Ok(())
    }

    fn wait(&mut self) -> Result<(u64, LinkOutput), EngineError> {
        self.stage.wait()
    }
}

/// The `lm_head` rows this node computes when the `lm_head` is split.
#[derive(Debug, Clone, Copy)]
pub struct LmHeadSplit {
    /// Rows `0..rows` for a step among others.
    pub rows: usize,
    /// Rows for a step alone in the pipeline ([`FLAG_SOLO`]), when the even split
    /// is within this node's reach (else `rows`).
    pub solo_rows: usize,
}

/// Every stage after the head's: activations go to the next node, tokens (or the
/// parts of a split `lm_head`) come back from the last.
pub struct RemoteStages {
    pub(super) rt: tokio::runtime::Handle,
    pub(super) range: LayerRange,
    pub(super) n_stages: usize,
    pub(super) tx: PipelineTx,
    pub(super) rx: PipelineRx,
    pub(super) sealer: Sealer,
    pub(super) opener: Opener,
    pub(super) limits: Limits,
    pub(super) width: usize,
    pub(super) dtype: Dtype,
    pub(super) view: ClusterView,
    /// The last stage's data sender id (changes when it restarts) and the one allowed.
    pub(super) last_sender: Arc<AtomicU64>,
    pub(super) allowed_last: u64,
    pub(super) split: Option<LmHeadSplit>,
    /// Steps launched and not yet answered.
    pub(super) in_flight: std::collections::VecDeque<u64>,
    /// Lines about frames dropped, and about authentic frames of an unexpected type.
    pub(super) dropped: LogEvery,
    pub(super) unexpected: LogEvery,
}

impl RemoteStages {
    /// Whether a stage after this node was computing a step at its last pong.
    fn stage_busy(&self) -> bool {
        self.view
            .lock()
            .is_ok_and(|v| v.iter().skip(1).any(|p| p.busy))
    }

    fn missing_peer(&self) -> Option<String> {
        let v = self.view.lock().ok()?;
        v.iter().skip(1).find(|p| !p.alive).map(|p| p.name.clone())
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.rt
            .block_on(self.tx.send_timeout(bytes, Some(SEND_TIMEOUT)))
            .map_err(|e| EngineError::Pipeline(format!("sending to the next stage: {e}")))
    }

    /// Counts the return hop where it arrives (a split `lm_head`'s rows once).
    fn count_return(&self, frame: &Frame<'_>, bytes: usize) {
        let rows: u64 = match frame.frame_type {
            FrameType::Tokens | FrameType::LmHeadPart | FrameType::TokenLogprobs => {
                BatchSeq::output_rows_of(&frame.seqs) as u64
            }
            FrameType::Normed => 0,
            _ => return,
        };
        if let Ok(mut v) = self.view.lock() {
            if let Some(last) = v.last_mut() {
                last.bytes_sent += bytes as u64;
                last.tokens_sent += rows;
            }
        }
    }

    /// What an arrived frame means for the step it belongs to (None: not a result).
    fn output_of(&self, frame: &Frame<'_>) -> Result<Option<LinkOutput>, EngineError> {
        let wire = |e: FrameError| EngineError::Pipeline(e.to_string());
        Ok(Some(match (frame.frame_type, self.split) {
            (FrameType::Error, _) => {
                let msg = frame
                    .control::<proto::ErrorMsg>()
                    .map(|m| m.message)
                    .unwrap_or_else(|_| "a stage failed".into());
                return Err(EngineError::Pipeline(msg));
            }
            (FrameType::Normed, Some(split)) => {
                // the flag comes back with the step from the last stage, which split
                // its rows by it (the frame is authenticated; ids are checked when merging)
                let rows = if frame.flags & FLAG_SOLO != 0 {
                    split.solo_rows
                } else {
                    split.rows
                };
                let mut normed = Vec::new();
                frame.normed(&mut normed).map_err(wire)?;
                LinkOutput::Normed { rows, normed }
            }
            (FrameType::LmHeadPart, Some(_)) => {
                LinkOutput::LmHeadPart(frame.head_part().map_err(wire)?.to_vec())
            }
            (FrameType::Tokens | FrameType::TokenLogprobs, _) => {
                LinkOutput::Tokens(frame.picks().map_err(wire)?)
            }
            (other, _) => {
                if let Some(n) = self.unexpected.hit() {
                    tracing::warn!(
                        "{n} frame(s) of an unexpected type on the head's data plane; the latest: {}",
                        other.name()
                    );
                }
                return Ok(None);
            }
        }))
    }

    fn wait_step(&mut self) -> Result<(u64, LinkOutput), EngineError> {
        let last = self.last_sender.load(Ordering::SeqCst);
        if last != self.allowed_last {
            self.opener.allow_sender(last);
            self.allowed_last = last;
        }
        // a slow stage's step may take many minutes (a prompt chunk of a big model on
        // a small board): an answer is overdue only once no stage has been computing
        // for a while
        let mut quiet_since = Instant::now();
        loop {
            if self.stage_busy() {
                quiet_since = Instant::now();
            }
            if quiet_since.elapsed() > IDLE_PIPELINE_LIMIT {
                return Err(EngineError::Pipeline(format!(
                    "no answer from the pipeline, whose stages have computed nothing for {} s \
                     (a step lost on the way)",
                    IDLE_PIPELINE_LIMIT.as_secs()
                )));
            }
            let r = self
                .rt
                .block_on(self.rx.recv(Some(Duration::from_millis(250))));
            let pkt = match r {
                Ok(p) => p,
                Err(e) if e.is_timeout() => {
                    if let Some(p) = self.missing_peer() {
                        return Err(EngineError::Pipeline(format!("peer {p} is missing")));
                    }
                    continue;
                }
                Err(e) => return Err(EngineError::Pipeline(format!("receiving tokens: {e}"))),
            };
            let frame = match self.opener.open(pkt.as_bytes(), &self.limits) {
                Ok(f) => f,
                Err(e) => {
                    if let Some(n) = self.dropped.hit() {
                        tracing::warn!("{n} frame(s) from the pipeline dropped; the latest: {e}");
                    }
                    continue;
                }
            };
            self.count_return(&frame, pkt.as_bytes().len());
            if let Some(out) = self.output_of(&frame)? {
                return Ok((frame.step_id, out));
            }
        }
    }
}

impl Link for RemoteStages {
    fn range(&self) -> LayerRange {
        self.range
    }

    fn stages(&self) -> usize {
        self.n_stages
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn kv_generation(&self) -> u64 {
        self.view
            .lock()
            .map(|v| v.iter().map(|p| p.rejoins).sum())
            .unwrap_or(u64::MAX)
    }

    fn open_slot(
        &mut self,
        slot: usize,
        sampling: &Sampling,
        prompt: &[i32],
    ) -> Result<(), EngineError> {
        let setup = SlotSetup::new(slot, sampling, prompt);
        let bytes = self
            .sealer
            .seal_control(FrameType::Setup, 0, &setup)
            .map_err(|e| EngineError::Pipeline(e.to_string()))?;
        self.send(&bytes)
    }

    fn launch(
        &mut self,
        step: u64,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
    ) -> Result<(), EngineError> {
        if let Some(p) = self.missing_peer() {
            return Err(EngineError::Pipeline(format!("peer {p} is missing")));
        }
        let StageInput::Hidden(hidden) = input else {
            return Err(EngineError::Pipeline(
                "the remote stages take activations".into(),
            ));
        };
        // the answer's frame must fit what the head's data plane takes
        let out_rows = BatchSeq::output_rows_of(seqs);
        if out_rows > self.limits.max_output_rows {
            return Err(EngineError::Pipeline(format!(
                "a step across the cluster returns at most {} output rows (one per sequence), \
                 this one asks for {out_rows}",
                self.limits.max_output_rows
            )));
        }
        // Alone in the pipeline, a step's lm_head is all that both nodes wait for:
        // split it evenly instead of by the plan's balance of whole stages.
        let solo = self.in_flight.is_empty() && self.split.is_some_and(|s| s.solo_rows != s.rows);
        self.sealer.set_step_flags(if solo { FLAG_SOLO } else { 0 });
        let bytes = self
            .sealer
            .seal(
                step,
                seqs,
                Payload::activations(hidden, self.width, self.dtype),
            )
            .map_err(|e| EngineError::Pipeline(e.to_string()))?;
        if let Ok(mut v) = self.view.lock() {
            if let Some(me) = v.first_mut() {
                me.bytes_sent += bytes.len() as u64;
                me.tokens_sent += seqs.iter().map(|s| s.n_tokens as u64).sum::<u64>();
            }
        }
        self.send(&bytes)?;
        self.in_flight.push_back(step);
        Ok(())
    }

    fn wait(&mut self) -> Result<(u64, LinkOutput), EngineError> {
        let r = self.wait_step();
        match &r {
            // the normalized state of a split lm_head is half an answer
            Ok((_, LinkOutput::Normed { .. })) => {}
            Ok((step, _)) => self.in_flight.retain(|s| s != step),
            // the scheduler fails every step in flight
            Err(_) => self.in_flight.clear(),
        }
        r
    }
}
