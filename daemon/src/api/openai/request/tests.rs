//! Request parsing: accepted forms, defaults, and the error texts clients see.

use serde_json::{json, Value};

use super::*;

fn app() -> App {
    App::new("gemma".into(), None, 1 << 20)
}

fn completion(body: Value) -> Result<(GenParams, Prompt), ApiError> {
    parse::<CompletionRequest>(body.to_string().as_bytes())?.validate(&app())
}

fn chat(body: Value) -> Result<(GenParams, Vec<Message>), ApiError> {
    parse::<ChatRequest>(body.to_string().as_bytes())?.validate(&app())
}

/// The message of a 400 error.
fn bad(r: Result<impl std::fmt::Debug, ApiError>) -> String {
    let e = r.expect_err("an error");
    assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
    assert_eq!(e.code, "invalid_request");
    e.message
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn absent_fields_take_the_defaults() {
    let (p, prompt) = completion(json!({"prompt": "hi"})).expect("valid");
    assert_eq!(prompt, Prompt::Text("hi".into()));
    assert_eq!(p.max_tokens, None);
    assert_eq!(p.sampling, SamplingParams::default());
    assert_eq!(p.sampling.seed, DEFAULT_SEED);
    assert!(p.stops.is_empty() && !p.stream && !p.include_usage);
    // null is the same as absent
    let nulls = json!({"prompt": "hi", "temperature": null, "stop": null, "model": null,
        "stream_options": null, "seed": null});
    let (q, _) = completion(nulls).expect("valid");
    assert_eq!(q.sampling, p.sampling);
}

#[test]
fn given_fields_reach_the_sampler() {
    let (p, _) = completion(json!({
        "prompt": "hi", "model": "gemma", "max_tokens": 7, "n": 1, "temperature": 0,
        "top_p": 0.5, "min_p": 0.1, "top_k": 5_000_000_000i64, "presence_penalty": -1,
        "frequency_penalty": 1.5, "repetition_penalty": 1.1, "seed": -1, "stop": "\n",
        "stream": true, "stream_options": {"include_usage": true},
    }))
    .expect("valid");
    assert_eq!(p.max_tokens, Some(7));
    let s = p.sampling;
    assert_eq!((s.temperature, s.top_p, s.min_p), (0.0, 0.5, 0.1));
    assert_eq!(s.top_k, i32::MAX);
    assert_eq!((s.presence_penalty, s.frequency_penalty), (-1.0, 1.5));
    assert_eq!(s.repeat_penalty, 1.1);
    assert_eq!(s.seed, 0xFFFF_FFFF);
    assert_eq!(p.stops, vec!["\n".to_string()]);
    assert!(p.stream && p.include_usage);
    // repeat_penalty wins over repetition_penalty; a negative top_k means all tokens
    let (p, _) = completion(
        json!({"prompt": "x", "repeat_penalty": 2, "repetition_penalty": 3,
        "top_k": -4}),
    )
    .expect("valid");
    assert_eq!((p.sampling.repeat_penalty, p.sampling.top_k), (2.0, 0));
}

#[test]
fn fields_clients_send_that_exo_does_not_use_are_accepted() {
    let body = json!({"prompt": "hi", "user": "u", "logit_bias": {"1": 2}, "logprobs": null,
        "suffix": null, "best_of": 1, "extra_body": {}});
    assert!(completion(body).is_ok());
    let body = json!({"messages": [{"role": "user", "content": "hi", "name": "x"}],
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "parallel_tool_calls": false, "metadata": {}});
    assert!(chat(body).is_ok());
}

#[test]
fn body_errors() {
    let parse_completion = |b: &[u8]| parse::<CompletionRequest>(b).map(|_| ());
    assert!(bad(parse_completion(b"{\"prompt\": ")).starts_with("invalid JSON body: "));
    assert_eq!(
        bad(parse_completion(b"[1, 2]")),
        "the body must be a JSON object"
    );
    assert!(bad(parse_completion(b"{\"prompt\": \"\xff\"}")).contains("unicode"));
}

#[test]
fn wrong_types_name_the_field() {
    for (field, value, message) in [
        (
            "temperature",
            json!("hot"),
            "'temperature' must be a number",
        ),
        ("max_tokens", json!("8"), "'max_tokens' must be an integer"),
        ("max_tokens", json!(8.5), "'max_tokens' must be an integer"),
        ("n", json!(true), "'n' must be an integer"),
        ("seed", json!(1e30), "'seed' must be an integer"),
        ("stream", json!(1), "'stream' must be true or false"),
        ("echo", json!("no"), "'echo' must be true or false"),
        ("model", json!(3), "'model' must be a string"),
        (
            "stop",
            json!(3),
            "'stop' must be a string or a list of strings",
        ),
        (
            "stop",
            json!(["a", 1]),
            "'stop' must be a string or a list of strings",
        ),
        (
            "stream_options",
            json!([]),
            "'stream_options' must be an object",
        ),
        (
            "stream_options",
            json!({"include_usage": "yes"}),
            "'include_usage' must be true or false",
        ),
        ("prompt", json!(42), "'prompt' must be a string"),
        ("prompt", json!({"a": 1}), "'prompt' must be a string"),
    ] {
        let mut body = json!({"prompt": "hi"});
        body[field] = value.clone();
        assert_eq!(bad(completion(body)), message, "{field}: {value}");
    }
}

#[test]
fn out_of_range_values() {
    for (field, value, message) in [
        (
            "max_tokens",
            json!(0),
            "'max_tokens' must be at least 1, got 0",
        ),
        (
            "max_tokens",
            json!(-1),
            "'max_tokens' must be at least 1, got -1",
        ),
        (
            "n",
            json!(2),
            "'n' must be 1 (got 2): one choice per request",
        ),
        (
            "temperature",
            json!(2.5),
            "'temperature' must be between 0 and 2",
        ),
        ("top_p", json!(-0.1), "'top_p' must be between 0 and 1"),
        ("min_p", json!(1.5), "'min_p' must be between 0 and 1"),
        (
            "presence_penalty",
            json!(3),
            "'presence_penalty' must be between -2 and 2",
        ),
        (
            "frequency_penalty",
            json!(-3),
            "'frequency_penalty' must be between -2 and 2",
        ),
        (
            "repeat_penalty",
            json!(0),
            "'repeat_penalty' must be in (0, 10]",
        ),
        (
            "repetition_penalty",
            json!(11),
            "'repeat_penalty' must be in (0, 10]",
        ),
        (
            "stop",
            json!(vec!["s"; 17]),
            "'stop' may hold at most 16 strings",
        ),
        ("echo", json!(true), "'echo' is not supported"),
    ] {
        let mut body = json!({"prompt": "hi"});
        body[field] = value.clone();
        assert_eq!(bad(completion(body)), message, "{field}: {value}");
    }
    assert!(completion(json!({"prompt": "hi", "stop": vec!["s"; 16], "echo": false})).is_ok());
}

#[test]
fn the_first_error_in_field_order_is_reported() {
    // the model before anything else, then max_tokens before temperature
    let body = json!({"model": "gpt-4", "max_tokens": 0, "temperature": "hot"});
    assert_eq!(
        completion(body).expect_err("error").status,
        StatusCode::NOT_FOUND
    );
    let body = json!({"max_tokens": 0, "temperature": "hot"});
    assert!(bad(completion(body)).contains("max_tokens"));
    // both penalties' types before either's range
    let body = json!({"prompt": "x", "presence_penalty": 9, "frequency_penalty": "x"});
    assert_eq!(
        bad(completion(body)),
        "'frequency_penalty' must be a number"
    );
}

#[test]
fn prompt_forms() {
    let prompt = |v: Value| completion(json!({"prompt": v})).map(|(_, p)| p);
    assert_eq!(
        prompt(json!(["one"])).ok(),
        Some(Prompt::Text("one".into()))
    );
    assert_eq!(
        prompt(json!([2, 5, -7, 5_000_000_000i64])).ok(),
        Some(Prompt::Tokens(vec![2, 5, -1, i32::MAX]))
    );
    let list = "'prompt' must be a string, a list of one string, or a list of token ids";
    for v in [
        json!([]),
        json!(["a", "b"]),
        json!([1, "a"]),
        json!([1.5]),
        json!([null]),
    ] {
        assert_eq!(bad(prompt(v.clone())), list, "{v}");
    }
    assert_eq!(bad(completion(json!({}))), "'prompt' is required");
    assert_eq!(
        bad(completion(json!({"prompt": null}))),
        "'prompt' is required"
    );
}

#[test]
fn the_model_must_be_the_served_one() {
    for name in ["gemma", "gemma.gguf", "default", ""] {
        assert!(
            completion(json!({"prompt": "x", "model": name})).is_ok(),
            "{name}"
        );
    }
    let e = completion(json!({"prompt": "x", "model": "gpt-4"})).expect_err("unknown");
    assert_eq!(
        (e.status, e.code),
        (StatusCode::NOT_FOUND, "model_not_found")
    );
    assert_eq!(
        e.message,
        "the model 'gpt-4' does not exist; this server serves 'gemma'"
    );
    let e = chat(json!({"model": "gpt-4", "messages": []})).expect_err("unknown");
    assert_eq!(e.status, StatusCode::NOT_FOUND);
}

#[test]
fn chat_messages_are_read_with_their_roles() {
    let (p, messages) = chat(json!({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": null},
        {"role": "tool"},
    ]}))
    .expect("valid");
    assert_eq!(
        messages,
        vec![
            msg("system", "be brief"),
            msg("user", "ab"),
            msg("assistant", ""),
            msg("tool", "")
        ]
    );
    assert_eq!(p.max_tokens, None);
}

#[test]
fn chat_max_completion_tokens_overrides_max_tokens() {
    let body = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
        b["max_completion_tokens"] = extra;
        chat(b).map(|(p, _)| p.max_tokens)
    };
    assert_eq!(body(json!(9)).ok(), Some(Some(9)));
    assert_eq!(body(Value::Null).ok(), Some(Some(5)));
    assert_eq!(
        bad(body(json!(0))),
        "'max_completion_tokens' must be at least 1, got 0"
    );
    // a completion does not read it
    let body = json!({"prompt": "x", "max_completion_tokens": "many"});
    assert!(completion(body).is_ok());
}

#[test]
fn chat_message_errors() {
    let messages = |m: Value| bad(chat(json!({"messages": m})));
    assert_eq!(bad(chat(json!({}))), "'messages' is required");
    assert_eq!(messages(json!("hi")), "'messages' must be a list");
    assert_eq!(messages(json!([])), "'messages' must not be empty");
    for m in [json!("hi"), json!(null), json!(["user", "hi"])] {
        assert_eq!(messages(json!([m])), "messages[0] must be an object", "{m}");
    }
    let ok = json!({"role": "user", "content": "hi"});
    assert_eq!(
        messages(json!([ok, {"content": "x"}])),
        "messages[1].role must be a string"
    );
    assert_eq!(
        messages(json!([{"role": 1}])),
        "messages[0].role must be a string"
    );
    assert_eq!(
        messages(json!([{"role": "robot", "content": "x"}])),
        "messages[0].role 'robot' is not a known role"
    );
    assert_eq!(
        messages(json!([{"role": "user", "content": 5}])),
        "messages[0].content must be a string or a list of text parts"
    );
    for part in [
        json!({"type": "image_url", "image_url": {"url": "x"}}),
        json!({"type": "text"}),
        json!({"type": "text", "text": 1}),
        json!(["text", "hi"]),
        json!("hi"),
    ] {
        assert_eq!(
            messages(json!([{"role": "user", "content": [part]}])),
            "messages[0].content: only text parts are supported",
            "{part}"
        );
    }
    assert_eq!(
        messages(json!([{"role": "user", "content": " "}, {"role": "system"}])),
        "the messages have no content"
    );
}

#[test]
fn logit_bias_and_logprobs_are_read() {
    let (p, _) = completion(
        json!({"prompt": "hi", "logit_bias": {"50": -100, " 7": 2.5, "0": 100},
        "logprobs": 3}),
    )
    .expect("valid");
    assert_eq!(p.logit_bias, vec![(0, 100.0), (7, 2.5), (50, -100.0)]);
    assert_eq!(p.logprobs, Some(3));
    let (p, _) = completion(json!({"prompt": "hi", "logprobs": 0})).expect("valid");
    assert_eq!((p.logprobs, p.logit_bias.len()), (Some(0), 0));
    let (p, _) = completion(json!({"prompt": "hi"})).expect("valid");
    assert_eq!(p.logprobs, None);
    let m = json!([{"role": "user", "content": "x"}]);
    let c = |extra: Value| {
        let mut body = json!({"messages": m});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        chat(body)
    };
    let (p, _) = c(json!({"logprobs": true, "top_logprobs": 20})).expect("valid");
    assert_eq!(p.logprobs, Some(20));
    let (p, _) = c(json!({"logprobs": true})).expect("valid");
    assert_eq!(p.logprobs, Some(0));
    let (p, _) = c(json!({"logprobs": false, "top_logprobs": null})).expect("valid");
    assert_eq!(p.logprobs, None);
    let (p, _) = c(json!({"logit_bias": {"3": 1}})).expect("valid");
    assert_eq!(p.logit_bias, vec![(3, 1.0)]);
    for (extra, want) in [
        (
            json!({"top_logprobs": 2}),
            "'top_logprobs' needs 'logprobs' to be true",
        ),
        (
            json!({"logprobs": false, "top_logprobs": 2}),
            "'top_logprobs' needs 'logprobs' to be true",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "'top_logprobs' must be between 0 and 20",
        ),
        (json!({"logprobs": 3}), "'logprobs' must be true or false"),
    ] {
        assert_eq!(bad(c(extra.clone())), want, "{extra}");
    }
}

#[test]
fn bad_logit_bias_and_logprobs_are_refused() {
    let many: serde_json::Map<String, Value> =
        (0..1025).map(|i| (i.to_string(), json!(1))).collect();
    for (extra, want) in [
        (
            json!({"logit_bias": [1, 2]}),
            "'logit_bias' must be an object mapping token ids to numbers",
        ),
        (
            json!({"logit_bias": {"a": 1}}),
            "'logit_bias' keys must be token ids, got \"a\"",
        ),
        (
            json!({"logit_bias": {"-1": 1}}),
            "'logit_bias' keys must be token ids, got \"-1\"",
        ),
        (
            json!({"logit_bias": {"1": 101}}),
            "'logit_bias' values must be numbers between -100 and 100, got 101 for token 1",
        ),
        (
            json!({"logit_bias": {"1": "x"}}),
            "'logit_bias' values must be numbers between -100 and 100, got \"x\" for token 1",
        ),
        (
            json!({"logit_bias": {"5": 1, "05": 2}}),
            "'logit_bias' names token 5 twice",
        ),
        (
            json!({"logit_bias": many}),
            "'logit_bias' may hold at most 1024 tokens, got 1025",
        ),
        (
            json!({"logprobs": 21}),
            "'logprobs' must be between 0 and 20",
        ),
        (
            json!({"logprobs": -1}),
            "'logprobs' must be between 0 and 20",
        ),
        (json!({"logprobs": true}), "'logprobs' must be an integer"),
    ] {
        let mut body = json!({"prompt": "hi"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        assert_eq!(bad(completion(body)), want, "{extra}");
    }
}
