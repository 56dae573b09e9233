//! The multi-process harness of the cluster tests: free ports, `exo serve` processes
//! (killed on drop; their logs printed when a test fails), config files, HTTP helpers
//! and references (a single node, llama.cpp). Shared by several test crates, each of
//! which uses a part of it.
#![allow(dead_code, unused_imports)]

pub use std::collections::HashSet;
pub use std::fs::OpenOptions;
pub use std::net::TcpListener;
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command, Stdio};
pub use std::sync::Mutex;
pub use std::time::{Duration, Instant};

pub use exo::cluster::transport::{DialOptions, PipelineTx};
pub use exo::cluster::wire::{Dtype, FrameKey, FrameType, Payload, Sealer};
pub use exo::engine::{BatchSeq, OutputRows};
pub use exo_tests::{write_tiny_model, TempDir, TinyArch, TinySpec};
pub use reqwest::StatusCode;
pub use serde_json::{json, Value};

/// The cluster secret every node shares (unless a test says otherwise).
pub const KEY: &str = "a-test-secret-of-32-chars-long!!";
/// Any request to a node: a hang guard below the head's 60 s step timeout (a lost step
/// would otherwise hang that long). 45 s: a 1,365-token prefill through three nodes
/// took more than 20 s while other cluster tests shared the two cores.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);
/// Width of the default tiny model (`TinySpec::new`).
pub const TINY_EMBD: usize = 64;

pub const PROMPTS: &[&str] = &[
    "hello world",
    "once upon a time there was a cat",
    "tell me a story about the red dog and the blue cat on the mat",
    "what is this",
];

// ------------------------------------------------------------------ ports

/// Ports handed out in this test process (tests run in parallel).
pub static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

pub fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The ports handed out: below the kernel's ephemeral range, so that no outgoing
/// connection of any process (a node dialling a peer, a browser, a client) takes one as
/// its local port between its pick and its node's bind (picked by binding port 0, inside
/// that range, a node once found its control port, P + 1, taken by then).
fn port_range() -> std::ops::Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let start = 10_000.min(ephemeral_start / 2);
    start..ephemeral_start.max(start + 2)
}

/// A free port (`pair`: P such that P + 1 is free too, for a data and a control plane).
pub fn free_port(pair: bool) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let range = port_range();
    let span = u32::from(range.end - range.start - 1);
    // a walk through the range by a step coprime to nearly any span, from a place that
    // differs between test processes
    let offset = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..1000 {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = range.start + (offset.wrapping_add(i.wrapping_mul(7_919)) % span) as u16;
        if !bindable(p) || (pair && !bindable(p + 1)) {
            continue;
        }
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        let taken = taken.get_or_insert_with(HashSet::new);
        if taken.contains(&p) || (pair && taken.contains(&(p + 1))) {
            continue;
        }
        taken.insert(p);
        if pair {
            taken.insert(p + 1);
        }
        return p;
    }
    panic!("no free port found in {range:?}");
}

// ------------------------------------------------------------------ processes

/// One `exo serve` process.
pub struct Node {
    pub name: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub http_port: u16,
    /// Data-plane port (control plane: + 1); 0 for a single node.
    pub data_port: u16,
    pub child: Option<Child>,
}

impl Node {
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_exo"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env(
                "EXO_LOG",
                std::env::var("EXO_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // The config file alone decides (no override from the test's environment).
        for var in [
            "EXO_NODE_NAME",
            "EXO_NODE_LISTEN",
            "EXO_NODE_MEMORY",
            "EXO_MODEL_PATH",
            "EXO_MODEL_CACHE_DIR",
            "EXO_API_LISTEN",
            "EXO_API_KEY",
            "EXO_API_KEY_FILE",
            "EXO_API_SHUTDOWN_TIMEOUT",
            "EXO_ENGINE_THREADS",
            "EXO_ENGINE_CTX",
            "EXO_ENGINE_MAX_SLOTS",
            "EXO_ENGINE_MAX_QUEUE",
            "EXO_CLUSTER_KEY",
            "EXO_CLUSTER_KEY_FILE",
        ] {
            cmd.env_remove(var);
        }
        self.child = Some(cmd.spawn().expect("spawn exo serve"));
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn data_address(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.data_port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// VmRSS and VmHWM (the peak) of the process, in bytes.
    pub fn resident(&self) -> (u64, u64) {
        resident(self.pid().expect("the node runs"))
    }
}

/// VmRSS and VmHWM (the peak) of a process, in bytes.
pub fn resident(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A peer of a cluster to write configs for.
pub struct PeerSpec {
    pub name: &'static str,
    pub layers: Option<(usize, usize)>,
    pub key: &'static str,
    /// Whether its config names the model file (else it receives its slice).
    pub has_model: bool,
    /// `[node] memory` in bytes; None leaves the key out.
    pub memory: Option<u64>,
}

impl PeerSpec {
    /// This peer without the model file: it receives its slice from the head.
    pub fn without_model(self) -> PeerSpec {
        PeerSpec {
            has_model: false,
            ..self
        }
    }
}

pub fn peer(name: &'static str, layers: Option<(usize, usize)>) -> PeerSpec {
    PeerSpec {
        name,
        layers,
        key: KEY,
        has_model: true,
        memory: None,
    }
}

/// The processes of one test, their temp dir and an HTTP client. On a panic the
/// logs of every node are printed; the processes are killed either way.
pub struct Harness {
    // dropped first: the processes, then the directory
    pub nodes: Vec<Node>,
    pub http: reqwest::Client,
    pub model: PathBuf,
    pub dir: TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

pub struct Engine {
    pub ctx: usize,
    /// `[cluster] activations`; "" leaves the key out (the default wire).
    pub activations: &'static str,
    /// `[cluster] head_share`; "" leaves the key out.
    pub head_share: &'static str,
    /// `[engine] batch`: prompt tokens per step.
    pub batch: usize,
    /// `[engine] max_slots`.
    pub max_slots: usize,
    /// `[engine] prompt_cache`.
    pub prompt_cache: bool,
}

/// The settings of most tests: the default wire and head split.
pub const TINY_ENGINE: Engine = Engine {
    ctx: 256,
    activations: "",
    head_share: "",
    batch: 512,
    max_slots: 4,
    prompt_cache: true,
};

impl Harness {
    /// A harness whose nodes serve a tiny model of this shape.
    pub fn tiny(tag: &str, spec: &TinySpec) -> Harness {
        let dir = TempDir::new(&format!("cluster-{tag}")).expect("temp dir");
        let model = dir.path().join("m.gguf");
        write_tiny_model(&model, spec).expect("tiny model");
        Harness::with_model(dir, model)
    }

    pub fn with_model(dir: TempDir, model: PathBuf) -> Harness {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("http client");
        Harness {
            nodes: Vec::new(),
            http,
            model,
            dir,
        }
    }

    pub fn print_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(150);
            eprintln!(
                "----- log of {} (http {}, data {}), last {} lines -----",
                n.name,
                n.http_port,
                n.data_port,
                lines.len() - from
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
        eprintln!("----- end of logs -----");
    }

    /// The slice cache of node `name`.
    pub fn cache_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-cache"))
    }

    /// `[model]` (with the model file or without), `[api]` and `[engine]` of node `name`.
    pub fn common_sections(
        &self,
        name: &str,
        has_model: bool,
        http_port: u16,
        engine: &Engine,
    ) -> String {
        let path = if has_model {
            format!("path = \"{}\"\n", self.model.display())
        } else {
            String::new()
        };
        format!(
            "[model]\n{path}cache_dir = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:{http_port}\"\n\n\
             [engine]\nthreads = 1\nctx = {}\nmax_slots = {}\nbatch = {}\nprompt_cache = {}\n",
            self.cache_dir(name).display(),
            engine.ctx,
            engine.max_slots,
            engine.batch,
            engine.prompt_cache
        )
    }

    /// Starts a single-node `exo serve` on the model; returns its index.
    pub fn single(&mut self, engine: &Engine) -> usize {
        self.single_with_api(engine, "")
    }

    /// [`Harness::single`] with more `[api]` lines (`key = value`, one a line).
    pub fn single_with_api(&mut self, engine: &Engine, api: &str) -> usize {
        let http_port = free_port(false);
        // "single", then "single1", "single2"... for more than one in a test
        let n = self
            .nodes
            .iter()
            .filter(|n| n.name.starts_with("single"))
            .count();
        let name = if n == 0 {
            "single".to_string()
        } else {
            format!("single{n}")
        };
        let config = self.dir.path().join(format!("{name}.toml"));
        let sections = self.common_sections(&name, true, http_port, engine);
        let text = with_api_lines(&format!("[node]\nname = \"{name}\"\n\n{sections}"), api);
        std::fs::write(&config, text).expect("write config");
        let mut node = Node {
            log: self.dir.path().join(format!("{name}.log")),
            name,
            config,
            http_port,
            data_port: 0,
            child: None,
        };
        node.start();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Adds `[api]` lines (`key = value`, one a line) to node `i`'s config file, to
    /// take effect when it starts.
    pub fn add_api_lines(&self, i: usize, api: &str) {
        let path = &self.node(i).config;
        let text = std::fs::read_to_string(path).expect("read config");
        std::fs::write(path, with_api_lines(&text, api)).expect("write config");
    }

    /// Writes one config per peer (same peer list everywhere) and starts the peers,
    /// workers first; returns their indices, head first.
    pub fn cluster(&mut self, peers: &[PeerSpec], engine: &Engine) -> Vec<usize> {
        let idx = self.cluster_unstarted(peers, engine);
        for &i in idx.iter().rev() {
            self.nodes[i].start();
        }
        idx
    }

    /// As [`Harness::cluster`], without starting anyone.
    pub fn cluster_unstarted(&mut self, peers: &[PeerSpec], engine: &Engine) -> Vec<usize> {
        let ports: Vec<(u16, u16)> = peers
            .iter()
            .map(|_| (free_port(false), free_port(true)))
            .collect();
        let mut list = String::new();
        for (p, (_, data)) in peers.iter().zip(&ports) {
            list.push_str(&format!(
                "\n[[peer]]\nname = \"{}\"\naddress = \"tcp://127.0.0.1:{data}\"\n",
                p.name
            ));
            if let Some((a, b)) = p.layers {
                list.push_str(&format!("layers = \"{a}-{b}\"\n"));
            }
        }
        let first = self.nodes.len();
        for (p, (http, data)) in peers.iter().zip(&ports) {
            let config = self.dir.path().join(format!("{}.toml", p.name));
            let optional = |key: &str, value: &str| {
                if value.is_empty() {
                    String::new()
                } else {
                    format!("{key} = \"{value}\"\n")
                }
            };
            let memory = p
                .memory
                .map_or(String::new(), |m| format!("memory = {m}\n"));
            let text = format!(
                "[node]\nname = \"{}\"\nlisten = \"tcp://127.0.0.1:{data}\"\n{memory}\n{}\n\
                 [cluster]\nkey = \"{}\"\n{}{}{list}",
                p.name,
                self.common_sections(p.name, p.has_model, *http, engine),
                p.key,
                optional("activations", engine.activations),
                optional("head_share", engine.head_share)
            );
            std::fs::write(&config, text).expect("write config");
            self.nodes.push(Node {
                name: p.name.to_string(),
                log: self.dir.path().join(format!("{}.log", p.name)),
                config,
                http_port: *http,
                data_port: *data,
                child: None,
            });
        }
        (first..self.nodes.len()).collect()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub async fn get(&self, i: usize, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(self.node(i).url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.node(i).name));
        let status = r.status();
        (status, r.text().await.expect("body"))
    }

    pub async fn get_json(&self, i: usize, path: &str) -> (StatusCode, Value) {
        let (status, text) = self.get(i, path).await;
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {text}"));
        (status, v)
    }

    pub async fn post_json(&self, i: usize, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.node(i).url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| {
                let why = if e.is_timeout() {
                    format!("no answer within {REQUEST_TIMEOUT:?}")
                } else {
                    e.to_string()
                };
                panic!("POST {path} {body} on {}: {why}", self.node(i).name)
            });
        let status = r.status();
        let text = r.text().await.expect("body");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"));
        (status, v)
    }

    /// Polls GET /health of node `i` until 200 (panics after `within`).
    pub async fn wait_ready(&self, i: usize, within: Duration) -> Duration {
        let t0 = Instant::now();
        let mut last = String::from("no answer");
        loop {
            if let Ok(r) = self.http.get(self.node(i).url("/health")).send().await {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                if status == StatusCode::OK {
                    return t0.elapsed();
                }
                last = format!("{status} {body}");
            }
            assert!(
                t0.elapsed() < within,
                "{} never became ready within {within:?}; last /health: {last}",
                self.node(i).name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls GET /health of node `i`, which must never say 200, until it says 503
    /// `load_failed` or `within` has passed; returns the last answer.
    pub async fn load_failure(&self, i: usize, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let mut last: Option<Value> = None;
        loop {
            if let Ok(r) = self.http.get(self.node(i).url("/health")).send().await {
                let status = r.status();
                let v: Value = r.json().await.unwrap_or_default();
                assert_ne!(status, StatusCode::OK, "{} serves: {v}", self.node(i).name);
                let failed = status == StatusCode::SERVICE_UNAVAILABLE
                    && v["error"]["code"] == "load_failed";
                last = Some(v);
                if failed {
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last.unwrap_or_else(|| panic!("{} never answered /health", self.node(i).name))
    }

    /// A successful greedy completion: (text, finish_reason).
    pub async fn complete(&self, i: usize, body: &Value) -> (String, String) {
        let (status, v) = self.post_json(i, "/v1/completions", body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}: POST /v1/completions {body}: {v}",
            self.node(i).name
        );
        (text_of(&v), v["choices"][0]["finish_reason"].to_string())
    }

    pub async fn metrics(&self, i: usize) -> String {
        let (status, text) = self.get(i, "/metrics").await;
        assert_eq!(status, StatusCode::OK, "/metrics: {text}");
        text
    }

    /// `exo status --config` of node `i`: (success, stdout, stderr).
    pub async fn status(&self, i: usize) -> (bool, String, String) {
        let config = self.node(i).config.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_exo"))
                .arg("status")
                .arg("--config")
                .arg(&config)
                .env_remove("EXO_API_LISTEN")
                .output()
                .expect("run exo status")
        })
        .await
        .expect("exo status");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A config text written by [`Harness::common_sections`] with more `[api]` lines.
fn with_api_lines(text: &str, api: &str) -> String {
    text.replacen("\n\n[engine]", &format!("\n{api}\n\n[engine]"), 1)
}

pub fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

pub fn text_of(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no choices[0].text: {v}"))
        .to_string()
}

/// The value of one exact series (name with labels) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The `data:` payloads of complete SSE events in `text`.
pub fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without 'data: ': {e:?}"))
                .to_string()
        })
        .collect()
}

/// The text of a complete, successful SSE completion stream.
pub fn stream_text(text: &str) -> String {
    let events = sse_events(text);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream must end with [DONE]: {text}"
    );
    let mut out = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}"));
        assert!(v.get("error").is_none(), "error event: {v}");
        out.push_str(v["choices"][0]["text"].as_str().expect("chunk text"));
    }
    out
}

/// Greedy answers of the single node `single` to each prompt.
pub async fn references(h: &Harness, single: usize, prompts: &[&str], n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for p in prompts {
        let (text, _) = h.complete(single, &completion(p, n)).await;
        out.push(text);
    }
    out
}

/// llama.cpp's greedy continuation of `prompt` (token ids), as the text the API
/// returns: the pieces of the tokens before the first end-of-generation token.
pub fn oracle_text(model: &Path, prompt: &[i32], n: usize) -> (String, Vec<i32>) {
    oracle_text_in(model, prompt, n, 256, 256)
}

/// [`oracle_text`] in a context of `n_ctx` positions, the prompt decoded in chunks
/// of `n_batch` tokens (exo's `[engine] batch`: a chunk's logits depend on it).
pub fn oracle_text_in(
    model: &Path,
    prompt: &[i32],
    n: usize,
    n_ctx: u32,
    n_batch: u32,
) -> (String, Vec<i32>) {
    use ggml_shim::llama::{init_backend, OracleModel};
    init_backend();
    let m = OracleModel::load(model, 1).expect("oracle load");
    let vocab = m.vocab().expect("oracle vocab");
    let mut ctx = m.context(n_ctx, n_batch, 1).expect("oracle context");
    let toks = ctx.greedy_generate(prompt, n).expect("oracle generate");
    let mut bytes = Vec::new();
    for &t in &toks {
        if vocab.is_eog(t) {
            break;
        }
        bytes.extend(vocab.token_to_piece(t, false).expect("piece"));
    }
    (String::from_utf8_lossy(&bytes).into_owned(), toks)
}

/// The layer ranges the head reports in /v1/cluster.
pub async fn cluster_ranges(h: &Harness, head: usize) -> Vec<(String, usize, usize, bool)> {
    let (status, v) = h.get_json(head, "/v1/cluster").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("no peers: {v}"))
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_string(),
                p["start"].as_u64().unwrap_or(u64::MAX) as usize,
                p["end"].as_u64().unwrap_or(u64::MAX) as usize,
                p["alive"] == true,
            )
        })
        .collect()
}

/// A single node and a 3-node cluster with explicit ranges (0-2, 2-4, 4-6) on the
/// tiny model, both ready: (harness, single, cluster nodes head first).
pub async fn single_and_three_nodes(tag: &str) -> (Harness, usize, Vec<usize>) {
    let mut h = Harness::tiny(tag, &tiny_spec());
    let single = h.single(&TINY_ENGINE);
    let c = h.cluster(
        &[
            peer("a", Some((0, 2))),
            peer("b", Some((2, 4))),
            peer("c", Some((4, 6))),
        ],
        &TINY_ENGINE,
    );
    h.wait_ready(single, Duration::from_secs(60)).await;
    let ready = h.wait_ready(c[0], Duration::from_secs(60)).await;
    eprintln!("3-node cluster ready in {ready:?}");
    (h, single, c)
}

/// The tiny model of the cluster tests, with f32 weights, whose batched ggml product
/// rounds differently from a one-token one: concurrent requests, batched differently
/// by one node and by a pipeline, must still give equal text.
pub fn tiny_spec() -> TinySpec {
    let mut spec = TinySpec::new(TinyArch::Gemma3);
    spec.n_layer = 6;
    spec
}

/// The real Gemma 3 270M, if present (a note says the test is skipped when not; a
/// failure when `EXO_REQUIRE_REAL_MODEL` is set).
pub fn real_model() -> Option<PathBuf> {
    let path = exo_tests::real_model_path();
    if path.is_none() {
        assert!(
            std::env::var_os("EXO_REQUIRE_REAL_MODEL").is_none(),
            "EXO_REQUIRE_REAL_MODEL is set but the real model is missing"
        );
        eprintln!("note: the real Gemma 3 270M is not available; skipped");
    }
    path
}
