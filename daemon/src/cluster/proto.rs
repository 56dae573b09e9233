//! The control messages nodes exchange (hello, plan, health, slot set-up,
//! errors), their protocol version, and the model's identity they agree on. They
//! travel as JSON in control frames ([`super::wire`]); Rust names may differ from
//! the JSON field names, which are the protocol's.

use serde::{Deserialize, Serialize};

use ggml_shim::llama::SamplingParams;

use super::capabilities::Capabilities;
use crate::engine::Sampling;

/// Protocol version of the control messages (2: slot set-ups carry logit biases
/// and log-probability requests, answered in token-logprobs frames; 3: slice
/// offers carry only the needed chunks' hashes, in pages).
pub const PROTOCOL: u32 = 3;

/// The first 12 characters of a model id, for messages (whatever the peer sent: a
/// cut inside a character is never made).
pub fn short_id(id: &str) -> &str {
    id.char_indices().nth(12).map_or(id, |(i, _)| &id[..i])
}

/// The head's greeting ([`super::wire::FrameType::Hello`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub from: String,
    pub protocol: u32,
    /// [`crate::model::ModelFile::model_hash`] of the sender's model.
    #[serde(rename = "model_id")]
    pub model_hash: String,
}

/// A node's answer to [`Hello`]: who it is, its model and what it offers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloAck {
    pub name: String,
    pub protocol: u32,
    /// [`crate::model::ModelFile::model_hash`] of the sender's model.
    #[serde(rename = "model_id")]
    pub model_hash: String,
    pub caps: Capabilities,
    /// Whether the node currently runs a plan (false after a restart).
    pub planned: bool,
    /// The sender id of this node's data-plane frames (random per process start).
    pub data_sender: u64,
    /// Whether the node has the whole model file; a node without one (its model id
    /// is that of the slice it keeps, or empty) receives its slice from the head.
    #[serde(default = "yes")]
    pub full_model: bool,
}

fn yes() -> bool {
    true
}

/// The head offers a worker the slice of the model its plan needs
/// ([`super::wire::FrameType::SliceOffer`]); the worker answers with a [`SliceStatus`].
/// The hashes of the needed chunks come in pages of at most
/// [`crate::cluster::slices::HASHES_PER_OFFER`]: one offer per page, the same but
/// for `hashes_from` and `hashes`; the answer to the last page tells what is missing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SliceOffer {
    /// [`crate::model::ModelFile::model_hash`] of the model.
    #[serde(rename = "model_id")]
    pub model_hash: String,
    /// The sending node's name (for progress lines).
    pub from: String,
    /// The layers the slice is for, as "9..18" (for progress lines).
    pub layers: String,
    /// How the model file is cut into chunks.
    pub chunking: crate::cluster::slices::Chunking,
    /// The chunks the plan needs, as `[first, last]` runs.
    pub need: Vec<[u32; 2]>,
    /// Which needed chunk (counted in `need`'s order) `hashes` starts at.
    pub hashes_from: u32,
    /// BLAKE3 of needed chunks from the `hashes_from`-th on, hex.
    pub hashes: Vec<String>,
}

/// What a worker still misses of its slice: the answer to a [`SliceOffer`] and to
/// every chunk ([`super::wire::FrameType::SliceStatus`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SliceStatus {
    /// The chunks it misses, as `[first, last]` runs (all of them in the answer to an
    /// offer; empty in the answer to a chunk).
    pub missing: Vec<[u32; 2]>,
    /// Bytes of the chunks the plan needs, and of those the node holds.
    pub need_bytes: u64,
    pub have_bytes: u64,
}

/// The agreed plan, sent by the head to every node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// Identifies this plan (changes when the cluster re-forms).
    pub epoch: u64,
    /// [`crate::model::ModelFile::model_hash`] of the model every stage runs.
    #[serde(rename = "model_id")]
    pub model_hash: String,
    /// Ranges in pipeline order, one per peer name.
    pub stages: Vec<PlannedStage>,
    pub n_ctx: usize,
    pub n_slots: usize,
    /// Max tokens per step (frame limit).
    pub batch: usize,
    /// Activations on the wire as f16 (else f32).
    pub f16: bool,
    /// Data-plane sender id of every stage, in order: a node accepts batches only
    /// from the stage before it (the head only from the last stage).
    pub senders: Vec<u64>,
    /// The `lm_head` split by vocabulary: the head node computes the logits of
    /// rows `0..lm_head_rows`, the last stage those of the rest (0: no split).
    #[serde(default, rename = "head_rows")]
    pub lm_head_rows: usize,
    /// The head node's rows for a step that is alone in the pipeline (flagged
    /// [`super::wire::FLAG_SOLO`]): both nodes then wait for the head, so it is
    /// split evenly by speed rather than to balance whole stages (0: as `lm_head_rows`).
    #[serde(default, rename = "head_rows_solo")]
    pub lm_head_rows_solo: usize,
}

/// One node's place in a [`Plan`]: its layers `start..end`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedStage {
    pub name: String,
    /// Where this stage receives its input (its data address).
    pub address: String,
    pub start: usize,
    pub end: usize,
}

/// A node's answer to a [`Plan`]: taken, or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanAck {
    pub ok: bool,
    pub error: Option<String>,
    pub sender_id: u64,
}

/// A node's answer to a ping: its plan and speed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pong {
    pub name: String,
    /// The epoch of the plan the node runs, 0 when none.
    pub epoch: u64,
    /// Milliseconds per token of this node's stage (moving average), 0 if unknown.
    pub ms_per_token: f64,
    /// Computing a step when it answered: the head waits for a slow stage's long step
    /// however long it takes, and counts a step lost only when no stage is busy.
    #[serde(default)]
    pub busy: bool,
}

/// A sequence's sampling parameters, for the stage that samples (or, with a split
/// head, decides what to send back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotSetup {
    pub slot: usize,
    #[serde(with = "SamplingParamsDef")]
    pub sampling: SamplingParams,
    pub prompt: Vec<i32>,
    /// `(token id, bias)` added to the logits, by id.
    #[serde(default)]
    pub logit_bias: Vec<(i32, f32)>,
    /// Log-probabilities of the chosen token and of this many alternatives.
    #[serde(default)]
    pub logprobs: Option<usize>,
}

impl SlotSetup {
    pub fn new(slot: usize, sampling: &Sampling, prompt: &[i32]) -> SlotSetup {
        SlotSetup {
            slot,
            sampling: sampling.params,
            prompt: prompt.to_vec(),
            logit_bias: sampling.logit_bias.clone(),
            logprobs: sampling.logprobs,
        }
    }

    /// How the sequence samples.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            params: self.sampling,
            logit_bias: self.logit_bias.clone(),
            logprobs: self.logprobs,
        }
    }
}

/// The wire form of [`SamplingParams`] (serde checks it lists every field).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SamplingParams")]
struct SamplingParamsDef {
    temperature: f32,
    top_k: i32,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: i32,
    frequency_penalty: f32,
    presence_penalty: f32,
    seed: u32,
}

/// Why a request or a step failed ([`super::wire::FrameType::Error`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_never_cut_a_character() {
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id("ééééééééééééé"), "éééééééééééé");
    }

    /// The JSON field names are the protocol's: `model_id` carries the hash,
    /// `head_rows` the lm_head split.
    #[test]
    fn the_model_hash_travels_as_model_id() {
        let hello = Hello {
            from: "head".into(),
            protocol: PROTOCOL,
            model_hash: "abc123".into(),
        };
        let json = serde_json::to_value(&hello).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"from": "head", "protocol": 3, "model_id": "abc123"})
        );
        let plan: Plan = serde_json::from_value(serde_json::json!({
            "epoch": 3, "model_id": "abc123", "stages": [], "n_ctx": 64, "n_slots": 2,
            "batch": 8, "f16": true, "senders": [7], "head_rows": 5, "head_rows_solo": 7
        }))
        .expect("a plan of this protocol");
        assert_eq!(plan.model_hash, "abc123");
        assert_eq!((plan.lm_head_rows, plan.lm_head_rows_solo), (5, 7));
        assert_eq!(
            serde_json::to_value(&plan).expect("json")["model_id"],
            "abc123"
        );
        let ack: HelloAck = serde_json::from_value(serde_json::json!({
            "name": "b", "protocol": 1, "model_id": "abc123", "planned": false,
            "data_sender": 9, "caps": {"free_memory": 1, "cores": 1, "threads": 1,
            "ms_per_layer": 1.0}
        }))
        .expect("a hello-ack of this protocol");
        assert_eq!(ack.model_hash, "abc123");
        let caps = serde_json::to_value(&ack.caps).expect("json");
        assert_eq!(caps["ms_per_head_mb"], 0.0, "{caps}");
        // a pong without `busy` (a peer from before it) reads as idle
        let pong: Pong = serde_json::from_value(serde_json::json!({
            "name": "b", "epoch": 3, "ms_per_token": 2.5
        }))
        .expect("a pong without busy");
        assert!(!pong.busy);
        let busy = Pong { busy: true, ..pong };
        assert_eq!(serde_json::to_value(&busy).expect("json")["busy"], true);
    }
}
