use std::path::Path;

use super::send::offer_pages;
use super::store::{kept_slice, slice_path, SliceStore};
use super::*;
use crate::cluster::proto::SliceOffer;

/// A file of `len` pseudo-random bytes.
fn random_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut bytes);
    std::fs::write(path, &bytes).expect("write");
    bytes
}

/// A model id for the file at `model`.
fn model_id(model: &Path) -> String {
    blake3::hash(model.to_string_lossy().as_bytes())
        .to_hex()
        .to_string()
}

/// The offer (in one page) of chunks `need` of the file at `model`, and its bytes.
fn offer(model: &Path, need: &[u32]) -> (SliceOffer, Vec<u8>) {
    let manifest = Manifest::compute(model).expect("manifest");
    let mut pages = offer_pages(&manifest, &model_id(model), "head", "1..2", need, 100);
    assert_eq!(pages.len(), 1);
    (pages.remove(0), std::fs::read(model).expect("read"))
}

fn chunk(o: &SliceOffer, bytes: &[u8], i: u32) -> Vec<u8> {
    let r = o.chunking.chunk_range(i);
    bytes[r.start as usize..r.end as usize].to_vec()
}

#[test]
fn chunk_sizes_keep_manifests_small() {
    let size = |len| Chunking::for_file(len).chunk_size;
    assert_eq!(size(0), MIN_CHUNK);
    assert_eq!(size(5 << 30), MIN_CHUNK);
    assert_eq!(size(8 << 30), MIN_CHUNK);
    assert_eq!(size((8 << 30) + 1), 2 * MIN_CHUNK);
    // up to 64 GiB, a manifest has at most MAX_CHUNKS hashes of chunks a worker takes
    let c = size(60 << 30);
    assert!((60u64 << 30).div_ceil(c) <= MAX_CHUNKS && c <= MAX_CHUNK);
    assert_eq!(size(1 << 40), MAX_CHUNK);
}

#[test]
fn runs_round_trip_and_refuse_what_is_outside() {
    let chunks = [0, 1, 2, 5, 7, 8];
    let runs = to_runs(&chunks);
    assert_eq!(runs, vec![[0, 2], [5, 5], [7, 8]]);
    assert_eq!(from_runs(&runs, 9), Some(chunks.to_vec()));
    assert_eq!(from_runs(&runs, 8), None, "chunk 8 of 8");
    assert_eq!(from_runs(&[[3, 2]], 9), None, "backwards run");
}

#[test]
fn manifest_covers_byte_ranges_and_matches_chunks() {
    let dir = exo_tests::TempDir::new("slices-manifest").expect("tmp");
    let model = dir.path().join("m.gguf");
    let bytes = random_file(&model, 3 * MIN_CHUNK as usize + 100, 1);
    let m = Manifest::compute(&model).expect("manifest");
    assert_eq!(m.n_chunks(), 4);
    assert_eq!(m.chunking.n_chunks(), 4);
    let c = MIN_CHUNK as usize;
    assert_eq!(
        m.chunking.chunk_range(3),
        3 * MIN_CHUNK..3 * MIN_CHUNK + 100
    );
    assert_eq!(m.hashes[3], blake3::hash(&bytes[3 * c..]).to_hex().as_str());
    assert_eq!(
        m.hashes_of(&[1, 7]),
        vec![m.hashes[1].clone(), String::new()]
    );
    let c = MIN_CHUNK;
    let k = m.chunking;
    assert_eq!(k.chunks_covering(&[0..1, c - 1..c + 1]), vec![0, 1]);
    assert_eq!(
        k.chunks_covering(&[2 * c..2 * c, 3 * c + 5..3 * c + 6]),
        vec![3]
    );
    // cached: the second load reads the cache, a changed file is hashed again
    let cache = dir.path().join("cache");
    let first = Manifest::load_or_compute(&model, "abc", &cache).expect("first");
    assert!(cache.join("abc.manifest.json").exists());
    assert_eq!(
        Manifest::load_or_compute(&model, "abc", &cache).expect("cached"),
        first
    );
    random_file(&model, 100, 2);
    let changed = Manifest::load_or_compute(&model, "abc", &cache).expect("changed");
    assert_eq!(changed.chunking.file_size, 100);
}

/// The worker's store: what it holds is checked, a wrong chunk is refused, a
/// restart resumes with what is on disk, a damaged chunk is missing again, and the
/// slice of another model is removed.
#[test]
fn store_resumes_verifies_and_replaces() {
    let dir = exo_tests::TempDir::new("slices-store").expect("tmp");
    let model = dir.path().join("m.gguf");
    random_file(&model, 4 * MIN_CHUNK as usize + 7, 3);
    let cache = dir.path().join("cache");
    let (o, bytes) = offer(&model, &[0, 2, 3, 4]);

    let mut store = SliceStore::open(&cache, &o).expect("open");
    assert_eq!(store.missing().expect("missing"), vec![0, 2, 3, 4]);
    assert!(matches!(
        store.write(1, &chunk(&o, &bytes, 1)),
        Err(SliceError::Unasked(1))
    ));
    assert!(matches!(
        store.write(2, &chunk(&o, &bytes, 3)),
        Err(SliceError::Mismatch { index: 2, .. })
    ));
    store.write(0, &chunk(&o, &bytes, 0)).expect("chunk 0");
    store.write(2, &chunk(&o, &bytes, 2)).expect("chunk 2");
    assert!(!store.complete().expect("complete"));
    drop(store);

    // a restart: what was written counts, the rest is missing
    let mut store = SliceStore::open(&cache, &o).expect("reopen");
    assert_eq!(store.missing().expect("missing"), vec![3, 4]);
    assert_eq!(store.needed_bytes().1, 2 * MIN_CHUNK);
    store.write(3, &chunk(&o, &bytes, 3)).expect("chunk 3");
    store.write(4, &chunk(&o, &bytes, 4)).expect("chunk 4");
    assert!(store.complete().expect("complete"));
    let path = store.path().to_path_buf();
    drop(store);
    // the held chunks are the model's bytes at their own offsets; chunk 1 is a hole
    let held = std::fs::read(&path).expect("slice");
    assert_eq!(held.len(), bytes.len());
    assert_eq!(held[..MIN_CHUNK as usize], chunk(&o, &bytes, 0));
    assert!(held[MIN_CHUNK as usize..2 * MIN_CHUNK as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(kept_slice(&cache), Some(o.model_hash.clone()));

    // a damaged byte on disk: that chunk is missing again
    let mut damaged = held.clone();
    damaged[3 * MIN_CHUNK as usize + 9] ^= 0x40;
    std::fs::write(&path, &damaged).expect("damage");
    let mut store = SliceStore::open(&cache, &o).expect("reopen");
    assert_eq!(store.missing().expect("missing"), vec![3]);
    drop(store);

    // another model replaces the slice
    let other = dir.path().join("other.gguf");
    random_file(&other, MIN_CHUNK as usize, 9);
    let (o2, _) = offer(&other, &[0]);
    let store = SliceStore::open(&cache, &o2).expect("other model");
    assert!(!slice_path(&cache, &o.model_hash).exists());
    assert!(store.path().exists());
}

/// An offer in pages: the worker answers what it misses only once every needed
/// chunk's hash came, refuses a chunk whose hash it was not given, keeps what it
/// checked across a re-plan, and fetches again a chunk whose hash changed.
#[test]
fn offers_in_pages_are_put_together() {
    let dir = exo_tests::TempDir::new("slices-pages").expect("tmp");
    let model = dir.path().join("m.gguf");
    let bytes = random_file(&model, 5 * MIN_CHUNK as usize, 5);
    let m = Manifest::compute(&model).expect("manifest");
    let id = model_id(&model);
    let cache = dir.path().join("cache");
    let pages = offer_pages(&m, &id, "head", "1..3", &[0, 1, 3, 4], 2);
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[1].hashes_from, 2);
    assert_eq!(
        pages[1].hashes,
        vec![m.hashes[3].clone(), m.hashes[4].clone()]
    );

    let mut store = SliceStore::open(&cache, &pages[0]).expect("first page");
    assert!(!store.has_every_hash());
    assert!(matches!(store.missing(), Err(SliceError::BadOffer(_))));
    assert!(matches!(
        store.write(3, &chunk(&pages[0], &bytes, 3)),
        Err(SliceError::Mismatch { index: 3, .. })
    ));
    store
        .write(1, &chunk(&pages[0], &bytes, 1))
        .expect("chunk 1");
    // a page of another offer (other chunks) is refused
    let other = offer_pages(&m, &id, "head", "1..3", &[0, 2, 3, 4], 2);
    assert!(matches!(
        store.reoffer(&other[1]),
        Err(SliceError::BadOffer(_))
    ));
    store.reoffer(&pages[1]).expect("second page");
    assert!(store.has_every_hash());
    assert_eq!(store.missing().expect("missing"), vec![0, 3, 4]);
    for c in [0, 3, 4] {
        store.write(c, &chunk(&pages[0], &bytes, c)).expect("chunk");
    }
    assert!(store.complete().expect("complete"));

    // a re-plan to chunks 3 and 4, a page each: both are held
    let replan = offer_pages(&m, &id, "head", "2..3", &[3, 4], 1);
    assert_eq!(replan.len(), 2);
    store.reoffer(&replan[0]).expect("re-plan page 1");
    assert!(!store.complete().expect("not yet"));
    store.reoffer(&replan[1]).expect("re-plan page 2");
    assert_eq!(store.missing().expect("missing"), Vec::<u32>::new());
    assert!(store.complete().expect("complete"));

    // the head's file changed under chunk 4: its new hash makes it missing
    let mut changed = replan.clone();
    changed[1].hashes[0] = blake3::hash(b"other bytes").to_hex().to_string();
    store.reoffer(&changed[0]).expect("page 1");
    store.reoffer(&changed[1]).expect("page 2");
    assert_eq!(store.missing().expect("missing"), vec![4]);
}

/// A 1 TiB model: its whole manifest would not fit a control frame, but the offer of
/// half of it goes in pages that each do, and the worker learns every hash.
#[test]
fn a_terabyte_models_offer_fits_control_frames() {
    use crate::cluster::wire::{FrameKey, FrameType, Limits, Sealer};
    let chunking = Chunking::for_file(1 << 40);
    let n = chunking.n_chunks() as u32;
    assert_eq!(n, 131_072);
    let m = Manifest {
        chunking,
        hashes: (0..n)
            .map(|i| blake3::hash(&i.to_le_bytes()).to_hex().to_string())
            .collect(),
    };
    let whole = serde_json::to_vec(&m).expect("json").len();
    assert!(whole > Limits::DEFAULT_MAX_CONTROL_BYTES, "{whole}");
    let need: Vec<u32> = std::iter::once(0).chain(n / 2..n).collect();
    let id = blake3::hash(b"a terabyte").to_hex().to_string();
    let pages = offer_pages(&m, &id, "head", "40..80", &need, HASHES_PER_OFFER);
    assert_eq!(pages.len(), need.len().div_ceil(HASHES_PER_OFFER));
    let mut sealer = Sealer::new(FrameKey::derive(b"secret"), 1);
    for page in &pages {
        let json = serde_json::to_vec(page).expect("json").len();
        assert!(json < Limits::DEFAULT_MAX_CONTROL_BYTES, "{json}");
        sealer
            .seal_control(FrameType::SliceOffer, 0, page)
            .expect("sealed");
    }
    // the whole manifest is refused by the sender, not left to time out at the peer
    assert!(sealer.seal_control(FrameType::SliceOffer, 0, &m).is_err());

    let dir = exo_tests::TempDir::new("slices-tib").expect("tmp");
    let mut store = SliceStore::open(dir.path(), &pages[0]).expect("first page");
    for page in &pages[1..] {
        assert!(!store.has_every_hash());
        store.reoffer(page).expect("page");
    }
    assert!(store.has_every_hash());
    // nothing held yet (a sparse file): every needed chunk is missing
    assert_eq!(store.missing().expect("missing"), need);
    assert_eq!(store.needed_bytes(), (need.len() as u64 * MAX_CHUNK, 0));
}

#[test]
fn malformed_offers_are_refused() {
    let dir = exo_tests::TempDir::new("slices-offer").expect("tmp");
    let model = dir.path().join("m.gguf");
    random_file(&model, MIN_CHUNK as usize + 1, 4);
    let (good, _) = offer(&model, &[0, 1]);
    let cache = dir.path().join("cache");
    let cases: Vec<(&str, SliceOffer)> = vec![
        (
            "id",
            SliceOffer {
                model_hash: "../../etc/passwd".into(),
                ..good.clone()
            },
        ),
        (
            "chunk size",
            SliceOffer {
                chunking: Chunking {
                    chunk_size: 1,
                    ..good.chunking
                },
                ..good.clone()
            },
        ),
        (
            "file size",
            SliceOffer {
                chunking: Chunking {
                    file_size: (MAX_FILE_CHUNKS + 1) * MIN_CHUNK,
                    chunk_size: MIN_CHUNK,
                },
                ..good.clone()
            },
        ),
        (
            "hash count",
            SliceOffer {
                hashes: vec![good.hashes[0].clone(); 3],
                ..good.clone()
            },
        ),
        (
            "hash page",
            SliceOffer {
                hashes_from: 1,
                ..good.clone()
            },
        ),
        (
            "hash",
            SliceOffer {
                hashes: vec!["zz".repeat(32); 2],
                ..good.clone()
            },
        ),
        (
            "need",
            SliceOffer {
                need: vec![[0, 2]],
                ..good.clone()
            },
        ),
    ];
    for (what, o) in cases {
        assert!(
            matches!(SliceStore::open(&cache, &o), Err(SliceError::BadOffer(_))),
            "{what}"
        );
    }
    assert!(SliceStore::open(&cache, &good).is_ok());
}

#[test]
fn progress_lines_read_well() {
    assert_eq!(
        progress_figures(1_200_000_000, 2_300_000_000, 25.0),
        "1.2 of 2.3 GB, 48 MB/s"
    );
    assert_eq!(
        progress_figures(5_000_000, 20_000_000, 0.5),
        "5.0 of 20.0 MB, 10 MB/s"
    );
}
