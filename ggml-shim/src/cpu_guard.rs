//! Refuses to run on an x86-64 CPU that lacks an instruction set extension this
//! binary was compiled for (`-C target-cpu=…`), with a clear message instead of
//! SIGILL. It has to run before anything else: ggml's and llama.cpp's C++ static
//! initializers already execute such instructions before `main`. So it is a
//! constructor with an `.init_array` priority, which the linker orders before the
//! plain C++ initializers, and it asks the CPU itself (CPUID, and XGETBV for the OS
//! saving the AVX registers), which also tells the truth under emulation.
//!
//! The checking code must itself use none of those instructions: it is kept to
//! CPUID, bit tests and a write(2) of a static message; `scripts/build-deb.sh`
//! checks its disassembly.

/// A compiled-in feature the CPU lacks, by name ("AVX2"), or None.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
pub fn missing_feature() -> Option<&'static str> {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    // CPUID exists on every x86-64 CPU (a safe intrinsic); leaf 0 gives the highest leaf.
    let max_leaf = __cpuid(0).eax;
    let l1 = __cpuid(1);
    let l7 = if max_leaf >= 7 {
        __cpuid_count(7, 0).ebx
    } else {
        0
    };
    let osxsave = l1.ecx & (1 << 27) != 0;
    // SAFETY: XGETBV is only executed when the OS enabled XSAVE (OSXSAVE set).
    let xcr0 = if osxsave { unsafe { _xgetbv(0) } } else { 0 };
    let ymm_saved = xcr0 & 0b110 == 0b110;
    let zmm_saved = xcr0 & 0b1110_0110 == 0b1110_0110;
    let checks = [
        (
            cfg!(target_feature = "avx"),
            l1.ecx & (1 << 28) != 0 && ymm_saved,
            "AVX",
        ),
        (
            cfg!(target_feature = "avx2"),
            l7 & (1 << 5) != 0 && ymm_saved,
            "AVX2",
        ),
        (cfg!(target_feature = "fma"), l1.ecx & (1 << 12) != 0, "FMA"),
        (
            cfg!(target_feature = "f16c"),
            l1.ecx & (1 << 29) != 0,
            "F16C",
        ),
        (cfg!(target_feature = "bmi2"), l7 & (1 << 8) != 0, "BMI2"),
        // a build for this machine's CPU (target-cpu=native) may use AVX-512 too
        (
            cfg!(target_feature = "avx512f"),
            l7 & (1 << 16) != 0 && zmm_saved,
            "AVX-512F",
        ),
        (
            cfg!(target_feature = "avx512dq"),
            l7 & (1 << 17) != 0 && zmm_saved,
            "AVX-512DQ",
        ),
        (
            cfg!(target_feature = "avx512bw"),
            l7 & (1 << 30) != 0 && zmm_saved,
            "AVX-512BW",
        ),
        (
            cfg!(target_feature = "avx512vl"),
            l7 & (1 << 31) != 0 && zmm_saved,
            "AVX-512VL",
        ),
    ];
    for (compiled, present, name) in checks {
        if compiled && !present {
            return Some(name);
        }
    }
    None
}

/// Not x86-64: nothing to check.
#[cfg(not(target_arch = "x86_64"))]
pub fn missing_feature() -> Option<&'static str> {
    None
}

#[cfg(target_arch = "x86_64")]
const BEFORE: &[u8] = b"exo: error: this CPU lacks ";
#[cfg(target_arch = "x86_64")]
const AFTER: &[u8] = b", which this build of exo was compiled for (the amd64 package needs \
x86-64-v3: AVX2, FMA, F16C and BMI2, as on Intel Haswell, AMD Excavator or later). Install \
the package built for your CPU or build exo from source on this machine.\n";

/// The constructor: exits with status 1 and the message on a CPU that lacks a
/// compiled-in feature.
#[cfg(target_arch = "x86_64")]
extern "C" fn guard() {
    if let Some(name) = missing_feature() {
        // SAFETY: writes static buffers to fd 2 and exits; no Rust state is touched.
        unsafe {
            write(2, BEFORE.as_ptr(), BEFORE.len());
            write(2, name.as_ptr(), name.len());
            write(2, AFTER.as_ptr(), AFTER.len());
            _exit(1);
        }
    }
}

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    fn _exit(status: i32) -> !;
}

/// Priority 101, the first one free for programs: runs before the C++ static
/// initializers (which have no priority).
#[cfg(target_arch = "x86_64")]
#[used]
#[link_section = ".init_array.00101"]
static GUARD: extern "C" fn() = guard;

/// Whether the guard is linked in (referencing it keeps the linker from dropping it).
pub fn installed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let f: extern "C" fn() = GUARD;
        f as usize != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_build_machine_has_what_the_build_uses() {
        assert!(super::installed() || !cfg!(target_arch = "x86_64"));
        assert_eq!(super::missing_feature(), None);
    }
}
