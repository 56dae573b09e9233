//! `exo bench-serve`: aggregate generated tok/s and median time-to-first-token of
//! `exo serve` (in-process, through real HTTP on 127.0.0.1) at several stream counts,
//! beside llama.cpp's own batched decode (`llama_decode` with the same number of
//! sequences, same threads), runs interleaved, medians reported as ratios.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use exo::serve::{serve, ServeSettings};
use exo::tokenizer::Tokenizer;
use ggml_shim::llama::{argmax, init_backend, LogitsWanted, OracleModel};

use crate::bench::{median, turns};
use crate::http_client;

#[derive(clap::Args)]
pub struct BenchServeArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    threads: Option<usize>,
    /// Concurrent streams to measure, comma-separated.
    #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Prompt tokens of the long request of the prefill-fairness line (0 skips it).
    #[arg(long, default_value_t = 2000)]
    long_prompt: usize,
}

pub(crate) const PROMPTS: &[&str] = &[
    "The history of the printing press begins",
    "In a quiet village by the sea, an old fisherman",
    "The main ingredients of bread are",
    "Photosynthesis is the process by which",
    "The first computers were built",
    "A good night's sleep helps",
    "The river flowed through the valley and",
    "Mathematics is the study of",
];

/// One streamed completion: (ttft, completion tokens).
pub(crate) async fn stream_one(
    addr: std::net::SocketAddr,
    prompt: &str,
    tokens: usize,
) -> Result<(f64, usize)> {
    stream_marked(addr, prompt, tokens, None).await
}

/// What a stream tells its round's watcher.
enum Mark {
    /// Its first event arrived (its prompt is in the KV cache, it decodes).
    First,
    /// It ended.
    Done,
}

/// One streamed completion; its first event and its end are told to `marks`.
/// Returns (seconds to its first event, its completion tokens).
async fn stream_marked(
    addr: std::net::SocketAddr,
    prompt: &str,
    tokens: usize,
    marks: Option<tokio::sync::mpsc::UnboundedSender<Mark>>,
) -> Result<(f64, usize)> {
    let t0 = Instant::now();
    let body = serde_json::json!({
        "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}
    });
    let mut response = http_client::post_json(addr, "/v1/completions", &body).await?;
    if response.status() != hyper::StatusCode::OK {
        bail!("server answered: {}", response.status_line());
    }
    let mark = |m: Mark| {
        if let Some(tx) = &marks {
            let _ = tx.send(m);
        }
    };
    let mut buf = Vec::new();
    let mut ttft = None;
    let mut usage = None;
    let mut last_event = String::new();
    while let Some(chunk) = response.chunk().await? {
        buf.extend_from_slice(&chunk);
        // whole events ("data: …\n\n") as they arrive
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if ttft.is_none() {
                ttft = Some(t0.elapsed().as_secs_f64());
                mark(Mark::First);
            }
            last_event = data.to_string();
            let usage_now = serde_json::from_str::<serde_json::Value>(data)
                .ok()
                .and_then(|v| v["usage"]["completion_tokens"].as_u64());
            if let Some(c) = usage_now {
                usage = Some(c as usize);
            }
        }
    }
    mark(Mark::Done);
    match (ttft, usage) {
        (Some(ttft), Some(tokens)) => Ok((ttft, tokens)),
        _ => bail!("no usage in the stream; its last event: {last_event}"),
    }
}

/// The server's count of generated tokens (`exo_generated_tokens_total`) and when
/// it was read.
async fn generated(addr: std::net::SocketAddr) -> Option<(f64, Instant)> {
    let text = http_client::get(addr, "/metrics")
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let n = text
        .lines()
        .find_map(|l| l.strip_prefix("exo_generated_tokens_total "))
        .and_then(|v| v.trim().parse().ok())?;
    Some((n, Instant::now()))
}

/// One round of `n` concurrent streams: aggregate tok/s (from the requests to the
/// last token, prefill included), median ttft, and the steady decode rate: tokens
/// the server generated (its /metrics) from the moment every stream had its first
/// token to the moment the first one ended, over that time (no prefill in it;
/// None when the server has no such counter or the window is empty).
async fn exo_round(
    addr: std::net::SocketAddr,
    n: usize,
    tokens: usize,
) -> Result<(f64, f64, Option<f64>)> {
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..n {
        let p = PROMPTS[i % PROMPTS.len()];
        let tx = tx.clone();
        tasks.push(tokio::spawn(stream_marked(addr, p, tokens, Some(tx))));
    }
    drop(tx);
    let watcher = tokio::spawn(async move {
        let (mut firsts, mut start, mut rate) = (0, None, None);
        while let Some(m) = rx.recv().await {
            match m {
                Mark::First => {
                    firsts += 1;
                    if firsts == n {
                        start = generated(addr).await;
                    }
                }
                Mark::Done if rate.is_none() => {
                    let end = generated(addr).await;
                    rate = Some(match (start, end) {
                        (Some((a, ta)), Some((b, tb))) if tb > ta && b > a => {
                            Some((b - a) / (tb - ta).as_secs_f64())
                        }
                        _ => None,
                    });
                }
                Mark::Done => {}
            }
        }
        rate.flatten()
    });
    let (mut total, mut ttfts) = (0, Vec::new());
    for t in tasks {
        let (ttft, k) = t.await??;
        total += k;
        ttfts.push(ttft);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let rate = watcher.await?;
    Ok((total as f64 / elapsed, median(&mut ttfts), rate))
}

fn llama_round(
    ctx: &mut ggml_shim::llama::OracleContext,
    prompts: &[Vec<i32>],
    tokens: usize,
) -> Result<(f64, f64)> {
    ctx.clear_kv()?;
    let t0 = Instant::now();
    let mut next = Vec::new();
    let mut pos = Vec::new();
    for (s, p) in prompts.iter().enumerate() {
        ctx.decode(p, 0, s as i32, LogitsWanted::Last)?;
        next.push(argmax(ctx.logits_ith(-1)?).unwrap_or(0) as i32);
        pos.push(p.len() as i32);
    }
    let ttft = t0.elapsed().as_secs_f64();
    for _ in 1..tokens {
        let entries: Vec<(i32, i32, i32)> = (0..prompts.len())
            .map(|s| (next[s], pos[s], s as i32))
            .collect();
        ctx.decode_multi(&entries)?;
        for s in 0..prompts.len() {
            next[s] = argmax(ctx.logits_ith(s as i32)?).unwrap_or(0) as i32;
            pos[s] += 1;
        }
    }
    Ok((
        (prompts.len() * tokens) as f64 / t0.elapsed().as_secs_f64(),
        ttft,
    ))
}

#[derive(clap::Args)]
pub struct BenchClientArgs {
    /// A running `exo serve` (e.g. a cluster head): host:port.
    #[arg(long)]
    addr: std::net::SocketAddr,
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

/// Measures an already running server: aggregate tok/s and median TTFT per concurrency.
pub fn client(args: BenchClientArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        stream_one(args.addr, "warm up", 2).await?;
        for &n in &args.concurrency {
            let (mut tps, mut ttft, mut decode) = (vec![], vec![], vec![]);
            for _ in 0..args.reps {
                let (t, f, d) = exo_round(args.addr, n, args.tokens).await?;
                tps.push(t);
                ttft.push(f);
                decode.extend(d);
            }
            let decode = match decode.is_empty() {
                true => "-".to_string(),
                false => format!("{:.2}", median(&mut decode)),
            };
            println!(
                "streams {n:>3}: {:>8.2} tok/s aggregate, median ttft {:>7.1} ms, steady decode {decode} tok/s",
                median(&mut tps),
                median(&mut ttft) * 1e3
            );
        }
        Ok(())
    })
}

/// The async runtime of the HTTP side (and, in `exo bench-serve`, of the server).
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `exo serve` running in this process on 127.0.0.1.
pub(crate) struct InProcess {
    pub(crate) addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl InProcess {
    /// Starts serving `settings` on a free port (the model loads in the background).
    pub(crate) fn start(rt: &tokio::runtime::Runtime, settings: ServeSettings) -> Result<Self> {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(serve(listener, settings, async move {
            let _ = stop_rx.await;
        }));
        Ok(InProcess { addr, stop, task })
    }

    /// The settings of a benchmark's server: `n_ctx` positions per slot, steps of 512
    /// prompt tokens, no key.
    pub(crate) fn settings(
        model: &std::path::Path,
        threads: usize,
        n_ctx: usize,
        max_slots: usize,
    ) -> ServeSettings {
        ServeSettings {
            model: Some(model.to_path_buf()),
            n_ctx,
            max_slots,
            max_queue: 8,
            batch: 512,
            // every repetition sends the same prompts, which llama.cpp prefills anew
            prompt_cache: false,
            threads,
            memory: None,
            api_key: None,
            web: true,
            max_body_bytes: 1 << 20,
            http: Default::default(),
            shutdown_timeout: Duration::from_secs(2),
            cluster: None,
        }
    }

    /// Shuts the server down and waits for it.
    pub(crate) fn stop(self, rt: &tokio::runtime::Runtime) {
        let _ = self.stop.send(());
        let _ = rt.block_on(self.task);
    }
}

/// Measures `exo serve` in this process against llama.cpp's batched decode.
pub fn run(args: BenchServeArgs) -> Result<()> {
    init_backend();
    let threads = args.threads.unwrap_or_else(crate::default_threads);
    let max_n = args.concurrency.iter().copied().max().unwrap_or(1);
    let rt = runtime()?;
    let settings = InProcess::settings(&args.model, threads, 512, max_n);
    let settings = ServeSettings {
        max_queue: 64,
        ..settings
    };
    let server = InProcess::start(&rt, settings)?;
    let addr = server.addr;
    // wait until the model is loaded
    rt.block_on(async {
        for _ in 0..600 {
            if stream_one(addr, "warm", 1).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the server did not come up")
    })?;
    let tok = Tokenizer::load(&args.model, "gemma3")?;
    let oracle = OracleModel::load(&args.model, threads as i32)?;
    let mut ctx = oracle.context((512 * max_n) as u32, 512, max_n as u32)?;
    println!(
        "model {}, {} threads, {} tokens per stream, {} interleaved repetitions",
        args.model.display(),
        threads,
        args.tokens,
        args.reps
    );
    println!(
        "{:>8} {:>12} {:>12} {:>7} {:>12} {:>14}",
        "streams", "exo tok/s", "llama tok/s", "ratio", "exo ttft ms", "llama ttft ms"
    );
    let mut single = None;
    for &n in &args.concurrency {
        let prompts: Vec<Vec<i32>> = (0..n)
            .map(|i| tok.encode(PROMPTS[i % PROMPTS.len()]))
            .collect::<Result<_, _>>()?;
        let (mut e_tps, mut e_ttft, mut l_tps, mut l_ttft) = (vec![], vec![], vec![], vec![]);
        for rep in 0..args.reps {
            for which in turns(rep) {
                if which == 0 {
                    let (tps, ttft, _) = rt.block_on(exo_round(addr, n, args.tokens))?;
                    e_tps.push(tps);
                    e_ttft.push(ttft);
                } else {
                    let (tps, ttft) = llama_round(&mut ctx, &prompts, args.tokens)?;
                    l_tps.push(tps);
                    l_ttft.push(ttft);
                }
            }
        }
        let (et, lt) = (median(&mut e_tps), median(&mut l_tps));
        if n == 1 {
            single = Some(et);
        }
        println!(
            "{:>8} {:>12.1} {:>12.1} {:>6.2}x {:>12.1} {:>14.1}",
            n,
            et,
            lt,
            et / lt,
            median(&mut e_ttft) * 1e3,
            median(&mut l_ttft) * 1e3
        );
        if let (Some(s), true) = (single, n > 1) {
            println!(
                "{:>8} exo {n} streams = {:.2}x its single-stream rate",
                "",
                et / s
            );
        }
    }
    server.stop(&rt);
    drop(ctx);
    drop(oracle);
    if args.long_prompt > 0 {
        crate::bench_fair::run(&rt, &args.model, threads, args.long_prompt, args.reps)?;
    }
    Ok(())
}
