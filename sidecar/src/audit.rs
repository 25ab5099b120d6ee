//! Turns what the DICOM tracker saw into audit records: both workload identities from the mTLS
//! session, UIDs and AE titles only as keyed hashes, the data set's SHA-256 and size, the
//! outcome from the DIMSE status. Nothing that could name a patient leaves this function.

use medmesh_core::SpiffeId;
use medmesh_core::merkle::Hash;
use medmesh_core::record::{AuditRecord, EventKind, Outcome, Protocol, RecordId, UidKey};

use crate::dicom::part10::Part10Observed;
use crate::dicom::tracker::{Kind, StatusClass, Transfer, status_class};

/// The record of `t` on an association from `requestor` to `acceptor` (this workload).
///
/// # Errors
/// When the operating system's random generator fails (record ids).
pub fn dimse_record(
    t: &Transfer,
    requestor: &SpiffeId,
    acceptor: &SpiffeId,
    key: &UidKey,
    time_us: u64,
) -> Result<AuditRecord, getrandom::Error> {
    let kind = match t.kind {
        Kind::Stored => EventKind::InstanceStored,
        Kind::Retrieved => EventKind::InstanceRetrieved,
        Kind::Query => EventKind::QueryPerformed,
        Kind::Echo => EventKind::Verification,
        Kind::Opened => EventKind::AssociationOpened,
        Kind::Refused => EventKind::AssociationRefused,
        Kind::Closed => EventKind::AssociationClosed,
    };
    // Source and destination follow the instance's bytes: a retrieval flows from the acceptor.
    let (source, destination) = match t.kind {
        Kind::Retrieved => (acceptor.clone(), requestor.clone()),
        _ => (requestor.clone(), acceptor.clone()),
    };
    let outcome = match (t.kind, t.status.map(status_class)) {
        (Kind::Opened | Kind::Closed, _) => Outcome::Success,
        (Kind::Refused, _) => Outcome::Failure,
        (_, None) => Outcome::Aborted,
        (_, Some(StatusClass::Success)) => Outcome::Success,
        (_, Some(StatusClass::Warning)) => Outcome::Warning,
        (_, Some(_)) => Outcome::Failure,
    };
    let ds = t.dataset.as_ref();
    let instance = t
        .sop_instance
        .as_deref()
        .or_else(|| ds.and_then(|d| d.sop_instance_uid.as_deref()));
    Ok(AuditRecord {
        record_id: RecordId::new()?,
        kind,
        time_us,
        source,
        destination,
        protocol: Protocol::Dimse,
        outcome,
        status: t.status,
        bytes: ds.map_or(0, |d| d.bytes),
        content_sha256: ds.map(|d| Hash(d.sha256)),
        study_uid: ds
            .and_then(|d| d.study_uid.as_deref())
            .map(|u| key.hash_uid(u)),
        series_uid: ds
            .and_then(|d| d.series_uid.as_deref())
            .map(|u| key.hash_uid(u)),
        sop_instance_uid: instance.map(|u| key.hash_uid(u)),
        calling_ae: (!t.calling_ae.is_empty()).then(|| key.hash_ae_title(&t.calling_ae)),
        called_ae: (!t.called_ae.is_empty()).then(|| key.hash_ae_title(&t.called_ae)),
        sop_class_uid: t.sop_class.as_deref().and_then(|u| u.parse().ok()),
        transfer_syntax_uid: t.transfer_syntax.as_deref().and_then(|u| u.parse().ok()),
        cid: None,
        archived_record: None,
    })
}

/// The record of one DICOMweb instance (a Part 10 file in a STOW-RS request or WADO-RS
/// response) between `requestor` (the HTTP client) and `acceptor` (this workload). The hash
/// and size are of the whole file.
///
/// # Errors
/// When the operating system's random generator fails (record ids).
#[allow(clippy::too_many_arguments)]
pub fn dicomweb_record(
    part: &Part10Observed,
    kind: EventKind,
    requestor: &SpiffeId,
    acceptor: &SpiffeId,
    key: &UidKey,
    status: Option<u16>,
    outcome: Outcome,
    time_us: u64,
) -> Result<AuditRecord, getrandom::Error> {
    let (source, destination) = match kind {
        EventKind::InstanceRetrieved => (acceptor.clone(), requestor.clone()),
        _ => (requestor.clone(), acceptor.clone()),
    };
    let ds = part.dataset.as_ref();
    Ok(AuditRecord {
        record_id: RecordId::new()?,
        kind,
        time_us,
        source,
        destination,
        protocol: Protocol::DicomWeb,
        outcome,
        status,
        bytes: part.bytes,
        content_sha256: Some(Hash(part.sha256)),
        study_uid: ds
            .and_then(|d| d.study_uid.as_deref())
            .map(|u| key.hash_uid(u)),
        series_uid: ds
            .and_then(|d| d.series_uid.as_deref())
            .map(|u| key.hash_uid(u)),
        sop_instance_uid: ds
            .and_then(|d| d.sop_instance_uid.as_deref())
            .map(|u| key.hash_uid(u)),
        calling_ae: None,
        called_ae: None,
        sop_class_uid: ds
            .and_then(|d| d.sop_class_uid.as_deref())
            .and_then(|u| u.parse().ok()),
        transfer_syntax_uid: part.transfer_syntax.as_deref().and_then(|u| u.parse().ok()),
        cid: None,
        archived_record: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::dataset::Observed;

    #[test]
    fn records_carry_no_identifier_in_clear() {
        let key = UidKey::new(vec![9; 32]).unwrap();
        let t = Transfer {
            kind: Kind::Stored,
            calling_ae: "CT-SCANNER-3".into(),
            called_ae: "ORTHANC".into(),
            sop_class: Some("1.2.840.10008.5.1.4.1.1.2".into()),
            sop_instance: Some("1.2.3.4.5.6.7".into()),
            transfer_syntax: Some("1.2.840.10008.1.2.1".into()),
            dataset: Some(Observed {
                sha256: [1; 32],
                bytes: 1234,
                study_uid: Some("1.2.3.4".into()),
                series_uid: Some("1.2.3.4.5".into()),
                sop_instance_uid: Some("1.2.3.4.5.6.7".into()),
                sop_class_uid: None,
            }),
            status: Some(0xB000),
            message_id: Some(1),
            staged: None,
        };
        let scanner: SpiffeId = "spiffe://td/ns/radiology/sa/ct".parse().unwrap();
        let pacs: SpiffeId = "spiffe://td/ns/pacs/sa/orthanc".parse().unwrap();
        let r = dimse_record(&t, &scanner, &pacs, &key, 1).unwrap();
        assert_eq!(
            (r.kind, r.outcome, r.bytes),
            (EventKind::InstanceStored, Outcome::Warning, 1234)
        );
        assert_eq!(
            (r.source.clone(), r.destination.clone()),
            (scanner.clone(), pacs.clone())
        );
        assert_eq!(r.study_uid, Some(key.hash_uid("1.2.3.4")));
        assert_eq!(r.sop_instance_uid, Some(key.hash_uid("1.2.3.4.5.6.7")));
        let json = serde_json::to_string(&r).unwrap();
        for clear in ["1.2.3.4.5.6.7", "\"1.2.3.4\"", "CT-SCANNER-3", "ORTHANC"] {
            assert!(!json.contains(clear), "{clear} in {json}");
        }
        // A retrieval flows from the acceptor; no response means aborted.
        let mut g = t.clone();
        g.kind = Kind::Retrieved;
        g.status = None;
        let r = dimse_record(&g, &scanner, &pacs, &key, 1).unwrap();
        assert_eq!(
            (r.source, r.destination, r.outcome),
            (pacs, scanner, Outcome::Aborted)
        );
    }
}
