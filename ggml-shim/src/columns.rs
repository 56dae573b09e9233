//! Matrix products in which every column has the bits of that column alone.
//!
//! ggml picks its kernel by the number of columns (tokens), and its kernels sum in
//! different orders, so a sequence decoded next to others got other logits than
//! decoded alone. Measured on this ggml (unit test below, AVX-512 Xeon):
//! - K-quant weights (Q2_K..Q6_K) in plain memory: from 8 columns on, ggml's tiled
//!   K-quant product (`ggml_compute_forward_mul_mat_tiled`) replaces `vec_dot`;
//! - weights ggml repacked (Q4_0, Q4_K, Q2_K on x86-64): from 4 columns on, the
//!   repack's `gemm` replaces its `gemv` for each group of four columns;
//! - F32, F16 and BF16 weights: from 2 columns on, tinyBLAS replaces `vec_dot`.
//!
//! Q8_0, Q5_0, Q4_0 (plain), Q4_1 and Q5_1 give the same bits either way. Gemma 3
//! 270M Q4_K_M decodes through Q4_K (repacked) and Q6_K (plain) matrices, so eight
//! requests at once answered differently from one alone. The products here give
//! each column exactly what ggml gives it as a one-token product, in one pass over
//! the weights:
//!
//! - weights repacked by ggml (x86-64: Q4_0, Q4_K and, with AVX-512, Q2_K) go
//!   through ggml's own one-column kernel (`ggml_gemv_*`) for every column, on
//!   bands of rows small enough to stay in cache while all columns pass; for Q4_K,
//!   [`crate::q4k_columns`] repeats that kernel's instructions for up to 8 columns
//!   per unpacked block (faster than ggml's batched `gemm`: 1.33x at 8 columns);
//! - plain Q6_K weights (x86-64 with AVX2): [`crate::q6k_columns`] repeats ggml's
//!   one-column `vec_dot` for up to 8 columns per unpacked block (Llama 3 8B's
//!   `ffn_down` at 8 columns: about 1.7x faster than `vec_dot` column by column);
//! - other plain weights go through ggml's `vec_dot` for every column: the activations
//!   are shaped `[k, 1, n]`, n planes of one token each, which ggml multiplies by
//!   `vec_dot` (tinyBLAS, the tiled K-quant product and the ARM two-row kernels take
//!   only planes of several tokens), still reusing each block of weights for 16
//!   columns; repacked layouts not listed above take this path too (exact, but the
//!   repack reads its weights once per plane);
//! - Q8_0 and Q5_0 weights keep exo's prefetching kernels ([`crate::qmatmul`]), whose
//!   arithmetic per column is ggml's `vec_dot`'s.

use std::os::raw::{c_int, c_void};

use crate::{sys, Tensor};

/// Rows per call of a repacked one-column kernel: a band that stays in L2 while
/// every column passes over it (64 rows of a 2048-wide Q4_K matrix are 72 KB).
const BAND_ROWS: usize = 64;

/// Declares ggml-cpu's repack kernels (repack.h, C linkage; in every build of
/// ggml-cpu) and [`Gemv`], their common type: `s[0..nc] = rows · column` for `nc`
/// rows (a multiple of the layout's interleave) starting at `vx`.
macro_rules! gemv_kernels {
    ($($name:ident),* $(,)?) => {
        type Gemv = unsafe extern "C" fn(
            n: c_int,
            s: *mut f32,
            bs: usize,
            vx: *const c_void,
            vy: *const c_void,
            nr: c_int,
            nc: c_int,
        );
        extern "C" {
            $(fn $name(
                n: c_int,
                s: *mut f32,
                bs: usize,
                vx: *const c_void,
                vy: *const c_void,
                nr: c_int,
                nc: c_int,
            );)*
        }
    };
}

gemv_kernels!(
    ggml_gemv_q4_0_8x8_q8_0,
    ggml_gemv_q4_K_8x8_q8_K,
    ggml_gemv_q2_K_8x8_q8_K,
);

/// A repacked layout (8 rows interleaved) exo multiplies column by column.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Repacked {
    Q4_0,
    Q4_K,
    Q2_K,
}

impl Repacked {
    /// ggml's one-column kernel of the layout.
    fn gemv(self) -> Gemv {
        match self {
            Repacked::Q4_0 => ggml_gemv_q4_0_8x8_q8_0,
            Repacked::Q4_K => ggml_gemv_q4_K_8x8_q8_K,
            Repacked::Q2_K => ggml_gemv_q2_K_8x8_q8_K,
        }
    }

    /// The type ggml quantizes the activations to for this layout.
    pub(crate) fn activations(self) -> sys::ggml_type {
        match self {
            Repacked::Q4_0 => sys::GGML_TYPE_Q8_0,
            Repacked::Q4_K | Repacked::Q2_K => sys::GGML_TYPE_Q8_K,
        }
    }

    /// The layout as the custom op's `userdata`, and back.
    pub(crate) fn as_userdata(self) -> *mut c_void {
        self as usize as *mut c_void
    }

    fn from_userdata(p: *mut c_void) -> Option<Repacked> {
        [Repacked::Q4_0, Repacked::Q4_K, Repacked::Q2_K]
            .into_iter()
            .find(|r| *r as usize == p as usize)
    }
}

/// The layout ggml repacked `w` into, as `ggml_repack_get_optimal_repack_type`
/// chooses it on x86-64; `None` for plain weights and for layouts not listed here
/// (those take the `[k, 1, n]` path, which is exact for them too, but reads the
/// weights once per column).
pub(crate) fn repacked_layout(w: Tensor<'_>) -> Option<Repacked> {
    // SAFETY: reading the header of a live tensor.
    let repacked = unsafe { !(*w.raw()).extra.is_null() };
    if !repacked || !cfg!(target_arch = "x86_64") || w.ne()[2..] != [1, 1] {
        return None;
    }
    let rows = w.ne()[1];
    // SAFETY: pure queries of ggml's compile-time CPU features.
    let (avx2, avx512) = unsafe {
        (
            sys::ggml_cpu_has_avx2() != 0,
            sys::ggml_cpu_has_avx512() != 0,
        )
    };
    let layout = match w.dtype().raw() {
        sys::GGML_TYPE_Q4_0 if avx2 => Repacked::Q4_0,
        sys::GGML_TYPE_Q4_K if avx2 => Repacked::Q4_K,
        sys::GGML_TYPE_Q2_K if avx512 => Repacked::Q2_K,
        _ => return None,
    };
    (rows % 8 == 0).then_some(layout)
}

/// The ggml custom-op entry: `dst = src[0]ᵀ · src[1]` for repacked weights `src[0]`
/// (`[k, m]`) and activations `src[1]` (`[k, n]`, already quantized to the layout's
/// activation type, contiguous) into the contiguous f32 `dst` (`[m, n]`), each
/// column with ggml's one-column arithmetic. `userdata` names the layout. Thread
/// `ith` of `nth` computes its own band of interleaved row groups.
///
/// # Safety
/// Called by ggml with a live `dst` whose sources are as described above, and with
/// `userdata` the [`Repacked::as_userdata`] of the layout `src[0]` was repacked into.
pub(crate) unsafe extern "C" fn gemv_columns_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    let Some(layout) = Repacked::from_userdata(userdata) else {
        return; // not built into a graph (mul_mat_per_column passes a layout)
    };
    // SAFETY: ggml passes a live dst with the sources described above.
    unsafe {
        by_bands(dst, ith, nth, 8, BAND_ROWS, |b| {
            if layout == Repacked::Q4_K && crate::q4k_columns::AVAILABLE {
                // the band unpacked once for up to 8 columns at a time
                crate::q4k_columns::matmul(b.k, b.w, b.rows / 8, b.xs, b.outs);
            } else {
                for (x, out) in b.xs.iter().zip(b.outs) {
                    let gemv = layout.gemv();
                    gemv(
                        b.k as c_int,
                        *out,
                        b.m,
                        b.w.cast(),
                        x.cast(),
                        1,
                        b.rows as c_int,
                    );
                }
            }
        });
    }
}

/// The most columns a kernel of exo's multiplies per pass over a band of rows.
pub(crate) const GROUP_COLUMNS: usize = 8;

/// A band of weight rows and a group of columns, as [`by_bands`] hands them out.
pub(crate) struct Band<'a> {
    /// Values per row, and rows of the whole product.
    pub k: usize,
    pub m: usize,
    /// Rows in the band, its first row, and the bytes from one row to the next.
    pub rows: usize,
    pub w: *const u8,
    pub w_stride: usize,
    /// The group's quantized activation columns, and where each one's results for the
    /// band's first row go.
    pub xs: &'a [*const u8],
    pub outs: &'a [*mut f32],
}

/// Runs `f` over thread `ith`'s (of `nth`) share of a custom product's rows (whole
/// groups of `unit` rows), band by band of at most `band_rows` rows, for up to
/// [`GROUP_COLUMNS`] columns at a time.
///
/// # Safety
/// `dst` is a live custom-op node whose `src[0]` are weights `[k, m]` (rows `nb[1]`
/// bytes apart, `m` a multiple of `unit`), whose `src[1]` are quantized activations
/// `[k, n]` (columns `nb[1]` apart) and whose own data is the f32 result `[m, n]`.
pub(crate) unsafe fn by_bands(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    unit: usize,
    band_rows: usize,
    mut f: impl FnMut(&Band<'_>),
) {
    // SAFETY: the caller vouches for dst and its sources; every pointer formed stays
    // within the weights, activations and result they describe.
    unsafe {
        let d = &*dst;
        let w = &*d.src[0];
        let x = &*d.src[1];
        let (k, m, n) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
        let units = m / unit;
        let (nth, ith) = (nth.max(1) as usize, ith.max(0) as usize);
        let rows = (units * ith / nth * unit)..(units * (ith + 1) / nth * unit);
        let column = |j: usize| (x.data as *const u8).add(j * x.nb[1]);
        let out = |j: usize, r: usize| ((d.data as *mut u8).add(j * d.nb[1]) as *mut f32).add(r);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let band = band_rows.min(rows.end - r0);
            let mut j0 = 0;
            while j0 < n {
                let j1 = (j0 + GROUP_COLUMNS).min(n);
                let mut xs = [std::ptr::null::<u8>(); GROUP_COLUMNS];
                let mut outs = [std::ptr::null_mut::<f32>(); GROUP_COLUMNS];
                for (i, j) in (j0..j1).enumerate() {
                    (xs[i], outs[i]) = (column(j), out(j, r0));
                }
                f(&Band {
                    k,
                    m,
                    rows: band,
                    w: (w.data as *const u8).add(r0 * w.nb[1]),
                    w_stride: w.nb[1],
                    xs: &xs[..j1 - j0],
                    outs: &outs[..j1 - j0],
                });
                j0 = j1;
            }
            r0 += band;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::test_rng::Rng;
    use crate::writer::WriterType;
    use crate::{get_tensor_f32, set_tensor_data, Allocator, CpuBackend, DType, GraphBuilder};
    use crate::{Placement, Tensor, TensorSpec, TensorStore};

    /// The most sequences a step holds (`[engine] max_slots` is at most 64).
    const MAX_COLUMNS: usize = 64;
    /// Column counts compared: every count up to 9, then wider steps.
    const COUNTS: [usize; 13] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64];

    /// `m` rows of `k` random values stored as `ty` (quantized by ggml).
    fn weights(rng: &mut Rng, ty: WriterType, k: usize, m: usize) -> Vec<u8> {
        let values: Vec<f32> = (0..k * m).map(|_| rng.unit() * 0.5).collect();
        crate::writer::weight_bytes(ty, k, &values).expect("weights")
    }

    /// Adds to `g` the nodes `alone_{j}`: ggml's product of `w` and column `j` of `x`
    /// alone (a one-token product), for the first `n` columns.
    pub(crate) fn add_alone<'a>(g: &'a GraphBuilder, w: Tensor<'a>, x: Tensor<'a>, n: usize) {
        let (k, nb1) = (x.ne()[0], x.nb()[1]);
        for j in 0..n {
            let xj = g.view(x, &[k, 1], &[nb1], j * nb1);
            let y = g.mul_mat_ggml(w, xj);
            g.name(y, &format!("alone_{j}"));
            g.output(y);
        }
    }

    /// Allocates `g`, sets its inputs with `fill`, computes it on `threads` threads; the
    /// allocator returned holds the results.
    pub(crate) fn compute(
        g: &GraphBuilder,
        threads: usize,
        fill: impl FnOnce(&GraphBuilder),
    ) -> Allocator {
        let mut alloc = Allocator::new().expect("allocator");
        alloc.alloc(g).expect("alloc");
        fill(g);
        let mut backend = CpuBackend::new(threads).expect("backend");
        backend.compute(g).expect("compute");
        alloc
    }

    /// The values of node `name` of a computed graph.
    pub(crate) fn read_node(g: &GraphBuilder, name: &str) -> Vec<f32> {
        let mut v = Vec::new();
        get_tensor_f32(g.find(name).expect("node"), &mut v).expect("get");
        v
    }

    /// Per product: its column count and the result of every column.
    struct Products {
        /// (n, per-column product of the first n columns), by `mul_mat_per_column`
        /// and by the plane path
        per_column: Vec<(usize, Vec<f32>)>,
        /// (n, ggml's own product of the first n columns)
        batched: Vec<(usize, Vec<f32>)>,
        /// ggml's product of each column alone.
        alone: Vec<Vec<f32>>,
        repacked: bool,
        custom: bool,
    }

    fn products(ty: WriterType, k: usize, m: usize, repack: bool, threads: usize) -> Products {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (k * 31 + m) as u64);
        let dtype = DType::from_raw(ty.to_ggml()).expect("type");
        let spec = TensorSpec {
            name: "w".into(),
            dtype,
            ne: vec![k as i64, m as i64],
            placement: Placement::MatmulWeight,
        };
        let mut store = TensorStore::new(&[spec], repack).expect("store");
        store.set("w", &weights(&mut rng, ty, k, m)).expect("set w");
        let repacked = store.is_repacked("w");
        let w = store.get("w").expect("w");
        let g = GraphBuilder::new(1024).expect("graph");
        let x = g.input(DType::F32, &[k as i64, MAX_COLUMNS as i64]);
        g.name(x, "x");
        let nb1 = x.nb()[1];
        let mut custom = false;
        for n in COUNTS {
            let xs = g.view(x, &[k as i64, n as i64], &[nb1], 0);
            let y = g.mul_mat_per_column(w, xs);
            // SAFETY (test): reading the op of a live node.
            custom |= unsafe { (*y.raw()).op == crate::sys::GGML_OP_CUSTOM };
            g.name(y, &format!("per_column_{n}"));
            g.output(y);
            // the path of repacked layouts exo has no kernel for (arm64's)
            let y = g.mul_mat_planes(w, xs);
            g.name(y, &format!("planes_{n}"));
            g.output(y);
            let y = g.mul_mat_ggml(w, xs);
            g.name(y, &format!("batched_{n}"));
            g.output(y);
        }
        add_alone(&g, w, x, MAX_COLUMNS);
        let xv: Vec<f32> = (0..k * MAX_COLUMNS).map(|_| rng.unit() * 2.0).collect();
        let _alloc = compute(&g, threads, |g| {
            set_tensor_data(g.find("x").expect("x"), &xv).expect("set x");
        });
        let read = |name: &str| read_node(&g, name);
        Products {
            per_column: COUNTS
                .iter()
                .flat_map(|&n| {
                    [
                        (n, read(&format!("per_column_{n}"))),
                        (n, read(&format!("planes_{n}"))),
                    ]
                })
                .collect(),
            batched: COUNTS
                .iter()
                .map(|&n| (n, read(&format!("batched_{n}"))))
                .collect(),
            alone: (0..MAX_COLUMNS)
                .map(|j| read(&format!("alone_{j}")))
                .collect(),
            repacked,
            custom,
        }
    }

    /// The first column of `(n, result)` whose bits differ from that column alone.
    fn first_difference(p: &Products, n: usize, result: &[f32], m: usize) -> Option<usize> {
        assert_eq!(result.len(), m * n, "{n} columns of {m} rows");
        (0..n).find(|&j| {
            let col = &result[j * m..(j + 1) * m];
            col.iter()
                .zip(&p.alone[j])
                .any(|(a, b)| a.to_bits() != b.to_bits())
        })
    }

    /// Every weight type of the supported set (the decode path of the real model
    /// families: Q4_K, Q6_K, Q5_0, Q8_0, Q4_0, Q4_1, F16, and the rest), plain and
    /// repacked where ggml repacks it, 1 to 64 columns, one and two threads: each
    /// column's bits equal ggml's product of that column alone.
    #[test]
    fn every_column_equals_its_product_alone() {
        let mut batched_differs = Vec::new();
        for ty in WriterType::ALL {
            for (k, m) in [(512, 72), (256, 36)] {
                for repack in [true, false] {
                    for threads in [1, 2] {
                        let p = products(ty, k, m, repack, threads);
                        let case = format!(
                            "{} k {k} m {m} repacked {} threads {threads}",
                            ty.name(),
                            p.repacked
                        );
                        assert!(
                            p.alone.iter().any(|c| c.iter().any(|v| *v != 0.0)),
                            "{case}"
                        );
                        for (n, result) in &p.per_column {
                            if let Some(j) = first_difference(&p, *n, result, m) {
                                panic!("{case}: per-column product of {n} columns differs in column {j}");
                            }
                        }
                        for (n, result) in &p.batched {
                            if let Some(j) = first_difference(&p, *n, result, m) {
                                batched_differs.push(format!("{case}: n {n} column {j}"));
                                break;
                            }
                        }
                        if p.repacked && cfg!(target_arch = "x86_64") {
                            assert!(
                                p.custom,
                                "{case}: repacked weights take ggml's gemv per column"
                            );
                        }
                    }
                }
            }
        }
        // What ggml's own batched kernels change (for the record; CPU-dependent).
        for d in &batched_differs {
            eprintln!("ggml's batched product differs from alone: {d}");
        }
    }
}
