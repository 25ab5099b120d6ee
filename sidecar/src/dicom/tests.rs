use dicom_ul::pdu::{
    AbortRQSource, AssociationAC, AssociationRQ, PDataValue, PDataValueType, Pdu,
    PresentationContextProposed, PresentationContextResult, PresentationContextResultReason,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::command::{self, Command};
use super::dataset::{DataSetObserver, IMPLICIT_VR_LE};
use super::pdu::{Event, PduReader};

/// A normalized event: PDV chunks are joined per fragment, so any split gives the same list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Norm {
    Rq(String, String, Vec<(u8, Option<String>, Vec<String>)>),
    Ac(Vec<(u8, Option<u8>, Vec<String>)>),
    Pdv(u8, bool, bool, Vec<u8>),
    ReleaseRq,
    ReleaseRp,
    Abort,
    Other,
}

fn ours(bytes: &[u8], splits: &[usize]) -> Vec<Norm> {
    let mut r = PduReader::new();
    let mut out = Vec::new();
    let mut frag: Option<(u8, bool, bool, Vec<u8>)> = None;
    let mut prev = 0;
    for &s in splits.iter().chain(std::iter::once(&bytes.len())) {
        r.feed(&bytes[prev..s], |e| match e {
            Event::AssociateRq(a) => out.push(Norm::Rq(
                a.called_ae,
                a.calling_ae,
                a.contexts
                    .into_iter()
                    .map(|c| (c.id, c.abstract_syntax, c.transfer_syntaxes))
                    .collect(),
            )),
            Event::AssociateAc(a) => out.push(Norm::Ac(
                a.contexts
                    .into_iter()
                    .map(|c| (c.id, c.result, c.transfer_syntaxes))
                    .collect(),
            )),
            Event::Pdv {
                ctx,
                command,
                last,
                end,
                data,
            } => {
                let f = frag.get_or_insert_with(|| (ctx, command, last, Vec::new()));
                f.3.extend_from_slice(data);
                if end {
                    let (c, cmd, l, d) = frag.take().unwrap();
                    out.push(Norm::Pdv(c, cmd, l, d));
                }
            }
            Event::ReleaseRq => out.push(Norm::ReleaseRq),
            Event::ReleaseRp => out.push(Norm::ReleaseRp),
            Event::Abort { .. } => out.push(Norm::Abort),
            _ => out.push(Norm::Other),
        })
        .unwrap();
        prev = s;
    }
    out
}

/// The same stream read by dicom-ul, an independent implementation.
fn theirs(mut bytes: &[u8]) -> Vec<Norm> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let before = bytes.len();
        let pdu = dicom_ul::pdu::read_pdu(&mut bytes, 1 << 20, false)
            .unwrap()
            .unwrap();
        assert!(bytes.len() < before);
        match pdu {
            Pdu::AssociationRQ(a) => out.push(Norm::Rq(
                a.called_ae_title,
                a.calling_ae_title,
                a.presentation_contexts
                    .into_iter()
                    .map(|c| (c.id, Some(c.abstract_syntax), c.transfer_syntaxes))
                    .collect(),
            )),
            Pdu::AssociationAC(a) => out.push(Norm::Ac(
                a.presentation_contexts
                    .into_iter()
                    .map(|c| (c.id, Some(c.reason as u8), vec![c.transfer_syntax]))
                    .collect(),
            )),
            Pdu::PData { data } => {
                for v in data {
                    out.push(Norm::Pdv(
                        v.presentation_context_id,
                        v.value_type == PDataValueType::Command,
                        v.is_last,
                        v.data,
                    ))
                }
            }
            Pdu::ReleaseRQ => out.push(Norm::ReleaseRq),
            Pdu::ReleaseRP => out.push(Norm::ReleaseRp),
            Pdu::AbortRQ { .. } => out.push(Norm::Abort),
            _ => out.push(Norm::Other),
        }
    }
    out
}

fn synthetic(rows: u16) -> Vec<u8> {
    medmesh_core::dicom::synthetic_ct(&medmesh_core::dicom::SyntheticInstance {
        study_uid: "2.25.100".into(),
        series_uid: "2.25.100.1".into(),
        sop_instance_uid: "2.25.100.1.7".into(),
        patient_name: "TEST^PATIENT".into(),
        patient_id: "PID-1".into(),
        rows,
        columns: rows,
        seed: 3,
    })
}

/// A C-STORE association written by dicom-ul: RQ, AC, a command, a data set in three
/// fragments over two PDUs, the response, release.
fn store_stream() -> (Vec<u8>, Vec<u8>) {
    let file = synthetic(16);
    let ds = medmesh_core::dicom::split_part10(&file)
        .unwrap()
        .unwrap()
        .dataset
        .to_vec();
    let cmd = command::encode(&Command {
        field: command::C_STORE_RQ,
        message_id: Some(7),
        sop_class: Some("1.2.840.10008.5.1.4.1.1.2".into()),
        sop_instance: Some("2.25.100.1.7".into()),
        has_dataset: true,
        ..Default::default()
    });
    let third = ds.len() / 3;
    let pdus = vec![
        Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "STORESCU".into(),
            called_ae_title: "ORTHANC".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![
                PresentationContextProposed {
                    id: 1,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
                    transfer_syntaxes: vec![
                        "1.2.840.10008.1.2.1".into(),
                        "1.2.840.10008.1.2".into(),
                    ],
                },
                PresentationContextProposed {
                    id: 3,
                    abstract_syntax: "1.2.840.10008.1.1".into(),
                    transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
                },
            ],
            user_variables: vec![],
        }),
        Pdu::AssociationAC(AssociationAC {
            protocol_version: 1,
            calling_ae_title: "STORESCU".into(),
            called_ae_title: "ORTHANC".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![PresentationContextResult {
                id: 1,
                reason: PresentationContextResultReason::Acceptance,
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
            }],
            user_variables: vec![],
        }),
        Pdu::PData {
            data: vec![
                PDataValue {
                    presentation_context_id: 1,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: cmd,
                },
                PDataValue {
                    presentation_context_id: 1,
                    value_type: PDataValueType::Data,
                    is_last: false,
                    data: ds[..third].to_vec(),
                },
            ],
        },
        Pdu::PData {
            data: vec![
                PDataValue {
                    presentation_context_id: 1,
                    value_type: PDataValueType::Data,
                    is_last: false,
                    data: ds[third..2 * third].to_vec(),
                },
                PDataValue {
                    presentation_context_id: 1,
                    value_type: PDataValueType::Data,
                    is_last: true,
                    data: ds[2 * third..].to_vec(),
                },
            ],
        },
        Pdu::ReleaseRQ,
        Pdu::ReleaseRP,
        Pdu::AbortRQ {
            source: AbortRQSource::ServiceUser,
        },
    ];
    let mut bytes = Vec::new();
    for p in &pdus {
        dicom_ul::pdu::write_pdu(&mut bytes, p).unwrap();
    }
    (bytes, ds)
}

#[test]
fn pdu_stream_matches_dicom_ul_at_every_split() {
    let (bytes, ds) = store_stream();
    let want = theirs(&bytes);
    assert_eq!(ours(&bytes, &[]), want);
    for s in 0..=bytes.len() {
        assert_eq!(ours(&bytes, &[s]), want, "split at {s}");
    }
    // Byte by byte.
    let every: Vec<usize> = (1..bytes.len()).collect();
    assert_eq!(ours(&bytes, &every), want);
    // The data set fragments join to the data set.
    let joined: Vec<u8> = want
        .iter()
        .filter_map(|n| match n {
            Norm::Pdv(_, false, _, d) => Some(d.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(joined, ds);
    let Norm::Pdv(_, true, true, cmd) = &want[2] else {
        panic!("{:?}", want[2])
    };
    let c = command::parse(cmd).unwrap();
    assert_eq!(
        (c.field, c.message_id, c.has_dataset),
        (command::C_STORE_RQ, Some(7), true)
    );
    assert_eq!(c.sop_instance.as_deref(), Some("2.25.100.1.7"));
}

/// Seed corpus of the `dicom_stream` fuzz target (a C-STORE association written by dicom-ul):
/// `MEDMESH_BLESS=1 cargo test -p medmesh-sidecar dicom_fuzz_seed`.
#[test]
fn dicom_fuzz_seed() {
    let (bytes, _) = store_stream();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/seeds/dicom_stream/c-store"
    );
    if std::env::var_os("MEDMESH_BLESS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        std::fs::write(path, &bytes).unwrap();
    }
    // The association's fixed parts (the data set is synthetic and seeded): same length.
    assert_eq!(
        std::fs::read(path).unwrap().len(),
        bytes.len(),
        "{path} is stale: regenerate it"
    );
}

#[test]
fn malformed_pdus_fail_precisely_and_stay_failed() {
    let mut r = PduReader::new();
    // A P-DATA-TF whose PDV claims more than the PDU holds.
    let bad = [0x04, 0, 0, 0, 0, 10, 0, 0, 0, 200, 1, 3];
    let e = r.feed(&bad, |_| {}).unwrap_err();
    assert!(e.to_string().contains("PDV of 200 bytes"), "{e}");
    assert!(r.feed(&[0], |_| {}).is_err());
    let mut r = PduReader::new();
    let e = r.feed(&[0x01, 0, 0x01, 0, 0, 0], |_| {}).unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
    let mut r = PduReader::new();
    let e = r
        .feed(&[0x01, 0, 0, 0, 0, 4, 0, 1, 0, 0], |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("A-ASSOCIATE-RQ"), "{e}");
}

fn element(
    out: &mut Vec<u8>,
    explicit: bool,
    tag: (u16, u16),
    vr: &[u8; 2],
    value: &[u8],
    undefined: bool,
) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    let len = if undefined {
        0xFFFF_FFFF
    } else {
        value.len() as u32
    };
    if tag.0 == 0xFFFE || !explicit {
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        out.extend_from_slice(vr);
        if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&len.to_le_bytes());
        } else {
            out.extend_from_slice(&(len as u16).to_le_bytes());
        }
    }
    out.extend_from_slice(value);
}

/// A data set with an undefined-length sequence holding a decoy Study UID, then the real one.
fn nested(explicit: bool) -> Vec<u8> {
    let mut d = Vec::new();
    element(
        &mut d,
        explicit,
        (0x0008, 0x0016),
        b"UI",
        b"1.2.840.10008.5.1.4.1.1.2\0",
        false,
    );
    element(
        &mut d,
        explicit,
        (0x0008, 0x0018),
        b"UI",
        b"2.25.9.1\0",
        false,
    );
    element(&mut d, explicit, (0x0008, 0x1115), b"SQ", &[], true);
    element(&mut d, explicit, (0xFFFE, 0xE000), b"  ", &[], true);
    element(
        &mut d,
        explicit,
        (0x0020, 0x000D),
        b"UI",
        b"2.25.666\0",
        false,
    );
    element(&mut d, explicit, (0x0008, 0x1199), b"SQ", &[], true);
    let mut item = Vec::new();
    element(
        &mut item,
        explicit,
        (0x0020, 0x000E),
        b"UI",
        b"2.25.667\0",
        false,
    );
    element(&mut d, explicit, (0xFFFE, 0xE000), b"  ", &item, false);
    element(&mut d, explicit, (0xFFFE, 0xE0DD), b"  ", &[], false);
    element(&mut d, explicit, (0xFFFE, 0xE00D), b"  ", &[], false);
    element(&mut d, explicit, (0xFFFE, 0xE0DD), b"  ", &[], false);
    element(
        &mut d,
        explicit,
        (0x0010, 0x0010),
        b"PN",
        b"DOE^JANE",
        false,
    );
    element(
        &mut d,
        explicit,
        (0x0020, 0x000D),
        b"UI",
        b"2.25.1\0",
        false,
    );
    element(
        &mut d,
        explicit,
        (0x0020, 0x000E),
        b"UI",
        b"2.25.1.2\0",
        false,
    );
    element(
        &mut d,
        explicit,
        (0x7FE0, 0x0010),
        b"OW",
        &[7u8; 512],
        false,
    );
    d
}

fn observe(ts: &str, bytes: &[u8], splits: &[usize]) -> super::dataset::Observed {
    let mut o = DataSetObserver::new(ts);
    let mut prev = 0;
    for &s in splits.iter().chain(std::iter::once(&bytes.len())) {
        o.feed(&bytes[prev..s]);
        prev = s;
    }
    o.finish()
}

#[test]
fn dataset_uids_and_hash_at_every_split() {
    for (ts, explicit) in [(IMPLICIT_VR_LE, false), ("1.2.840.10008.1.2.1", true)] {
        let d = nested(explicit);
        let sha: [u8; 32] = Sha256::digest(&d).into();
        for s in 0..=d.len() {
            let o = observe(ts, &d, &[s]);
            assert_eq!(o.sha256, sha);
            assert_eq!(o.bytes, d.len() as u64);
            assert_eq!(o.study_uid.as_deref(), Some("2.25.1"), "{ts} split {s}");
            assert_eq!(o.series_uid.as_deref(), Some("2.25.1.2"), "{ts} split {s}");
            assert_eq!(o.sop_instance_uid.as_deref(), Some("2.25.9.1"));
        }
    }
    // The synthetic CT (explicit VR LE with pixel data), byte by byte.
    let file = synthetic(32);
    let ds = medmesh_core::dicom::split_part10(&file)
        .unwrap()
        .unwrap()
        .dataset
        .to_vec();
    let every: Vec<usize> = (1..ds.len()).collect();
    let o = observe("1.2.840.10008.1.2.1", &ds, &every);
    assert_eq!(o.study_uid.as_deref(), Some("2.25.100"));
    assert_eq!(o.series_uid.as_deref(), Some("2.25.100.1"));
    assert_eq!(o.sha256, <[u8; 32]>::from(Sha256::digest(&ds)));
    // Deflated data sets are hashed, not parsed.
    let o = observe(super::dataset::DEFLATED, &ds, &[]);
    assert_eq!((o.study_uid, o.bytes), (None, ds.len() as u64));
}

proptest! {
    /// Arbitrary bytes never panic either parser.
    #[test]
    fn total(bytes in prop::collection::vec(any::<u8>(), 0..4096), split in any::<usize>()) {
        let s = if bytes.is_empty() { 0 } else { split % bytes.len() };
        let mut r = PduReader::new();
        let _ = r.feed(&bytes[..s], |_| {});
        let _ = r.feed(&bytes[s..], |_| {});
        let _ = observe(IMPLICIT_VR_LE, &bytes, &[s]);
        let _ = observe("1.2.840.10008.1.2.1", &bytes, &[s]);
        let _ = command::parse(&bytes);
    }
}

mod tracking {
    use dicom_ul::pdu::{
        AssociationRJ, AssociationRJResult, AssociationRJServiceUserReason, AssociationRJSource,
    };

    use super::super::tracker::{Dir, Kind, StatusClass, Tracker, status_class};
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";

    fn rq() -> Pdu {
        Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "STORESCU".into(),
            called_ae_title: "ORTHANC".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![PresentationContextProposed {
                id: 1,
                abstract_syntax: CT.into(),
                transfer_syntaxes: vec![EXPLICIT.into()],
            }],
            user_variables: vec![],
        })
    }

    fn ac() -> Pdu {
        Pdu::AssociationAC(AssociationAC {
            protocol_version: 1,
            calling_ae_title: "STORESCU".into(),
            called_ae_title: "ORTHANC".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![PresentationContextResult {
                id: 1,
                reason: PresentationContextResultReason::Acceptance,
                transfer_syntax: EXPLICIT.into(),
            }],
            user_variables: vec![],
        })
    }

    fn msg(c: Command, ds: Option<&[u8]>) -> Pdu {
        let mut data = vec![PDataValue {
            presentation_context_id: 1,
            value_type: PDataValueType::Command,
            is_last: true,
            data: command::encode(&c),
        }];
        if let Some(ds) = ds {
            let half = ds.len() / 2;
            for (part, last) in [(&ds[..half], false), (&ds[half..], true)] {
                data.push(PDataValue {
                    presentation_context_id: 1,
                    value_type: PDataValueType::Data,
                    is_last: last,
                    data: part.to_vec(),
                });
            }
        }
        Pdu::PData { data }
    }

    /// Feeds `(direction, pdu)` pairs through one reader per direction into a tracker.
    fn run(steps: Vec<(Dir, Pdu)>) -> Vec<super::super::tracker::Transfer> {
        let mut readers = [PduReader::new(), PduReader::new()];
        let mut t = Tracker::new();
        for (dir, pdu) in steps {
            let mut bytes = Vec::new();
            dicom_ul::pdu::write_pdu(&mut bytes, &pdu).unwrap();
            let r = &mut readers[usize::from(dir == Dir::FromAcceptor)];
            // Feed in small chunks, as a socket would deliver them.
            for chunk in bytes.chunks(7) {
                r.feed(chunk, |e| t.on_event(dir, &e)).unwrap();
            }
        }
        t.finish();
        t.drain()
    }

    fn store_rq(id: u16, instance: &str) -> Command {
        Command {
            field: command::C_STORE_RQ,
            message_id: Some(id),
            sop_class: Some(CT.into()),
            sop_instance: Some(instance.into()),
            has_dataset: true,
            ..Default::default()
        }
    }

    fn rsp(field: u16, to: u16, status: u16) -> Command {
        Command {
            field,
            responded_to: Some(to),
            status: Some(status),
            ..Default::default()
        }
    }

    fn dataset() -> Vec<u8> {
        let file = synthetic(16);
        medmesh_core::dicom::split_part10(&file)
            .unwrap()
            .unwrap()
            .dataset
            .to_vec()
    }

    #[test]
    fn c_store_success_and_failure() {
        let ds = dataset();
        let out = run(vec![
            (Dir::FromRequestor, rq()),
            (Dir::FromAcceptor, ac()),
            (
                Dir::FromRequestor,
                msg(store_rq(7, "2.25.100.1.7"), Some(&ds)),
            ),
            (
                Dir::FromAcceptor,
                msg(rsp(command::C_STORE_RSP, 7, 0x0000), None),
            ),
            (
                Dir::FromRequestor,
                msg(store_rq(8, "2.25.100.1.8"), Some(&ds)),
            ),
            (
                Dir::FromAcceptor,
                msg(rsp(command::C_STORE_RSP, 8, 0xA700), None),
            ),
            (Dir::FromRequestor, Pdu::ReleaseRQ),
            (Dir::FromAcceptor, Pdu::ReleaseRP),
        ]);
        let kinds: Vec<Kind> = out.iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            vec![Kind::Opened, Kind::Stored, Kind::Stored, Kind::Closed]
        );
        let ok = &out[1];
        assert_eq!(
            (ok.calling_ae.as_str(), ok.called_ae.as_str()),
            ("STORESCU", "ORTHANC")
        );
        assert_eq!(ok.sop_instance.as_deref(), Some("2.25.100.1.7"));
        assert_eq!(ok.transfer_syntax.as_deref(), Some(EXPLICIT));
        assert_eq!(ok.status, Some(0));
        let d = ok.dataset.as_ref().unwrap();
        assert_eq!(d.sha256, <[u8; 32]>::from(Sha256::digest(&ds)));
        assert_eq!(d.study_uid.as_deref(), Some("2.25.100"));
        assert_eq!(out[2].status, Some(0xA700));
        assert_eq!(status_class(0xA700), StatusClass::Failure);
    }

    #[test]
    fn c_get_sub_operations_are_retrievals() {
        let ds = dataset();
        let get = Command {
            field: command::C_GET_RQ,
            message_id: Some(1),
            sop_class: Some("1.2.840.10008.5.1.4.1.2.2.3".into()),
            has_dataset: true,
            ..Default::default()
        };
        let identifier = nested(true);
        let out = run(vec![
            (Dir::FromRequestor, rq()),
            (Dir::FromAcceptor, ac()),
            (Dir::FromRequestor, msg(get, Some(&identifier))),
            (
                Dir::FromAcceptor,
                msg(store_rq(2, "2.25.100.1.9"), Some(&ds)),
            ),
            (
                Dir::FromRequestor,
                msg(rsp(command::C_STORE_RSP, 2, 0), None),
            ),
            (
                Dir::FromAcceptor,
                msg(rsp(command::C_GET_RSP, 1, 0xFF00), None),
            ),
            (
                Dir::FromAcceptor,
                msg(rsp(command::C_GET_RSP, 1, 0x0000), None),
            ),
        ]);
        let kinds: Vec<Kind> = out.iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            vec![Kind::Opened, Kind::Retrieved, Kind::Query, Kind::Closed]
        );
        assert_eq!(out[1].sop_instance.as_deref(), Some("2.25.100.1.9"));
        assert!(out[1].dataset.is_some());
        // A query keeps nothing of its identifier.
        assert!(out[2].dataset.is_none() && out[2].sop_instance.is_none());
        assert_eq!(out[2].status, Some(0));
    }

    #[test]
    fn abort_mid_transfer_and_echo_and_refusal() {
        let ds = dataset();
        let out = run(vec![
            (Dir::FromRequestor, rq()),
            (Dir::FromAcceptor, ac()),
            (
                Dir::FromRequestor,
                msg(
                    Command {
                        field: command::C_ECHO_RQ,
                        message_id: Some(1),
                        ..Default::default()
                    },
                    None,
                ),
            ),
            (Dir::FromAcceptor, msg(rsp(command::C_ECHO_RSP, 1, 0), None)),
            (
                Dir::FromRequestor,
                msg(store_rq(2, "2.25.100.1.2"), Some(&ds)),
            ),
            (
                Dir::FromAcceptor,
                Pdu::AbortRQ {
                    source: AbortRQSource::ServiceUser,
                },
            ),
        ]);
        let kinds: Vec<Kind> = out.iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            vec![Kind::Opened, Kind::Echo, Kind::Stored, Kind::Closed]
        );
        assert_eq!(out[1].status, Some(0));
        assert_eq!(out[2].status, None, "no response: aborted");
        let out = run(vec![
            (Dir::FromRequestor, rq()),
            (
                Dir::FromAcceptor,
                Pdu::AssociationRJ(AssociationRJ {
                    result: AssociationRJResult::Permanent,
                    source: AssociationRJSource::ServiceUser(
                        AssociationRJServiceUserReason::CalledAETitleNotRecognized,
                    ),
                }),
            ),
        ]);
        assert_eq!(
            out.iter().map(|t| t.kind).collect::<Vec<_>>(),
            vec![Kind::Refused, Kind::Closed]
        );
    }

    #[test]
    fn unmatched_responses_and_duplicate_ids_fail_closed() {
        let ds = dataset();
        // A success C-STORE-RSP answering no request the tracker saw.
        let mut readers = [PduReader::new(), PduReader::new()];
        let mut t = Tracker::new();
        for (dir, pdu) in [
            (Dir::FromRequestor, rq()),
            (Dir::FromAcceptor, ac()),
            (
                Dir::FromAcceptor,
                msg(rsp(command::C_STORE_RSP, 42, 0), None),
            ),
        ] {
            let mut bytes = Vec::new();
            dicom_ul::pdu::write_pdu(&mut bytes, &pdu).unwrap();
            let r = &mut readers[usize::from(dir == Dir::FromAcceptor)];
            r.feed(&bytes, |e| t.on_event(dir, &e)).unwrap();
        }
        assert_eq!(t.take_unmatched(), vec![42]);
        assert!(!t.poisoned());
        // Two outstanding stores with one message id: which answer is whose is unknowable.
        let mut r = PduReader::new();
        let mut t = Tracker::new();
        for pdu in [
            rq(),
            msg(store_rq(5, "2.25.1"), Some(&ds)),
            msg(store_rq(5, "2.25.2"), Some(&ds)),
        ] {
            let mut bytes = Vec::new();
            dicom_ul::pdu::write_pdu(&mut bytes, &pdu).unwrap();
            r.feed(&bytes, |e| t.on_event(Dir::FromRequestor, &e))
                .unwrap();
        }
        assert!(t.poisoned());
    }
}
