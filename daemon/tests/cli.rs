//! The `exo` binary on good and bad input: every failure is one clear error line
//! and a non-zero exit, never a panic or an abort inside ggml.

use std::path::Path;
use std::process::{Command, Output};

use exo_tests::{write_tiny_model, TempDir, TinyArch, TinySpec};
use ggml_shim::writer::GgufWriter;

fn exo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_exo"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run exo")
}

/// Asserts a clean failure whose single error line mentions `needle`.
fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code (a signal means a crash); stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(
        lines[0].starts_with("exo: error:"),
        "unexpected stderr: {stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "error line lacks '{needle}': {stderr}"
    );
}

fn tiny(dir: &TempDir, arch: TinyArch) -> String {
    let path = dir.path().join(format!("{}.gguf", arch.name()));
    write_tiny_model(&path, &TinySpec::new(arch)).expect("fixture");
    path.display().to_string()
}

fn run_greedy(model: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--model",
        model,
        "--prompt",
        "hello the",
        "-n",
        "24",
        "--temp",
        "0",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    exo(&args)
}

#[test]
fn run_prints_a_completion_and_layers_split_changes_nothing() {
    let dir = TempDir::new("cli-run").expect("tempdir");
    for arch in TinyArch::ALL {
        let model = tiny(&dir, arch);
        let whole = run_greedy(&model, &[]);
        assert!(
            whole.status.success(),
            "{}",
            String::from_utf8_lossy(&whole.stderr)
        );
        let text = String::from_utf8_lossy(&whole.stdout);
        assert!(
            text.trim().len() > 3,
            "{}: empty completion: {text:?}",
            arch.name()
        );
        let split = run_greedy(&model, &["--layers", "2..4"]);
        assert!(
            split.status.success(),
            "{}",
            String::from_utf8_lossy(&split.stderr)
        );
        assert_eq!(
            whole.stdout,
            split.stdout,
            "{}: --layers 2..4 changed the output",
            arch.name()
        );
    }
}

#[test]
fn same_seed_same_output() {
    let dir = TempDir::new("cli-seed").expect("tempdir");
    let model = tiny(&dir, TinyArch::Llama);
    let args = [
        "run",
        "--model",
        model.as_str(),
        "--prompt",
        "the",
        "-n",
        "24",
        "--temp",
        "1.0",
        "--seed",
        "42",
        "--threads",
        "1",
    ];
    let a = exo(&args);
    let b = exo(&args);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    let mut other = args;
    other[10] = "43";
    let c = exo(&other);
    assert!(c.status.success());
    assert_ne!(
        a.stdout, c.stdout,
        "different seeds gave the same 24 sampled tokens"
    );
}

/// Asserts that `exo inspect` succeeds on `model` and prints every needle.
fn assert_inspect_says(model: &str, needles: &[&str]) {
    let out = exo(&["inspect", "--model", model]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in needles {
        assert!(
            text.contains(needle),
            "inspect output lacks '{needle}':\n{text}"
        );
    }
}

#[test]
fn inspect_describes_the_model() {
    let dir = TempDir::new("cli-inspect").expect("tempdir");
    let model = tiny(&dir, TinyArch::Gemma3);
    assert_inspect_says(
        &model,
        &[
            "architecture gemma3",
            "layers       6",
            "layer   5",
            "sliding",
            "f32",
        ],
    );
}

/// `exo gen-model` writes a model that `exo inspect` describes and `exo run` runs,
/// chat template included; an unknown shape is one error line naming the known ones.
#[test]
fn gen_model_writes_a_model_inspect_and_run_read() {
    let dir = TempDir::new("cli-gen").expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    let model = path.display().to_string();
    let out = exo(&["gen-model", "--shape", "llama3-tiny", "--seed", "3", &model]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("shape llama3-tiny, seed 3, 39 tensors"),
        "{stdout}"
    );
    assert_inspect_says(
        &model,
        &[
            "architecture llama",
            "layers       4",
            "vocabulary   4096",
            "q4_K",
            "q6_K",
        ],
    );
    let run = run_greedy(&model, &["--chat"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!String::from_utf8_lossy(&run.stdout).trim().is_empty());

    let other = dir.path().join("x.gguf");
    let out = exo(&[
        "gen-model",
        "--shape",
        "llama3-70b",
        other.to_str().unwrap(),
    ]);
    assert_clean_failure(
        &out,
        "unknown shape \"llama3-70b\"; known shapes: llama3-8b, llama3-1b, qwen2.5-3b, llama3-tiny",
    );
    assert!(!other.exists());
}

#[test]
fn missing_file() {
    assert_clean_failure(
        &exo(&[
            "run",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ]),
        "cannot open",
    );
    assert_clean_failure(
        &exo(&["inspect", "--model", "/nonexistent/model.gguf"]),
        "cannot open",
    );
}

#[test]
fn not_a_gguf() {
    let dir = TempDir::new("cli-notgguf").expect("tempdir");
    let p = dir.path().join("text.gguf");
    std::fs::write(&p, "this is not a model\n").expect("write");
    assert_clean_failure(
        &exo(&["run", "--model", &p.display().to_string(), "--prompt", "hi"]),
        "not a GGUF",
    );
}

#[test]
fn truncated_gguf() {
    let dir = TempDir::new("cli-trunc").expect("tempdir");
    let model = tiny(&dir, TinyArch::Llama);
    let bytes = std::fs::read(&model).expect("read");
    // cut in the tensor data: the header parses, the table points past the end
    let cut = dir.path().join("cut-data.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).expect("write");
    assert_clean_failure(
        &exo(&[
            "run",
            "--model",
            &cut.display().to_string(),
            "--prompt",
            "hi",
        ]),
        "truncated",
    );
    // cut in the header
    let cut = dir.path().join("cut-header.gguf");
    std::fs::write(&cut, &bytes[..200]).expect("write");
    assert_clean_failure(
        &exo(&[
            "run",
            "--model",
            &cut.display().to_string(),
            "--prompt",
            "hi",
        ]),
        "GGUF header",
    );
}

#[test]
fn wrong_architecture() {
    let dir = TempDir::new("cli-arch").expect("tempdir");
    let p = dir.path().join("mamba.gguf");
    let mut w = GgufWriter::new();
    w.set_str("general.architecture", "mamba").expect("key");
    w.write(Path::new(&p)).expect("write");
    assert_clean_failure(
        &exo(&["run", "--model", &p.display().to_string(), "--prompt", "hi"]),
        "unsupported architecture 'mamba'",
    );
}

#[test]
fn layer_range_out_of_bounds() {
    let dir = TempDir::new("cli-range").expect("tempdir");
    let model = tiny(&dir, TinyArch::Qwen3);
    assert_clean_failure(&run_greedy(&model, &["--layers", "3..9"]), "out of bounds");
}

#[test]
fn prompt_longer_than_context() {
    let dir = TempDir::new("cli-ctx").expect("tempdir");
    let model = tiny(&dir, TinyArch::Qwen2);
    let long = "hello the ".repeat(400);
    let out = exo(&[
        "run",
        "--model",
        &model,
        "--prompt",
        &long,
        "-n",
        "8",
        "--threads",
        "1",
    ]);
    assert_clean_failure(&out, "context holds");
    let out = exo(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "hello",
        "-n",
        "100",
        "--ctx",
        "16",
        "--threads",
        "1",
    ]);
    assert_clean_failure(&out, "context holds 16");
}

/// Under systemd (`NOTIFY_SOCKET`): a model that loads reports READY=1; one that
/// cannot be loaded says why in STATUS= and exits with 78, which the unit's
/// `RestartPreventExitStatus=78` keeps from being retried forever.
#[test]
fn under_systemd_ready_is_reported_and_a_bad_model_exits_78() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    let dir = TempDir::new("notify").expect("tempdir");
    let good = tiny(&dir, TinyArch::Llama);
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really a model file").expect("write");
    for (model, expect_ready) in [(good, true), (bad.display().to_string(), false)] {
        let sock_path = dir.path().join(format!("notify-{expect_ready}.sock"));
        let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let config = dir.path().join(format!("exo-{expect_ready}.toml"));
        std::fs::write(
            &config,
            format!(
                "[model]\npath = \"{model}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[engine]\nthreads = 1\nctx = 64\n"
            ),
        )
        .expect("config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_exo"))
            .args(["serve", "--config", &config.display().to_string()])
            .env("NOTIFY_SOCKET", &sock_path)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn exo serve");
        let mut heard = String::new();
        let mut exit = None;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            let mut buf = [0u8; 4096];
            if let Ok(n) = sock.recv(&mut buf) {
                heard.push_str(&String::from_utf8_lossy(&buf[..n]));
                heard.push('\n');
            }
            if let Some(status) = child.try_wait().expect("wait") {
                exit = Some(status);
                break;
            }
            if expect_ready && heard.contains("READY=1") {
                break;
            }
        }
        if expect_ready {
            assert!(heard.contains("READY=1"), "no READY=1: {heard}");
            assert!(heard.contains("STATUS=serving"), "{heard}");
            assert!(exit.is_none(), "exited: {exit:?}");
            let _ = child.kill();
            let _ = child.wait();
        } else {
            let _ = child.kill();
            let _ = child.wait();
            assert_eq!(exit.and_then(|s| s.code()), Some(78), "heard: {heard}");
            assert!(heard.contains("STATUS=model failed to load"), "{heard}");
            assert!(!heard.contains("READY=1"), "{heard}");
        }
    }
}

/// On a CPU without the instructions this binary was compiled for, `exo` says which
/// one is missing and exits 1, before ggml's static initializers could die of
/// SIGILL. Runs the binary on an emulated Nehalem (no AVX) when qemu-user is here.
#[test]
fn an_old_cpu_gets_a_clear_error_not_sigill() {
    let qemu = "/usr/bin/qemu-x86_64-static";
    if !cfg!(target_arch = "x86_64") || !Path::new(qemu).exists() {
        eprintln!("note: {qemu} not installed (qemu-user-static); skipped");
        return;
    }
    let out = Command::new(qemu)
        .args(["-cpu", "Nehalem", env!("CARGO_BIN_EXE_exo"), "--version"])
        .output()
        .expect("run qemu");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("exo: error: this CPU lacks AVX,"),
        "stderr: {stderr}"
    );
}

/// `exo check-config` (the unit's ExecStartPre) checks the model file too: a missing
/// or unusable one fails with one line naming it; a good one passes.
#[test]
fn check_config_checks_the_model_file() {
    let dir = TempDir::new("checkcfg").expect("tempdir");
    let good = tiny(&dir, TinyArch::Qwen3);
    let missing = dir.path().join("absent.gguf").display().to_string();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a model").expect("write");
    let garbage = garbage.display().to_string();
    let config = dir.path().join("exo.toml");
    let cfg = config.display().to_string();
    for (model, ok, needle) in [
        (good.as_str(), true, ""),
        (missing.as_str(), false, "absent.gguf"),
        (garbage.as_str(), false, "garbage.gguf"),
    ] {
        std::fs::write(&config, format!("[model]\npath = \"{model}\"\n")).expect("config");
        let out = exo(&["check-config", "--config", &cfg]);
        if ok {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            assert_clean_failure(&out, needle);
        }
    }
}

/// `exo check-config` says which wire format is in force: the exact one unless the
/// file asks for f16.
#[test]
fn check_config_prints_the_wire_format_in_force() {
    let dir = TempDir::new("checkwire").expect("tempdir");
    let model = tiny(&dir, TinyArch::Qwen3);
    let config = dir.path().join("exo.toml");
    let cfg = config.display().to_string();
    let cluster = "[node]\nname = \"a\"\nlisten = \"tcp://127.0.0.1:5555\"\n\
                   [cluster]\nkey = \"0123456789abcdef0123\"\n";
    let peers = "[[peer]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:5555\"\n\
                 [[peer]]\nname = \"b\"\naddress = \"tcp://127.0.0.1:5557\"\n";
    for (line, want) in [("", "f32"), ("activations = \"f16\"\n", "f16")] {
        let text = format!("[model]\npath = \"{model}\"\n{cluster}{line}{peers}");
        std::fs::write(&config, text).expect("config");
        let out = exo(&["check-config", "--config", &cfg]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("activations = \"{want}\"")),
            "{line:?}: {stdout}"
        );
    }
}

/// `exo check-config` refuses, with the numbers, a model that cannot fit the memory
/// the node offers, where the file alone can tell: a single node's whole model, a
/// cluster head's own given layers, or the embedding and first layer any head holds.
/// A worker's part is planned by the head: its check passes.
#[test]
fn check_config_refuses_a_model_that_cannot_fit() {
    let dir = TempDir::new("checkmem").expect("tempdir");
    let model = tiny(&dir, TinyArch::Qwen3);
    let config = dir.path().join("exo.toml");
    let cfg = config.display().to_string();
    let node = |name: &str, memory: &str| {
        format!(
            "[node]\nname = \"{name}\"\nlisten = \"tcp://127.0.0.1:5555\"\nmemory = \"{memory}\"\n"
        )
    };
    let cluster = "[cluster]\nkey = \"0123456789abcdef0123\"\n";
    let peers = |layers: bool| {
        let (a, b) = if layers {
            ("layers = \"0-1\"\n", "layers = \"1-6\"\n")
        } else {
            ("", "")
        };
        format!(
            "[[peer]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:5555\"\n{a}\
             [[peer]]\nname = \"b\"\naddress = \"tcp://127.0.0.1:5557\"\n{b}"
        )
    };
    let single =
        |memory: &str| format!("[model]\npath = \"{model}\"\n[node]\nmemory = \"{memory}\"\n");
    let head = |memory: &str, layers: bool| {
        format!(
            "[model]\npath = \"{model}\"\n{}{cluster}{}",
            node("a", memory),
            peers(layers)
        )
    };
    let worker = format!(
        "[model]\npath = \"{model}\"\n{}{cluster}{}",
        node("b", "1 MB"),
        peers(true)
    );
    // the runtime alone takes more than 32 MiB
    let refused = [
        (
            single("32 MiB"),
            "[node] memory: model needs ",
            "; this node offers 34 MB: add a node, lower ctx or use a smaller quantisation",
        ),
        (
            head("32 MiB", true),
            "[node] memory: a cannot hold layers 0..1 and the token embedding: they need ",
            "; it offers 34 MB: give it fewer layers",
        ),
        (
            head("32 MiB", false),
            "[node] memory: a cannot hold layers 0..1 and the token embedding",
            "",
        ),
    ];
    for (text, first, then) in refused {
        std::fs::write(&config, &text).expect("config");
        let out = exo(&["check-config", "--config", &cfg]);
        assert_clean_failure(&out, first);
        assert_clean_failure(&out, then);
    }
    for text in [
        single("1 GiB"),
        head("1 GiB", true),
        head("1 GiB", false),
        worker,
    ] {
        std::fs::write(&config, &text).expect("config");
        let out = exo(&["check-config", "--config", &cfg]);
        assert!(
            out.status.success(),
            "{text}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("memory = \""), "{stdout}");
    }
}

/// A model path that is a FIFO (or a directory) is refused at once, not read forever
/// (`exo check-config` runs as the unit's ExecStartPre).
#[test]
fn a_model_path_that_is_not_a_file_is_refused_at_once() {
    let dir = TempDir::new("cli-fifo").expect("tempdir");
    let fifo = dir.path().join("model.gguf");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let t0 = std::time::Instant::now();
    let fifo = fifo.display().to_string();
    assert_clean_failure(&exo(&["inspect", "--model", &fifo]), "not a regular file");
    assert_clean_failure(
        &exo(&["run", "--model", &fifo, "--prompt", "hi"]),
        "not a regular file",
    );
    let config = dir.path().join("exo.toml");
    std::fs::write(&config, format!("[model]\npath = \"{fifo}\"\n")).expect("config");
    assert_clean_failure(
        &exo(&["check-config", "--config", &config.display().to_string()]),
        "not a regular file",
    );
    let dir_path = dir.path().display().to_string();
    assert_clean_failure(
        &exo(&["inspect", "--model", &dir_path]),
        "not a regular file",
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
}

/// Overwrites the value of metadata key `key` (a 4-byte u32 or f32) in a GGUF file.
fn patch_value(path: &Path, key: &str, value: [u8; 4]) {
    let mut bytes = std::fs::read(path).expect("model");
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("{key} is not in the file"));
    // the key, then its 4-byte type, then the value
    let value_at = at + key.len() + 4;
    bytes[value_at..value_at + 4].copy_from_slice(&value);
    std::fs::write(path, bytes).expect("patched model");
}

/// Hyper-parameters that ggml would assert on, or that would size allocations or
/// loops without bound, are refused with their key before ggml sees them.
#[test]
fn hostile_hyper_parameters_are_refused_with_their_key() {
    let dir = TempDir::new("cli-hostile-hparams").expect("tempdir");
    let cases: [(&str, [u8; 4]); 4] = [
        (
            "llama.attention.layer_norm_rms_epsilon",
            (-1.0f32).to_le_bytes(),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            f32::NAN.to_le_bytes(),
        ),
        ("llama.rope.dimension_count", 0u32.to_le_bytes()),
        ("llama.block_count", u32::MAX.to_le_bytes()),
    ];
    for (i, (key, value)) in cases.into_iter().enumerate() {
        let model = dir.path().join(format!("m{i}.gguf"));
        write_tiny_model(&model, &TinySpec::new(TinyArch::Llama)).expect("tiny model");
        patch_value(&model, key, value);
        let t0 = std::time::Instant::now();
        let out = exo(&["inspect", "--model", &model.display().to_string()]);
        assert_clean_failure(&out, key);
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{key}");
    }
}

/// Replaces the first occurrence of `from` in a file with `to` (the same length).
fn patch_bytes(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).expect("model");
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{} is not in the file", String::from_utf8_lossy(from)));
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(path, bytes).expect("patched model");
}

/// Vocabularies llama.cpp asserts on (two tokens of one text: two byte flips made one;
/// a byte token whose text is not `<0xHH>`) are refused with one error line by every
/// command that loads them, `exo check-config` included, instead of aborting.
#[test]
fn hostile_vocabularies_are_refused_before_llama_cpp_reads_them() {
    let dir = TempDir::new("cli-hostile-vocab").expect("tempdir");
    let cases: [(&[u8], &[u8], &str); 2] = [
        (b"<0x01>", b"<0x00>", "tokens 3 and 4 are the same text"),
        (b"<0x01>", b"<0xZZ>", "is a byte token but its text"),
    ];
    for (i, (from, to, why)) in cases.into_iter().enumerate() {
        let model = dir.path().join(format!("v{i}.gguf"));
        write_tiny_model(&model, &TinySpec::new(TinyArch::Llama)).expect("tiny model");
        patch_bytes(&model, from, to);
        let model = model.display().to_string();
        assert_clean_failure(&exo(&["run", "--model", &model, "--prompt", "hi"]), why);
        let config = dir.path().join(format!("v{i}.toml"));
        std::fs::write(&config, format!("[model]\npath = \"{model}\"\n")).expect("config");
        let out = exo(&["check-config", "--config", &config.display().to_string()]);
        assert_clean_failure(&out, "the vocabulary");
        assert_clean_failure(&out, why);
    }
}

/// Explicit layer ranges are checked against the model by `exo check-config`: ranges
/// that stop short of the last layer or run past it are refused with the numbers.
#[test]
fn check_config_checks_layer_ranges_against_the_model() {
    let dir = TempDir::new("cli-layers-fit").expect("tempdir");
    let model = tiny(&dir, TinyArch::Llama);
    let config = dir.path().join("exo.toml");
    let cfg = config.display().to_string();
    let text = |b: &str| {
        format!(
            "[model]\npath = \"{model}\"\n[node]\nname = \"a\"\nlisten = \"tcp://127.0.0.1:5555\"\n\
             [cluster]\nkey = \"0123456789abcdef0123\"\n\
             [[peer]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:5555\"\nlayers = \"0-2\"\n\
             [[peer]]\nname = \"b\"\naddress = \"tcp://127.0.0.1:5557\"\nlayers = \"{b}\"\n"
        )
    };
    for (b, why) in [
        (
            "2-4",
            "the [[peer]] layers end at 4 but the model has 6 layers (layers 4..6 are on no peer)",
        ),
        ("2-20", "peer 'b' has layers 2-20, past the last one"),
    ] {
        std::fs::write(&config, text(b)).expect("config");
        assert_clean_failure(&exo(&["check-config", "--config", &cfg]), why);
    }
    std::fs::write(&config, text("2-6")).expect("config");
    let out = exo(&["check-config", "--config", &cfg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chat template is code from the model file: one that loops or writes without end is
/// refused when the model is loaded (by `exo check-config` too), in well under a second
/// of its work, instead of costing seconds of CPU and gigabytes per chat request; so is
/// one that builds a huge string in memory.
#[test]
fn a_hostile_chat_template_is_refused_with_the_model() {
    let dir = TempDir::new("cli-hostile-template").expect("tempdir");
    let templates = [
        r#"{% for i in range(100000) %}{{ "x" * 100000 }}{% endfor %}"#,
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        // within fuel and output limits, but a string of 2^48 bytes: stopped by the
        // memory cap of the process that renders templates
        r#"{% set ns = namespace(s="x") %}{% for i in range(48) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"#,
    ];
    for (i, template) in templates.into_iter().enumerate() {
        let model = dir.path().join(format!("t{i}.gguf"));
        let mut spec = TinySpec::new(TinyArch::Llama);
        spec.chat_template = Some(template.to_string());
        write_tiny_model(&model, &spec).expect("tiny model");
        let model = model.display().to_string();
        let t0 = std::time::Instant::now();
        let out = exo(&["run", "--model", &model, "--prompt", "hi", "--chat"]);
        assert_clean_failure(&out, "chat template: ");
        let config = dir.path().join(format!("t{i}.toml"));
        std::fs::write(&config, format!("[model]\npath = \"{model}\"\n")).expect("config");
        let out = exo(&["check-config", "--config", &config.display().to_string()]);
        assert_clean_failure(&out, "chat template: ");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    }
}
