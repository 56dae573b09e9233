//! Quantized matrix products that ask for their weights before they need them.
//!
//! ggml's x86 kernels for Q8_0 and Q5_0 weights times Q8_0 activations (tinyBLAS
//! `gemm4xN` for two or more columns, `ggml_vec_dot_q{8,5}_0_q8_0` for one) leave
//! the weight stream to the hardware prefetcher. On one core that keeps them waiting
//! on memory for about half the time: Gemma 3's 178 MB Q8_0 output head takes 34 ms
//! for 4 tokens, of which 14 ms is arithmetic. These kernels do the same arithmetic
//! in the same order (per output, 8 lanes accumulate `fma(d_w·d_x, lane dot, acc)`
//! block by block, then the same horizontal sum), so their results are bit-identical
//! to ggml's and llama.cpp's; they only prefetch the rows they will read next.
//!
//! They run as a ggml custom op on ggml's threads: [`crate::GraphBuilder::mul_mat`]
//! quantizes the activations with ggml's own `ggml_cpy` to Q8_0 (the quantizer
//! `ggml_mul_mat` uses), then calls `qmatmul_op`. Only x86-64 builds whose ggml
//! uses those AVX2 kernels take this path; everything else stays on `ggml_mul_mat`.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{sys, DType, Tensor};

/// Bytes of one Q8_0 block: an f16 scale and 32 signed quants.
const Q8_0_BYTES: usize = 34;
/// Bytes of one Q5_0 block: an f16 scale, 32 high bits, 32 low nibbles.
const Q5_0_BYTES: usize = 22;
/// Values per block of either type.
const BLOCK_VALUES: i64 = 32;

/// The most activation columns (tokens) these kernels take. Up to here the product
/// waits on memory and prefetching pays (Gemma's head: 1.25x at 1 column, 1.7x at
/// 4, 1.5x at 8); wider products, such as prompt chunks, are bound by arithmetic,
/// where tinyBLAS is as fast or faster (Q5_0 at 32 columns: 0.96x).
const MAX_COLUMNS: i64 = 8;

/// The weight types these kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Weights {
    Q8_0,
    Q5_0,
}

impl Weights {
    fn of(t: sys::ggml_type) -> Option<Weights> {
        match t {
            sys::GGML_TYPE_Q8_0 => Some(Weights::Q8_0),
            sys::GGML_TYPE_Q5_0 => Some(Weights::Q5_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Weights::Q8_0 => Q8_0_BYTES,
            Weights::Q5_0 => Q5_0_BYTES,
        }
    }
}

/// Whether `wᵀ·x` (`w` `[k, m]`, `x` `[k, n]`, ggml order) can take these kernels:
/// 2-D Q8_0 or Q5_0 weights in their plain layout (not repacked by ggml, which marks
/// such tensors with `extra`), 2-D f32 activations with unit stride and at most
/// [`MAX_COLUMNS`] columns, and a build whose ggml uses the kernels they repeat.
pub(crate) fn applies(w: Tensor<'_>, x: Tensor<'_>) -> bool {
    let Some(weights) = Weights::of(w.dtype().raw()) else {
        return false;
    };
    // SAFETY: reading the header of a live tensor.
    let repacked = unsafe { !(*w.raw()).extra.is_null() };
    let (w_ne, x_ne) = (w.ne(), x.ne());
    !repacked
        && x.dtype() == DType::F32
        && w_ne[0] == x_ne[0]
        && w_ne[0] % BLOCK_VALUES == 0
        && w_ne[1] > 0
        && (1..=MAX_COLUMNS).contains(&x_ne[1])
        && w_ne[2..] == [1, 1]
        && x_ne[2..] == [1, 1]
        && w.nb()[0] == weights.block_bytes()
        && x.nb()[0] == 4
        && prefetching_kernels()
}

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the prefetching kernels off (true) or back on for graphs built afterwards,
/// for A/B measurements against ggml's own kernels.
pub fn set_plain_kernels(plain: bool) {
    DISABLED.store(plain, Ordering::Relaxed);
}

/// Whether matrix products with weights of `dtype` (and at most 8 tokens) take the
/// prefetching kernels in graphs built now.
pub fn takes(dtype: DType) -> bool {
    Weights::of(dtype.raw()).is_some() && prefetching_kernels()
}

/// Whether graphs built now use the prefetching kernels: this build has them and
/// ggml's CPU code was compiled with the x86 kernels whose arithmetic they repeat.
pub fn prefetching_kernels() -> bool {
    if DISABLED.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: pure queries of ggml's compile-time CPU features.
    x86::COMPILED
        && unsafe {
            sys::ggml_cpu_has_avx2() != 0
                && sys::ggml_cpu_has_fma() != 0
                && sys::ggml_cpu_has_f16c() != 0
        }
}

/// The ggml custom-op entry: `dst = src[0]ᵀ · src[1]` for Q8_0 or Q5_0 weights `src[0]`
/// (`[k, m]`, rows `nb[1]` apart) and Q8_0 activations `src[1]` (`[k, n]`,
/// contiguous), into the contiguous f32 `dst` (`[m, n]`). Thread `ith` of `nth`
/// computes its own band of rows. The graph builder checked the shapes and types.
///
/// # Safety
/// Called by ggml with a live `dst` whose sources are as described above.
pub(crate) unsafe extern "C" fn qmatmul_op(
    dst: *mut sys::ggml_tensor,
    ith: std::os::raw::c_int,
    nth: std::os::raw::c_int,
    _userdata: *mut std::os::raw::c_void,
) {
    // SAFETY: ggml passes a live dst; its sources were checked when the node was built.
    unsafe {
        let d = &*dst;
        let w = &*d.src[0];
        let x = &*d.src[1];
        let m = w.ne[1] as usize;
        let tiles = m.div_ceil(4);
        let nth = nth.max(1) as usize;
        let ith = ith.max(0) as usize;
        let first = tiles * ith / nth;
        let last = tiles * (ith + 1) / nth;
        let Some(weights) = Weights::of(w.type_) else {
            return; // not built into a graph (applies() checked the type)
        };
        let product = Product {
            weights,
            w: w.data as *const u8,
            w_stride: w.nb[1],
            x: x.data as *const u8,
            x_stride: x.nb[1],
            c: d.data as *mut f32,
            ldc: d.nb[1] / 4,
            k: (w.ne[0] / BLOCK_VALUES) as usize,
            n: x.ne[1] as usize,
        };
        x86::matmul(&product, (first * 4).min(m)..(last * 4).min(m));
    }
}

/// One product `c = wᵀ·x`: `w` rows `w_stride` bytes apart, `x` columns `x_stride`
/// bytes apart, `c` columns `ldc` floats apart, `k` blocks per row, `n` columns.
#[cfg_attr(
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )),
    allow(dead_code)
)]
struct Product {
    weights: Weights,
    w: *const u8,
    w_stride: usize,
    x: *const u8,
    x_stride: usize,
    c: *mut f32,
    ldc: usize,
    k: usize,
    n: usize,
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Product, Weights, Q5_0_BYTES, Q8_0_BYTES};

    pub(super) const COMPILED: bool = true;

    /// How far ahead of the tile being read the weights are prefetched, in tiles
    /// (4 rows, 2.7 KB for Gemma's head): one tile for one column, two for more.
    /// Measured on a Xeon core (`examples/qmatmul.rs`, Gemma's head): one column
    /// 13.0 ms one tile ahead, 16.2 two (ggml 16.1); four columns 18.4 and 17.4 ms
    /// (ggml 33.2).
    fn ahead_tiles(columns: usize) -> usize {
        if columns == 1 {
            1
        } else {
            2
        }
    }

    /// One weight block's values, prepared for dot products with many columns.
    ///
    /// With VNNI, `dpbusd` multiplies unsigned by signed bytes: a column's quants go
    /// in offset by 128 (`x ^ 0x80`), and the row brings `-128·Σw` per lane as the
    /// starting sum, so one instruction per row and column gives `Σ w·x` exactly.
    /// Without VNNI, ggml's sign trick (`|w|` times `x` signed like `w`, through
    /// `maddubs`, which saturates and so cannot take the offset). Either way the
    /// lanes are the exact int32 sums ggml computes (|lane| ≤ 4·128·127).
    #[derive(Clone, Copy)]
    struct Row {
        w: __m256i,
        #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
        start: __m256i,
    }

    #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
    #[inline(always)]
    unsafe fn prep_row(w: __m256i) -> Row {
        // SAFETY: register-only AVX2 and VNNI arithmetic.
        unsafe {
            let offset_sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), w);
            Row {
                w,
                start: _mm256_sub_epi32(_mm256_setzero_si256(), offset_sum),
            }
        }
    }

    /// Without VNNI a row is used as it is (the sign trick works on the raw bytes).
    #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
    #[inline(always)]
    unsafe fn prep_row(w: __m256i) -> Row {
        Row { w }
    }

    /// A column's Q8_0 quants as [`dot`] takes them.
    #[inline(always)]
    unsafe fn column(block: *const u8) -> __m256i {
        // SAFETY: the caller points at a Q8_0 block.
        unsafe {
            let x = Q8_0::values(block);
            #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
            let x = _mm256_xor_si256(x, _mm256_set1_epi8(-128));
            x
        }
    }

    /// The 8 int32 lanes of a row block times a column block, as f32 (exact).
    #[inline(always)]
    unsafe fn dot(r: Row, x: __m256i) -> __m256 {
        // SAFETY: register-only AVX2 (and VNNI where compiled) arithmetic.
        unsafe {
            #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
            let sums = _mm256_dpbusd_epi32(r.start, x, r.w);
            #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
            let sums = _mm256_madd_epi16(
                _mm256_set1_epi16(1),
                _mm256_maddubs_epi16(_mm256_sign_epi8(r.w, r.w), _mm256_sign_epi8(x, r.w)),
            );
            _mm256_cvtepi32_ps(sums)
        }
    }

    /// ggml's horizontal sum of 8 lanes (`hsum_float_8`): (hi + lo), then pairs, then
    /// the last two.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only SSE/AVX arithmetic.
        unsafe {
            let x = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
            let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            let x = _mm_add_ss(x, _mm_movehdup_ps(x));
            _mm_cvtss_f32(x)
        }
    }

    /// A weight block: its f16 scale and its 32 values as signed bytes.
    trait Block {
        const BYTES: usize;
        unsafe fn values(block: *const u8) -> __m256i;
    }

    /// The f16 scale at the start of a block of either type.
    #[inline(always)]
    unsafe fn scale(block: *const u8) -> u16 {
        // SAFETY: the caller points at a Q8_0 or Q5_0 block; it starts with the scale.
        unsafe { (block as *const u16).read_unaligned() }
    }

    struct Q8_0;
    impl Block for Q8_0 {
        const BYTES: usize = Q8_0_BYTES;
        #[inline(always)]
        unsafe fn values(block: *const u8) -> __m256i {
            // SAFETY: the caller points at a Q8_0 block; 32 quant bytes follow the scale.
            unsafe { _mm256_loadu_si256(block.add(2) as *const __m256i) }
        }
    }

    struct Q5_0;
    impl Block for Q5_0 {
        const BYTES: usize = Q5_0_BYTES;
        /// Low nibbles (values 0-15 then 16-31), minus 16 where the high bit is clear:
        /// tinyBLAS's `denibble | bittobyte`.
        #[inline(always)]
        unsafe fn values(block: *const u8) -> __m256i {
            // SAFETY: the caller points at a Q5_0 block: scale, 4 bytes qh, 16 bytes qs.
            unsafe {
                let qh = (block.add(2) as *const i32).read_unaligned();
                let qs = _mm_loadu_si128(block.add(6) as *const __m128i);
                let nibbles = _mm256_and_si256(
                    _mm256_set1_epi8(15),
                    _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(qs), _mm_srli_epi16(qs, 4)),
                );
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh),
                    _mm256_set_epi64x(
                        0x0303030303030303,
                        0x0202020202020202,
                        0x0101010101010101,
                        0x0000000000000000,
                    ),
                );
                let set = _mm256_cmpeq_epi8(
                    _mm256_set1_epi64x(-1),
                    _mm256_or_si256(_mm256_set1_epi64x(0x7fbfdfeff7fbfdfe), spread),
                );
                _mm256_or_si256(nibbles, _mm256_andnot_si256(set, _mm256_set1_epi8(-16)))
            }
        }
    }

    #[inline(always)]
    fn f16_to_f32(h: u16) -> f32 {
        // SAFETY: register-only F16C conversion.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))) }
    }

    /// Prefetches `len` bytes at `base` a few cache lines per call, spread over the
    /// `k` block steps of a tile (no division in the loop: it would cost as much as
    /// the arithmetic it overlaps).
    struct Prefetch {
        next: *const u8,
        end: *const u8,
        per_step: usize,
    }

    impl Prefetch {
        #[inline(always)]
        fn new(base: *const u8, len: usize, k: usize) -> Prefetch {
            Prefetch {
                next: base,
                end: base.wrapping_add(len),
                per_step: len.div_ceil(64).div_ceil(k.max(1)),
            }
        }

        #[inline(always)]
        fn step(&mut self) {
            for _ in 0..self.per_step {
                if self.next < self.end {
                    // SAFETY: a prefetch never faults, whatever the address.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(self.next as *const i8) };
                    self.next = self.next.wrapping_add(64);
                }
            }
        }
    }

    /// Rows `rows` of the product.
    ///
    /// # Safety
    /// The product's pointers cover `rows.end` weight rows and its `n` columns.
    pub(super) unsafe fn matmul(p: &Product, rows: Range<usize>) {
        // SAFETY: forwarded contract.
        unsafe {
            match p.weights {
                Weights::Q8_0 => matmul_of::<Q8_0>(p, rows),
                Weights::Q5_0 => matmul_of::<Q5_0>(p, rows),
            }
        }
    }

    #[inline(always)]
    unsafe fn matmul_of<B: Block>(p: &Product, rows: Range<usize>) {
        let ctx = Ctx::<B> {
            p,
            end: rows.end,
            _block: std::marker::PhantomData,
        };
        let n = p.n;
        let mut i = rows.start;
        // SAFETY (whole loop): every tile stays inside rows and the n columns.
        unsafe {
            while i + 4 <= rows.end {
                let mut j = 0;
                while j < n {
                    let prefetch = j == 0;
                    match n - j {
                        1 => ctx.tile4::<1>(i, j, prefetch),
                        2 => ctx.tile4::<2>(i, j, prefetch),
                        3 => ctx.tile4::<3>(i, j, prefetch),
                        _ => ctx.tile4::<4>(i, j, prefetch),
                    }
                    j += 4;
                }
                i += 4;
            }
            // the last 1-3 rows of the matrix, one at a time
            while i < rows.end {
                let mut j = 0;
                while j < n {
                    match n - j {
                        1 => ctx.tile1::<1>(i, j),
                        2 => ctx.tile1::<2>(i, j),
                        3 => ctx.tile1::<3>(i, j),
                        _ => ctx.tile1::<4>(i, j),
                    }
                    j += 4;
                }
                i += 1;
            }
        }
    }

    struct Ctx<'a, B> {
        p: &'a Product,
        /// One past the last row this thread computes (prefetches stop there).
        end: usize,
        _block: std::marker::PhantomData<B>,
    }

    impl<B: Block> Ctx<'_, B> {
        /// Rows `i..i+4` × columns `j..j+RN` (tinyBLAS's 4×RN tile).
        #[inline(always)]
        unsafe fn tile4<const RN: usize>(&self, i: usize, j: usize, prefetch: bool) {
            // SAFETY: rows i..i+4 and columns j..j+RN exist (see matmul).
            unsafe {
                let row = |r: usize| self.p.w.add((i + r) * self.p.w_stride);
                let ahead_row = i + 4 * ahead_tiles(self.p.n);
                let mut ahead = (prefetch && ahead_row < self.end).then(|| {
                    Prefetch::new(
                        self.p.w.add(ahead_row * self.p.w_stride),
                        (4 * self.p.w_stride).min((self.end - ahead_row) * self.p.w_stride),
                        self.p.k,
                    )
                });
                let mut acc = [[_mm256_setzero_ps(); 4]; RN];
                for l in 0..self.p.k {
                    if let Some(ahead) = ahead.as_mut() {
                        ahead.step();
                    }
                    let b = [
                        row(0).add(l * B::BYTES),
                        row(1).add(l * B::BYTES),
                        row(2).add(l * B::BYTES),
                        row(3).add(l * B::BYTES),
                    ];
                    let da = _mm_cvtph_ps(_mm_set_epi16(
                        0,
                        0,
                        0,
                        0,
                        scale(b[3]) as i16,
                        scale(b[2]) as i16,
                        scale(b[1]) as i16,
                        scale(b[0]) as i16,
                    ));
                    let a = [
                        prep_row(B::values(b[0])),
                        prep_row(B::values(b[1])),
                        prep_row(B::values(b[2])),
                        prep_row(B::values(b[3])),
                    ];
                    for (jj, acc) in acc.iter_mut().enumerate() {
                        let xb = self.p.x.add((j + jj) * self.p.x_stride + l * Q8_0_BYTES);
                        let db = _mm_set1_ps(f16_to_f32(scale(xb)));
                        let d = _mm256_castps128_ps256(_mm_mul_ps(da, db));
                        let d = _mm256_permute2f128_ps::<0>(d, d);
                        let xq = column(xb);
                        acc[0] =
                            _mm256_fmadd_ps(_mm256_shuffle_ps::<0>(d, d), dot(a[0], xq), acc[0]);
                        acc[1] =
                            _mm256_fmadd_ps(_mm256_shuffle_ps::<85>(d, d), dot(a[1], xq), acc[1]);
                        acc[2] =
                            _mm256_fmadd_ps(_mm256_shuffle_ps::<170>(d, d), dot(a[2], xq), acc[2]);
                        acc[3] =
                            _mm256_fmadd_ps(_mm256_shuffle_ps::<255>(d, d), dot(a[3], xq), acc[3]);
                    }
                }
                for (jj, acc) in acc.iter().enumerate() {
                    let out = self.p.c.add((j + jj) * self.p.ldc + i);
                    for (r, v) in acc.iter().enumerate() {
                        *out.add(r) = hsum(*v);
                    }
                }
            }
        }

        /// Row `i` × columns `j..j+RN` (ggml's vec_dot, column by column), for the
        /// rows after the last whole tile.
        #[inline(always)]
        unsafe fn tile1<const RN: usize>(&self, i: usize, j: usize) {
            // SAFETY: row i and columns j..j+RN exist (see matmul).
            unsafe {
                let row = self.p.w.add(i * self.p.w_stride);
                let mut acc = [_mm256_setzero_ps(); RN];
                for l in 0..self.p.k {
                    let wb = row.add(l * B::BYTES);
                    let dw = f16_to_f32(scale(wb));
                    let a = prep_row(B::values(wb));
                    for (jj, acc) in acc.iter_mut().enumerate() {
                        let xb = self.p.x.add((j + jj) * self.p.x_stride + l * Q8_0_BYTES);
                        let d = _mm256_set1_ps(dw * f16_to_f32(scale(xb)));
                        *acc = _mm256_fmadd_ps(d, dot(a, column(xb)), *acc);
                    }
                }
                for (jj, v) in acc.iter().enumerate() {
                    *self.p.c.add((j + jj) * self.p.ldc + i) = hsum(*v);
                }
            }
        }
    }
}

/// Other targets keep ggml's kernels ([`prefetching_kernels`] is false there).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
pub(crate) mod x86 {
    pub(super) const COMPILED: bool = false;

    pub(super) unsafe fn matmul(_: &super::Product, _: std::ops::Range<usize>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use crate::{f32_to_f16_bits, get_tensor_f32, set_tensor_data, Allocator, CpuBackend};
    use crate::{DType, GraphBuilder};

    /// The switch is process-wide: tests that build graphs hold this lock.
    static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `m` rows of `k` values as blocks of `weights`, with scales of varied size and
    /// every quant byte (and Q5_0 high bit) random.
    fn rows(rng: &mut Rng, weights: Weights, k: usize, m: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(m * k / 32 * weights.block_bytes());
        for _ in 0..m * k / 32 {
            let mut d = [0u16];
            f32_to_f16_bits(&[rng.unit().abs() * 0.02 + 1e-4], &mut d);
            out.extend_from_slice(&d[0].to_le_bytes());
            for _ in 2..weights.block_bytes() {
                out.push(rng.next() as u8);
            }
        }
        out
    }

    /// Computes `wᵀ·x` with exo's kernel and with ggml's; returns both and whether
    /// the first really was exo's custom op.
    fn both(
        weights: Weights,
        k: usize,
        m: usize,
        n: usize,
        threads: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>, bool) {
        let mut rng = Rng(seed);
        let w = rows(&mut rng, weights, k, m);
        let x: Vec<f32> = (0..k * n).map(|_| rng.unit() * 3.0).collect();
        let dtype = match weights {
            Weights::Q8_0 => DType::Q8_0,
            Weights::Q5_0 => DType::from_raw(sys::GGML_TYPE_Q5_0).expect("q5_0"),
        };
        let g = GraphBuilder::new(64).expect("graph");
        let wt = g.input(dtype, &[k as i64, m as i64]);
        g.name(wt, "w");
        let xt = g.input(DType::F32, &[k as i64, n as i64]);
        g.name(xt, "x");
        let ours = g.mul_mat(wt, xt);
        g.name(ours, "ours");
        g.output(ours);
        let theirs = g.mul_mat_ggml(wt, xt);
        g.name(theirs, "theirs");
        g.output(theirs);
        // SAFETY (test): reading the op of a live node.
        let custom = unsafe { (*ours.raw()).op == sys::GGML_OP_CUSTOM };
        let mut alloc = Allocator::new().expect("allocator");
        alloc.alloc(&g).expect("alloc");
        set_tensor_data(g.find("w").expect("w"), &w).expect("set w");
        set_tensor_data(g.find("x").expect("x"), &x).expect("set x");
        let mut backend = CpuBackend::new(threads).expect("backend");
        backend.compute(&g).expect("compute");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        get_tensor_f32(g.find("ours").expect("ours"), &mut a).expect("get");
        get_tensor_f32(g.find("theirs").expect("theirs"), &mut b).expect("get");
        (a, b, custom)
    }

    /// The prefetching kernels give ggml's results to the bit, for Q8_0 and Q5_0
    /// weights, one column (ggml's vec_dot), several (tinyBLAS), ragged tiles, rows
    /// not a multiple of 4, and one or two threads.
    #[test]
    fn prefetching_kernels_equal_ggml_bit_for_bit() {
        let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let available = prefetching_kernels();
        if !available {
            eprintln!("skipped: this build keeps ggml's own kernels");
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for weights in [Weights::Q8_0, Weights::Q5_0] {
            for (k, m) in [(640, 4096), (64, 37), (96, 5)] {
                for n in 1..=MAX_COLUMNS as usize {
                    for threads in [1, 2] {
                        seed += 1;
                        let (ours, theirs, custom) = both(weights, k, m, n, threads, seed);
                        let case = format!("{weights:?} k {k} m {m} n {n} threads {threads}");
                        assert_eq!(
                            custom, available,
                            "{case}: the kernel is used where it applies"
                        );
                        assert_eq!(ours.len(), m * n);
                        assert!(ours.iter().any(|v| *v != 0.0), "{case}: non-trivial output");
                        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                            assert_eq!(a.to_bits(), b.to_bits(), "{case}: element {i}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn wide_products_keep_ggml_kernels() {
        let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let (ours, theirs, custom) = both(Weights::Q5_0, 64, 8, MAX_COLUMNS as usize + 1, 1, 3);
        assert!(!custom);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn plain_switch_keeps_ggml_kernels() {
        let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        set_plain_kernels(true);
        let (_, _, custom) = both(Weights::Q8_0, 64, 8, 4, 1, 7);
        set_plain_kernels(false);
        assert!(!custom);
    }
}
