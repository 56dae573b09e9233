//! ggml's CPU backend with one long-lived thread pool, persistent tensor stores
//! (weights, KV caches) and the per-step graph allocator.

use std::ffi::CString;
use std::ptr::NonNull;

use crate::ggml::{DType, GraphBuilder, Tensor};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("ggml CPU backend could not be initialised")]
    Init,
    #[error("ggml could not create a thread pool of {0} threads")]
    ThreadPool(usize),
    #[error("out of memory allocating {what} ({bytes} bytes)")]
    OutOfMemory { what: String, bytes: usize },
    #[error("graph allocation failed")]
    GraphAlloc,
    #[error("graph compute failed with ggml status {0}")]
    Compute(i32),
    #[error("tensor '{name}': {got} bytes given, {want} expected")]
    SizeMismatch {
        name: String,
        got: usize,
        want: usize,
    },
    #[error("no tensor named '{0}' in the store")]
    Missing(String),
    #[error("tensor name '{0}' is too long or contains a NUL byte")]
    BadName(String),
}

/// Graph nodes computed by every CPU backend of the process so far: it moves while
/// any compute makes progress, however long the graph (a liveness signal for a
/// watchdog), and stops when a compute is stuck.
static NODES_COMPUTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The count of graph nodes computed so far by this process (see [`CpuBackend`]).
pub fn compute_progress() -> u64 {
    NODES_COMPUTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// ggml calls this after each graph node (on the compute's first thread); never aborts.
unsafe extern "C" fn count_node(_data: *mut std::os::raw::c_void) -> bool {
    NODES_COMPUTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    false
}

/// The CPU backend plus its thread pool (created once, reused by every compute).
pub struct CpuBackend {
    backend: NonNull<sys::ggml_backend>,
    threadpool: NonNull<sys::ggml_threadpool>,
    n_threads: usize,
}

// SAFETY: the backend and pool are owned exclusively and used from one thread at a time (&mut self).
unsafe impl Send for CpuBackend {}

impl CpuBackend {
    pub fn new(n_threads: usize) -> Result<CpuBackend, BackendError> {
        let n_threads = n_threads.max(1);
        // SAFETY: plain constructor; null on failure.
        let backend =
            NonNull::new(unsafe { sys::ggml_backend_cpu_init() }).ok_or(BackendError::Init)?;
        // SAFETY: returns a params struct by value.
        let mut params = unsafe { sys::ggml_threadpool_params_default(n_threads as i32) };
        // SAFETY: params is a valid, initialised struct.
        let pool = unsafe { sys::ggml_threadpool_new(&mut params) };
        let Some(threadpool) = NonNull::new(pool) else {
            // SAFETY: backend valid, freed once.
            unsafe { sys::ggml_backend_free(backend.as_ptr()) };
            return Err(BackendError::ThreadPool(n_threads));
        };
        // SAFETY: both handles are valid; the pool outlives the backend (dropped after).
        unsafe {
            sys::ggml_backend_cpu_set_n_threads(backend.as_ptr(), n_threads as i32);
            sys::ggml_backend_cpu_set_threadpool(backend.as_ptr(), threadpool.as_ptr());
        }
        // SAFETY: the callback is a plain function that only touches a static atomic
        // and ignores its (null) data pointer.
        unsafe {
            sys::ggml_backend_cpu_set_abort_callback(
                backend.as_ptr(),
                Some(count_node),
                std::ptr::null_mut(),
            )
        };
        Ok(CpuBackend {
            backend,
            threadpool,
            n_threads,
        })
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Parks the pool's worker threads (no polling) until `resume` or the next compute.
    pub fn pause(&mut self) {
        // SAFETY: the pool is valid; pausing an idle pool only parks its workers.
        unsafe { sys::ggml_threadpool_pause(self.threadpool.as_ptr()) };
    }

    /// Wakes the pool's worker threads.
    pub fn resume(&mut self) {
        // SAFETY: the pool is valid.
        unsafe { sys::ggml_threadpool_resume(self.threadpool.as_ptr()) };
    }

    /// Computes the graph of `builder` (already allocated by `alloc`).
    pub fn compute(&mut self, builder: &GraphBuilder) -> Result<(), BackendError> {
        // SAFETY: the graph's tensors were placed by an Allocator; weights live in stores
        // borrowed by the builder's tensors; the backend is valid.
        let status =
            unsafe { sys::ggml_backend_graph_compute(self.backend.as_ptr(), builder.graph_ptr()) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(BackendError::Compute(status));
        }
        Ok(())
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        // SAFETY: both handles are valid and freed once, backend first.
        unsafe {
            sys::ggml_backend_free(self.backend.as_ptr());
            sys::ggml_threadpool_free(self.threadpool.as_ptr());
        }
    }
}

/// Places the intermediate tensors of each step's graph in one reusable buffer.
pub struct Allocator {
    galloc: NonNull<sys::ggml_gallocr>,
}

// SAFETY: exclusively owned, used through &mut self.
unsafe impl Send for Allocator {}

impl Allocator {
    pub fn new() -> Result<Allocator, BackendError> {
        // SAFETY: the CPU buffer type is a static singleton.
        let g = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
        Ok(Allocator {
            galloc: NonNull::new(g).ok_or(BackendError::GraphAlloc)?,
        })
    }

    /// Allocates every non-persistent tensor of the graph (growing the buffer if needed).
    pub fn alloc(&mut self, builder: &GraphBuilder) -> Result<(), BackendError> {
        // SAFETY: galloc and graph valid; the graph's weights already have buffers.
        let ok =
            unsafe { sys::ggml_gallocr_alloc_graph(self.galloc.as_ptr(), builder.graph_ptr()) };
        if ok {
            Ok(())
        } else {
            Err(BackendError::GraphAlloc)
        }
    }

    /// Bytes of the compute buffer.
    pub fn buffer_size(&self) -> usize {
        // SAFETY: galloc valid; buffer id 0 exists.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.galloc.as_ptr(), 0) }
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        // SAFETY: freed once.
        unsafe { sys::ggml_gallocr_free(self.galloc.as_ptr()) };
    }
}

/// Writes `data` into an allocated tensor (an input after `Allocator::alloc`).
pub fn set_tensor_data<T: Copy>(t: Tensor<'_>, data: &[T]) -> Result<(), BackendError> {
    let bytes = std::mem::size_of_val(data);
    if bytes != t.n_bytes() || !is_contiguous(t) {
        return Err(BackendError::SizeMismatch {
            name: "input".into(),
            got: bytes,
            want: t.n_bytes(),
        });
    }
    // SAFETY: t is allocated (has a buffer) and exactly `bytes` long; data is plain memory.
    unsafe { sys::ggml_backend_tensor_set(t.raw(), data.as_ptr().cast(), 0, bytes) };
    Ok(())
}

/// Reads an F32 output tensor.
pub fn get_tensor_f32(t: Tensor<'_>, out: &mut Vec<f32>) -> Result<(), BackendError> {
    if t.dtype() != DType::F32 || !is_contiguous(t) {
        return Err(BackendError::SizeMismatch {
            name: "output".into(),
            got: 0,
            want: t.n_bytes(),
        });
    }
    let n = t.n_elements() as usize;
    out.resize(n, 0.0);
    // SAFETY: t is an allocated contiguous F32 tensor of n elements; out has room for n.
    unsafe { sys::ggml_backend_tensor_get(t.raw(), out.as_mut_ptr().cast(), 0, n * 4) };
    Ok(())
}

/// Reads raw bytes of an allocated contiguous tensor.
pub fn get_tensor_bytes(t: Tensor<'_>, out: &mut Vec<u8>) {
    let n = t.n_bytes();
    out.resize(n, 0);
    // SAFETY: t is allocated with n bytes; out has n bytes.
    unsafe { sys::ggml_backend_tensor_get(t.raw(), out.as_mut_ptr().cast(), 0, n) };
}

fn is_contiguous(t: Tensor<'_>) -> bool {
    // SAFETY: reads the header of a live tensor.
    unsafe { sys::ggml_is_contiguous(t.raw()) }
}

/// How a tensor of a store should be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Plain CPU memory, readable by every op (norms, embeddings, caches).
    Plain,
    /// Used only as the weight of matrix products: may be repacked into an
    /// interleaved layout for faster CPU kernels, as llama.cpp does.
    MatmulWeight,
}

/// One tensor to create in a store.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub ne: Vec<i64>,
    pub placement: Placement,
}

/// Persistent tensors (weights, KV caches) in backend buffers.
pub struct TensorStore {
    parts: Vec<StorePart>,
    index: std::collections::HashMap<String, (usize, NonNull<sys::ggml_tensor>)>,
}

struct StorePart {
    ctx: NonNull<sys::ggml_context>,
    buffer: Option<NonNull<sys::ggml_backend_buffer>>,
    repacked: bool,
}

// SAFETY: owned exclusively; tensor data is written only through &mut self methods,
// and read by computes that borrow the store.
unsafe impl Send for TensorStore {}
// SAFETY: &self methods only hand out tensor handles; concurrent computes only read weights.
unsafe impl Sync for TensorStore {}

impl TensorStore {
    /// Creates and allocates all tensors; matmul weights go to the CPU repack buffer
    /// type where ggml supports them there.
    pub fn new(specs: &[TensorSpec], allow_repack: bool) -> Result<TensorStore, BackendError> {
        let repack_buft = if allow_repack {
            cpu_repack_buffer_type()
        } else {
            None
        };
        let mut plain = Vec::new();
        let mut packed = Vec::new();
        for s in specs {
            if s.placement == Placement::MatmulWeight
                && repack_buft.is_some_and(|b| repack_supports(b, s))
            {
                packed.push(s);
            } else {
                plain.push(s);
            }
        }
        let mut store = TensorStore {
            parts: Vec::new(),
            index: Default::default(),
        };
        // SAFETY: static singleton.
        let cpu = unsafe { sys::ggml_backend_cpu_buffer_type() };
        store.add_part(&plain, cpu, false)?;
        if let Some(b) = repack_buft {
            store.add_part(&packed, b, true)?;
        }
        Ok(store)
    }

    fn add_part(
        &mut self,
        specs: &[&TensorSpec],
        buft: sys::ggml_backend_buffer_type_t,
        repacked: bool,
    ) -> Result<(), BackendError> {
        if specs.is_empty() {
            return Ok(());
        }
        let params = sys::ggml_init_params {
            // SAFETY: pure size computation.
            mem_size: unsafe { sys::ggml_tensor_overhead() } * (specs.len() + 1),
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: metadata-only context; null on failure.
        let ctx = NonNull::new(unsafe { sys::ggml_init(params) }).ok_or_else(|| {
            BackendError::OutOfMemory {
                what: "tensor metadata".into(),
                bytes: params.mem_size,
            }
        })?;
        let part_id = self.parts.len();
        self.parts.push(StorePart {
            ctx,
            buffer: None,
            repacked,
        });
        for s in specs {
            let cname =
                CString::new(s.name.as_str()).map_err(|_| BackendError::BadName(s.name.clone()))?;
            if s.name.len() >= 64 {
                return Err(BackendError::BadName(s.name.clone()));
            }
            let mut ne = [1i64; 4];
            ne[..s.ne.len().min(4)].copy_from_slice(&s.ne[..s.ne.len().min(4)]);
            // SAFETY: ctx has room for every spec (sized above); ne has 4 entries.
            let t = unsafe {
                sys::ggml_new_tensor(
                    ctx.as_ptr(),
                    s.dtype.raw(),
                    s.ne.len().clamp(1, 4) as i32,
                    ne.as_ptr(),
                )
            };
            let t = NonNull::new(t).ok_or_else(|| BackendError::OutOfMemory {
                what: s.name.clone(),
                bytes: 0,
            })?;
            // SAFETY: t is live; name < 64 bytes and NUL-free.
            unsafe { sys::ggml_set_name(t.as_ptr(), cname.as_ptr()) };
            self.index.insert(s.name.clone(), (part_id, t));
        }
        // SAFETY: ctx holds only unallocated tensors; buft is a valid buffer type.
        let buf = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.as_ptr(), buft) };
        let total: usize = specs
            .iter()
            .map(|s| {
                s.dtype.row_size(s.ne[0] as usize) * s.ne[1..].iter().product::<i64>() as usize
            })
            .sum();
        let buf = NonNull::new(buf).ok_or_else(|| BackendError::OutOfMemory {
            what: "tensor buffer".into(),
            bytes: total,
        })?;
        advise_huge_pages(buf);
        if let Some(p) = self.parts.last_mut() {
            p.buffer = Some(buf);
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        let (_, t) = self.index.get(name)?;
        // SAFETY: the tensor lives in a context owned by self, borrowed for the result's lifetime.
        unsafe { Tensor::from_raw(t.as_ptr()) }
    }

    /// Whether the tensor was placed in a repacked buffer.
    pub fn is_repacked(&self, name: &str) -> bool {
        self.index
            .get(name)
            .is_some_and(|(part, _)| self.parts[*part].repacked)
    }

    /// Writes the whole content of a tensor (repacking it if its buffer does).
    pub fn set(&mut self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        let (_, t) = self
            .index
            .get(name)
            .ok_or_else(|| BackendError::Missing(name.into()))?;
        // SAFETY: t is live.
        let want = unsafe { sys::ggml_nbytes(t.as_ptr()) };
        if data.len() != want {
            return Err(BackendError::SizeMismatch {
                name: name.into(),
                got: data.len(),
                want,
            });
        }
        // SAFETY: t is allocated in a buffer of self; data has exactly nbytes bytes.
        unsafe { sys::ggml_backend_tensor_set(t.as_ptr(), data.as_ptr().cast(), 0, want) };
        Ok(())
    }

    /// Fills every buffer of the store with zeros.
    pub fn clear(&mut self) {
        for p in &self.parts {
            if let Some(b) = p.buffer {
                // SAFETY: valid buffer.
                unsafe { sys::ggml_backend_buffer_clear(b.as_ptr(), 0) };
            }
        }
    }

    /// Total bytes of the store's buffers.
    pub fn size_bytes(&self) -> usize {
        self.parts
            .iter()
            .filter_map(|p| p.buffer)
            // SAFETY: valid buffer.
            .map(|b| unsafe { sys::ggml_backend_buffer_get_size(b.as_ptr()) })
            .sum()
    }
}

impl Drop for TensorStore {
    fn drop(&mut self) {
        for p in &self.parts {
            // SAFETY: each buffer and context is freed once; buffers before contexts.
            unsafe {
                if let Some(b) = p.buffer {
                    sys::ggml_backend_buffer_free(b.as_ptr());
                }
                sys::ggml_free(p.ctx.as_ptr());
            }
        }
    }
}

/// Asks the kernel to back a weight buffer with transparent huge pages (where THP is
/// in "madvise" mode, as on Debian and Ubuntu). Decoding streams every weight once per
/// step: with 4 KiB pages that is a TLB miss every 4 KiB. Advice only; errors ignored.
fn advise_huge_pages(buf: NonNull<sys::ggml_backend_buffer>) {
    // SAFETY: buf is a live buffer; base and size describe its one allocation.
    let (base, size) = unsafe {
        (
            sys::ggml_backend_buffer_get_base(buf.as_ptr()),
            sys::ggml_backend_buffer_get_size(buf.as_ptr()),
        )
    };
    const HUGE: usize = 2 << 20;
    let start = (base as usize).div_ceil(HUGE) * HUGE;
    let end = (base as usize + size) / HUGE * HUGE;
    if base.is_null() || end <= start {
        return;
    }
    // SAFETY: [start, end) lies inside the buffer's mapping; MADV_HUGEPAGE changes no content.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
}

/// Whether a matmul weight described by `spec` would be repacked on this CPU.
pub fn repack_supported(spec: &TensorSpec) -> bool {
    spec.placement == Placement::MatmulWeight
        && cpu_repack_buffer_type().is_some_and(|b| repack_supports(b, spec))
}

/// The CPU "repack" extra buffer type, if ggml offers one on this CPU.
fn cpu_repack_buffer_type() -> Option<sys::ggml_backend_buffer_type_t> {
    let name = CString::new("ggml_backend_dev_get_extra_bufts").ok()?;
    // SAFETY: registry lookups of the statically linked CPU backend.
    unsafe {
        let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        if dev.is_null() {
            return None;
        }
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        if f.is_null() {
            return None;
        }
        // SAFETY: the CPU registry documents this symbol with this signature.
        let get: sys::ggml_backend_dev_get_extra_bufts_t = std::mem::transmute(f);
        let get = get?;
        let mut p = get(dev);
        while !p.is_null() && !(*p).is_null() {
            let bname = std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(*p));
            if bname.to_bytes() == b"CPU_REPACK" {
                return Some(*p);
            }
            p = p.add(1);
        }
        None
    }
}

/// Asks the CPU device whether a matmul with `spec` as weight in `buft` is supported,
/// as llama.cpp does before placing a weight.
fn repack_supports(buft: sys::ggml_backend_buffer_type_t, spec: &TensorSpec) -> bool {
    if spec.ne.len() != 2 {
        return false;
    }
    let params = sys::ggml_init_params {
        // SAFETY: pure size computation.
        mem_size: unsafe { sys::ggml_tensor_overhead() } * 4,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: true,
    };
    // SAFETY: small metadata-only context, freed below; the dummy buffer is freed below;
    // the device query only inspects tensor headers.
    unsafe {
        let ctx = sys::ggml_init(params);
        if ctx.is_null() {
            return false;
        }
        let w = sys::ggml_new_tensor_2d(ctx, spec.dtype.raw(), spec.ne[0], spec.ne[1]);
        let x = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, spec.ne[0], 512);
        let op = sys::ggml_mul_mat(ctx, w, x);
        let buf = sys::ggml_backend_buft_alloc_buffer(buft, 0);
        let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        let ok = if buf.is_null() || dev.is_null() {
            false
        } else {
            (*w).buffer = buf;
            let ok = sys::ggml_backend_dev_supports_op(dev, op);
            (*w).buffer = std::ptr::null_mut();
            ok
        };
        if !buf.is_null() {
            sys::ggml_backend_buffer_free(buf);
        }
        sys::ggml_free(ctx);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computing_moves_the_progress_counter() {
        let g = GraphBuilder::new(16).expect("graph");
        let x = g.input(DType::F32, &[4]);
        g.name(x, "x");
        let y = g.scale(g.add(x, x), 2.0);
        g.name(y, "y");
        g.output(y);
        let mut alloc = Allocator::new().expect("allocator");
        alloc.alloc(&g).expect("alloc");
        let mut backend = CpuBackend::new(1).expect("backend");
        set_tensor_data(g.find("x").expect("x"), &[1.0f32, 2.0, 3.0, 4.0]).expect("set");
        let before = compute_progress();
        backend.compute(&g).expect("compute");
        assert!(compute_progress() >= before + 2, "two nodes computed");
        let mut out = Vec::new();
        get_tensor_f32(g.find("y").expect("y"), &mut out).expect("get");
        assert_eq!(out, vec![4.0, 8.0, 12.0, 16.0]);
    }

    /// Weight buffers carry MADV_HUGEPAGE ("hg" in the mapping's VmFlags) where the
    /// kernel has transparent huge pages.
    #[test]
    fn weight_buffers_ask_for_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if thp.is_err() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let spec = TensorSpec {
            name: "w".into(),
            dtype: DType::F32,
            ne: vec![1024, 4096],
            placement: Placement::Plain,
        };
        let store = TensorStore::new(&[spec], false).expect("store");
        let w = store.get("w").expect("w");
        // SAFETY (test): the tensor is allocated; only its data address is read.
        let data = unsafe { (*w.raw()).data } as usize;
        // The advice covers the buffer's whole 2 MiB-aligned interior: look in its middle.
        let probe = data + (8 << 20);
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut in_mapping = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        in_mapping = (lo..hi).contains(&probe);
                        continue;
                    }
                }
            }
            if in_mapping && line.starts_with("VmFlags:") {
                flags = Some(line.to_string());
            }
        }
        let flags = flags.expect("the weight buffer's mapping is in smaps");
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }
}
