use proptest::prelude::*;

use super::*;
use crate::merkle::{leaf_hash, sha256};

fn sample() -> AuditRecord {
    AuditRecord {
        record_id: RecordId([0x11; 16]),
        kind: EventKind::InstanceStored,
        time_us: 1_700_000_000_000_000,
        source: "spiffe://medmesh.local/ns/radiology/sa/scanner"
            .parse()
            .unwrap(),
        destination: "spiffe://medmesh.local/ns/pacs/sa/orthanc".parse().unwrap(),
        protocol: Protocol::Dimse,
        outcome: Outcome::Success,
        status: Some(0),
        bytes: 39_000,
        content_sha256: Some(sha256(b"data set")),
        study_uid: Some(KeyedHash([0x22; 32])),
        series_uid: Some(KeyedHash([0x33; 32])),
        sop_instance_uid: Some(KeyedHash([0x44; 32])),
        calling_ae: None,
        called_ae: None,
        sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".parse().unwrap()),
        transfer_syntax_uid: Some("1.2.840.10008.1.2.1".parse().unwrap()),
        cid: None,
        archived_record: None,
    }
}

fn entry() -> LogEntry {
    LogEntry {
        received_us: 1_700_000_000_000_123,
        submitter: "spiffe://medmesh.local/ns/pacs/sa/orthanc".parse().unwrap(),
        record: sample(),
    }
}

/// The test vector of docs/ledger-format.md: a layout change breaks this test. Regenerate the
/// files with `MEDMESH_BLESS=1 cargo test -p medmesh-core documented_vector` only when the format
/// version changes.
#[test]
fn documented_vector() {
    let e = entry();
    let bytes = e.encode();
    let hex = hex::encode(&bytes);
    let leaf = leaf_hash(&bytes).to_hex();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vectors");
    if std::env::var_os("MEDMESH_BLESS").is_some() {
        std::fs::write(format!("{dir}/entry-v1.hex"), format!("{hex}\n")).unwrap();
        std::fs::write(format!("{dir}/entry-v1.leaf"), format!("{leaf}\n")).unwrap();
    }
    // Fixed layout checks that do not depend on the vector files.
    assert_eq!(bytes.len(), 357);
    assert_eq!(&bytes[..3], &[1, 0x00, 0x06]);
    assert_eq!(&bytes[9..11], &[0, 41]);
    assert_eq!(&bytes[11..52], e.submitter.as_str().as_bytes());
    assert_eq!(bytes[52], RECORD_VERSION);
    assert_eq!(
        hex,
        std::fs::read_to_string(format!("{dir}/entry-v1.hex"))
            .unwrap()
            .trim()
    );
    assert_eq!(
        leaf,
        std::fs::read_to_string(format!("{dir}/entry-v1.leaf"))
            .unwrap()
            .trim()
    );
    assert_eq!(LogEntry::decode(&bytes).unwrap(), e);
}

#[test]
fn every_truncation_is_a_precise_error() {
    let bytes = entry().encode();
    for n in 0..bytes.len() {
        let err = LogEntry::decode(&bytes[..n]).unwrap_err();
        assert!(
            matches!(err, RecordError::Truncated { .. }),
            "at {n}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(
        LogEntry::decode(&longer).unwrap_err(),
        RecordError::Trailing(1)
    );
}

#[test]
fn rejects_non_canonical_bytes() {
    let bytes = entry().encode();
    let mut v = bytes.clone();
    v[0] = 2;
    assert!(matches!(
        LogEntry::decode(&v),
        Err(RecordError::Version {
            what: "entry",
            version: 2
        })
    ));
    // Record version sits after entry version, time and the submitter.
    let rec_at = 1 + 8 + 2 + entry().submitter.as_str().len();
    let mut v = bytes.clone();
    v[rec_at] = 9;
    assert!(matches!(
        LogEntry::decode(&v),
        Err(RecordError::Version { what: "record", .. })
    ));
    let mut v = bytes.clone();
    v[rec_at + 17] = 200;
    assert!(matches!(
        LogEntry::decode(&v),
        Err(RecordError::UnknownCode {
            field: "kind",
            code: 200
        })
    ));
    let rec = sample().encode();
    let flags_at = 1
        + 16
        + 3
        + 16
        + 2
        + sample().source.as_str().len()
        + 2
        + sample().destination.as_str().len();
    let mut v = rec.clone();
    v[flags_at] |= 0x80;
    assert!(matches!(
        AuditRecord::decode(&v),
        Err(RecordError::ReservedFlags(_))
    ));
}

#[test]
fn json_refuses_unknown_and_free_text_fields() {
    let mut json = serde_json::to_value(sample()).unwrap();
    json["patient_name"] = "DOE^JOHN".into();
    let err = serde_json::from_value::<AuditRecord>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `patient_name`"), "{err}");
    let mut json = serde_json::to_value(sample()).unwrap();
    json["sop_class_uid"] = "DOE^JOHN".into();
    assert!(serde_json::from_value::<AuditRecord>(json).is_err());
    let mut json = serde_json::to_value(sample()).unwrap();
    json["study_uid"] = "1.2.3.4".into();
    assert!(serde_json::from_value::<AuditRecord>(json).is_err());
}

#[test]
fn uid_hashes_are_keyed_and_trim_padding() {
    let k1 = UidKey::new(vec![1; 32]).unwrap();
    let k2 = UidKey::new(vec![2; 32]).unwrap();
    assert_eq!(k1.hash_uid("1.2.3\0"), k1.hash_uid("1.2.3"));
    assert_ne!(k1.hash_uid("1.2.3"), k2.hash_uid("1.2.3"));
    assert_ne!(k1.hash_uid("1.2.3"), k1.hash_ae_title("1.2.3"));
    assert!(UidKey::new(vec![0; 31]).is_err());
    assert_eq!(format!("{k1:?}"), "UidKey(<redacted>)");
}

fn arb_hash() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

prop_compose! {
    fn arb_record()(
        id in any::<[u8; 16]>(),
        kind in prop::sample::select(EventKind::ALL),
        protocol in prop::sample::select(Protocol::ALL),
        outcome in prop::sample::select(Outcome::ALL),
        time_us in any::<u64>(),
        bytes in any::<u64>(),
        src in "[a-z]{1,8}", dst in "[a-z]{1,8}",
        status in any::<Option<u16>>(),
        sha in prop::option::of(arb_hash()),
        study in prop::option::of(arb_hash()),
        ae in prop::option::of(arb_hash()),
        class in prop::option::of("[1-9][0-9]{0,5}(\\.[0-9]{1,5}){0,8}"),
        with_cid in any::<bool>(),
        archived in prop::option::of(any::<[u8; 16]>()),
    ) -> AuditRecord {
        AuditRecord {
            record_id: RecordId(id), kind, protocol, outcome, time_us, bytes, status,
            source: format!("spiffe://td/ns/{src}/sa/x").parse().unwrap(),
            destination: format!("spiffe://td/ns/{dst}/sa/y").parse().unwrap(),
            content_sha256: sha.map(Hash),
            study_uid: study.map(KeyedHash),
            series_uid: study.map(|s| KeyedHash([s[0]; 32])),
            sop_instance_uid: None,
            calling_ae: ae.map(KeyedHash),
            called_ae: None,
            sop_class_uid: class.map(|c| c.parse().unwrap()),
            transfer_syntax_uid: None,
            cid: with_cid.then(|| "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy".parse().unwrap()),
            archived_record: archived.map(RecordId),
        }
    }
}

proptest! {
    #[test]
    fn round_trips(rec in arb_record()) {
        let bytes = rec.encode();
        prop_assert_eq!(&AuditRecord::decode(&bytes).unwrap(), &rec);
        let json = serde_json::to_string(&rec).unwrap();
        prop_assert_eq!(&serde_json::from_str::<AuditRecord>(&json).unwrap(), &rec);
    }

    /// Decoding arbitrary bytes never panics, and whatever decodes re-encodes to the same bytes.
    #[test]
    fn decode_is_total_and_canonical(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(e) = LogEntry::decode(&bytes) {
            prop_assert_eq!(e.encode(), bytes);
        }
    }
}

/// Seed corpora for the fuzz targets (core/fuzz/seeds), written by this test so that they are
/// regenerated, never hand-edited: `MEDMESH_BLESS=1 cargo test -p medmesh-core fuzz_seeds`.
#[test]
fn fuzz_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds");
    let e = entry();
    let signer = crate::NoteSigner::from_seed("fuzz.example/log", [42; 32]).unwrap();
    let cp = crate::Checkpoint {
        origin: "fuzz.example/log".into(),
        size: 7,
        root: sha256(b"root"),
    };
    let dicom = crate::dicom::synthetic_ct(&crate::dicom::SyntheticInstance {
        study_uid: "2.25.1".into(),
        series_uid: "2.25.1.1".into(),
        sop_instance_uid: "2.25.1.1.1".into(),
        patient_name: "FUZZ^SEED".into(),
        patient_id: "SEED".into(),
        rows: 4,
        columns: 4,
        seed: 1,
    });
    let seeds: [(&str, Vec<u8>); 5] = [
        ("entry_decode/entry-v1", e.encode()),
        ("record_json/record", serde_json::to_vec(&e.record).unwrap()),
        (
            "record_json/batch",
            serde_json::to_vec(&crate::wire::BatchRequest {
                records: vec![e.record.clone()],
            })
            .unwrap(),
        ),
        (
            "signed_note/checkpoint",
            cp.sign(&signer).unwrap().into_bytes(),
        ),
        ("part10/synthetic-ct", dicom),
    ];
    for (name, bytes) in seeds {
        let path = format!("{dir}/{name}");
        if std::env::var_os("MEDMESH_BLESS").is_some() {
            std::fs::create_dir_all(std::path::Path::new(&path).parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{path} is stale: regenerate with MEDMESH_BLESS=1"
        );
    }
}
