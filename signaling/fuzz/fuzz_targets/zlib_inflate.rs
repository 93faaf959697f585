//! zlib inflate of `compress: true` DataChannel messages: never more than
//! the cap, and what hato deflates comes back whole.
#![no_main]
use hato_signaling::zlib::{compress, decompress};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = decompress(data, CAP) {
        assert!(out.len() <= CAP);
    }
    if data.len() <= CAP {
        assert_eq!(decompress(&compress(data), CAP).unwrap(), data);
    }
});
