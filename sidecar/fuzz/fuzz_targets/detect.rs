//! Protocol detection and ClientHello parsing on untrusted first bytes: never panic, and every
//! prefix of a decided input is either undecided or decided the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_sidecar::detect::{MAX_PEEK, detect};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_PEEK)];
    if let Some(d) = detect(data) {
        for n in [1, data.len() / 2, data.len().saturating_sub(1)] {
            if n == 0 || n >= data.len() {
                continue;
            }
            if let Some(p) = detect(&data[..n]) {
                // TLS records are decided only once complete, so a prefix can only differ
                // by being undecided.
                assert_eq!(p, d, "prefix {n} decided differently");
            }
        }
    }
});
