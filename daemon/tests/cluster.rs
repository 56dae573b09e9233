//! `exo serve` as a cluster of separate processes on 127.0.0.1: the head (first
//! `[[peer]]`) serves HTTP and drives the pipeline, the workers run their stages.
//! Every test writes its config files into a temp dir, starts real `exo serve`
//! processes (killed on drop, also when a test panics; their logs, captured from
//! stderr, are printed when a test fails), and compares the cluster's greedy output
//! with a single-node `exo serve` on the same model (and once with llama.cpp).
//! `EXO_TEST_LOG` sets the nodes' `EXO_LOG` filter (default `info`; e.g.
//! `info,exo=debug` shows the stage threads' dropped batches).

mod harness;

use harness::*;

// ------------------------------------------------------------------ 1. parity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_planned_split_equal_a_single_node() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("two", &tiny_spec());
    let single = h.single(&TINY_ENGINE);
    let c = h.cluster(&[peer("a", None), peer("b", None)], &TINY_ENGINE);
    h.wait_ready(single, Duration::from_secs(60)).await;
    let ready = h.wait_ready(c[0], Duration::from_secs(60)).await;
    eprintln!("2-node cluster ready in {ready:?}");

    // the planner's split: contiguous, covering the model, both stages non-empty
    let ranges = cluster_ranges(&h, c[0]).await;
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!((ranges[0].0.as_str(), ranges[1].0.as_str()), ("a", "b"));
    assert_eq!(ranges[0].1, 0, "{ranges:?}");
    assert_eq!(ranges[0].2, ranges[1].1, "{ranges:?}");
    assert_eq!(ranges[1].2, 6, "{ranges:?}");
    assert!(ranges.iter().all(|r| r.1 < r.2 && r.3), "{ranges:?}");

    let want = references(&h, single, PROMPTS, 24).await;
    for (p, w) in PROMPTS.iter().zip(&want) {
        let (got, _) = h.complete(c[0], &completion(p, 24)).await;
        assert_eq!(&got, w, "prompt {p:?}: 2-node cluster vs single node");
    }
    assert!(want.iter().any(|w| !w.is_empty()), "{want:?}");
    eprintln!(
        "two_nodes_planned_split_equal_a_single_node: {:?}",
        t0.elapsed()
    );
}

/// The output head split by vocabulary between the last node and the head node:
/// greedy and seeded sampled answers (top-k, where the last node sends its best
/// candidates; plain temperature and penalties, where it sends all its logits) are
/// those of a single node.
/// A single node and a two-node cluster of `spec` with `engine`, both ready; the
/// cluster head's log must contain `expect`. Returns the harness, single, head.
async fn single_and_pair(
    name: &str,
    spec: &TinySpec,
    engine: &Engine,
    expect: &str,
) -> (Harness, usize, usize) {
    let mut h = Harness::tiny(name, spec);
    let single = h.single(&TINY_ENGINE);
    let c = h.cluster(&[peer("a", None), peer("b", None)], engine);
    h.wait_ready(single, Duration::from_secs(60)).await;
    h.wait_ready(c[0], Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(&h.node(c[0]).log).unwrap_or_default();
    assert!(
        log.contains(expect),
        "the head's log lacks {expect:?}:\n{log}"
    );
    (h, single, c[0])
}

/// Four concurrent greedy requests to `head` give the single node's texts.
async fn concurrent_equals_single(h: &Harness, single: usize, head: usize, what: &str) {
    let want = references(h, single, PROMPTS, 16).await;
    let b: Vec<Value> = PROMPTS.iter().map(|p| completion(p, 16)).collect();
    let got = tokio::join!(
        h.complete(head, &b[0]),
        h.complete(head, &b[1]),
        h.complete(head, &b[2]),
        h.complete(head, &b[3]),
    );
    let got = [got.0 .0, got.1 .0, got.2 .0, got.3 .0];
    assert_eq!(got.to_vec(), want, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_output_head_equals_a_single_node() {
    let t0 = Instant::now();
    // small steps: prompts go through in several chunks, most without output rows
    let engine = Engine {
        head_share: "0.5",
        batch: 4,
        ..TINY_ENGINE
    };
    let (h, single, head) =
        single_and_pair("headsplit", &tiny_spec(), &engine, "output head split").await;
    let bodies = [
        completion(PROMPTS[0], 24),
        json!({"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.8, "top_k": 5, "seed": 7}),
        json!({"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 1.0, "seed": 3}),
        json!({"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.7, "top_k": 20,
               "frequency_penalty": 0.5, "seed": 11}),
        json!({"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "presence_penalty": 1.5}),
    ];
    let mut distinct = std::collections::HashSet::new();
    for body in &bodies {
        let (want, _) = h.complete(single, body).await;
        let (got, _) = h.complete(head, body).await;
        assert_eq!(got, want, "{body}: split head vs single node");
        distinct.insert(want);
    }
    assert!(
        distinct.len() >= 3,
        "the requests should differ: {distinct:?}"
    );
    concurrent_equals_single(
        &h,
        single,
        head,
        "concurrent requests through the split head",
    )
    .await;
    eprintln!(
        "a_split_output_head_equals_a_single_node: {:?}",
        t0.elapsed()
    );
}

/// `a` and `b` equal, numbers within a millionth (relative).
fn assert_json_close(a: &Value, b: &Value, what: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{what}: {x} vs {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{what}: {a} vs {b}");
            x.iter()
                .zip(y)
                .for_each(|(x, y)| assert_json_close(x, y, what));
        }
        (Value::Object(x), Value::Object(y)) => {
            let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(x), keys(y), "{what}: {a} vs {b}");
            x.iter()
                .zip(y.values())
                .for_each(|((_, x), y)| assert_json_close(x, y, what));
        }
        _ => assert_eq!(a, b, "{what}"),
    }
}

/// A streamed completion on node `i`: its text, and the choices of its events.
async fn streamed_choices(h: &Harness, i: usize, body: &Value) -> (String, Value) {
    let r = h
        .http
        .post(h.node(i).url("/v1/completions"))
        .json(body)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("body");
    let choices = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| e["choices"].clone())
        .collect();
    (stream_text(&text), Value::Array(choices))
}

/// `logit_bias` and `logprobs` through two clusters: the output head split (the last
/// node ranks its candidates with the biases, and sends every logit when
/// log-probabilities are asked for) and the last node sampling (its tokens come back
/// with their log-probabilities): texts and log-probabilities are a single node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_and_logprobs_through_a_cluster_equal_a_single_node() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("biaslogprobs", &tiny_spec());
    let single = h.single(&TINY_ENGINE);
    // (prompts in chunks of the single node's size: a chunk's logits depend on it)
    let split = Engine {
        head_share: "0.5",
        ..TINY_ENGINE
    };
    let split = h.cluster(&[peer("a", None), peer("b", None)], &split);
    let off = Engine {
        head_share: "off",
        ..TINY_ENGINE
    };
    let off = h.cluster(&[peer("c", None), peer("d", None)], &off);
    for i in [single, split[0], off[0]] {
        h.wait_ready(i, Duration::from_secs(60)).await;
    }
    let log = |i: usize| std::fs::read_to_string(&h.node(i).log).unwrap_or_default();
    assert!(log(split[0]).contains("output head split"));
    assert!(!log(off[0]).contains("output head split"));
    let (_, models) = h.get_json(single, "/v1/models").await;
    let n_vocab = models["data"][0]["exo"]["vocabulary"]
        .as_u64()
        .expect("vocabulary");
    // ids on the head node's side of the split and on the last node's
    let (lo, hi) = (270.to_string(), (n_vocab - 3).to_string());
    let bodies = [
        json!({"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "logprobs": 3}),
        json!({"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0,
               "logit_bias": {hi.clone(): 100}}),
        json!({"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0,
               "logit_bias": {lo.clone(): 100, hi.clone(): -100}, "logprobs": 0}),
        json!({"prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0.8, "top_k": 5,
               "seed": 7, "logit_bias": {hi.clone(): 8, lo.clone(): 6}}),
        json!({"prompt": PROMPTS[3], "max_tokens": 16, "temperature": 0.9, "seed": 5,
               "logprobs": 2, "logit_bias": {hi.clone(): 3}}),
        json!({"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": true,
               "logprobs": 1, "logit_bias": {lo.clone(): 2}}),
    ];
    let mut texts = std::collections::HashSet::new();
    for body in &bodies {
        let path = "/v1/completions";
        let want = if body["stream"] == true {
            let (text, choices) = streamed_choices(&h, single, body).await;
            texts.insert(text);
            choices
        } else {
            let (status, v) = h.post_json(single, path, body).await;
            assert_eq!(status, StatusCode::OK, "{body}: {v}");
            texts.insert(text_of(&v));
            v["choices"].clone()
        };
        for (head, what) in [(split[0], "split head"), (off[0], "last node sampling")] {
            let got = if body["stream"] == true {
                streamed_choices(&h, head, body).await.1
            } else {
                h.post_json(head, path, body).await.1["choices"].clone()
            };
            assert_json_close(&got, &want, &format!("{body}: {what} vs single node"));
        }
    }
    assert!(texts.len() >= 5, "the requests should differ: {texts:?}");
    eprintln!(
        "logit_bias_and_logprobs_through_a_cluster_equal_a_single_node: {:?}",
        t0.elapsed()
    );
}

/// A tied head (the embedding table, whole on the head node): a step alone in the
/// pipeline splits it evenly by speed instead of at the configured share; steps
/// with company use the share. Both give the single node's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_alone_splits_a_tied_head_evenly() {
    let t0 = Instant::now();
    let mut spec = tiny_spec();
    spec.tied_head = true;
    let engine = Engine {
        head_share: "0.2",
        ..TINY_ENGINE
    };
    let (h, single, head) = single_and_pair(
        "solo",
        &spec,
        &engine,
        "a step alone in the pipeline splits the head at row",
    )
    .await;
    // /v1/cluster (and so `exo status`) shows both splits: the busy pipeline's
    // share, and the larger one of a step alone, which meet at the same row
    let (_, v) = h.get_json(head, "/v1/cluster").await;
    let pair = |p: &serde_json::Value, key: &str| {
        let r = &p[key];
        (
            r[0].as_u64().unwrap_or(u64::MAX),
            r[1].as_u64().unwrap_or(u64::MAX),
        )
    };
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers.len(), 2, "{v}");
    let (busy, alone) = (
        pair(&peers[0], "head_rows"),
        pair(&peers[0], "head_rows_alone"),
    );
    assert_eq!((busy.0, alone.0), (0, 0), "{v}");
    assert!(
        alone.1 > busy.1,
        "a step alone gives the head node more rows: {v}"
    );
    assert_eq!(pair(&peers[1], "head_rows_alone").0, alone.1, "{v}");
    assert_eq!(pair(&peers[1], "head_rows").0, busy.1, "{v}");
    for body in [
        completion(PROMPTS[0], 24),
        json!({"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.8, "top_k": 5, "seed": 7}),
        json!({"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 1.0, "seed": 3}),
    ] {
        let (want, _) = h.complete(single, &body).await;
        let (got, _) = h.complete(head, &body).await;
        assert_eq!(got, want, "{body}: a step alone vs single node");
    }
    concurrent_equals_single(&h, single, head, "steps with company vs single node").await;
    eprintln!("a_step_alone_splits_a_tied_head_evenly: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_explicit_ranges_equal_a_single_node_and_llama_cpp() {
    let t0 = Instant::now();
    let (h, single, c) = single_and_three_nodes("three").await;

    let ranges = cluster_ranges(&h, c[0]).await;
    let expected = [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)];
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    for (r, (name, a, b)) in ranges.iter().zip(expected) {
        assert_eq!(
            (r.0.as_str(), r.1, r.2, r.3),
            (name, a, b, true),
            "{ranges:?}"
        );
    }

    // plain requests
    let want = references(&h, single, PROMPTS, 24).await;
    for (p, w) in PROMPTS.iter().zip(&want) {
        let (got, _) = h.complete(c[0], &completion(p, 24)).await;
        assert_eq!(&got, w, "prompt {p:?}: 3-node cluster vs single node");
    }

    // token ids as the prompt, against llama.cpp's greedy continuation
    let ids: Vec<i32> = {
        let tok = exo::tokenizer::Tokenizer::load(&h.model, "gemma3").expect("tokenizer");
        tok.encode(PROMPTS[2]).expect("encode")
    };
    let model = h.model.clone();
    let ids2 = ids.clone();
    let (oracle, oracle_toks) = tokio::task::spawn_blocking(move || oracle_text(&model, &ids2, 24))
        .await
        .expect("oracle");
    let body = json!({"prompt": ids, "max_tokens": 24, "temperature": 0});
    let (from_ids, _) = h.complete(c[0], &body).await;
    let (single_ids, _) = h.complete(single, &body).await;
    assert_eq!(
        single_ids, oracle,
        "single node vs llama.cpp (tokens {oracle_toks:?})"
    );
    assert_eq!(
        from_ids, oracle,
        "3-node cluster vs llama.cpp (tokens {oracle_toks:?})"
    );
    assert!(
        !oracle.is_empty(),
        "llama.cpp generated nothing: {oracle_toks:?}"
    );

    // a streamed request
    let mut body = completion(PROMPTS[1], 24);
    body["stream"] = json!(true);
    let r = h
        .http
        .post(h.node(c[0]).url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("stream POST");
    assert_eq!(r.status(), StatusCode::OK);
    let streamed = stream_text(&r.text().await.expect("stream body"));
    assert_eq!(streamed, want[1], "streamed on the cluster vs single node");

    // 4 concurrent requests
    let mut tasks = Vec::new();
    for p in PROMPTS {
        let http = h.http.clone();
        let url = h.node(c[0]).url("/v1/completions");
        let body = completion(p, 24);
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.expect("POST");
            let status = r.status();
            let v: Value = r.json().await.expect("JSON");
            (status, v)
        }));
    }
    for ((t, p), w) in tasks.into_iter().zip(PROMPTS).zip(&want) {
        let (status, v) = t.await.expect("task");
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(&text_of(&v), w, "concurrent prompt {p:?} vs single node");
    }

    // exo status
    let (ok, out, err) = h.status(c[0]).await;
    assert!(ok, "exo status failed: {err}\n{out}");
    for (name, a, b) in expected {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("exo status does not list peer {name}:\n{out}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            words.contains(&format!("{a}..{b}").as_str()),
            "peer {name}: no range {a}..{b} in {line:?}"
        );
        assert!(words.contains(&"up"), "peer {name} is not up: {line:?}");
    }
    eprintln!(
        "three_nodes_explicit_ranges_equal_a_single_node_and_llama_cpp: {:?}",
        t0.elapsed()
    );
}

/// The head reports ready once every worker acknowledged the plan; a request sent
/// at once must be answered (not lost on its way through a worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_right_after_ready_is_answered() {
    let t0 = Instant::now();
    let (h, single, c) = single_and_three_nodes("first").await;
    let body = completion(PROMPTS[1], 16);
    let r = h
        .http
        .post(h.node(c[0]).url("/v1/completions"))
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await;
    let first = match r {
        Ok(r) => {
            let status = r.status();
            let v: Value = r.json().await.expect("JSON");
            assert_eq!(status, StatusCode::OK, "{v}");
            text_of(&v)
        }
        Err(e) => panic!(
            "the first request after /health said 200 got no answer in 10 s \
             (a frame lost between the plan and the stage thread?): {e}"
        ),
    };
    let (want, _) = h.complete(single, &body).await;
    assert_eq!(first, want, "first request vs single node");
    eprintln!(
        "the_first_request_right_after_ready_is_answered: {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------ 2. worker API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_points_clients_to_the_head() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("worker", &tiny_spec());
    let c = h.cluster(&[peer("head-a", None), peer("b", None)], &TINY_ENGINE);
    h.wait_ready(c[0], Duration::from_secs(60)).await;

    let (status, v) = h.get_json(c[1], "/health").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["role"], "worker", "{v}");
    let head = v["head"].as_str().unwrap_or_else(|| panic!("no head: {v}"));
    assert!(head.contains("head-a"), "the head is not named: {v}");

    let (status, v) = h
        .post_json(c[1], "/v1/completions", &completion("hello", 4))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "not_head", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("head-a"),
        "the error does not name the head: {v}"
    );
    eprintln!("a_worker_points_clients_to_the_head: {:?}", t0.elapsed());
}

// ------------------------------------------------------------------ 3. wrong key

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_key_is_reported_by_the_head() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("wrongkey", &tiny_spec());
    let c = h.cluster(
        &[
            peer("head-a", None),
            PeerSpec {
                key: "another-secret-of-32-chars-long!",
                ..peer("worker-b", None)
            },
        ],
        &TINY_ENGINE,
    );
    let v = h.load_failure(c[0], Duration::from_secs(20)).await;
    assert_eq!(
        v["error"]["code"], "load_failed",
        "after 20 s the head's /health should say load_failed (peer without the cluster key), got {v}"
    );
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        msg.contains("key") && msg.contains("worker-b"),
        "the message should say that peer worker-b does not share the cluster key: {v}"
    );
    eprintln!(
        "a_worker_with_another_key_is_reported_by_the_head: {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------ 4. forged frames

/// Polls the worker's /metrics until every series reaches its minimum.
async fn wait_frame_counts(h: &Harness, i: usize, want: &[(&str, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = h.metrics(i).await;
        let ok = want.iter().all(|(outcome, min)| {
            metric(&m, &format!("exo_frames_total{{outcome=\"{outcome}\"}}"))
                .is_some_and(|v| v >= *min)
        });
        if ok || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn frame_counts(m: &str) -> String {
    m.lines()
        .filter(|l| l.starts_with("exo_frames_total"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_malformed_and_replayed_frames_are_counted_and_dropped() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("forged", &tiny_spec());
    let single = h.single(&TINY_ENGINE);
    let c = h.cluster(&[peer("a", None), peer("b", None)], &TINY_ENGINE);
    h.wait_ready(single, Duration::from_secs(60)).await;
    h.wait_ready(c[0], Duration::from_secs(60)).await;
    let want = references(&h, single, &PROMPTS[..2], 16).await;
    let (before, _) = h.complete(c[0], &completion(PROMPTS[0], 16)).await;
    assert_eq!(before, want[0]);

    let mut tx = PipelineTx::dial(&h.node(c[1]).data_address(), &DialOptions::default())
        .await
        .expect("dial the worker's data plane");
    let t = Some(Duration::from_secs(5));
    // (a) random bytes
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let junk: Vec<u8> = (0..200)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    tx.send_timeout(&junk, t).await.expect("send junk");
    // (b) a well-formed frame sealed under another key
    let mut stranger = Sealer::new(FrameKey::derive(b"another-secret-of-32-chars-long!"), 7);
    let seqs = [BatchSeq {
        slot: 0,
        pos0: 0,
        n_tokens: 1,
        output: OutputRows::Last,
    }];
    let forged = stranger
        .seal(
            1,
            &seqs,
            Payload::activations(&[0.01; TINY_EMBD], TINY_EMBD, Dtype::F32),
        )
        .expect("seal");
    tx.send_timeout(&forged, t).await.expect("send forged");
    let ping = stranger
        .seal_control(FrameType::Ping, 0, &json!({}))
        .expect("seal");
    tx.send_timeout(&ping, t).await.expect("send forged ping");
    // (c) an authentic frame (the right key) from a sender outside the session, sent
    // twice: a node only accepts batches from the stage before it, so both are refused
    // (counted with the replays)
    let mut insider = Sealer::new(FrameKey::derive(KEY.as_bytes()), 0x5eed);
    let bad_width = insider
        .seal(
            1,
            &seqs,
            Payload::activations(&[0.01; TINY_EMBD + 1], TINY_EMBD + 1, Dtype::F32),
        )
        .expect("seal");
    tx.send_timeout(&bad_width, t).await.expect("send");
    tx.send_timeout(&bad_width, t).await.expect("send again");

    let m = wait_frame_counts(
        &h,
        c[1],
        &[("malformed", 1.0), ("forged", 2.0), ("replayed", 2.0)],
    )
    .await;
    let counts = frame_counts(&m);
    let get = |o: &str| metric(&m, &format!("exo_frames_total{{outcome=\"{o}\"}}"));
    assert!(get("malformed") >= Some(1.0), "malformed: {counts}");
    assert!(get("forged") >= Some(2.0), "forged: {counts}");
    assert!(get("replayed") >= Some(2.0), "replayed: {counts}");
    assert!(get("accepted") >= Some(1.0), "accepted: {counts}");
    eprintln!("worker frame counters: {counts}");

    // the cluster still answers, and right
    for (p, w) in PROMPTS[..2].iter().zip(&want) {
        let (got, _) = h.complete(c[0], &completion(p, 16)).await;
        assert_eq!(&got, w, "prompt {p:?} after the forged frames");
    }
    eprintln!(
        "forged_malformed_and_replayed_frames_are_counted_and_dropped: {:?}",
        t0.elapsed()
    );
}

/// An authentic, well-shaped batch from a sender that is not part of the session
/// (the plan names the head's sender id: "frames from others on the data pipe are
/// refused"): it must be refused, and it must not derail the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_from_outside_the_session_is_refused_and_harmless() {
    let t0 = Instant::now();
    let mut h = Harness::tiny("outsider", &tiny_spec());
    let single = h.single(&TINY_ENGINE);
    let c = h.cluster(&[peer("a", None), peer("b", None)], &TINY_ENGINE);
    h.wait_ready(single, Duration::from_secs(60)).await;
    h.wait_ready(c[0], Duration::from_secs(60)).await;
    let want = references(&h, single, &PROMPTS[..3], 16).await;
    let (before, _) = h.complete(c[0], &completion(PROMPTS[0], 16)).await;
    assert_eq!(before, want[0], "before the injected batch");

    let mut tx = PipelineTx::dial(&h.node(c[1]).data_address(), &DialOptions::default())
        .await
        .expect("dial the worker's data plane");
    let mut insider = Sealer::new(FrameKey::derive(KEY.as_bytes()), 0x0dd_5eed);
    let seqs = [BatchSeq {
        slot: 0,
        pos0: 0,
        n_tokens: 1,
        output: OutputRows::Last,
    }];
    let frame = insider
        .seal(
            0xDEAD_BEEF,
            &seqs,
            Payload::activations(&[0.01; TINY_EMBD], TINY_EMBD, Dtype::F32),
        )
        .expect("seal");
    tx.send_timeout(&frame, Some(Duration::from_secs(5)))
        .await
        .expect("send");
    tx.send_timeout(&frame, Some(Duration::from_secs(5)))
        .await
        .expect("send again");
    // a sender outside the session: both copies refused (counted with the replays)
    let m = wait_frame_counts(&h, c[1], &[("replayed", 2.0)]).await;
    let counts = frame_counts(&m);
    eprintln!("worker frame counters: {counts}");

    // first the harm it must not do: every later request answers, and right
    let mut failures = Vec::new();
    for (p, w) in PROMPTS[..3].iter().zip(&want) {
        let (status, v) = h
            .post_json(c[0], "/v1/completions", &completion(p, 16))
            .await;
        if status != StatusCode::OK {
            failures.push(format!("prompt {p:?}: {status} {v}"));
        } else if &text_of(&v) != w {
            failures.push(format!("prompt {p:?}: {:?} != {w:?}", text_of(&v)));
        }
    }
    assert!(
        failures.is_empty(),
        "after one injected batch the cluster fails:\n{}",
        failures.join("\n")
    );
    // then the refusal itself (an unknown sender counts as "replayed")
    assert!(
        metric(&m, "exo_frames_total{outcome=\"replayed\"}") >= Some(2.0),
        "the worker accepted a batch from outside the session: {counts}"
    );
    eprintln!(
        "a_batch_from_outside_the_session_is_refused_and_harmless: {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------ 5. failure, healing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_the_stream_and_rejoins_after_a_restart() {
    let t0 = Instant::now();
    let mut spec = tiny_spec();
    // on these weights the chosen prompt runs to max_tokens
    spec.n_layer = 9;
    spec.n_embd = 256;
    spec.n_ff = 1024;
    spec.n_ctx_train = 1024;
    let engine = Engine {
        ctx: 512,
        batch: 512,
        ..TINY_ENGINE
    };
    let mut h = Harness::tiny("heal", &spec);
    let single = h.single(&engine);
    let c = h.cluster(
        &[
            peer("node-a", Some((0, 3))),
            peer("node-b", Some((3, 6))),
            peer("node-c", Some((6, 9))),
        ],
        &engine,
    );
    h.wait_ready(single, Duration::from_secs(60)).await;
    h.wait_ready(c[0], Duration::from_secs(60)).await;
    let prompt = PROMPTS[1];
    let (want_after, _) = h.complete(single, &completion(PROMPTS[2], 32)).await;
    // the long generation must not end early (end of generation) on its own
    let t_single = Instant::now();
    let (_, finish) = h.complete(single, &completion(prompt, 400)).await;
    eprintln!(
        "single node: 400 tokens in {:?} (finish {finish})",
        t_single.elapsed()
    );
    assert_eq!(
        finish, "\"length\"",
        "pick a prompt that runs to max_tokens"
    );

    let mut body = completion(prompt, 400);
    body["stream"] = json!(true);
    let mut r = h
        .http
        .post(h.node(c[0]).url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("stream POST");
    assert_eq!(r.status(), StatusCode::OK);
    let mut text = String::new();
    while sse_events(&text).len() < 4 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("no chunk within 10 s")
            .expect("stream read")
            .expect("the stream ended before the kill");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let b = c[1];
    h.nodes[b].kill();
    let killed = Instant::now();
    eprintln!("killed node-b after {} events", sse_events(&text).len());
    // the stream must end with an error event and [DONE], within 2 s
    loop {
        let left = Duration::from_secs(10).saturating_sub(killed.elapsed());
        match tokio::time::timeout(left, r.chunk()).await {
            Err(_) => panic!("the stream did not end within 10 s of the kill"),
            Ok(Err(e)) => panic!("stream read failed: {e}"),
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => break,
        }
    }
    let ended = killed.elapsed();
    let events = sse_events(&text);
    let n = events.len();
    eprintln!("the stream ended {ended:?} after the kill, {n} events");
    assert!(n >= 2, "{text}");
    assert_eq!(events[n - 1], "[DONE]", "last event: {text}");
    let err: Value =
        serde_json::from_str(&events[n - 2]).unwrap_or_else(|e| panic!("{e}: {}", events[n - 2]));
    assert!(
        err.get("error").is_some(),
        "the stream ended without an error event (finished before the kill noticed?): {err}"
    );
    assert!(
        ended <= Duration::from_secs(2),
        "the stream ended {ended:?} after the kill (at most 2 s): {err}"
    );

    // /health names the missing peer
    let deadline = Instant::now() + Duration::from_secs(3);
    let health = loop {
        let (status, v) = h.get_json(c[0], "/health").await;
        if status == StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break (status, v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health.0, StatusCode::SERVICE_UNAVAILABLE, "{}", health.1);
    let msg = health.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("node-b") && !msg.contains("node-c"),
        "/health should name node-b alone: {}",
        health.1
    );

    // restart node-b alone: the head takes it back within 15 s
    h.nodes[b].start();
    let restarted = Instant::now();
    let back = h.wait_ready(c[0], Duration::from_secs(15)).await;
    eprintln!("the head is ready {back:?} after node-b's restart");
    let (got, _) = h.complete(c[0], &completion(PROMPTS[2], 32)).await;
    assert_eq!(got, want_after, "after healing vs single node");
    let (got, _) = h.complete(c[0], &completion(PROMPTS[2], 32)).await;
    assert_eq!(got, want_after, "again after healing vs single node");
    eprintln!(
        "healed and answered {:?} after the restart; test {:?}",
        restarted.elapsed(),
        t0.elapsed()
    );
}

// ------------------------------------------------------------------ 6. real model

/// Eight requests for the real model, sent together: the prompt of the issue three
/// times, and others of other lengths; (prompt, max_tokens, streamed).
const REAL_REQUESTS: [(&str, usize, bool); 8] = [
    ("Once upon a time, in a small village,", 24, false),
    ("Once upon a time, in a small village,", 24, true),
    ("The capital of France is", 16, false),
    ("Once upon a time, in a small village,", 24, false),
    (
        "Write a short poem about the sea and the wind that",
        32,
        true,
    ),
    ("1, 2, 3, 4,", 12, false),
    (
        "The three most important things to know about the history of Rome are",
        28,
        false,
    ),
    (
        "Q: What is the boiling point of water in Celsius?\nA:",
        20,
        true,
    ),
];

/// The texts of [`REAL_REQUESTS`] on node `i`, all at once (prompts as token ids).
async fn real_answers_together(h: &Harness, i: usize, ids: &[Vec<i32>]) -> Vec<String> {
    let mut tasks = Vec::new();
    for ((_, max_tokens, stream), ids) in REAL_REQUESTS.iter().zip(ids) {
        let http = h.http.clone();
        let url = h.node(i).url("/v1/completions");
        let body = json!({"prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                          "stream": stream});
        let stream = *stream;
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.expect("POST");
            assert_eq!(r.status(), StatusCode::OK);
            let text = r.text().await.expect("body");
            if stream {
                stream_text(&text)
            } else {
                let v: Value = serde_json::from_str(&text).expect("JSON");
                text_of(&v)
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// One answer everywhere, on the real Gemma 3 270M (Q4_K, Q6_K, Q5_0 and Q8_0
/// matrices) with default settings: each request alone equals llama.cpp's greedy
/// continuation; sent together (one batch, mixed lengths, some streamed), each gives
/// its text alone, on one node, on two nodes and on three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_gemma_answers_alone_batched_and_split_equal_llama_cpp() {
    let Some(path) = real_model() else {
        return;
    };
    let t0 = Instant::now();
    let dir = TempDir::new("cluster-real").expect("temp dir");
    let mut h = Harness::with_model(dir, path);
    let engine = Engine {
        max_slots: 8,
        ..TINY_ENGINE
    };
    let single = h.single(&engine);
    let two = h.cluster(&[peer("a", None), peer("b", None)], &engine);
    let three = h.cluster(
        &[peer("x", None), peer("y", None), peer("z", None)],
        &engine,
    );
    let tok = exo::tokenizer::Tokenizer::load(&h.model, "gemma3").expect("tokenizer");
    let ids: Vec<Vec<i32>> = REAL_REQUESTS
        .iter()
        .map(|(p, _, _)| tok.encode(p).expect("encode"))
        .collect();
    // llama.cpp, while the nodes start
    let model = h.model.clone();
    let wanted: Vec<(usize, Vec<i32>)> = REAL_REQUESTS
        .iter()
        .zip(&ids)
        .map(|((_, n, _), ids)| (*n, ids.clone()))
        .collect();
    let oracle = tokio::task::spawn_blocking(move || {
        wanted
            .iter()
            .map(|(n, ids)| oracle_text(&model, ids, *n).0)
            .collect::<Vec<String>>()
    })
    .await
    .expect("oracle");
    for i in [single, two[0], three[0]] {
        h.wait_ready(i, Duration::from_secs(120)).await;
    }
    eprintln!(
        "real model: two nodes {:?}, three nodes {:?}",
        cluster_ranges(&h, two[0]).await,
        cluster_ranges(&h, three[0]).await
    );
    let mut alone = Vec::new();
    for (((p, n, _), ids), want) in REAL_REQUESTS.iter().zip(&ids).zip(&oracle) {
        let body = json!({"prompt": ids, "max_tokens": n, "temperature": 0});
        let (got, _) = h.complete(single, &body).await;
        assert!(!got.trim().is_empty(), "empty completion for {p:?}");
        assert_eq!(&got, want, "{p:?} alone vs llama.cpp");
        alone.push(got);
    }
    let steps = |m: &str| metric(m, "exo_step_seconds_count").expect("steps");
    let before = steps(&h.metrics(single).await);
    for (i, what) in [
        (single, "one node"),
        (two[0], "two nodes"),
        (three[0], "three nodes"),
    ] {
        let together = real_answers_together(&h, i, &ids).await;
        for (k, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(
                got, want,
                "request {k} ({:?}) sent with 7 others to {what} vs alone",
                REAL_REQUESTS[k].0
            );
        }
    }
    // the eight really shared steps on the single node
    let tokens: usize = REAL_REQUESTS.iter().map(|(_, n, _)| n).sum();
    let batched_steps = steps(&h.metrics(single).await) - before;
    assert!(
        batched_steps * 2.0 < tokens as f64,
        "{batched_steps} steps for up to {tokens} tokens: not batched"
    );
    eprintln!(
        "real_gemma_answers_alone_batched_and_split_equal_llama_cpp: {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------ helpers' own checks

#[test]
fn port_pairs_are_distinct_and_free() {
    let a = free_port(true);
    let b = free_port(true);
    assert!(a != b && a + 1 != b && b + 1 != a);
    assert!(bindable(a) && bindable(a + 1));
}

// ------------------------------------------------------------------ memory

#[path = "cluster/memory.rs"]
mod memory;

// ------------------------------------------------------------------ hostile peers

#[path = "cluster/peers.rs"]
mod peers;
