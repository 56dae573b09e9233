//! Model slices: the model file lives on the head only; a worker receives the bytes
//! its plan needs and keeps them in `[model] cache_dir`.
//!
//! The file is cut into chunks of [`Chunking::chunk_size`] bytes (the last one
//! shorter). The head hashes every chunk once (BLAKE3; the [`Manifest`] is cached in
//! its own `cache_dir`, keyed by the file's size and modification time). A worker's
//! slice is a sparse copy of the model file (`<model id>.gguf`): the GGUF header and
//! the chunks of its tensors at their own offsets, holes elsewhere. So the header,
//! the tensor offsets and the model's identity are the original's, the worker opens it
//! as any model file, and a re-plan that moves a layer fetches only the chunks of
//! that layer. Every chunk is checked against the manifest before it counts
//! ([`store::SliceStore`]); what a worker already holds (after a restart, an
//! interrupted transfer or a re-plan) is verified on disk and not sent again.
//!
//! `send.rs` is the head's side; `receive.rs` and `store.rs` the worker's.

pub mod receive;
pub mod send;
pub mod store;

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::model::weights::{self, LmHeadShare};
use crate::model::{LayerRange, ModelError, ModelFile};

/// Smallest chunk; larger files take larger chunks so that a manifest has at most
/// [`MAX_CHUNKS`] hashes up to 64 GiB.
pub const MIN_CHUNK: u64 = 1 << 20;
/// Most chunks in a manifest of a file up to 64 GiB.
pub const MAX_CHUNKS: u64 = 8192;
/// Largest chunk a worker accepts (a 64 GiB model at [`MAX_CHUNKS`] chunks).
pub const MAX_CHUNK: u64 = super::wire::MAX_CHUNK_FRAME_BYTES as u64;
/// Most chunks of a file a worker takes a slice of (8 TiB at [`MAX_CHUNK`]).
pub const MAX_FILE_CHUNKS: u64 = 1 << 20;
/// Chunk hashes in one offer: an offer of more chunks comes in pages, each well
/// within a control frame (8,192 hashes are about 550 kB of JSON).
pub const HASHES_PER_OFFER: usize = 8192;

/// Why a slice cannot be made, stored or used.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the slice offer is invalid: {0}")]
    BadOffer(String),
    #[error(
        "chunk {index} does not match the manifest (sent {got} bytes): if the head's model \
         file changed since it was hashed, restart exo on the head"
    )]
    Mismatch { index: u32, got: usize },
    #[error("chunk {0} was not asked for")]
    Unasked(u32),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl SliceError {
    fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> SliceError + 'a {
        move |error| SliceError::Io {
            what,
            path: path.to_owned(),
            error,
        }
    }
}

/// How a file is cut into chunks: [`Chunking::chunk_size`] bytes each, the last one
/// shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunking {
    pub file_size: u64,
    pub chunk_size: u64,
}

impl Chunking {
    /// The chunking of a file of `file_size` bytes: chunks of [`MIN_CHUNK`], larger
    /// for files of more than [`MAX_CHUNKS`] of them, up to [`MAX_CHUNK`].
    /// (Above 64 GiB the chunks stay at [`MAX_CHUNK`] and a manifest grows.)
    pub fn for_file(file_size: u64) -> Chunking {
        let mut c = MIN_CHUNK;
        while file_size.div_ceil(c) > MAX_CHUNKS && c < MAX_CHUNK {
            c *= 2;
        }
        Chunking {
            file_size,
            chunk_size: c,
        }
    }

    /// How many chunks the file has (0 for a chunk size of 0).
    pub fn n_chunks(&self) -> u64 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.file_size.div_ceil(self.chunk_size)
    }

    /// The bytes of chunk `i` in the file.
    pub fn chunk_range(&self, i: u32) -> Range<u64> {
        let start = i as u64 * self.chunk_size;
        start..(start + self.chunk_size).min(self.file_size)
    }

    /// Total bytes of the chunks `chunks`.
    pub fn bytes_of(&self, chunks: &[u32]) -> u64 {
        chunks
            .iter()
            .map(|&i| {
                let r = self.chunk_range(i);
                r.end - r.start
            })
            .sum()
    }

    /// The chunks that hold any byte of `ranges`, in order, each once.
    pub fn chunks_covering(&self, ranges: &[Range<u64>]) -> Vec<u32> {
        if self.chunk_size == 0 {
            return Vec::new();
        }
        let n = u32::try_from(self.n_chunks()).unwrap_or(u32::MAX);
        let mut out: Vec<u32> = ranges
            .iter()
            .filter(|r| r.start < r.end)
            .flat_map(|r| {
                let first = (r.start / self.chunk_size) as u32;
                let last = ((r.end - 1) / self.chunk_size) as u32;
                first..=last.min(n.saturating_sub(1))
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// BLAKE3 of every chunk of a model file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub chunking: Chunking,
    /// One hash per chunk, hex.
    pub hashes: Vec<String>,
}

impl Manifest {
    pub fn n_chunks(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// The hashes of chunks `chunks`, hex (an unknown chunk gives an empty string,
    /// which no chunk matches).
    pub fn hashes_of(&self, chunks: &[u32]) -> Vec<String> {
        chunks
            .iter()
            .map(|&i| self.hashes.get(i as usize).cloned().unwrap_or_default())
            .collect()
    }

    /// Hashes the file at `path` (read once, front to back).
    pub fn compute(path: &Path) -> Result<Manifest, SliceError> {
        let mut file = File::open(path).map_err(SliceError::io("opening", path))?;
        let file_size = file
            .metadata()
            .map_err(SliceError::io("reading", path))?
            .len();
        let chunking = Chunking::for_file(file_size);
        let chunk_size = chunking.chunk_size;
        let mut buf = vec![0u8; chunk_size as usize];
        let mut hashes = Vec::with_capacity(file_size.div_ceil(chunk_size) as usize);
        let mut left = file_size;
        while left > 0 {
            let n = left.min(chunk_size) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(SliceError::io("reading", path))?;
            hashes.push(blake3::hash(&buf[..n]).to_hex().to_string());
            left -= n as u64;
        }
        Ok(Manifest { chunking, hashes })
    }

    /// The manifest of the model file at `path`, from `cache_dir` when a cached one
    /// matches the file's size and modification time, else computed (and cached when
    /// `cache_dir` is writable).
    pub fn load_or_compute(
        path: &Path,
        model_hash: &str,
        cache_dir: &Path,
    ) -> Result<Manifest, SliceError> {
        let stamp = file_stamp(path)?;
        let cached = cache_dir.join(format!("{model_hash}.manifest.json"));
        if let Ok(text) = std::fs::read(&cached) {
            if let Ok(c) = serde_json::from_slice::<CachedManifest>(&text) {
                if c.stamp == stamp && c.manifest.chunking.file_size == stamp.0 {
                    return Ok(c.manifest);
                }
            }
        }
        let t0 = std::time::Instant::now();
        let manifest = Manifest::compute(path)?;
        tracing::info!(
            "hashed {} in {:.1} s ({} chunks of {} MiB) for the workers' slices",
            path.display(),
            t0.elapsed().as_secs_f64(),
            manifest.n_chunks(),
            manifest.chunking.chunk_size >> 20
        );
        let c = CachedManifest { stamp, manifest };
        let written = std::fs::create_dir_all(cache_dir).and_then(|()| {
            let tmp = cached.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&c).unwrap_or_default())?;
            std::fs::rename(&tmp, &cached)
        });
        if let Err(e) = written {
            tracing::warn!(
                "the manifest of {} is not cached in {}: {e}",
                path.display(),
                cache_dir.display()
            );
        }
        Ok(c.manifest)
    }
}

/// A manifest as cached: with the (size, modification time in ns) of its file.
#[derive(Serialize, Deserialize)]
struct CachedManifest {
    stamp: (u64, u128),
    manifest: Manifest,
}

fn file_stamp(path: &Path) -> Result<(u64, u128), SliceError> {
    let meta = std::fs::metadata(path).map_err(SliceError::io("reading", path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), mtime))
}

/// The byte ranges of the model file a worker stage reads: the GGUF header, its
/// layers' tensors, the final norm on the last stage and its rows of the `lm_head`.
/// (The first stage, with the embedding, is always the head's.)
pub fn stage_bytes(
    mf: &ModelFile,
    range: LayerRange,
    last: bool,
    lm_head: &LmHeadShare,
) -> Result<Vec<Range<u64>>, SliceError> {
    let header = std::iter::once(0..mf.gguf.data_offset());
    let tensors = weights::plan(mf, range, false, last, lm_head)?;
    Ok(header
        .chain(tensors.iter().map(|t| t.file_range()))
        .collect())
}

/// Chunk indices as `[first, last]` runs (what travels in offers and answers).
pub fn to_runs(chunks: &[u32]) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for &c in chunks {
        match out.last_mut() {
            Some(run) if run[1].checked_add(1) == Some(c) => run[1] = c,
            _ => out.push([c, c]),
        }
    }
    out
}

/// The chunk indices of `runs`, each below `n_chunks` (else None).
/// (Memory is bounded by `n_chunks`, however many runs overlap.)
pub fn from_runs(runs: &[[u32; 2]], n_chunks: u32) -> Option<Vec<u32>> {
    let mut wanted = vec![false; n_chunks as usize];
    for &[a, b] in runs {
        if a > b || b >= n_chunks {
            return None;
        }
        wanted[a as usize..=b as usize].fill(true);
    }
    Some((0..n_chunks).filter(|&i| wanted[i as usize]).collect())
}

/// What a transfer shows while it runs: the sd-notify status line, `/health` and
/// `exo status` read it ("receiving layers 9..18 from head: 0.1 of 0.2 GB, 48 MB/s").
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Mutex<Option<String>>>);

impl Progress {
    pub fn set(&self, line: Option<String>) {
        if let Ok(mut l) = self.0.lock() {
            *l = line;
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|l| l.clone())
    }
}

/// "1.2 of 2.3 GB, 48 MB/s" for `done` of `total` bytes after `secs`.
pub fn progress_figures(done: u64, total: u64, secs: f64) -> String {
    let gb = |b: u64| b as f64 / 1e9;
    let rate = if secs > 0.0 {
        done as f64 / 1e6 / secs
    } else {
        0.0
    };
    if total >= 100_000_000 {
        format!("{:.1} of {:.1} GB, {rate:.0} MB/s", gb(done), gb(total))
    } else {
        format!(
            "{:.1} of {:.1} MB, {rate:.0} MB/s",
            done as f64 / 1e6,
            total as f64 / 1e6
        )
    }
}

#[cfg(test)]
mod tests;
