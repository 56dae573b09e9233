//! GGUF writer over ggml's `gguf_*` C API.
//!
//! [`GgufWriter`] collects key/value pairs and tensors (given as `f32` and converted or
//! quantized to the requested [`WriterType`] on insertion), then writes a GGUF file that
//! llama.cpp and ggml read. The metadata is serialized by ggml (`gguf_get_meta_data`); the
//! tensor data, which the writer owns, is streamed after it from Rust so that I/O errors
//! surface as [`std::io::Error`].
//!
//! Shapes are given in ggml order: `ne0` (the contiguous row length) first. A matrix that
//! maps `n_in` inputs to `n_out` outputs is therefore `[n_in, n_out]`, and its data is
//! `n_out` rows of `n_in` values each.

use std::collections::HashSet;
use std::ffi::{c_char, CStr, CString};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use ggml_sys as sys;

/// Largest tensor name ggml stores (`GGML_MAX_NAME` - 1 for the terminating NUL).
pub const MAX_TENSOR_NAME: usize = 63;

/// Largest number of dimensions of a ggml tensor (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

const KEY_ALIGNMENT: &str = "general.alignment";

/// Errors of [`GgufWriter`].
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// A key, tensor name or string value contains a NUL byte.
    #[error("{what} contains a NUL byte: {value:?}")]
    InteriorNul {
        /// What was being set ("key", "string value", "tensor name", "path").
        what: &'static str,
        /// The offending text (lossy for paths).
        value: String,
    },
    /// The key is reserved: `general.alignment` cannot be set, because ggml's writer keeps
    /// laying tensors out with the default alignment (32) whatever the key says, which makes
    /// an unreadable file (and ggml aborts on a non-u32 value).
    #[error("key {0:?} is reserved")]
    ReservedKey(String),
    /// The tensor name is empty or longer than [`MAX_TENSOR_NAME`] bytes.
    #[error("tensor name {0:?} is empty or longer than {MAX_TENSOR_NAME} bytes")]
    BadTensorName(String),
    /// A tensor of that name was already added.
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    /// The shape has no dimension, more than [`MAX_DIMS`], or a zero dimension.
    #[error("tensor {name:?}: invalid shape {shape:?} (1..=4 non-zero dimensions)")]
    BadShape {
        /// Tensor name.
        name: String,
        /// The rejected shape.
        shape: Vec<usize>,
    },
    /// The data length does not match the product of the shape.
    #[error("tensor {name:?}: shape {shape:?} needs {expected} values, got {got}")]
    DataLength {
        /// Tensor name.
        name: String,
        /// The shape.
        shape: Vec<usize>,
        /// Elements (or bytes for raw data) the shape needs.
        expected: usize,
        /// Elements (or bytes) given.
        got: usize,
    },
    /// `ne0` is not a multiple of the block size of the requested type.
    #[error("tensor {name:?}: ne0 = {ne0} is not a multiple of the {ty:?} block size {block}")]
    BlockSize {
        /// Tensor name.
        name: String,
        /// Requested type.
        ty: WriterType,
        /// First dimension.
        ne0: usize,
        /// Block size of `ty`.
        block: usize,
    },
    /// A value is non-finite where ggml's quantizers need finite input.
    #[error("tensor {name:?}: non-finite value at index {index}")]
    NonFinite {
        /// Tensor name.
        name: String,
        /// First offending element.
        index: usize,
    },
    /// ggml reported something the writer did not expect (a null context, a size mismatch).
    #[error("ggml: {0}")]
    Ggml(String),
    /// Writing the file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// File being written.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Storage type of a tensor written by [`GgufWriter`].
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriterType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, blocks of 32, one scale.
    Q4_0,
    /// 4-bit, blocks of 32, scale and min.
    Q4_1,
    /// 5-bit, blocks of 32, one scale.
    Q5_0,
    /// 5-bit, blocks of 32, scale and min.
    Q5_1,
    /// 8-bit, blocks of 32, one scale.
    Q8_0,
    /// k-quant 2-bit (super-blocks of 256).
    Q2_K,
    /// k-quant 3-bit (super-blocks of 256).
    Q3_K,
    /// k-quant 4-bit (super-blocks of 256).
    Q4_K,
    /// k-quant 5-bit (super-blocks of 256).
    Q5_K,
    /// k-quant 6-bit (super-blocks of 256).
    Q6_K,
}

impl WriterType {
    /// Every supported type.
    pub const ALL: [WriterType; 13] = [
        WriterType::F32,
        WriterType::F16,
        WriterType::BF16,
        WriterType::Q4_0,
        WriterType::Q4_1,
        WriterType::Q5_0,
        WriterType::Q5_1,
        WriterType::Q8_0,
        WriterType::Q2_K,
        WriterType::Q3_K,
        WriterType::Q4_K,
        WriterType::Q5_K,
        WriterType::Q6_K,
    ];

    /// The matching `ggml_type`.
    pub fn to_ggml(self) -> sys::ggml_type {
        match self {
            WriterType::F32 => sys::GGML_TYPE_F32,
            WriterType::F16 => sys::GGML_TYPE_F16,
            WriterType::BF16 => sys::GGML_TYPE_BF16,
            WriterType::Q4_0 => sys::GGML_TYPE_Q4_0,
            WriterType::Q4_1 => sys::GGML_TYPE_Q4_1,
            WriterType::Q5_0 => sys::GGML_TYPE_Q5_0,
            WriterType::Q5_1 => sys::GGML_TYPE_Q5_1,
            WriterType::Q8_0 => sys::GGML_TYPE_Q8_0,
            WriterType::Q2_K => sys::GGML_TYPE_Q2_K,
            WriterType::Q3_K => sys::GGML_TYPE_Q3_K,
            WriterType::Q4_K => sys::GGML_TYPE_Q4_K,
            WriterType::Q5_K => sys::GGML_TYPE_Q5_K,
            WriterType::Q6_K => sys::GGML_TYPE_Q6_K,
        }
    }

    /// The supported type matching a `ggml_type`, if any.
    pub fn from_ggml(ty: sys::ggml_type) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.to_ggml() == ty)
    }

    /// Elements per block: `ne0` must be a multiple of it.
    pub fn block_size(self) -> usize {
        match self {
            WriterType::F32 | WriterType::F16 | WriterType::BF16 => 1,
            WriterType::Q4_0
            | WriterType::Q4_1
            | WriterType::Q5_0
            | WriterType::Q5_1
            | WriterType::Q8_0 => 32,
            WriterType::Q2_K
            | WriterType::Q3_K
            | WriterType::Q4_K
            | WriterType::Q5_K
            | WriterType::Q6_K => 256,
        }
    }

    /// Bytes of one row of `ne0` elements (`ne0` must be a multiple of the block size).
    pub fn row_size(self, ne0: usize) -> usize {
        // SAFETY: ggml_row_size only reads the static type-traits table for a valid type.
        unsafe { sys::ggml_row_size(self.to_ggml(), ne0 as i64) }
    }

    /// ggml's name of the type ("f32", "q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            WriterType::F32 => "f32",
            WriterType::F16 => "f16",
            WriterType::BF16 => "bf16",
            WriterType::Q4_0 => "q4_0",
            WriterType::Q4_1 => "q4_1",
            WriterType::Q5_0 => "q5_0",
            WriterType::Q5_1 => "q5_1",
            WriterType::Q8_0 => "q8_0",
            WriterType::Q2_K => "q2_K",
            WriterType::Q3_K => "q3_K",
            WriterType::Q4_K => "q4_K",
            WriterType::Q5_K => "q5_K",
            WriterType::Q6_K => "q6_K",
        }
    }
}

impl From<WriterType> for crate::ggml::DType {
    fn from(ty: WriterType) -> Self {
        // Every WriterType is a valid ggml type, so from_raw always succeeds.
        crate::ggml::DType::from_raw(ty.to_ggml()).unwrap_or(crate::ggml::DType::F32)
    }
}

impl TryFrom<crate::ggml::DType> for WriterType {
    type Error = crate::ggml::DType;

    /// The writer type of a [`crate::ggml::DType`]; the type itself back when the writer
    /// cannot produce it.
    fn try_from(ty: crate::ggml::DType) -> Result<Self, Self::Error> {
        WriterType::from_ggml(ty.raw()).ok_or(ty)
    }
}

/// Tensor data owned by the writer, 8-byte aligned for ggml's block structs.
struct TensorData {
    words: Vec<u64>,
    nbytes: usize,
}

impl TensorData {
    fn zeroed(nbytes: usize) -> Self {
        TensorData {
            words: vec![0u64; nbytes.div_ceil(8)],
            nbytes,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `nbytes` initialized bytes; u8 has no alignment need.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.nbytes) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.nbytes) }
    }
}

/// Rows of `ne0` values (`data.len() / ne0` of them) stored as `ty`: converted (f16,
/// bf16), quantized by ggml's own quantizers, or copied (f32). `ne0` must be a
/// multiple of the type's block size and the values finite for non-f32 types (the
/// callers check both).
fn encode_rows(ty: WriterType, ne0: usize, data: &[f32]) -> Result<TensorData, String> {
    let nrows = data.len() / ne0.max(1);
    let mut buf = TensorData::zeroed(ty.row_size(ne0) * nrows);
    if ty == WriterType::F32 {
        for (dst, v) in buf.bytes_mut().chunks_exact_mut(4).zip(data) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        return Ok(buf);
    }
    // SAFETY: `data` holds nrows*ne0 floats; `buf` holds ggml_row_size(ty, ne0)*nrows
    // 8-aligned bytes; ne0 is a multiple of the block size and no supported type
    // needs an importance matrix, so ggml's asserts hold.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty.to_ggml(),
            data.as_ptr(),
            buf.words.as_mut_ptr().cast(),
            0,
            nrows as i64,
            ne0 as i64,
            std::ptr::null(),
        )
    };
    if written != buf.nbytes {
        return Err(format!(
            "quantizer wrote {written} bytes, expected {}",
            buf.nbytes
        ));
    }
    Ok(buf)
}

/// The bytes of `values` (rows of `ne0`) stored as `ty`, as a GGUF file or a
/// [`crate::TensorStore`] takes them; for tests and benchmarks that make weights.
pub fn weight_bytes(ty: WriterType, ne0: usize, values: &[f32]) -> Result<Vec<u8>, WriterError> {
    let block = ty.block_size();
    if ne0 == 0 || !ne0.is_multiple_of(block) || !values.len().is_multiple_of(ne0) {
        return Err(WriterError::BlockSize {
            name: "weights".into(),
            ty,
            ne0,
            block,
        });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(WriterError::NonFinite {
            name: "weights".into(),
            index,
        });
    }
    Ok(encode_rows(ty, ne0, values)
        .map_err(WriterError::Ggml)?
        .bytes()
        .to_vec())
}

/// The data of one tensor: held by the writer, or produced while writing.
enum Payload {
    /// Converted when added, kept until written.
    Held(TensorData),
    /// Asked of the caller of [`GgufWriter::write_streamed`], in chunks of whole rows.
    Streamed {
        /// Bytes of the tensor.
        nbytes: usize,
        /// Bytes of one row.
        row_bytes: usize,
    },
}

impl Payload {
    fn nbytes(&self) -> usize {
        match self {
            Payload::Held(data) => data.nbytes,
            Payload::Streamed { nbytes, .. } => *nbytes,
        }
    }
}

/// Most bytes of a streamed tensor asked for at once (rounded down to whole rows, at
/// least one row).
const STREAM_CHUNK: usize = 4 << 20;

/// The values of `bytes` (rows of `ne0` values stored as `ty`) as ggml decodes them:
/// the inverse of [`weight_bytes`] up to the quantization error.
pub fn weight_values(ty: WriterType, ne0: usize, bytes: &[u8]) -> Result<Vec<f32>, WriterError> {
    let block = ty.block_size();
    if ne0 == 0 || !ne0.is_multiple_of(block) {
        return Err(WriterError::BlockSize {
            name: "weights".into(),
            ty,
            ne0,
            block,
        });
    }
    let row = ty.row_size(ne0);
    if !bytes.len().is_multiple_of(row) {
        return Err(WriterError::DataLength {
            name: "weights".into(),
            shape: vec![ne0],
            expected: bytes.len().next_multiple_of(row),
            got: bytes.len(),
        });
    }
    let n = bytes.len() / row * ne0;
    if ty == WriterType::F32 {
        return Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect());
    }
    // ggml's block structs want their fields aligned: decode from an 8-aligned copy.
    let mut held = TensorData::zeroed(bytes.len());
    held.bytes_mut().copy_from_slice(bytes);
    let mut out = vec![0f32; n];
    // SAFETY: the traits table is static and every WriterType other than F32 has a
    // to_float; it reads n / block blocks (exactly `held.nbytes` 8-aligned bytes, as
    // n is a whole number of rows) and writes n floats into `out`.
    unsafe {
        let traits = sys::ggml_get_type_traits(ty.to_ggml());
        let to_float = (*traits)
            .to_float
            .ok_or_else(|| WriterError::Ggml(format!("{} has no to_float", ty.name())))?;
        to_float(held.words.as_ptr().cast(), out.as_mut_ptr(), n as i64);
    }
    Ok(out)
}

/// Builder of a GGUF file: key/value metadata plus tensors.
///
/// Tensor data is converted when added and kept by the writer until [`GgufWriter::write`],
/// except for tensors added with [`GgufWriter::add_tensor_streamed`], whose bytes the
/// caller produces while [`GgufWriter::write_streamed`] writes them (files larger than
/// memory).
pub struct GgufWriter {
    ctx: NonNull<sys::gguf_context>,
    data: Vec<Payload>,
    names: HashSet<String>,
}

// SAFETY: the gguf_context is owned exclusively by this value and has no thread affinity.
unsafe impl Send for GgufWriter {}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn cstring(what: &'static str, s: &str) -> Result<CString, WriterError> {
    CString::new(s).map_err(|_| WriterError::InteriorNul {
        what,
        value: s.to_owned(),
    })
}

fn key_cstring(key: &str) -> Result<CString, WriterError> {
    if key == KEY_ALIGNMENT {
        return Err(WriterError::ReservedKey(key.to_owned()));
    }
    cstring("key", key)
}

impl GgufWriter {
    /// An empty GGUF (no keys, no tensors).
    pub fn new() -> Self {
        // SAFETY: gguf_init_empty has no preconditions; it returns a fresh context or null.
        let raw = unsafe { sys::gguf_init_empty() };
        let ctx = NonNull::new(raw).unwrap_or_else(|| panic!("gguf_init_empty returned null"));
        GgufWriter {
            ctx,
            data: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// Raw context, for readers in this crate.
    pub fn as_ptr(&self) -> *const sys::gguf_context {
        self.ctx.as_ptr()
    }

    /// Number of key/value pairs set so far.
    pub fn n_kv(&self) -> usize {
        // SAFETY: ctx is a valid gguf_context owned by self.
        unsafe { sys::gguf_get_n_kv(self.ctx.as_ptr()) as usize }
    }

    /// Number of tensors added so far.
    pub fn n_tensors(&self) -> usize {
        self.data.len()
    }

    /// Sets a string value (replacing any value of that key).
    pub fn set_str(&mut self, key: &str, value: &str) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        let v = cstring("string value", value)?;
        // SAFETY: ctx is valid; both strings are NUL-terminated and copied by ggml.
        unsafe { sys::gguf_set_val_str(self.ctx.as_ptr(), k.as_ptr(), v.as_ptr()) };
        Ok(())
    }

    /// Sets a u32 value.
    pub fn set_u32(&mut self, key: &str, value: u32) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        // SAFETY: ctx is valid; the key is NUL-terminated.
        unsafe { sys::gguf_set_val_u32(self.ctx.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    /// Sets an i32 value.
    pub fn set_i32(&mut self, key: &str, value: i32) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        // SAFETY: ctx is valid; the key is NUL-terminated.
        unsafe { sys::gguf_set_val_i32(self.ctx.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    /// Sets a u64 value.
    pub fn set_u64(&mut self, key: &str, value: u64) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        // SAFETY: ctx is valid; the key is NUL-terminated.
        unsafe { sys::gguf_set_val_u64(self.ctx.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    /// Sets an f32 value.
    pub fn set_f32(&mut self, key: &str, value: f32) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        // SAFETY: ctx is valid; the key is NUL-terminated.
        unsafe { sys::gguf_set_val_f32(self.ctx.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    /// Sets a bool value.
    pub fn set_bool(&mut self, key: &str, value: bool) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        // SAFETY: ctx is valid; the key is NUL-terminated.
        unsafe { sys::gguf_set_val_bool(self.ctx.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    /// Sets an array of strings.
    pub fn set_arr_str<S: AsRef<str>>(
        &mut self,
        key: &str,
        values: &[S],
    ) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        let owned = values
            .iter()
            .map(|s| cstring("string value", s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ptrs: Vec<*const c_char> = owned.iter().map(|s| s.as_ptr()).collect();
        // SAFETY: ctx is valid; `ptrs` holds `len` NUL-terminated strings alive for the call,
        // which ggml copies.
        unsafe {
            sys::gguf_set_arr_str(self.ctx.as_ptr(), k.as_ptr(), ptrs.as_mut_ptr(), ptrs.len())
        };
        Ok(())
    }

    fn set_arr_pod<T: Copy>(
        &mut self,
        key: &str,
        ty: sys::gguf_type,
        values: &[T],
    ) -> Result<(), WriterError> {
        let k = key_cstring(key)?;
        // SAFETY: ctx is valid; `values` is `len` contiguous elements of the size of `ty`
        // (callers pair T with the matching gguf type), which ggml copies.
        unsafe {
            sys::gguf_set_arr_data(
                self.ctx.as_ptr(),
                k.as_ptr(),
                ty,
                values.as_ptr().cast(),
                values.len(),
            )
        };
        Ok(())
    }

    /// Sets an array of f32.
    pub fn set_arr_f32(&mut self, key: &str, values: &[f32]) -> Result<(), WriterError> {
        self.set_arr_pod(key, sys::GGUF_TYPE_FLOAT32, values)
    }

    /// Sets an array of i32.
    pub fn set_arr_i32(&mut self, key: &str, values: &[i32]) -> Result<(), WriterError> {
        self.set_arr_pod(key, sys::GGUF_TYPE_INT32, values)
    }

    /// Sets an array of u32.
    pub fn set_arr_u32(&mut self, key: &str, values: &[u32]) -> Result<(), WriterError> {
        self.set_arr_pod(key, sys::GGUF_TYPE_UINT32, values)
    }

    /// Sets an array of bools (stored as one byte each).
    pub fn set_arr_bool(&mut self, key: &str, values: &[bool]) -> Result<(), WriterError> {
        self.set_arr_pod(key, sys::GGUF_TYPE_BOOL, values)
    }

    fn check_tensor(
        &self,
        name: &str,
        shape: &[usize],
        ty: WriterType,
    ) -> Result<(CString, usize), WriterError> {
        if name.is_empty() || name.len() > MAX_TENSOR_NAME {
            return Err(WriterError::BadTensorName(name.to_owned()));
        }
        let cname = cstring("tensor name", name)?;
        if self.names.contains(name) {
            return Err(WriterError::DuplicateTensor(name.to_owned()));
        }
        let bad_shape = || WriterError::BadShape {
            name: name.to_owned(),
            shape: shape.to_vec(),
        };
        if shape.is_empty() || shape.len() > MAX_DIMS || shape.contains(&0) {
            return Err(bad_shape());
        }
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(bad_shape)?;
        let block = ty.block_size();
        if !shape[0].is_multiple_of(block) {
            return Err(WriterError::BlockSize {
                name: name.to_owned(),
                ty,
                ne0: shape[0],
                block,
            });
        }
        Ok((cname, n))
    }

    /// Registers the tensor's metadata with the gguf context and keeps its data.
    fn push_tensor(
        &mut self,
        name: &str,
        cname: &CString,
        shape: &[usize],
        ty: WriterType,
        data: Payload,
    ) -> Result<(), WriterError> {
        let params = sys::ggml_init_params {
            // SAFETY: ggml_tensor_overhead has no preconditions.
            mem_size: unsafe { sys::ggml_tensor_overhead() },
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: the params ask ggml to allocate room for exactly one tensor object.
        let gctx = unsafe { sys::ggml_init(params) };
        if gctx.is_null() {
            return Err(WriterError::Ggml("ggml_init returned null".into()));
        }
        let ne: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // SAFETY: gctx has room for one tensor object (no data: no_alloc); `ne` has
        // `shape.len()` (1..=4) entries and ne0 is a multiple of the block size.
        let t = unsafe { sys::ggml_new_tensor(gctx, ty.to_ggml(), ne.len() as i32, ne.as_ptr()) };
        if t.is_null() {
            // SAFETY: gctx came from ggml_init and is freed once.
            unsafe { sys::ggml_free(gctx) };
            return Err(WriterError::Ggml("ggml_new_tensor returned null".into()));
        }
        // SAFETY: t is a live tensor of gctx; the name is NUL-terminated and shorter than
        // GGML_MAX_NAME. gguf_add_tensor copies the tensor struct (name and shape included)
        // and the name was checked to be new, so ggml does not abort.
        let nbytes = unsafe {
            sys::ggml_set_name(t, cname.as_ptr());
            sys::gguf_add_tensor(self.ctx.as_ptr(), t);
            sys::ggml_nbytes(t)
        };
        // SAFETY: gctx came from ggml_init and is freed once; nothing refers to it anymore.
        unsafe { sys::ggml_free(gctx) };
        if nbytes != data.nbytes() {
            return Err(WriterError::Ggml(format!(
                "tensor {name:?}: ggml expects {nbytes} bytes, converted {}",
                data.nbytes()
            )));
        }
        self.names.insert(name.to_owned());
        self.data.push(data);
        Ok(())
    }

    /// Adds a tensor from `f32` values, stored converted (f16, bf16) or quantized to `ty`.
    ///
    /// `shape` is in ggml order (`ne0` first) and `data` holds `prod(shape)` values, row
    /// after row. `ne0` must be a multiple of `ty.block_size()` (256 for k-quants).
    pub fn add_tensor_f32(
        &mut self,
        name: &str,
        shape: &[usize],
        data: &[f32],
        ty: WriterType,
    ) -> Result<(), WriterError> {
        let (cname, n) = self.check_tensor(name, shape, ty)?;
        if data.len() != n {
            return Err(WriterError::DataLength {
                name: name.to_owned(),
                shape: shape.to_vec(),
                expected: n,
                got: data.len(),
            });
        }
        if ty != WriterType::F32 {
            if let Some(index) = data.iter().position(|v| !v.is_finite()) {
                return Err(WriterError::NonFinite {
                    name: name.to_owned(),
                    index,
                });
            }
        }
        let buf = encode_rows(ty, shape[0], data)
            .map_err(|why| WriterError::Ggml(format!("tensor {name:?}: {why}")))?;
        self.push_tensor(name, &cname, shape, ty, Payload::Held(buf))
    }

    /// Adds a tensor from bytes already in the layout of `ty` (e.g. copied from another GGUF).
    pub fn add_tensor_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: WriterType,
        bytes: &[u8],
    ) -> Result<(), WriterError> {
        let (cname, n) = self.check_tensor(name, shape, ty)?;
        let expected = ty.row_size(shape[0]) * (n / shape[0]);
        if bytes.len() != expected {
            return Err(WriterError::DataLength {
                name: name.to_owned(),
                shape: shape.to_vec(),
                expected,
                got: bytes.len(),
            });
        }
        let mut buf = TensorData::zeroed(expected);
        buf.bytes_mut().copy_from_slice(bytes);
        self.push_tensor(name, &cname, shape, ty, Payload::Held(buf))
    }

    /// Adds a tensor whose bytes (in the layout of `ty`) the writer does not hold:
    /// [`GgufWriter::write_streamed`] asks for them while writing the file.
    pub fn add_tensor_streamed(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: WriterType,
    ) -> Result<(), WriterError> {
        let (cname, n) = self.check_tensor(name, shape, ty)?;
        let row_bytes = ty.row_size(shape[0]);
        let payload = Payload::Streamed {
            nbytes: row_bytes * (n / shape[0]),
            row_bytes,
        };
        self.push_tensor(name, &cname, shape, ty, payload)
    }

    /// The serialized metadata (header, key/values, tensor infos, padding).
    fn meta(&self) -> Vec<u8> {
        // SAFETY: ctx is valid.
        let size = unsafe { sys::gguf_get_meta_size(self.ctx.as_ptr()) };
        let mut meta = vec![0u8; size];
        // SAFETY: `meta` has exactly gguf_get_meta_size bytes, which is what ggml writes.
        unsafe { sys::gguf_get_meta_data(self.ctx.as_ptr(), meta.as_mut_ptr().cast()) };
        meta
    }

    /// Serializes the whole file into `out`; fails on a streamed tensor (see
    /// [`GgufWriter::write_streamed`]).
    pub fn write_to<W: Write>(&self, out: &mut W) -> std::io::Result<()> {
        self.write_streamed(out, |i, _| {
            Err(std::io::Error::other(format!(
                "tensor {i} is streamed: write the file with write_streamed"
            )))
        })
    }

    /// Serializes the whole file into `out`, asking `fill(index, chunk)` for the bytes of
    /// each streamed tensor (`index` counts tensors in the order they were added): the
    /// chunks of one tensor come in order, each a whole number of rows of at most 4 MiB
    /// (or one row), and together cover the tensor; `fill` writes every byte of each.
    pub fn write_streamed<W, F>(&self, out: &mut W, mut fill: F) -> std::io::Result<()>
    where
        W: Write,
        F: FnMut(usize, &mut [u8]) -> std::io::Result<()>,
    {
        let meta = self.meta();
        out.write_all(&meta)?;
        // SAFETY: ctx is valid.
        let alignment = unsafe { sys::gguf_get_alignment(self.ctx.as_ptr()) }.max(1);
        let zeros = vec![0u8; alignment];
        let mut chunk = Vec::new();
        let mut pos = 0usize;
        for (i, data) in self.data.iter().enumerate() {
            // SAFETY: ctx is valid and `i` < number of tensors added (one per `data` entry).
            let offset = unsafe { sys::gguf_get_tensor_offset(self.ctx.as_ptr(), i as i64) };
            if offset != pos {
                return Err(std::io::Error::other(format!(
                    "tensor {i}: data offset {offset}, writer at {pos}"
                )));
            }
            match data {
                Payload::Held(data) => out.write_all(data.bytes())?,
                Payload::Streamed { nbytes, row_bytes } => {
                    let rows_per_chunk = (STREAM_CHUNK / row_bytes).max(1);
                    chunk.resize((rows_per_chunk * row_bytes).min(*nbytes), 0);
                    let mut left = *nbytes;
                    while left > 0 {
                        let part = &mut chunk[..left.min(rows_per_chunk * row_bytes)];
                        fill(i, part)?;
                        out.write_all(part)?;
                        left -= part.len();
                    }
                }
            }
            pos += data.nbytes();
            let pad = pos.next_multiple_of(alignment) - pos;
            out.write_all(&zeros[..pad])?;
            pos += pad;
        }
        Ok(())
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Writes the GGUF file at `path` (created or truncated).
    pub fn write(&self, path: &Path) -> Result<(), WriterError> {
        let io = |source| WriterError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::new(file);
        self.write_to(&mut out).map_err(io)?;
        out.flush().map_err(io)?;
        Ok(())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // SAFETY: ctx came from gguf_init_empty and is freed exactly once, here.
        unsafe { sys::gguf_free(self.ctx.as_ptr()) };
    }
}

/// ggml's name for a `ggml_type` ("f32", "q4_K", ...), for messages.
pub fn ggml_type_name(ty: sys::ggml_type) -> String {
    // SAFETY: ggml_type_name reads the static type-traits table; it returns a static C string
    // (or null for an unknown type, handled below).
    let p = unsafe { sys::ggml_type_name(ty) };
    if p.is_null() {
        return format!("type{ty}");
    }
    // SAFETY: p is a non-null static NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal reader over gguf_init_from_file for the round-trip tests.
    struct Read {
        ctx: *mut sys::gguf_context,
    }

    impl Read {
        fn open(path: &Path) -> Read {
            let c = CString::new(path.to_str().unwrap()).unwrap();
            let params = sys::gguf_init_params {
                no_alloc: true,
                ctx: std::ptr::null_mut(),
            };
            // SAFETY: c is a NUL-terminated path; no ggml context is requested.
            let ctx = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
            assert!(!ctx.is_null(), "gguf_init_from_file failed");
            Read { ctx }
        }

        fn key(&self, key: &str) -> i64 {
            let k = CString::new(key).unwrap();
            // SAFETY: ctx is valid; k is NUL-terminated.
            let id = unsafe { sys::gguf_find_key(self.ctx, k.as_ptr()) };
            assert!(id >= 0, "missing key {key}");
            id
        }

        fn kv_type(&self, key: &str) -> sys::gguf_type {
            // SAFETY: ctx is valid and the id was found.
            unsafe { sys::gguf_get_kv_type(self.ctx, self.key(key)) }
        }

        fn str(&self, key: &str) -> String {
            assert_eq!(self.kv_type(key), sys::GGUF_TYPE_STRING);
            // SAFETY: the key exists and holds a string.
            let p = unsafe { sys::gguf_get_val_str(self.ctx, self.key(key)) };
            // SAFETY: ggml returns a NUL-terminated string owned by ctx.
            unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned()
        }

        fn u32(&self, key: &str) -> u32 {
            assert_eq!(self.kv_type(key), sys::GGUF_TYPE_UINT32);
            // SAFETY: the key exists and holds a u32.
            unsafe { sys::gguf_get_val_u32(self.ctx, self.key(key)) }
        }

        fn i32(&self, key: &str) -> i32 {
            assert_eq!(self.kv_type(key), sys::GGUF_TYPE_INT32);
            // SAFETY: the key exists and holds an i32.
            unsafe { sys::gguf_get_val_i32(self.ctx, self.key(key)) }
        }

        fn f32(&self, key: &str) -> f32 {
            assert_eq!(self.kv_type(key), sys::GGUF_TYPE_FLOAT32);
            // SAFETY: the key exists and holds an f32.
            unsafe { sys::gguf_get_val_f32(self.ctx, self.key(key)) }
        }

        fn bool(&self, key: &str) -> bool {
            assert_eq!(self.kv_type(key), sys::GGUF_TYPE_BOOL);
            // SAFETY: the key exists and holds a bool.
            unsafe { sys::gguf_get_val_bool(self.ctx, self.key(key)) }
        }

        fn arr_str(&self, key: &str) -> Vec<String> {
            let id = self.key(key);
            // SAFETY: the key exists; it is checked to be a string array before reading.
            unsafe {
                assert_eq!(sys::gguf_get_kv_type(self.ctx, id), sys::GGUF_TYPE_ARRAY);
                assert_eq!(sys::gguf_get_arr_type(self.ctx, id), sys::GGUF_TYPE_STRING);
                (0..sys::gguf_get_arr_n(self.ctx, id))
                    .map(|i| {
                        let p = sys::gguf_get_arr_str(self.ctx, id, i);
                        CStr::from_ptr(p).to_str().unwrap().to_owned()
                    })
                    .collect()
            }
        }

        fn arr_pod<T: Copy>(&self, key: &str, ty: sys::gguf_type) -> Vec<T> {
            let id = self.key(key);
            // SAFETY: the key exists and is an array of `ty`, whose element size is T's.
            unsafe {
                assert_eq!(sys::gguf_get_arr_type(self.ctx, id), ty);
                let n = sys::gguf_get_arr_n(self.ctx, id);
                let p = sys::gguf_get_arr_data(self.ctx, id).cast::<T>();
                std::slice::from_raw_parts(p, n).to_vec()
            }
        }

        /// (shape with trailing 1s removed, type, size in bytes, absolute data offset)
        fn tensor(&self, name: &str) -> (Vec<usize>, sys::ggml_type, usize, usize) {
            let c = CString::new(name).unwrap();
            // SAFETY: ctx is valid; the id is checked before use; ne points at 4 i64.
            unsafe {
                let id = sys::gguf_find_tensor(self.ctx, c.as_ptr());
                assert!(id >= 0, "missing tensor {name}");
                let ne = std::slice::from_raw_parts(sys::gguf_get_tensor_ne(self.ctx, id), 4);
                let mut shape: Vec<usize> = ne.iter().map(|&d| d as usize).collect();
                while shape.len() > 1 && shape.last() == Some(&1) {
                    shape.pop();
                }
                (
                    shape,
                    sys::gguf_get_tensor_type(self.ctx, id),
                    sys::gguf_get_tensor_size(self.ctx, id),
                    sys::gguf_get_data_offset(self.ctx) + sys::gguf_get_tensor_offset(self.ctx, id),
                )
            }
        }
    }

    impl Drop for Read {
        fn drop(&mut self) {
            // SAFETY: ctx came from gguf_init_from_file and is freed once.
            unsafe { sys::gguf_free(self.ctx) };
        }
    }

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "ggml-shim-writer-{}-{tag}.gguf",
            std::process::id()
        ))
    }

    #[test]
    fn block_sizes_match_ggml() {
        assert!(WriterType::try_from(crate::ggml::DType::I32).is_err());
        for ty in WriterType::ALL {
            // SAFETY: valid type; reads the static traits table.
            let b = unsafe { sys::ggml_blck_size(ty.to_ggml()) } as usize;
            assert_eq!(b, ty.block_size(), "{ty:?}");
            assert_eq!(ggml_type_name(ty.to_ggml()), ty.name());
            assert_eq!(WriterType::from_ggml(ty.to_ggml()), Some(ty));
            let d = crate::ggml::DType::from(ty);
            assert_eq!(d.raw(), ty.to_ggml());
            assert_eq!(WriterType::try_from(d), Ok(ty));
        }
    }

    #[test]
    fn round_trip() {
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama").unwrap();
        w.set_u32("llama.block_count", 2).unwrap();
        w.set_i32("test.i32", -7).unwrap();
        w.set_f32("test.f32", 1.5).unwrap();
        w.set_bool("test.bool", true).unwrap();
        w.set_arr_str("test.strs", &["a", "▁the", ""]).unwrap();
        w.set_arr_str("test.strings", &[String::from("x")]).unwrap();
        w.set_arr_f32("test.f32s", &[0.5, -1.0]).unwrap();
        w.set_arr_i32("test.i32s", &[1, 2, 3]).unwrap();
        w.set_str("test.replaced", "old").unwrap();
        w.set_str("test.replaced", "new").unwrap();

        let vals: Vec<f32> = (0..256 * 3)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let small: Vec<f32> = vals[..64 * 3].to_vec();
        w.add_tensor_f32("f32", &[64, 3], &small, WriterType::F32)
            .unwrap();
        w.add_tensor_f32("f16", &[64, 3], &small, WriterType::F16)
            .unwrap();
        w.add_tensor_f32("bf16", &[64, 3], &small, WriterType::BF16)
            .unwrap();
        w.add_tensor_f32("q8_0", &[64, 3], &small, WriterType::Q8_0)
            .unwrap();
        w.add_tensor_f32("q4_0", &[64, 3], &small, WriterType::Q4_0)
            .unwrap();
        w.add_tensor_f32("q4_k", &[256, 3], &vals, WriterType::Q4_K)
            .unwrap();
        w.add_tensor_f32("q6_k", &[256, 3], &vals, WriterType::Q6_K)
            .unwrap();
        w.add_tensor_f32("vec", &[5], &[1.0; 5], WriterType::F32)
            .unwrap();
        w.add_tensor_f32("t3", &[32, 2, 2], &[0.25; 128], WriterType::Q5_0)
            .unwrap();
        assert_eq!(w.n_tensors(), 9);

        let path = temp_path("rt");
        w.write(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), w.to_bytes().unwrap());
        let file = std::fs::read(&path).unwrap();
        let r = Read::open(&path);
        assert_eq!(r.str("general.architecture"), "llama");
        assert_eq!(r.u32("llama.block_count"), 2);
        assert_eq!(r.i32("test.i32"), -7);
        assert_eq!(r.f32("test.f32"), 1.5);
        assert!(r.bool("test.bool"));
        assert_eq!(r.arr_str("test.strs"), ["a", "▁the", ""]);
        assert_eq!(r.arr_str("test.strings"), ["x"]);
        assert_eq!(
            r.arr_pod::<f32>("test.f32s", sys::GGUF_TYPE_FLOAT32),
            [0.5, -1.0]
        );
        assert_eq!(
            r.arr_pod::<i32>("test.i32s", sys::GGUF_TYPE_INT32),
            [1, 2, 3]
        );
        assert_eq!(r.str("test.replaced"), "new");

        type Case<'a> = (&'a str, WriterType, Vec<usize>, &'a [f32], f32);
        let cases: [Case; 9] = [
            ("f32", WriterType::F32, vec![64, 3], &small, 0.0),
            ("f16", WriterType::F16, vec![64, 3], &small, 1e-3),
            ("bf16", WriterType::BF16, vec![64, 3], &small, 1e-2),
            ("q8_0", WriterType::Q8_0, vec![64, 3], &small, 1e-2),
            ("q4_0", WriterType::Q4_0, vec![64, 3], &small, 0.15),
            ("q4_k", WriterType::Q4_K, vec![256, 3], &vals, 0.15),
            ("q6_k", WriterType::Q6_K, vec![256, 3], &vals, 0.05),
            ("vec", WriterType::F32, vec![5], &[1.0; 5], 0.0),
            ("t3", WriterType::Q5_0, vec![32, 2, 2], &[0.25; 128], 0.02),
        ];
        for (name, ty, shape, src, tol) in cases {
            let (s, t, size, off) = r.tensor(name);
            assert_eq!(s, shape, "{name}");
            assert_eq!(t, ty.to_ggml(), "{name}");
            assert_eq!(off % 32, 0, "{name} aligned");
            let bytes = &file[off..off + size];
            let back = weight_values(ty, shape[0], bytes).unwrap();
            assert_eq!(back.len(), src.len(), "{name}");
            let err = back
                .iter()
                .zip(src)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= tol, "{name}: max error {err} > {tol}");
        }
        drop(r);
        std::fs::remove_file(&path).unwrap();
    }

    /// The reader counts an array without reading it, and after releasing its
    /// metadata keeps the tensor table and data offset but answers no key.
    #[test]
    fn released_metadata_keeps_the_tensor_table() {
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama").unwrap();
        w.set_arr_str("test.strs", &["a", "b", "c"]).unwrap();
        w.set_arr_i32("test.i32s", &[1, 2]).unwrap();
        w.add_tensor_f32("t", &[64, 2], &[0.5; 128], WriterType::F32)
            .unwrap();
        let path = temp_path("release");
        w.write(&path).unwrap();
        let mut g = crate::Gguf::open(&path).unwrap();
        assert_eq!(g.array_len("test.strs"), Some(3));
        assert_eq!(g.array_len("test.i32s"), Some(2));
        assert_eq!(g.array_len("general.architecture"), None);
        assert_eq!(g.array_len("absent"), None);
        let (offset, tensors) = (g.data_offset(), g.tensors().to_vec());
        assert!(g.meta_bytes().is_some_and(|b| b.len() as u64 <= offset));
        g.release_metadata();
        assert_eq!(g.get("general.architecture"), None);
        assert_eq!(g.array_len("test.strs"), None);
        assert!(g.keys().is_empty() && g.meta_bytes().is_none());
        assert!(g.string_array_bytes("test.strs").is_none());
        assert_eq!((g.data_offset(), g.tensors()), (offset, &tensors[..]));
        g.release_metadata();
        drop(g);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = GgufWriter::new();
        let e = w.add_tensor_f32("k", &[64, 2], &[0.0; 128], WriterType::Q4_K);
        assert!(
            matches!(e, Err(WriterError::BlockSize { block: 256, .. })),
            "{e:?}"
        );
        let e = w.add_tensor_f32("q", &[48], &[0.0; 48], WriterType::Q8_0);
        assert!(
            matches!(e, Err(WriterError::BlockSize { block: 32, .. })),
            "{e:?}"
        );
        let e = w.add_tensor_f32("n", &[4, 2], &[0.0; 7], WriterType::F32);
        assert!(matches!(
            e,
            Err(WriterError::DataLength {
                expected: 8,
                got: 7,
                ..
            })
        ));
        let e = w.add_tensor_f32("z", &[4, 0], &[], WriterType::F32);
        assert!(matches!(e, Err(WriterError::BadShape { .. })));
        let e = w.add_tensor_f32("d", &[1, 1, 1, 1, 1], &[0.0], WriterType::F32);
        assert!(matches!(e, Err(WriterError::BadShape { .. })));
        let e = w.add_tensor_f32(&"x".repeat(64), &[1], &[0.0], WriterType::F32);
        assert!(matches!(e, Err(WriterError::BadTensorName(_))));
        let e = w.add_tensor_f32("nan", &[32], &[f32::NAN; 32], WriterType::Q8_0);
        assert!(matches!(e, Err(WriterError::NonFinite { index: 0, .. })));
        w.add_tensor_f32("ok", &[1], &[0.0], WriterType::F32)
            .unwrap();
        let e = w.add_tensor_f32("ok", &[1], &[0.0], WriterType::F32);
        assert!(matches!(e, Err(WriterError::DuplicateTensor(_))));
        assert!(matches!(
            w.set_str("a\0b", "x"),
            Err(WriterError::InteriorNul { .. })
        ));
        assert!(matches!(
            w.set_str("k", "x\0"),
            Err(WriterError::InteriorNul { .. })
        ));
        let e = w.set_u32("general.alignment", 64);
        assert!(matches!(e, Err(WriterError::ReservedKey(_))));
        let e = w.set_str("general.alignment", "3");
        assert!(matches!(e, Err(WriterError::ReservedKey(_))));
        assert_eq!(w.n_tensors(), 1);
        let e = w.write(Path::new("/nonexistent-dir/x.gguf"));
        assert!(matches!(e, Err(WriterError::Io { .. })));
    }

    #[test]
    fn streamed_tensors_write_what_held_ones_do() {
        // a Q8_0 tensor of 5.2 MB: more than one chunk
        let (ne0, rows) = (4096usize, 1200usize);
        let row = WriterType::Q8_0.row_size(ne0);
        let bytes: Vec<u8> = (0..row * rows).map(|i| (i * 31 % 251) as u8).collect();
        let small = [0.5f32, -1.0];
        let build = |streamed: bool| {
            let mut w = GgufWriter::new();
            w.set_str("general.name", "streamed").unwrap();
            w.add_tensor_f32("small", &[2], &small, WriterType::F32)
                .unwrap();
            if streamed {
                w.add_tensor_streamed("big", &[ne0, rows], WriterType::Q8_0)
                    .unwrap();
            } else {
                w.add_tensor_raw("big", &[ne0, rows], WriterType::Q8_0, &bytes)
                    .unwrap();
            }
            w
        };
        let held = build(false).to_bytes().unwrap();
        let streamed = build(true);
        let (mut at, mut calls) = (0usize, 0usize);
        let mut out = Vec::new();
        streamed
            .write_streamed(&mut out, |i, chunk| {
                assert_eq!(i, 1, "only the streamed tensor is asked for");
                assert!(chunk.len().is_multiple_of(row) && chunk.len() <= STREAM_CHUNK);
                chunk.copy_from_slice(&bytes[at..at + chunk.len()]);
                at += chunk.len();
                calls += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(out, held);
        assert_eq!(at, bytes.len());
        assert!(calls >= 2, "{calls} chunks");
        // a writer with a streamed tensor cannot write without a source of its bytes
        assert!(streamed.write_to(&mut Vec::new()).is_err());
        let failing = streamed.write_streamed(&mut Vec::new(), |_, _| {
            Err(std::io::Error::other("disk full"))
        });
        assert_eq!(failing.unwrap_err().to_string(), "disk full");
        // the same checks as for held tensors
        let mut w = build(true);
        let e = w.add_tensor_streamed("big", &[ne0, 1], WriterType::Q8_0);
        assert!(matches!(e, Err(WriterError::DuplicateTensor(_))));
        let e = w.add_tensor_streamed("k", &[100, 1], WriterType::Q4_K);
        assert!(matches!(e, Err(WriterError::BlockSize { .. })));
    }

    #[test]
    fn weight_values_refuse_partial_rows() {
        let e = weight_values(WriterType::Q8_0, 32, &[0u8; 35]);
        assert!(matches!(e, Err(WriterError::DataLength { got: 35, .. })));
        let e = weight_values(WriterType::Q4_K, 100, &[0u8; 144]);
        assert!(matches!(e, Err(WriterError::BlockSize { .. })));
        let v = weight_values(WriterType::Q8_0, 32, &[0u8; 68]).unwrap();
        assert_eq!(v, vec![0.0; 64]);
    }

    #[test]
    fn raw_tensor() {
        let mut w = GgufWriter::new();
        let row = WriterType::Q8_0.row_size(32);
        assert_eq!(row, 34);
        w.add_tensor_raw("r", &[32, 2], WriterType::Q8_0, &[0u8; 68])
            .unwrap();
        let e = w.add_tensor_raw("s", &[32, 2], WriterType::Q8_0, &[0u8; 67]);
        assert!(matches!(
            e,
            Err(WriterError::DataLength { expected: 68, .. })
        ));
        let bytes = w.to_bytes().unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
    }
}
