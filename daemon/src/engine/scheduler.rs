//! Continuous batching: one engine thread owns the pipeline; requests join and
//! leave between steps. Every step decodes one token for each running sequence
//! and spends a budget of prompt tokens (at most `batch`, and about a second's
//! worth, below) on prompt chunks of newly admitted ones, so a long prompt never
//! stalls running streams. Prompts share that budget
//! fairly ([`Active::prefill_rank`]): the one that has had the fewest tokens goes
//! first, and one left out of a step goes first in the next, so a short prompt
//! arriving during a long one's prefill is through within a step or two, and the
//! long one still gets at least every other step among the prompts (decoding
//! streams may be owed steps of their own, below).
//!
//! A request that arrives waits for the step in flight, and a step of a big model
//! on a small node is slow (an 8B model on one core prefills about 5 tokens a
//! second: a 512-token chunk takes 100 s). So prompts go in pieces of their chunks,
//! cut where ggml's kernels give the same numbers, and a step holds about what the
//! fastest step so far computed in [`STEP_SECS`] (at least one piece): a quarter
//! chunk at most next to decoding sequences, so their steps stay short. Even so a
//! piece can take far longer than a token (64 tokens of the 8B: 12 s), so after a
//! step with pieces beside decoding streams, the streams have steps of their own
//! for [`DECODE_SHARE`] of the time the pieces added to it before the prompts that
//! already started go on (a new prompt's first piece does not wait).
//!
//! A prompt goes to the slot whose KV cache holds the longest reusable prefix of it
//! ([`PrefixCache`]) and is prefilled from there; while nothing else runs, the whole
//! chunks that answers completed are recomputed so that the next turn of a chat
//! reuses them too. Those recomputations go in steps of about [`STEP_SECS`] too, or
//! not at all where even the shortest piece would take longer (on the 8B, 64 tokens
//! of such speculative work held up every new request for over 12 s).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::kv::{Fill, Granularity, PrefixCache};
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
    /// Reuse the KV cache of earlier requests' prompt prefixes ([`PrefixCache`]).
    pub prompt_cache: bool,
    /// About the longest a step that can be cut may take ([`STEP_SECS`]).
    pub step_secs: f64,
    /// The decoding streams' share beside a long prefill ([`DECODE_SHARE`]; 0: none).
    pub decode_share: f64,
}

/// About the longest a step of prompt pieces or of an idle engine's recomputation
/// ([`PrefixCache::next_fill`]) should take, at the fastest per-token rate of the
/// steps so far: a request that arrives meanwhile waits for it.
pub const STEP_SECS: f64 = 1.0;

/// After a step that carried prompt pieces beside decoding sequences, steps without
/// pieces of started prompts run for this share of what the pieces added to it:
/// decoding streams get about a fifth of the engine beside a long prefill, which
/// keeps about four fifths.
pub const DECODE_SHARE: f64 = 0.25;

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
    /// The prompt has been processed; generation starts. `cached` of its tokens
    /// came from the KV cache of an earlier request (not prefilled again).
    Started {
        cached: usize,
    },
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
    /// Prompt tokens taken from the KV cache of earlier requests.
    pub prompt_tokens_cached: AtomicUsize,
    /// Prompt tokens prefilled.
    pub prompt_tokens_prefilled: AtomicUsize,
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
    let n_slots = pipeline.slots.n_slots();
    let mut engine = Engine {
        cache: PrefixCache::new(n_slots.min(cfg.max_slots), cfg.batch, cfg.prompt_cache),
        kv_generation: pipeline.kv_generation(),
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
        fastest_token_secs: None,
        owed_decode_secs: 0.0,
        decode_step_secs: 0.0,
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
    /// Of those, the ones an earlier request left there.
    cached: usize,
    /// Tokens fed after the prompt (generated ones).
    decoded: Vec<i32>,
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
    /// Whether it carried decode tokens, prompt tokens, whether streams were
    /// decoding (in it or in another micro-batch) when it was launched, and whether
    /// it went behind a step with prompt tokens ([`DECODE_SHARE`]).
    decoding: bool,
    prompting: bool,
    beside_streams: bool,
    behind_prompt: bool,
    /// A chunk recomputed in a free slot ([`PrefixCache::next_fill`]).
    fill: Option<Fill>,
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
    /// What every slot's KV cache holds.
    cache: PrefixCache,
    /// The pipeline's [`Pipeline::kv_generation`] the cache describes.
    kv_generation: u64,
    /// The fewest seconds per token a step has taken (since the stages last
    /// changed), which sizes prompt and recomputation steps ([`STEP_SECS`]).
    fastest_token_secs: Option<f64>,
    /// Seconds of steps without pieces of started prompts still owed to decoding
    /// sequences ([`DECODE_SHARE`]), and how long the last such step took (both
    /// since the stages last changed).
    owed_decode_secs: f64,
    decode_step_secs: f64,
}

impl Engine {
    fn run(&mut self, rx: std_mpsc::Receiver<Command>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && self.in_flight.is_empty() {
                if self.deadline.is_some() {
                    return;
                }
                if self.cache.has_fill(self.step_rows()) {
                    // idle with chunks to recompute: one step of them, then look again
                    while let Ok(cmd) = rx.try_recv() {
                        self.command(cmd);
                    }
                    if self.waiting.is_empty() && self.deadline.is_none() {
                        if let Err(e) = self.fill() {
                            self.fail_all(&e.to_string());
                        }
                    }
                    continue;
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
        self.give_back(&a);
        self.stats.active.store(self.active.len(), Ordering::SeqCst);
        let _ = a.events.send(GenEvent::Done {
            reason,
            prompt_tokens: a.prompt.len(),
            completion_tokens: a.generated,
        });
    }

    /// Returns a sequence's slot to the cache, with the tokens its KV cells hold.
    fn give_back(&mut self, a: &Active) {
        let mut held = a.prompt[..a.fed].to_vec();
        if a.fed == a.prompt.len() {
            held.extend_from_slice(&a.decoded);
        }
        self.cache.release(a.slot, held, a.fed);
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
            self.give_back(&a);
            let _ = a.events.send(GenEvent::ShuttingDown);
        }
        self.stats.active.store(0, Ordering::SeqCst);
    }

    fn fail_all(&mut self, msg: &str) {
        tracing::error!("engine step failed: {msg}");
        for a in std::mem::take(&mut self.active) {
            self.cache.release(a.slot, Vec::new(), 0);
            let _ = a.events.send(GenEvent::Error(msg.to_string()));
        }
        for f in std::mem::take(&mut self.in_flight) {
            if let Some(fill) = f.fill {
                self.cache.filled(&fill, false);
            }
        }
        // a step may have reached some stages and not others
        self.cache.forget_all();
        self.stats.active.store(0, Ordering::SeqCst);
    }

    fn admit(&mut self) {
        // a chunk being recomputed may be the very one the next request wants
        if self.in_flight.iter().any(|f| f.fill.is_some()) {
            return;
        }
        let generation = self.pipeline.kv_generation();
        if generation != self.kv_generation {
            tracing::info!(
                "a stage lost its KV cache (a peer restarted): nothing cached is reused"
            );
            self.cache.forget_all();
            self.kv_generation = generation;
            // the stages changed: their speed is measured afresh
            self.fastest_token_secs = None;
            self.decode_step_secs = 0.0;
            self.owed_decode_secs = 0.0;
        }
        while self.active.len() < self.cfg.max_slots && self.deadline.is_none() {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            let Some(claim) = self.cache.claim(&req.prompt) else {
                self.waiting.push_front(req);
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let slot = claim.slot;
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
                    self.cache
                        .release(slot, req.prompt[..claim.cached].to_vec(), claim.cached);
                    let _ = req.events.send(GenEvent::Error(e.to_string()));
                    continue;
                }
            };
            self.stats
                .prompt_tokens_cached
                .fetch_add(claim.cached, Ordering::Relaxed);
            self.active.push(Active {
                slot,
                prompt: req.prompt,
                fed: claim.cached,
                cached: claim.cached,
                decoded: Vec::new(),
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
        // decoding sequences all go in, a token each
        let n_decoding = ready
            .iter()
            .filter(|&&i| self.active[i].next.is_some())
            .count();
        let streams = self.streams_decoding();
        if !streams {
            // nothing decodes: nothing is owed to anyone
            self.owed_decode_secs = 0.0;
        }
        let (seqs, tokens, slots) = self.fill_step(&ready, streams);
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
            decoding: n_decoding > 0,
            prompting: tokens.len() > n_decoding,
            beside_streams: streams,
            behind_prompt: self.in_flight.iter().any(|f| f.prompting),
            fill: None,
        });
        self.pipeline.launch(id, &seqs, &tokens)?;
        Ok(true)
    }

    /// Launches one chunk of a free slot's tokens recomputed as a prompt chunk
    /// ([`PrefixCache::next_fill`]), with no output rows.
    fn fill(&mut self) -> Result<(), EngineError> {
        let Some(fill) = self.cache.next_fill(self.step_rows()) else {
            return Ok(());
        };
        let seqs = [BatchSeq {
            slot: fill.slot,
            pos0: fill.pos0,
            n_tokens: fill.tokens.len(),
            output: OutputRows::None,
        }];
        let id = self.next_step;
        self.next_step += 1;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let tokens = fill.tokens.clone();
        self.in_flight.push(InFlight {
            id,
            seqs: seqs.to_vec(),
            slots: Vec::new(),
            n_tokens: tokens.len(),
            started: Instant::now(),
            decoding: false,
            prompting: true,
            beside_streams: false,
            behind_prompt: false,
            fill: Some(fill),
        });
        self.pipeline.launch(id, &seqs, &tokens)?;
        Ok(())
    }

    /// Whether any sequence decodes (in a step in flight or not).
    fn streams_decoding(&self) -> bool {
        self.active.iter().any(|a| a.next.is_some())
    }

    /// The tokens a short step holds: what the fastest step so far computed in
    /// [`STEP_SECS`] (none before any step has run).
    fn step_rows(&self) -> usize {
        self.fastest_token_secs
            .map_or(0, |s| (self.cfg.step_secs / s) as usize) // saturating
    }

    /// The batch of one step over the sequences `chosen` (indices into `active`,
    /// decoding ones first): a token for each decoding sequence, then prompt chunks
    /// in order while they fit the step's budget of prompt tokens: `batch`, or what
    /// the fastest step so far computed in [`STEP_SECS`] if less (the first piece
    /// always goes). Prompts go in chunks ending at multiples of `batch` tokens (the
    /// last one at the prompt's end), cut at the same places whatever else runs: a
    /// chunk's results depend on its length, so a prompt is processed exactly as
    /// alone (llama.cpp's ubatches); a prompt resumed from a cached prefix inside a
    /// chunk first prefills the rest of it. A chunk goes in pieces of about the
    /// budget, a quarter chunk at most next to decoding sequences
    /// ([`Granularity::piece`]), which give it the same numbers. A prompt whose piece
    /// does not fit is marked skipped, and goes first next time. `decoding`: whether
    /// any stream decodes, here or in another micro-batch (whose next steps queue
    /// behind this one at every stage).
    fn fill_step(
        &mut self,
        chosen: &[usize],
        decoding: bool,
    ) -> (Vec<BatchSeq>, Vec<i32>, Vec<usize>) {
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        let mut slots = Vec::new();
        let chunk = self.cfg.batch.max(1);
        // before any step, one piece (which times the pipeline)
        let rows = self.step_rows().min(chunk);
        let mut budget = rows;
        let mut first_piece = true;
        let target = if decoding { rows.min(chunk / 4) } else { rows };
        // the decoding streams' own steps first, if at least half of one is owed (a
        // new prompt still starts)
        let hold_started = decoding && self.owed_decode_secs > self.decode_step_secs / 2.0;
        let cuts = Granularity::for_chunks(chunk);
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
                a.decoded.push(t);
                slots.push(a.slot);
                continue;
            }
            if hold_started && a.fed > a.cached {
                continue;
            }
            // up to the next multiple of `chunk` (a cached prefix may end inside one)
            let rest = a.prompt_left().min(chunk - a.fed % chunk);
            let n = cuts.map_or(rest, |g| g.piece(rest, target));
            if n == 0 {
                continue;
            }
            a.skipped = n > budget && !first_piece;
            if a.skipped {
                continue;
            }
            first_piece = false;
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
            budget = budget.saturating_sub(n);
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
        lost_before(&self.in_flight, id)?;
        let flight = self.in_flight.swap_remove(pos);
        if let Some(fill) = &flight.fill {
            self.cache.filled(fill, true);
        }
        let secs = flight.started.elapsed().as_secs_f64();
        if flight.prompting && flight.beside_streams {
            let added = (secs - self.decode_step_secs).max(0.0);
            self.owed_decode_secs += self.cfg.decode_share * added;
        } else if flight.decoding && !flight.prompting && !flight.behind_prompt {
            // a step of the streams' own (one that waited behind a prompt's step at
            // the stages tells neither)
            self.owed_decode_secs = (self.owed_decode_secs - secs).max(0.0);
            self.decode_step_secs = secs;
        }
        if let Some(o) = &self.observer {
            o.step(flight.seqs.len(), flight.n_tokens, secs);
        }
        if flight.n_tokens > 0 {
            let per_token = secs / flight.n_tokens as f64;
            self.fastest_token_secs = Some(
                self.fastest_token_secs
                    .map_or(per_token, |f| f.min(per_token)),
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
                self.stats
                    .prompt_tokens_prefilled
                    .fetch_add(seq.n_tokens, Ordering::Relaxed);
                if a.fed == a.prompt.len() {
                    let _ = a.events.send(GenEvent::Started { cached: a.cached });
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

/// Every stage computes steps in the order they come and passes them on in that
/// order, so the answer to step `answered` comes after those of every step launched
/// before it: one still in flight was lost on the way (a frame dropped), and the KV
/// cache of its sequences misses its tokens.
fn lost_before(in_flight: &[InFlight], answered: u64) -> Result<(), EngineError> {
    match in_flight.iter().map(|f| f.id).filter(|&id| id < answered).min() {
        Some(lost) => Err(EngineError::Pipeline(format!(
            "step {lost} was lost on the way: the answer to step {answered}, launched after it, came first"
        ))),
        None => Ok(()),
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
mod tests;
