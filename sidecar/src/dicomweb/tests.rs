use super::*;
use medmesh_core::dicom::{SyntheticInstance, synthetic_ct};
use sha2::{Digest, Sha256};

fn instance(n: u32) -> Vec<u8> {
    synthetic_ct(&SyntheticInstance {
        study_uid: "2.25.70".into(),
        series_uid: "2.25.70.1".into(),
        sop_instance_uid: format!("2.25.70.1.{n}"),
        patient_name: "DOE^JANE".into(),
        patient_id: "PID-4711".into(),
        rows: 8,
        columns: 8,
        seed: n.into(),
    })
}

fn multipart(boundary: &str, files: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    for f in files {
        b.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        b.extend_from_slice(f);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    b
}

#[test]
fn classifies_stow_and_wado_paths_as_the_application_routes_them() {
    let cases = [
        (Method::POST, "/dicom-web/studies", Some(Transaction::Stow)),
        (
            Method::POST,
            "/dicom-web/studies/1.2.3",
            Some(Transaction::Stow),
        ),
        (Method::POST, "/studies?x=1", Some(Transaction::Stow)),
        // Encodings and dot segments an application decodes before routing.
        (
            Method::POST,
            "/dicom-web/%73tudies",
            Some(Transaction::Stow),
        ),
        (
            Method::POST,
            "/dicom-web/studies/x/..",
            Some(Transaction::Stow),
        ),
        (
            Method::POST,
            "/dicom-web/studies;a=b/",
            Some(Transaction::Stow),
        ),
        (Method::POST, "/dicom-web/STUDIES", Some(Transaction::Stow)),
        (Method::POST, "/dicom-web/%ff%fe", Some(Transaction::Stow)),
        (Method::POST, "/dicom-web/studies/1/series", None),
        (
            Method::GET,
            "/dicom-web/studies/1.2",
            Some(Transaction::Wado),
        ),
        (
            Method::GET,
            "/dicom-web/studies/1.2/series/3",
            Some(Transaction::Wado),
        ),
        (
            Method::GET,
            "/dicom-web/studies/1.2/series/3/instances/4",
            Some(Transaction::Wado),
        ),
        (
            Method::GET,
            "/dicom-web/studies/1.2/series/3/instances/4?accept=x",
            Some(Transaction::Wado),
        ),
        // Queries, metadata, rendered, frames: not instance transfers.
        (Method::GET, "/dicom-web/studies", None),
        (Method::GET, "/dicom-web/studies/1.2/metadata", None),
        (
            Method::GET,
            "/dicom-web/studies/1.2/series/3/rendered",
            None,
        ),
        (
            Method::GET,
            "/dicom-web/studies/1.2/series/3/instances/4/frames/1",
            None,
        ),
        (Method::GET, "/app/index.html", None),
        (Method::DELETE, "/dicom-web/studies/1.2", None),
    ];
    for (m, p, want) in cases {
        assert_eq!(classify(&m, p), want, "{m} {p}");
    }
}

#[test]
fn only_one_store_content_type_is_followed() {
    let hv = |v: &[u8]| HeaderValue::from_bytes(v).unwrap();
    let ok = hv(b"multipart/related; type=\"application/dicom\"; boundary=x");
    assert!(stow_content_type(&[&ok]).is_ok());
    let refused = [
        (vec![], "exactly one Content-Type"),
        (vec![ok.clone(), ok.clone()], "exactly one Content-Type"),
        (
            vec![hv(
                b"multipart/related; type=text/plain; type=\"application/dicom\"; boundary=x",
            )],
            "exactly one type",
        ),
        (
            vec![hv(
                b"multipart/related; type=application/dicom; boundary=A; boundary=B",
            )],
            "exactly one boundary",
        ),
        (
            vec![hv(
                b"multipart/related; type=\"application/dicom+json\"; boundary=x",
            )],
            "application/dicom parts",
        ),
        (vec![hv(b"application/dicom")], "not application/dicom"),
        (
            vec![hv(
                b"multipart/related; type=application/dicom; boundary=\xff",
            )],
            "not ASCII",
        ),
    ];
    for (values, want) in refused {
        let refs: Vec<&HeaderValue> = values.iter().collect();
        let e = stow_content_type(&refs).unwrap_err();
        assert!(e.contains(want), "{values:?}: {e}");
    }
}

#[test]
fn a_store_body_other_parsers_could_read_differently_is_an_error() {
    let ct = "multipart/related; type=application/dicom; boundary=b";
    let file = instance(1);
    // A preamble (Orthanc finds the delimiter anywhere in it).
    let mut body = b"X--b\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    body.extend_from_slice(&file);
    body.extend_from_slice(b"\r\n--b--\r\n");
    let mut p = Parts::store(ct).unwrap();
    p.feed(&body);
    assert!(
        p.error
            .as_deref()
            .is_some_and(|e| e.contains("before the first")),
        "{:?}",
        p.error
    );
    // Two Content-Type headers in a part.
    let mut p = Parts::store(ct).unwrap();
    p.feed(b"--b\r\nContent-Type: text/plain\r\nContent-Type: application/dicom\r\n\r\n");
    assert!(
        p.error
            .as_deref()
            .is_some_and(|e| e.contains("more than one"))
    );
    // A part declared as something else is still observed as an instance in a store.
    let mut p = Parts::store(ct).unwrap();
    let mut body = b"--b\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    body.extend_from_slice(&file);
    body.extend_from_slice(b"\r\n--b--\r\n");
    p.feed(&body);
    p.end(true);
    assert_eq!(p.done.len(), 1);
    // Endless transport padding is refused, not buffered.
    let mut p = Parts::store(ct).unwrap();
    p.feed(b"--b");
    p.feed(&[b' '; 2000]);
    assert!(p.error.as_deref().is_some_and(|e| e.contains("padding")));
}

#[test]
fn a_single_instance_cut_short_is_not_complete() {
    let file = instance(3);
    let mut p = Parts::single();
    p.feed(&file[..file.len() / 2]);
    p.end(false);
    assert!(p.done.is_empty() && !p.complete);
    assert_eq!(p.cut.unwrap().bytes, (file.len() / 2) as u64);
    let mut p = Parts::single();
    p.feed(&file);
    p.end(true);
    assert!(p.complete && p.done.len() == 1);
}

#[test]
fn parts_hash_whole_files_at_every_split() {
    let files = [instance(1), instance(2)];
    let body = multipart("b0und", &files);
    let ct = "multipart/related; type=\"application/dicom\"; boundary=b0und";
    for s in 0..=body.len() {
        let mut p = Parts::multipart(ct).unwrap();
        p.feed(&body[..s]);
        p.feed(&body[s..]);
        p.end(true);
        assert!(
            p.complete && p.error.is_none() && p.cut.is_none(),
            "split {s}"
        );
        assert_eq!(p.done.len(), 2, "split {s}");
        for (d, f) in p.done.iter().zip(&files) {
            let want: [u8; 32] = Sha256::digest(f).into();
            assert_eq!((d.sha256, d.bytes), (want, f.len() as u64), "split {s}");
        }
        let ds = p.done[1].dataset.as_ref().unwrap();
        assert_eq!(ds.sop_instance_uid.as_deref(), Some("2.25.70.1.2"));
        assert_eq!(
            ds.sop_class_uid.as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
    }
}

#[test]
fn a_body_cut_inside_a_part_reports_it_cut() {
    let files = [instance(1), instance(2)];
    let body = multipart("b", &files);
    let ct = "multipart/related; type=application/dicom; boundary=b";
    let mut p = Parts::multipart(ct).unwrap();
    p.feed(&body[..body.len() - 400]);
    p.end(true);
    assert!(!p.complete);
    assert_eq!(p.done.len(), 1);
    assert!(p.cut.is_some_and(|c| c.bytes < files[1].len() as u64));
    // Garbage after a delimiter is an error, never a panic.
    let mut p = Parts::multipart(ct).unwrap();
    p.feed(b"--b\r\nContent-Type: application/dicom\r\n\r\nxx\r\n--bZZ");
    assert!(p.error.is_some());
    assert!(Parts::multipart("multipart/related; type=application/dicom").is_err());
}

#[test]
fn non_dicom_parts_are_not_instances() {
    let ct = "multipart/related; type=application/dicom; boundary=q";
    let body = b"--q\r\nContent-Type: application/json\r\n\r\n{}\r\n--q--\r\n";
    let mut p = Parts::multipart(ct).unwrap();
    p.feed(body);
    p.end(true);
    assert!(p.complete && p.done.is_empty());
}

#[test]
fn stow_response_names_failed_and_warned_instances() {
    // The shape Orthanc and the standard (PS3.18 §10.5.3) give.
    let body = br#"{
      "00081190": {"vr": "UR", "Value": ["http://pacs/dicom-web/studies/2.25.70"]},
      "00081198": {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
         "00081155": {"vr": "UI", "Value": ["2.25.70.1.2"]},
         "00081197": {"vr": "US", "Value": [272]}}]},
      "00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["2.25.70.1.1"]}},
        {"00081155": {"vr": "UI", "Value": ["2.25.70.1.3"]},
         "00081196": {"vr": "US", "Value": [45063]}}]}
    }"#;
    let o = stow_outcomes(body).unwrap();
    assert_eq!(o.failed, ["2.25.70.1.2"]);
    assert_eq!(o.warned, ["2.25.70.1.3"]);
    assert_eq!(o.stored, ["2.25.70.1.1", "2.25.70.1.3"]);
    let ok = StatusCode::OK;
    let partial = StatusCode::ACCEPTED;
    assert_eq!(
        part_outcome(partial, Some("2.25.70.1.2"), Some(&o)),
        Outcome::Failure
    );
    assert_eq!(
        part_outcome(partial, Some("2.25.70.1.3"), Some(&o)),
        Outcome::Warning
    );
    assert_eq!(
        part_outcome(partial, Some("2.25.70.1.1"), Some(&o)),
        Outcome::Success
    );
    assert_eq!(part_outcome(ok, None, None), Outcome::Success);
    assert_eq!(part_outcome(partial, None, None), Outcome::Warning);
    // A 409 for a mixed batch still names what was stored.
    let conflict = StatusCode::CONFLICT;
    assert_eq!(
        part_outcome(conflict, Some("2.25.70.1.1"), Some(&o)),
        Outcome::Success
    );
    assert_eq!(
        part_outcome(conflict, Some("2.25.70.1.2"), Some(&o)),
        Outcome::Failure
    );
    assert_eq!(part_outcome(conflict, None, None), Outcome::Failure);
    assert!(stow_outcomes(b"<NativeDicomModel/>").is_none());
}

/// The fuzz seed of `sidecar/fuzz` target `multipart` (a split byte, then a STOW-RS body).
/// Regenerate with `MEDMESH_BLESS=1 cargo test -p medmesh-sidecar multipart_fuzz_seed`.
#[test]
fn multipart_fuzz_seed() {
    let mut seed = vec![128u8];
    seed.extend(multipart("b0und", &[instance(1), instance(2)]));
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/seeds/multipart/two-instances"
    );
    if std::env::var_os("MEDMESH_BLESS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        std::fs::write(path, &seed).unwrap();
    }
    assert_eq!(
        std::fs::read(path).unwrap(),
        seed,
        "{path} is stale: regenerate it"
    );
}
