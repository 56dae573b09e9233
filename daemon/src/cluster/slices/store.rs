//! The worker's side of a slice: a sparse copy of the head's model file in
//! `[model] cache_dir`, the chunks the plan needs verified against the manifest.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{from_runs, Manifest, SliceError, MAX_CHUNK, MAX_CHUNKS, MIN_CHUNK};
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
    manifest: Manifest,
    /// Chunks checked against the manifest since this process opened the slice.
    verified: Vec<bool>,
    /// The chunks the current plan needs, sorted.
    need: Vec<u32>,
}

impl SliceStore {
    /// Opens (or creates) the slice `offer` describes in `dir`; slices of other models
    /// there are removed.
    pub fn open(dir: &Path, offer: &SliceOffer) -> Result<SliceStore, SliceError> {
        let manifest = check_offer(offer)?;
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
        if len != manifest.file_size {
            // holes where nothing was received yet
            file.set_len(manifest.file_size)
                .map_err(SliceError::io("sizing", &path))?;
        }
        let n = manifest.n_chunks() as usize;
        let mut store = SliceStore {
            model_hash: offer.model_hash.clone(),
            path,
            file,
            manifest,
            verified: vec![false; n],
            need: Vec::new(),
        };
        store.need = store.needed(offer)?;
        Ok(store)
    }

    /// Takes a new offer for the same model (another plan): the chunks it needs.
    pub fn reoffer(&mut self, offer: &SliceOffer) -> Result<(), SliceError> {
        let manifest = check_offer(offer)?;
        if offer.model_hash != self.model_hash || manifest != self.manifest {
            return Err(SliceError::BadOffer(
                "another model's offer for this slice".into(),
            ));
        }
        self.need = self.needed(offer)?;
        Ok(())
    }

    fn needed(&self, offer: &SliceOffer) -> Result<Vec<u32>, SliceError> {
        from_runs(&offer.need, self.manifest.n_chunks())
            .ok_or_else(|| SliceError::BadOffer("a needed chunk outside the file".into()))
    }

    pub fn model_hash(&self) -> &str {
        &self.model_hash
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The needed chunks not yet held: each needed chunk not verified since this
    /// process opened the slice is read from disk and checked (a damaged or missing
    /// one is missing).
    pub fn missing(&mut self) -> Result<Vec<u32>, SliceError> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for &i in &self.need {
            if self.verified[i as usize] {
                continue;
            }
            let r = self.manifest.chunk_range(i);
            buf.resize((r.end - r.start) as usize, 0);
            let ok = !is_hole(&self.file, &r)
                && self.file.read_exact_at(&mut buf, r.start).is_ok()
                && self.manifest.matches(i, &buf);
            self.verified[i as usize] = ok;
            if !ok {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Bytes of the needed chunks, and of those verified.
    pub fn needed_bytes(&self) -> (u64, u64) {
        let held: Vec<u32> = self
            .need
            .iter()
            .copied()
            .filter(|&i| self.verified[i as usize])
            .collect();
        (
            self.manifest.bytes_of(&self.need),
            self.manifest.bytes_of(&held),
        )
    }

    /// Stores chunk `i` if it matches the manifest.
    pub fn write(&mut self, i: u32, bytes: &[u8]) -> Result<(), SliceError> {
        self.write_hashed(i, bytes, blake3::hash(bytes).as_bytes())
    }

    /// Stores chunk `i`, whose BLAKE3 hash is `hash`, if it matches the manifest.
    pub fn write_hashed(
        &mut self,
        i: u32,
        bytes: &[u8],
        hash: &[u8; 32],
    ) -> Result<(), SliceError> {
        if self.need.binary_search(&i).is_err() {
            return Err(SliceError::Unasked(i));
        }
        if !self.manifest.matches_hash(i, bytes.len(), hash) {
            return Err(SliceError::Mismatch {
                index: i,
                got: bytes.len(),
            });
        }
        let r = self.manifest.chunk_range(i);
        self.file
            .write_all_at(bytes, r.start)
            .map_err(SliceError::io("writing", &self.path))?;
        self.verified[i as usize] = true;
        Ok(())
    }

    /// Whether every needed chunk is held; then the data is flushed to disk.
    pub fn complete(&self) -> Result<bool, SliceError> {
        if self.need.iter().any(|&i| !self.verified[i as usize]) {
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

/// The manifest of a well-formed offer.
pub(crate) fn check_offer(offer: &SliceOffer) -> Result<Manifest, SliceError> {
    let bad = |m: &str| Err(SliceError::BadOffer(m.into()));
    if !is_model_id(&offer.model_hash) {
        return bad("the model id is not a BLAKE3 hash");
    }
    let m = &offer.manifest;
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&m.chunk_size) {
        return bad("chunk size out of bounds");
    }
    let n = m.file_size.div_ceil(m.chunk_size);
    if n == 0 || n > MAX_CHUNKS * (MAX_CHUNK / MIN_CHUNK) || n != m.hashes.len() as u64 {
        return bad("the hashes do not cover the file");
    }
    if m.hashes.iter().any(|h| h.len() != 64) {
        return bad("a hash is not BLAKE3 hex");
    }
    Ok(m.clone())
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
