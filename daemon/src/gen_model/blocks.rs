//! The bytes of a generated tensor: random quantized blocks with a fixed super-block
//! scale, or F32 values.
//!
//! A block of random bytes is a valid block of its type: every bit pattern of the
//! quants and of the 6-bit (Q4_K) or 8-bit (Q6_K) sub-block scales decodes to finite
//! values; only the f16 super-block scales must be finite, and those are set here.
//! Their size follows from the spread wanted ([`quant_unit_std`]).

use ggml_shim::writer::WriterType;

use super::{Fill, GenTensor};

/// Bytes of one Q4_K block: `d`, `dmin` (f16), 12 bytes of packed 6-bit scales and mins,
/// 128 bytes of 4-bit quants.
const Q4_K_BLOCK: usize = 144;
/// Bytes of one Q6_K block: 128 bytes of low quant bits, 64 of high bits, 16 int8
/// scales, then `d` (f16).
const Q6_K_BLOCK: usize = 210;
/// Offset of `d` in a Q6_K block.
const Q6_K_D_OFFSET: usize = 208;

/// Q4_K decodes `d * sc * q - dmin * m` with `sc`, `m` in 0..=63 and `q` in 0..=15: with
/// `dmin = 7.5 d` (`E[sc] E[q] / E[m]`), random bytes give values of mean zero.
const Q4_K_DMIN_PER_D: f32 = 7.5;

/// Standard deviation of the values of uniformly random blocks of `ty` whose super-block
/// scale `d` is 1 (and, for Q4_K, `dmin` = 7.5): for uniform `sc`, `m` in 0..=63 and `q`
/// in 0..=15, Q4_K's `E[(sc q - 7.5 m)^2]` is 1333.5 * 77.5 - 15 * 236.25 * 31.5 +
/// 56.25 * 1333.5 = 66727.5; Q6_K decodes `d * sc * (q - 32)` with int8 `sc` and `q` in
/// 0..=63, `E[sc^2] E[(q - 32)^2]` = 5461.5 * 341.5. `None` for types not generated.
pub fn quant_unit_std(ty: WriterType) -> Option<f32> {
    match ty {
        WriterType::Q4_K => Some(66_727.5f32.sqrt()),
        WriterType::Q6_K => Some((5461.5f32 * 341.5).sqrt()),
        _ => None,
    }
}

/// The f16 bits of `x` (ggml's conversion), little-endian.
fn f16_le(x: f32) -> [u8; 2] {
    let mut bits = [0u16];
    ggml_shim::f32_to_f16_bits(&[x], &mut bits);
    bits[0].to_le_bytes()
}

/// What a [`BlockFiller`] writes.
#[derive(Debug)]
enum Content {
    /// Random Q4_K blocks with these `d` and `dmin`.
    Q4K { d: [u8; 2], dmin: [u8; 2] },
    /// Random Q6_K blocks with this `d`.
    Q6K { d: [u8; 2] },
    /// F32 values uniform in `center ± half_width`.
    Uniform { center: f32, half_width: f32 },
    /// These F32 values, from `next` on.
    Values { values: Vec<f32>, next: usize },
}

/// Produces a tensor's bytes in order, chunk by chunk.
#[derive(Debug)]
pub struct BlockFiller {
    content: Content,
    rng: fastrand::Rng,
}

/// The generator of tensor `name` under `seed`: FNV-1a of the name mixed with the seed,
/// so a tensor's bytes do not depend on the other tensors.
fn tensor_rng(seed: u64, name: &str) -> fastrand::Rng {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    fastrand::Rng::with_seed(seed ^ h.rotate_left(17))
}

impl BlockFiller {
    /// The filler of `t` under `seed`; `None` when `t.fill` does not suit `t.ty`
    /// (random blocks are made for Q4_K and Q6_K, values for F32).
    pub fn new(t: &GenTensor, seed: u64) -> Option<BlockFiller> {
        let content = match (&t.fill, t.ty) {
            (Fill::Quant { std }, WriterType::Q4_K) => {
                let d = std / quant_unit_std(WriterType::Q4_K)?;
                Content::Q4K {
                    d: f16_le(d),
                    dmin: f16_le(d * Q4_K_DMIN_PER_D),
                }
            }
            (Fill::Quant { std }, WriterType::Q6_K) => Content::Q6K {
                d: f16_le(std / quant_unit_std(WriterType::Q6_K)?),
            },
            (Fill::Uniform { center, half_width }, WriterType::F32) => Content::Uniform {
                center: *center,
                half_width: *half_width,
            },
            (Fill::Values(v), WriterType::F32) => Content::Values {
                values: v.clone(),
                next: 0,
            },
            _ => return None,
        };
        Some(BlockFiller {
            content,
            rng: tensor_rng(seed, &t.name),
        })
    }

    /// Writes the next `chunk.len()` bytes of the tensor: whole blocks (or f32 values),
    /// continuing where the previous chunk ended.
    pub fn fill(&mut self, chunk: &mut [u8]) {
        match &mut self.content {
            Content::Q4K { d, dmin } => {
                self.rng.fill(chunk);
                for block in chunk.chunks_exact_mut(Q4_K_BLOCK) {
                    block[0..2].copy_from_slice(d);
                    block[2..4].copy_from_slice(dmin);
                }
            }
            Content::Q6K { d } => {
                self.rng.fill(chunk);
                for block in chunk.chunks_exact_mut(Q6_K_BLOCK) {
                    block[Q6_K_D_OFFSET..].copy_from_slice(d);
                }
            }
            Content::Uniform { center, half_width } => {
                for out in chunk.chunks_exact_mut(4) {
                    let u = 2.0 * self.rng.f32() - 1.0;
                    out.copy_from_slice(&(*center + *half_width * u).to_le_bytes());
                }
            }
            Content::Values { values, next } => {
                for out in chunk.chunks_exact_mut(4) {
                    let v = values.get(*next).copied().unwrap_or(0.0);
                    out.copy_from_slice(&v.to_le_bytes());
                    *next += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_shim::writer::weight_values;

    fn tensor(ty: WriterType, fill: Fill, ne: Vec<usize>) -> GenTensor {
        GenTensor {
            name: "blk.0.test.weight".into(),
            ne,
            ty,
            fill,
        }
    }

    #[test]
    fn block_layouts_match_ggml() {
        assert_eq!(WriterType::Q4_K.row_size(256), Q4_K_BLOCK);
        assert_eq!(WriterType::Q6_K.row_size(256), Q6_K_BLOCK);
    }

    /// Random blocks decoded by ggml: finite, mean near zero, spread as asked, in
    /// chunks of any whole number of blocks.
    #[test]
    fn random_blocks_decode_to_the_asked_spread() {
        let (ne0, rows) = (4096, 64);
        for ty in [WriterType::Q4_K, WriterType::Q6_K] {
            for std in [1.0 / 64.0, 0.5] {
                let t = tensor(ty, Fill::Quant { std }, vec![ne0, rows]);
                let mut filler = BlockFiller::new(&t, 7).expect("filler");
                let mut bytes = vec![0u8; t.nbytes()];
                let block = ty.row_size(256);
                let (head, tail) = bytes.split_at_mut(block * 3);
                filler.fill(head);
                filler.fill(tail);
                let values = weight_values(ty, ne0, &bytes).expect("dequantize");
                assert_eq!(values.len(), ne0 * rows);
                assert!(values.iter().all(|v| v.is_finite()), "{ty:?}");
                let n = values.len() as f64;
                let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = values
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                let got = var.sqrt() as f32;
                assert!(
                    (got / std - 1.0).abs() < 0.05,
                    "{ty:?}: std {got}, asked {std}"
                );
                assert!(mean.abs() < 0.05 * f64::from(std), "{ty:?}: mean {mean}");
            }
        }
    }

    #[test]
    fn values_and_uniform_fill_f32() {
        let t = tensor(WriterType::F32, Fill::Values(vec![1.0, 2.5, -3.0]), vec![3]);
        let mut bytes = vec![0u8; 12];
        BlockFiller::new(&t, 1).expect("filler").fill(&mut bytes);
        assert_eq!(
            weight_values(WriterType::F32, 3, &bytes).expect("f32"),
            [1.0, 2.5, -3.0]
        );
        let fill = Fill::Uniform {
            center: 1.0,
            half_width: 0.1,
        };
        let t = tensor(WriterType::F32, fill, vec![1000]);
        let mut bytes = vec![0u8; 4000];
        BlockFiller::new(&t, 1).expect("filler").fill(&mut bytes);
        let v = weight_values(WriterType::F32, 1000, &bytes).expect("f32");
        assert!(v.iter().all(|x| (0.9..=1.1).contains(x)));
        assert!(v.iter().any(|x| *x < 0.95) && v.iter().any(|x| *x > 1.05));
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let t = tensor(WriterType::Q4_K, Fill::Quant { std: 0.01 }, vec![256, 4]);
        let bytes = |seed| {
            let mut b = vec![0u8; t.nbytes()];
            BlockFiller::new(&t, seed).expect("filler").fill(&mut b);
            b
        };
        assert_eq!(bytes(3), bytes(3));
        assert_ne!(bytes(3), bytes(4));
    }

    #[test]
    fn a_fill_that_does_not_suit_the_type_is_refused() {
        let t = tensor(WriterType::Q8_0, Fill::Quant { std: 0.01 }, vec![256]);
        assert!(BlockFiller::new(&t, 0).is_none());
        let t = tensor(WriterType::Q4_K, Fill::Values(vec![0.0]), vec![256]);
        assert!(BlockFiller::new(&t, 0).is_none());
    }
}
