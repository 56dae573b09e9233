use std::path::Path;

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

fn offer(model: &Path, need: &[u32]) -> (SliceOffer, Vec<u8>) {
    let manifest = Manifest::compute(model).expect("manifest");
    let hash = blake3::hash(model.to_string_lossy().as_bytes())
        .to_hex()
        .to_string();
    let bytes = std::fs::read(model).expect("read");
    (
        SliceOffer {
            model_hash: hash,
            from: "head".into(),
            layers: "1..2".into(),
            manifest,
            need: to_runs(need),
        },
        bytes,
    )
}

fn chunk<'a>(m: &Manifest, bytes: &'a [u8], i: u32) -> &'a [u8] {
    let r = m.chunk_range(i);
    &bytes[r.start as usize..r.end as usize]
}

#[test]
fn chunk_sizes_keep_manifests_small() {
    assert_eq!(Manifest::chunk_size_for(0), MIN_CHUNK);
    assert_eq!(Manifest::chunk_size_for(5 << 30), MIN_CHUNK);
    assert_eq!(Manifest::chunk_size_for(8 << 30), MIN_CHUNK);
    assert_eq!(Manifest::chunk_size_for((8 << 30) + 1), 2 * MIN_CHUNK);
    // up to 64 GiB, a manifest has at most MAX_CHUNKS hashes of chunks a worker takes
    let c = Manifest::chunk_size_for(60 << 30);
    assert!((60u64 << 30).div_ceil(c) <= MAX_CHUNKS && c <= MAX_CHUNK);
    assert_eq!(Manifest::chunk_size_for(1 << 40), MAX_CHUNK);
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
    assert_eq!(m.chunk_range(3), 3 * MIN_CHUNK..3 * MIN_CHUNK + 100);
    assert!(m.matches(3, chunk(&m, &bytes, 3)));
    assert!(!m.matches(2, chunk(&m, &bytes, 3)));
    let c = MIN_CHUNK;
    assert_eq!(m.chunks_covering(&[0..1, c - 1..c + 1]), vec![0, 1]);
    assert_eq!(
        m.chunks_covering(&[2 * c..2 * c, 3 * c + 5..3 * c + 6]),
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
    assert_eq!(changed.file_size, 100);
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
    let m = o.manifest.clone();

    let mut store = SliceStore::open(&cache, &o).expect("open");
    assert_eq!(store.missing().expect("missing"), vec![0, 2, 3, 4]);
    assert!(matches!(
        store.write(1, chunk(&m, &bytes, 1)),
        Err(SliceError::Unasked(1))
    ));
    assert!(matches!(
        store.write(2, chunk(&m, &bytes, 3)),
        Err(SliceError::Mismatch { index: 2, .. })
    ));
    store.write(0, chunk(&m, &bytes, 0)).expect("chunk 0");
    store.write(2, chunk(&m, &bytes, 2)).expect("chunk 2");
    assert!(!store.complete().expect("complete"));
    drop(store);

    // a restart: what was written counts, the rest is missing
    let mut store = SliceStore::open(&cache, &o).expect("reopen");
    assert_eq!(store.missing().expect("missing"), vec![3, 4]);
    assert_eq!(store.needed_bytes().1, 2 * MIN_CHUNK);
    store.write(3, chunk(&m, &bytes, 3)).expect("chunk 3");
    store.write(4, chunk(&m, &bytes, 4)).expect("chunk 4");
    assert!(store.complete().expect("complete"));
    let path = store.path().to_path_buf();
    drop(store);
    // the held chunks are the model's bytes at their own offsets; chunk 1 is a hole
    let held = std::fs::read(&path).expect("slice");
    assert_eq!(held.len(), bytes.len());
    assert_eq!(&held[..MIN_CHUNK as usize], chunk(&m, &bytes, 0));
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
                manifest: Manifest {
                    chunk_size: 1,
                    ..good.manifest.clone()
                },
                ..good.clone()
            },
        ),
        (
            "hash count",
            SliceOffer {
                manifest: Manifest {
                    hashes: vec![],
                    ..good.manifest.clone()
                },
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
