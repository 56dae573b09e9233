//! OpenAI parameters that exo does not implement. A request that gives one of them a
//! value that would change the answer gets a 400 naming it, rather than an answer
//! that silently ignores it; their no-op values (and `null`) are accepted, as clients
//! send them by default. Bookkeeping parameters that change no answer (`user`,
//! `metadata`, `store`, `service_tier`, `parallel_tool_calls` without tools, …) are
//! not listed here: they are ignored.

use hyper::StatusCode;
use serde_json::Value;

use crate::api::ApiError;

/// A parameter exo does not implement.
struct Unsupported {
    name: &'static str,
    /// Whether a (non-null) value changes nothing.
    no_op: fn(&Value) -> bool,
    /// What it would do, and the values that are accepted.
    why: &'static str,
}

fn never(_: &Value) -> bool {
    false
}

fn empty_list(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty)
}

fn none_or_auto(v: &Value) -> bool {
    matches!(v.as_str(), Some("none" | "auto"))
}

const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        name: "suffix",
        no_op: |v| v.as_str() == Some(""),
        why: "text after the insertion point is not implemented (leave it out or give \"\")",
    },
    Unsupported {
        name: "best_of",
        no_op: |v| v.as_f64() == Some(1.0),
        why: "only one candidate is generated (leave it out or give 1)",
    },
    Unsupported {
        name: "response_format",
        no_op: |v| {
            v.as_object()
                .is_some_and(|o| o.len() == 1 && o.get("type") == Some(&Value::from("text")))
        },
        why: "structured output (JSON mode, JSON schema) is not implemented \
              (leave it out or give {\"type\": \"text\"})",
    },
    Unsupported {
        name: "tools",
        no_op: empty_list,
        why: "tool calls are not implemented (leave it out or give [])",
    },
    Unsupported {
        name: "tool_choice",
        no_op: none_or_auto,
        why: "tool calls are not implemented (leave it out, or give \"none\" or \"auto\")",
    },
    Unsupported {
        name: "functions",
        no_op: empty_list,
        why: "function calls are not implemented (leave it out or give [])",
    },
    Unsupported {
        name: "function_call",
        no_op: none_or_auto,
        why: "function calls are not implemented (leave it out, or give \"none\" or \"auto\")",
    },
    Unsupported {
        name: "audio",
        no_op: never,
        why: "audio output is not implemented (leave it out)",
    },
    Unsupported {
        name: "modalities",
        no_op: |v| v.as_array().is_some_and(|a| a.iter().all(|m| m == "text")),
        why: "only text output is implemented (leave it out or give [\"text\"])",
    },
    Unsupported {
        name: "prediction",
        no_op: never,
        why: "predicted outputs are not implemented (leave it out)",
    },
    Unsupported {
        name: "reasoning_effort",
        no_op: never,
        why: "the served model has no reasoning setting (leave it out)",
    },
    Unsupported {
        name: "web_search_options",
        no_op: never,
        why: "web search is not implemented (leave it out)",
    },
];

/// A 400 naming the first parameter of `body` (a JSON object) that exo does not
/// implement and whose value is not a no-op.
pub(super) fn check(body: &Value) -> Result<(), ApiError> {
    for p in UNSUPPORTED {
        match body.get(p.name) {
            None | Some(Value::Null) => {}
            Some(v) if (p.no_op)(v) => {}
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "unsupported_parameter",
                    format!("'{}' is not supported: {}", p.name, p.why),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(body: Value) -> Option<String> {
        check(&body).err().map(|e| {
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.code, "unsupported_parameter");
            e.message
        })
    }

    #[test]
    fn each_parameter_is_named_when_it_would_change_the_answer() {
        for (name, value) in [
            ("suffix", json!(" world")),
            ("best_of", json!(3)),
            ("response_format", json!({"type": "json_object"})),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            ),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("required")),
            (
                "tool_choice",
                json!({"type": "function", "function": {"name": "f"}}),
            ),
            ("functions", json!([{"name": "f"}])),
            ("function_call", json!({"name": "f"})),
            ("audio", json!({"voice": "alloy", "format": "wav"})),
            ("modalities", json!(["text", "audio"])),
            ("prediction", json!({"type": "content", "content": "x"})),
            ("reasoning_effort", json!("low")),
            ("web_search_options", json!({})),
        ] {
            let m = refused(json!({"prompt": "hi", name: value}))
                .unwrap_or_else(|| panic!("{name}: {value} was accepted"));
            assert!(m.starts_with(&format!("'{name}' is not supported")), "{m}");
        }
    }

    #[test]
    fn no_op_values_and_null_are_accepted() {
        for body in [
            json!({"prompt": "hi"}),
            json!({"suffix": "", "best_of": 1, "response_format": {"type": "text"}}),
            json!({"tools": [], "tool_choice": "none", "functions": [], "function_call": "auto"}),
            json!({"tool_choice": "auto", "modalities": ["text"], "audio": null}),
            json!({"suffix": null, "best_of": null, "reasoning_effort": null}),
            json!({"user": "u1", "metadata": {"a": "b"}, "store": false, "parallel_tool_calls": true}),
        ] {
            assert_eq!(refused(body.clone()), None, "{body}");
        }
    }
}
