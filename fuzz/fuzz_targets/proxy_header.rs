#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| matrix_edge::fuzzing::proxy_header(data));
