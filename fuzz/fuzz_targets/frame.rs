//! Fuzz target `frame`: see `exo::fuzzing::frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exo::fuzzing::frame(data));
