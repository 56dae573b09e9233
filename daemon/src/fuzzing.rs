//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run by `scripts/fuzz.sh`)
//! and of the test that replays their corpus on every run of the suite
//! (`daemon/tests/fuzz_corpus.rs`). Each takes any bytes and must return: no panic, no
//! abort inside ggml or llama.cpp, no hang, memory bounded by the input.
//!
//! The gguf target renders the file's chat template (loading a tokenizer renders it
//! for a one-message chat). A template can build strings far larger than any input,
//! which is why `exo` renders in its template sandbox: with [`TEMPLATE_SANDBOX_ENV`]
//! naming an `exo` binary the target does the same (`scripts/fuzz.sh` sets it; the
//! corpus test enables the sandbox itself), so such a template ends that child
//! process, as it would in `exo serve`, and not the fuzzer. The child is not
//! instrumented: the target checks that exo survives any template, while coverage
//! guidance inside minijinja is lost (without the variable renders run in process).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cluster::proto::{
    ErrorMsg, Hello, HelloAck, Plan, PlanAck, Pong, SliceOffer, SliceStatus, SlotSetup,
};
use crate::cluster::slices::store::check_offer;

/// The environment variable naming the `exo` binary whose `template-sandbox` renders
/// the gguf target's chat templates.
pub const TEMPLATE_SANDBOX_ENV: &str = "EXO_FUZZ_TEMPLATE_SANDBOX";

/// One target: its name (the directory of its corpus) and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: [Target; 5] = [
    ("frame", frame),
    ("control", control),
    ("gguf", gguf),
    ("config", config),
    ("request", request),
];

/// A frame from a peer: through the opener, then authenticated and decoded.
pub fn frame(data: &[u8]) {
    crate::cluster::wire::fuzz::open_any(data);
}

/// The JSON of a control message, as every message type, with the checks a receiver
/// runs on a slice offer.
pub fn control(data: &[u8]) {
    let _ = serde_json::from_slice::<Hello>(data);
    let _ = serde_json::from_slice::<HelloAck>(data);
    let _ = serde_json::from_slice::<Plan>(data);
    let _ = serde_json::from_slice::<PlanAck>(data);
    let _ = serde_json::from_slice::<Pong>(data);
    let _ = serde_json::from_slice::<SlotSetup>(data);
    let _ = serde_json::from_slice::<SliceStatus>(data);
    let _ = serde_json::from_slice::<ErrorMsg>(data);
    if let Ok(offer) = serde_json::from_slice::<SliceOffer>(data) {
        if let Ok(checked) = check_offer(&offer) {
            let _ = offer.chunking.bytes_of(&checked.need);
        }
    }
}

/// The largest model file the gguf target also loads and runs (its weights in ggml,
/// two tokens decoded): larger ones stop after the checks, to keep each run fast.
const RUN_MODELS_UP_TO: usize = 4 << 20;

/// A model file: its header, tensor table and hyper-parameters, then (when those pass)
/// the vocabulary and chat template as llama.cpp loads them, and a small model's weights
/// loaded and run for two tokens as `exo run` would.
pub fn gguf(data: &[u8]) {
    static SANDBOX_FROM_ENV: std::sync::Once = std::sync::Once::new();
    SANDBOX_FROM_ENV.call_once(|| {
        if let Some(exe) = std::env::var_os(TEMPLATE_SANDBOX_ENV) {
            crate::tokenizer::template::sandbox::enable(PathBuf::from(exe));
        }
    });
    let file = ScratchFile::new("gguf", data);
    let Ok(model) = crate::model::ModelFile::open(&file.0) else {
        return;
    };
    let mut prompt = vec![0];
    if let Ok(tokenizer) = crate::tokenizer::Tokenizer::load(&file.0, model.hparams.arch.name()) {
        if let Ok(tokens) = tokenizer.encode("Hello <start_of_turn> world\n") {
            prompt = tokens;
        }
    }
    if data.len() <= RUN_MODELS_UP_TO {
        run_two_tokens(&model, &prompt);
    }
}

fn run_two_tokens(model: &crate::model::ModelFile, prompt: &[i32]) {
    use crate::engine::{generate, GenerateParams, Pipeline, PipelineConfig};
    let cfg = PipelineConfig {
        n_ctx: prompt.len() + 2,
        n_slots: 1,
        n_threads: 1,
        repack: true,
        ranges: vec![crate::model::LayerRange::new(0, model.hparams.n_layer)],
    };
    let Ok(mut pipeline) = Pipeline::local(model, &cfg) else {
        return;
    };
    let params = GenerateParams {
        max_tokens: 2,
        sampling: Default::default(),
        chunk: 512,
    };
    let _ = generate(&mut pipeline, prompt, &params, |_| false, |_| true);
}

/// A configuration file's text, with no environment overrides.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse_text(Path::new("fuzz.toml"), text, &HashMap::new());
    }
}

/// The body of a completions or chat completions request.
pub fn request(data: &[u8]) {
    crate::api::openai_fuzz::parse_any(data);
}

/// A file holding one input, removed on drop (llama.cpp and ggml read models from paths).
struct ScratchFile(PathBuf);

impl ScratchFile {
    fn new(what: &str, data: &[u8]) -> ScratchFile {
        let thread = format!("{:?}", std::thread::current().id());
        let name = format!(
            "exo-fuzz-{what}-{}-{}.bin",
            std::process::id(),
            thread.trim_start_matches("ThreadId(").trim_end_matches(')')
        );
        let path = std::env::temp_dir().join(name);
        // a failed write leaves a short file, which is one more input
        let _ = std::fs::write(&path, data);
        ScratchFile(path)
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
