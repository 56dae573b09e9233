//! What the kernel-timing examples share: interleaved repetitions and medians.

use std::time::Instant;

use ggml_shim::{Allocator, CpuBackend, GraphBuilder};

/// Computes every graph `reps` times, interleaved; the median milliseconds of each.
pub fn interleaved_medians(
    backend: &mut CpuBackend,
    graphs: &[(GraphBuilder, Allocator)],
    reps: usize,
) -> Vec<f64> {
    let mut times = vec![Vec::new(); graphs.len()];
    for _ in 0..reps {
        for (i, (g, _)) in graphs.iter().enumerate() {
            let t = Instant::now();
            backend.compute(g).expect("compute");
            times[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
        .iter_mut()
        .map(|v| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        })
        .collect()
}
