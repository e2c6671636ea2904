#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| matrix_edge::fuzzing::x_matrix(data));
