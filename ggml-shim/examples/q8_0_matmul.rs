//! Times exo's prefetching Q8_0 matrix product against ggml's own on a matrix the
//! size of Gemma 3's output head (262144 × 640), one thread, interleaved repetitions.
//!
//! `cargo run --release -p ggml-shim --example q8_0_matmul [rows] [reps]`

use std::time::Instant;

use ggml_shim::q8_0::set_plain_q8_0_matmul;
use ggml_shim::{
    f32_to_f16_bits, set_tensor_data, Allocator, CpuBackend, DType, GraphBuilder, Placement,
    TensorSpec, TensorStore,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let m: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(262_144);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(9);
    let k = 640usize;
    let mut w = Vec::with_capacity(m * k / 32 * 34);
    let mut d = [0u16];
    f32_to_f16_bits(&[0.01], &mut d);
    for b in 0..m * k / 32 {
        w.extend_from_slice(&d[0].to_le_bytes());
        w.extend((0..32).map(|q| ((b * 7 + q * 13) % 255) as u8 ^ 0x80));
    }
    // the weights live in a store, as a model's do (huge pages where the kernel has them)
    let spec = TensorSpec {
        name: "w".into(),
        dtype: DType::Q8_0,
        ne: vec![k as i64, m as i64],
        placement: Placement::Plain,
    };
    let mut store = TensorStore::new(&[spec], false).expect("store");
    store.set("w", &w).expect("weights");
    let wt = store.get("w").expect("w");
    let mut backend = CpuBackend::new(1).expect("backend");
    println!("rows {m}, k {k}, 1 thread, median of {reps}");
    println!(
        "{:>4} {:>10} {:>10} {:>7}",
        "n", "exo ms", "ggml ms", "ratio"
    );
    for n in [1usize, 2, 4, 8, 16] {
        let x: Vec<f32> = (0..k * n).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let mut times = [Vec::new(), Vec::new()];
        let mut graphs = Vec::new();
        for plain in [false, true] {
            set_plain_q8_0_matmul(plain);
            let g = GraphBuilder::new(16).expect("graph");
            let xt = g.input(DType::F32, &[k as i64, n as i64]);
            g.name(xt, "x");
            g.output(g.mul_mat(wt, xt));
            let mut alloc = Allocator::new().expect("allocator");
            alloc.alloc(&g).expect("alloc");
            set_tensor_data(g.find("x").expect("x"), &x).expect("x");
            graphs.push((g, alloc));
        }
        set_plain_q8_0_matmul(false);
        for _ in 0..reps {
            for (i, (g, _)) in graphs.iter().enumerate() {
                let t = Instant::now();
                backend.compute(g).expect("compute");
                times[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (a, b) = (med(&mut times[0]), med(&mut times[1]));
        println!("{n:>4} {a:>10.2} {b:>10.2} {:>6.2}x", b / a);
    }
}
