//! Fuzz target `request`: see `exo::fuzzing::request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exo::fuzzing::request(data));
