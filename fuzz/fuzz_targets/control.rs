//! Fuzz target `control`: see `exo::fuzzing::control`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exo::fuzzing::control(data));
