//! Ledger entries and records from untrusted bytes: never panic; whatever decodes is canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_core::record::{AuditRecord, LogEntry};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = LogEntry::decode(data) {
        assert_eq!(e.encode(), data, "entry decoding is not canonical");
    }
    if let Ok(r) = AuditRecord::decode(data) {
        assert_eq!(r.encode(), data, "record decoding is not canonical");
    }
});
