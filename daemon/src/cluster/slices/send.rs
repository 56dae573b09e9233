//! The head's side of a slice: offer a worker the chunks its plan needs, then send
//! those it misses, one authenticated control frame per chunk.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;

use super::{progress_figures, stage_bytes, to_runs, Manifest, Progress, HASHES_PER_OFFER};
use crate::cluster::control::Control;
use crate::cluster::proto::{Plan, SliceOffer, SliceStatus};
use crate::cluster::transport::ControlClient;
use crate::cluster::wire::FrameType;
use crate::model::weights::LmHeadShare;
use crate::model::{LayerRange, ModelFile};

/// How long a worker may take to check what it holds (it reads its slice from disk).
const OFFER_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one chunk may take, sent, written and checked.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
/// Chunks on their way to a worker at a time.
const IN_FLIGHT: usize = 4;
/// How often the progress line and the log are updated.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// What one delivery moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Bytes of the slice the plan gives the worker.
    pub need_bytes: u64,
    /// Bytes sent now (what it did not hold already).
    pub sent_bytes: u64,
}

/// What the head sends from: its model file, its manifest, its name.
pub struct Source<'a> {
    pub mf: &'a ModelFile,
    pub manifest: &'a Manifest,
    pub model_hash: &'a str,
    pub from: &'a str,
    pub progress: &'a Progress,
}

/// Gives worker stage `i` of `plan` (1-based: stage 0 is the head's) the chunks its
/// layers need that it does not hold yet.
pub(crate) async fn deliver(
    control: &Control,
    client: &ControlClient,
    src: &Source<'_>,
    plan: &Plan,
    i: usize,
) -> anyhow::Result<Delivered> {
    let stage = &plan.stages[i];
    let range = LayerRange::new(stage.start, stage.end);
    let last = range.end == src.mf.hparams.n_layer;
    let lm_head = match (last, plan.lm_head_rows) {
        (false, _) => LmHeadShare::None,
        (true, 0) => LmHeadShare::All,
        // the rows the worker loads (a step alone uses a part of them)
        (true, rows) => LmHeadShare::Rows(rows..src.mf.hparams.n_vocab),
    };
    let chunking = src.manifest.chunking;
    let need = chunking.chunks_covering(&stage_bytes(src.mf, range, last, &lm_head)?);
    let mut status = None;
    let layers = range.to_string();
    let pages = offer_pages(
        src.manifest,
        src.model_hash,
        src.from,
        &layers,
        &need,
        HASHES_PER_OFFER,
    );
    for offer in pages {
        let answer: SliceStatus = control
            .ask(client, FrameType::SliceOffer, &offer, OFFER_TIMEOUT)
            .await
            .with_context(|| format!("offering {} its slice", stage.name))?;
        status = Some(answer);
    }
    // the answer to the last page tells what is missing
    let status = status.context("an offer without pages")?;
    let n_chunks = src.manifest.n_chunks();
    let missing = super::from_runs(&status.missing, n_chunks)
        .filter(|m| m.iter().all(|c| need.binary_search(c).is_ok()))
        .with_context(|| format!("{} answered the offer with chunks outside it", stage.name))?;
    let total = chunking.bytes_of(&missing);
    let delivered = Delivered {
        need_bytes: status.need_bytes,
        sent_bytes: total,
    };
    if missing.is_empty() {
        tracing::info!(
            "peer {} holds its slice (layers {range}, {:.1} MB)",
            stage.name,
            status.need_bytes as f64 / 1e6
        );
        return Ok(delivered);
    }
    tracing::info!(
        "sending layers {range} to {}: {:.1} MB of its {:.1} MB slice ({} chunks)",
        stage.name,
        total as f64 / 1e6,
        status.need_bytes as f64 / 1e6,
        missing.len()
    );
    let file = std::fs::File::open(src.mf.gguf.path())
        .with_context(|| format!("opening {}", src.mf.gguf.path().display()))?;
    let t0 = Instant::now();
    let mut last_report = t0;
    src.progress.set(Some(format!(
        "sending layers {range} to {}: {}",
        stage.name,
        progress_figures(0, total, 0.0)
    )));
    let mut buf = Vec::new();
    // chunks read and sealed in order, IN_FLIGHT of them on their way at a time: the
    // worker stores one while the next ones travel
    let mut replies = futures_util::stream::iter(missing.iter().copied())
        .map(|c| {
            let frame = seal_chunk(control, src, &file, c, &mut buf);
            async move {
                let sent: SliceStatus = control.request(client, &frame?, CHUNK_TIMEOUT).await?;
                anyhow::Ok((c, sent))
            }
        })
        .buffered(IN_FLIGHT);
    let mut sent = 0u64;
    while let Some(reply) = replies.next().await {
        let (c, _) = reply.with_context(|| format!("sending {} its slice", stage.name))?;
        sent += chunking.bytes_of(&[c]);
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            let line = format!(
                "sending layers {range} to {}: {}",
                stage.name,
                progress_figures(sent, total, t0.elapsed().as_secs_f64())
            );
            tracing::info!("{line}");
            src.progress.set(Some(line));
        }
    }
    src.progress.set(None);
    tracing::info!(
        "sent layers {range} to {}: {}",
        stage.name,
        progress_figures(sent, total, t0.elapsed().as_secs_f64())
    );
    Ok(delivered)
}

/// Chunk `c` read from the model file and sealed. (The worker checks it against the
/// manifest; the head does not hash it again: a file changed since it was hashed is
/// reported by the worker's refusal.)
fn seal_chunk(
    control: &Control,
    src: &Source<'_>,
    file: &std::fs::File,
    c: u32,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    let path = src.mf.gguf.path();
    let r = src.manifest.chunking.chunk_range(c);
    buf.resize((r.end - r.start) as usize, 0);
    file.read_exact_at(buf, r.start)
        .with_context(|| format!("reading {}", path.display()))?;
    let hash = src
        .manifest
        .hashes
        .get(c as usize)
        .and_then(|h| blake3::Hash::from_hex(h).ok())
        .context("a chunk outside the manifest")?;
    control.seal_chunk(c, buf, hash.as_bytes())
}

/// The offer of the chunks `need` (sorted) of `manifest` for `layers`, sent by
/// `from`, as pages of at most `per_page` hashes (at least one page).
pub(crate) fn offer_pages(
    manifest: &Manifest,
    model_hash: &str,
    from: &str,
    layers: &str,
    need: &[u32],
    per_page: usize,
) -> Vec<SliceOffer> {
    let runs = to_runs(need);
    let hashes = manifest.hashes_of(need);
    let mut pages: Vec<&[String]> = hashes.chunks(per_page.max(1)).collect();
    if pages.is_empty() {
        pages.push(&[]);
    }
    let mut start = 0;
    pages
        .into_iter()
        .map(|page| {
            let offer = SliceOffer {
                model_hash: model_hash.to_string(),
                from: from.to_string(),
                layers: layers.to_string(),
                chunking: manifest.chunking,
                need: runs.clone(),
                hashes_from: start as u32,
                hashes: page.to_vec(),
            };
            start += page.len();
            offer
        })
        .collect()
}
