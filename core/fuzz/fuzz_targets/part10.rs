//! DICOM Part 10 headers from untrusted files: never panic, the data set is a suffix.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(p)) = medmesh_core::dicom::split_part10(data) {
        assert!(data.ends_with(p.dataset));
    }
});
