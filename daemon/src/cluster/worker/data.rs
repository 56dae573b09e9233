//! The worker's data side: one thread owning the stage; receives batches, computes,
//! forwards activations (or, on the last stage, sampled token ids) towards the head.

use std::collections::HashMap;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DataCmd, RunningStage, Status};
use crate::cluster::proto::{self, SlotSetup};
use crate::cluster::transport::PipelineRx;
use crate::cluster::wire::{FrameKey, FrameType, Opener, OpenerStats, Payload, Sealer, FLAG_SOLO};
use crate::engine::{
    BatchSeq, PartialLogits, Picked, Sampling, StageInput, StageOutput, TokenSampler,
};
use crate::log_every::LogEvery;

/// The data side: one thread owning the stage; receives batches, computes, forwards.
struct DataPlane {
    rt: tokio::runtime::Handle,
    key: FrameKey,
    stats: Arc<OpenerStats>,
    status: Arc<Mutex<Status>>,
    run: Option<Box<RunningStage>>,
    opener: Opener,
    sealer: Sealer,
    /// Per slot: its sampler (last stage only).
    samplers: HashMap<usize, TokenSampler>,
    /// Per slot with a split `lm_head`: how it samples, which decides what to send.
    split_sampling: HashMap<usize, Sampling>,
    hidden: Vec<f32>,
    out: Vec<f32>,
    /// This stage's `lm_head` rows' logits (split `lm_head`).
    logits: Vec<f32>,
    picks: Vec<Picked>,
    /// Lines about batches dropped, and about failed receives.
    dropped: LogEvery,
    failed: LogEvery,
}

pub(super) fn data_loop(
    rt: tokio::runtime::Handle,
    mut rx: PipelineRx,
    cmds: std_mpsc::Receiver<DataCmd>,
    key: FrameKey,
    data_sender: u64,
    status: Arc<Mutex<Status>>,
    stats: Arc<OpenerStats>,
) {
    let mut dp = DataPlane {
        rt,
        opener: Opener::new(key.clone()).with_stats(stats.clone()),
        sealer: Sealer::new(key.clone(), data_sender),
        key,
        stats,
        status,
        run: None,
        samplers: HashMap::new(),
        split_sampling: HashMap::new(),
        hidden: Vec::new(),
        out: Vec::new(),
        logits: Vec::new(),
        picks: Vec::new(),
        dropped: LogEvery::default(),
        failed: LogEvery::default(),
    };
    loop {
        // new plans first, and again right after a packet arrived (it may belong to
        // a plan acknowledged while we waited)
        if !dp.take_commands(&cmds) {
            return;
        }
        let pkt = match dp.rt.block_on(rx.recv(Some(Duration::from_millis(200)))) {
            Ok(p) => p,
            Err(e) if e.is_timeout() => continue,
            Err(e) => {
                if let Some(n) = dp.failed.hit() {
                    tracing::warn!("data plane: {n} receive(s) failed; the latest: {e}");
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !dp.take_commands(&cmds) {
            return;
        }
        if let Err(e) = dp.handle(pkt.as_bytes()) {
            if let Some(n) = dp.dropped.hit() {
                tracing::warn!("{n} batch(es) dropped; the latest: {e:#}");
            }
        }
    }
}

impl DataPlane {
    /// Applies pending plans; false when the control side has gone.
    fn take_commands(&mut self, cmds: &std_mpsc::Receiver<DataCmd>) -> bool {
        loop {
            match cmds.try_recv() {
                Ok(DataCmd::Run(r, ack)) => {
                    // a new plan: fresh replay state and samplers; one feeder
                    self.opener = Opener::new(self.key.clone()).with_stats(self.stats.clone());
                    self.opener.allow_sender(r.prev_sender);
                    self.samplers.clear();
                    self.split_sampling.clear();
                    tracing::debug!("stage thread runs plan {}", r.epoch);
                    self.run = Some(r);
                    let _ = ack.send(());
                }
                Ok(DataCmd::Allow(sender, ack)) => {
                    self.opener.allow_sender(sender);
                    let _ = ack.send(());
                }
                Err(std_mpsc::TryRecvError::Disconnected) => return false,
                Err(std_mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let Some(r) = self.run.as_mut() else {
            anyhow::bail!("no plan")
        };
        self.rt.block_on(r.tx.send(bytes))?;
        Ok(())
    }

    fn handle(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let Some(r) = self.run.as_ref() else {
            anyhow::bail!("a frame arrived before any plan");
        };
        let (limits, last) = (r.limits, r.last);
        let frame = self.opener.open(bytes, &limits)?;
        let step = frame.step_id;
        match frame.frame_type {
            FrameType::Setup if last => {
                let s: SlotSetup = frame.control()?;
                self.setup_slot(s)
            }
            FrameType::Setup | FrameType::Error => {
                // pass it on, in order with the batches: a Setup towards the last
                // stage, an Error (a stage before us failed this step) towards the head
                let ft = frame.frame_type;
                let body: serde_json::Value = frame.control()?;
                let sealed = self.sealer.seal_control(ft, step, &body)?;
                self.send(&sealed)
            }
            FrameType::Activations => {
                let seqs: Vec<BatchSeq> = frame.seqs.clone();
                frame.activations(&mut self.hidden)?;
                self.sealer.set_step_flags(frame.flags);
                let solo = frame.flags & FLAG_SOLO != 0;
                self.set_busy(true);
                let result = self.run_batch(step, &seqs, solo);
                self.set_busy(false);
                if let Err(e) = &result {
                    // tell the head at once instead of letting it wait
                    let range = self.run.as_ref().map(|r| r.stage.config().range);
                    let msg = proto::ErrorMsg {
                        message: format!(
                            "stage {}: {e:#}",
                            range.map_or("?".into(), |r| r.to_string())
                        ),
                    };
                    if let Ok(sealed) = self.sealer.seal_control(FrameType::Error, step, &msg) {
                        let _ = self.send(&sealed);
                    }
                }
                result
            }
            other => anyhow::bail!("unexpected {} frame on the data plane", other.name()),
        }
    }

    /// What the pongs say: computing a step, or not.
    fn set_busy(&self, busy: bool) {
        if let Ok(mut st) = self.status.lock() {
            st.busy = busy;
        }
    }

    fn setup_slot(&mut self, s: SlotSetup) -> anyhow::Result<()> {
        let sampling = s.sampling();
        if let Some(r) = self.run.as_ref() {
            sampling
                .check(r.stage.hparams().n_vocab)
                .map_err(|e| anyhow::anyhow!("slot {}: {e}", s.slot))?;
        }
        if self.run.as_ref().is_some_and(|r| r.lm_head_first.is_some()) {
            // the head node samples; we only need to know what to send it
            self.split_sampling.insert(s.slot, sampling);
            return Ok(());
        }
        self.samplers
            .insert(s.slot, TokenSampler::new(&sampling, &s.prompt)?);
        Ok(())
    }

    /// Computes the stage; sends activations on, or (last stage) sampled token ids.
    fn run_batch(&mut self, step: u64, seqs: &[BatchSeq], solo: bool) -> anyhow::Result<()> {
        let Some(r) = self.run.as_mut() else {
            anyhow::bail!("no plan")
        };
        let t0 = Instant::now();
        let kind = r
            .stage
            .forward(seqs, StageInput::Hidden(&self.hidden), &mut self.out)?;
        let sealed = match kind {
            StageOutput::Hidden => self.sealer.seal(
                step,
                seqs,
                Payload::activations(&self.out, r.width, r.dtype),
            )?,
            StageOutput::Normed if seqs.iter().all(|s| s.output_rows() == 0) => {
                // a prompt chunk without output rows: nothing to sample
                self.sealer.seal(step, seqs, Payload::Tokens(&[]))?
            }
            StageOutput::Normed => {
                // the normalized state first: the head node computes its rows of the
                // head while we compute ours
                let n_vocab = r.stage.hparams().n_vocab;
                let own = r.lm_head_first.unwrap_or(0);
                let first = if solo { r.lm_head_solo.max(own) } else { own };
                let normed =
                    self.sealer
                        .seal(step, seqs, Payload::normed(&self.out, r.width, r.dtype))?;
                self.rt.block_on(r.tx.send(&normed))?;
                r.stage
                    .project(&self.out, first..n_vocab, &mut self.logits)?;
                let width = n_vocab - first;
                let mut parts = Vec::new();
                for row in rows_with_slots(seqs, &self.logits, width) {
                    let (slot, l) = row?;
                    let Some(sampling) = self.split_sampling.get(&slot) else {
                        anyhow::bail!("slot {slot} has no sampling set-up");
                    };
                    parts.push(PartialLogits::of_row(sampling, l, first));
                }
                self.sealer.seal(step, seqs, Payload::LmHeadPart(&parts))?
            }
            StageOutput::Logits => {
                let n_vocab = r.stage.hparams().n_vocab;
                self.picks.clear();
                for row in rows_with_slots(seqs, &self.out, n_vocab) {
                    let (slot, l) = row?;
                    let Some(sampler) = self.samplers.get_mut(&slot) else {
                        anyhow::bail!("slot {slot} has no sampling set-up");
                    };
                    self.picks.push(sampler.pick(l)?);
                }
                if self.picks.iter().any(|p| p.logprobs.is_some()) {
                    self.sealer
                        .seal(step, seqs, Payload::TokenLogprobs(&self.picks))?
                } else {
                    let tokens: Vec<i32> = self.picks.iter().map(|p| p.token).collect();
                    self.sealer.seal(step, seqs, Payload::Tokens(&tokens))?
                }
            }
        };
        let n_tokens = seqs.iter().map(|s| s.n_tokens).sum::<usize>().max(1);
        let ms = t0.elapsed().as_secs_f64() * 1e3 / n_tokens as f64;
        if let Ok(mut st) = self.status.lock() {
            st.ms_per_token = if st.ms_per_token == 0.0 {
                ms
            } else {
                0.9 * st.ms_per_token + 0.1 * ms
            };
        }
        self.rt.block_on(r.tx.send(&sealed))?;
        Ok(())
    }
}

/// Each output row of a step's logits (`width` values a row), with its sequence's slot.
fn rows_with_slots<'a>(
    seqs: &'a [BatchSeq],
    logits: &'a [f32],
    width: usize,
) -> impl Iterator<Item = anyhow::Result<(usize, &'a [f32])>> + 'a {
    let mut rows = logits.chunks_exact(width.max(1));
    seqs.iter()
        .flat_map(|s| std::iter::repeat_n(s.slot, s.output_rows()))
        .map(move |slot| {
            rows.next()
                .map(|l| (slot, l))
                .ok_or_else(|| anyhow::anyhow!("missing logits row"))
        })
}
