//! Times exo's prefetching matrix products against ggml's own, one thread, medians of
//! interleaved repetitions, for 1 to 8 columns (wider products are ggml's on both
//! sides: exo leaves them to tinyBLAS). By default a Q8_0 matrix the size of
//! Gemma 3's output head (262144 × 640); `q5_0` times Q5_0 weights instead.
//!
//! `cargo run --release -p ggml-shim --example qmatmul [q8_0|q5_0] [rows] [reps]`

mod timing;

use ggml_shim::qmatmul::set_plain_kernels;
use ggml_shim::{
    f32_to_f16_bits, set_tensor_data, Allocator, CpuBackend, DType, GraphBuilder, Placement,
    TensorSpec, TensorStore,
};

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let q5_0 = args.next_if(|a| a == "q5_0" || a == "q8_0").as_deref() == Some("q5_0");
    let m: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(262_144);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(9);
    let k = 640usize;
    let (dtype, block) = if q5_0 {
        (
            DType::from_raw(ggml_shim::sys::GGML_TYPE_Q5_0).expect("q5_0"),
            22,
        )
    } else {
        (DType::Q8_0, 34)
    };
    let mut w = Vec::with_capacity(m * k / 32 * block);
    let mut d = [0u16];
    f32_to_f16_bits(&[0.01], &mut d);
    for b in 0..m * k / 32 {
        w.extend_from_slice(&d[0].to_le_bytes());
        w.extend((2..block).map(|q| ((b * 7 + q * 13) % 255) as u8 ^ 0x80));
    }
    // the weights live in a store, as a model's do (huge pages where the kernel has them)
    let spec = TensorSpec {
        name: "w".into(),
        dtype,
        ne: vec![k as i64, m as i64],
        placement: Placement::Plain,
    };
    let mut store = TensorStore::new(&[spec], false).expect("store");
    store.set("w", &w).expect("weights");
    let wt = store.get("w").expect("w");
    let mut backend = CpuBackend::new(1).expect("backend");
    println!("{dtype} rows {m}, k {k}, 1 thread, median of {reps}");
    println!(
        "{:>4} {:>10} {:>10} {:>7}",
        "n", "exo ms", "ggml ms", "ratio"
    );
    for n in [1usize, 2, 4, 8] {
        let x: Vec<f32> = (0..k * n).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let mut graphs = Vec::new();
        for plain in [false, true] {
            set_plain_kernels(plain);
            let g = GraphBuilder::new(16).expect("graph");
            let xt = g.input(DType::F32, &[k as i64, n as i64]);
            g.name(xt, "x");
            g.output(g.mul_mat(wt, xt));
            let mut alloc = Allocator::new().expect("allocator");
            alloc.alloc(&g).expect("alloc");
            set_tensor_data(g.find("x").expect("x"), &x).expect("x");
            graphs.push((g, alloc));
        }
        set_plain_kernels(false);
        let t = timing::interleaved_medians(&mut backend, &graphs, reps);
        let (a, b) = (t[0], t[1]);
        println!("{n:>4} {a:>10.2} {b:>10.2} {:>6.2}x", b / a);
    }
}
