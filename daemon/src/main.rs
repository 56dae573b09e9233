//! The `exo` command line.
#![forbid(unsafe_code)]

mod bench;
mod bench_fair;
mod bench_serve;
mod bench_soak;
mod http_client;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use exo::config::{Config, DEFAULT_CONFIG_PATH};
use exo::engine::{generate, split_ranges, GenerateParams, Pipeline, PipelineConfig, StopReason};
use exo::model::{LayerRange, ModelFile};
use exo::serve::Stopped;
use exo::system::notify::EXIT_LOAD_FAILED;
use exo::tokenizer::{template, Message, Tokenizer};
use ggml_shim::llama::{SamplingParams, DEFAULT_SEED};

#[derive(Parser)]
#[command(
    name = "exo",
    version,
    about = "Pipeline-parallel LLM inference on everyday machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for a prompt and print it.
    Run(RunArgs),
    /// Print a model's architecture, layers, tensor types, sizes and per-layer memory.
    Inspect {
        #[arg(long)]
        model: PathBuf,
    },
    /// Measure prefill and decode speed against llama.cpp on the same machine.
    Bench(bench::BenchArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file and print the effective configuration (exit 0/1).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Show the cluster: peers, layer ranges, link round-trip times, ms/token, state.
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Measure `exo serve` at several concurrent streams against llama.cpp batched decode.
    BenchServe(bench_serve::BenchServeArgs),
    /// Measure a running `exo serve` (e.g. a cluster head) at several concurrent streams.
    BenchClient(bench_serve::BenchClientArgs),
    /// Soak running `exo serve` nodes: many mixed requests, malformed HTTP, peer garbage.
    BenchSoak(bench_soak::BenchSoakArgs),
    /// Write a GGUF of a published model's shape with random weights (tests, benchmarks).
    GenModel(GenModelArgs),
    /// Render chat templates for the parent exo process (its sandbox; not for users).
    #[command(name = template::sandbox::SUBCOMMAND, hide = true)]
    TemplateSandbox,
}

#[derive(clap::Args)]
struct GenModelArgs {
    /// Model shape: llama3-8b, llama3-1b, qwen2.5-3b or llama3-tiny.
    #[arg(long)]
    shape: String,
    /// Seed of the random weights (same seed, same file).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The GGUF file to write.
    out: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Path to a GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: i32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed (same seed, same output).
    #[arg(long)]
    seed: Option<u32>,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Hold layers A..B in this engine instance and the rest in other local stage
    /// instances, handing activations over as bytes (a split pipeline on one machine).
    #[arg(long)]
    layers: Option<LayerRange>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Context length (default: prompt + n, at most the model's).
    #[arg(long)]
    ctx: Option<usize>,
    /// Print timing figures to stderr.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    ggml_shim::malloc::tune_for_server();
    #[cfg(target_arch = "aarch64")]
    run_dotprod_build_if_possible();
    // The CPU check runs before main, as a constructor (ggml and llama.cpp execute
    // AVX2 code in their static initializers); this repeats it, and keeps it linked.
    match ggml_shim::cpu_guard::installed()
        .then(ggml_shim::cpu_guard::missing_feature)
        .flatten()
    {
        Some(missing) => cpu_error(missing),
        None => cli_main(),
    }
}

/// The arm64 package ships two builds: /usr/bin/exo for any ARMv8.0-A CPU with NEON
/// (Raspberry Pi 4), and one for ARMv8.2-A with dotprod (Raspberry Pi 5), whose int8
/// dot products make quantized matrix products several times faster. On a CPU with
/// dotprod the baseline build replaces itself with the other (same process, so
/// systemd's notify and watchdog see no difference). `EXO_BASELINE=1` keeps the
/// baseline; `EXO_DOTPROD_BUILD` names another path for the dotprod build (tests).
#[cfg(target_arch = "aarch64")]
fn run_dotprod_build_if_possible() {
    use std::os::unix::process::CommandExt;
    let path =
        std::env::var_os("EXO_DOTPROD_BUILD").unwrap_or_else(|| "/usr/lib/exo/exo-dotprod".into());
    if std::env::var_os("EXO_BASELINE").is_some_and(|v| v == "1")
        || std::env::var_os("EXO_BUILD_SELECTED").is_some()
        || !std::arch::is_aarch64_feature_detected!("dotprod")
        || !Path::new(&path).exists()
    {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "exo".into());
    let err = std::process::Command::new(&path)
        .arg0(arg0)
        .args(args)
        .env("EXO_BUILD_SELECTED", "dotprod")
        .exec();
    eprintln!(
        "exo: warning: cannot run {} ({err}); using the baseline build",
        Path::new(&path).display()
    );
}

#[inline(never)]
fn cpu_error(missing: &'static str) -> ExitCode {
    eprintln!(
        "exo: error: this CPU lacks {missing}, which this build of exo was compiled for. \
         Install the package built for your CPU or build exo from source on this machine."
    );
    ExitCode::FAILURE
}

#[inline(never)]
fn cli_main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::TemplateSandbox = cli.command {
        return match template::sandbox::serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("exo: error: template sandbox: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Chat templates are code from the model file: they run in a child process of
    // this binary, with a memory cap.
    template::sandbox::enable(PathBuf::from("/proc/self/exe"));
    // Route llama.cpp/ggml logging through exo (silent unless EXO_LLAMA_LOG=1).
    ggml_shim::llama::init_backend();
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Run(args) => done(run(args)),
        Command::Inspect { model } => done(inspect(&model)),
        Command::Bench(args) => done(bench::run(args)),
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => done(check_config(&config)),
        Command::Status { config } => done(status(&config)),
        Command::BenchServe(args) => done(bench_serve::run(args)),
        Command::BenchClient(args) => done(bench_serve::client(args)),
        Command::BenchSoak(args) => done(bench_soak::run(args)),
        Command::GenModel(args) => done(gen_model(args)),
        Command::TemplateSandbox => Ok(ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("exo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) use exo::config::default_threads;

fn run(args: RunArgs) -> Result<()> {
    let mf = ModelFile::open(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tok = Tokenizer::load(&args.model, mf.hparams.arch.name())
        .with_context(|| format!("loading the vocabulary of {}", args.model.display()))?;
    let hp = &mf.hparams;
    let prompt = if args.chat {
        tok.encode_chat(&[Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }])?
    } else {
        tok.encode(&args.prompt)?
    };
    let n_ctx = match args.ctx {
        Some(c) => c,
        None => (prompt.len() + args.n).min(hp.n_ctx_train).max(1),
    };
    if prompt.len() + args.n > n_ctx {
        bail!(
            "the prompt has {} tokens and {} more were requested, but the context holds {} (model maximum {})",
            prompt.len(),
            args.n,
            n_ctx,
            hp.n_ctx_train
        );
    }
    let ranges = match args.layers {
        Some(r) => {
            r.validate(hp.n_layer)?;
            split_ranges(hp.n_layer, &[r.start, r.end])?
        }
        None => vec![LayerRange::new(0, hp.n_layer)],
    };
    let cfg = PipelineConfig {
        n_ctx,
        n_slots: 1,
        n_threads: args.threads.unwrap_or_else(default_threads),
        repack: true,
        ranges,
    };
    let mut pipeline = Pipeline::local(&mf, &cfg)?;
    let params = GenerateParams {
        max_tokens: args.n,
        sampling: SamplingParams {
            temperature: args.temp,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repeat_penalty: args.repeat_penalty,
            seed: args.seed.unwrap_or(DEFAULT_SEED),
            ..SamplingParams::default()
        },
        chunk: 512,
    };
    let mut out = std::io::stdout().lock();
    let mut pending: Vec<u8> = Vec::new();
    let g = generate(
        &mut pipeline,
        &prompt,
        &params,
        |t| tok.is_eog(t),
        |t| {
            if let Ok(bytes) = tok.piece(t) {
                pending.extend_from_slice(&bytes);
                // Print whole UTF-8 characters only.
                let valid = match std::str::from_utf8(&pending) {
                    Ok(_) => pending.len(),
                    Err(e) => e.valid_up_to(),
                };
                let _ = out.write_all(&pending[..valid]);
                let _ = out.flush();
                pending.drain(..valid);
            }
            true
        },
    )?;
    let _ = out.write_all(&pending);
    let _ = writeln!(out);
    if args.verbose {
        eprintln!(
            "exo: build: {}",
            std::env::var("EXO_BUILD_SELECTED").unwrap_or_else(|_| "baseline".into())
        );
        eprintln!(
            "exo: prompt {} tokens in {:.3}s ({:.1} tok/s); generated {} tokens in {:.3}s ({:.1} tok/s); stop: {}",
            prompt.len(),
            g.prefill_secs,
            prompt.len() as f64 / g.prefill_secs.max(1e-9),
            g.tokens.len(),
            g.decode_secs,
            g.tokens.len() as f64 / g.decode_secs.max(1e-9),
            match g.stop {
                StopReason::Length => "length",
                StopReason::EndOfGeneration => "end of generation",
                StopReason::Stopped => "stopped",
            }
        );
    }
    Ok(())
}

fn check_config(path: &Path) -> Result<()> {
    let cfg = Config::load(path)?;
    // The model too (its header and tensor table, not the weights): under systemd
    // this runs as ExecStartPre, so a missing or unusable file fails the start at
    // once with this message instead of a service that never becomes ready.
    // (A worker without one receives its slice from the head.) And that the model fits
    // the memory this node offers, where the file alone can tell (a single node, or a
    // head's own part; formation checks the rest).
    if let Some(model) = &cfg.model.path {
        let mf =
            ModelFile::open(model).with_context(|| format!("{}: [model] path", path.display()))?;
        exo::config::check_layers_fit(&cfg.peers, mf.hparams.n_layer)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{}: [[peer]] layers", path.display()))?;
        // the vocabulary and chat template the server will load, so a model they would
        // refuse fails here
        Tokenizer::load(model, mf.hparams.arch.name())
            .with_context(|| format!("{}: [model] path: the vocabulary", path.display()))?;
        exo::serve::ServeSettings::from_config(&cfg)?
            .clamped(mf.hparams.n_ctx_train)
            .check_own_memory(&mf)
            .with_context(|| format!("{}: [node] memory", path.display()))?;
    }
    print!("{}", cfg.effective_toml());
    Ok(())
}

fn status(path: &Path) -> Result<()> {
    let cfg = Config::load(path)?;
    let health = http_client::get_text_blocking(cfg.api.listen, "/health")?;
    let h: serde_json::Value = serde_json::from_str(&health).unwrap_or_default();
    if h["role"] == "worker" {
        println!(
            "node {}: worker; the head is {}",
            cfg.node.name,
            h["head"].as_str().unwrap_or("?")
        );
        if let Some(line) = h["slice"].as_str() {
            println!("{line}");
        }
        return Ok(());
    }
    let state = if h["status"] == "ok" {
        "serving".to_string()
    } else {
        h["error"]["message"]
            .as_str()
            .unwrap_or("unknown")
            .to_string()
    };
    println!("node {} (head): {state}", cfg.node.name);
    let cluster = http_client::get_text_blocking(cfg.api.listen, "/v1/cluster")?;
    let v: serde_json::Value = serde_json::from_str(&cluster)?;
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        println!("single node (no peers)");
        return Ok(());
    }
    println!(
        "{:<12} {:<28} {:>8} {:>15} {:>8} {:>9} {:>11}",
        "peer", "address", "layers", "head rows", "state", "rtt ms", "ms/token"
    );
    let rows = |v: &serde_json::Value| match (v[0].as_u64(), v[1].as_u64()) {
        (Some(a), Some(b)) => Some(format!("{a}..{b}")),
        _ => None,
    };
    let mut alone = Vec::new();
    for p in &peers {
        let head = rows(&p["head_rows"]).unwrap_or_else(|| "-".to_string());
        if let Some(r) = rows(&p["head_rows_alone"]) {
            alone.push(format!("{} rows {r}", p["name"].as_str().unwrap_or("?")));
        }
        println!(
            "{:<12} {:<28} {:>8} {:>15} {:>8} {:>9.2} {:>11.2}",
            p["name"].as_str().unwrap_or("?"),
            p["address"].as_str().unwrap_or("?"),
            format!("{}..{}", p["start"], p["end"]),
            head,
            if p["alive"] == true { "up" } else { "MISSING" },
            p["rtt_ms"].as_f64().unwrap_or(0.0),
            p["ms_per_token"].as_f64().unwrap_or(0.0)
        );
    }
    if !alone.is_empty() {
        println!(
            "a step alone in the pipeline splits the head: {}",
            alone.join(", ")
        );
    }
    Ok(())
}

/// `exo serve`: serves until a signal; exits with 78 when, under systemd, the model
/// cannot be loaded (after the drain).
fn serve(path: &Path) -> Result<ExitCode> {
    let cfg = Config::load(path)?;
    exo::system::init_logging();
    let grace = cfg.api.shutdown_timeout();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stopped = rt.block_on(exo::serve::run(path, cfg, exo::system::shutdown_signal()));
    rt.shutdown_timeout(grace);
    match stopped? {
        Stopped::Shutdown => {
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Stopped::LoadFailed(why) => {
            tracing::error!(
                "{why}; exiting with status {EXIT_LOAD_FAILED}, which systemd does not restart: fix the model or the config, then `systemctl restart exo`"
            );
            Ok(ExitCode::from(EXIT_LOAD_FAILED))
        }
    }
}

fn inspect(path: &Path) -> Result<()> {
    let mf = ModelFile::open(path).with_context(|| format!("loading {}", path.display()))?;
    let hp = &mf.hparams;
    println!("model        {}", path.display());
    println!("architecture {}", hp.arch);
    println!("file size    {}", human(mf.gguf.file_size()));
    println!("layers       {}", hp.n_layer);
    println!("embedding    {}", hp.n_embd);
    println!("ffn          {}", hp.n_ff);
    println!(
        "heads        {} (kv {}), head size {}",
        hp.n_head, hp.n_head_kv, hp.head_dim_k
    );
    println!("vocabulary   {}", hp.n_vocab);
    println!("context      {}", hp.n_ctx_train);
    println!(
        "rope         base {} scale {} ({:?})",
        hp.rope_freq_base, hp.rope_freq_scale, hp.rope_scaling
    );
    if hp.n_swa > 0 {
        let n = hp.swa_layers.iter().filter(|&&s| s).count();
        println!(
            "sliding      window {} on {} of {} layers (local rope base {})",
            hp.n_swa, n, hp.n_layer, hp.rope_freq_base_swa
        );
    }
    let mut types: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for t in mf.gguf.tensors() {
        let e = types.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    println!("tensor types");
    for (name, (n, bytes)) in &types {
        println!("  {name:<8} {n:>5} tensors {:>10}", human(*bytes));
    }
    let kv_per_token = 2 * hp.n_embd_kv() * 2;
    println!(
        "per-layer memory (weights; KV cache f16 per 1k tokens: {})",
        human((kv_per_token * 1024) as u64)
    );
    let mut layer_bytes = vec![0u64; hp.n_layer];
    let mut other = Vec::new();
    for t in mf.gguf.tensors() {
        match t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(i) if i < hp.n_layer => layer_bytes[i] += t.size,
            _ => other.push(t),
        }
    }
    for (i, b) in layer_bytes.iter().enumerate() {
        println!("  layer {i:>3}  {:>10}", human(*b));
    }
    for t in other {
        println!(
            "  {:<28} {:<6} {:?} {:>10}",
            t.name,
            t.dtype.name(),
            t.shape,
            human(t.size)
        );
    }
    if mf.gguf.tensor("output.weight").is_none() {
        println!("output head  tied to token_embd.weight (read for every generated token)");
    }
    println!("ggml cpu     {}", ggml_shim::cpu_features());
    let kernels = if ggml_shim::qmatmul::prefetching_kernels() {
        "exo's prefetching kernels for Q8_0 and Q5_0 weights (up to 8 tokens), ggml's for the rest"
    } else {
        "ggml's"
    };
    println!("matmul       {kernels}");
    println!(
        "decoding     batch-invariant: each sequence's tokens as one-token products, \
         whatever else the step holds"
    );
    Ok(())
}

fn gen_model(args: GenModelArgs) -> Result<()> {
    let shape = exo::gen_model::find_shape(&args.shape)?;
    let start = std::time::Instant::now();
    let written = exo::gen_model::write(&shape, args.seed, &args.out)?;
    let published = match shape.published_mb {
        0 => String::new(),
        mb => format!(" (published Q4_K_M: {})", human(mb * 1_000_000)),
    };
    println!(
        "wrote {}: shape {}, seed {}, {} tensors, {}{published} in {:.1} s",
        args.out.display(),
        shape.name,
        args.seed,
        written.n_tensors,
        human(written.bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(crate) fn human(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}
