#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sundial_tests::fuzz::modules(data));
