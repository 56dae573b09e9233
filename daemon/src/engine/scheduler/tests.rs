//! The scheduler over a recording stage: where prompts are cut, who goes first,
//! and what the prompt cache reuses.

use super::*;
use crate::engine::{Link, LinkOutput, StageInput};
use crate::model::LayerRange;
use ggml_shim::llama::SamplingParams;
use std::sync::Mutex;
use std::time::Instant;

const N_VOCAB: usize = 8;

/// A stage whose every output row picks token 3, recording the batches; a step
/// takes 2 ms and `per_token` for each of its tokens.
struct Recorder {
    batches: Arc<Mutex<Vec<Vec<BatchSeq>>>>,
    done: VecDeque<(u64, LinkOutput)>,
    per_token: Duration,
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
        let tokens: usize = seqs.iter().map(|s| s.n_tokens).sum();
        std::thread::sleep(Duration::from_millis(2) + self.per_token * tokens as u32);
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

/// A pipeline of `link` alone, 4 slots.
fn pipeline_of(link: Box<dyn Link>) -> Pipeline {
    Pipeline::new(vec![link], 1, N_VOCAB, 256, 4).expect("pipeline")
}

/// An engine of 4 slots and steps of 5 prompt tokens over `pipeline`.
fn engine_over(pipeline: Pipeline, prompt_cache: bool) -> (SchedulerHandle, JoinHandle<()>) {
    let cfg = SchedulerConfig {
        max_slots: 4,
        max_queue: 8,
        batch: 5,
        prompt_cache,
        step_secs: STEP_SECS,
        // steps here take the same time with or without prompt pieces: the streams
        // are owed nothing (DECODE_SHARE has a test of its own)
        decode_share: 0.0,
    };
    spawn(pipeline, cfg, Arc::new(|_| false), None).expect("spawn")
}

/// [`engine_over`] a [`Recorder`].
fn recorded_engine(prompt_cache: bool) -> (SchedulerHandle, JoinHandle<()>, Batches) {
    let batches = Batches::default();
    let stage = Recorder {
        batches: batches.clone(),
        done: VecDeque::new(),
        per_token: Duration::ZERO,
    };
    let (handle, join) = engine_over(pipeline_of(Box::new(stage)), prompt_cache);
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
    let (handle, join, batches) = recorded_engine(false);
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
    let (handle, join, batches) = recorded_engine(false);
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

/// The next turn of a chat goes to the slot holding the previous one and is
/// prefilled from the last whole chunk it holds; the idle engine first recomputes
/// the chunk the answer completed, so that chunk is reused too.
#[test]
fn the_next_turn_reuses_whole_chunks_of_the_last_one_and_its_answer() {
    let (handle, join, batches) = recorded_engine(true);
    // a request elsewhere keeps a second slot holding something else
    let (req, rx) = greedy_request(vec![6; 7], 2);
    handle.submit(req).expect("submit");
    wait_done(rx);
    // turn 1: 12 prompt tokens (chunks 0..5, 5..10, 10..12), three of its four
    // answer tokens fed back (the recorder always picks 3)
    let turn1: Vec<i32> = (0..12).map(|t| t % 5).collect();
    let (req, rx) = greedy_request(turn1.clone(), 4);
    handle.submit(req).expect("submit");
    wait_done(rx);
    // idle: the chunk 10..15 (prompt and answer) is recomputed as a prompt chunk
    let is_fill = |s: &BatchSeq| s.pos0 == 10 && s.n_tokens == 5 && s.output == OutputRows::None;
    let t0 = Instant::now();
    while !batches.lock().expect("lock").iter().flatten().any(is_fill) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no fill step");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut turn2 = turn1.clone();
    turn2.extend([3, 3, 3, 1, 2, 4]);
    let mark = batches.lock().expect("lock").len();
    let (req, mut rx) = greedy_request(turn2, 2);
    handle.submit(req).expect("submit");
    let mut cached = None;
    while let Some(e) = rx.blocking_recv() {
        match e {
            GenEvent::Started { cached: c } => cached = Some(c),
            GenEvent::Done { .. } => break,
            _ => {}
        }
    }
    handle.shutdown(Duration::from_secs(1));
    join.join().expect("engine thread");
    assert_eq!(cached, Some(15));
    let batches = batches.lock().expect("lock");
    let first = batches[mark..].iter().flatten().next().expect("a step");
    assert_eq!(
        (first.pos0, first.n_tokens, first.output),
        (15, 3, OutputRows::Last)
    );
}

/// Stages on other machines whose first step is lost on the way (a frame dropped).
struct DropsFirstStep {
    done: VecDeque<(u64, LinkOutput)>,
}

impl Link for DropsFirstStep {
    fn range(&self) -> LayerRange {
        LayerRange::new(0, 1)
    }
    fn stages(&self) -> usize {
        2
    }
    fn is_remote(&self) -> bool {
        true
    }
    fn launch(
        &mut self,
        step: u64,
        seqs: &[BatchSeq],
        _: StageInput<'_>,
    ) -> Result<(), EngineError> {
        if step == 1 {
            // long enough for the second request to arrive meanwhile
            std::thread::sleep(Duration::from_millis(50));
            return Ok(());
        }
        let rows: usize = seqs.iter().map(|s| s.output_rows()).sum();
        self.done
            .push_back((step, LinkOutput::Logits(vec![0.0; rows * N_VOCAB])));
        Ok(())
    }
    fn wait(&mut self) -> Result<(u64, LinkOutput), EngineError> {
        self.done
            .pop_front()
            .ok_or_else(|| EngineError::Pipeline("no step in flight".into()))
    }
}

/// Stages pass steps on in order, so a step still in flight when a later one's answer
/// arrives was lost: its sequences fail (however long a slow stage may compute a
/// step, the scheduler does not time steps out).
#[test]
fn a_step_overtaken_by_a_later_ones_answer_was_lost() {
    let pipeline = pipeline_of(Box::new(DropsFirstStep {
        done: VecDeque::new(),
    }));
    assert_eq!(pipeline.max_in_flight(), 2);
    let (handle, join) = engine_over(pipeline, false);
    let mut receivers = Vec::new();
    for prompt in [vec![1, 2], vec![3, 4]] {
        let (req, rx) = greedy_request(prompt, 2);
        handle.submit(req).expect("submit");
        receivers.push(rx);
    }
    for mut rx in receivers {
        let mut error = None;
        while let Some(e) = rx.blocking_recv() {
            match e {
                GenEvent::Error(m) => error = Some(m),
                GenEvent::Done { .. } => break,
                _ => {}
            }
        }
        let error = error.expect("the lost step fails its sequences");
        assert!(
            error.contains("step 1 was lost") && error.contains("step 2"),
            "{error}"
        );
    }
    handle.shutdown(Duration::from_secs(1));
    join.join().expect("engine thread");
}

/// An engine of chunks of 256 tokens and steps of about `step_secs`, over a
/// [`Recorder`] that takes 1 ms per token.
fn timed_engine(step_secs: f64) -> (SchedulerHandle, JoinHandle<()>, Batches) {
    let batches = Batches::default();
    let stage = Recorder {
        batches: batches.clone(),
        done: VecDeque::new(),
        per_token: Duration::from_millis(1),
    };
    let pipeline = Pipeline::new(vec![Box::new(stage)], 1, N_VOCAB, 2048, 4).expect("pipeline");
    let cfg = SchedulerConfig {
        max_slots: 4,
        max_queue: 8,
        batch: 256,
        prompt_cache: false,
        step_secs,
        decode_share: DECODE_SHARE,
    };
    let (handle, join) = spawn(pipeline, cfg, Arc::new(|_| false), None).expect("spawn");
    (handle, join, batches)
}

/// The prompt steps of a 600-token prompt alone on a [`timed_engine`], as
/// (position, tokens).
fn prompt_steps_alone(step_secs: f64) -> Vec<(usize, usize)> {
    let (handle, join, batches) = timed_engine(step_secs);
    let (req, rx) = greedy_request((0..600).map(|t| t % 7).collect(), 1);
    handle.submit(req).expect("submit");
    wait_done(rx);
    handle.shutdown(Duration::from_secs(1));
    join.join().expect("engine thread");
    let batches = batches.lock().expect("lock");
    batches
        .iter()
        .flatten()
        .map(|s| (s.pos0, s.n_tokens))
        .collect()
}

/// A step a request arriving would wait for is about `step_secs` long at the
/// fastest rate seen: a prompt goes in pieces of its chunks (whole minimum pieces,
/// never across a chunk's end), the first one, before any step was timed, the
/// shortest; where the time allows, in whole chunks after that first piece.
#[test]
fn a_prompt_goes_in_steps_of_about_step_secs_at_the_fastest_rate_seen() {
    let g = Granularity::for_chunks(256);
    let short = prompt_steps_alone(0.1);
    let long = prompt_steps_alone(1000.0);
    for steps in [&short, &long] {
        // in order, every token once, none across a multiple of 256
        let mut at = 0;
        for &(pos, n) in steps.iter() {
            assert_eq!(pos, at, "{steps:?}");
            assert_eq!(pos / 256, (pos + n - 1) / 256, "{steps:?}");
            at += n;
        }
        assert_eq!(at, 600, "{steps:?}");
    }
    let Some(g) = g else {
        // no cuts inside chunks on this CPU: whole chunks only
        assert_eq!(short, [(0, 256), (256, 256), (512, 88)]);
        assert_eq!(long, short);
        return;
    };
    // 0.1 s at 1 ms a token (or more): pieces of one or two minimum pieces
    assert_eq!(short[0], (0, g.min_piece), "{short:?}");
    for &(pos, n) in &short {
        let last = pos + n == 600;
        assert!(n <= 2 * g.min_piece, "{short:?}");
        assert!(last || n % g.min_piece == 0, "{short:?}");
    }
    // a budget of whole chunks: the first piece, then the rest of its chunk, then
    // whole chunks
    let m = g.min_piece;
    assert_eq!(long, [(0, m), (m, 256 - m), (256, 256), (512, 88)]);
}

/// A stream decoding beside a long prefill gets steps of its own after each step
/// that carried a piece of the long prompt beside it (a share of that step's time),
/// and the long prompt still goes on beside it.
#[test]
fn a_stream_beside_a_long_prefill_gets_steps_of_its_own() {
    let (handle, join, batches) = timed_engine(0.1);
    let (req, long_rx) = greedy_request((0..1500).map(|t| t % 7).collect(), 1);
    handle.submit(req).expect("submit");
    while batches.lock().expect("lock").is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (req, short_rx) = greedy_request(vec![1, 2, 0, 4, 6, 5], 12);
    handle.submit(req).expect("submit");
    wait_done(short_rx);
    wait_done(long_rx);
    handle.shutdown(Duration::from_secs(1));
    join.join().expect("engine thread");
    let batches = batches.lock().expect("lock");
    let long_slot = batches[0][0].slot;
    // the steps in which the short answer decodes: with a long piece beside or not
    let beside: Vec<bool> = batches
        .iter()
        .filter(|seqs| seqs.iter().any(|s| s.slot != long_slot && s.n_tokens == 1))
        .map(|seqs| seqs.iter().any(|s| s.slot == long_slot))
        .collect();
    assert_eq!(beside.len(), 11, "{batches:?}");
    assert!(
        beside.iter().any(|&b| b),
        "the long prompt stopped: {beside:?}"
    );
    for w in beside.windows(2) {
        assert!(
            !(w[0] && w[1]),
            "no step of its own after a piece: {beside:?}"
        );
    }
}
