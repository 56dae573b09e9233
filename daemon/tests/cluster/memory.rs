//! `[node] memory`: the cluster plans within what each node offers, every node's
//! resident memory stays within its planned weights, KV cache and
//! `NODE_OVERHEAD_BYTES`, and a cluster too small for the model is refused at
//! formation with the numbers.

use super::*;
use exo::cluster::capabilities::Capabilities;
use exo::cluster::planner::{plan_cluster, size_text, ModelCosts, NodeInfo, NODE_OVERHEAD_BYTES};
use exo::model::{LayerRange, ModelFile};

/// The least memory that, offered alike by `n` nodes, fits the model (to 1 MB).
fn least_even_offer(costs: &ModelCosts, n: usize, n_vocab: usize) -> u64 {
    let fits = |bytes: u64| {
        let nodes: Vec<NodeInfo> = (0..n)
            .map(|i| NodeInfo {
                name: format!("n{i}"),
                caps: Capabilities::offering(bytes),
            })
            .collect();
        plan_cluster(&nodes, costs, n_vocab).is_ok()
    };
    let (mut lo, mut hi) = (NODE_OVERHEAD_BYTES, 1 << 40);
    assert!(fits(hi), "the model fits no cluster of {n}");
    while hi - lo > 1_000_000 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Three nodes each offering the least that fits the model on three (plus a margin:
/// about a third of it, where no part is much larger than a third) serve it; after a
/// long prompt and a full batch of requests, every node's resident memory is within
/// its planned weights + KV cache + `NODE_OVERHEAD_BYTES`, and within its offer.
/// With `slices`, the model is on the head only: the other two receive their slices.
/// The long prompt is `long_repeats` sentences (~16 tokens each on Gemma's tokenizer;
/// None: enough for about a third of the context).
async fn three_nodes_stay_within_the_memory_they_offer(
    model: PathBuf,
    engine: &Engine,
    slices: bool,
    long_repeats: Option<usize>,
) {
    let t0 = Instant::now();
    let mf = ModelFile::open(&model).expect("model");
    let n_vocab = mf.hparams.n_vocab;
    let n_ctx = engine.ctx.min(mf.hparams.n_ctx_train);
    let costs = ModelCosts::of(&mf, n_ctx, engine.max_slots);
    let least = least_even_offer(&costs, 3, n_vocab);
    let offer = least + least / 20 + 16_000_000;
    let whole = costs.model_weight_bytes() + costs.model_kv_bytes();
    eprintln!(
        "model {}: {} of weights + {} of KV cache at ctx {n_ctx} x {} slots; a third: {}; \
         each node offers {} (the least that fits: {})",
        model.display(),
        size_text(costs.model_weight_bytes()),
        size_text(costs.model_kv_bytes()),
        engine.max_slots,
        size_text(whole / 3),
        size_text(offer),
        size_text(least),
    );
    let dir = TempDir::new("cluster-memory").expect("temp dir");
    let mut h = Harness::with_model(dir, model);
    let offering = |name, has_model| PeerSpec {
        memory: Some(offer),
        has_model,
        ..peer(name, None)
    };
    let c = h.cluster(
        &[
            offering("a", true),
            offering("b", !slices),
            offering("c", !slices),
        ],
        engine,
    );
    let ready = h.wait_ready(c[0], Duration::from_secs(120)).await;

    // a long prompt, then four at once (a full batch at the default slots)
    // (about a third of the context on Gemma's tokenizer, less on the tiny one's)
    let long = "tell me a long story about the red dog and the blue cat on the mat. "
        .repeat(long_repeats.unwrap_or(n_ctx / 48));
    h.complete(c[0], &completion(&long, 16)).await;
    let bodies: Vec<Value> = PROMPTS.iter().map(|p| completion(p, 16)).collect();
    tokio::join!(
        h.complete(c[0], &bodies[0]),
        h.complete(c[0], &bodies[1]),
        h.complete(c[0], &bodies[2]),
        h.complete(c[0], &bodies[3]),
    );

    let (status, v) = h.get_json(c[0], "/v1/cluster").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let peers = v["peers"].as_array().expect("peers").clone();
    assert_eq!(peers.len(), 3, "{v}");
    eprintln!(
        "{:<5} {:>8} {:>15} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "node", "layers", "head rows", "weights", "KV", "planned", "VmRSS", "VmHWM", "beyond"
    );
    let mut over = Vec::new();
    for (p, &i) in peers.iter().zip(&c) {
        let (start, end) = (p["start"].as_u64(), p["end"].as_u64());
        let range = LayerRange::new(start.expect("start") as usize, end.expect("end") as usize);
        let rows = match (p["head_rows"][0].as_u64(), p["head_rows"][1].as_u64()) {
            (Some(a), Some(b)) => b - a,
            _ => 0,
        };
        let weights = costs.stage_weight_bytes(range, rows as f64 / n_vocab as f64);
        let kv = costs.kv_bytes_per_layer * range.len() as u64;
        let planned = weights + kv;
        let pid = h.node(i).child.as_ref().expect("running").id();
        let (rss, hwm) = resident(pid);
        let mib = |b: u64| format!("{:.1}M", b as f64 / (1u64 << 20) as f64);
        eprintln!(
            "{:<5} {:>8} {:>15} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            h.node(i).name,
            format!("{}..{}", range.start, range.end),
            rows,
            mib(weights),
            mib(kv),
            mib(planned),
            mib(rss),
            mib(hwm),
            format!(
                "{:+.1}M",
                (rss as f64 - planned as f64) / (1u64 << 20) as f64
            ),
        );
        if rss > planned + NODE_OVERHEAD_BYTES || rss > offer {
            over.push(format!(
                "{}: VmRSS {} > planned {} + {} (offer {})",
                h.node(i).name,
                mib(rss),
                mib(planned),
                mib(NODE_OVERHEAD_BYTES),
                mib(offer)
            ));
        }
    }
    assert!(over.is_empty(), "{}", over.join("; "));
    eprintln!(
        "three_nodes_stay_within_the_memory_they_offer: ready in {ready:?}, {:?} in all",
        t0.elapsed()
    );
}

/// On the real Gemma 3 270M at the default context and slots: its tied 178 MB
/// embedding is most of the model, so the first and last nodes carry most of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_stay_within_the_memory_they_offer_on_gemma() {
    let Some(path) = real_model() else {
        return;
    };
    let engine = Engine {
        ctx: 4096,
        ..TINY_ENGINE
    };
    three_nodes_stay_within_the_memory_they_offer(path, &engine, false, None).await;
}

/// On a generated model of Llama 3.2 1B's shapes (0.8 GB, random weights), on the head
/// only: the other two nodes receive their slices, and all three stay within a third
/// of it each (plus the margin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_serve_a_generated_1b_model_from_the_head_within_their_memory() {
    let dir = TempDir::new("memory-llama3-1b").expect("temp dir");
    let model = dir.path().join("llama3-1b.gguf");
    let shape = exo::gen_model::find_shape("llama3-1b").expect("shape");
    exo::gen_model::write(&shape, 1, &model).expect("generate llama3-1b");
    let engine = Engine {
        ctx: 1024,
        ..TINY_ENGINE
    };
    // a short prompt: a 1B model's prefill on one thread per node is slow next to
    // the other tests
    three_nodes_stay_within_the_memory_they_offer(model, &engine, true, Some(1)).await;
}

/// The same on a tiny model (64 wide, 6 layers, a small vocabulary): the figures
/// beyond the weights and KV cache are the runtime's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_stay_within_the_memory_they_offer_on_a_tiny_model() {
    let dir = TempDir::new("memory-tiny-model").expect("temp dir");
    let model = dir.path().join("m.gguf");
    write_tiny_model(&model, &tiny_spec()).expect("tiny model");
    let engine = Engine {
        ctx: 4096,
        ..TINY_ENGINE
    };
    three_nodes_stay_within_the_memory_they_offer(model, &engine, false, None).await;
}

/// The message the head's /health gives once formation has failed.
async fn formation_error(h: &Harness, head: usize) -> String {
    let v = h.load_failure(head, Duration::from_secs(30)).await;
    assert_eq!(v["error"]["code"], "load_failed", "{v}");
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A cluster whose nodes offer too little is refused at formation with the
/// numbers: planned (the whole model against the sum of the offers) and with given
/// ranges (the node that cannot hold its layers). The head logs it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_too_small_is_refused_at_formation() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("memory-refused", &tiny_spec());
    // the runtime alone needs more than 60 MB
    let small = |name, layers| PeerSpec {
        memory: Some(60_000_000),
        ..peer(name, layers)
    };
    let c = h.cluster(&[small("a", None), small("b", None)], &TINY_ENGINE);
    let msg = formation_error(&h, c[0]).await;
    let msg = msg.trim_start_matches("the model failed to load: ");
    assert!(msg.starts_with("model needs "), "{msg}");
    assert!(
        msg.contains(" KV at ctx 256 (4 slots) + ")
            && msg.ends_with(
                "; the peers offer 120 MB (a 60 MB, b 60 MB): add a node, lower ctx or use a \
                 smaller quantisation"
            ),
        "{msg}"
    );
    let log = std::fs::read_to_string(&h.node(c[0]).log).unwrap_or_default();
    assert!(log.contains(msg), "the head's log lacks {msg:?}");

    let roomy = PeerSpec {
        memory: Some(1 << 30),
        ..peer("x", Some((0, 3)))
    };
    let c = h.cluster(&[roomy, small("y", Some((3, 6)))], &TINY_ENGINE);
    let msg = formation_error(&h, c[0]).await;
    let msg = msg.trim_start_matches("the model failed to load: ");
    assert!(
        msg.starts_with("y cannot hold layers 3..6 and the output head: they need ")
            && msg.contains("; it offers 60 MB: give it fewer layers"),
        "{msg}"
    );
    eprintln!(
        "a_cluster_too_small_is_refused_at_formation: {:?}",
        t0.elapsed()
    );
}
