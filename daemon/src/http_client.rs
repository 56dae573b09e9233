//! The HTTP client of exo's own commands (`exo status`, `exo bench-serve`,
//! `exo bench-client`) to a running `exo serve`: HTTP/1.1 on hyper, one request per
//! connection, the body read as it arrives (for server-sent events).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long [`get_text_blocking`] waits for the whole answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A response whose body has not been read yet.
pub struct Response(hyper::Response<Incoming>);

impl Response {
    pub fn status(&self) -> StatusCode {
        self.0.status()
    }

    /// The status as the server's first line says it ("HTTP/1.1 200 OK").
    pub fn status_line(&self) -> String {
        format!("{:?} {}", self.0.version(), self.0.status())
    }

    /// The next piece of the body as it arrives; None at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        while let Some(frame) = self.0.body_mut().frame().await {
            if let Ok(data) = frame.context("reading the response")?.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    /// The whole body as text.
    pub async fn text(self) -> Result<String> {
        let body = self
            .0
            .into_body()
            .collect()
            .await
            .context("reading the response")?;
        Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    }
}

/// GET `path` from the server at `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    send(addr, Method::GET, path, None).await
}

/// POST `body` as JSON to `path` of the server at `addr`.
pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Result<Response> {
    send(addr, Method::POST, path, Some(body.to_string())).await
}

/// GET `path` and read the whole body, whatever the status, within a few seconds
/// (for commands that do not run an async runtime).
pub fn get_text_blocking(addr: SocketAddr, path: &str) -> Result<String> {
    let timeout = ANSWER_TIMEOUT;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        tokio::time::timeout(timeout, async { get(addr, path).await?.text().await })
            .await
            .with_context(|| format!("no answer from exo serve at {addr} within {timeout:?}"))?
    })
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    json: Option<String>,
) -> Result<Response> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    let connecting = || format!("connecting to exo serve at {addr} (is it running?)");
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(std::io::Error::from)
        .and_then(|connected| connected)
        .with_context(connecting)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(connecting)?;
    // Drives the connection until the response has been read (errors reach the reader).
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONNECTION, "close");
    let request = match json {
        Some(body) => request
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body))),
        None => request.body(Full::new(Bytes::new())),
    }?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("{path} at {addr}"))?;
    Ok(Response(response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server that answers one connection with `answer` (in pieces, `gap` apart);
    /// returns its address and the request it read.
    async fn one_shot(
        answer: &'static [&'static [u8]],
        gap: Duration,
    ) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read");
                request.extend_from_slice(&buf[..n]);
            }
            for piece in answer {
                s.write_all(piece).await.expect("write");
                s.flush().await.expect("flush");
                tokio::time::sleep(gap).await;
            }
            String::from_utf8_lossy(&request).into_owned()
        });
        (addr, served)
    }

    #[tokio::test]
    async fn a_body_is_read_whatever_the_status() {
        let answer: &[&[u8]] =
            &[b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"];
        let (addr, served) = one_shot(answer, Duration::ZERO).await;
        let response = get(addr, "/health").await.expect("response");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.status_line(), "HTTP/1.1 503 Service Unavailable");
        assert_eq!(response.text().await.expect("body"), "busy");
        let request = served.await.expect("server");
        assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
        assert!(
            request.to_lowercase().contains(&format!("host: {addr}")),
            "{request}"
        );
    }

    #[tokio::test]
    async fn a_streamed_body_arrives_in_pieces() {
        let answer: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\ndata:\r\n",
            b"4\r\n 1\n\n\r\n0\r\n\r\n",
        ];
        let (addr, served) = one_shot(answer, Duration::from_millis(30)).await;
        let mut response = post_json(addr, "/v1/completions", &serde_json::json!({"a": 1}))
            .await
            .expect("response");
        let mut pieces = Vec::new();
        while let Some(chunk) = response.chunk().await.expect("chunk") {
            pieces.push(chunk);
        }
        assert_eq!(pieces.len(), 2, "{pieces:?}");
        assert_eq!(pieces.concat(), b"data: 1\n\n");
        let request = served.await.expect("server");
        assert!(request.starts_with("POST /v1/completions HTTP/1.1\r\n"));
        assert!(request
            .to_lowercase()
            .contains("content-type: application/json"));
    }

    #[test]
    fn a_server_that_is_not_running_is_named() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let unspecified = SocketAddr::from(([0, 0, 0, 0], addr.port()));
        let e = get_text_blocking(unspecified, "/health").expect_err("refused");
        assert!(
            format!("{e:#}").starts_with(&format!(
                "connecting to exo serve at {addr} (is it running?)"
            )),
            "{e:#}"
        );
    }
}
