//! The ledger's JSON request bodies: never panic; whatever parses round-trips through the
//! canonical encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_core::record::AuditRecord;
use medmesh_core::wire::BatchRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<AuditRecord>(data) {
        assert_eq!(AuditRecord::decode(&r.encode()).as_ref(), Ok(&r));
        let again: AuditRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }
    if let Ok(b) = serde_json::from_slice::<BatchRequest>(data) {
        for r in &b.records {
            assert_eq!(AuditRecord::decode(&r.encode()).as_ref(), Ok(r));
        }
    }
});
