//! GGUF reader: metadata and tensor table, validated against the file before any
//! tensor byte is used.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::sys;
use crate::DType;

/// What can go wrong when opening a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot open: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a regular file (a FIFO, a device or a directory is not a model)")]
    NotAFile { path: PathBuf },
    #[error("{path}: not a GGUF file (bad magic)")]
    NotGguf { path: PathBuf },
    #[error("{path}: corrupt or unsupported GGUF header")]
    BadHeader { path: PathBuf },
    #[error("{path}: tensor '{name}' lies outside the file ({end} > {file_size} bytes): truncated file?")]
    Truncated {
        path: PathBuf,
        name: String,
        end: u64,
        file_size: u64,
    },
    #[error("{path}: tensor '{name}' has unsupported type id {type_id}")]
    UnknownType {
        path: PathBuf,
        name: String,
        type_id: u32,
    },
    #[error("path contains a NUL byte")]
    NulInPath,
}

/// One metadata value, as far as exo needs them.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    /// Other scalar types (u8, i8, u16, i16) widened.
    Int(i64),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
    ArrU32(Vec<u32>),
    ArrF32(Vec<f32>),
    /// An array of another element type: only its length is kept.
    ArrOther(usize),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) | Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short description of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Int(_) => "integer",
            Value::ArrStr(_) => "string array",
            Value::ArrI32(_) => "i32 array",
            Value::ArrU32(_) => "u32 array",
            Value::ArrF32(_) => "f32 array",
            Value::ArrOther(_) => "array",
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// ggml order: `shape[0]` is the row length.
    pub shape: Vec<usize>,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor table (no tensor data is read).
/// The metadata stays in ggml's context until [`Gguf::release_metadata`] (a large
/// vocabulary's strings are tens of MB); the tensor table, sizes and offsets stay.
pub struct Gguf {
    /// Null once the metadata is released.
    ctx: *mut sys::gguf_context,
    path: PathBuf,
    file_size: u64,
    data_offset: u64,
    tensors: Vec<TensorInfo>,
}

// SAFETY: the gguf_context is owned exclusively, only read after construction and
// freed only through &mut self.
unsafe impl Send for Gguf {}
// SAFETY: all &self methods only read the immutable context (freeing takes &mut self).
unsafe impl Sync for Gguf {}

impl Gguf {
    /// Opens and validates a GGUF file: magic, header, and that every tensor's data
    /// lies within the file.
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        // before opening it: opening a FIFO blocks until someone writes to it
        let meta = std::fs::metadata(path).map_err(|error| GgufError::Open {
            path: path.to_owned(),
            error,
        })?;
        if !meta.is_file() {
            return Err(GgufError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mut file = File::open(path).map_err(|error| GgufError::Open {
            path: path.to_owned(),
            error,
        })?;
        let file_size = file
            .metadata()
            .map_err(|error| GgufError::Open {
                path: path.to_owned(),
                error,
            })?
            .len();
        let mut magic = [0u8; 4];
        if file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(GgufError::NotGguf {
                path: path.to_owned(),
            });
        }
        drop(file);
        let cpath = CString::new(path.as_os_str().as_encoded_bytes().to_vec())
            .map_err(|_| GgufError::NulInPath)?;
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: cpath is a valid NUL-terminated string; with no_alloc and a null ctx
        // pointer gguf only parses the header and returns null on malformed input.
        let ctx = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
        if ctx.is_null() {
            return Err(GgufError::BadHeader {
                path: path.to_owned(),
            });
        }
        // SAFETY: ctx is a valid gguf context.
        let data_offset = unsafe { sys::gguf_get_data_offset(ctx) } as u64;
        let mut gguf = Gguf {
            ctx,
            path: path.to_owned(),
            file_size,
            data_offset,
            tensors: Vec::new(),
        };
        gguf.tensors = gguf.read_tensor_table()?;
        Ok(gguf)
    }

    fn read_tensor_table(&self) -> Result<Vec<TensorInfo>, GgufError> {
        // SAFETY: called from open, where ctx is a valid gguf context.
        let n = unsafe { sys::gguf_get_n_tensors(self.ctx) };
        let data_offset = self.data_offset;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for id in 0..n {
            // SAFETY: id < n_tensors; the name is a NUL-terminated string owned by ctx.
            let name = unsafe { CStr::from_ptr(sys::gguf_get_tensor_name(self.ctx, id)) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: id < n_tensors.
            let type_id = unsafe { sys::gguf_get_tensor_type(self.ctx, id) };
            let dtype = DType::from_raw(type_id).ok_or_else(|| GgufError::UnknownType {
                path: self.path.clone(),
                name: name.clone(),
                type_id,
            })?;
            // SAFETY: id < n_tensors; ne points to GGML_MAX_DIMS (4) int64 values.
            let ne =
                unsafe { std::slice::from_raw_parts(sys::gguf_get_tensor_ne(self.ctx, id), 4) };
            let mut shape: Vec<usize> = ne.iter().map(|&d| d.max(0) as usize).collect();
            while shape.len() > 1 && shape.last() == Some(&1) {
                shape.pop();
            }
            // SAFETY: id < n_tensors.
            let rel = unsafe { sys::gguf_get_tensor_offset(self.ctx, id) } as u64;
            // SAFETY: id < n_tensors.
            let size = unsafe { sys::gguf_get_tensor_size(self.ctx, id) } as u64;
            let offset = data_offset + rel;
            let end = offset.saturating_add(size);
            if end > self.file_size {
                return Err(GgufError::Truncated {
                    path: self.path.clone(),
                    name,
                    end,
                    file_size: self.file_size,
                });
            }
            out.push(TensorInfo {
                name,
                dtype,
                shape,
                offset,
                size,
            });
        }
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where tensor data starts: the header (metadata, tensor table, padding) is the
    /// bytes before it.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Frees the metadata (ggml's copy of every key and value): afterwards [`Gguf::get`],
    /// [`Gguf::array_len`] and [`Gguf::string_array_bytes`] answer `None`,
    /// [`Gguf::keys`] nothing and [`Gguf::meta_bytes`] `None`. The tensor table stays.
    pub fn release_metadata(&mut self) {
        if !self.ctx.is_null() {
            // SAFETY: ctx came from gguf_init_from_file, is freed once and nulled here.
            unsafe { sys::gguf_free(self.ctx) };
            self.ctx = std::ptr::null_mut();
        }
    }

    /// The index of metadata key `key`, while the metadata is held.
    fn key_id(&self, key: &str) -> Option<i64> {
        if self.ctx.is_null() {
            return None;
        }
        let ckey = CString::new(key).ok()?;
        // SAFETY: ctx is valid (not released), ckey is NUL-terminated.
        let id = unsafe { sys::gguf_find_key(self.ctx, ckey.as_ptr()) };
        (id >= 0).then_some(id)
    }

    /// The number of elements of the array under `key` (without reading them), or
    /// `None` if the key is absent or not an array.
    pub fn array_len(&self, key: &str) -> Option<usize> {
        let id = self.key_id(key)?;
        // SAFETY: id is a valid key index of a held context.
        let is_array = unsafe { sys::gguf_get_kv_type(self.ctx, id) } == sys::GGUF_TYPE_ARRAY;
        // SAFETY: id is an array key.
        is_array.then(|| unsafe { sys::gguf_get_arr_n(self.ctx, id) })
    }

    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// All metadata keys, in file order.
    pub fn keys(&self) -> Vec<String> {
        if self.ctx.is_null() {
            return Vec::new();
        }
        // SAFETY: ctx is valid (not released).
        let n = unsafe { sys::gguf_get_n_kv(self.ctx) };
        (0..n)
            .map(|id| {
                // SAFETY: id < n_kv; the key is a NUL-terminated string owned by ctx.
                unsafe { CStr::from_ptr(sys::gguf_get_key(self.ctx, id)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// The metadata value under `key`, type-checked before it is read.
    pub fn get(&self, key: &str) -> Option<Value> {
        let id = self.key_id(key)?;
        // SAFETY: id is a valid key index of a held context.
        let ty = unsafe { sys::gguf_get_kv_type(self.ctx, id) };
        // Each getter below is called only for the matching type, as gguf asserts.
        let v = match ty {
            // SAFETY: type checked above.
            sys::GGUF_TYPE_UINT32 => Value::U32(unsafe { sys::gguf_get_val_u32(self.ctx, id) }),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_INT32 => Value::I32(unsafe { sys::gguf_get_val_i32(self.ctx, id) }),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_UINT64 => Value::U64(unsafe { sys::gguf_get_val_u64(self.ctx, id) }),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_INT64 => Value::I64(unsafe { sys::gguf_get_val_i64(self.ctx, id) }),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_FLOAT32 => Value::F32(unsafe { sys::gguf_get_val_f32(self.ctx, id) }),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_FLOAT64 => Value::F64(unsafe { sys::gguf_get_val_f64(self.ctx, id) }),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_BOOL => Value::Bool(unsafe { sys::gguf_get_val_bool(self.ctx, id) }),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_UINT8 => {
                Value::Int(unsafe { sys::gguf_get_val_u8(self.ctx, id) }.into())
            }
            // SAFETY: type checked above.
            sys::GGUF_TYPE_INT8 => Value::Int(unsafe { sys::gguf_get_val_i8(self.ctx, id) }.into()),
            // SAFETY: type checked above.
            sys::GGUF_TYPE_UINT16 => {
                Value::Int(unsafe { sys::gguf_get_val_u16(self.ctx, id) }.into())
            }
            // SAFETY: type checked above.
            sys::GGUF_TYPE_INT16 => {
                Value::Int(unsafe { sys::gguf_get_val_i16(self.ctx, id) }.into())
            }
            sys::GGUF_TYPE_STRING => {
                // SAFETY: type checked above; the string is NUL-terminated and owned by ctx.
                let s = unsafe { CStr::from_ptr(sys::gguf_get_val_str(self.ctx, id)) };
                Value::Str(s.to_string_lossy().into_owned())
            }
            sys::GGUF_TYPE_ARRAY => self.get_array(id),
            _ => return None,
        };
        Some(v)
    }

    /// The raw bytes of each string of the string array under `key` (up to each string's
    /// first NUL, as llama.cpp reads them), or `None` if the key is not a string array.
    pub fn string_array_bytes(&self, key: &str) -> Option<Vec<&[u8]>> {
        let id = self.key_id(key)?;
        // SAFETY: id is a valid key index of a held context.
        let is_array = unsafe { sys::gguf_get_kv_type(self.ctx, id) } == sys::GGUF_TYPE_ARRAY;
        // SAFETY: id is a valid key index; the element type is read only for arrays.
        if !is_array || unsafe { sys::gguf_get_arr_type(self.ctx, id) } != sys::GGUF_TYPE_STRING {
            return None;
        }
        // SAFETY: id is an array key.
        let n = unsafe { sys::gguf_get_arr_n(self.ctx, id) };
        Some(
            (0..n)
                // SAFETY: i < n for a string array; each string is NUL-terminated and owned
                // by ctx, which lives as long as &self.
                .map(|i| {
                    unsafe { CStr::from_ptr(sys::gguf_get_arr_str(self.ctx, id, i)) }.to_bytes()
                })
                .collect(),
        )
    }

    fn get_array(&self, id: i64) -> Value {
        // SAFETY: id is an array key.
        let n = unsafe { sys::gguf_get_arr_n(self.ctx, id) };
        // SAFETY: id is an array key.
        let ety = unsafe { sys::gguf_get_arr_type(self.ctx, id) };
        match ety {
            sys::GGUF_TYPE_STRING => Value::ArrStr(
                (0..n)
                    .map(|i| {
                        // SAFETY: i < n for a string array; strings are NUL-terminated.
                        unsafe { CStr::from_ptr(sys::gguf_get_arr_str(self.ctx, id, i)) }
                            .to_string_lossy()
                            .into_owned()
                    })
                    .collect(),
            ),
            sys::GGUF_TYPE_INT32 | sys::GGUF_TYPE_UINT32 | sys::GGUF_TYPE_FLOAT32 => {
                // SAFETY: a non-string array's data holds n elements of 4 bytes each.
                let raw = unsafe {
                    std::slice::from_raw_parts(
                        sys::gguf_get_arr_data(self.ctx, id) as *const u32,
                        n,
                    )
                };
                match ety {
                    sys::GGUF_TYPE_INT32 => Value::ArrI32(raw.iter().map(|&v| v as i32).collect()),
                    sys::GGUF_TYPE_UINT32 => Value::ArrU32(raw.to_vec()),
                    _ => Value::ArrF32(raw.iter().map(|&v| f32::from_bits(v)).collect()),
                }
            }
            _ => Value::ArrOther(n),
        }
    }

    /// Bytes of the header (metadata + tensor table), used to identify a model; `None`
    /// once the metadata is released.
    pub fn meta_bytes(&self) -> Option<Vec<u8>> {
        if self.ctx.is_null() {
            return None;
        }
        // SAFETY: ctx is valid (not released).
        let n = unsafe { sys::gguf_get_meta_size(self.ctx) };
        let mut buf = vec![0u8; n];
        // SAFETY: buf has exactly gguf_get_meta_size bytes.
        unsafe { sys::gguf_get_meta_data(self.ctx, buf.as_mut_ptr().cast()) };
        Some(buf)
    }
}

impl Drop for Gguf {
    fn drop(&mut self) {
        self.release_metadata();
    }
}
