//! Tensor element types, and graph building over a RAII ggml context.
//!
//! A [`GraphBuilder`] owns a `no_alloc` ggml context and one compute graph. Every
//! [`Tensor`] it hands out borrows the builder, so no tensor can outlive the context
//! that holds it. Weight tensors from a [`crate::TensorStore`] borrow the store.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::sys;

/// A ggml tensor element type that exo knows how to handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DType(sys::ggml_type);

impl DType {
    pub const F32: DType = DType(sys::GGML_TYPE_F32);
    pub const F16: DType = DType(sys::GGML_TYPE_F16);
    pub const BF16: DType = DType(sys::GGML_TYPE_BF16);
    pub const I32: DType = DType(sys::GGML_TYPE_I32);
    pub const I64: DType = DType(sys::GGML_TYPE_I64);
    pub const Q8_0: DType = DType(sys::GGML_TYPE_Q8_0);
    pub const Q4_0: DType = DType(sys::GGML_TYPE_Q4_0);
    pub const Q4_K: DType = DType(sys::GGML_TYPE_Q4_K);

    /// Types whose rows ggml's CPU backend can multiply and look up.
    const SUPPORTED: &'static [sys::ggml_type] = &[
        sys::GGML_TYPE_F32,
        sys::GGML_TYPE_F16,
        sys::GGML_TYPE_BF16,
        sys::GGML_TYPE_Q4_0,
        sys::GGML_TYPE_Q4_1,
        sys::GGML_TYPE_Q5_0,
        sys::GGML_TYPE_Q5_1,
        sys::GGML_TYPE_Q8_0,
        sys::GGML_TYPE_Q2_K,
        sys::GGML_TYPE_Q3_K,
        sys::GGML_TYPE_Q4_K,
        sys::GGML_TYPE_Q5_K,
        sys::GGML_TYPE_Q6_K,
        sys::GGML_TYPE_IQ4_NL,
        sys::GGML_TYPE_IQ4_XS,
    ];

    /// The type for a raw ggml type id, if it is a valid id.
    pub fn from_raw(raw: sys::ggml_type) -> Option<DType> {
        if raw >= sys::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: raw < GGML_TYPE_COUNT; ggml_type_size returns 0 for removed types.
        let size = unsafe { sys::ggml_type_size(raw) };
        (size > 0).then_some(DType(raw))
    }

    pub fn raw(self) -> sys::ggml_type {
        self.0
    }

    /// Whether exo's CPU graphs support weights of this type.
    pub fn is_supported_weight(self) -> bool {
        Self::SUPPORTED.contains(&self.0)
    }

    pub fn name(self) -> String {
        // SAFETY: self.0 is a valid type id (checked in from_raw); the name is static.
        let p = unsafe { sys::ggml_type_name(self.0) };
        if p.is_null() {
            return format!("type{}", self.0);
        }
        // SAFETY: non-null static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    }

    /// Elements per block (1 for plain float types).
    pub fn block_size(self) -> usize {
        // SAFETY: valid type id.
        unsafe { sys::ggml_blck_size(self.0) as usize }
    }

    /// Bytes of one row of `n` elements (`n` must be a multiple of the block size).
    pub fn row_size(self, n: usize) -> usize {
        // SAFETY: valid type id; pure arithmetic.
        unsafe { sys::ggml_row_size(self.0, n as i64) }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A tensor living in a context (graph builder or tensor store) that outlives `'a`.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    ptr: NonNull<sys::ggml_tensor>,
    _owner: PhantomData<&'a ()>,
}

impl<'a> Tensor<'a> {
    /// # Safety
    /// `ptr` must point to a tensor whose context lives at least for `'a`.
    pub(crate) unsafe fn from_raw(ptr: *mut sys::ggml_tensor) -> Option<Tensor<'a>> {
        NonNull::new(ptr).map(|ptr| Tensor {
            ptr,
            _owner: PhantomData,
        })
    }

    pub(crate) fn raw(self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    fn get(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor is alive for 'a and we only read its header.
        unsafe { self.ptr.as_ref() }
    }

    /// Sizes in ggml order (`ne[0]` is the row length).
    pub fn ne(&self) -> [i64; 4] {
        self.get().ne
    }

    /// Strides in bytes.
    pub fn nb(&self) -> [usize; 4] {
        self.get().nb
    }

    pub fn dtype(&self) -> DType {
        DType(self.get().type_)
    }

    pub fn n_bytes(&self) -> usize {
        // SAFETY: valid tensor header.
        unsafe { sys::ggml_nbytes(self.ptr.as_ptr()) }
    }

    pub fn n_elements(&self) -> i64 {
        self.ne().iter().product()
    }
}

/// Rotary embedding parameters, as ggml_rope_ext takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub n_dims: i32,
    /// ggml rope mode: 0 = normal (llama), 2 = NeoX (qwen, gemma).
    pub mode: i32,
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// A ggml context plus one forward graph, for building a compute step.
pub struct GraphBuilder {
    ctx: NonNull<sys::ggml_context>,
    graph: NonNull<sys::ggml_cgraph>,
}

// SAFETY: the context is exclusively owned; ggml contexts have no thread affinity.
unsafe impl Send for GraphBuilder {}

/// The builder could not be created.
#[derive(Debug, thiserror::Error)]
#[error("ggml could not create a graph context of {0} bytes")]
pub struct GraphAllocError(pub usize);

impl GraphBuilder {
    /// A builder for graphs of at most `max_nodes` nodes (tensors are metadata only;
    /// data is placed later by an [`crate::Allocator`]).
    pub fn new(max_nodes: usize) -> Result<GraphBuilder, GraphAllocError> {
        // SAFETY: pure size computations.
        let mem_size = unsafe {
            sys::ggml_tensor_overhead() * max_nodes * 2
                + sys::ggml_graph_overhead_custom(max_nodes, false)
        };
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml allocates mem_size bytes of metadata; null on failure.
        let ctx =
            NonNull::new(unsafe { sys::ggml_init(params) }).ok_or(GraphAllocError(mem_size))?;
        // SAFETY: ctx is valid and sized for a graph of max_nodes nodes.
        let graph = unsafe { sys::ggml_new_graph_custom(ctx.as_ptr(), max_nodes, false) };
        let Some(graph) = NonNull::new(graph) else {
            // SAFETY: ctx is valid and freed once here.
            unsafe { sys::ggml_free(ctx.as_ptr()) };
            return Err(GraphAllocError(mem_size));
        };
        Ok(GraphBuilder { ctx, graph })
    }

    fn c(&self) -> *mut sys::ggml_context {
        self.ctx.as_ptr()
    }

    pub(crate) fn graph_ptr(&self) -> *mut sys::ggml_cgraph {
        self.graph.as_ptr()
    }

    fn wrap<'a>(&'a self, p: *mut sys::ggml_tensor) -> Tensor<'a> {
        // SAFETY: p was just created in self.ctx, which lives as long as &'a self.
        match unsafe { Tensor::from_raw(p) } {
            Some(t) => t,
            // ggml aborts instead of returning null from a no_alloc context, so this
            // cannot happen; stay panic-free anyway by pointing to a valid message.
            None => unreachable_tensor(),
        }
    }

    /// A new input tensor (its data is set after allocation).
    pub fn input<'a>(&'a self, dtype: DType, ne: &[i64]) -> Tensor<'a> {
        let mut dims = [1i64; 4];
        dims[..ne.len().min(4)].copy_from_slice(&ne[..ne.len().min(4)]);
        // SAFETY: ctx valid; dims has 4 entries and n_dims ≤ 4.
        let t = unsafe {
            sys::ggml_new_tensor(
                self.c(),
                dtype.0,
                ne.len().clamp(1, 4) as i32,
                dims.as_ptr(),
            )
        };
        // SAFETY: t is a fresh tensor of this context.
        unsafe { sys::ggml_set_input(t) };
        self.wrap(t)
    }

    /// Names a tensor (visible in ggml debug output).
    pub fn name(&self, t: Tensor<'_>, name: &str) {
        if let Ok(c) = CString::new(name) {
            // SAFETY: t is a live tensor; ggml copies the name.
            unsafe { sys::ggml_set_name(t.raw(), c.as_ptr()) };
        }
    }

    /// A tensor of the graph (an input or a node) by name.
    pub fn find(&self, name: &str) -> Option<Tensor<'_>> {
        let c = CString::new(name).ok()?;
        // SAFETY: graph valid; c is NUL-terminated; the result lives in self.ctx.
        unsafe { Tensor::from_raw(sys::ggml_graph_get_tensor(self.graph.as_ptr(), c.as_ptr())) }
    }

    /// Marks `t` as a graph output and adds it (and its dependencies) to the graph.
    pub fn output(&self, t: Tensor<'_>) {
        // SAFETY: t is live; graph belongs to this context.
        unsafe {
            sys::ggml_set_output(t.raw());
            sys::ggml_build_forward_expand(self.graph.as_ptr(), t.raw());
        }
    }

    /// Adds `t` to the graph now, fixing its position before later nodes.
    pub fn expand(&self, t: Tensor<'_>) {
        // SAFETY: t is live; graph belongs to this context.
        unsafe { sys::ggml_build_forward_expand(self.graph.as_ptr(), t.raw()) };
    }

    pub fn n_nodes(&self) -> i32 {
        // SAFETY: graph valid.
        unsafe { sys::ggml_graph_n_nodes(self.graph.as_ptr()) }
    }

    // ---- operations (shapes are validated by the callers before graphs are built) ----

    pub fn get_rows<'a>(&'a self, table: Tensor<'a>, ids: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: both tensors are live for 'a.
        self.wrap(unsafe { sys::ggml_get_rows(self.c(), table.raw(), ids.raw()) })
    }

    /// `wᵀ·x`. Q8_0 and Q5_0 weights times f32 activations take exo's prefetching
    /// kernels where they apply ([`crate::qmatmul`]); the results are bit-identical
    /// to ggml's.
    pub fn mul_mat<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        if crate::qmatmul::applies(w, x) {
            self.mul_mat_prefetching(w, x)
        } else {
            self.mul_mat_ggml(w, x)
        }
    }

    /// `wᵀ·x` where every column of the result has the bits ggml gives that column as
    /// a product of its own (a one-token step), whatever the other columns are: the
    /// product of batch-invariant decoding ([`crate::columns`]).
    pub fn mul_mat_per_column<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        let n = x.ne()[1];
        if n <= 1 || x.ne()[2..] != [1, 1] || crate::qmatmul::applies(w, x) {
            return self.mul_mat(w, x);
        }
        // SAFETY: x is live.
        let x = if unsafe { sys::ggml_is_contiguous(x.raw()) } {
            x
        } else {
            self.cont(x)
        };
        if crate::q6k_columns::applies(w) {
            return self.quantized_product(
                w,
                x,
                sys::GGML_TYPE_Q8_K,
                crate::q6k_columns::q6k_columns_op,
                std::ptr::null_mut(),
            );
        }
        if let Some(layout) = crate::columns::repacked_layout(w) {
            return self.quantized_product(
                w,
                x,
                layout.activations(),
                crate::columns::gemv_columns_op,
                layout.as_userdata(),
            );
        }
        self.mul_mat_planes(w, x)
    }

    /// `wᵀ·x` with the `n` columns of a contiguous `x` as `n` planes of one column
    /// each: ggml multiplies every plane as a one-token product (`vec_dot`, or a
    /// repack's `gemv`), reading repacked weights once per plane.
    pub(crate) fn mul_mat_planes<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        let (k, m, n) = (w.ne()[0], w.ne()[1], x.ne()[1]);
        let planes = self.reshape(x, &[k, 1, n]);
        let y = self.mul_mat_ggml(w, planes);
        self.reshape(y, &[m, n])
    }

    /// `wᵀ·x` by ggml's own kernels.
    pub(crate) fn mul_mat_ggml<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: both tensors are live for 'a.
        self.wrap(unsafe { sys::ggml_mul_mat(self.c(), w.raw(), x.raw()) })
    }

    /// `wᵀ·x` for Q8_0 or Q5_0 `w` (`[k, m]`) and f32 `x` (`[k, n]`) by exo's
    /// prefetching kernel ([`crate::qmatmul`]).
    fn mul_mat_prefetching<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        self.quantized_product(
            w,
            x,
            sys::GGML_TYPE_Q8_0,
            crate::qmatmul::qmatmul_op,
            std::ptr::null_mut(),
        )
    }

    /// `wᵀ·x` (`w` `[k, m]`, f32 `x` `[k, n]`) by one of exo's kernels as a ggml
    /// custom op: `x` is first quantized to `activations` by ggml's own CPU quantizer
    /// (as `ggml_mul_mat` does), then `op` computes the `[m, n]` f32 result from `w`
    /// and the quantized `x`, with `userdata`, on all of ggml's threads.
    fn quantized_product<'a>(
        &'a self,
        w: Tensor<'a>,
        x: Tensor<'a>,
        activations: sys::ggml_type,
        op: unsafe extern "C" fn(
            *mut sys::ggml_tensor,
            std::os::raw::c_int,
            std::os::raw::c_int,
            *mut std::os::raw::c_void,
        ),
        userdata: *mut std::os::raw::c_void,
    ) -> Tensor<'a> {
        let [k, m, ..] = w.ne();
        let n = x.ne()[1];
        // SAFETY: ctx valid; x is [k, n] f32 (the callers checked the shapes).
        let xq = self.wrap(unsafe {
            let q = sys::ggml_new_tensor_2d(self.c(), activations, k, n);
            sys::ggml_cpy(self.c(), x.raw(), q)
        });
        let mut args = [w.raw(), xq.raw()];
        // SAFETY: ctx valid; args are two live tensors; the op reads them as its
        // sources and writes the fresh [m, n] f32 result; the callers pass the
        // userdata their op expects; -1 = all of ggml's threads.
        self.wrap(unsafe {
            sys::ggml_custom_4d(
                self.c(),
                sys::GGML_TYPE_F32,
                m,
                n,
                1,
                1,
                args.as_mut_ptr(),
                2,
                Some(op),
                -1,
                userdata,
            )
        })
    }

    pub fn add<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: both tensors are live for 'a.
        self.wrap(unsafe { sys::ggml_add(self.c(), a.raw(), b.raw()) })
    }

    pub fn mul<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: both tensors are live for 'a.
        self.wrap(unsafe { sys::ggml_mul(self.c(), a.raw(), b.raw()) })
    }

    pub fn scale<'a>(&'a self, a: Tensor<'a>, s: f32) -> Tensor<'a> {
        // SAFETY: a is live for 'a.
        self.wrap(unsafe { sys::ggml_scale(self.c(), a.raw(), s) })
    }

    pub fn tanh<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: a is live for 'a.
        self.wrap(unsafe { sys::ggml_tanh(self.c(), a.raw()) })
    }

    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        // SAFETY: a is live for 'a.
        self.wrap(unsafe { sys::ggml_rms_norm(self.c(), a.raw(), eps) })
    }

    /// `gelu(gate) * up`, as llama.cpp's parallel GELU feed-forward.
    pub fn geglu_split<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: both tensors are live for 'a.
        self.wrap(unsafe { sys::ggml_geglu_split(self.c(), gate.raw(), up.raw()) })
    }

    /// `silu(gate) * up`, as llama.cpp's parallel SiLU feed-forward.
    pub fn swiglu_split<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: both tensors are live for 'a.
        self.wrap(unsafe { sys::ggml_swiglu_split(self.c(), gate.raw(), up.raw()) })
    }

    pub fn reshape<'a>(&'a self, a: Tensor<'a>, ne: &[i64]) -> Tensor<'a> {
        // SAFETY: a is live; ggml checks the element count matches.
        let t = unsafe {
            match ne.len() {
                1 => sys::ggml_reshape_1d(self.c(), a.raw(), ne[0]),
                2 => sys::ggml_reshape_2d(self.c(), a.raw(), ne[0], ne[1]),
                3 => sys::ggml_reshape_3d(self.c(), a.raw(), ne[0], ne[1], ne[2]),
                _ => sys::ggml_reshape_4d(self.c(), a.raw(), ne[0], ne[1], ne[2], ne[3]),
            }
        };
        self.wrap(t)
    }

    /// A strided view: `ne` sizes (up to 3 dims), `nb` strides for dims 1.., byte offset.
    pub fn view<'a>(
        &'a self,
        a: Tensor<'a>,
        ne: &[i64],
        nb: &[usize],
        offset: usize,
    ) -> Tensor<'a> {
        // SAFETY: a is live; callers keep the view inside a's data.
        let t = unsafe {
            match ne.len() {
                1 => sys::ggml_view_1d(self.c(), a.raw(), ne[0], offset),
                2 => sys::ggml_view_2d(self.c(), a.raw(), ne[0], ne[1], nb[0], offset),
                _ => {
                    sys::ggml_view_3d(self.c(), a.raw(), ne[0], ne[1], ne[2], nb[0], nb[1], offset)
                }
            }
        };
        self.wrap(t)
    }

    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        // SAFETY: a is live; axes is a permutation of 0..4.
        self.wrap(unsafe {
            sys::ggml_permute(self.c(), a.raw(), axes[0], axes[1], axes[2], axes[3])
        })
    }

    pub fn cont<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: a is live.
        self.wrap(unsafe { sys::ggml_cont(self.c(), a.raw()) })
    }

    /// Copies `src` into `dst` (a view into a persistent buffer, e.g. a KV cache).
    pub fn cpy<'a>(&'a self, src: Tensor<'a>, dst: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: both live; element counts are equal by construction of the caller.
        self.wrap(unsafe { sys::ggml_cpy(self.c(), src.raw(), dst.raw()) })
    }

    /// Writes the rows of `src` into rows `idx` (I64) of `dst`, converting the type.
    pub fn set_rows<'a>(&'a self, dst: Tensor<'a>, src: Tensor<'a>, idx: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: all live; the caller keeps indices within dst's rows.
        self.wrap(unsafe { sys::ggml_set_rows(self.c(), dst.raw(), src.raw(), idx.raw()) })
    }

    pub fn concat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, dim: i32) -> Tensor<'a> {
        // SAFETY: both live; other dims equal by construction of the caller.
        self.wrap(unsafe { sys::ggml_concat(self.c(), a.raw(), b.raw(), dim) })
    }

    pub fn rope<'a>(
        &'a self,
        a: Tensor<'a>,
        pos: Tensor<'a>,
        freq_factors: Option<Tensor<'a>>,
        p: &RopeParams,
    ) -> Tensor<'a> {
        let ff = freq_factors.map_or(std::ptr::null_mut(), |t| t.raw());
        // SAFETY: all tensors live; pos is I32 with one entry per token of a.
        self.wrap(unsafe {
            sys::ggml_rope_ext(
                self.c(),
                a.raw(),
                pos.raw(),
                ff,
                p.n_dims,
                p.mode,
                p.n_ctx_orig,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            )
        })
    }

    /// Fused attention: q `[d, n_q, heads]`, k/v `[d, n_kv, kv_heads]` (F16), mask
    /// `[n_kv, n_q]` F16. Result `[d, heads, n_q]`, accumulated in F32.
    pub fn flash_attn<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        mask: Tensor<'a>,
        scale: f32,
        softcap: f32,
    ) -> Tensor<'a> {
        // SAFETY: all live; shapes checked by the model before building.
        let t = unsafe {
            sys::ggml_flash_attn_ext(
                self.c(),
                q.raw(),
                k.raw(),
                v.raw(),
                mask.raw(),
                scale,
                0.0,
                softcap,
            )
        };
        // SAFETY: t is a FLASH_ATTN_EXT node.
        unsafe { sys::ggml_flash_attn_ext_set_prec(t, sys::GGML_PREC_F32) };
        self.wrap(t)
    }
}

impl Drop for GraphBuilder {
    fn drop(&mut self) {
        // SAFETY: ctx came from ggml_init and is freed once; the graph lives in it.
        unsafe { sys::ggml_free(self.ctx.as_ptr()) };
    }
}

fn unreachable_tensor<'a>() -> Tensor<'a> {
    // ggml never returns null from its op constructors (it aborts instead).
    std::process::abort()
}
