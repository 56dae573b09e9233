//! glibc's allocator, set for a long-running server that holds a few large buffers.
//!
//! By default glibc raises its mmap threshold to the size of the last large block
//! freed (up to 32 MiB) and its trim threshold to twice that, and gives each thread
//! that allocates at once an arena of its own. A node that frees a large load-time
//! buffer then keeps tens of MiB of freed memory resident, differently on every run.
//! Fixed thresholds (blocks of 16 MiB and more are mapped alone and returned when
//! freed; a heap top of more than 16 MiB free is trimmed) and two arenas took 25 to
//! 35 MiB off each node of a three-node Gemma 3 270M cluster
//! (`daemon/tests/cluster/memory.rs`). A 4 MiB threshold saved as much but mapped
//! Gemma's 8 MiB logits of an 8-stream step afresh each step: 8 streams decoded 8%
//! slower; at 16 MiB decoding is as fast as with glibc's defaults (within noise).

/// Blocks of this size and more are mapped on their own (and unmapped when freed).
pub const MMAP_THRESHOLD: usize = 16 << 20;
/// Free memory at the top of a heap beyond this is returned to the system.
pub const TRIM_THRESHOLD: usize = 16 << 20;
/// Arenas at most (threads share them).
pub const ARENAS: usize = 2;

/// Sets the thresholds and arena count above, unless `GLIBC_TUNABLES` names malloc
/// settings of its own (those win). Call once, early in `main`. Elsewhere than glibc
/// it does nothing.
pub fn tune_for_server() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return;
        }
        for (param, value) in [
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (libc::M_ARENA_MAX, ARENAS),
        ] {
            let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
            // SAFETY: mallopt only sets allocator parameters; any value is accepted or
            // refused (returning 0), never acted on unsafely.
            unsafe { libc::mallopt(param, value) };
        }
    }
}
