//! exo: a pipeline-parallel LLM inference appliance.
//!
//! Layering, top to bottom: cli (`main.rs`) → api → engine (scheduler → stage →
//! model) → ggml-shim. All `unsafe` and FFI live in `ggml-shim`.
#![forbid(unsafe_code)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod gen_model;
pub mod log_every;
pub mod model;
pub mod serve;
pub mod system;
pub mod tokenizer;
