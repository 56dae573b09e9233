//! ggml's one-column Q6_K kernel (`ggml_vec_dot_q6_K_q8_K`, its AVX2 code) for several
//! columns at once: each block of a row is unpacked once (6-bit quants from their low
//! and high bits, the 16 sub-block scales widened) and then multiplied with every
//! column, where ggml's `vec_dot` unpacks it again per column.
//!
//! Per column the arithmetic is ggml's: the integer sums of a block are exact, and each
//! of the 8 int32 lanes holds the same positions as in ggml's kernel (lane `l` of a
//! 32-byte register: bytes `4l..4l+4`, scaled by sub-block scale `2i` for `l < 4` and
//! `2i+1` above, the `-32` offset taken off through the column's sums), so every lane
//! has ggml's integer; the floating-point steps (one `fmadd` per block into 8 lanes,
//! in block order, then ggml's horizontal sum) come in ggml's order. So every output
//! has the bits of ggml's one-column product ([`crate::columns`] and the tests below
//! compare them).

use std::os::raw::{c_int, c_void};

use crate::{sys, Tensor};

/// Whether this build has the kernel (ggml takes its AVX2 path there too): x86-64 with
/// AVX2, FMA and F16C, as [`crate::q4k_columns`].
pub(crate) const AVAILABLE: bool = crate::q4k_columns::AVAILABLE;

/// Rows per pass over the column groups of a product wider than
/// [`crate::columns::GROUP_COLUMNS`]: a
/// band that stays in L1/L2 while each group of columns passes over it.
const BAND_ROWS: usize = 16;

/// Bytes of one `block_q6_K` (128 low-bit bytes, 64 high-bit bytes, 16 int8 scales, an
/// f16 scale) and of one `block_q8_K` (f32 scale, 256 quants, 16 i16 sums).
const Q6_K_BYTES: usize = 210;
const Q8_K_BYTES: usize = 292;
// The layouts above, checked on every target (the kernel that uses them is AVX2-only).
const _: () = assert!(Q6_K_BYTES == 128 + 64 + 16 + 2 && Q8_K_BYTES == 4 + 256 + 2 * 16);

/// Whether `wᵀ·x` with weights `w` can take this kernel: 2-D Q6_K weights in ggml's
/// plain layout (not repacked: ggml marks repacked tensors with `extra`), whole
/// blocks per row, on a build that has the kernel and whose ggml uses the AVX2
/// `vec_dot` the kernel repeats.
pub(crate) fn applies(w: Tensor<'_>) -> bool {
    // SAFETY: reading the header of a live tensor.
    let repacked = unsafe { !(*w.raw()).extra.is_null() };
    let ne = w.ne();
    // SAFETY: pure queries of ggml's compile-time CPU features.
    let ggml_avx2 = unsafe {
        sys::ggml_cpu_has_avx2() != 0
            && sys::ggml_cpu_has_fma() != 0
            && sys::ggml_cpu_has_f16c() != 0
    };
    AVAILABLE
        && ggml_avx2
        && !repacked
        && w.dtype().raw() == sys::GGML_TYPE_Q6_K
        && ne[0] > 0
        && (ne[0] as u64).is_multiple_of(256)
        && ne[2..] == [1, 1]
        && w.nb()[0] == Q6_K_BYTES
}

/// The ggml custom-op entry: `dst = src[0]ᵀ · src[1]` for plain Q6_K weights `src[0]`
/// (`[k, m]`, rows `nb[1]` apart, possibly a view of a larger table) and Q8_K
/// activations `src[1]` (`[k, n]`, contiguous rows), into the contiguous f32 `dst`
/// (`[m, n]`), each column with ggml's one-column arithmetic. Thread `ith` of `nth`
/// computes its own band of rows.
///
/// # Safety
/// Called by ggml with a live `dst` whose sources are as described above ([`applies`]
/// held for `src[0]` when the node was built).
pub(crate) unsafe extern "C" fn q6k_columns_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    _userdata: *mut c_void,
) {
    // SAFETY: ggml passes a live dst with the sources described above.
    unsafe {
        crate::columns::by_bands(dst, ith, nth, 1, BAND_ROWS, |b| {
            kernel::matmul(b.k, b.w, b.w_stride, b.rows, b.xs, b.outs)
        });
    }
}

/// The kernel and its pieces, each a stretch of ggml's instructions inlined into it.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod kernel {
    use std::arch::x86_64::*;

    use super::{Q6_K_BYTES, Q8_K_BYTES};

    /// The most columns multiplied per pass over a block.
    const MAX_COLUMNS: usize = crate::columns::GROUP_COLUMNS;
    use crate::qmatmul::x86::hsum;

    /// How far ahead the weights are prefetched, in blocks.
    const PREFETCH_BLOCKS: usize = 8;

    /// `outs[j][0..rows] = rows · column j` for `rows` Q6_K rows at `w`, `stride` bytes
    /// apart (`k / 256` blocks each), every column a Q8_K row.
    ///
    /// # Safety
    /// `w` holds `rows` rows of `k/256` `block_q6_K`, `stride` bytes apart; each
    /// `xs[j]` `k/256` `block_q8_K`; each `outs[j]` room for `rows` floats; at most
    /// [`MAX_COLUMNS`] columns.
    pub(super) unsafe fn matmul(
        k: usize,
        w: *const u8,
        stride: usize,
        rows: usize,
        xs: &[*const u8],
        outs: &[*mut f32],
    ) {
        let nb = k / 256;
        let n = xs.len().min(outs.len()).min(MAX_COLUMNS);
        // SAFETY (whole body): register arithmetic and loads inside the blocks the caller
        // vouches for (see the offsets of block_q6_K and block_q8_K).
        unsafe {
            for r in 0..rows {
                let row = w.add(r * stride);
                let mut acc = [_mm256_setzero_ps(); MAX_COLUMNS];
                for b in 0..nb {
                    // the weights PREFETCH_BLOCKS blocks on (past the row's end: the next
                    // row's, which follow)
                    let ahead = row.wrapping_add((b + PREFETCH_BLOCKS) * Q6_K_BYTES);
                    for line in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                    }
                    let blk = Block::unpack(row.add(b * Q6_K_BYTES));
                    for j in 0..n {
                        let x = xs[j].add(b * Q8_K_BYTES);
                        acc[j] = blk.dot(x, acc[j]);
                    }
                }
                for j in 0..n {
                    *outs[j].add(r) = hsum(acc[j]);
                }
            }
        }
    }

    /// One block of a row, unpacked once for every column.
    struct Block {
        /// The 256 6-bit quants (0..63), as ggml's `q4_0..q4_3` of each half.
        q: [__m256i; 8],
        /// Per register, its two sub-blocks' scales, each repeated over 8 i16 lanes.
        scales: [__m256i; 8],
        /// The 16 scales widened to i16 (for the offset through the column's sums).
        scales_16: __m256i,
        /// The block's scale `d`.
        d: f32,
    }

    impl Block {
        /// Unpacks the `block_q6_K` at `blk` as ggml's AVX2 `vec_dot` does.
        ///
        /// # Safety
        /// `blk` points at a `block_q6_K`.
        #[inline(always)]
        unsafe fn unpack(blk: *const u8) -> Block {
            // SAFETY: ql (128 bytes at 0), qh (64 at 128), scales (16 at 192) and d
            // (2 at 208) of the block.
            unsafe {
                let (ql, qh) = (blk, blk.add(128));
                let m3 = _mm256_set1_epi8(3);
                let m15 = _mm256_set1_epi8(15);
                let mut q = [_mm256_setzero_si256(); 8];
                for half in 0..2 {
                    let bits1 = _mm256_loadu_si256(ql.add(64 * half) as *const __m256i);
                    let bits2 = _mm256_loadu_si256(ql.add(64 * half + 32) as *const __m256i);
                    let bits_h = _mm256_loadu_si256(qh.add(32 * half) as *const __m256i);
                    let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bits_h, m3));
                    let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(bits_h, _mm256_set1_epi8(12)));
                    let h2 = _mm256_and_si256(bits_h, _mm256_set1_epi8(48));
                    let h3 =
                        _mm256_srli_epi16::<2>(_mm256_and_si256(bits_h, _mm256_set1_epi8(-64)));
                    let lo = |v: __m256i| _mm256_and_si256(v, m15);
                    let hi = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(v), m15);
                    q[4 * half] = _mm256_or_si256(lo(bits1), h0);
                    q[4 * half + 1] = _mm256_or_si256(lo(bits2), h1);
                    q[4 * half + 2] = _mm256_or_si256(hi(bits1), h2);
                    q[4 * half + 3] = _mm256_or_si256(hi(bits2), h3);
                }
                let scales = _mm_loadu_si128(blk.add(192) as *const __m128i);
                let mut sc = [_mm256_setzero_si256(); 8];
                for (i, s) in sc.iter_mut().enumerate() {
                    // ggml's get_scale_shuffle(i): scale 2i in bytes 0..8, 2i+1 in 8..16
                    let lo = 0x0101_0101_0101_0101u64.wrapping_mul(2 * i as u64);
                    let hi = 0x0101_0101_0101_0101u64.wrapping_mul(2 * i as u64 + 1);
                    let mask = _mm_set_epi64x(hi as i64, lo as i64);
                    *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, mask));
                }
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    (blk.add(208) as *const u16).read_unaligned() as i32,
                )));
                Block {
                    q,
                    scales: sc,
                    scales_16: _mm256_cvtepi8_epi16(scales),
                    d,
                }
            }
        }

        /// `acc + d·(the block times column x)` in ggml's 8 lanes.
        ///
        /// # Safety
        /// `x` points at the column's `block_q8_K` of this block.
        #[inline(always)]
        unsafe fn dot(&self, x: *const u8, acc: __m256) -> __m256 {
            // SAFETY: d (f32 at 0), the 256 quants (at 4) and the 16 sums (at 260) of
            // the column's block.
            unsafe {
                let d = (x as *const f32).read_unaligned() * self.d;
                let q8sums = _mm256_loadu_si256(x.add(260) as *const __m256i);
                let q8sclsub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, self.scales_16));
                let q8 = x.add(4);
                let mut sumi = _mm256_setzero_si256();
                for half in 0..2 {
                    let mut p = [_mm256_setzero_si256(); 4];
                    for (i, p) in p.iter_mut().enumerate() {
                        let reg = 4 * half + i;
                        let x8 = _mm256_loadu_si256(q8.add(32 * reg) as *const __m256i);
                        *p = _mm256_madd_epi16(
                            self.scales[reg],
                            _mm256_maddubs_epi16(self.q[reg], x8),
                        );
                    }
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[0], p[1]));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[2], p[3]));
                }
                sumi = _mm256_sub_epi32(sumi, q8sclsub);
                _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc)
            }
        }
    }
}

/// Other targets: a stub, never called ([`AVAILABLE`] is false there, so [`applies`]
/// is too).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
mod kernel {
    pub(super) unsafe fn matmul(
        _: usize,
        _: *const u8,
        _: usize,
        _: usize,
        _: &[*const u8],
        _: &[*mut f32],
    ) {
    }
}

#[cfg(test)]
mod tests {
    use super::Q6_K_BYTES;
    use crate::columns::tests::{add_alone, compute, read_node};
    use crate::test_rng::Rng;
    use crate::{f32_to_f16_bits, set_tensor_data, sys, DType, GraphBuilder};

    /// `m` rows of `k / 256` random Q6_K blocks: every quant bit and every int8 scale
    /// random, the f16 scale random over several orders of magnitude.
    fn random_rows(rng: &mut Rng, k: usize, m: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(m * k / 256 * Q6_K_BYTES);
        for _ in 0..m * k / 256 {
            out.extend((0..208).map(|_| rng.next() as u8));
            let mut d = [0u16];
            let magnitude = [1e-4, 1e-2, 1.0][(rng.next() % 3) as usize];
            f32_to_f16_bits(&[rng.unit() * magnitude], &mut d);
            out.extend_from_slice(&d[0].to_le_bytes());
        }
        out
    }

    /// Per column count: the per-column product (and whether it was this kernel's
    /// op) and ggml's product of each column alone, for `rows` rows `first..` of an
    /// `m`-row table (a view, as a split `lm_head` takes it).
    struct Case {
        per_column: Vec<(usize, Vec<f32>, bool)>,
        alone: Vec<Vec<f32>>,
    }

    fn case(k: usize, m: usize, rows: std::ops::Range<usize>, threads: usize, seed: u64) -> Case {
        const COUNTS: [usize; 12] = [2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 33];
        let widest = 33;
        let mut rng = Rng(seed);
        let w = random_rows(&mut rng, k, m);
        // activations of varied size per column, some with a few large entries
        let x: Vec<f32> = (0..k * widest)
            .map(|i| {
                let v = rng.unit() * (1 + i / k) as f32;
                if rng.next().is_multiple_of(97) {
                    v * 40.0
                } else {
                    v
                }
            })
            .collect();
        let dtype = DType::from_raw(sys::GGML_TYPE_Q6_K).expect("q6_K");
        let g = GraphBuilder::new(256).expect("graph");
        let table = g.input(dtype, &[k as i64, m as i64]);
        g.name(table, "w");
        let nb1 = table.nb()[1];
        let wt = g.view(
            table,
            &[k as i64, rows.len() as i64],
            &[nb1],
            rows.start * nb1,
        );
        let xt = g.input(DType::F32, &[k as i64, widest as i64]);
        g.name(xt, "x");
        let xnb1 = xt.nb()[1];
        let mut custom = Vec::new();
        for n in COUNTS {
            let xs = g.view(xt, &[k as i64, n as i64], &[xnb1], 0);
            let y = g.mul_mat_per_column(wt, xs);
            // SAFETY (test): reading the op of a live node.
            custom.push(unsafe { (*y.raw()).op == sys::GGML_OP_CUSTOM });
            g.name(y, &format!("per_column_{n}"));
            g.output(y);
        }
        add_alone(&g, wt, xt, widest);
        let _alloc = compute(&g, threads, |g| {
            set_tensor_data(g.find("w").expect("w"), &w).expect("set w");
            set_tensor_data(g.find("x").expect("x"), &x).expect("set x");
        });
        let read = |name: &str| read_node(&g, name);
        Case {
            per_column: COUNTS
                .iter()
                .zip(custom)
                .map(|(&n, c)| (n, read(&format!("per_column_{n}")), c))
                .collect(),
            alone: (0..widest).map(|j| read(&format!("alone_{j}"))).collect(),
        }
    }

    /// Random Q6_K blocks (all quant bits and scales random), 2 to 33 columns, whole
    /// tables and bands of rows, one and two threads: every column of the multi-column
    /// product has the bits of ggml's `vec_dot` product of that column alone.
    #[test]
    fn every_column_equals_ggml_alone_bit_for_bit() {
        let mut seed = 0x51f1_5eed_0000_0001;
        for (k, m, rows) in [
            (256, 8, 0..8),
            (512, 37, 0..37),
            (1024, 100, 13..77),
            (2048, 64, 0..64),
        ] {
            for threads in [1, 2] {
                seed += 1;
                let c = case(k, m, rows.clone(), threads, seed);
                let label = format!("k {k} m {m} rows {rows:?} threads {threads}");
                assert!(
                    c.alone.iter().any(|v| v.iter().any(|x| *x != 0.0)),
                    "{label}: non-trivial output"
                );
                for (n, result, custom) in &c.per_column {
                    assert_eq!(*custom, super::AVAILABLE, "{label}: n {n} takes the kernel");
                    assert_eq!(result.len(), rows.len() * n, "{label}: n {n}");
                    for j in 0..*n {
                        let col = &result[j * rows.len()..(j + 1) * rows.len()];
                        for (r, (a, b)) in col.iter().zip(&c.alone[j]).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{label}: n {n} column {j} row {r}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
