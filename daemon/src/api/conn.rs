//! Accepting connections within limits: at most `max_connections` served at once
//! (kept below the open-files limit, so that `accept` itself never fails for want of
//! descriptors), and at most `max_connections_per_ip` from one client address; one
//! more is answered with a short 503 and closed. Each connection
//! must send its request headers within `header_timeout` (which also bounds how long
//! an idle kept-alive connection is held) and its body within `body_timeout`
//! (`read_body` in the parent module). A response write that makes no progress for
//! `write_timeout` (a client that stopped reading) closes the connection, which drops
//! the response body and so cancels its generation; each connection's kernel send
//! buffer is bounded so that such a client stalls the writes soon.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use super::metrics::Metrics;
use super::{handle, ApiError, App};
use crate::config::{
    DEFAULT_BODY_TIMEOUT_SECS, DEFAULT_HEADER_TIMEOUT_SECS, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_WRITE_TIMEOUT_SECS,
};

/// How many connections the server holds and how long it waits for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Connections served at once from one client address (0: no limit); one more is
    /// answered 503 and closed.
    pub max_connections_per_ip: usize,
    /// A request's headers must arrive within this; a kept-alive connection is closed
    /// when no next request starts within it.
    pub header_timeout: Duration,
    /// A request's body must arrive within this (408 otherwise, and the connection is
    /// closed).
    pub body_timeout: Duration,
    /// A response write that makes no progress for this long closes the connection
    /// (and cancels the generation behind a stream).
    pub write_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS),
            body_timeout: Duration::from_secs(DEFAULT_BODY_TIMEOUT_SECS),
            write_timeout: Duration::from_secs(DEFAULT_WRITE_TIMEOUT_SECS),
        }
    }
}

/// Descriptors kept free besides the connections: the model file, logs, the runtime,
/// the cluster's sockets and the connections being refused.
const RESERVED_FDS: u64 = 256;

/// Connections being refused (answered 503, then drained briefly) at once; beyond
/// that one is closed right after its 503 is written.
const MAX_REFUSING: usize = 64;

/// How long a refused connection is drained, so that the client reads the 503.
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// The largest buffer a connection reads into: request headers fit (8 KiB by
/// hyper's minimum and more), a slow client cannot make it grow to hyper's 400 KB.
const MAX_BUF_BYTES: usize = 64 << 10;

/// The kernel send buffer of a connection (Linux doubles it). Autotuned, it grows to
/// 4 MB (`tcp_wmem`): 20,000 streamed tokens that a client which stopped reading
/// leaves unsent before a write stalls. Answers are small and slow; 128 KiB still
/// fills a 1 Gbit/s link at 1 ms.
const SEND_BUFFER_BYTES: usize = 64 << 10;

/// The most connections to serve: `configured`, kept below the soft limit of open
/// files (less the reserve).
pub fn connection_limit(configured: usize, open_files: Option<u64>) -> usize {
    let by_fds = open_files.map_or(usize::MAX, |n| {
        usize::try_from(n.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX)
    });
    configured.min(by_fds).max(1)
}

/// Serves HTTP on `listener` until `shutdown` completes; then stops accepting and
/// waits for open connections to finish (the caller bounds that wait).
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = app.http;
    let max = connection_limit(limits.max_connections, crate::system::open_files_limit());
    if max < limits.max_connections {
        tracing::warn!(
            "serving at most {max} connections, not {}: the open files limit is {:?} \
             (raise LimitNOFILE)",
            limits.max_connections,
            crate::system::open_files_limit()
        );
    }
    let slots = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let per_address = Arc::new(PerAddress::new(limits.max_connections_per_ip));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF_BYTES);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let accept_failed = crate::log_every::LogEvery::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // e.g. out of descriptors all the same: keep serving
                        if let Some(n) = accept_failed.hit() {
                            tracing::warn!("{n} accept(s) failed; the latest: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(from) = per_address.admit(peer.ip()) else {
                    app.metrics.connections_refused_per_ip.fetch_add(1, Ordering::Relaxed);
                    let message = format!(
                        "this client address holds {} connections, the limit for one \
                         address; retry shortly",
                        per_address.max
                    );
                    refuse(stream, &message, &refusing);
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    app.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                    let message =
                        format!("the server holds {max} connections, its limit; retry shortly");
                    refuse(stream, &message, &refusing);
                    continue;
                };
                let app = app.clone();
                let svc = {
                    let app = app.clone();
                    service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(handle(app, req).await) }
                    })
                };
                // a refusal to bound it only costs the autotuned buffer back
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_BYTES);
                let io = WriteDeadline::new(stream, limits.write_timeout, app.metrics.clone());
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), svc));
                tokio::spawn(async move {
                    let metrics = &app.metrics;
                    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = conn.await {
                        if e.is_timeout() {
                            metrics.client_timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!("connection from {peer}: {e}");
                    }
                    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                    drop((slot, from));
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(app.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {:?}; closing",
            app.drain_timeout
        );
    }
    Ok(())
}

/// Connections open per client address (IPv4-mapped IPv6 counted as IPv4).
struct PerAddress {
    /// At most this many from one address (0: no limit).
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of an address, counted until dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn new(max: usize) -> PerAddress {
        PerAddress {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection from `ip`; None when it holds `max` already.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A connection whose writes fail with `TimedOut` once one has made no progress for
/// `timeout`: hyper then closes the connection and drops the response body.
struct WriteDeadline {
    stream: TcpStream,
    timeout: Duration,
    /// Set while a write is pending: when it fires, the write has stalled.
    stalled: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
    metrics: Arc<Metrics>,
}

impl WriteDeadline {
    fn new(stream: TcpStream, timeout: Duration, metrics: Arc<Metrics>) -> WriteDeadline {
        WriteDeadline {
            stream,
            timeout,
            stalled: None,
            timed_out: false,
            metrics,
        }
    }

    /// `r`, or the timeout error when the write has been pending for too long.
    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading");
        if self.timed_out {
            return Poll::Ready(Err(stalled()));
        }
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timed_out = true;
        self.metrics.write_timeouts.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("a response write made no progress for {timeout:?}: closing");
        Poll::Ready(Err(stalled()))
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progress(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    /// A TCP stream's flush does nothing (and is no progress of a stalled write).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The whole HTTP answer to a connection beyond a limit.
fn refusal(message: &str) -> Vec<u8> {
    let error = ApiError::unavailable("too_many_connections", message);
    let body = error.body_json().to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a connection beyond a limit with a 503 and closes it. The answer goes
/// into the fresh socket's empty send buffer at once; then, if few connections are
/// being refused, the client's request is drained for a moment (closing a socket
/// with unread data sends a reset, which can discard the answer at the client).
fn refuse(mut stream: TcpStream, message: &str, refusing: &Arc<Semaphore>) {
    let _ = stream.try_write(&refusal(message));
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _ = stream.shutdown().await;
        let drain = async {
            let mut buf = [0u8; 4096];
            let mut left: usize = 64 << 10;
            while left > 0 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(REFUSE_LINGER, drain).await;
        drop(permit);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_stays_below_the_open_files_limit() {
        assert_eq!(connection_limit(512, None), 512);
        assert_eq!(connection_limit(512, Some(65536)), 512);
        assert_eq!(connection_limit(2000, Some(1024)), 1024 - 256);
        assert_eq!(connection_limit(512, Some(100)), 1);
    }

    #[test]
    fn the_refusal_is_one_complete_http_answer() {
        let r = String::from_utf8(refusal("the server holds 7 connections")).expect("utf-8");
        let (head, body) = r.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("\r\nretry-after: 1"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "too_many_connections");
        assert_eq!(v["error"]["message"], "the server holds 7 connections");
    }

    #[test]
    fn an_address_holds_at_most_its_share() {
        let table = Arc::new(PerAddress::new(2));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = table.admit(a).expect("first");
        let second = table.admit(mapped).expect("second, the same address");
        assert!(table.admit(a).is_none());
        let other = table.admit(b).expect("another address");
        drop(first);
        let third = table.admit(a).expect("a slot freed");
        drop((second, third, other));
        assert!(table.open.lock().expect("lock").is_empty());
        let open = Arc::new(PerAddress::new(0));
        let many: Vec<_> = (0..100).map(|_| open.admit(a).expect("no limit")).collect();
        assert_eq!(many.len(), 100);
    }
}
