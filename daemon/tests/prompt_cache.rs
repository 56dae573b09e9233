//! Prompt caching on the real Gemma 3 270M: the turns of a chat go to the slot that
//! holds the previous turn and prefill only the rest, on one node and on a two-node
//! cluster (each node keeps its layers' part of the cache), and every answer, greedy
//! and seeded, equals the answer without the cache and llama.cpp's; usage and
//! /metrics count the cached tokens.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Prompt tokens per step (and llama.cpp's batch): small, so short chats span chunks.
const BATCH: usize = 32;
const CTX: usize = 768;
const ANSWER: usize = 16;
/// The nodes' engine: small chunks, two slots, the cache on.
const ENGINE: Engine = Engine {
    ctx: CTX,
    batch: BATCH,
    max_slots: 2,
    ..TINY_ENGINE
};

const SYSTEM: &str = "You are a helpful assistant who answers questions about the \
    geography, history and food of European countries in short, friendly sentences.";
const TURNS: [&str; 4] = [
    "What is the capital of France, and what is it famous for?",
    "And which river flows through that city?",
    "Tell me about a famous dish from the same country.",
    "Which other country makes a similar dish?",
];

fn cached_of(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.prompt_tokens_details.cached_tokens: {v}"))
}

/// One completion on node `i`: (text, cached prompt tokens).
async fn ask(h: &Harness, i: usize, body: &Value) -> (String, u64) {
    let (status, v) = h.post_json(i, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{}: {body}: {v}", h.node(i).name);
    (text_of(&v), cached_of(&v))
}

/// The turns of one chat, greedy and seeded, on a node with the cache, one without
/// and a two-node cluster with it; greedy answers also against llama.cpp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_turns_reuse_the_cache_and_answer_as_without_it() {
    let Some(path) = real_model() else {
        return;
    };
    let t0 = Instant::now();
    let dir = TempDir::new("prompt-cache").expect("temp dir");
    let mut h = Harness::with_model(dir, path);
    let off = Engine {
        prompt_cache: false,
        ..ENGINE
    };
    let cached = h.single(&ENGINE);
    let uncached = h.single(&off);
    let two = h.cluster(&[peer("a", None), peer("b", None)], &ENGINE);
    let tok = exo::tokenizer::Tokenizer::load(&h.model, "gemma3").expect("tokenizer");
    for i in [cached, uncached, two[0]] {
        h.wait_ready(i, Duration::from_secs(120)).await;
    }
    let nodes = [
        (cached, "one node"),
        (uncached, "no cache"),
        (two[0], "two nodes"),
    ];
    let mut text = SYSTEM.to_string();
    let mut prompt_tokens = 0;
    let mut cached_sum = 0;
    let mut last_ids: Vec<i32> = Vec::new();
    for (k, user) in TURNS.iter().enumerate() {
        text.push_str(&format!("\nUser: {user}\nAssistant:"));
        let ids = tok.encode(&text).expect("encode");
        let model = h.model.clone();
        let p = ids.clone();
        let (want, _) = tokio::task::spawn_blocking(move || {
            oracle_text_in(&model, &p, ANSWER, CTX as u32, BATCH as u32)
        })
        .await
        .expect("oracle");
        // the whole chunks the last turn's prompt prefilled are reused at least
        let common = ids
            .iter()
            .zip(&last_ids)
            .take_while(|(a, b)| a == b)
            .count();
        let at_least = common.min(ids.len() - 1) / BATCH * BATCH;
        let greedy = json!({"prompt": ids, "max_tokens": ANSWER, "temperature": 0});
        let seeded = json!({"prompt": ids, "max_tokens": ANSWER, "temperature": 0.9,
                            "top_k": 40, "seed": 11 + k});
        let mut seeded_texts = Vec::new();
        for &(i, what) in &nodes {
            let (got, c) = ask(&h, i, &greedy).await;
            assert_eq!(got, want, "turn {k} on {what} vs llama.cpp");
            let (s, again) = ask(&h, i, &seeded).await;
            seeded_texts.push(s);
            if i == uncached {
                assert_eq!((c, again), (0, 0), "turn {k}: {what} reused a cache");
                continue;
            }
            assert!(
                c as usize >= at_least && (c as usize).is_multiple_of(BATCH),
                "turn {k} on {what}: {c} cached tokens, {at_least} at least"
            );
            // the same prompt again: all but the chunk of its last token
            assert_eq!(
                again as usize,
                (ids.len() - 1) / BATCH * BATCH,
                "turn {k} on {what}: the repeated prompt"
            );
            if i == cached {
                prompt_tokens += 2 * ids.len();
                cached_sum += c + again;
            }
        }
        assert!(
            seeded_texts.windows(2).all(|w| w[0] == w[1]),
            "turn {k} seeded: {seeded_texts:?}"
        );
        eprintln!("turn {k}: {} prompt tokens, {want:?}", ids.len());
        text.push_str(&want);
        last_ids = ids;
    }
    assert!(cached_sum > 0);
    let m = h.metrics(cached).await;
    let series = |name: &str| metric(&m, name).unwrap_or_else(|| panic!("{name}: {m}"));
    assert_eq!(series("exo_prompt_tokens_cached_total"), cached_sum as f64);
    assert_eq!(
        series("exo_prompt_tokens_prefilled_total"),
        (prompt_tokens as u64 - cached_sum) as f64
    );
    let m = h.metrics(uncached).await;
    assert_eq!(metric(&m, "exo_prompt_tokens_cached_total"), Some(0.0));
    eprintln!(
        "chat_turns_reuse_the_cache_and_answer_as_without_it: {:?}",
        t0.elapsed()
    );
}

/// The streamed final usage chunk and the chat endpoint report cached tokens too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_and_chat_usage_report_cached_tokens() {
    let Some(path) = real_model() else {
        return;
    };
    let dir = TempDir::new("prompt-cache-usage").expect("temp dir");
    let mut h = Harness::with_model(dir, path);
    let i = h.single(&ENGINE);
    h.wait_ready(i, Duration::from_secs(120)).await;
    let prompt = format!("{SYSTEM}\nUser: {}\nAssistant:", TURNS[0]);
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let url = format!("http://127.0.0.1:{}/v1/completions", h.node(i).http_port);
    let mut usages = Vec::new();
    for _ in 0..2 {
        let r = h.http.post(&url).json(&body).send().await.expect("POST");
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.expect("body");
        let events = sse_events(&text);
        let last: Value = serde_json::from_str(&events[events.len() - 2]).expect("json");
        usages.push(last["usage"].clone());
    }
    let n = usages[0]["prompt_tokens"].as_u64().expect("prompt_tokens") as usize;
    assert_eq!(usages[0]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        usages[1]["prompt_tokens_details"]["cached_tokens"],
        ((n - 1) / BATCH * BATCH) as u64,
        "{usages:?}"
    );
    let chat = json!({"messages": [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": TURNS[0]}],
                      "max_tokens": 4, "temperature": 0});
    let mut cached = Vec::new();
    for _ in 0..2 {
        let (status, v) = h.post_json(i, "/v1/chat/completions", &chat).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        cached.push(cached_of(&v));
    }
    assert!(cached[1] >= BATCH as u64, "{cached:?}");
}

/// With chunks of 128 tokens a cached prefix may end inside a chunk (rows in groups
/// of 4, pieces of at least 64): prompts cut so that reused rows, pieces and a
/// recomputed answer fall at every kind of place in a chunk (inside ggml's 16-row
/// blocks and after them) answer with the same bits as without the cache (the
/// logprobs of every token) on one node and on two, and as llama.cpp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_inside_a_chunk_answer_with_the_same_bits_as_without_the_cache() {
    const FINE_BATCH: usize = 128;
    const FINE_CTX: usize = 1024;
    let Some(path) = real_model() else {
        return;
    };
    let t0 = Instant::now();
    let dir = TempDir::new("prompt-cache-fine").expect("temp dir");
    let mut h = Harness::with_model(dir, path);
    let on = Engine {
        ctx: FINE_CTX,
        batch: FINE_BATCH,
        ..ENGINE
    };
    let off = Engine {
        prompt_cache: false,
        ..on
    };
    let cached = h.single(&on);
    let uncached = h.single(&off);
    let two = h.cluster(&[peer("a", None), peer("b", None)], &on);
    let tok = exo::tokenizer::Tokenizer::load(&h.model, "gemma3").expect("tokenizer");
    for i in [cached, uncached, two[0]] {
        h.wait_ready(i, Duration::from_secs(120)).await;
    }
    let text: String = (0..80)
        .map(|i| format!("Note {i}: {} {} ", TURNS[i % 4], SYSTEM))
        .collect();
    let base = tok.encode(&text).expect("encode");
    assert!(base.len() > 900, "{} tokens", base.len());
    // (prompt length, answer tokens, cached tokens on the caching nodes): chunks
    // 0..256 reused whole; 384..468 exact after a 86-token last chunk; 436 is 52 rows
    // into its chunk (rows 496..500 leave ggml's 4-row tail for a 16-row block); the
    // 80-token answer to 640 is recomputed as the piece 640..716, reused up to 704;
    // a prompt that differs at 446 reuses 444
    let mut prompts: Vec<(Vec<i32>, usize, usize)> = [
        (300, 4, 0),
        (420, 4, 256),
        (470, 4, 384),
        (500, 4, 436),
        (640, 80, 448),
    ]
    .iter()
    .map(|&(n, answer, c)| (base[..n].to_vec(), answer, c))
    .collect();
    let mut k = 0;
    while k < prompts.len() {
        let (ids, answer, want_cached) = prompts[k].clone();
        let model = h.model.clone();
        let p = ids.clone();
        let (want, answer_ids) = tokio::task::spawn_blocking(move || {
            oracle_text_in(&model, &p, answer, FINE_CTX as u32, FINE_BATCH as u32)
        })
        .await
        .expect("oracle");
        let body = json!({"prompt": ids, "max_tokens": answer, "temperature": 0, "logprobs": 5});
        let mut answers = Vec::new();
        for (i, what) in [
            (uncached, "no cache"),
            (cached, "one node"),
            (two[0], "two nodes"),
        ] {
            let (status, v) = h.post_json(i, "/v1/completions", &body).await;
            assert_eq!(status, StatusCode::OK, "{what}: {v}");
            assert_eq!(
                text_of(&v),
                want,
                "prompt {k} ({} tokens) on {what} vs llama.cpp",
                ids.len()
            );
            let c = cached_of(&v) as usize;
            let expect = if i == uncached { 0 } else { want_cached };
            assert_eq!(c, expect, "prompt {k} ({} tokens) on {what}", ids.len());
            answers.push(v["choices"][0]["logprobs"].clone());
        }
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "prompt {k}: logprobs differ between the nodes: {answers:?}"
        );
        eprintln!(
            "prompt {k}: {} tokens, {want_cached} cached, {want:?}",
            ids.len()
        );
        if k == prompts.len() - 1 && prompts.len() == 5 {
            // the next turn: the answer, then more text; the idle engine has
            // recomputed 640..716 (prompt and answer) as one piece
            let mut next = ids.clone();
            next.extend(&answer_ids[..answer_ids.len().min(answer)]);
            next.extend(&base[640..700]);
            // the slot holds the answer's tokens but its last; the piece needs 64
            let fed = answer_ids.len().min(answer).saturating_sub(1);
            let reuse = if fed >= 64 { 704 } else { 640 };
            // the fill runs when the engine is idle: let it
            tokio::time::sleep(Duration::from_millis(500)).await;
            prompts.push((next, 4, reuse));
            // a prompt differing from the slot's at 446 (62 rows into its chunk):
            // reused up to the row group before it, 444, so that the piece 444..512
            // has no odd rows at its end as the fresh chunk 384..512 has none
            let diverging = [&base[..446], &base[600..700]].concat();
            prompts.push((diverging, 4, 444));
        }
        k += 1;
    }
    eprintln!(
        "cuts_inside_a_chunk_answer_with_the_same_bits_as_without_the_cache: {:?}",
        t0.elapsed()
    );
}
