//! `exo bench`: prefill and decode speed of exo against llama.cpp (linked in the
//! same binary), same model, same thread count, runs interleaved, medians reported.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use exo::engine::{BatchSeq, OutputRows, Pipeline, PipelineConfig};
use exo::model::{LayerRange, ModelFile};
use ggml_shim::llama::{argmax, init_backend, LogitsWanted, OracleContext, OracleModel};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Path to a GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// CPU threads for both engines.
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens generated for the decode measurement.
    #[arg(long, default_value_t = 128)]
    generate: usize,
    /// Interleaved repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// The median (the upper one of an even count; 0 of none).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Which of two engines goes first in repetition `rep` (0, then 1, then the other way
/// round), so that drift in the machine's load hits both alike.
pub(crate) fn turns(rep: usize) -> [usize; 2] {
    if rep.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// A `/proc/self/status` memory field (e.g. "VmRSS", "VmHWM") in kB.
fn proc_status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rss_kb() -> Option<u64> {
    proc_status_kb("VmRSS")
}

fn peak_rss_kb() -> Option<u64> {
    proc_status_kb("VmHWM")
}

/// Deterministic token ids spread over the vocabulary (skipping the first 256 special/byte ids).
fn bench_tokens(n: usize, n_vocab: usize) -> Vec<i32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (256 + (x % (n_vocab as u64 - 256)) as usize) as i32
        })
        .collect()
}

fn exo_prefill(p: &mut Pipeline, toks: &[i32]) -> Result<Vec<f32>> {
    let seq = BatchSeq {
        slot: 0,
        pos0: 0,
        n_tokens: toks.len(),
        output: OutputRows::Last,
    };
    Ok(p.step(&[seq], toks)?.to_vec())
}

fn exo_decode(p: &mut Pipeline, first: i32, pos0: usize, n: usize) -> Result<()> {
    let mut t = first;
    for i in 0..n {
        let seq = BatchSeq {
            slot: 0,
            pos0: pos0 + i,
            n_tokens: 1,
            output: OutputRows::Last,
        };
        t = argmax(&p.step(&[seq], &[t])?).unwrap_or(0) as i32;
    }
    Ok(())
}

fn llama_decode(ctx: &mut OracleContext, first: i32, pos0: usize, n: usize) -> Result<()> {
    let mut t = first;
    for i in 0..n {
        ctx.decode(&[t], (pos0 + i) as i32, 0, LogitsWanted::Last)?;
        t = argmax(ctx.logits_ith(-1)?).unwrap_or(0) as i32;
    }
    Ok(())
}

/// Measures exo against llama.cpp on one model.
pub fn run(args: BenchArgs) -> Result<()> {
    init_backend();
    let threads = args.threads.unwrap_or_else(crate::default_threads);
    let mf = ModelFile::open(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let hp = mf.hparams.clone();
    let n_ctx = args.prompt + args.generate + 8;
    let rss0 = rss_kb().unwrap_or(0);
    let mut exo = Pipeline::local(
        &mf,
        &PipelineConfig {
            n_ctx,
            n_slots: 1,
            n_threads: threads,
            repack: true,
            ranges: vec![LayerRange::new(0, hp.n_layer)],
        },
    )?;
    let rss_exo = rss_kb().unwrap_or(0).saturating_sub(rss0);
    let oracle = OracleModel::load(&args.model, threads as i32)?;
    let mut ctx = oracle.context(n_ctx as u32, args.prompt.max(1) as u32, 1)?;
    let rss_llama = rss_kb().unwrap_or(0).saturating_sub(rss0 + rss_exo);
    let toks = bench_tokens(args.prompt, hp.n_vocab);
    println!(
        "model {} ({}), {} threads, pp{} / tg{}, {} interleaved repetitions",
        args.model.display(),
        hp.arch,
        threads,
        args.prompt,
        args.generate,
        args.reps
    );
    // warm-up of both
    exo_prefill(&mut exo, &toks[..toks.len().min(16)])?;
    ctx.clear_kv()?;
    ctx.decode(&toks[..toks.len().min(16)], 0, 0, LogitsWanted::Last)?;

    let (mut pp_exo, mut pp_llama, mut tg_exo, mut tg_llama) = (vec![], vec![], vec![], vec![]);
    for rep in 0..args.reps {
        for which in turns(rep) {
            // only the engine being measured keeps its compute threads awake
            exo.set_paused(which != 0);
            if which == 0 {
                let t = Instant::now();
                let logits = exo_prefill(&mut exo, &toks)?;
                pp_exo.push(args.prompt as f64 / t.elapsed().as_secs_f64());
                let first = argmax(&logits).unwrap_or(0) as i32;
                let t = Instant::now();
                exo_decode(&mut exo, first, args.prompt, args.generate)?;
                tg_exo.push(args.generate as f64 / t.elapsed().as_secs_f64());
            } else {
                ctx.clear_kv()?;
                let t = Instant::now();
                ctx.decode(&toks, 0, 0, LogitsWanted::Last)?;
                pp_llama.push(args.prompt as f64 / t.elapsed().as_secs_f64());
                let first = argmax(ctx.logits_ith(-1)?).unwrap_or(0) as i32;
                let t = Instant::now();
                llama_decode(&mut ctx, first, args.prompt, args.generate)?;
                tg_llama.push(args.generate as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    let (pe, pl, te, tl) = (
        median(&mut pp_exo),
        median(&mut pp_llama),
        median(&mut tg_exo),
        median(&mut tg_llama),
    );
    println!(
        "{:<10} {:>12} {:>12} {:>8}",
        "", "exo tok/s", "llama tok/s", "ratio"
    );
    println!(
        "{:<10} {:>12.1} {:>12.1} {:>7.2}x",
        format!("pp{}", args.prompt),
        pe,
        pl,
        pe / pl
    );
    println!(
        "{:<10} {:>12.1} {:>12.1} {:>7.2}x",
        format!("tg{}", args.generate),
        te,
        tl,
        te / tl
    );
    println!(
        "memory: exo stage {} MB resident after load, llama.cpp {} MB; process peak RSS {} MB",
        rss_exo / 1024,
        rss_llama / 1024,
        peak_rss_kb().unwrap_or(0) / 1024
    );
    Ok(())
}
