//! The request fuzz target's body (see [`crate::fuzzing`]): any bytes parsed and checked
//! as both endpoints' request bodies, as the handlers do before anything is queued.

use std::sync::OnceLock;

use super::request::{self, ChatRequest, CompletionRequest};
use crate::api::App;

pub fn parse_any(body: &[u8]) {
    static APP: OnceLock<App> = OnceLock::new();
    let app = APP.get_or_init(|| App::new("gemma".into(), None, 1 << 20));
    if let Ok(req) = request::parse::<ChatRequest>(body) {
        let _ = req.validate(app);
    }
    if let Ok(req) = request::parse::<CompletionRequest>(body) {
        let _ = req.validate(app);
    }
}
