//! The head's control client: one REQ socket per peer, every request sealed and
//! every reply opened with the cluster key.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use super::proto;
use super::transport::{ControlClient, DialOptions};
use super::wire::{FrameKey, FrameType, Limits, Opener, Sealer};
use crate::config::PeerConfig;

/// A peer's authenticated refusal of a request (its Error reply), with its reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub String);

pub(crate) struct Control {
    pub(crate) peers: Vec<(PeerConfig, ControlClient)>,
    sealer: Mutex<Sealer>,
    opener: Mutex<Opener>,
}

impl Control {
    /// Dials every peer's control socket (waiting as long as it takes them to start).
    pub(crate) async fn connect(
        peers: &[PeerConfig],
        key: &FrameKey,
        frame_stats: Arc<super::wire::OpenerStats>,
    ) -> anyhow::Result<Control> {
        let mut control = Control {
            peers: Vec::new(),
            sealer: Mutex::new(Sealer::with_random_id(key.clone())),
            opener: Mutex::new(Opener::new(key.clone()).with_stats(frame_stats)),
        };
        for p in peers {
            let url = p
                .control_address()
                .with_context(|| format!("peer {}: bad address {}", p.name, p.address))?;
            tracing::info!("waiting for peer {} at {url}", p.name);
            let options = DialOptions {
                connect_timeout: Duration::from_secs(3600),
                reply_max: Limits::control_only().max_frame_len(),
                ..DialOptions::default()
            };
            let client = ControlClient::dial(&url, &options)
                .await
                .with_context(|| format!("dialing peer {}", p.name))?;
            control.peers.push((p.clone(), client));
        }
        Ok(control)
    }

    /// One control request to a peer: sealed, sent, and the reply opened (an Error
    /// reply becomes an error).
    pub(crate) async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        client: &ControlClient,
        ft: FrameType,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> anyhow::Result<T> {
        let bytes = self.sealer()?.seal_control(ft, 0, body)?;
        self.request(client, &bytes, timeout).await
    }

    /// Chunk `index` of the model file, of BLAKE3 hash `hash`, sealed (for
    /// [`Control::request`]).
    pub(crate) fn seal_chunk(
        &self,
        index: u32,
        bytes: &[u8],
        hash: &[u8; 32],
    ) -> anyhow::Result<Vec<u8>> {
        Ok(self.sealer()?.seal_chunk(index, bytes, hash)?)
    }

    fn sealer(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Sealer>> {
        self.sealer
            .lock()
            .map_err(|_| anyhow::anyhow!("sealer poisoned"))
    }

    /// Sends a sealed frame and opens the reply (an Error reply becomes an error).
    pub(crate) async fn request<T: serde::de::DeserializeOwned>(
        &self,
        client: &ControlClient,
        frame: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<T> {
        let reply = client.request(frame, timeout).await?;
        let mut opener = self
            .opener
            .lock()
            .map_err(|_| anyhow::anyhow!("opener poisoned"))?;
        let frame = opener.open(reply.as_bytes(), &Limits::control_only())?;
        if frame.frame_type == FrameType::Error {
            let e: proto::ErrorMsg = frame.control()?;
            return Err(Refused(e.message).into());
        }
        Ok(frame.control()?)
    }
}
