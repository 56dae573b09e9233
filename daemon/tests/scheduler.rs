//! The scheduler on the real Gemma 3 270M, its steps recorded: a short request sent
//! while a long prompt (over 2,000 tokens) is being prefilled gets its first token
//! within two steps of its arrival and the rest of its answer in the steps right
//! after, beside quarter-chunk pieces of the long prompt, and both answers equal
//! their answers alone.
//! Counted in steps, never in time.

mod harness;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exo::engine::scheduler::{self, GenEvent, GenRequest, SchedulerConfig, SchedulerHandle};
use exo::engine::{
    BatchSeq, EngineError, Link, LinkOutput, Pipeline, Stage, StageConfig, StageInput,
};
use exo::model::{LayerRange, ModelFile};
use exo::tokenizer::Tokenizer;
use ggml_shim::llama::SamplingParams;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Prompt tokens per step (and chunk length).
const BATCH: usize = 256;
/// Tokens of the long prompt: nine chunks.
const LONG: usize = 2_100;

/// The batches of every step launched, in order.
type Log = Arc<Mutex<Vec<Vec<BatchSeq>>>>;

/// A local stage whose steps are recorded.
struct Recorded {
    stage: Stage,
    log: Log,
    done: VecDeque<(u64, LinkOutput)>,
}

impl Link for Recorded {
    fn range(&self) -> LayerRange {
        Link::range(&self.stage)
    }

    fn launch(
        &mut self,
        step: u64,
        seqs: &[BatchSeq],
        input: StageInput<'_>,
    ) -> Result<(), EngineError> {
        self.log.lock().expect("log").push(seqs.to_vec());
        Link::launch(&mut self.stage, step, seqs, input)?;
        let out = Link::wait(&mut self.stage)?;
        self.done.push_back(out);
        Ok(())
    }

    fn wait(&mut self) -> Result<(u64, LinkOutput), EngineError> {
        self.done
            .pop_front()
            .ok_or_else(|| EngineError::Pipeline("no step in flight".into()))
    }
}

fn submit(h: &SchedulerHandle, prompt: &[i32], max_tokens: usize) -> UnboundedReceiver<GenEvent> {
    let (tx, rx) = unbounded_channel();
    h.submit(GenRequest {
        prompt: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
        .into(),
        events: tx,
    })
    .expect("submit");
    rx
}

/// The tokens of a generation, to its end.
fn tokens(mut rx: UnboundedReceiver<GenEvent>) -> Vec<i32> {
    let mut out = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            GenEvent::Token(t) => out.push(t.token),
            GenEvent::Done { .. } => return out,
            GenEvent::Started { .. } => {}
            other => panic!("generation failed: {other:?}"),
        }
    }
    panic!("the engine went away")
}

/// The index of the first step at or after `from` holding a chunk of `len` prompt
/// tokens from position 0 (a whole short prompt).
fn whole_prompt_step(log: &[Vec<BatchSeq>], from: usize, len: usize) -> Option<usize> {
    (from..log.len()).find(|&i| log[i].iter().any(|s| s.pos0 == 0 && s.n_tokens == len))
}

#[test]
fn a_short_request_is_answered_within_steps_of_a_long_prefill() {
    let Some(path) = harness::real_model() else {
        return;
    };
    ggml_shim::llama::init_backend();
    let mf = ModelFile::open(&path).expect("model");
    let hp = mf.hparams.clone();
    let tok = Tokenizer::load(&path, hp.arch.name()).expect("tokenizer");
    let short = tok.encode("The capital of France is").expect("tokenize");
    let mut long = Vec::new();
    let filler = "In the old harbour town the fishermen mended their nets each morning, \
                  told stories of storms and calm seas, and counted the boats. ";
    while long.len() < LONG {
        long.extend(tok.encode(filler).expect("tokenize"));
    }
    long.truncate(LONG);
    assert!(short.len() < BATCH);

    let log = Log::default();
    let stage = Stage::load(
        &mf,
        StageConfig {
            range: LayerRange::new(0, hp.n_layer),
            n_ctx: LONG + 64,
            n_slots: 2,
            n_threads: 1,
            repack: true,
            lm_head_rows: None,
        },
    )
    .expect("stage");
    let link = Recorded {
        stage,
        log: log.clone(),
        done: VecDeque::new(),
    };
    let pipeline =
        Pipeline::new(vec![Box::new(link)], hp.n_layer, hp.n_vocab, LONG + 64, 2).expect("pipe");
    let cfg = SchedulerConfig {
        max_slots: 2,
        max_queue: 4,
        batch: BATCH,
        // the long prompt is sent twice and must be prefilled both times
        prompt_cache: false,
        step_secs: scheduler::STEP_SECS,
        decode_share: scheduler::DECODE_SHARE,
    };
    let eog = {
        let tok = Tokenizer::load(&path, hp.arch.name()).expect("tokenizer");
        Arc::new(move |t| tok.is_eog(t))
    };
    let (h, join) = scheduler::spawn(pipeline, cfg, eog, None).expect("scheduler");

    // alone
    let short_alone = tokens(submit(&h, &short, 8));
    let long_alone = tokens(submit(&h, &long, 4));
    assert!(!short_alone.is_empty() && !long_alone.is_empty());

    // together: the short request once the long prompt's first chunk has run
    let start = log.lock().expect("log").len();
    let long_rx = submit(&h, &long, 4);
    while log.lock().expect("log").len() <= start {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mark = log.lock().expect("log").len();
    let short_rx = submit(&h, &short, 8);
    let short_together = tokens(short_rx);
    let long_together = tokens(long_rx);
    h.shutdown(Duration::from_secs(1));
    join.join().expect("engine thread");

    let log = log.lock().expect("log");
    let at = whole_prompt_step(&log, start, short.len()).expect("the short prompt ran");
    let long_chunks: Vec<usize> = (start..log.len())
        .filter(|&i| log[i].iter().any(|s| s.n_tokens > short.len()))
        .collect();
    // the short answer's tokens: one a step, each step's prompt pieces a quarter chunk
    let short_slot = log[at]
        .iter()
        .find(|s| s.pos0 == 0 && s.n_tokens == short.len())
        .expect("short prompt")
        .slot;
    let decode_steps: Vec<usize> = (at + 1..log.len())
        .filter(|&i| {
            log[i]
                .iter()
                .any(|s| s.slot == short_slot && s.n_tokens == 1)
        })
        .collect();
    let pieces: Vec<usize> = decode_steps
        .iter()
        .flat_map(|&i| log[i].iter().filter(|s| s.n_tokens > 1).map(|s| s.n_tokens))
        .collect();
    eprintln!(
        "short request sent after step {} of the long prefill's {} chunks; \
         its prompt (and first token) in step {}; long chunks in steps {:?}",
        mark - start,
        LONG.div_ceil(BATCH),
        at - start,
        long_chunks.iter().map(|c| c - start).collect::<Vec<_>>()
    );
    // its first token comes from the step holding its prompt: the next step, or the
    // one after if that one was already planned when it arrived
    assert!(
        at >= mark && at <= mark + 1,
        "sent after step {mark}, its prompt ran in step {at}"
    );
    assert!(
        long_chunks.iter().any(|&c| c > at),
        "the long prefill was over before the short request ran: the test proves nothing"
    );
    eprintln!(
        "short answer decoded in steps {:?}, beside prompt pieces {pieces:?}",
        decode_steps.iter().map(|c| c - start).collect::<Vec<_>>()
    );
    assert_eq!(
        decode_steps,
        (at + 1..at + short_together.len()).collect::<Vec<_>>(),
        "the short answer's tokens in consecutive steps"
    );
    assert!(
        !pieces.is_empty() && pieces.iter().all(|&n| n <= BATCH / 4),
        "the long prompt beside the short answer in quarter-chunk pieces: {pieces:?}"
    );
    assert_eq!(
        short_together, short_alone,
        "the short answer beside a long prefill"
    );
    assert_eq!(
        long_together, long_alone,
        "the long answer with a short request beside it"
    );
}
