//! The model on the head only: a worker without a model file receives its slice
//! from the head, keeps it in its `[model] cache_dir`, resumes an interrupted
//! transfer, refetches a damaged chunk, and fetches only what a new plan adds. On
//! the real Gemma 3 270M, as separate `exo serve` processes.

mod harness;

use std::os::unix::fs::MetadataExt;

use harness::*;

/// The slice file in node `name`'s cache (there is exactly one).
fn slice_file(h: &Harness, name: &str) -> Option<PathBuf> {
    let files: Vec<PathBuf> = std::fs::read_dir(h.cache_dir(name))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    assert!(files.len() <= 1, "{files:?}");
    files.into_iter().next()
}

/// Bytes a file takes on disk (its holes take none).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// The worker's log lines that report an offer: (bytes held, bytes needed, chunks
/// to receive), from "slice of layers A..B from X: holds H of N MB (…), C chunks".
fn offers_in_log(log: &Path) -> Vec<(f64, f64, usize)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.split_once(": holds ")?.1;
            let (held, rest) = rest.split_once(" of ")?;
            let (need, rest) = rest.split_once(" MB")?;
            let chunks = rest.split_once("), ")?.1.split_once(' ')?.0;
            Some((held.parse().ok()?, need.parse().ok()?, chunks.parse().ok()?))
        })
        .collect()
}

/// Greedy answers of node `i` to `prompts`.
async fn answers(h: &Harness, i: usize, prompts: &[&str], n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for p in prompts {
        out.push(h.complete(i, &completion(p, n)).await.0);
    }
    out
}

/// Bytes of layer `il`'s tensors in the model file.
fn layer_bytes(model: &Path, il: usize) -> u64 {
    let mf = exo::model::ModelFile::open(model).expect("model");
    let prefix = format!("blk.{il}.");
    mf.gguf
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(&prefix))
        .map(|t| t.size)
        .sum()
}

/// Waits until the head answers /health 200 again after a worker came back.
async fn wait_head_ready(h: &Harness, head: usize) {
    h.wait_ready(head, Duration::from_secs(120)).await;
}

/// Waits until node `i` has logged `n` offers.
async fn wait_offers(h: &Harness, i: usize, n: usize) {
    let t0 = Instant::now();
    while offers_in_log(&h.node(i).log).len() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no offer {n} to {}",
            h.node(i).name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CHUNK: f64 = (1u64 << 20) as f64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_model_receives_verifies_and_refetches_only_what_it_lacks() {
    let Some(model) = real_model() else { return };
    let t0 = Instant::now();
    let mut h = Harness::with_model(TempDir::new("slices-real").expect("tmp"), model.clone());
    let single = h.single(&TINY_ENGINE);
    let c = h.cluster(
        &[
            peer("a", Some((0, 9))),
            peer("b", Some((9, 18))).without_model(),
        ],
        &TINY_ENGINE,
    );
    h.wait_ready(single, Duration::from_secs(120)).await;
    wait_head_ready(&h, c[0]).await;
    let want = answers(&h, single, PROMPTS, 12).await;
    assert_eq!(answers(&h, c[0], PROMPTS, 12).await, want, "first slice");

    // the slice: a sparse copy of the model holding b's part only
    let slice = slice_file(&h, "b").expect("b keeps a slice");
    let model_size = std::fs::metadata(&model).expect("model").len();
    assert_eq!(std::fs::metadata(&slice).expect("slice").len(), model_size);
    let offers = offers_in_log(&h.node(c[1]).log);
    let &(held, need, chunks) = offers.last().expect("b logged the offer");
    assert_eq!(held, 0.0, "a new worker holds nothing: {offers:?}");
    assert!(chunks as f64 * CHUNK >= need * 1e6 * 0.99, "{offers:?}");
    let on_disk = allocated(&slice);
    eprintln!(
        "b's slice: {:.1} MB on disk for a {:.1} MB share of a {:.1} MB model",
        on_disk as f64 / 1e6,
        need,
        model_size as f64 / 1e6
    );
    assert!(
        (on_disk as f64) < need * 1e6 + 4.0 * CHUNK,
        "the slice takes {on_disk} bytes on disk"
    );
    // a's layers are holes in b's slice (but for the chunks at their edges)
    let mf = exo::model::ModelFile::open(&model).expect("model");
    let a_layers: Vec<&ggml_shim::TensorInfo> = mf
        .gguf
        .tensors()
        .iter()
        .filter(|t| (2..7).any(|il| t.name.starts_with(&format!("blk.{il}."))))
        .collect();
    let from = a_layers.iter().map(|t| t.offset).min().expect("layers") + CHUNK as u64;
    let to = a_layers
        .iter()
        .map(|t| t.offset + t.size)
        .max()
        .expect("layers")
        - CHUNK as u64;
    let held = std::fs::read(&slice).expect("slice");
    assert!(to > from + CHUNK as u64);
    assert!(
        held[from as usize..to as usize].iter().all(|&b| b == 0),
        "b holds a's layers 2..7"
    );

    // a damaged byte in one of b's chunks: detected, refetched alone, never loaded
    h.nodes[c[1]].kill();
    let t = mf.gguf.tensor("blk.12.ffn_down.weight").expect("tensor");
    let at = t.offset + t.size / 2;
    let mut bytes = std::fs::read(&slice).expect("slice");
    bytes[at as usize] ^= 0x10;
    std::fs::write(&slice, &bytes).expect("damage");
    let before = offers_in_log(&h.node(c[1]).log).len();
    h.nodes[c[1]].start();
    // the head sees b restart (no plan), gives it its slice and the plan again
    wait_offers(&h, c[1], before + 1).await;
    wait_head_ready(&h, c[0]).await;
    let offers = offers_in_log(&h.node(c[1]).log);
    let &(held2, need2, chunks2) = offers.last().expect("offer after restart");
    assert_eq!(chunks2, 1, "only the damaged chunk travels: {offers:?}");
    assert_eq!(need2, need);
    assert!((held2 - (need - CHUNK / 1e6)).abs() < 0.2, "{offers:?}");
    assert_eq!(
        answers(&h, c[0], &PROMPTS[..2], 12).await,
        want[..2],
        "after the damage"
    );

    // a new plan that moves layer 8 to b: b fetches that layer and nothing else
    for n in [c[0], c[1]] {
        h.nodes[n].kill();
        let config = h.node(n).config.clone();
        let text = std::fs::read_to_string(&config).expect("config");
        let text = text
            .replace("layers = \"0-9\"", "layers = \"0-8\"")
            .replace("layers = \"9-18\"", "layers = \"8-18\"");
        std::fs::write(&config, text).expect("config");
    }
    let before = offers_in_log(&h.node(c[1]).log).len();
    h.nodes[c[1]].start();
    h.nodes[c[0]].start();
    wait_head_ready(&h, c[0]).await;
    let offers = offers_in_log(&h.node(c[1]).log);
    assert_eq!(offers.len(), before + 1, "{offers:?}");
    let &(held3, _, chunks3) = offers.last().expect("offer after the re-plan");
    let layer8 = layer_bytes(&model, 8) as f64;
    eprintln!(
        "re-plan: b held {held3:.1} MB, fetched {chunks3} chunks for layer 8 ({:.1} MB)",
        layer8 / 1e6
    );
    assert!(chunks3 >= 1, "layer 8 is new to b: {offers:?}");
    assert!(
        chunks3 as f64 * CHUNK <= layer8 + 2.0 * CHUNK,
        "b fetched {chunks3} chunks for a {layer8}-byte layer"
    );
    assert_eq!(
        answers(&h, c[0], PROMPTS, 12).await,
        want,
        "after the re-plan"
    );
    eprintln!("slices test: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_slice_transfer_resumes() {
    let Some(model) = real_model() else { return };
    let t0 = Instant::now();
    let mut h = Harness::with_model(TempDir::new("slices-resume").expect("tmp"), model.clone());
    let c = h.cluster(
        &[
            peer("a", Some((0, 9))),
            peer("b", Some((9, 18))).without_model(),
        ],
        &TINY_ENGINE,
    );
    // kill b once a part of its slice has arrived
    let deadline = Instant::now() + Duration::from_secs(120);
    let caught = loop {
        if let Some(slice) = slice_file(&h, "b") {
            let on_disk = allocated(&slice);
            if on_disk > 8 << 20 {
                h.nodes[c[1]].kill();
                break on_disk;
            }
        }
        assert!(Instant::now() < deadline, "b never received a chunk");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let first = offers_in_log(&h.node(c[1]).log);
    let &(_, need, _) = first.last().expect("b logged the offer");
    eprintln!(
        "b killed with {:.1} MB of its {need:.1} MB slice on disk",
        caught as f64 / 1e6
    );
    h.nodes[c[1]].start();
    wait_offers(&h, c[1], first.len() + 1).await;
    wait_head_ready(&h, c[0]).await;
    let offers = offers_in_log(&h.node(c[1]).log);
    assert_eq!(offers.len(), first.len() + 1, "{offers:?}");
    let &(held, need2, chunks) = offers.last().expect("offer after the restart");
    assert_eq!(need2, need);
    assert!(
        held > 0.0,
        "the restarted worker kept what it had: {offers:?}"
    );
    assert!(
        (chunks as f64) * CHUNK < need * 1e6,
        "the second transfer sends less than the slice: {offers:?}"
    );
    // and the cluster answers as llama.cpp does
    let tok = exo::tokenizer::Tokenizer::load(&model, "gemma3").expect("tokenizer");
    let ids = tok.encode(PROMPTS[1]).expect("encode");
    let m = model.clone();
    let (oracle, _) = tokio::task::spawn_blocking(move || oracle_text(&m, &ids, 12))
        .await
        .expect("oracle");
    assert_eq!(
        h.complete(c[0], &completion(PROMPTS[1], 12)).await.0,
        oracle
    );
    eprintln!(
        "resume test: {:?} (second transfer: {chunks} chunks)",
        t0.elapsed()
    );
}
