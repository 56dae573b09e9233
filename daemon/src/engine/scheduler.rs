//! Continuous batching: one engine thread owns the pipeline; requests join and
//! leave between steps. Every step decodes one token for each running sequence
//! and spends what is left of the token budget on prompt chunks of newly admitted
//! ones, so a long prompt never stalls running streams.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ggml_shim::llama::{argmax, SamplerChain, SamplingParams};
use tokio::sync::mpsc::UnboundedSender;

use super::{BatchSeq, EngineError, OutputRows, Pipeline};

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoding together (at most the pipeline's slots).
    pub max_slots: usize,
    /// Requests waiting for a slot beyond which new ones are refused.
    pub max_queue: usize,
    /// Tokens per step (decode tokens plus prompt chunks).
    pub batch: usize,
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
    Token(i32),
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
    pub sampling: SamplingParams,
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

/// Starts the engine thread.
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
        n_vocab: pipeline.hparams().n_vocab,
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
    sampler: Option<SamplerChain>,
    events: UnboundedSender<GenEvent>,
}

impl Active {
    fn pos(&self) -> usize {
        self.fed + self.generated.saturating_sub(1)
    }
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
}

impl Engine {
    fn run(&mut self, rx: std_mpsc::Receiver<Command>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
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
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                self.cancel_all();
                return;
            }
            self.drop_cancelled();
            self.admit();
            if let Err(e) = self.step() {
                self.fail_all(&e.to_string());
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
                    let _ = req
                        .events
                        .send(GenEvent::Error("the server is shutting down".into()));
                }
            }
        }
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

    /// Frees the slots of requests whose owner has gone away.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].events.is_closed() {
                self.finish(i, FinishReason::Cancelled);
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
        for a in self.active.drain(..) {
            self.pipeline.slots.release(a.slot);
            let _ = a.events.send(GenEvent::ShuttingDown);
        }
        self.stats.active.store(0, Ordering::SeqCst);
    }

    fn fail_all(&mut self, msg: &str) {
        for a in self.active.drain(..) {
            self.pipeline.slots.release(a.slot);
            let _ = a.events.send(GenEvent::Error(msg.to_string()));
        }
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
            let greedy = req.sampling.temperature <= 0.0
                && req.sampling.repeat_penalty == 1.0
                && req.sampling.frequency_penalty == 0.0
                && req.sampling.presence_penalty == 0.0;
            let sampler = if greedy {
                None
            } else {
                match SamplerChain::new(&req.sampling) {
                    Ok(mut s) => {
                        for &t in &req.prompt {
                            s.accept(t);
                        }
                        Some(s)
                    }
                    Err(e) => {
                        self.pipeline.slots.release(slot);
                        let _ = req.events.send(GenEvent::Error(e.to_string()));
                        continue;
                    }
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
            });
        }
        self.stats.active.store(self.active.len(), Ordering::SeqCst);
    }

    /// One batched step: a token for every decoding sequence, prompt chunks for the rest.
    fn step(&mut self) -> Result<(), EngineError> {
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        let mut owners = Vec::new();
        for (i, a) in self.active.iter().enumerate() {
            if let Some(t) = a.next {
                seqs.push(BatchSeq {
                    slot: a.slot,
                    pos0: a.pos(),
                    n_tokens: 1,
                    output: OutputRows::Last,
                });
                tokens.push(t);
                owners.push(i);
            }
        }
        let mut budget = self.cfg.batch.saturating_sub(tokens.len()).max(1);
        for (i, a) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if a.fed < a.prompt.len() {
                let n = (a.prompt.len() - a.fed).min(budget);
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
                owners.push(i);
                budget -= n;
            }
        }
        if seqs.is_empty() {
            return Ok(());
        }
        self.stats
            .last_batch_seqs
            .store(seqs.len(), Ordering::Relaxed);
        self.stats
            .last_batch_tokens
            .store(tokens.len(), Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let n_vocab = self.pipeline.hparams().n_vocab;
        let logits = self.pipeline.step(&seqs, &tokens)?;
        if let Some(o) = &self.observer {
            o.step(seqs.len(), tokens.len(), t0.elapsed().as_secs_f64());
        }
        // Rows come back in batch order, one per sequence with output.
        let mut finished = Vec::new();
        let mut row = 0;
        for (seq, &i) in seqs.iter().zip(&owners) {
            let a = &mut self.active[i];
            if a.fed < a.prompt.len() {
                a.fed += seq.n_tokens;
                if a.fed == a.prompt.len() {
                    let _ = a.events.send(GenEvent::Started);
                }
            }
            if seq.output == OutputRows::None {
                continue;
            }
            let Some(l) = logits.get(row * n_vocab..(row + 1) * n_vocab) else {
                return Err(EngineError::Pipeline(
                    "fewer logit rows than outputs".into(),
                ));
            };
            row += 1;
            let t = match a.sampler.as_mut() {
                None => argmax(l).map(|t| t as i32).unwrap_or(0),
                Some(s) => {
                    let t = s.sample(l)?;
                    s.accept(t);
                    t
                }
            };
            if (self.is_eog)(t) {
                a.next = None;
                finished.push((i, FinishReason::Stop));
                continue;
            }
            a.generated += 1;
            let _ = a.events.send(GenEvent::Token(t));
            if a.generated >= a.max_tokens {
                a.next = None;
                finished.push((i, FinishReason::Length));
            } else {
                a.next = Some(t);
            }
        }
        // Remove from the highest index down so swap_remove keeps the others valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            self.finish(i, reason);
        }
        Ok(())
    }
}
