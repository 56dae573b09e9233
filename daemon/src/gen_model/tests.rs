use super::*;
use ggml_shim::Gguf;

fn count(tensors: &[GenTensor], ty: WriterType, part: &str) -> usize {
    tensors
        .iter()
        .filter(|t| t.ty == ty && t.name.contains(part))
        .count()
}

fn data_bytes(tensors: &[GenTensor]) -> usize {
    tensors.iter().map(GenTensor::nbytes).sum()
}

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("exo-gen-model-{}-{tag}.gguf", std::process::id()))
}

#[test]
fn every_named_shape_exists_and_unknown_ones_list_them() {
    for name in ["llama3-8b", "llama3-1b", "qwen2.5-3b", "llama3-tiny"] {
        assert_eq!(find_shape(name).expect(name).name, name);
    }
    let e = find_shape("llama3-70b").unwrap_err().to_string();
    assert_eq!(
        e,
        "unknown shape \"llama3-70b\"; known shapes: llama3-8b, llama3-1b, qwen2.5-3b, llama3-tiny"
    );
}

/// Layers where llama.cpp's Q4_K_M stores attn_v and ffn_down as Q6_K, for 32 layers
/// (the published Llama 3 8B Q4_K_M has Q6_K exactly there).
#[test]
fn use_more_bits_picks_llama_cpp_layers() {
    let layers: Vec<usize> = (0..32).filter(|&il| use_more_bits(il, 32)).collect();
    assert_eq!(
        layers,
        [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    );
    let layers: Vec<usize> = (0..16).filter(|&il| use_more_bits(il, 16)).collect();
    assert_eq!(layers, [0, 1, 4, 7, 10, 13, 14, 15]);
}

#[test]
fn llama3_8b_has_the_published_layout() {
    let t = plan(&find_shape("llama3-8b").unwrap()).unwrap();
    assert_eq!(t.len(), 1 + 32 * 9 + 2);
    let get = |name: &str| t.iter().find(|x| x.name == name).expect(name);
    assert_eq!(get("token_embd.weight").ne, [4096, 128_256]);
    assert_eq!(get("token_embd.weight").ty, WriterType::Q4_K);
    assert_eq!(get("output.weight").ne, [4096, 128_256]);
    assert_eq!(get("output.weight").ty, WriterType::Q6_K);
    assert_eq!(get("blk.5.attn_q.weight").ne, [4096, 4096]);
    assert_eq!(get("blk.5.attn_k.weight").ne, [4096, 1024]);
    assert_eq!(get("blk.5.ffn_down.weight").ne, [14336, 4096]);
    assert_eq!(get("blk.5.ffn_up.weight").ne, [4096, 14336]);
    assert_eq!(get("blk.31.ffn_norm.weight").ty, WriterType::F32);
    assert_eq!(count(&t, WriterType::Q6_K, "attn_v"), 16);
    assert_eq!(count(&t, WriterType::Q6_K, "ffn_down"), 16);
    // llama.cpp's load log of the published file: f32 65, q4_K 193, q6_K 33 tensors
    assert_eq!(count(&t, WriterType::F32, ""), 65);
    assert_eq!(count(&t, WriterType::Q4_K, ""), 193);
    assert_eq!(count(&t, WriterType::Q6_K, ""), 33);
    assert_eq!(get("blk.6.attn_v.weight").ty, WriterType::Q6_K);
    assert_eq!(get("blk.7.attn_v.weight").ty, WriterType::Q4_K);
    assert!(!t.iter().any(|x| x.name == "rope_freqs.weight"));
}

/// The generated data against the published Q4_K_M files' sizes: those are given to
/// 10 MB (so ±5 MB) and also hold a byte-level BPE tokenizer (128k-152k tokens and
/// 150k-280k merges: under 10 MB), which the generated files replace by a smaller one.
/// So the data must lie within [published - 15 MB, published + 5 MB].
#[test]
fn sizes_match_the_published_files() {
    for shape in SHAPES.iter().filter(|s| s.published_mb > 0) {
        let mb = data_bytes(&plan(shape).unwrap()) as f64 / 1e6;
        let published = shape.published_mb as f64;
        assert!(
            (published - 15.0..=published + 5.0).contains(&mb),
            "{}: {mb} MB of data, published {published} MB",
            shape.name
        );
    }
}

#[test]
fn tied_shapes_store_the_table_as_the_head() {
    let t = plan(&find_shape("llama3-1b").unwrap()).unwrap();
    assert!(!t.iter().any(|x| x.name == "output.weight"));
    let embd = t.iter().find(|x| x.name == "token_embd.weight").unwrap();
    assert_eq!(
        (embd.ne.as_slice(), embd.ty),
        (&[2048, 128_256][..], WriterType::Q6_K)
    );
    let rope = t.iter().find(|x| x.name == "rope_freqs.weight").unwrap();
    assert_eq!(rope.ne, [32]);
    let q = plan(&find_shape("qwen2.5-3b").unwrap()).unwrap();
    assert_eq!(q.len(), 1 + 36 * 12 + 1);
    let bias = q.iter().find(|x| x.name == "blk.0.attn_k.bias").unwrap();
    assert_eq!((bias.ne.as_slice(), bias.ty), (&[256][..], WriterType::F32));
    let embd = q.iter().find(|x| x.name == "token_embd.weight").unwrap();
    assert_eq!(
        (embd.ne.as_slice(), embd.ty),
        (&[2048, 151_936][..], WriterType::Q6_K)
    );
}

/// Llama 3.2's factors: 1 for short wavelengths, 32 for long ones, a blend between.
#[test]
fn llama3_rope_factors_follow_the_reference_formula() {
    let shape = find_shape("llama3-1b").unwrap();
    let rope = shape.llama3_rope.unwrap();
    let f = llama3_rope_factors(&rope, 64, 500_000.0);
    assert_eq!(f.len(), 32);
    assert_eq!(f[0], 1.0);
    assert_eq!(f[31], 32.0);
    assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
    let between = f.iter().filter(|&&x| x > 1.0 && x < 32.0).count();
    assert!(between > 0, "{f:?}");
}

#[test]
fn bad_shapes_are_refused() {
    let base = find_shape("llama3-tiny").unwrap();
    let cases = [
        Shape {
            n_embd: 300,
            ..base
        },
        Shape {
            n_head_kv: 3,
            ..base
        },
        Shape { n_layer: 0, ..base },
        Shape {
            n_vocab: 100,
            ..base
        },
        Shape {
            arch: GenArch::Qwen2,
            head_dim: 128,
            ..base
        },
    ];
    for shape in cases {
        let e = plan(&shape).unwrap_err();
        assert!(matches!(e, GenError::BadShape { .. }), "{shape:?}: {e}");
    }
}

/// The tiny shape written to disk: a GGUF with the planned tensors at their offsets,
/// the same bytes for the same seed, other bytes for another, no `.part` left.
#[test]
fn write_makes_a_gguf_of_the_plan() {
    let shape = find_shape("llama3-tiny").unwrap();
    let (a, b, c) = (temp_path("a"), temp_path("b"), temp_path("c"));
    let written = write(&shape, 5, &a).unwrap();
    write(&shape, 5, &b).unwrap();
    write(&shape, 6, &c).unwrap();
    let (fa, fb, fc) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&c).unwrap(),
    );
    assert_eq!(fa, fb);
    assert_ne!(fa, fc);
    assert_eq!(written.bytes, fa.len() as u64);
    let g = Gguf::open(&a).unwrap();
    let planned = plan(&shape).unwrap();
    assert_eq!(written.n_tensors, planned.len());
    assert_eq!(g.tensors().len(), planned.len());
    for t in &planned {
        let info = g.tensor(&t.name).expect(&t.name);
        assert_eq!(
            info.n_elements(),
            t.ne.iter().product::<usize>(),
            "{}",
            t.name
        );
    }
    assert_eq!(
        g.get("general.file_type").and_then(|v| v.as_u64()),
        Some(u64::from(FILE_TYPE_Q4_K_M))
    );
    assert_eq!(g.get("llama.block_count").and_then(|v| v.as_u64()), Some(4));
    let part = PathBuf::from(format!("{}.part", a.display()));
    assert!(!part.exists());
    for p in [a, b, c] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn a_failed_write_leaves_no_file() {
    let shape = find_shape("llama3-tiny").unwrap();
    let path = Path::new("/nonexistent-dir/x.gguf");
    let e = write(&shape, 0, path).unwrap_err();
    assert!(matches!(e, GenError::Io { .. }), "{e}");
    assert!(
        e.to_string().contains("/nonexistent-dir/x.gguf.part"),
        "{e}"
    );
}
