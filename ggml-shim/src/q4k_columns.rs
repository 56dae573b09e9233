//! ggml's one-column Q4_K kernel for repacked weights (`ggml_gemv_q4_K_8x8_q8_K`,
//! its AVX2 code) for several columns at once: each group of eight interleaved rows
//! is unpacked once (nibbles, 6-bit scales and mins, the lane shuffles) and then
//! multiplied with every column, where ggml's kernel unpacks it again per column.
//! Per column the instructions are ggml's: the integer sums are exact, and the
//! floating-point ones (one `fmadd` per super-block into the row and the min
//! accumulators, then the final permute and subtraction) come in ggml's order, so
//! every output has ggml's bits ([`crate::columns`] tests them against ggml's own
//! one-column product).

/// Whether this build has the kernel (ggml takes its AVX2 path there too).
pub(crate) const AVAILABLE: bool = cfg!(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
));

pub(crate) use kernel::matmul;

/// The kernel and its pieces, each a stretch of ggml's instructions inlined into it.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod kernel {
    use std::arch::x86_64::*;

    /// The most columns multiplied per pass over a group of rows (the groups
    /// [`crate::columns::by_bands`] hands out).
    const MAX_COLUMNS: usize = crate::columns::GROUP_COLUMNS;

    /// `out[j][0..8·groups] = rows · column j` for `groups` groups of eight interleaved
    /// Q4_K rows at `w` (`k / 256` blocks each), every column a Q8_K row.
    ///
    /// # Safety
    /// `w` holds `groups · k/256` `block_q4_Kx8`; each `xs[j]` `k/256` `block_q8_K`; each
    /// `outs[j]` room for `8 · groups` floats; at most [`MAX_COLUMNS`] columns.
    pub(crate) unsafe fn matmul(
        k: usize,
        w: *const u8,
        groups: usize,
        xs: &[*const u8],
        outs: &[*mut f32],
    ) {
        let nb = k / 256;
        let n = xs.len().min(outs.len()).min(MAX_COLUMNS);
        // SAFETY (whole body): register arithmetic and loads inside the blocks the caller
        // vouches for (see the offsets of block_q4_Kx8 and block_q8_K below).
        unsafe {
            let finalpermutemask = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
            for group in 0..groups {
                let mut acc_row = [_mm256_setzero_ps(); MAX_COLUMNS];
                let mut acc_min = [_mm256_setzero_ps(); MAX_COLUMNS];
                for b in 0..nb {
                    let blk = w.add((group * nb + b) * Q4_KX8_BYTES);
                    let (col_scale, col_dmin) = block_scales(blk);
                    let mut iacc_b = [_mm256_setzero_si256(); MAX_COLUMNS];
                    let mut iacc_min_b = [_mm256_setzero_si256(); MAX_COLUMNS];
                    let mut q8s = [_mm256_setzero_si256(); MAX_COLUMNS];
                    for j in 0..n {
                        q8s[j] = sub_block_sums(xs[j].add(b * Q8_K_BYTES));
                    }
                    for sb in 0..4 {
                        let pair = SubBlockPair::unpack(blk, sb);
                        for j in 0..n {
                            let x = xs[j].add(b * Q8_K_BYTES);
                            let (iacc_sb, iacc_min_sb) = pair.dot(x, sb, &mut q8s[j]);
                            iacc_b[j] = _mm256_add_epi32(iacc_b[j], iacc_sb);
                            iacc_min_b[j] = _mm256_add_epi32(iacc_min_b[j], iacc_min_sb);
                        }
                    }
                    for j in 0..n {
                        let row_scale = _mm256_set1_ps(
                            (xs[j].add(b * Q8_K_BYTES) as *const f32).read_unaligned(),
                        );
                        acc_row[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(iacc_b[j]),
                            _mm256_mul_ps(col_scale, row_scale),
                            acc_row[j],
                        );
                        acc_min[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(iacc_min_b[j]),
                            _mm256_mul_ps(col_dmin, row_scale),
                            acc_min[j],
                        );
                    }
                }
                for j in 0..n {
                    let row = _mm256_permutevar8x32_ps(acc_row[j], finalpermutemask);
                    _mm256_storeu_ps(outs[j].add(group * 8), _mm256_sub_ps(row, acc_min[j]));
                }
            }
        }
    }

    /// Bytes of one `block_q4_Kx8` (8 f16 scales, 8 f16 mins, 96 scale bytes, 1024
    /// quant bytes) and of one `block_q8_K` (f32 scale, 256 quants, 16 i16 sums).
    const Q4_KX8_BYTES: usize = 1152;
    const Q8_K_BYTES: usize = 292;

    /// The eight rows' f16 super-block scales (in ggml's lane order) and mins, as f32.
    ///
    /// # Safety
    /// `blk` points at a `block_q4_Kx8`.
    #[inline(always)]
    unsafe fn block_scales(blk: *const u8) -> (__m256, __m256) {
        // SAFETY: the 16 bytes at 0 and at 16 are the block's scales and mins.
        unsafe {
            let deltamask = _mm_set_epi8(15, 14, 7, 6, 13, 12, 5, 4, 11, 10, 3, 2, 9, 8, 1, 0);
            let col_scale = _mm256_cvtph_ps(_mm_shuffle_epi8(
                _mm_loadu_si128(blk as *const __m128i),
                deltamask,
            ));
            let col_dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
            (col_scale, col_dmin)
        }
    }

    /// A column's sums of 16 quants per pair of sub-blocks, broadcast to both lanes, which
    /// [`SubBlockPair::dot`] consumes four at a time.
    ///
    /// # Safety
    /// `x` points at a `block_q8_K`.
    #[inline(always)]
    unsafe fn sub_block_sums(x: *const u8) -> __m256i {
        // SAFETY: the 32 bytes at 260 are the block's 16 i16 sums.
        unsafe {
            let sums = _mm256_loadu_si256(x.add(260) as *const __m256i);
            let h = _mm256_castsi128_si256(_mm_hadd_epi16(
                _mm256_castsi256_si128(sums),
                _mm256_extracti128_si256::<1>(sums),
            ));
            _mm256_permute2f128_si256::<0>(h, h)
        }
    }

    /// The 6-bit scales and mins of one sub-block of the eight rows (12 packed bytes), as
    /// ggml unpacks them: scales in the low 8 bytes, mins in the high 8.
    ///
    /// # Safety
    /// `packed` points at 12 readable bytes.
    #[inline(always)]
    unsafe fn scales_and_mins(packed: *const u8) -> __m128i {
        let mut u = [0u32; 4];
        // SAFETY: 12 bytes readable at `packed`; `u` has 16.
        unsafe { std::ptr::copy_nonoverlapping(packed, u.as_mut_ptr() as *mut u8, 12) };
        u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        let aux = u[1] & 0x3f3f3f3f;
        u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        u[2] = aux;
        u[0] &= 0x3f3f3f3f;
        // SAFETY: register arithmetic only.
        unsafe { _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32) }
    }

    /// Eight registers of nibbles, their rows interleaved per pair (0123, 4567) as ggml's
    /// blends order them.
    #[inline(always)]
    unsafe fn interleave_pairs(v: impl Fn(usize) -> __m256i) -> [__m256i; 8] {
        // SAFETY: register arithmetic only.
        unsafe {
            let mut r = [_mm256_setzero_si256(); 8];
            for p in 0..4 {
                let (a, c) = (v(2 * p), v(2 * p + 1));
                r[2 * p] = _mm256_blend_epi32::<170>(a, _mm256_shuffle_epi32::<177>(c));
                r[2 * p + 1] = _mm256_blend_epi32::<170>(_mm256_shuffle_epi32::<177>(a), c);
            }
            r
        }
    }

    /// The weights of two sub-blocks of eight rows, unpacked once for every column.
    struct SubBlockPair {
        /// Low nibbles (first sub-block) and high nibbles (second), interleaved.
        rhs0: [__m256i; 8],
        rhs1: [__m256i; 8],
        /// Both sub-blocks' scales, widened to i16.
        scales0: __m256i,
        scales1: __m256i,
        /// Both sub-blocks' mins, interleaved and widened to i16.
        mins01: __m256i,
    }

    impl SubBlockPair {
        /// Unpacks sub-blocks `2·sb` and `2·sb + 1` of the `block_q4_Kx8` at `blk`.
        ///
        /// # Safety
        /// `blk` points at a `block_q4_Kx8`; `sb < 4`.
        #[inline(always)]
        unsafe fn unpack(blk: *const u8, sb: usize) -> SubBlockPair {
            // SAFETY: the scale bytes (96 at 32) and quants (1024 at 128) of the block.
            unsafe {
                let (scales, qs) = (blk.add(32), blk.add(128));
                let m4b = _mm256_set1_epi8(0x0F);
                let scalemask = _mm_set_epi8(7, 7, 3, 3, 6, 6, 2, 2, 5, 5, 1, 1, 4, 4, 0, 0);
                let raw =
                    |i: usize| _mm256_loadu_si256(qs.add(sb * 256 + 32 * i) as *const __m256i);
                let lo = |i: usize| _mm256_and_si256(raw(i), m4b);
                let hi = |i: usize| _mm256_and_si256(_mm256_srli_epi16::<4>(raw(i)), m4b);
                let ms0 = scales_and_mins(scales.add(24 * sb));
                let ms1 = scales_and_mins(scales.add(12 + 24 * sb));
                SubBlockPair {
                    rhs0: interleave_pairs(lo),
                    rhs1: interleave_pairs(hi),
                    scales0: _mm256_cvtepu8_epi16(_mm_shuffle_epi8(ms0, scalemask)),
                    scales1: _mm256_cvtepu8_epi16(_mm_shuffle_epi8(ms1, scalemask)),
                    mins01: _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(
                        _mm_shuffle_epi32::<78>(ms0),
                        _mm_shuffle_epi32::<78>(ms1),
                    )),
                }
            }
        }

        /// One column's integer sums against both sub-blocks: (scaled dot products, mins
        /// times the column's quant sums). Consumes one entry of `q8s` ([`sub_block_sums`]).
        ///
        /// # Safety
        /// `x` points at the column's `block_q8_K`; `sb < 4`.
        #[inline(always)]
        unsafe fn dot(&self, x: *const u8, sb: usize, q8s: &mut __m256i) -> (__m256i, __m256i) {
            // SAFETY: the 64 quants of the two sub-blocks at 4 + 64·sb in the block.
            unsafe {
                let a = x.add(4 + sb * 64);
                let lhs = |off: usize| {
                    let v = _mm256_castsi128_si256(_mm_loadu_si128(a.add(off) as *const __m128i));
                    _mm256_permute2f128_si256::<0>(v, v)
                };
                let iacc0 = dot_sub_block(&self.rhs0, lhs(0), lhs(16), self.scales0);
                let iacc1 = dot_sub_block(&self.rhs1, lhs(32), lhs(48), self.scales1);
                let iacc_sb = _mm256_add_epi32(iacc0, iacc1);
                let iacc_min_sb = _mm256_madd_epi16(_mm256_shuffle_epi32::<0>(*q8s), self.mins01);
                *q8s = _mm256_bsrli_epi128::<4>(*q8s);
                (iacc_sb, iacc_min_sb)
            }
        }
    }

    /// One sub-block's 32 quants of a column (`l0`, `l1`) against eight rows' nibbles,
    /// times the rows' scales, as i32 sums.
    #[inline(always)]
    unsafe fn dot_sub_block(
        rhs: &[__m256i; 8],
        l0: __m256i,
        l1: __m256i,
        scales: __m256i,
    ) -> __m256i {
        // SAFETY: register arithmetic only.
        unsafe {
            let parts = [
                _mm256_shuffle_epi32::<0>(l0),
                _mm256_shuffle_epi32::<85>(l0),
                _mm256_shuffle_epi32::<170>(l0),
                _mm256_shuffle_epi32::<255>(l0),
                _mm256_shuffle_epi32::<0>(l1),
                _mm256_shuffle_epi32::<85>(l1),
                _mm256_shuffle_epi32::<170>(l1),
                _mm256_shuffle_epi32::<255>(l1),
            ];
            let mut acc = _mm256_setzero_si256();
            for (r, x) in rhs.iter().zip(parts) {
                acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(*r, x));
            }
            _mm256_madd_epi16(acc, scales)
        }
    }
}

/// Other targets: a stub, never called ([`AVAILABLE`] is false).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
mod kernel {
    pub(crate) unsafe fn matmul(_: usize, _: *const u8, _: usize, _: &[*const u8], _: &[*mut f32]) {
    }
}
