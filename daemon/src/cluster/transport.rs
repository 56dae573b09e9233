//! Thin async wrappers over nng (through `anng`): push/pull for the activation
//! pipeline, req/rep for control. They move opaque bytes; authentication and
//! validation are [`super::wire`]'s job.
//!
//! Every operation that waits on a peer takes a timeout, so a dead peer turns into
//! an error instead of a hang. nng reconnects dialers by itself when a peer comes
//! back. Dropping a socket closes it (and its dialers and listeners).
//!
//! Every socket caps the messages it takes and every listening socket its
//! connections ([`super::admission`]): what an unauthenticated peer can make a node
//! hold is bounded before a frame reaches the opener.

use std::ffi::CString;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::time::Duration;

use anng::protocols::pipeline0::{Pull0, Push0};
use anng::protocols::reqrep0::{Rep0, Req0};
use anng::{AioError, Message, Socket};

use super::admission::{self, proto, Admission, AdmissionError, RecvCap};
use ggml_shim::nng::ConnectionGate;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid nng URL {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot listen on {url}: {source}")]
    Listen {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} on {url} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        url: String,
        after: Duration,
    },
    #[error("{op} on {url} failed: {source}")]
    Io {
        op: &'static str,
        url: String,
        #[source]
        source: AioError,
    },
    #[error("cannot limit what {url} takes: {source}")]
    Admission {
        url: String,
        #[source]
        source: AdmissionError,
    },
}

impl TransportError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, TransportError::Timeout { .. })
    }
}

/// One received message (owned nng buffer, no copy); derefs to its bytes.
#[derive(Debug)]
pub struct Packet(Message);

impl Packet {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_slice()
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.0.as_slice().to_vec()
    }
}

impl Deref for Packet {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl AsRef<[u8]> for Packet {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// How long to keep trying to reach a peer that is not up yet, and what its answers
/// may weigh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialOptions {
    /// Give up after this long.
    pub connect_timeout: Duration,
    /// Pause between attempts after a refused connection.
    pub retry_interval: Duration,
    /// The longest reply a [`ControlClient`] takes (a [`PipelineTx`] takes none).
    pub reply_max: usize,
}

impl DialOptions {
    /// [`DialOptions::reply_max`] by default.
    pub const DEFAULT_REPLY_MAX: usize = 1 << 20;
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            connect_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_millis(100),
            reply_max: DialOptions::DEFAULT_REPLY_MAX,
        }
    }
}

fn c_url(url: &str) -> Result<CString, TransportError> {
    if !url.contains("://") {
        return Err(TransportError::BadUrl {
            url: url.to_string(),
            reason: "expected scheme://address, e.g. tcp://10.0.0.2:5555",
        });
    }
    CString::new(url).map_err(|_| TransportError::BadUrl {
        url: url.to_string(),
        reason: "contains a NUL byte",
    })
}

/// A socket of protocol `protocol` made by `make`, capped as `admission` says and
/// listening on `url` (`what` names it in logs); with the bound URL (the real port
/// when `:0` was asked for).
async fn listening<P>(
    make: impl FnOnce() -> io::Result<Socket<P>>,
    protocol: u16,
    url: &str,
    admission: Admission,
    what: &'static str,
) -> Result<(Socket<P>, String, RecvCap), TransportError> {
    let socket = make().map_err(|source| TransportError::Listen {
        url: url.to_string(),
        source,
    })?;
    let capped = |source| TransportError::Admission {
        url: url.to_string(),
        source,
    };
    let id = admission::socket_id(&socket, protocol).map_err(capped)?;
    let cap = RecvCap::install(id, admission, what).map_err(capped)?;
    let url = listen_on(&socket, url, &cap).await?;
    Ok((socket, url, cap))
}

/// A socket of protocol `protocol` made by `make` that takes messages of up to
/// `recv_max` bytes (before it dials); with nng's id of it.
fn dialing<P>(
    make: impl FnOnce() -> io::Result<Socket<P>>,
    protocol: u16,
    url: &str,
    recv_max: usize,
) -> Result<(Socket<P>, u32), TransportError> {
    let socket = make().map_err(|source| TransportError::Connect {
        url: url.to_string(),
        source,
    })?;
    let bytes = recv_max.saturating_add(admission::SP_HEADER_ROOM);
    let id = admission::socket_id(&socket, protocol)
        .and_then(|id| Ok(ggml_shim::nng::set_socket_recv_max(id, bytes).map(|()| id)?))
        .map_err(|source| TransportError::Admission {
            url: url.to_string(),
            source,
        })?;
    Ok((socket, id))
}

/// A listening end: its bound URL, with the real port, and the address of a TCP one.
pub trait Listening {
    fn url(&self) -> &str;

    fn local_addr(&self) -> Option<SocketAddr> {
        tcp_addr(self.url())
    }
}

impl Listening for PipelineRx {
    fn url(&self) -> &str {
        &self.url
    }
}

impl Listening for ControlServer {
    fn url(&self) -> &str {
        &self.url
    }
}

async fn listen_on<P>(
    socket: &Socket<P>,
    url: &str,
    cap: &RecvCap,
) -> Result<String, TransportError> {
    let c = c_url(url)?;
    let listener = socket
        .listen(c.as_c_str())
        .await
        .map_err(|source| TransportError::Listen {
            url: url.to_string(),
            source,
        })?;
    // The listener handle borrows the socket; the listener itself lives as long as
    // the socket does.
    let bound = listener
        .local_addr()
        .map(String::from)
        .unwrap_or_else(|_| url.to_string());
    let port = tcp_addr(&bound)
        .map(|a| a.port())
        .ok_or_else(|| TransportError::BadUrl {
            url: url.to_string(),
            reason: "expected tcp://HOST:PORT",
        })?;
    let id =
        admission::listener_id(&listener, port).map_err(|source| TransportError::Admission {
            url: url.to_string(),
            source,
        })?;
    cap.listening(id, &bound);
    Ok(bound)
}

/// Dials until connected or `opts.connect_timeout` passes. nng's own dial is
/// synchronous (a refused connection fails at once), so a peer that is still
/// starting is retried here; once connected, nng reconnects by itself.
async fn dial_on<P>(
    socket: &Socket<P>,
    url: &str,
    opts: &DialOptions,
) -> Result<(), TransportError> {
    let c = c_url(url)?;
    let deadline = tokio::time::Instant::now() + opts.connect_timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, socket.dial(c.as_c_str())).await {
            Ok(Ok(_dialer)) => return Ok(()),
            Ok(Err(e)) if is_retryable(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(
                    opts.retry_interval
                        .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                )
                .await;
            }
            Ok(Err(source)) => {
                return Err(TransportError::Connect {
                    url: url.to_string(),
                    source,
                })
            }
            Err(_) => {
                return Err(TransportError::Timeout {
                    op: "connect",
                    url: url.to_string(),
                    after: opts.connect_timeout,
                })
            }
        }
    }
}

fn is_retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// Runs `fut` with an optional timeout.
async fn with_timeout<T>(
    op: &'static str,
    url: &str,
    timeout: Option<Duration>,
    fut: impl Future<Output = Result<T, AioError>>,
) -> Result<T, TransportError> {
    let r = match timeout {
        Some(after) => {
            tokio::time::timeout(after, fut)
                .await
                .map_err(|_| TransportError::Timeout {
                    op,
                    url: url.to_string(),
                    after,
                })?
        }
        None => fut.await,
    };
    r.map_err(|source| match source {
        AioError::TimedOut => TransportError::Timeout {
            op,
            url: url.to_string(),
            after: timeout.unwrap_or_default(),
        },
        source => TransportError::Io {
            op,
            url: url.to_string(),
            source,
        },
    })
}

/// The sending end of a pipeline hop: a PUSH socket dialed to the next stage.
#[derive(Debug)]
pub struct PipelineTx {
    socket: Socket<Push0>,
    url: String,
    send_timeout: Option<Duration>,
}

impl PipelineTx {
    /// Default time a send may wait for the next stage to take a message.
    pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

    /// Connects to the next stage's [`PipelineRx`] at `url`.
    pub async fn dial(url: &str, opts: &DialOptions) -> Result<PipelineTx, TransportError> {
        // nothing comes back on a push socket
        let (socket, _) = dialing(
            Push0::socket,
            proto::PUSH0,
            url,
            admission::RECEIVES_NOTHING,
        )?;
        dial_on(&socket, url, opts).await?;
        Ok(PipelineTx {
            socket,
            url: url.to_string(),
            send_timeout: Some(PipelineTx::DEFAULT_SEND_TIMEOUT),
        })
    }

    /// The timeout of [`PipelineTx::send`] (`None`: wait for the peer forever).
    pub fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.send_timeout = timeout;
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends one message. Waits (up to the send timeout) while no peer can take
    /// it; on a timeout the message is dropped.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.send_timeout(bytes, self.send_timeout).await
    }

    /// As [`PipelineTx::send`] with an explicit timeout.
    pub async fn send_timeout(
        &mut self,
        bytes: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(), TransportError> {
        let msg = Message::from(bytes);
        let socket = &mut self.socket;
        with_timeout("send", &self.url, timeout, async move {
            socket.push(msg).await.map_err(|(e, _msg)| e)
        })
        .await
    }
}

/// The receiving end of a pipeline hop: a PULL socket listening for the previous stage.
#[derive(Debug)]
pub struct PipelineRx {
    socket: Socket<Pull0>,
    url: String,
    cap: RecvCap,
}

impl PipelineRx {
    /// Listens on `url` (`tcp://HOST:0` picks a free port, see [`PipelineRx::url`]),
    /// admitting what `admission` says.
    pub async fn listen(url: &str, admission: Admission) -> Result<PipelineRx, TransportError> {
        let (socket, url, cap) =
            listening(Pull0::socket, proto::PULL0, url, admission, "data plane").await?;
        Ok(PipelineRx { socket, url, cap })
    }

    /// The receive cap (shared: it can be changed while another thread receives).
    pub fn recv_cap(&self) -> RecvCap {
        self.cap.clone()
    }

    /// Receives the next message; `None` waits forever. Cancellation safe: a
    /// message that arrives as the timeout fires is kept for the next call.
    pub async fn recv(&mut self, timeout: Option<Duration>) -> Result<Packet, TransportError> {
        let socket = &mut self.socket;
        with_timeout("receive", &self.url, timeout, socket.pull())
            .await
            .map(Packet)
    }

    /// A message if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Result<Option<Packet>, TransportError> {
        self.socket
            .try_pull()
            .map(|m| m.map(Packet))
            .map_err(|source| TransportError::Io {
                op: "receive",
                url: self.url.clone(),
                source,
            })
    }
}

/// The server side of control: a REP socket answering requests.
#[derive(Debug)]
pub struct ControlServer {
    socket: Socket<Rep0>,
    url: String,
    cap: RecvCap,
}

impl ControlServer {
    /// Listens on `url` (`tcp://HOST:0` picks a free port, see [`ControlServer::url`]),
    /// admitting what `admission` says.
    pub async fn listen(url: &str, admission: Admission) -> Result<ControlServer, TransportError> {
        let (socket, url, cap) =
            listening(Rep0::socket, proto::REP0, url, admission, "control plane").await?;
        Ok(ControlServer { socket, url, cap })
    }

    /// The receive cap.
    pub fn recv_cap(&self) -> RecvCap {
        self.cap.clone()
    }

    /// Waits (up to `timeout`) for one request, answers it with `handler`'s reply.
    /// A request that arrives exactly as the timeout fires is lost; its client
    /// times out (or nng re-sends it when the client's resend timer is set).
    pub async fn serve_one<F, Fut>(
        &self,
        timeout: Option<Duration>,
        handler: F,
    ) -> Result<(), TransportError>
    where
        F: FnOnce(Packet) -> Fut,
        Fut: Future<Output = Vec<u8>>,
    {
        let mut ctx = self.socket.context();
        let (request, responder) =
            with_timeout("receive", &self.url, timeout, ctx.receive()).await?;
        let reply = handler(Packet(request)).await;
        responder
            .reply(Message::from(reply.as_slice()))
            .await
            .map_err(|(_responder, source, _msg)| TransportError::Io {
                op: "reply",
                url: self.url.clone(),
                source,
            })
    }

    /// Answers requests until the socket fails, up to `lanes` at a time (each lane
    /// its own nng context, so a slow answer does not hold up the others); a handler
    /// that returns None leaves its request unanswered (the requester times out). Run
    /// it in its own task and abort the task to stop.
    pub async fn serve<F, Fut>(&self, lanes: usize, handler: F) -> Result<(), TransportError>
    where
        F: Fn(Packet) -> Fut,
        Fut: Future<Output = Option<Vec<u8>>>,
    {
        let lanes = (0..lanes.max(1)).map(|_| Box::pin(self.serve_lane(&handler)));
        // the first lane that fails ends the others
        futures_util::future::select_all(lanes).await.0
    }

    async fn serve_lane<F, Fut>(&self, handler: &F) -> Result<(), TransportError>
    where
        F: Fn(Packet) -> Fut,
        Fut: Future<Output = Option<Vec<u8>>>,
    {
        let mut ctx = self.socket.context();
        loop {
            let (request, responder) =
                ctx.receive().await.map_err(|source| TransportError::Io {
                    op: "receive",
                    url: self.url.clone(),
                    source,
                })?;
            let Some(reply) = handler(Packet(request)).await else {
                // no answer: the context takes the next request
                drop(responder);
                continue;
            };
            if let Err((_responder, source, _msg)) =
                responder.reply(Message::from(reply.as_slice())).await
            {
                // The requester is gone; it will re-send or time out.
                tracing::debug!(url = %self.url, error = %source, "control reply not sent");
            }
        }
    }
}

/// The client side of control: a REQ socket dialed to a [`ControlServer`].
#[derive(Debug)]
pub struct ControlClient {
    socket: Socket<Req0>,
    url: String,
    /// Counts the connection (a dialer has one at most).
    link: ConnectionGate,
}

impl ControlClient {
    /// Connects to the control server at `url`. nng's periodic re-send of
    /// unanswered requests is disabled: every request has its own timeout, and a
    /// re-sent frame would be rejected as a replay anyway. (nng still re-sends a
    /// pending request once if the connection drops and comes back.)
    pub async fn dial(url: &str, opts: &DialOptions) -> Result<ControlClient, TransportError> {
        let connect_err = |source| TransportError::Connect {
            url: url.to_string(),
            source,
        };
        let (socket, id) = dialing(Req0::socket, proto::REQ0, url, opts.reply_max)?;
        socket.set_resend_time(None).map_err(connect_err)?;
        let link =
            ConnectionGate::install(id, 4, opts.reply_max, Box::new(|_| {})).map_err(|e| {
                TransportError::Admission {
                    url: url.to_string(),
                    source: e.into(),
                }
            })?;
        dial_on(&socket, url, opts).await?;
        Ok(ControlClient {
            socket,
            url: url.to_string(),
            link,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the server is connected now (a request may still go unanswered).
    pub fn connected(&self) -> bool {
        self.link.open() > 0
    }

    /// Sends a request and waits for the reply, all within `timeout`. Requests
    /// may run concurrently (each uses its own nng context).
    pub async fn request(&self, bytes: &[u8], timeout: Duration) -> Result<Packet, TransportError> {
        let mut ctx = self.socket.context();
        let msg = Message::from(bytes);
        with_timeout("request", &self.url, Some(timeout), async move {
            let reply = ctx.request(msg).await.map_err(|(e, _msg)| e)?;
            reply.await
        })
        .await
        .map(Packet)
    }
}

/// The socket address of a `tcp://` URL.
fn tcp_addr(url: &str) -> Option<SocketAddr> {
    let (scheme, rest) = url.split_once("://")?;
    match scheme {
        "tcp" | "tcp4" | "tcp6" => rest.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn fast() -> DialOptions {
        DialOptions {
            connect_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(20),
            ..DialOptions::default()
        }
    }

    const T: Duration = Duration::from_secs(5);
    /// Room for every test here: 16 MiB frames, 8 connections.
    const OPEN: Admission = Admission {
        recv_max: 16 << 20,
        max_conns: 8,
    };

    #[tokio::test]
    async fn bound_port_is_reported() {
        let rx = PipelineRx::listen("tcp://127.0.0.1:0", OPEN).await.unwrap();
        let addr = rx.local_addr().expect("tcp address");
        assert_ne!(addr.port(), 0);
        assert_eq!(rx.url(), format!("tcp://127.0.0.1:{}", addr.port()));
        let server = ControlServer::listen("tcp://127.0.0.1:0", OPEN)
            .await
            .unwrap();
        assert_ne!(server.local_addr().unwrap().port(), 0);
    }

    #[tokio::test]
    async fn bad_urls_are_errors() {
        assert!(matches!(
            PipelineRx::listen("127.0.0.1:5", OPEN).await,
            Err(TransportError::BadUrl { .. })
        ));
        assert!(matches!(
            PipelineTx::dial("tcp://127.0.0.1:5\0", &fast()).await,
            Err(TransportError::BadUrl { .. })
        ));
        assert!(PipelineTx::dial("bogus://x", &fast()).await.is_err());
    }

    #[tokio::test]
    async fn push_pull_delivers_in_order() {
        let mut rx = PipelineRx::listen("tcp://127.0.0.1:0", OPEN).await.unwrap();
        let mut tx = PipelineTx::dial(rx.url(), &fast()).await.unwrap();
        let sender = tokio::spawn(async move {
            for i in 0u32..100 {
                let mut msg = i.to_le_bytes().to_vec();
                msg.resize(16 + i as usize * 37, i as u8);
                tx.send(&msg).await.unwrap();
            }
            tx
        });
        for i in 0u32..100 {
            let p = rx.recv(Some(T)).await.unwrap();
            assert_eq!(p.len(), 16 + i as usize * 37);
            assert_eq!(p[..4], i.to_le_bytes());
        }
        let _tx = sender.await.unwrap();
        assert!(rx.try_recv().unwrap().is_none());
    }

    #[tokio::test]
    async fn large_message_passes() {
        // A prefill chunk: 512 tokens × 2048 wide in f16 = 2 MiB.
        let mut rx = PipelineRx::listen("tcp://127.0.0.1:0", OPEN).await.unwrap();
        let mut tx = PipelineTx::dial(rx.url(), &fast()).await.unwrap();
        let big: Vec<u8> = (0..2 << 20).map(|i| (i % 251) as u8).collect();
        let send = tokio::spawn(async move {
            tx.send(&big).await.unwrap();
            (tx, big)
        });
        let p = rx.recv(Some(T)).await.unwrap();
        let (_tx, big) = send.await.unwrap();
        assert_eq!(&p[..], &big[..]);
    }

    #[tokio::test]
    async fn recv_times_out() {
        let mut rx = PipelineRx::listen("tcp://127.0.0.1:0", OPEN).await.unwrap();
        let t0 = std::time::Instant::now();
        let err = rx.recv(Some(Duration::from_millis(100))).await.unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn push_without_peer_times_out() {
        let rx = PipelineRx::listen("tcp://127.0.0.1:0", OPEN).await.unwrap();
        let url = rx.url().to_string();
        let mut tx = PipelineTx::dial(&url, &fast()).await.unwrap();
        drop(rx);
        // Let nng notice the closed connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = std::time::Instant::now();
        let err = tx
            .send_timeout(b"hello", Some(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));

        // When the next stage comes back on the same port, nng reconnects by itself.
        let mut rx = PipelineRx::listen(&url, OPEN).await.unwrap();
        tx.send_timeout(b"again", Some(T)).await.unwrap();
        let p = rx.recv(Some(T)).await.unwrap();
        assert_eq!(&p[..], b"again");
    }

    #[tokio::test]
    async fn dial_to_nobody_times_out() {
        // A free port: bind, read it, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let opts = DialOptions {
            connect_timeout: Duration::from_millis(300),
            retry_interval: Duration::from_millis(50),
            ..DialOptions::default()
        };
        let t0 = std::time::Instant::now();
        let err = PipelineTx::dial(&url, &opts).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Timeout { .. } | TransportError::Connect { .. }
            ),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(ControlClient::dial(&url, &opts).await.is_err());
    }

    #[tokio::test]
    async fn dial_waits_for_a_late_listener() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let late = url.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut rx = PipelineRx::listen(&late, OPEN).await.unwrap();
            rx.recv(Some(T)).await.unwrap().to_vec()
        });
        let mut tx = PipelineTx::dial(&url, &fast()).await.unwrap();
        tx.send(b"late").await.unwrap();
        assert_eq!(server.await.unwrap(), b"late");
    }

    #[tokio::test]
    async fn req_rep_round_trip() {
        let server = Arc::new(
            ControlServer::listen("tcp://127.0.0.1:0", OPEN)
                .await
                .unwrap(),
        );
        let url = server.url().to_string();
        let s = Arc::clone(&server);
        let serving = tokio::spawn(async move {
            for _ in 0..3 {
                s.serve_one(Some(T), |req| async move {
                    let mut r = b"re: ".to_vec();
                    r.extend_from_slice(&req);
                    r
                })
                .await
                .unwrap();
            }
        });
        let client = ControlClient::dial(&url, &fast()).await.unwrap();
        for msg in [&b"hello"[..], b"plan", b""] {
            let reply = client.request(msg, T).await.unwrap();
            assert_eq!(&reply[..4], b"re: ");
            assert_eq!(&reply[4..], msg);
        }
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn serve_loop_answers_concurrent_requests() {
        let server = Arc::new(
            ControlServer::listen("tcp://127.0.0.1:0", OPEN)
                .await
                .unwrap(),
        );
        let url = server.url().to_string();
        let s = Arc::clone(&server);
        let serving = tokio::spawn(async move {
            s.serve(
                4,
                |req| async move { Some(req.iter().rev().copied().collect()) },
            )
            .await
        });
        let client = Arc::new(ControlClient::dial(&url, &fast()).await.unwrap());
        let mut handles = Vec::new();
        for i in 0..8u8 {
            let c = Arc::clone(&client);
            handles.push(tokio::spawn(async move {
                let reply = c.request(&[i, 1, 2], T).await.unwrap();
                assert_eq!(&reply[..], &[2, 1, i]);
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        serving.abort();
    }

    #[tokio::test]
    async fn request_to_dead_peer_times_out() {
        let server = ControlServer::listen("tcp://127.0.0.1:0", OPEN)
            .await
            .unwrap();
        let url = server.url().to_string();
        let client = ControlClient::dial(&url, &fast()).await.unwrap();
        drop(server);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = std::time::Instant::now();
        let err = client
            .request(b"anyone?", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn request_to_silent_peer_times_out() {
        // The server is up but never answers.
        let server = ControlServer::listen("tcp://127.0.0.1:0", OPEN)
            .await
            .unwrap();
        let client = ControlClient::dial(server.url(), &fast()).await.unwrap();
        let err = client
            .request(b"hello", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn works_on_multi_thread_runtime() {
        let mut rx = PipelineRx::listen("tcp://127.0.0.1:0", OPEN).await.unwrap();
        let mut tx = PipelineTx::dial(rx.url(), &fast()).await.unwrap();
        let h = tokio::spawn(async move {
            tx.send(b"x").await.unwrap();
            tx
        });
        assert_eq!(&rx.recv(Some(T)).await.unwrap()[..], b"x");
        drop(h.await.unwrap());
        drop(rx);
    }
}
