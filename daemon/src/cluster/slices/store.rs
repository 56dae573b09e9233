//! The worker's side of a slice: a sparse copy of the head's model file in
//! `[model] cache_dir`, the chunks the plan needs verified against the hashes the
//! head's offer gives for them (the part of its manifest this worker needs).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    from_runs, Chunking, SliceError, HASHES_PER_OFFER, MAX_CHUNK, MAX_FILE_CHUNKS, MIN_CHUNK,
};
use crate::cluster::proto::SliceOffer;

/// A model id is a BLAKE3 hash in hex.
fn is_model_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The slice file of model `model_hash` in `dir`.
pub fn slice_path(dir: &Path, model_hash: &str) -> PathBuf {
    dir.join(format!("{model_hash}.gguf"))
}

/// The id of the slice kept in `dir`, if there is one (the newest).
pub fn kept_slice(dir: &Path) -> Option<String> {
    let mut found: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".gguf").filter(|id| is_model_id(id))?;
            let mtime = e.metadata().ok()?.modified().ok()?;
            Some((mtime, id.to_string()))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, id)| id)
}

/// One model's slice on this node.
pub struct SliceStore {
    model_hash: String,
    path: PathBuf,
    file: File,
    chunking: Chunking,
    /// The chunks the current plan needs, sorted.
    need: Vec<u32>,
    /// The hash of each needed chunk (beside `need`), once its offer page came.
    hashes: Vec<Option<[u8; 32]>>,
    /// The hash each needed chunk was checked against since this process opened
    /// the slice (beside `need`): it is held while that is still its hash.
    verified: Vec<Option<[u8; 32]>>,
}

impl SliceStore {
    /// Opens (or creates) the slice `offer` describes in `dir` and takes its page of
    /// hashes; slices of other models there are removed.
    pub fn open(dir: &Path, offer: &SliceOffer) -> Result<SliceStore, SliceError> {
        let checked = check_offer(offer)?;
        std::fs::create_dir_all(dir).map_err(SliceError::io("creating", dir))?;
        remove_other_slices(dir, &offer.model_hash);
        let path = slice_path(dir, &offer.model_hash);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(SliceError::io("opening", &path))?;
        let len = file
            .metadata()
            .map_err(SliceError::io("reading", &path))?
            .len();
        if len != offer.chunking.file_size {
            // holes where nothing was received yet
            file.set_len(offer.chunking.file_size)
                .map_err(SliceError::io("sizing", &path))?;
        }
        let mut store = SliceStore {
            model_hash: offer.model_hash.clone(),
            path,
            file,
            chunking: offer.chunking,
            need: Vec::new(),
            hashes: Vec::new(),
            verified: Vec::new(),
        };
        store.take(checked)?;
        Ok(store)
    }

    /// Takes another offer page for the same model (the next page, or another plan).
    pub fn reoffer(&mut self, offer: &SliceOffer) -> Result<(), SliceError> {
        let checked = check_offer(offer)?;
        if offer.model_hash != self.model_hash || offer.chunking != self.chunking {
            return Err(SliceError::BadOffer(
                "another model's offer for this slice".into(),
            ));
        }
        self.take(checked)
    }

    /// A first page starts a new plan's need (what was checked stays checked); every
    /// page fills in its hashes.
    fn take(&mut self, offer: CheckedOffer) -> Result<(), SliceError> {
        if offer.hashes_from == 0 {
            let verified = offer
                .need
                .iter()
                .map(|c| {
                    self.need
                        .binary_search(c)
                        .ok()
                        .and_then(|j| self.verified[j])
                })
                .collect();
            self.hashes = vec![None; offer.need.len()];
            self.verified = verified;
            self.need = offer.need;
        } else if offer.need != self.need {
            return Err(SliceError::BadOffer(
                "a page of another offer's hashes".into(),
            ));
        }
        let pages = self.hashes[offer.hashes_from..].iter_mut();
        for (slot, hash) in pages.zip(offer.hashes) {
            *slot = Some(hash);
        }
        Ok(())
    }

    /// Whether every needed chunk's hash came (the offer's last page did).
    pub fn has_every_hash(&self) -> bool {
        self.hashes.iter().all(Option::is_some)
    }

    pub fn model_hash(&self) -> &str {
        &self.model_hash
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether needed chunk `j` (in `need`'s order) is held.
    fn held(&self, j: usize) -> bool {
        self.verified[j].is_some() && self.verified[j] == self.hashes[j]
    }

    /// The needed chunks not yet held: each needed chunk not verified since this
    /// process opened the slice is read from disk and checked (a damaged or missing
    /// one is missing).
    pub fn missing(&mut self) -> Result<Vec<u32>, SliceError> {
        if !self.has_every_hash() {
            return Err(SliceError::BadOffer(
                "the offer's pages did not give every needed chunk's hash".into(),
            ));
        }
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for j in 0..self.need.len() {
            if self.held(j) {
                continue;
            }
            let i = self.need[j];
            let r = self.chunking.chunk_range(i);
            buf.resize((r.end - r.start) as usize, 0);
            let read =
                !is_hole(&self.file, &r) && self.file.read_exact_at(&mut buf, r.start).is_ok();
            let hash = read.then(|| *blake3::hash(&buf).as_bytes());
            self.verified[j] = hash.filter(|h| Some(h) == self.hashes[j].as_ref());
            if self.verified[j].is_none() {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Bytes of the needed chunks, and of those held.
    pub fn needed_bytes(&self) -> (u64, u64) {
        let held: Vec<u32> = (0..self.need.len())
            .filter(|&j| self.held(j))
            .map(|j| self.need[j])
            .collect();
        (
            self.chunking.bytes_of(&self.need),
            self.chunking.bytes_of(&held),
        )
    }

    /// Stores chunk `i` if it matches its hash.
    pub fn write(&mut self, i: u32, bytes: &[u8]) -> Result<(), SliceError> {
        self.write_hashed(i, bytes, blake3::hash(bytes).as_bytes())
    }

    /// Stores chunk `i`, whose BLAKE3 hash is `hash`, if it is a needed chunk of
    /// that hash and length.
    pub fn write_hashed(
        &mut self,
        i: u32,
        bytes: &[u8],
        hash: &[u8; 32],
    ) -> Result<(), SliceError> {
        let Ok(j) = self.need.binary_search(&i) else {
            return Err(SliceError::Unasked(i));
        };
        let r = self.chunking.chunk_range(i);
        if bytes.len() as u64 != r.end - r.start || self.hashes[j].as_ref() != Some(hash) {
            return Err(SliceError::Mismatch {
                index: i,
                got: bytes.len(),
            });
        }
        self.file
            .write_all_at(bytes, r.start)
            .map_err(SliceError::io("writing", &self.path))?;
        self.verified[j] = Some(*hash);
        Ok(())
    }

    /// Whether every needed chunk is held; then the data is flushed to disk.
    pub fn complete(&self) -> Result<bool, SliceError> {
        if !self.has_every_hash() || (0..self.need.len()).any(|j| !self.held(j)) {
            return Ok(false);
        }
        self.file
            .sync_data()
            .map_err(SliceError::io("flushing", &self.path))?;
        Ok(true)
    }
}

/// Whether bytes `r` of `file` were never written (a hole: nothing to read or hash).
fn is_hole(file: &File, r: &std::ops::Range<u64>) -> bool {
    use nix::unistd::{lseek, Whence};
    let Ok(start) = i64::try_from(r.start) else {
        return false;
    };
    match lseek(file, start, Whence::SeekData) {
        Ok(data) => data as u64 >= r.end,
        // no data after `start`
        Err(nix::errno::Errno::ENXIO) => true,
        Err(_) => false,
    }
}

/// An offer page, checked: its needed chunks and its hashes as bytes.
pub(crate) struct CheckedOffer {
    pub need: Vec<u32>,
    pub hashes_from: usize,
    pub hashes: Vec<[u8; 32]>,
}

/// Checks an offer page: a model id, a chunking within bounds, needed chunks inside
/// the file, at most [`HASHES_PER_OFFER`] hashes, all of needed chunks.
pub(crate) fn check_offer(offer: &SliceOffer) -> Result<CheckedOffer, SliceError> {
    let bad = |m: &str| Err(SliceError::BadOffer(m.into()));
    if !is_model_id(&offer.model_hash) {
        return bad("the model id is not a BLAKE3 hash");
    }
    let c = &offer.chunking;
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&c.chunk_size) {
        return bad("chunk size out of bounds");
    }
    let n = c.n_chunks();
    if n == 0 || n > MAX_FILE_CHUNKS {
        return bad("the file size is out of bounds");
    }
    let Some(need) = from_runs(&offer.need, n as u32) else {
        return bad("a needed chunk outside the file");
    };
    let from = offer.hashes_from as usize;
    if offer.hashes.len() > HASHES_PER_OFFER || from + offer.hashes.len() > need.len() {
        return bad("the hashes do not match the needed chunks");
    }
    let mut hashes = Vec::with_capacity(offer.hashes.len());
    for h in &offer.hashes {
        match blake3::Hash::from_hex(h) {
            Ok(h) => hashes.push(*h.as_bytes()),
            Err(_) => return bad("a hash is not BLAKE3 hex"),
        }
    }
    Ok(CheckedOffer {
        need,
        hashes_from: from,
        hashes,
    })
}

/// Removes the slices (and nothing else) of models other than `keep` from `dir`.
fn remove_other_slices(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".gguf") else {
            continue;
        };
        if is_model_id(id) && id != keep {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!("removed the slice of model {} (replaced)", &id[..12]),
                Err(err) => tracing::warn!("removing {}: {err}", e.path().display()),
            }
        }
    }
}
