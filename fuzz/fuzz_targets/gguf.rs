//! Fuzz target `gguf`: see `exo::fuzzing::gguf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exo::fuzzing::gguf(data));
