//! Oracle parity: exo's engine against llama.cpp (linked in the same binary), on
//! generated tiny models of every supported architecture and on the real Gemma 3
//! 270M when it is present. Logits at every position, greedy continuations, split
//! pipelines at every cut, and batched decoding of several sequences.

use std::path::Path;

use exo::engine::{
    generate, prompt_logits, split_ranges, BatchSeq, GenerateParams, OutputRows, Pipeline,
    PipelineConfig,
};
use exo::model::{LayerRange, ModelFile};
use exo::tokenizer::{Message, Tokenizer};
use exo_tests::{real_model_path, write_tiny_model, TempDir, TinyArch, TinySpec};
use ggml_shim::llama::{init_backend, OracleContext, OracleModel, SamplingParams};

/// Prefill micro-batch used by the tiny-model tests (so a 40-token prompt spans 3 chunks).
const CHUNK: usize = 16;
const N_CTX: usize = 160;

fn pipeline(mf: &ModelFile, ranges: Vec<LayerRange>, n_ctx: usize, n_slots: usize) -> Pipeline {
    Pipeline::local(
        mf,
        &PipelineConfig {
            n_ctx,
            n_slots,
            n_threads: 1,
            repack: true,
            ranges,
        },
    )
    .expect("load pipeline")
}

fn whole(mf: &ModelFile) -> Vec<LayerRange> {
    vec![LayerRange::new(0, mf.hparams.n_layer)]
}

/// Largest absolute difference, relative to the largest absolute oracle logit.
fn rel_max_diff(ours: &[f32], oracle: &[f32]) -> f32 {
    assert_eq!(ours.len(), oracle.len(), "logit rows differ in length");
    let scale = oracle.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(oracle)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn greedy() -> GenerateParams {
    GenerateParams {
        max_tokens: 32,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        chunk: CHUNK,
    }
}

/// Deterministic prompt of `n` token ids from the ordinary part of the tiny vocabulary.
fn prompt_ids(n: usize, n_vocab: usize, salt: u64) -> Vec<i32> {
    let mut x = 0x2545_F491_4F6C_DD1D ^ salt;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (261 + (x % (n_vocab as u64 - 261))) as i32
        })
        .collect()
}

struct Tolerance {
    logits: f32,
}

fn check_model(path: &Path, prompts: &[Vec<i32>], tol: &Tolerance, n_generate: usize) {
    init_backend();
    let mf = ModelFile::open(path).expect("open model");
    let oracle = OracleModel::load(path, 1).expect("oracle load");
    let n_ctx = prompts.iter().map(|p| p.len()).max().unwrap_or(0) + n_generate + 8;
    // llama.cpp decodes the prompt in micro-batches of the same size as exo's chunks.
    let mut octx = oracle
        .context(n_ctx as u32, CHUNK as u32, 1)
        .expect("oracle context");
    let mut exo = pipeline(&mf, whole(&mf), n_ctx, 1);
    for prompt in prompts {
        check_prompt_logits(path, &mut exo, &mut octx, prompt, tol);
        // greedy continuation
        let mut params = greedy();
        params.max_tokens = n_generate;
        let g = generate(&mut exo, prompt, &params, |_| false, |_| true).expect("exo generate");
        let want = octx
            .greedy_generate(prompt, n_generate)
            .expect("oracle generate");
        assert_eq!(
            g.tokens,
            want,
            "{}: greedy continuation of a {}-token prompt",
            path.display(),
            prompt.len()
        );
        let distinct: std::collections::HashSet<_> = want.iter().collect();
        assert!(
            distinct.len() > 1,
            "degenerate continuation: the check would prove little"
        );
    }
}

/// exo's logits at every position of `prompt` against llama.cpp's, within `tol`;
/// returns exo's.
fn check_prompt_logits(
    path: &Path,
    exo: &mut Pipeline,
    octx: &mut OracleContext,
    prompt: &[i32],
    tol: &Tolerance,
) -> Vec<Vec<f32>> {
    let ours = prompt_logits(exo, prompt, CHUNK).expect("exo logits");
    let theirs = octx.prompt_logits(prompt).expect("oracle logits");
    assert_eq!(ours.len(), prompt.len());
    assert_eq!(theirs.len(), prompt.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| rel_max_diff(a, b))
        .fold(0f32, f32::max);
    eprintln!(
        "{}: prompt of {} tokens: worst relative logit difference {worst:.2e}",
        path.display(),
        prompt.len()
    );
    for (pos, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let d = rel_max_diff(a, b);
        assert!(
            d <= tol.logits,
            "{}: prompt of {} tokens, position {pos}: logits differ by {d:.2e} (relative), tolerance {:.1e}",
            path.display(),
            prompt.len(),
            tol.logits
        );
    }
    ours
}

fn check_splits(path: &Path, prompt: &[i32]) {
    init_backend();
    let mf = ModelFile::open(path).expect("open model");
    let n = mf.hparams.n_layer;
    let mut one = pipeline(&mf, whole(&mf), N_CTX, 1);
    let reference = prompt_logits(&mut one, prompt, CHUNK).expect("whole-model logits");
    for k in 1..n {
        let mut split = pipeline(&mf, split_ranges(n, &[k]).expect("ranges"), N_CTX, 1);
        let got = prompt_logits(&mut split, prompt, CHUNK).expect("split logits");
        for (pos, (a, b)) in got.iter().zip(&reference).enumerate() {
            let d = rel_max_diff(a, b);
            assert!(
                d <= 1e-6,
                "split at layer {k}, position {pos}: logits differ by {d:.2e}"
            );
        }
    }
    // three stages too
    if n >= 3 {
        let mut three = pipeline(&mf, split_ranges(n, &[1, n - 1]).expect("ranges"), N_CTX, 1);
        let got = prompt_logits(&mut three, prompt, CHUNK).expect("3-stage logits");
        for (a, b) in got.iter().zip(&reference) {
            assert!(rel_max_diff(a, b) <= 1e-6, "3-stage split differs");
        }
    }
}

fn tiny(arch: TinyArch, dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path().join(format!("{}.gguf", arch.name()));
    write_tiny_model(&path, &TinySpec::new(arch)).expect("write tiny model");
    path
}

/// A tiny model whose matrices are stored as `ty`.
fn tiny_typed(
    arch: TinyArch,
    ty: ggml_shim::writer::WriterType,
    dir: &TempDir,
) -> std::path::PathBuf {
    let mut spec = TinySpec::new(arch);
    spec.weight_type = ty;
    let path = dir
        .path()
        .join(format!("{}-{}.gguf", arch.name(), ty.name()));
    write_tiny_model(&path, &spec).expect("write tiny model");
    path
}

fn tiny_prompts(path: &Path) -> Vec<Vec<i32>> {
    let n_vocab = ModelFile::open(path).expect("open").hparams.n_vocab;
    vec![
        prompt_ids(1, n_vocab, 1),
        prompt_ids(7, n_vocab, 2),
        prompt_ids(40, n_vocab, 3),
    ]
}

const TINY_TOL: Tolerance = Tolerance { logits: 1e-4 };

fn oracle_parity(arch: TinyArch) {
    let dir = TempDir::new(arch.name()).expect("tempdir");
    let path = tiny(arch, &dir);
    check_model(&path, &tiny_prompts(&path), &TINY_TOL, 32);
}

#[test]
fn llama_matches_llama_cpp() {
    oracle_parity(TinyArch::Llama);
}

#[test]
fn qwen2_matches_llama_cpp() {
    oracle_parity(TinyArch::Qwen2);
}

#[test]
fn qwen3_matches_llama_cpp() {
    oracle_parity(TinyArch::Qwen3);
}

#[test]
fn gemma3_matches_llama_cpp() {
    oracle_parity(TinyArch::Gemma3);
}

#[test]
fn quantized_weights_match_llama_cpp() {
    use ggml_shim::writer::WriterType;
    let dir = TempDir::new("quant").expect("tempdir");
    for (arch, ty) in [
        (TinyArch::Llama, WriterType::Q8_0),
        (TinyArch::Gemma3, WriterType::Q4_0),
        (TinyArch::Qwen3, WriterType::F16),
    ] {
        let path = tiny_typed(arch, ty, &dir);
        check_model(&path, &tiny_prompts(&path), &TINY_TOL, 32);
    }
}

#[test]
fn llama_with_linear_rope_scaling_matches_llama_cpp() {
    let dir = TempDir::new("ropescale").expect("tempdir");
    let mut spec = TinySpec::new(TinyArch::Llama);
    spec.rope_scaling_linear = Some(4.0);
    let path = dir.path().join("llama-rope.gguf");
    write_tiny_model(&path, &spec).expect("write");
    check_model(&path, &tiny_prompts(&path), &TINY_TOL, 32);
}

#[test]
fn split_pipelines_match_whole_model_at_every_cut() {
    let dir = TempDir::new("split").expect("tempdir");
    for arch in TinyArch::ALL {
        let path = tiny(arch, &dir);
        let prompt = prompt_ids(40, ModelFile::open(&path).expect("open").hparams.n_vocab, 9);
        check_splits(&path, &prompt);
    }
}

/// Several sequences decoding in one batched step give what each gives alone.
#[test]
fn batched_sequences_match_solo_runs() {
    init_backend();
    let dir = TempDir::new("batch").expect("tempdir");
    for arch in [TinyArch::Gemma3, TinyArch::Llama] {
        let path = tiny(arch, &dir);
        let mf = ModelFile::open(&path).expect("open");
        let n_vocab = mf.hparams.n_vocab;
        let prompts: Vec<Vec<i32>> = (0..4)
            .map(|i| prompt_ids(3 + 5 * i, n_vocab, 20 + i as u64))
            .collect();
        let steps = 12;
        // solo: each sequence alone through greedy generation
        let mut solo = pipeline(&mf, whole(&mf), N_CTX, 1);
        let mut want = Vec::new();
        for p in &prompts {
            let mut params = greedy();
            params.max_tokens = steps;
            want.push(
                generate(&mut solo, p, &params, |_| false, |_| true)
                    .expect("solo")
                    .tokens,
            );
        }
        // batched: prefill all four in one step, then decode them together
        let mut batched = pipeline(
            &mf,
            split_ranges(mf.hparams.n_layer, &[2]).expect("ranges"),
            N_CTX,
            4,
        );
        let seqs: Vec<BatchSeq> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| BatchSeq {
                slot: i,
                pos0: 0,
                n_tokens: p.len(),
                output: OutputRows::Last,
            })
            .collect();
        let flat: Vec<i32> = prompts.concat();
        let mut logits = batched
            .step(&seqs, &flat)
            .expect("batched prefill")
            .to_vec();
        let mut got: Vec<Vec<i32>> = vec![Vec::new(); prompts.len()];
        let mut pos: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        for _ in 0..steps {
            let next: Vec<i32> = logits
                .chunks(n_vocab)
                .map(|row| ggml_shim::llama::argmax(row).expect("argmax") as i32)
                .collect();
            for (g, t) in got.iter_mut().zip(&next) {
                g.push(*t);
            }
            let seqs: Vec<BatchSeq> = (0..prompts.len())
                .map(|i| BatchSeq {
                    slot: i,
                    pos0: pos[i],
                    n_tokens: 1,
                    output: OutputRows::Last,
                })
                .collect();
            logits = batched.step(&seqs, &next).expect("batched decode").to_vec();
            for p in pos.iter_mut() {
                *p += 1;
            }
        }
        assert_eq!(
            got,
            want,
            "{}: batched decoding differs from solo runs",
            arch.name()
        );
    }
}

// ---- the real model (fetched by scripts/setup.sh; skipped with a note when absent) ----

fn real() -> Option<std::path::PathBuf> {
    let p = real_model_path();
    if p.is_none() {
        assert!(
            std::env::var_os("EXO_REQUIRE_REAL_MODEL").is_none(),
            "the real model is missing: run scripts/setup.sh"
        );
        eprintln!("note: real model absent (run scripts/setup.sh); skipping");
    }
    p
}

#[test]
fn real_gemma3_matches_llama_cpp() {
    let Some(path) = real() else { return };
    let mf = ModelFile::open(&path).expect("open");
    let tok = Tokenizer::load(&path, mf.hparams.arch.name()).expect("tokenizer");
    let mut prompts = vec![
        tok.encode("The capital of France is").expect("tokenize"),
        tok.encode("a").expect("tokenize"),
    ];
    for q in [
        "Write a haiku about the sea.",
        "What is 12 times 7?",
        "Name three colours of the rainbow.",
    ] {
        let messages = [Message {
            role: "user".into(),
            content: q.into(),
        }];
        let text = tok.apply_chat_template(&messages).expect("template");
        // the server's chat tokens are llama.cpp's tokens of the rendered prompt
        let served = tok.encode_chat(&messages).expect("tokenize");
        assert_eq!(served, tok.encode_templated(&text).expect("tokenize"));
        prompts.push(served);
    }
    // one prompt longer than a prefill chunk of 16 tokens
    let long = "Once upon a time, in a small village by the mountains, there lived an old clockmaker who repaired every clock in town.";
    prompts.push(tok.encode(long).expect("tokenize"));
    assert!(prompts.last().map_or(0, |p| p.len()) > CHUNK);
    check_model(&path, &prompts, &Tolerance { logits: 1e-4 }, 32);
}

#[test]
fn real_gemma3_split_matches_whole() {
    let Some(path) = real() else { return };
    let mf = ModelFile::open(&path).expect("open");
    let tok = Tokenizer::load(&path, mf.hparams.arch.name()).expect("tokenizer");
    let prompt = tok
        .encode("The quick brown fox jumps over the lazy dog because")
        .expect("tokenize");
    check_splits(&path, &prompt);
    // and the greedy text of a 2-node split equals one node
    let n = mf.hparams.n_layer;
    let mut one = pipeline(&mf, whole(&mf), 128, 1);
    let mut two = pipeline(&mf, split_ranges(n, &[n / 2]).expect("ranges"), 128, 1);
    let a = generate(&mut one, &prompt, &greedy(), |t| tok.is_eog(t), |_| true).expect("one");
    let b = generate(&mut two, &prompt, &greedy(), |t| tok.is_eog(t), |_| true).expect("two");
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.tokens.is_empty());
}

// ---- the output head split by vocabulary between two stages ----

/// Logits of `prompt` (one chunk, every row) from stages `[0, cut)` holding head rows
/// `0..va` and `[cut, n)` holding `va..n_vocab`, joined, against one whole stage.
/// Returns how many splits it compared.
fn check_head_split(path: &Path, prompt: &[i32], fractions: &[f64]) -> usize {
    use exo::engine::{Stage, StageConfig, StageInput, StageOutput};
    init_backend();
    let mf = ModelFile::open(path).expect("open model");
    let (n, v) = (mf.hparams.n_layer, mf.hparams.n_vocab);
    let cfg = |range: LayerRange, lm_head_rows: Option<std::ops::Range<usize>>| StageConfig {
        range,
        n_ctx: 64,
        n_slots: 1,
        n_threads: 1,
        repack: true,
        lm_head_rows,
    };
    let seqs = [BatchSeq {
        slot: 0,
        pos0: 0,
        n_tokens: prompt.len(),
        output: OutputRows::All,
    }];
    let mut one = Stage::load(&mf, cfg(LayerRange::new(0, n), None)).expect("whole stage");
    let mut reference = Vec::new();
    one.forward(&seqs, StageInput::Tokens(prompt), &mut reference)
        .expect("whole step");
    assert_eq!(reference.len(), prompt.len() * v);
    let cut = n - 1;
    let mut checked = 0;
    for &f in fractions {
        let va = ((v as f64 * f) as usize).clamp(1, v - 1);
        let mut a = Stage::load(&mf, cfg(LayerRange::new(0, cut), Some(0..va))).expect("stage a");
        let mut b = Stage::load(&mf, cfg(LayerRange::new(cut, n), Some(va..v))).expect("stage b");
        let (mut hidden, mut normed) = (Vec::new(), Vec::new());
        let (mut part_a, mut part_b) = (Vec::new(), Vec::new());
        assert_eq!(
            a.forward(&seqs, StageInput::Tokens(prompt), &mut hidden)
                .expect("a"),
            StageOutput::Hidden
        );
        assert_eq!(
            b.forward(&seqs, StageInput::Hidden(&hidden), &mut normed)
                .expect("b"),
            StageOutput::Normed
        );
        assert_eq!(normed.len(), prompt.len() * mf.hparams.n_embd);
        // At the planned row; and, when the head node has the whole table (a tied
        // head), at a later row as for a step alone: the last stage then computes a
        // suffix of its rows.
        let mut cuts = vec![va];
        checked += 1;
        if a.lm_head_reach() == Some(0..v) {
            cuts.push((va + v) / 2);
            checked += 1;
        }
        for at in cuts {
            b.project(&normed, at..v, &mut part_b).expect("project b");
            a.project(&normed, 0..at, &mut part_a).expect("project a");
            assert_eq!(part_b.len(), prompt.len() * (v - at));
            assert_eq!(part_a.len(), prompt.len() * at);
            for (row, want) in reference.chunks_exact(v).enumerate() {
                let got: Vec<f32> = part_a[row * at..(row + 1) * at]
                    .iter()
                    .chain(&part_b[row * (v - at)..(row + 1) * (v - at)])
                    .copied()
                    .collect();
                let d = rel_max_diff(&got, want);
                assert!(
                    d <= 1e-6,
                    "head split at row {at} (planned {va}) of {v}, position {row}: logits differ by {d:.2e}"
                );
            }
        }
        // rows outside a stage's reach are refused, not read out of bounds
        assert!(b.project(&normed, 0..v, &mut part_b).is_err());
        assert!(b.project(&normed, va..v + 1, &mut part_b).is_err());
    }
    checked
}

#[test]
fn split_head_matches_whole_head() {
    use ggml_shim::writer::WriterType;
    let dir = TempDir::new("headsplit").expect("tempdir");
    for arch in TinyArch::ALL {
        for ty in [WriterType::F32, WriterType::Q8_0] {
            let path = tiny_typed(arch, ty, &dir);
            let n_vocab = ModelFile::open(&path).expect("open").hparams.n_vocab;
            assert_eq!(
                check_head_split(&path, &prompt_ids(7, n_vocab, 5), &[0.3, 0.5, 0.9]),
                3,
                "an untied head: the head node has only its own rows"
            );
        }
        // a tied head: the head node's share is a view of its embedding table
        let mut spec = TinySpec::new(arch);
        spec.tied_head = true;
        let path = dir.path().join(format!("{}-tied.gguf", arch.name()));
        write_tiny_model(&path, &spec).expect("write tiny model");
        let n_vocab = ModelFile::open(&path).expect("open").hparams.n_vocab;
        assert_eq!(
            check_head_split(&path, &prompt_ids(7, n_vocab, 5), &[0.3]),
            2,
            "{}: a tied head reaches every row from the head node",
            arch.name()
        );
    }
}

#[test]
fn real_gemma3_split_head_matches_whole_head() {
    let Some(path) = real() else { return };
    let mf = ModelFile::open(&path).expect("open");
    let tok = Tokenizer::load(&path, mf.hparams.arch.name()).expect("tokenizer");
    let prompt = tok.encode("The capital of France is").expect("tokenize");
    // (2 where the Q8_0 table is not repacked, as on x86: the tied head is a view)
    assert!(check_head_split(&path, &prompt, &[0.35]) >= 1);
}

// ---- batch invariance: a sequence's logits do not depend on its company ----

/// One run of sequence A (slot 0) with `company` other sequences: all prompts go in
/// one step, then every sequence decodes greedily for `steps` steps; at step 2 a
/// late sequence's prompt joins the step (a prompt chunk next to decoding tokens).
/// Returns A's logits at every step and the late sequence's first logits.
fn run_with_company(
    mf: &ModelFile,
    prompts: &[Vec<i32>],
    company: usize,
    late: Option<&[i32]>,
    steps: usize,
) -> (Vec<Vec<f32>>, Option<Vec<f32>>) {
    let n_vocab = mf.hparams.n_vocab;
    let n_slots = company + 1 + usize::from(late.is_some());
    let mut p = pipeline(mf, whole(mf), 128, n_slots);
    let seqs: Vec<BatchSeq> = prompts[..=company]
        .iter()
        .enumerate()
        .map(|(slot, pr)| BatchSeq {
            slot,
            pos0: 0,
            n_tokens: pr.len(),
            output: OutputRows::Last,
        })
        .collect();
    let mut rows = p
        .step(&seqs, &prompts[..=company].concat())
        .expect("prefill")
        .to_vec();
    let mut pos: Vec<usize> = prompts[..=company].iter().map(|pr| pr.len()).collect();
    let mut a_logits = vec![rows[..n_vocab].to_vec()];
    let mut late_logits = None;
    for step in 0..steps {
        let next: Vec<i32> = rows
            .chunks(n_vocab)
            .take(company + 1)
            .map(|r| ggml_shim::llama::argmax(r).expect("argmax") as i32)
            .collect();
        let mut seqs: Vec<BatchSeq> = (0..=company)
            .map(|slot| BatchSeq {
                slot,
                pos0: pos[slot],
                n_tokens: 1,
                output: OutputRows::Last,
            })
            .collect();
        let mut tokens = next.clone();
        let late_now = late.filter(|_| step == 2);
        if let Some(l) = late_now {
            seqs.push(BatchSeq {
                slot: company + 1,
                pos0: 0,
                n_tokens: l.len(),
                output: OutputRows::Last,
            });
            tokens.extend_from_slice(l);
        }
        rows = p.step(&seqs, &tokens).expect("decode").to_vec();
        if late_now.is_some() {
            late_logits = Some(rows[(company + 1) * n_vocab..].to_vec());
        }
        a_logits.push(rows[..n_vocab].to_vec());
        for x in pos.iter_mut() {
            *x += 1;
        }
    }
    (a_logits, late_logits)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// On the real Gemma 3 270M (Q4_K matrices repacked by ggml, Q6_K ones plain, Q5_0,
/// and a Q8_0 head): sequence A's logits at every step have the same bits whether
/// the step holds 1, 2, 5 or 8 sequences, and whether a prompt chunk joins it; the
/// late prompt's logits equal its own run alone; A alone equals llama.cpp decoding
/// it alone (greedy tokens, and logits within the parity tolerance).
#[test]
fn real_gemma3_logits_do_not_depend_on_the_batch() {
    let Some(path) = real() else { return };
    init_backend();
    let mf = ModelFile::open(&path).expect("open");
    let tok = Tokenizer::load(&path, mf.hparams.arch.name()).expect("tokenizer");
    let texts = [
        "Once upon a time, in a small village,",
        "The capital of France is",
        "Write a short poem about the sea and the wind that",
        "1, 2, 3, 4,",
        "The three most important things to know about Rome are",
        "Q: What is the boiling point of water?\nA:",
        "a",
        "In 1969, the first humans landed on the Moon. The mission was called",
    ];
    let prompts: Vec<Vec<i32>> = texts
        .iter()
        .map(|t| tok.encode(t).expect("tokenize"))
        .collect();
    let late = tok
        .encode("My favourite colour is blue because")
        .expect("tokenize");
    let steps = 12;
    let (alone, _) = run_with_company(&mf, &prompts, 0, None, steps);
    let (late_alone, _) = run_with_company(&mf, std::slice::from_ref(&late), 0, None, 0);
    for company in [1, 4, 7] {
        for with_late in [false, true] {
            let (a, l) = run_with_company(
                &mf,
                &prompts,
                company,
                with_late.then_some(&late[..]),
                steps,
            );
            for (step, (got, want)) in a.iter().zip(&alone).enumerate() {
                assert!(
                    same_bits(got, want),
                    "A's logits at step {step} with {company} others (late prompt: {with_late}) \
                     differ from A alone (relative {:.2e})",
                    rel_max_diff(got, want)
                );
            }
            if let Some(l) = l {
                assert!(
                    same_bits(&l, &late_alone[0]),
                    "a prompt processed next to {} decoding sequences differs from alone",
                    company + 1
                );
            }
        }
    }
    // A alone against llama.cpp decoding it alone
    let oracle = OracleModel::load(&path, 1).expect("oracle");
    let mut octx = oracle.context(128, 128, 1).expect("oracle context");
    let want = octx
        .greedy_generate(&prompts[0], steps + 1)
        .expect("oracle");
    let got: Vec<i32> = alone
        .iter()
        .map(|r| ggml_shim::llama::argmax(r).expect("argmax") as i32)
        .collect();
    assert_eq!(got, want, "A's greedy tokens vs llama.cpp");
}

// ---- generated models of published shapes (`exo gen-model`) ----

/// A generated model of `shape`: exo and llama.cpp load it, exo tokenizes a prompt
/// longer than one prefill chunk, and exo's logits at every position equal llama.cpp's
/// within the parity tolerance; the logits are finite and depend on the context; a
/// pipeline split into two layer ranges gives the whole model's logits.
fn check_generated(shape: &exo::gen_model::Shape) {
    init_backend();
    let dir = TempDir::new(&format!("gen-{}", shape.name)).expect("tempdir");
    let path = dir.path().join(format!("{}.gguf", shape.name));
    exo::gen_model::write(shape, 7, &path).expect("generate");
    let mf = ModelFile::open(&path).expect("open generated model");
    assert_eq!(mf.hparams.n_layer, shape.n_layer);
    assert_eq!(mf.hparams.n_vocab, shape.n_vocab);
    let tok = Tokenizer::load(&path, mf.hparams.arch.name()).expect("tokenizer");
    let prompt = tok
        .encode("The quick brown fox jumps over the lazy dog, then naps")
        .expect("tokenize");
    assert!(prompt.len() > CHUNK, "{} tokens: one chunk", prompt.len());
    let n_ctx = prompt.len() + 8;
    let oracle = OracleModel::load(&path, 1).expect("oracle load");
    let mut octx = oracle
        .context(n_ctx as u32, CHUNK as u32, 1)
        .expect("oracle context");
    let mut exo = pipeline(&mf, whole(&mf), n_ctx, 1);
    let whole_logits = check_prompt_logits(&path, &mut exo, &mut octx, &prompt, &TINY_TOL);
    // one model in memory at a time (the 8B shape is 4.9 GB)
    drop((exo, octx, oracle));
    for row in &whole_logits {
        assert!(row.iter().all(|v| v.is_finite()), "non-finite logits");
    }
    let moved = whole_logits[1..]
        .iter()
        .map(|row| rel_max_diff(row, &whole_logits[0]))
        .fold(0f32, f32::max);
    assert!(
        moved > 0.1,
        "logits barely depend on the context ({moved:.2e})"
    );
    let n = shape.n_layer;
    let mut split = pipeline(&mf, split_ranges(n, &[n / 2]).expect("ranges"), n_ctx, 1);
    let got = prompt_logits(&mut split, &prompt, CHUNK).expect("split logits");
    for (pos, (a, b)) in got.iter().zip(&whole_logits).enumerate() {
        let d = rel_max_diff(a, b);
        assert!(
            d <= 1e-6,
            "split at layer {}, position {pos}: logits differ by {d:.2e}",
            n / 2
        );
    }
}

#[test]
fn generated_llama3_1b_matches_llama_cpp() {
    check_generated(&exo::gen_model::find_shape("llama3-1b").expect("shape"));
}

/// The Llama 3 8B shape (a 4.9 GB file, ~15 s to write and several GB of memory per
/// engine): run by hand, `cargo test --release -p exo-tests --test parity -- --ignored
/// generated_llama3_8b`.
#[test]
#[ignore = "writes and loads a 4.9 GB model"]
fn generated_llama3_8b_matches_llama_cpp() {
    check_generated(&exo::gen_model::find_shape("llama3-8b").expect("shape"));
}

/// Qwen2.5 3B's shape with 4 of its 36 layers: every tensor shape and key as in the
/// whole model, the layers' types by the Q4_K_M rule for 4 layers.
#[test]
fn generated_qwen2_5_3b_layers_match_llama_cpp() {
    let shape = exo::gen_model::find_shape("qwen2.5-3b").expect("shape");
    check_generated(&exo::gen_model::Shape {
        n_layer: 4,
        ..shape
    });
}
