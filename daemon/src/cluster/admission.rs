//! What a peer can make a node hold before any of its frames is authenticated: nng
//! buffers a whole message before exo sees it, so every socket gets a receive cap (a
//! peer announcing a longer message is disconnected before nng allocates anything),
//! and every listening socket a cap on its connections at a time. The nng calls are in
//! `ggml_shim::nng`; `anng` keeps nng's ids of its sockets to itself, so they are read
//! from its Debug output here and checked against nng (protocol, bound port).

use std::sync::{Arc, Mutex, OnceLock};

use anng::pipes::Listener;
use anng::Socket;
use ggml_shim::nng::{self, ConnectionGate, NngError, Refusal};

use crate::log_every::LogEvery;

/// Room for the SP protocol's own header in front of a message (REQ/REP carry a
/// 4-byte request id): added to every cap.
pub const SP_HEADER_ROOM: usize = 64;
/// The cap of a socket that receives nothing (a PUSH socket): nng takes 0 as no cap.
pub const RECEIVES_NOTHING: usize = 64;
/// Connections a listener admits beyond one per peer of the cluster.
pub const SPARE_CONNECTIONS: usize = 4;

/// nng's protocol numbers of the sockets exo opens.
pub mod proto {
    pub const PUSH0: u16 = 0x50;
    pub const PULL0: u16 = 0x51;
    pub const REQ0: u16 = 0x30;
    pub const REP0: u16 = 0x31;
}

/// What a listening socket admits before anything it receives is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The longest frame taken (the SP header's room is added).
    pub recv_max: usize,
    /// Connections at a time; further ones are refused as they arrive.
    pub max_conns: usize,
}

impl Admission {
    /// A listener of a cluster of `n_peers` nodes: one connection per peer and a few
    /// spare (a peer that restarts reconnects before its old connection is noticed gone).
    pub fn cluster(n_peers: usize, recv_max: usize) -> Admission {
        Admission {
            recv_max,
            max_conns: n_peers.saturating_add(SPARE_CONNECTIONS),
        }
    }
}

/// nng refused to apply a limit, or anng's Debug output no longer shows nng's ids.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error(transparent)]
    Nng(#[from] NngError),
    #[error("cannot find nng's id of the {0} (anng's Debug output changed?)")]
    NoId(&'static str),
    #[error("nng's id {id} is not this {what}'s")]
    WrongId { what: &'static str, id: u32 },
}

/// The number after `after` in `debug`.
fn id_after(debug: &str, after: &str) -> Option<u32> {
    let rest = &debug[debug.find(after)? + after.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// nng's id of an anng socket of protocol `protocol` (anng 0.2.0-v2pre.4 shows it as
/// `Socket { socket: nng_socket_s { _bindgen_opaque_blob: 7 }, … }`).
pub fn socket_id<P>(socket: &Socket<P>, protocol: u16) -> Result<u32, AdmissionError> {
    let debug = format!("{socket:?}");
    let id = id_after(
        &debug,
        "Socket { socket: nng_socket_s { _bindgen_opaque_blob: ",
    )
    .ok_or(AdmissionError::NoId("socket"))?;
    if nng::socket_protocol(id)? != protocol {
        return Err(AdmissionError::WrongId { what: "socket", id });
    }
    Ok(id)
}

/// nng's id of an anng listener bound to TCP port `port` (shown as
/// `listener: nng_listener_s { _bindgen_opaque_blob: 9 }`).
pub fn listener_id<P>(listener: &Listener<'_, P>, port: u16) -> Result<u32, AdmissionError> {
    let debug = format!("{listener:?}");
    let id = id_after(&debug, "listener: nng_listener_s { _bindgen_opaque_blob: ")
        .ok_or(AdmissionError::NoId("listener"))?;
    if nng::listener_port(id)? != port {
        return Err(AdmissionError::WrongId {
            what: "listener",
            id,
        });
    }
    Ok(id)
}

/// This node's listening sockets by plane ("data", "control"), whose refusals
/// `/metrics` counts; clones share the list.
#[derive(Debug, Clone, Default)]
pub struct Listeners(Arc<Mutex<Vec<(&'static str, RecvCap)>>>);

impl Listeners {
    pub fn add(&self, plane: &'static str, cap: RecvCap) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((plane, cap));
    }

    /// Connections refused so far, by plane (each once, in the order added).
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for (plane, cap) in list.iter() {
            match out.iter_mut().find(|(p, _)| p == plane) {
                Some((_, n)) => *n += cap.refused(),
                None => out.push((plane, cap.refused())),
            }
        }
        out
    }
}

/// A listening socket's gate: the cap on its connections and its listener's receive
/// cap, which can follow the plan ([`RecvCap::set`]). Clones share the gate.
#[derive(Debug, Clone)]
pub struct RecvCap(Arc<Gate>);

#[derive(Debug)]
struct Gate {
    gate: ConnectionGate,
    /// Set once the socket listens.
    listener: OnceLock<u32>,
    /// The frame cap, without the SP header's room.
    recv_max: Mutex<usize>,
    url: Arc<OnceLock<String>>,
}

impl RecvCap {
    /// Caps socket `socket_id` (not listening yet) as `admission` says; `what` names it
    /// in the refusal lines ("control plane").
    pub fn install(
        socket_id: u32,
        admission: Admission,
        what: &'static str,
    ) -> Result<RecvCap, AdmissionError> {
        let bytes = admission.recv_max.saturating_add(SP_HEADER_ROOM);
        nng::set_socket_recv_max(socket_id, bytes)?;
        let url: Arc<OnceLock<String>> = Arc::default();
        let log = LogEvery::default();
        let where_ = url.clone();
        let hook = Box::new(move |r: &Refusal| {
            if let Some(n) = log.hit() {
                tracing::warn!(
                    "{what} {}: refused {n} connection(s) (at most {} at a time; the latest from {}, {} in all)",
                    where_.get().map_or("", String::as_str),
                    r.max,
                    r.peer,
                    r.total
                );
            }
        });
        let gate = ConnectionGate::install(socket_id, admission.max_conns, bytes, hook)?;
        Ok(RecvCap(Arc::new(Gate {
            gate,
            listener: OnceLock::new(),
            recv_max: Mutex::new(admission.recv_max),
            url,
        })))
    }

    /// The socket listens now: on `listener_id`, at `url`.
    pub fn listening(&self, listener_id: u32, url: &str) {
        let _ = self.0.listener.set(listener_id);
        let _ = self.0.url.set(url.to_string());
    }

    /// The frame cap now.
    pub fn get(&self) -> usize {
        *self.0.recv_max.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Caps the frames of connections accepted from now on at `recv_max` bytes; those
    /// accepted under another cap are closed (their dialers reconnect under this one).
    pub fn set(&self, recv_max: usize) -> Result<(), AdmissionError> {
        let Some(&listener) = self.0.listener.get() else {
            return Err(AdmissionError::NoId("listener"));
        };
        let mut cap = self.0.recv_max.lock().unwrap_or_else(|e| e.into_inner());
        let closed = self
            .0
            .gate
            .set_recv_max(listener, recv_max.saturating_add(SP_HEADER_ROOM))?;
        *cap = recv_max;
        tracing::debug!(
            "{}: frames up to {recv_max} bytes ({closed} connection(s) reset to take it)",
            self.0.url.get().map_or("", String::as_str)
        );
        Ok(())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.0.gate.open()
    }

    /// Connections open now under the current cap (not yet reset after a change).
    pub fn open_under_cap(&self) -> usize {
        self.0.gate.open_under_current_cap()
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.0.gate.refused()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn ids_are_read_after_their_field() {
        let s = "Socket { socket: nng_socket_s { _bindgen_opaque_blob: 17 }, aio: Aio }";
        assert_eq!(
            id_after(s, "Socket { socket: nng_socket_s { _bindgen_opaque_blob: "),
            Some(17)
        );
        assert_eq!(id_after(s, "listener: nng_listener_s {"), None);
        assert_eq!(id_after("x: ", "x: "), None);
    }

    use crate::cluster::transport::{ControlClient, ControlServer, PipelineRx, PipelineTx};
    use crate::cluster::transport::{DialOptions, Listening};

    const T: Duration = Duration::from_secs(5);

    fn fast() -> DialOptions {
        DialOptions {
            connect_timeout: T,
            retry_interval: Duration::from_millis(20),
            ..DialOptions::default()
        }
    }

    /// Polls `cond` for up to 5 s.
    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < T {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cond()
    }

    /// A raw TCP connection that has done the SP handshake as a `peer_proto` socket
    /// (misbehaving peers are raw: nng's own PUSH socket does not survive its
    /// connection being closed as it starts, see the report of issue 14).
    fn sp_connect(addr: std::net::SocketAddr, peer_proto: u16) -> std::net::TcpStream {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(T)).expect("timeout");
        let p = peer_proto.to_be_bytes();
        s.write_all(&[0, b'S', b'P', 0, p[0], p[1], 0, 0])
            .expect("handshake");
        let mut theirs = [0u8; 8];
        s.read_exact(&mut theirs).expect("the listener's handshake");
        assert_eq!(&theirs[..4], &[0, b'S', b'P', 0]);
        s
    }

    /// Whether the other end closed `s` (within 2 s; nothing arrives on these).
    fn closed(s: &mut std::net::TcpStream) -> bool {
        use std::io::{ErrorKind, Read};
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    /// A data plane on a free port taking frames of up to `recv_max` bytes and
    /// `max_conns` connections.
    async fn pull(recv_max: usize, max_conns: usize) -> PipelineRx {
        let admission = Admission {
            recv_max,
            max_conns,
        };
        PipelineRx::listen("tcp://127.0.0.1:0", admission)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_over_the_cap_is_dropped_with_its_connection() {
        use std::io::Write;
        let mut rx = pull(1000, 4).await;
        assert_eq!(rx.recv_cap().get(), 1000);
        let addr = rx.local_addr().unwrap();
        let mut raw = sp_connect(addr, proto::PUSH0);
        // a message just within the cap is taken
        let fits = 1000 + SP_HEADER_ROOM;
        raw.write_all(&(fits as u64).to_be_bytes()).unwrap();
        raw.write_all(&vec![1; fits]).unwrap();
        assert_eq!(rx.recv(Some(T)).await.unwrap().len(), fits);
        // one byte more: disconnected at its length, before any of it is read
        raw.write_all(&(fits as u64 + 1).to_be_bytes()).unwrap();
        assert!(closed(&mut raw), "the connection stays open");
        // so is a (1 GiB - 1) one
        let mut raw = sp_connect(addr, proto::PUSH0);
        raw.write_all(&((1u64 << 30) - 1).to_be_bytes()).unwrap();
        let _ = raw.write_all(&[0; 4096]);
        assert!(closed(&mut raw), "the connection stays open");
        let err = rx.recv(Some(Duration::from_millis(200))).await.unwrap_err();
        assert!(err.is_timeout(), "{err}");
        // and a well-behaved sender still gets through
        let mut tx = PipelineTx::dial(rx.url(), &fast()).await.unwrap();
        tx.send(&[3; 10]).await.unwrap();
        assert_eq!(&rx.recv(Some(T)).await.unwrap()[..], &[3; 10]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_cap_are_refused() {
        let mut rx = pull(1000, 2).await;
        let cap = rx.recv_cap();
        let addr = rx.local_addr().unwrap();
        let mut raws: Vec<_> = (0..4).map(|_| sp_connect(addr, proto::PUSH0)).collect();
        assert!(
            eventually(|| cap.refused() == 2).await,
            "refused {}",
            cap.refused()
        );
        assert_eq!(cap.open(), 2);
        let refused = raws.iter_mut().map(closed).filter(|&c| c).count();
        assert_eq!(refused, 2, "connections closed by the listener");
        // room again once they go
        raws.clear();
        assert!(eventually(|| cap.open() == 0).await, "open {}", cap.open());
        let mut tx = PipelineTx::dial(rx.url(), &fast()).await.unwrap();
        tx.send(b"x").await.unwrap();
        assert_eq!(&rx.recv(Some(T)).await.unwrap()[..], b"x");
        assert_eq!(cap.refused(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_cap_resets_connections_taken_under_another() {
        let mut rx = pull(100, 4).await;
        let cap = rx.recv_cap();
        let mut tx = PipelineTx::dial(rx.url(), &fast()).await.unwrap();
        assert!(eventually(|| cap.open() == 1).await);
        cap.set(10_000).unwrap();
        assert_eq!(cap.get(), 10_000);
        // the old connection (capped at 100) is reset, the sender reconnects, and the
        // new connection takes 5000 bytes
        assert!(eventually(|| cap.open_under_cap() == 1).await);
        tx.send(&[7; 5000]).await.unwrap();
        let got = rx.recv(Some(T)).await.unwrap();
        assert_eq!(got.len(), 5000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_left_unanswered_times_out_and_the_server_goes_on() {
        let admission = Admission {
            recv_max: 1000,
            max_conns: 4,
        };
        let server = Arc::new(
            ControlServer::listen("tcp://127.0.0.1:0", admission)
                .await
                .unwrap(),
        );
        let s = server.clone();
        let serving = tokio::spawn(async move {
            s.serve(2, |req| async move {
                (&req[..] != b"drop").then(|| req.to_vec())
            })
            .await
        });
        let client = ControlClient::dial(server.url(), &fast()).await.unwrap();
        assert!(eventually(|| client.connected()).await);
        let err = client
            .request(b"drop", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert_eq!(&client.request(b"hi", T).await.unwrap()[..], b"hi");
        serving.abort();
        drop(server);
        assert!(eventually(|| !client.connected()).await);
    }

    #[tokio::test]
    async fn ids_that_name_nothing_are_errors() {
        // a socket first: nng is initialised
        let rx = pull(100, 1).await;
        let cap = rx.recv_cap();
        assert!(nng::socket_protocol(u32::MAX - 7).is_err());
        assert!(nng::set_socket_recv_max(u32::MAX - 7, 10).is_err());
        assert!(nng::set_listener_recv_max(u32::MAX - 7, 10).is_err());
        assert!(nng::listener_port(u32::MAX - 7).is_err());
        assert_eq!(cap.get(), 100);
    }
}
