//! The one activation codec: f32 values to and from little-endian bytes as f32,
//! f16 or bf16. The cluster's frames carry activations in it, and a local
//! pipeline's stage hops can use it alike. A leaf: it knows nothing of frames,
//! stages or models.

use std::fmt;

/// Values converted per call into ggml's f16 row converters (a stack buffer).
const F16_CHUNK: usize = 256;

/// f16 tops out at 65504: a set of values with larger ones goes as bf16 instead.
const F16_SAFE_MAX: f32 = 65000.0;

/// Element type of encoded activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    /// bfloat16: f32's range in 2 bytes; used instead of F16 for values that would
    /// overflow f16 (Gemma's residual stream does).
    BF16,
}

impl Dtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
        }
    }

    /// The type `values` travel as when `self` is asked for: BF16 (the same size)
    /// in place of F16 when a value is beyond f16's range, else `self`.
    pub fn fitting(self, values: &[f32]) -> Dtype {
        if self == Dtype::F16 && values.iter().any(|v| v.abs() > F16_SAFE_MAX) {
            Dtype::BF16
        } else {
            self
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Encoded activations that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("activation of {len} bytes is not whole {dtype} values")]
    BadLength { len: usize, dtype: Dtype },
}

/// Bytes of `n` values encoded as `dtype` (None on overflow).
pub fn encoded_len(n: usize, dtype: Dtype) -> Option<usize> {
    n.checked_mul(dtype.size())
}

/// Appends `values` to `out` as little-endian `dtype` values. F16 and BF16 round
/// to nearest, ties to even; F16 turns values beyond its range into infinities
/// (see [`Dtype::fitting`]), BF16 keeps NaN a NaN.
pub fn encode(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        Dtype::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        Dtype::BF16 => out.extend(values.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes())),
        Dtype::F16 => {
            let mut half = [0u16; F16_CHUNK];
            for chunk in values.chunks(F16_CHUNK) {
                let half = &mut half[..chunk.len()];
                ggml_shim::f32_to_f16_bits(chunk, half);
                out.extend(half.iter().flat_map(|h| h.to_le_bytes()));
            }
        }
    }
}

/// Decodes little-endian `dtype` values into `out` (cleared first); fails when
/// `bytes` is not a whole number of values.
pub fn decode(bytes: &[u8], dtype: Dtype, out: &mut Vec<f32>) -> Result<(), CodecError> {
    out.clear();
    if !bytes.len().is_multiple_of(dtype.size()) {
        return Err(CodecError::BadLength {
            len: bytes.len(),
            dtype,
        });
    }
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
        Dtype::F16 => {
            let mut half = [0u16; F16_CHUNK];
            let mut wide = [0f32; F16_CHUNK];
            for chunk in bytes.chunks(2 * F16_CHUNK) {
                let n = chunk.len() / 2;
                for (h, c) in half.iter_mut().zip(chunk.chunks_exact(2)) {
                    *h = u16::from_le_bytes([c[0], c[1]]);
                }
                ggml_shim::f16_bits_to_f32(&half[..n], &mut wide[..n]);
                out.extend_from_slice(&wide[..n]);
            }
        }
    }
    Ok(())
}

/// Rounds an f32 to bfloat16 (nearest, ties to even; NaN stays NaN).
fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

    fn roundtrip(values: &[f32], dtype: Dtype) -> Vec<f32> {
        let mut bytes = vec![0xAA]; // encode appends
        encode(values, dtype, &mut bytes);
        assert_eq!(bytes.len(), 1 + values.len() * dtype.size());
        assert_eq!(encoded_len(values.len(), dtype), Some(bytes.len() - 1));
        let mut out = vec![9.0; 3]; // decode clears
        decode(&bytes[1..], dtype, &mut out).expect("decode");
        out
    }

    #[test]
    fn values_exact_in_every_type_roundtrip_exactly() {
        let values = [0.5f32, -1.0, 2.0, 0.25, 1.5, -0.125, 3.0, 0.0, -0.0, 1024.0];
        for dtype in ALL {
            assert_eq!(roundtrip(&values, dtype), values, "{dtype}");
        }
    }

    #[test]
    fn f32_roundtrips_every_bit() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 123.456).collect();
        assert_eq!(roundtrip(&values, Dtype::F32), values);
    }

    #[test]
    fn halves_keep_their_precision_across_chunks() {
        // more than one F16 chunk, with a partial last one
        let values: Vec<f32> = (0..(2 * F16_CHUNK + 17))
            .map(|i| (i as f32 - 300.0) / 7.3)
            .collect();
        for (dtype, bits) in [(Dtype::F16, 11), (Dtype::BF16, 8)] {
            let back = roundtrip(&values, dtype);
            assert_eq!(back.len(), values.len());
            let eps = 1.0 / (1u32 << bits) as f32;
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * eps + 1e-6, "{dtype}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn f16_falls_back_to_bf16_beyond_its_range() {
        assert_eq!(Dtype::F16.fitting(&[1.0, -65000.0]), Dtype::F16);
        assert_eq!(Dtype::F16.fitting(&[1.0, -70000.0]), Dtype::BF16);
        assert_eq!(Dtype::F32.fitting(&[1e30]), Dtype::F32);
        let big = [70_000.0f32, -3.0e38];
        let back = roundtrip(&big, Dtype::BF16);
        assert!((back[0] - 70_000.0).abs() <= 70_000.0 / 256.0);
        assert!(back[1].is_finite() && back[1] < -2.9e38);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        // halfway between 0x3F80 and 0x3F81: to the even one
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert!(roundtrip(&[f32::NAN], Dtype::BF16)[0].is_nan());
        assert_eq!(roundtrip(&[f32::INFINITY], Dtype::BF16)[0], f32::INFINITY);
    }

    #[test]
    fn bad_lengths_are_refused() {
        let mut out = Vec::new();
        for (dtype, len) in [
            (Dtype::F32, 5),
            (Dtype::F32, 2),
            (Dtype::F16, 3),
            (Dtype::BF16, 1),
        ] {
            let err = decode(&vec![0u8; len], dtype, &mut out).unwrap_err();
            assert_eq!(err, CodecError::BadLength { len, dtype });
        }
        assert_eq!(
            decode(&[0u8; 5], Dtype::F32, &mut out)
                .unwrap_err()
                .to_string(),
            "activation of 5 bytes is not whole f32 values"
        );
        decode(&[], Dtype::F16, &mut out).expect("nothing is whole");
        assert!(out.is_empty());
        assert_eq!(encoded_len(usize::MAX, Dtype::F32), None);
    }
}
