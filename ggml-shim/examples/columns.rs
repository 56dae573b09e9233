//! Times the per-column products of batch-invariant decoding against ggml's batched
//! ones, at 1 to 8 columns (tokens), medians of interleaved repetitions: the matrix
//! types and shapes of Gemma 3 270M's layers that ggml multiplies differently when a
//! step holds several tokens (Q4_K, repacked where ggml repacks it, and Q6_K), 18
//! layers' worth of rows so that one product reads a model's share of them.
//!
//! `cargo run --release -p ggml-shim --example columns [threads] [reps]`

mod timing;

use ggml_shim::writer::{weight_bytes, WriterType};
use ggml_shim::{
    set_tensor_data, Allocator, CpuBackend, DType, GraphBuilder, Placement, TensorSpec, TensorStore,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(9);
    let mut backend = CpuBackend::new(threads).expect("backend");
    println!("{threads} threads, median of {reps}; ms per product");
    println!(
        "{:<22} {:>3} {:>12} {:>10} {:>7}",
        "weights", "n", "per-column", "batched", "ratio"
    );
    // ffn_down of 18 layers: 2048 -> 640 each
    let (k, m) = (2048usize, 640 * 18);
    for (ty, repack) in [(WriterType::Q4_K, true), (WriterType::Q6_K, false)] {
        let values: Vec<f32> = (0..k * m)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: DType::from_raw(ty.to_ggml()).expect("type"),
            ne: vec![k as i64, m as i64],
            placement: Placement::MatmulWeight,
        };
        let mut store = TensorStore::new(&[spec], repack).expect("store");
        store
            .set("w", &weight_bytes(ty, k, &values).expect("weights"))
            .expect("set");
        let label = format!(
            "{} [{k}, {m}]{}",
            ty.name(),
            if store.is_repacked("w") {
                " repacked"
            } else {
                ""
            }
        );
        let w = store.get("w").expect("w");
        for n in [1usize, 2, 4, 8] {
            let x: Vec<f32> = (0..k * n)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let mut graphs = Vec::new();
            for per_column in [true, false] {
                let g = GraphBuilder::new(16).expect("graph");
                let xt = g.input(DType::F32, &[k as i64, n as i64]);
                g.name(xt, "x");
                let y = if per_column {
                    g.mul_mat_per_column(w, xt)
                } else {
                    g.mul_mat(w, xt)
                };
                g.output(y);
                let mut alloc = Allocator::new().expect("allocator");
                alloc.alloc(&g).expect("alloc");
                set_tensor_data(g.find("x").expect("x"), &x).expect("x");
                graphs.push((g, alloc));
            }
            let t = timing::interleaved_medians(&mut backend, &graphs, reps);
            let (a, b) = (t[0], t[1]);
            println!("{label:<22} {n:>3} {a:>12.3} {b:>10.3} {:>6.2}x", b / a);
        }
    }
}
