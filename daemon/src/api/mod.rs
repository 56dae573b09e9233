//! The HTTP API on hyper 1: OpenAI-compatible completions (plain and SSE), models,
//! health, metrics, the cluster view and the web page at `/`. `run(listener, app, shutdown)` serves until `shutdown`
//! resolves, then stops accepting and lets open connections finish.

mod conn;
pub mod metrics;
mod openai;
#[doc(hidden)]
pub use openai::fuzz as openai_fuzz;
pub mod text;
mod web;

pub use conn::{connection_limit, run, HttpLimits};

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::ApiKey;
use crate::engine::scheduler::SchedulerHandle;
use crate::tokenizer::Tokenizer;
use metrics::Metrics;

/// A loaded model being served.
pub struct Served {
    pub tokenizer: Arc<Tokenizer>,
    pub scheduler: SchedulerHandle,
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub arch: String,
    pub n_layer: usize,
    pub max_slots: usize,
}

/// Shared state of the server.
pub struct App {
    /// The model's id as clients name it (the file stem).
    pub model_id: String,
    /// The bearer token clients must send (None: open); SIGHUP may replace it.
    pub api_key: RwLock<Option<ApiKey>>,
    pub max_body_bytes: usize,
    /// Connections at once, header and body timeouts.
    pub http: HttpLimits,
    /// Whether `/` serves the web page (`[api] web`).
    pub web: bool,
    pub metrics: Arc<Metrics>,
    /// Set once the model is loaded.
    pub served: OnceLock<Served>,
    /// Why loading failed, if it did.
    pub load_error: Mutex<Option<String>>,
    /// After shutdown, how long open connections may take to finish.
    pub drain_timeout: Duration,
    /// On a cluster head: the peers, their ranges and liveness.
    pub cluster: OnceLock<crate::cluster::head::ClusterView>,
    /// On a worker node: the head's HTTP-serving peer name and data address.
    pub worker_of: OnceLock<String>,
    /// Frames this node opened or dropped (cluster nodes).
    pub frames: Arc<crate::cluster::OpenerStats>,
    /// This node's cluster listeners (cluster nodes), for their refusals.
    pub listeners: crate::cluster::admission::Listeners,
    /// A model slice on its way (to a worker, or to this worker), while it travels.
    pub progress: crate::cluster::slices::Progress,
}

impl App {
    pub fn new(model_id: String, api_key: Option<ApiKey>, max_body_bytes: usize) -> App {
        App {
            model_id,
            api_key: RwLock::new(api_key),
            max_body_bytes,
            http: HttpLimits::default(),
            web: true,
            metrics: Arc::new(Metrics::default()),
            served: OnceLock::new(),
            load_error: Mutex::new(None),
            drain_timeout: Duration::from_secs(30),
            cluster: OnceLock::new(),
            worker_of: OnceLock::new(),
            frames: Arc::new(crate::cluster::OpenerStats::default()),
            listeners: Default::default(),
            progress: Default::default(),
        }
    }

    /// Peers of a cluster head that are not alive (empty elsewhere).
    pub fn missing_peers(&self) -> Vec<String> {
        self.cluster
            .get()
            .and_then(|view| {
                view.lock().ok().map(|v| {
                    v.iter()
                        .filter(|p| !p.alive)
                        .map(|p| p.name.clone())
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Whether /health answers 200: a worker, or a loaded model with every peer alive.
    pub fn is_ready(&self) -> bool {
        self.worker_of.get().is_some()
            || (self.served.get().is_some() && self.missing_peers().is_empty())
    }

    /// Whether `name` refers to the served model.
    fn knows_model(&self, name: &str) -> bool {
        name.is_empty()
            || name == self.model_id
            || name == "default"
            || name == format!("{}.gguf", self.model_id)
    }
}

/// The response body: a whole buffer or a stream of SSE events.
pub enum ApiBody {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(f) => Pin::new(f).poll_frame(cx),
            ApiBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Full(f) => f.is_end_stream(),
            ApiBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ApiBody::Full(f) => f.size_hint(),
            ApiBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

pub type ApiResponse = Response<ApiBody>;

/// An OpenAI-shaped error.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    /// 503: the server cannot take the request now.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            code,
            message,
        )
    }

    /// The same error, telling the client when to retry (`Retry-After`, seconds).
    pub fn with_retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    pub fn body_json(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }

    fn into_response(self) -> ApiResponse {
        let mut r = json_response(self.status, &self.body_json());
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, v: &impl serde::Serialize) -> ApiResponse {
    // exo's own types always serialize (no maps with non-string keys)
    let body = serde_json::to_vec(v).unwrap_or_default();
    text_response(status, "application/json", body)
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> ApiResponse {
    let mut r = Response::new(ApiBody::Full(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> ApiResponse {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let known = allowed_method(&path).is_some() || (app.web && web::is_page(&path));
    let endpoint = if known { path.as_str() } else { "other" }.to_string();
    let mut resp = route(&app, req, &path, &method)
        .await
        .unwrap_or_else(ApiError::into_response);
    if resp.status() == StatusCode::REQUEST_TIMEOUT {
        // the rest of the body may still come: this connection is done
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    app.metrics.request(&endpoint, resp.status().as_u16());
    tracing::info!(target: "exo::http", "{method} {path} {}", resp.status().as_u16());
    resp
}

fn method_not_allowed(allowed: &'static str) -> ApiResponse {
    let e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("method not allowed; use {allowed}"),
    );
    let mut r = e.into_response();
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allowed));
    r
}

/// The method an endpoint takes; None for an unknown path.
fn allowed_method(path: &str) -> Option<&'static str> {
    match path {
        "/v1/completions" | "/v1/chat/completions" => Some("POST"),
        "/v1/models" | "/v1/cluster" | "/health" | "/metrics" => Some("GET"),
        _ => None,
    }
}

async fn route(
    app: &Arc<App>,
    req: Request<Incoming>,
    path: &str,
    method: &Method,
) -> Result<ApiResponse, ApiError> {
    if app.web && web::is_page(path) {
        // the page itself needs no key: only the API calls it makes do
        return Ok(web::serve(path, method, req.headers()));
    }
    let Some(allowed) = allowed_method(path) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            format!("unknown path {path}"),
        ));
    };
    if method.as_str() != allowed {
        return Ok(method_not_allowed(allowed));
    }
    match path {
        "/health" => Ok(health(app)),
        "/metrics" => Ok(text_response(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics_text(app),
        )),
        "/v1/cluster" => Ok(json_response(StatusCode::OK, &cluster_json(app))),
        _ => {
            authorize(app, &req)?;
            if path == "/v1/models" {
                return Ok(openai::models(app));
            }
            if let Some(head) = app.worker_of.get() {
                return Err(ApiError::unavailable(
                    "not_head",
                    format!("this node is a cluster worker: send requests to the head ({head})"),
                ));
            }
            let body = read_body(app, req).await?;
            let served = ready(app)?;
            if path == "/v1/completions" {
                openai::completions(app, served, body).await
            } else {
                openai::chat_completions(app, served, body).await
            }
        }
    }
}

/// `GET /v1/cluster`: every peer of a cluster head (none elsewhere), each with its
/// `state` ("up" or "missing") and its stage's `tokens_per_s`, and the served model;
/// on a worker, its `head`.
fn cluster_json(app: &App) -> serde_json::Value {
    let peers = app
        .cluster
        .get()
        .and_then(|v| v.lock().ok().map(|v| v.clone()))
        .unwrap_or_default();
    let peers: Vec<serde_json::Value> = peers
        .iter()
        .map(|p| {
            let mut v = json!(p);
            v["state"] = json!(if p.alive { "up" } else { "missing" });
            v["tokens_per_s"] = json!(if p.ms_per_token > 0.0 {
                1000.0 / p.ms_per_token
            } else {
                0.0
            });
            v
        })
        .collect();
    let mut model = json!({"id": app.model_id});
    if let Some(s) = app.served.get() {
        model["context_length"] = json!(s.n_ctx);
        model["layers"] = json!(s.n_layer);
    }
    let mut v = json!({"peers": peers, "model": model});
    if let Some(head) = app.worker_of.get() {
        v["head"] = json!(head);
    }
    v
}

/// The Prometheus text of `/metrics`.
fn metrics_text(app: &App) -> String {
    let served = app.served.get();
    let mut body = app.metrics.render(
        served.map(|s| s.scheduler.stats()),
        served.map_or(0, |s| s.max_slots),
    );
    if let Some(view) = app.cluster.get() {
        body.push_str(&cluster_metrics(view));
    }
    if app.cluster.get().is_some() || app.worker_of.get().is_some() {
        let f = app.frames.snapshot();
        body.push_str(
            "# HELP exo_frames_total Cluster frames by outcome.\n# TYPE exo_frames_total counter\n",
        );
        for (outcome, n) in [
            ("accepted", f.accepted),
            ("malformed", f.malformed),
            ("forged", f.forged),
            ("replayed", f.replayed),
            ("invalid", f.invalid),
        ] {
            body.push_str(&format!("exo_frames_total{{outcome=\"{outcome}\"}} {n}\n"));
        }
        body.push_str(
            "# HELP exo_peer_connections_refused_total Connections to a cluster port refused \
             by its listener's cap, by plane.\n# TYPE exo_peer_connections_refused_total counter\n",
        );
        for (plane, n) in app.listeners.refused() {
            body.push_str(&format!(
                "exo_peer_connections_refused_total{{plane=\"{plane}\"}} {n}\n"
            ));
        }
    }
    body
}

/// Per-peer figures of a cluster head, in Prometheus text.
fn cluster_metrics(view: &crate::cluster::head::ClusterView) -> String {
    use std::fmt::Write as _;
    let Ok(v) = view.lock() else {
        return String::new();
    };
    let mut out = String::new();
    type Figure = fn(&crate::cluster::head::PeerState) -> f64;
    let gauges: [(&str, &str, Figure); 5] = [
        (
            "exo_peer_up",
            "Whether the peer answers heartbeats and runs the plan.",
            |p| f64::from(u8::from(p.alive)),
        ),
        (
            "exo_peer_rtt_ms",
            "Round-trip time of the last heartbeat.",
            |p| p.rtt_ms,
        ),
        (
            "exo_peer_ms_per_token",
            "Compute time per token of the peer's stage.",
            |p| p.ms_per_token,
        ),
        (
            "exo_hop_bytes_total",
            "Bytes sent from this peer to the next stage (the last stage's, back to the head, counted at the head).",
            |p| p.bytes_sent as f64,
        ),
        ("exo_hop_tokens_total", "Tokens those bytes carried (on the way back: sampled tokens).", |p| {
            p.tokens_sent as f64
        }),
    ];
    for (name, help, f) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in v.iter() {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", p.name, f(p));
        }
    }
    out
}

fn health(app: &App) -> ApiResponse {
    if let Some(head) = app.worker_of.get() {
        let mut body = json!({"status": "ok", "role": "worker", "head": head});
        if let Some(line) = app.progress.get() {
            body["slice"] = json!(line);
        }
        return json_response(StatusCode::OK, &body);
    }
    let missing = app.missing_peers();
    if !missing.is_empty() {
        return ApiError::unavailable(
            "peer_missing",
            format!("peer {} is missing", missing.join(", ")),
        )
        .into_response();
    }
    if app.served.get().is_some() {
        return json_response(StatusCode::OK, &json!({"status": "ok"}));
    }
    load_failed(app)
        .unwrap_or_else(|| {
            let why = match app.progress.get() {
                Some(line) => format!("the model is loading: {line}"),
                None => "the model is loading".into(),
            };
            ApiError::unavailable("loading", why)
        })
        .into_response()
}

/// The error of a model that failed to load, if it did.
fn load_failed(app: &App) -> Option<ApiError> {
    let why = app.load_error.lock().ok().and_then(|e| e.clone())?;
    Some(ApiError::unavailable(
        "load_failed",
        format!("the model failed to load: {why}"),
    ))
}

/// The loaded model, or why requests cannot be served yet.
fn ready(app: &App) -> Result<&Served, ApiError> {
    if let Some(e) = load_failed(app) {
        return Err(e);
    }
    app.served.get().ok_or_else(|| {
        ApiError::unavailable("loading", "the model is still loading").with_retry_after(1)
    })
}

/// Constant-time comparison of the bearer token.
fn authorize(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let guard = app.api_key.read().unwrap_or_else(|e| e.into_inner());
    let Some(key) = guard.as_ref() else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if key.matches(given) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "missing or wrong API key (send 'Authorization: Bearer <key>')",
        ))
    }
}

async fn read_body(app: &App, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("the request body exceeds {} bytes", app.max_body_bytes),
        )
    };
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > app.max_body_bytes {
            return Err(too_large());
        }
    }
    let collect = Limited::new(req.into_body(), app.max_body_bytes).collect();
    let Ok(collected) = tokio::time::timeout(app.http.body_timeout, collect).await else {
        app.metrics
            .client_timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                app.http.body_timeout.as_secs_f64()
            ),
        ));
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}
