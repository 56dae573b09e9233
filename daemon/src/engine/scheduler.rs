//! Continuous batching: one engine thread owns the pipeline; requests join and
//! leave between steps. Every step decodes one token for each running sequence
//! and spends a budget of `batch` prompt tokens on prompt chunks of newly admitted
//! ones, so a long prompt never stalls running streams. Prompts share that budget
//! fairly ([`Active::prefill_rank`]): the one that has had the fewest tokens goes
//! first, and one left out of a step goes first in the next, so a short prompt
//! arriving during a long one's prefill is through within a step or two, and the
//! long one still gets at least every other step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::{
    BatchSeq, EngineError, OutputRows, Picked, Pipeline, Sampling, StepOutcome, TokenSampler,
};

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoding together (at most the pipeline's slots).
    pub max_slots: usize,
    /// Requests waiting for a slot beyond which new ones are refused.
    pub max_queue: usize,
    /// Prompt tokens per step, and the length of a prompt chunk; a step carries one
    /// more token per decoding sequence ([`max_step_tokens`]).
    pub batch: usize,
}

/// The most tokens one step holds: a prompt budget of `batch` plus one decode token
/// for each of `n_slots` sequences.
pub fn max_step_tokens(batch: usize, n_slots: usize) -> usize {
    batch.max(1) + n_slots
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer (end-of-generation token).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled (client gone, stop string found, or shutdown).
    Cancelled,
}

/// What a request's owner hears from the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The prompt has been processed; generation starts.
    Started,
    /// A generated token, with its log-probabilities when the request asked.
    Token(Picked),
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// Refused or cut short because the server is shutting down.
    ShuttingDown,
}

/// A generation request.
pub struct GenRequest {
    pub prompt: Vec<i32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub events: UnboundedSender<GenEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are already waiting")]
    QueueFull(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Invalid(String),
}

/// Live figures of the scheduler, read by /metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub last_batch_tokens: AtomicUsize,
    pub last_batch_seqs: AtomicUsize,
    pub steps: AtomicUsize,
}

/// Observes step timings (for metrics) without the engine knowing about HTTP.
pub trait StepObserver: Send + Sync {
    fn step(&self, seqs: usize, tokens: usize, secs: f64);
}

enum Command {
    Submit(GenRequest),
    /// Finish running work until the deadline, then cancel what is left and exit.
    Shutdown(Instant),
}

/// A launched step that has not come back after this fails its sequences.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: std_mpsc::Sender<Command>,
    stats: Arc<SchedulerStats>,
    max_queue: usize,
    n_ctx: usize,
    n_vocab: usize,
    closing: Arc<AtomicBool>,
}

impl SchedulerHandle {
    /// Queues a request; its events arrive on `req.events`.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        if let Some(bad) = req
            .prompt
            .iter()
            .find(|&&t| t < 0 || t as usize >= self.n_vocab)
        {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        req.sampling
            .check(self.n_vocab)
            .map_err(SubmitError::Invalid)?;
        if req.prompt.len() + req.max_tokens > self.n_ctx {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens and max_tokens is {}, but the context holds {} tokens",
                req.prompt.len(),
                req.max_tokens,
                self.n_ctx
            )));
        }
        // Reserve a queue place first, so concurrent submitters cannot overshoot.
        let prev = self.stats.queued.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_queue {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(prev));
        }
        self.tx.send(Command::Submit(req)).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::ShuttingDown
        })
    }

    /// Stops accepting requests; running ones may finish until `grace` has passed.
    pub fn shutdown(&self, grace: Duration) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Command::Shutdown(Instant::now() + grace));
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
}

/// Starts the engine thread over a pipeline (local stages, remote ones, or both).
pub fn spawn(
    pipeline: Pipeline,
    cfg: SchedulerConfig,
    is_eog: Arc<dyn Fn(i32) -> bool + Send + Sync>,
    observer: Option<Arc<dyn StepObserver>>,
) -> std::io::Result<(SchedulerHandle, JoinHandle<()>)> {
    let (tx, rx) = std_mpsc::channel();
    let stats = Arc::new(SchedulerStats::default());
    let handle = SchedulerHandle {
        tx,
        stats: stats.clone(),
        max_queue: cfg.max_queue,
        n_ctx: pipeline.n_ctx(),
        n_vocab: pipeline.n_vocab(),
        closing: Arc::new(AtomicBool::new(false)),
    };
    let mut engine = Engine {
        pipeline,
        cfg,
        is_eog,
        observer,
        stats,
        waiting: VecDeque::new(),
        active: Vec::new(),
        deadline: None,
        in_flight: Vec::new(),
        next_step: 1,
        admissions: 0,
    };
    let join = std::thread::Builder::new()
        .name("exo-engine".into())
        .spawn(move || engine.run(rx))?;
    Ok((handle, join))
}

struct Active {
    slot: usize,
    prompt: Vec<i32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Next token to feed (after the prompt).
    next: Option<i32>,
    generated: usize,
    max_tokens: usize,
    sampler: TokenSampler,
    events: UnboundedSender<GenEvent>,
    /// Part of a step in flight: wait for its result before stepping it again.
    busy: bool,
    /// Cancelled while in flight: free the slot when its step returns.
    cancelled: bool,
    /// Admission order (ties between prompts go to the earlier one).
    admitted: u64,
    /// Ready with prompt left, but left out of the last step launched.
    skipped: bool,
}

impl Active {
    fn pos(&self) -> usize {
        self.fed + self.generated.saturating_sub(1)
    }

    /// Prompt tokens not yet fed (0 once decoding).
    fn prompt_left(&self) -> usize {
        if self.next.is_some() {
            0
        } else {
            self.prompt.len() - self.fed
        }
    }

    /// Where this sequence's next prompt chunk goes in a step's budget, smallest
    /// first: one left out of the last step, then the one fed fewest prompt tokens
    /// so far (a newcomer before a long prompt half way), the shorter rest, the
    /// earlier admission.
    fn prefill_rank(&self) -> (bool, usize, usize, u64) {
        (!self.skipped, self.fed, self.prompt_left(), self.admitted)
    }
}

/// A launched step: its sequences (by slot) and when it started.
struct InFlight {
    id: u64,
    seqs: Vec<BatchSeq>,
    slots: Vec<usize>,
    n_tokens: usize,
    started: Instant,
}

struct Engine {
    pipeline: Pipeline,
    cfg: SchedulerConfig,
    is_eog: Arc<dyn Fn(i32) -> bool + Send + Sync>,
    observer: Option<Arc<dyn StepObserver>>,
    stats: Arc<SchedulerStats>,
    waiting: VecDeque<GenRequest>,
    active: Vec<Active>,
    deadline: Option<Instant>,
    in_flight: Vec<InFlight>,
    next_step: u64,
    /// Requests admitted so far.
    admissions: u64,
}

impl Engine {
    fn run(&mut self, rx: std_mpsc::Receiver<Command>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && self.in_flight.is_empty() {
                if self.deadline.is_some() {
                    return;
                }
                match rx.recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.command(cmd);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) && self.in_flight.is_empty() {
                self.cancel_all();
                return;
            }
            self.drop_cancelled();
            self.admit();
            // Launch while the pipeline has room and some sequence is ready; else wait.
            let launched = if self.in_flight.len() < self.pipeline.max_in_flight() {
                match self.launch() {
                    Ok(l) => l,
                    Err(e) => {
                        self.fail_all(&e.to_string());
                        continue;
                    }
                }
            } else {
                false
            };
            // a step lost on the way (a frame dropped) must not hold its slots forever
            if let Some(f) = self
                .in_flight
                .iter()
                .find(|f| f.started.elapsed() > STEP_TIMEOUT)
            {
                let msg = format!(
                    "step {} got no answer in {} s",
                    f.id,
                    STEP_TIMEOUT.as_secs()
                );
                self.fail_all(&msg);
                continue;
            }
            if !launched && !self.in_flight.is_empty() {
                if let Err(e) = self.complete() {
                    self.fail_all(&e.to_string());
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req) => self.waiting.push_back(req),
            Command::Shutdown(deadline) => {
                self.deadline = Some(deadline);
                // Requests that never started are refused at once.
                for req in self.waiting.drain(..) {
                    self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = req.events.send(GenEvent::ShuttingDown);
                }
            }
        }
    }

    fn index_of(&self, slot: usize) -> Option<usize> {
        self.active.iter().position(|a| a.slot == slot)
    }

    fn finish(&mut self, idx: usize, reason: FinishReason) {
        let a = self.active.swap_remove(idx);
        self.pipeline.slots.release(a.slot);
        self.stats.active.store(self.active.len(), Ordering::SeqCst);
        let _ = a.events.send(GenEvent::Done {
            reason,
            prompt_tokens: a.prompt.len(),
            completion_tokens: a.generated,
        });
    }

    /// Frees the slots of requests whose owner has gone away (at once when idle,
    /// after their step returns when in flight).
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].events.is_closed() {
                if self.active[i].busy {
                    self.active[i].cancelled = true;
                    i += 1;
                } else {
                    self.finish(i, FinishReason::Cancelled);
                }
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.queued.fetch_sub(gone, Ordering::SeqCst);
        }
    }

    /// At the shutdown deadline: what still runs is cut short.
    fn cancel_all(&mut self) {
        for a in std::mem::take(&mut self.active) {
            self.pipeline.slots.release(a.slot);
            let _ = a.events.send(GenEvent::ShuttingDown);
        }
        self.stats.active.store(0, Ordering::SeqCst);
    }

    fn fail_all(&mut self, msg: &str) {
        tracing::error!("engine step failed: {msg}");
        for a in std::mem::take(&mut self.active) {
            self.pipeline.slots.release(a.slot);
            let _ = a.events.send(GenEvent::Error(msg.to_string()));
        }
        self.in_flight.clear();
        self.stats.active.store(0, Ordering::SeqCst);
    }

    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_slots && self.deadline.is_none() {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let slot = match self.pipeline.slots.acquire() {
                Ok(s) => s,
                Err(e) => {
                    let _ = req.events.send(GenEvent::Error(e.to_string()));
                    continue;
                }
            };
            // the sampler stays with the sequence; the pipeline is told too (a last
            // stage on another node samples there)
            let setup = TokenSampler::new(&req.sampling, &req.prompt).and_then(|s| {
                self.pipeline
                    .open_slot(slot, &req.sampling, &req.prompt)
                    .map(|()| s)
            });
            let sampler = match setup {
                Ok(s) => s,
                Err(e) => {
                    self.pipeline.slots.release(slot);
                    let _ = req.events.send(GenEvent::Error(e.to_string()));
                    continue;
                }
            };
            self.active.push(Active {
                slot,
                prompt: req.prompt,
                fed: 0,
                next: None,
                generated: 0,
                max_tokens: req.max_tokens,
                sampler,
                events: req.events,
                busy: false,
                cancelled: false,
                admitted: self.admissions,
                skipped: false,
            });
            self.admissions += 1;
        }
        self.stats.active.store(self.active.len(), Ordering::SeqCst);
    }

    /// Launches one step over ready sequences: a token for each decoding one, prompt
    /// chunks for the rest within the token budget. With several steps in flight the
    /// ready sequences are split so every stage has a micro-batch to work on.
    fn launch(&mut self) -> Result<bool, EngineError> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
        // decoding sequences first (a token each, on top of the budget), then the
        // prompts in their fair order
        let mut ready: Vec<usize> = (0..self.active.len())
            .filter(|&i| !self.active[i].busy && !self.active[i].cancelled)
            .collect();
        if ready.is_empty() {
            return Ok(false);
        }
        ready.sort_by_key(|&i| {
            let a = &self.active[i];
            (a.next.is_none(), a.prefill_rank())
        });
        // Spread the running sequences evenly over the pipeline's places: a
        // micro-batch takes at most its share, so that uneven batches (one request
        // arrived alone, the others together) even out within a few steps instead of
        // staying 1 + 7 for good (small batches cost more per token).
        let take = if self.pipeline.max_in_flight() > 1 {
            self.active
                .len()
                .div_ceil(self.pipeline.max_in_flight())
                .max(1)
                .min(ready.len())
        } else {
            ready.len()
        };
        ready.truncate(take);
        let (seqs, tokens, slots) = self.fill_step(&ready);
        if seqs.is_empty() {
            return Ok(false);
        }
        let id = self.next_step;
        self.next_step += 1;
        self.stats
            .last_batch_seqs
            .store(seqs.len(), Ordering::Relaxed);
        self.stats
            .last_batch_tokens
            .store(tokens.len(), Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        for &slot in &slots {
            if let Some(i) = self.index_of(slot) {
                self.active[i].busy = true;
            }
        }
        let started = Instant::now();
        self.in_flight.push(InFlight {
            id,
            seqs: seqs.clone(),
            slots,
            n_tokens: tokens.len(),
            started,
        });
        self.pipeline.launch(id, &seqs, &tokens)?;
        Ok(true)
    }

    /// The batch of one step over the sequences `chosen` (indices into `active`,
    /// decoding ones first): a token for each decoding sequence, then prompt chunks
    /// in order while they fit the budget of `batch` tokens. Prompts go in whole
    /// chunks of `batch` tokens (the last one shorter), cut at the same places
    /// whatever else runs: a chunk's results depend on its length, so a prompt is
    /// processed exactly as alone (llama.cpp's ubatches). A prompt whose chunk does
    /// not fit is marked skipped, and goes first next time.
    fn fill_step(&mut self, chosen: &[usize]) -> (Vec<BatchSeq>, Vec<i32>, Vec<usize>) {
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        let mut slots = Vec::new();
        let chunk = self.cfg.batch.max(1);
        let mut budget = chunk;
        for &i in chosen {
            let a = &mut self.active[i];
            if let Some(t) = a.next {
                seqs.push(BatchSeq {
                    slot: a.slot,
                    pos0: a.pos(),
                    n_tokens: 1,
                    output: OutputRows::Last,
                });
                tokens.push(t);
                slots.push(a.slot);
                continue;
            }
            let n = a.prompt_left().min(chunk);
            if n == 0 {
                continue;
            }
            a.skipped = n > budget;
            if a.skipped {
                continue;
            }
            let done = a.fed + n == a.prompt.len();
            seqs.push(BatchSeq {
                slot: a.slot,
                pos0: a.fed,
                n_tokens: n,
                output: if done {
                    OutputRows::Last
                } else {
                    OutputRows::None
                },
            });
            tokens.extend_from_slice(&a.prompt[a.fed..a.fed + n]);
            slots.push(a.slot);
            budget -= n;
        }
        (seqs, tokens, slots)
    }

    /// Waits for one step and hands its results to the sequences.
    fn complete(&mut self) -> Result<(), EngineError> {
        let (id, outcome) = self.pipeline.wait()?;
        let Some(pos) = self.in_flight.iter().position(|f| f.id == id) else {
            // a late or stray answer (a step that already failed): not ours any more
            tracing::warn!("result of step {id}, which is not in flight, ignored");
            return Ok(());
        };
        let flight = self.in_flight.swap_remove(pos);
        if let Some(o) = &self.observer {
            o.step(
                flight.seqs.len(),
                flight.n_tokens,
                flight.started.elapsed().as_secs_f64(),
            );
        }
        let n_vocab = self.pipeline.n_vocab();
        let mut finished = Vec::new();
        let mut row = 0;
        for (seq, &slot) in flight.seqs.iter().zip(&flight.slots) {
            let Some(i) = self.index_of(slot) else {
                continue;
            };
            let a = &mut self.active[i];
            a.busy = false;
            if a.fed < a.prompt.len() {
                a.fed += seq.n_tokens;
                if a.fed == a.prompt.len() {
                    let _ = a.events.send(GenEvent::Started);
                }
            }
            if seq.output == OutputRows::None {
                continue;
            }
            let r = row;
            row += 1;
            let picked = pick(&outcome, r, &mut a.sampler, n_vocab)?;
            let t = picked.token;
            if a.cancelled {
                finished.push((slot, FinishReason::Cancelled));
                continue;
            }
            if (self.is_eog)(t) {
                a.next = None;
                finished.push((slot, FinishReason::Stop));
                continue;
            }
            a.generated += 1;
            let _ = a.events.send(GenEvent::Token(picked));
            if a.generated >= a.max_tokens {
                a.next = None;
                finished.push((slot, FinishReason::Length));
            } else {
                a.next = Some(t);
            }
        }
        // sequences of this step that were cancelled without an output row
        for &slot in &flight.slots {
            if let Some(i) = self.index_of(slot) {
                if self.active[i].cancelled && !finished.iter().any(|f| f.0 == slot) {
                    finished.push((slot, FinishReason::Cancelled));
                }
            }
        }
        for (slot, reason) in finished {
            if let Some(i) = self.index_of(slot) {
                self.finish(i, reason);
            }
        }
        Ok(())
    }
}

/// The token of output row `r` of a step: sampled by the last stage, or picked
/// here from the row's logits (whole, or the two parts of a split `lm_head`).
fn pick(
    outcome: &StepOutcome,
    r: usize,
    sampler: &mut TokenSampler,
    n_vocab: usize,
) -> Result<Picked, EngineError> {
    let missing = || EngineError::Pipeline("fewer results than output rows came back".into());
    match outcome {
        StepOutcome::Tokens(t) => t.get(r).cloned().ok_or_else(missing),
        StepOutcome::Logits(logits) => {
            let row = logits
                .get(r * n_vocab..(r + 1) * n_vocab)
                .ok_or_else(missing)?;
            sampler.pick(row)
        }
        StepOutcome::Split { rows, mine, theirs } => {
            let (Some(mine), Some(theirs)) = (mine.get(r * rows..(r + 1) * rows), theirs.get(r))
            else {
                return Err(missing());
            };
            sampler.pick_split(mine, theirs, n_vocab)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Link, LinkOutput, StageInput};
    use crate::model::LayerRange;
    use ggml_shim::llama::SamplingParams;
    use std::sync::Mutex;

    const N_VOCAB: usize = 8;

    /// A stage whose every output row picks token 3, recording the batches.
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<BatchSeq>>>>,
        done: VecDeque<(u64, LinkOutput)>,
    }

    impl Link for Recorder {
        fn range(&self) -> LayerRange {
            LayerRange::new(0, 1)
        }
        fn launch(
            &mut self,
            step: u64,
            seqs: &[BatchSeq],
            _: StageInput<'_>,
        ) -> Result<(), EngineError> {
            self.batches.lock().expect("lock").push(seqs.to_vec());
            // slow enough that the later requests arrive while the first decodes
            std::thread::sleep(Duration::from_millis(2));
            let rows: usize = seqs.iter().map(|s| s.output_rows()).sum();
            let mut logits = vec![0.0; rows * N_VOCAB];
            for row in logits.chunks_mut(N_VOCAB) {
                row[3] = 1.0;
            }
            self.done.push_back((step, LinkOutput::Logits(logits)));
            Ok(())
        }
        fn wait(&mut self) -> Result<(u64, LinkOutput), EngineError> {
            self.done
                .pop_front()
                .ok_or_else(|| EngineError::Pipeline("no step in flight".into()))
        }
    }

    type Batches = Arc<Mutex<Vec<Vec<BatchSeq>>>>;

    /// An engine of 4 slots and steps of 5 prompt tokens over a [`Recorder`].
    fn recorded_engine() -> (SchedulerHandle, JoinHandle<()>, Batches) {
        let batches = Batches::default();
        let stage = Recorder {
            batches: batches.clone(),
            done: VecDeque::new(),
        };
        let pipeline = Pipeline::new(vec![Box::new(stage)], 1, N_VOCAB, 256, 4).expect("pipeline");
        let cfg = SchedulerConfig {
            max_slots: 4,
            max_queue: 8,
            batch: 5,
        };
        let (handle, join) = spawn(pipeline, cfg, Arc::new(|_| false), None).expect("spawn");
        (handle, join, batches)
    }

    fn greedy_request(prompt: Vec<i32>, max_tokens: usize) -> (GenRequest, Receiver) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = GenRequest {
            prompt,
            max_tokens,
            sampling: Sampling::from(SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            }),
            events: tx,
        };
        (req, rx)
    }

    type Receiver = tokio::sync::mpsc::UnboundedReceiver<GenEvent>;

    fn wait_done(mut rx: Receiver) {
        while let Some(e) = rx.blocking_recv() {
            if matches!(e, GenEvent::Done { .. }) {
                return;
            }
        }
    }

    /// Short prompts sent while a long one is being prefilled go in the next step
    /// (or the one after, if that step was already planned), and the long prompt
    /// keeps getting a chunk at least every other step.
    #[test]
    fn a_short_prompt_does_not_wait_for_a_long_prefill() {
        let (handle, join, batches) = recorded_engine();
        let long: Vec<i32> = (0..150).map(|t| t % 7).collect();
        let (req, long_rx) = greedy_request(long.clone(), 2);
        handle.submit(req).expect("submit");
        while batches.lock().expect("lock").is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // three short prompts, one after the other, during the long prefill
        let mut marks = Vec::new();
        for len in [3, 4, 2] {
            let (req, rx) = greedy_request((0..len).collect(), 3);
            let mark = batches.lock().expect("lock").len();
            handle.submit(req).expect("submit");
            // the short prompt's only chunk: a whole prompt of `len` tokens
            let is_it = move |s: &BatchSeq| s.pos0 == 0 && s.n_tokens == len as usize;
            marks.push((mark, is_it));
            wait_done(rx);
        }
        wait_done(long_rx);
        handle.shutdown(Duration::from_secs(1));
        join.join().expect("engine thread");
        let batches = batches.lock().expect("lock");
        let long_chunks: Vec<usize> = batches
            .iter()
            .enumerate()
            .filter(|(_, seqs)| seqs.iter().any(|s| s.n_tokens == 5))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(long_chunks.len(), 30, "{batches:?}");
        for (mark, is_it) in marks {
            let at = batches
                .iter()
                .position(|seqs| seqs.iter().any(is_it))
                .expect("the short prompt ran");
            assert!(
                at > mark.saturating_sub(1) && at <= mark + 1,
                "sent after step {mark}, prefilled in step {at}: {batches:?}"
            );
            assert!(
                long_chunks.iter().any(|&c| c > at),
                "the short prompt came after the long prefill: {batches:?}"
            );
        }
        for w in long_chunks.windows(2) {
            assert!(w[1] - w[0] <= 2, "the long prompt waited: {batches:?}");
        }
    }

    /// A prompt is cut into chunks of `batch` tokens at the same places whether it
    /// runs alone or next to decoding sequences (a chunk's results depend on its
    /// length), and the step's decode tokens come on top of the chunk.
    #[test]
    fn prompts_are_cut_at_the_same_places_whatever_else_runs() {
        let (handle, join, batches) = recorded_engine();
        let mut receivers = Vec::new();
        for (len, max_tokens) in [(2, 30), (12, 4), (7, 4)] {
            let (req, rx) = greedy_request((0..len).map(|t| t % 5).collect(), max_tokens);
            handle.submit(req).expect("submit");
            receivers.push(rx);
        }
        receivers.into_iter().for_each(wait_done);
        handle.shutdown(Duration::from_secs(1));
        join.join().expect("engine thread");
        let batches = batches.lock().expect("lock");
        let mut chunks = 0;
        let mut with_decoders = 0;
        for seqs in batches.iter() {
            let prompt_tokens: usize = seqs
                .iter()
                .filter(|s| s.n_tokens > 1)
                .map(|s| s.n_tokens)
                .sum();
            assert!(
                prompt_tokens <= 5,
                "{seqs:?}: more prompt tokens than batch"
            );
            for s in seqs {
                // a decode token continues a sequence past its prompt; anything else is
                // a chunk, which starts at a multiple of 5 and is 5 long unless last
                if s.output == OutputRows::Last && s.n_tokens == 1 && s.pos0 > 0 {
                    continue;
                }
                chunks += 1;
                assert_eq!(s.pos0 % 5, 0, "{seqs:?}: chunk at {}", s.pos0);
                if s.output == OutputRows::None {
                    assert_eq!(s.n_tokens, 5, "{seqs:?}: a chunk before the last is whole");
                }
                if seqs.iter().any(|o| o.n_tokens == 1 && o.pos0 > 0) {
                    with_decoders += 1;
                }
            }
        }
        assert!(chunks >= 5, "{batches:?}");
        assert!(
            with_decoders >= 2,
            "chunks ran next to decoding sequences: {batches:?}"
        );
    }
}
