//! A worker without a model file: takes the head's offers and chunks into its
//! [`SliceStore`], shows the transfer's progress, and opens the slice as the model
//! once every chunk the plan needs is held and verified.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::store::{kept_slice, SliceStore};
use super::{progress_figures, to_runs, Progress, SliceError};
use crate::cluster::proto::{SliceOffer, SliceStatus};
use crate::model::ModelFile;

/// How often the progress line and the log are updated.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// A transfer under way (for its progress line).
struct Transfer {
    from: String,
    layers: String,
    start: Instant,
    last_report: Instant,
    /// Bytes to receive, and received.
    total: u64,
    done: u64,
}

impl Transfer {
    /// "receiving layers 9..18 from a: 0.1 of 0.2 GB, 48 MB/s".
    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        format!(
            "receiving layers {} from {}: {}",
            self.layers,
            self.from,
            progress_figures(self.done, self.total, secs)
        )
    }
}

/// The slices of one worker.
pub struct Receiver {
    dir: PathBuf,
    store: Option<SliceStore>,
    /// The slice opened as a model (once complete), with the id it was opened for.
    model: Option<Arc<ModelFile>>,
    transfer: Option<Transfer>,
    progress: Progress,
}

impl Receiver {
    pub fn new(dir: PathBuf, progress: Progress) -> Receiver {
        Receiver {
            dir,
            store: None,
            model: None,
            transfer: None,
            progress,
        }
    }

    /// The model id of the slice this node holds (empty when none), for its hello.
    pub fn model_hash(&self) -> String {
        match &self.store {
            Some(s) => s.model_hash().to_string(),
            None => kept_slice(&self.dir).unwrap_or_default(),
        }
    }

    /// Takes an offer page: opens (or keeps) the slice and, once the last page came,
    /// answers with what it misses.
    pub fn offer(&mut self, offer: &SliceOffer) -> Result<SliceStatus, SliceError> {
        match self.store.as_mut() {
            Some(s) if s.model_hash() == offer.model_hash => s.reoffer(offer)?,
            _ => {
                self.model = None;
                self.store = Some(SliceStore::open(&self.dir, offer)?);
            }
        }
        let Some(store) = self.store.as_mut() else {
            return Err(SliceError::BadOffer("no slice".into()));
        };
        if !store.has_every_hash() {
            // a page of hashes before the last: nothing to tell yet
            return Ok(SliceStatus {
                missing: Vec::new(),
                need_bytes: 0,
                have_bytes: 0,
            });
        }
        let t0 = Instant::now();
        let missing = store.missing()?;
        let (need_bytes, have_bytes) = store.needed_bytes();
        tracing::info!(
            "slice of layers {} from {}: holds {:.1} of {:.1} MB (checked in {:.1} s), {} chunks to receive",
            offer.layers,
            offer.from,
            have_bytes as f64 / 1e6,
            need_bytes as f64 / 1e6,
            t0.elapsed().as_secs_f64(),
            missing.len()
        );
        self.transfer = (!missing.is_empty()).then(|| Transfer {
            from: offer.from.clone(),
            layers: offer.layers.clone(),
            start: Instant::now(),
            last_report: Instant::now(),
            total: need_bytes - have_bytes,
            done: 0,
        });
        self.progress
            .set(self.transfer.as_ref().map(Transfer::line));
        Ok(SliceStatus {
            missing: to_runs(&missing),
            need_bytes,
            have_bytes,
        })
    }

    /// Takes chunk `index` of BLAKE3 hash `hash` (computed when its frame was
    /// opened); a chunk that does not match its offered hash is refused.
    pub fn chunk(
        &mut self,
        index: u32,
        bytes: &[u8],
        hash: &[u8; 32],
    ) -> Result<SliceStatus, SliceError> {
        let Some(store) = self.store.as_mut() else {
            return Err(SliceError::Unasked(index));
        };
        store.write_hashed(index, bytes, hash)?;
        let (need_bytes, have_bytes) = store.needed_bytes();
        if let Some(t) = self.transfer.as_mut() {
            t.done += bytes.len() as u64;
            let finished = t.done >= t.total;
            if finished || t.last_report.elapsed() >= REPORT_EVERY {
                t.last_report = Instant::now();
                let line = t.line();
                tracing::info!("{line}");
                self.progress.set((!finished).then_some(line));
            }
            if finished {
                self.transfer = None;
            }
        }
        Ok(SliceStatus {
            missing: Vec::new(),
            need_bytes,
            have_bytes,
        })
    }

    /// The model of id `model_hash`, from the slice, once every chunk the plan needs
    /// is held and verified.
    pub fn model(&mut self, model_hash: &str) -> anyhow::Result<Arc<ModelFile>> {
        let Some(store) = self.store.as_ref().filter(|s| s.model_hash() == model_hash) else {
            anyhow::bail!(
                "this node has no model file and has not been offered its slice of model {}",
                crate::cluster::proto::short_id(model_hash)
            );
        };
        if !store.complete()? {
            anyhow::bail!("this node has not received its whole slice yet");
        }
        if let Some(mf) = &self.model {
            return Ok(mf.clone());
        }
        let mf = Arc::new(ModelFile::open(store.path())?);
        self.model = Some(mf.clone());
        Ok(mf)
    }
}
