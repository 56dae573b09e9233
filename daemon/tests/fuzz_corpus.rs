//! The fuzz targets' corpus, replayed on every run of the suite: the seed inputs (real
//! frames, control messages, model files, configs and requests, generated here) and
//! whatever `scripts/fuzz.sh` kept in `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` (inputs that once crashed a target), and a few hostile
//! inputs replayed only here (a chat template that builds a huge string, rendered in
//! the built `exo`'s template sandbox as `exo serve` renders it). Each goes through
//! the same body the fuzzer runs (`exo::fuzzing`); a panic fails the test, an abort
//! kills it.
//!
//! `EXO_FUZZ_SEEDS=DIR cargo test --release -p exo --test fuzz_corpus -- --ignored`
//! writes the seeds to `DIR/<target>/` for the fuzzer to start from.

use std::path::{Path, PathBuf};

use exo::cluster::wire::fuzz::fuzz_key;
use exo::cluster::wire::{Dtype, FrameType, PartialLogits, Payload, Sealer};
use exo::engine::{BatchSeq, OutputRows, Picked, TokenLogprobs};
use exo::fuzzing::TARGETS;
use exo_tests::{write_tiny_model, TempDir, TinyArch, TinySpec};
use serde_json::json;

/// The MAC's length: the frame target appends a valid one itself.
const MAC_LEN: usize = 16;

fn seq(slot: usize, pos0: usize, n_tokens: usize, output: OutputRows) -> BatchSeq {
    BatchSeq {
        slot,
        pos0,
        n_tokens,
        output,
    }
}

/// Control messages as the nodes send them.
fn control_seeds() -> Vec<Vec<u8>> {
    let hash = "ab".repeat(32);
    let sampling = json!({"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
        "repeat_penalty": 1.0, "repeat_last_n": 64, "frequency_penalty": 0.0,
        "presence_penalty": 0.0, "seed": 7});
    [
        json!({"from": "head", "protocol": 3, "model_id": hash}),
        json!({"name": "b", "protocol": 3, "model_id": hash, "planned": false,
            "data_sender": 9, "full_model": false, "caps": {"free_memory": 1_000_000_000u64,
            "cores": 2, "threads": 2, "ms_per_layer": 0.5, "ms_per_head_mb": 0.01}}),
        json!({"epoch": 3, "model_id": hash, "n_ctx": 4096, "n_slots": 8, "batch": 512,
            "f16": false, "senders": [7, 9], "head_rows": 1000, "head_rows_solo": 2000,
            "stages": [{"name": "a", "address": "tcp://10.0.0.1:5555", "start": 0, "end": 9},
                       {"name": "b", "address": "tcp://10.0.0.2:5555", "start": 9, "end": 18}]}),
        json!({"ok": false, "error": "no", "sender_id": 9}),
        json!({"name": "b", "epoch": 3, "ms_per_token": 4.5}),
        json!({"slot": 2, "sampling": sampling, "prompt": [2, 105, 2364]}),
        json!({"model_id": hash, "from": "head", "layers": "9..18", "need": [[0, 3], [7, 7]],
            "chunking": {"file_size": 9_000_000u64, "chunk_size": 1_048_576u64},
            "hashes_from": 0, "hashes": vec!["cd".repeat(32); 5]}),
        json!({"missing": [[1, 2]], "need_bytes": 3_000_000u64, "have_bytes": 0}),
        json!({"message": "refused"}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).expect("json"))
    .collect()
}

/// Frames of every type, without their MAC (the target appends a valid one).
fn frame_seeds() -> Vec<Vec<u8>> {
    sealed_frames()
        .into_iter()
        .map(|mut f| {
            f.truncate(f.len() - MAC_LEN);
            f
        })
        .collect()
}

/// Frames of every type, sealed with the fuzz key by one sender.
fn sealed_frames() -> Vec<Vec<u8>> {
    let mut sealer = Sealer::new(fuzz_key(), 42);
    let prompt = [seq(1, 0, 3, OutputRows::Last)];
    let batch = [
        seq(0, 5, 1, OutputRows::Last),
        seq(3, 9, 2, OutputRows::All),
    ];
    let h: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let normed: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
    let parts = [
        PartialLogits::Top(vec![(999, 3.5), (700, -1.0)]),
        PartialLogits::Dense {
            first: 600,
            logits: (0..40).map(|i| i as f32 * 0.5 - 7.0).collect(),
        },
        PartialLogits::Top(vec![(5, 1.0)]),
    ];
    let picks = [
        Picked::token(17),
        Picked {
            token: 4,
            logprobs: Some(TokenLogprobs {
                logprob: -0.5,
                top: vec![(4, -0.5), (9, -1.25)],
            }),
        },
        Picked::token(999),
    ];
    let mut frames = vec![
        sealer.seal(1, &prompt, Payload::activations(&h, 64, Dtype::F32)),
        sealer.seal(2, &prompt, Payload::activations(&h, 64, Dtype::F16)),
        sealer.seal(3, &batch, Payload::activations(&h, 64, Dtype::BF16)),
        sealer.seal(4, &batch, Payload::normed(&normed, 64, Dtype::F32)),
        sealer.seal(5, &batch, Payload::Tokens(&[17, 4, 999])),
        sealer.seal(5, &batch, Payload::TokenLogprobs(&picks)),
        sealer.seal(6, &batch, Payload::LmHeadPart(&parts)),
        sealer.seal_chunk(3, &[7u8; 300], blake3::hash(&[7u8; 300]).as_bytes()),
    ];
    for json in control_seeds() {
        let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        frames.push(sealer.seal_control(FrameType::Hello, 0, &value));
    }
    frames.into_iter().map(|f| f.expect("seal")).collect()
}

/// A chat template that doubles a string 48 times (2^48 bytes): only the template
/// sandbox's memory cap stops it.
const DOUBLING_TEMPLATE: &str = r#"{%- set ns = namespace(s="x") -%}{%- for i in range(48) -%}{%- set ns.s = ns.s ~ ns.s -%}{%- endfor -%}{{ ns.s | length }}"#;

/// A small model file of `spec`'s architecture and template.
fn tiny_model_bytes(dir: &Path, name: &str, mut spec: TinySpec) -> Vec<u8> {
    spec.n_layer = 1;
    spec.n_embd = 16;
    spec.n_head = 2;
    spec.n_head_kv = 1;
    spec.n_ff = 16;
    let path = dir.join(format!("{name}.gguf"));
    write_tiny_model(&path, &spec).expect("tiny model");
    std::fs::read(&path).expect("read")
}

/// Small model files of every architecture exo runs.
fn gguf_seeds(dir: &Path) -> Vec<Vec<u8>> {
    [
        TinyArch::Llama,
        TinyArch::Qwen2,
        TinyArch::Qwen3,
        TinyArch::Gemma3,
    ]
    .into_iter()
    .map(|arch| tiny_model_bytes(dir, arch.name(), TinySpec::new(arch)))
    .collect()
}

/// Inputs replayed here but not given to the fuzzer as seeds (it would spend its time
/// on their mutants): a model whose chat template builds a huge string, which the
/// gguf target survives only by rendering in the template sandbox.
fn replayed_only(target: &str, dir: &Path) -> Vec<Vec<u8>> {
    match target {
        "gguf" => vec![tiny_model_bytes(
            dir,
            "doubling-template",
            TinySpec {
                chat_template: Some(DOUBLING_TEMPLATE.into()),
                ..TinySpec::new(TinyArch::Gemma3)
            },
        )],
        _ => Vec::new(),
    }
}

/// Renders chat templates in the built `exo`'s sandbox, as `scripts/fuzz.sh` has the
/// fuzzer do.
fn use_template_sandbox() {
    exo::tokenizer::template::sandbox::enable(PathBuf::from(env!("CARGO_BIN_EXE_exo")));
}

/// The configuration files the project ships and documents.
fn config_seeds() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seeds = vec![std::fs::read(root.join("packaging/exo.toml")).expect("exo.toml")];
    seeds.push(
        b"[model]\npath = \"/m.gguf\"\n[node]\nname = \"a\"\nlisten = \"tcp://0.0.0.0:5555\"\n\
          memory = \"1.5 GiB\"\n[cluster]\nkey = \"0123456789abcdef0123\"\n\
          [[peer]]\nname = \"a\"\naddress = \"tcp://10.0.0.1:5555\"\nlayers = \"0-9\"\n\
          [[peer]]\nname = \"b\"\naddress = \"tcp://10.0.0.2:5555\"\nlayers = \"9-18\"\n\
          [engine]\nthreads = 2\nctx = 4096\n[api]\nlisten = \"0.0.0.0:8080\"\n"
            .to_vec(),
    );
    seeds
}

/// Request bodies of both endpoints, plain and streamed, with sampling parameters.
fn request_seeds() -> Vec<Vec<u8>> {
    [
        json!({"model": "gemma", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": true}),
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"],
            "max_completion_tokens": 16, "stream_options": {"include_usage": true}}),
        json!({"model": "gemma", "prompt": "Once upon a time", "max_tokens": 4,
            "temperature": 0, "n": 1, "presence_penalty": 0.5, "frequency_penalty": 0.5}),
        json!({"prompt": [2, 105, 2364], "max_tokens": 2, "stream": false, "top_k": 40}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).expect("json"))
    .collect()
}

fn seeds(target: &str, dir: &Path) -> Vec<Vec<u8>> {
    match target {
        "frame" => frame_seeds(),
        "control" => control_seeds(),
        "gguf" => gguf_seeds(dir),
        "config" => config_seeds(),
        "request" => request_seeds(),
        other => panic!("no seeds for target {other}"),
    }
}

/// The files kept for `target` under `fuzz/corpus/` and `fuzz/regressions/`.
fn kept_inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        if let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) {
            files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    files.sort();
    files
}

#[test]
fn every_target_survives_its_corpus() {
    use_template_sandbox();
    let dir = TempDir::new("fuzz-seeds").expect("tempdir");
    for (target, body) in TARGETS {
        let seeds = seeds(target, dir.path());
        assert!(!seeds.is_empty(), "{target}");
        for seed in &seeds {
            body(seed);
            // and each seed cut short, a common shape of bad input
            body(&seed[..seed.len() / 2]);
        }
        for input in replayed_only(target, dir.path()) {
            body(&input);
        }
        let kept = kept_inputs(target);
        for path in &kept {
            body(&std::fs::read(path).expect("corpus file"));
        }
        eprintln!(
            "{target}: {} seeds, {} kept inputs",
            seeds.len(),
            kept.len()
        );
    }
}

/// The seeds are real inputs: each one is accepted where it should be (so the fuzzer
/// starts from inputs that reach deep, not from ones refused at the first check).
#[test]
fn the_seeds_are_accepted_inputs() {
    let dir = TempDir::new("fuzz-seeds-valid").expect("tempdir");
    for model in gguf_seeds(dir.path()) {
        let path = dir.path().join("check.gguf");
        std::fs::write(&path, &model).expect("write");
        exo::model::ModelFile::open(&path).expect("a seed model opens");
    }
    let key = fuzz_key();
    let mut opener = exo::cluster::wire::Opener::new(key.clone());
    let limits = exo::cluster::wire::fuzz::fuzz_limits();
    for frame in sealed_frames() {
        opener.open(&frame, &limits).expect("a seed frame opens");
    }
    for text in config_seeds() {
        let text = String::from_utf8(text).expect("utf-8");
        let parsed =
            exo::config::Config::parse_text(Path::new("seed.toml"), &text, &Default::default());
        parsed.expect("a seed config is valid");
    }
}

/// `EXO_FUZZ_SEEDS=DIR`: writes every target's seeds to `DIR/<target>/` (run by
/// `scripts/fuzz.sh`).
#[test]
#[ignore = "writes the seed corpus for scripts/fuzz.sh"]
fn write_seed_corpus() {
    let out = PathBuf::from(std::env::var_os("EXO_FUZZ_SEEDS").expect("EXO_FUZZ_SEEDS"));
    let dir = TempDir::new("fuzz-seeds-out").expect("tempdir");
    for (target, _) in TARGETS {
        let to = out.join(target);
        std::fs::create_dir_all(&to).expect("seed dir");
        for (i, seed) in seeds(target, dir.path()).iter().enumerate() {
            std::fs::write(to.join(format!("seed-{i:02}")), seed).expect("seed");
        }
    }
}
