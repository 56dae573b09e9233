//! Thin safe layer over ggml, gguf and llama.cpp (through `llama-cpp-sys-2`).
//!
//! Every `unsafe` block of the project lives in this crate, each with a one-line
//! `SAFETY:` reason. The crate knows nothing of exo: it offers RAII contexts,
//! graphs, CPU backend and buffers, a GGUF reader and writer, llama.cpp's
//! vocabulary, samplers and full model (the oracle), and matrix products for
//! quantized weights that prefetch them (`qmatmul`, bit-identical to ggml's), and
//! products whose every column has the bits of a one-token product (`columns`).
//! It also holds the few nng calls the async nng binding does not offer (`nng`:
//! receive-size caps and a connection gate), so that they too stay out of the daemon.

pub mod backend;
pub mod columns;
pub mod cpu_guard;
pub mod ggml;
pub mod gguf;
pub mod llama;
pub mod malloc;
pub mod nng;
mod q4k_columns;
mod q6k_columns;
pub mod qmatmul;
pub mod writer;

pub use backend::{
    compute_progress, get_tensor_bytes, get_tensor_f32, set_tensor_data, Allocator, BackendError,
    CpuBackend, Placement, TensorSpec, TensorStore,
};
pub use ggml::{DType, GraphBuilder, RopeParams, Tensor};
pub use gguf::{Gguf, GgufError, TensorInfo, Value};

pub use ggml_sys as sys;

/// Converts f32 values to IEEE half precision bits, as ggml does.
pub fn f32_to_f16_bits(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    // SAFETY: both slices have at least n elements; ggml_fp16_t is u16.
    unsafe { sys::ggml_fp32_to_fp16_row(src.as_ptr(), dst.as_mut_ptr(), n as i64) };
}

/// Converts half precision bits to f32.
pub fn f16_bits_to_f32(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    // SAFETY: both slices have at least n elements.
    unsafe { sys::ggml_fp16_to_fp32_row(src.as_ptr(), dst.as_mut_ptr(), n as i64) };
}

/// What the CPU build of ggml uses, e.g. "AVX2 FMA F16C" (for logs and `exo inspect`).
pub fn cpu_features() -> String {
    let mut f = Vec::new();
    // SAFETY: pure feature queries.
    unsafe {
        for (on, name) in [
            (sys::ggml_cpu_has_avx2(), "AVX2"),
            (sys::ggml_cpu_has_fma(), "FMA"),
            (sys::ggml_cpu_has_f16c(), "F16C"),
            (sys::ggml_cpu_has_avx512(), "AVX512"),
            (sys::ggml_cpu_has_avx_vnni(), "AVX_VNNI"),
            (sys::ggml_cpu_has_neon(), "NEON"),
            (sys::ggml_cpu_has_dotprod(), "DOTPROD"),
            (sys::ggml_cpu_has_matmul_int8(), "I8MM"),
        ] {
            if on != 0 {
                f.push(name);
            }
        }
    }
    f.join(" ")
}

/// A deterministic pseudo-random stream (xorshift), for the kernels' test data.
#[cfg(test)]
mod test_rng {
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A value in [-1, 1].
        pub(crate) fn unit(&mut self) -> f32 {
            (self.next() % 20001) as f32 / 10000.0 - 1.0
        }
    }
}
