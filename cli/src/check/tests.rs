//! The verdicts of `medmesh check`, decided from snapshots (no cluster).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use medmesh_operator::crd::{AuditLedgerStatus, CheckpointStatus, Condition};
use serde_json::json;

use super::*;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn ts(t: SystemTime) -> Timestamp {
    let s = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    Timestamp::from_second(i64::try_from(s).unwrap()).unwrap()
}

fn limits() -> Limits {
    Limits {
        namespace: "medmesh-system".into(),
        webhook: "medmesh-sidecar-injector".into(),
        min_ca: Duration::from_secs(30 * 86_400),
        max_checkpoint_age: Duration::from_secs(300),
    }
}

fn find<'a>(out: &'a [Outcome], prefix: &str) -> &'a Outcome {
    out.iter()
        .find(|o| o.description.starts_with(prefix))
        .unwrap_or_else(|| panic!("no check {prefix:?} in {out:#?}"))
}

fn lease(holder: &str, renewed: SystemTime, version: Option<&str>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            annotations: version
                .map(|v| BTreeMap::from([(OPERATOR_VERSION_ANNOTATION.to_owned(), v.to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(ts(renewed))),
            ..LeaseSpec::default()
        }),
    }
}

fn healthy() -> Snapshot {
    let mut crds = BTreeMap::new();
    for mut c in crd::all() {
        c.status = serde_json::from_value(json!({
            "conditions": [{"type": "Established", "status": "True"}]
        }))
        .unwrap();
        crds.insert(c.name_any(), Some(c));
    }
    Snapshot {
        version: Some((1, 34, "v1.34.3".into())),
        crds,
        lease: Some(lease(
            "operator-a",
            now() - Duration::from_secs(3),
            Some(VERSION),
        )),
        meshed: vec![("pacs".into(), 1)],
        injected: vec![("pacs/orthanc-0".into(), VERSION.into())],
        ..Snapshot::default()
    }
}

fn ledger(ready: bool, degraded: bool, checkpoint_age: u64, size: i64) -> AuditLedger {
    let mut l: AuditLedger = serde_json::from_value(json!({
        "apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger",
        "metadata": {"name": "ledger", "namespace": "pacs", "generation": 2},
        "spec": {"replicas": 1, "storage": {"size": "1Gi"}, "signingKey": {"generate": {}}},
    }))
    .unwrap();
    let t = Time(ts(now()));
    let cond = |ty: &str, s: bool, reason: &str| Condition {
        type_: ty.into(),
        status: if s { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: format!("{ty} message"),
        last_transition_time: t.clone(),
        observed_generation: Some(2),
    };
    l.status = Some(AuditLedgerStatus {
        observed_generation: Some(2),
        conditions: vec![
            cond("Ready", ready, "ReplicasReady"),
            cond("Degraded", degraded, "CheckpointUnreadable"),
        ],
        ready_replicas: Some(1),
        endpoint: Some("https://ledger.pacs.svc:8443".into()),
        checkpoint: Some(CheckpointStatus {
            tree_size: size,
            root_hash: "ROOT".into(),
            time: Time(ts(now() - Duration::from_secs(checkpoint_age))),
        }),
        replication: None,
    });
    l
}

#[test]
fn a_healthy_snapshot_passes_with_warnings_only_where_nothing_was_probed() {
    let out = evaluate(&healthy(), &limits(), now());
    let errors: Vec<_> = out.iter().filter(|o| o.result == Verdict::Error).collect();
    // Absent from the snapshot: webhook, CA Secret; the rest passes.
    let names: Vec<_> = errors.iter().map(|o| o.description.as_str()).collect();
    assert_eq!(
        names,
        [
            "webhook medmesh-sidecar-injector has a valid caBundle",
            "identity CA is valid for at least 30 days"
        ],
        "{out:#?}"
    );
    assert_eq!(find(&out, "can reach").result, Verdict::Success);
    assert_eq!(find(&out, "API server version").result, Verdict::Success);
    assert_eq!(find(&out, "CRD auditledgers").result, Verdict::Success);
    assert_eq!(
        find(&out, "an operator replica is leading").result,
        Verdict::Success
    );
    assert_eq!(find(&out, "operator pods").result, Verdict::Warning);
    // Without a webhook configuration there is nothing to probe.
    assert!(
        !out.iter()
            .any(|o| o.description.starts_with("the webhook injects"))
    );
    assert_eq!(find(&out, "audit ledgers").result, Verdict::Warning);
    assert_eq!(find(&out, "meshed namespaces").result, Verdict::Success);
    assert_eq!(find(&out, "injected Pods").result, Verdict::Success);
}

#[test]
fn an_old_or_unreachable_api_server_fails() {
    let mut s = healthy();
    s.version = Some((1, 28, "v1.28.9".into()));
    let out = evaluate(&s, &limits(), now());
    let o = find(&out, "API server version");
    assert_eq!(o.result, Verdict::Error);
    assert_eq!(o.detail, "1.28 < 1.29");
    s.version = None;
    let out = evaluate(&s, &limits(), now());
    assert_eq!(find(&out, "can reach").result, Verdict::Error);
}

#[test]
fn a_missing_or_drifted_crd_fails() {
    let mut s = healthy();
    s.crds.insert("meshpolicies.medmesh.io".into(), None);
    let mut drifted = s.crds["auditledgers.medmesh.io"].clone().unwrap();
    if let Some(schema) = drifted.spec.versions[0].schema.as_mut() {
        schema.open_api_v3_schema.as_mut().unwrap().description = Some("old".into());
    }
    s.crds
        .insert("auditledgers.medmesh.io".into(), Some(drifted));
    let out = evaluate(&s, &limits(), now());
    let a = find(&out, "CRD auditledgers");
    assert_eq!(a.result, Verdict::Error);
    assert!(a.detail.contains("differs"), "{a:?}");
    assert_eq!(find(&out, "CRD meshpolicies").detail, "not found");
}

#[test]
fn an_expired_lease_fails() {
    let mut s = healthy();
    s.lease = Some(lease("operator-a", now() - Duration::from_secs(16), None));
    let out = evaluate(&s, &limits(), now());
    let o = find(&out, "an operator replica is leading");
    assert_eq!(o.result, Verdict::Error);
    assert!(o.detail.contains("expired"), "{o:?}");
    s.lease = None;
    let out = evaluate(&s, &limits(), now());
    assert_eq!(
        find(&out, "an operator replica is leading").detail,
        "no holder"
    );
}

fn self_signed(days: u64, from: SystemTime) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let secs = |t: SystemTime| {
        time::OffsetDateTime::from_unix_timestamp(
            i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()).unwrap(),
        )
        .unwrap()
    };
    p.not_before = secs(from);
    p.not_after = secs(from + Duration::from_secs(days * 86_400));
    p.self_signed(&key).unwrap().pem()
}

#[test]
fn the_identity_ca_must_outlive_the_limit() {
    let mut s = healthy();
    let secret = |pem: String| Secret {
        data: Some(BTreeMap::from([(
            "tls.crt".to_owned(),
            k8s_openapi::ByteString(pem.into_bytes()),
        )])),
        ..Secret::default()
    };
    s.ca_secret = Some(secret(self_signed(
        365,
        now() - Duration::from_secs(86_400),
    )));
    let out = evaluate(&s, &limits(), now());
    let o = find(&out, "identity CA");
    assert_eq!(o.result, Verdict::Success, "{o:?}");
    assert_eq!(o.detail, "364 days left");
    s.ca_secret = Some(secret(self_signed(20, now() - Duration::from_secs(86_400))));
    let out = evaluate(&s, &limits(), now());
    let o = find(&out, "identity CA");
    assert_eq!(o.result, Verdict::Error);
    assert_eq!(o.detail, "19 days left");
}

#[test]
fn webhook_without_bundle_or_with_an_expired_one_or_not_injecting_fails() {
    let mut s = healthy();
    let hook = |bundle: Option<String>| -> MutatingWebhookConfiguration {
        serde_json::from_value(json!({
            "metadata": {"name": "medmesh-sidecar-injector"},
            "webhooks": [{"name": "inject.medmesh.io", "admissionReviewVersions": ["v1"],
                          "sideEffects": "None",
                          "clientConfig": {"url": "https://127.0.0.1:1/mutate",
                                           "caBundle": bundle.map(|b| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b))}}],
        }))
        .unwrap()
    };
    s.webhook = Some(hook(None));
    let out = evaluate(&s, &limits(), now());
    assert_eq!(find(&out, "webhook medmesh").detail, "no caBundle");
    s.webhook = Some(hook(Some(self_signed(
        10,
        now() - Duration::from_secs(20 * 86_400),
    ))));
    let out = evaluate(&s, &limits(), now());
    assert!(find(&out, "webhook medmesh").detail.contains("expired"));
    s.webhook = Some(hook(Some(self_signed(
        10,
        now() - Duration::from_secs(86_400),
    ))));
    let out = evaluate(&s, &limits(), now());
    assert_eq!(find(&out, "webhook medmesh").result, Verdict::Success);

    s.webhook_probe = Some((
        "pacs".into(),
        Err("failed calling webhook: connection refused".into()),
    ));
    let out = evaluate(&s, &limits(), now());
    let o = find(&out, "the webhook injects");
    assert_eq!(o.result, Verdict::Error);
    assert!(o.detail.contains("connection refused"));
    s.webhook_probe = Some(("pacs".into(), Ok(Pod::default())));
    let out = evaluate(&s, &limits(), now());
    assert_eq!(find(&out, "the webhook injects").result, Verdict::Error);
}

#[test]
fn ledgers_must_be_ready_fresh_and_agree_with_their_own_checkpoint() {
    let mut s = healthy();
    let ok = |size: u64| LedgerProbe {
        checkpoint: Ok((size, "ROOT".into())),
    };
    s.ledgers = vec![(ledger(true, false, 10, 5), ok(5))];
    let out = evaluate(&s, &limits(), now());
    assert_eq!(
        find(&out, "ledger pacs/ledger is Ready").result,
        Verdict::Success
    );
    assert_eq!(
        find(&out, "ledger pacs/ledger has a fresh").result,
        Verdict::Success
    );
    assert_eq!(
        find(&out, "ledger pacs/ledger checkpoint verifies").result,
        Verdict::Success
    );

    // Degraded, stale, rolled back.
    s.ledgers = vec![(ledger(true, true, 900, 5), ok(4))];
    let out = evaluate(&s, &limits(), now());
    let r = find(&out, "ledger pacs/ledger is Ready");
    assert_eq!(r.result, Verdict::Error);
    assert!(r.detail.starts_with("CheckpointUnreadable"), "{r:?}");
    assert_eq!(
        find(&out, "ledger pacs/ledger has a fresh").detail,
        "read 900 s ago (limit 300 s)"
    );
    assert!(
        find(&out, "ledger pacs/ledger checkpoint verifies")
            .detail
            .contains("smaller")
    );

    // A fork: another root at the same size.
    s.ledgers = vec![(
        ledger(true, false, 1, 5),
        LedgerProbe {
            checkpoint: Ok((5, "OTHER".into())),
        },
    )];
    let out = evaluate(&s, &limits(), now());
    assert!(
        find(&out, "ledger pacs/ledger checkpoint verifies")
            .detail
            .contains("differs")
    );
    // Unreachable.
    s.ledgers = vec![(
        ledger(true, false, 1, 5),
        LedgerProbe {
            checkpoint: Err("connection refused".into()),
        },
    )];
    let out = evaluate(&s, &limits(), now());
    assert_eq!(
        find(&out, "ledger pacs/ledger checkpoint verifies").result,
        Verdict::Error
    );
}

#[test]
fn bare_namespaces_and_stale_sidecars_fail() {
    let mut s = healthy();
    s.meshed.push(("radiology".into(), 0));
    s.injected.push(("pacs/old-0".into(), "0.0.1".into()));
    let out = evaluate(&s, &limits(), now());
    let o = find(&out, "meshed namespaces");
    assert_eq!(o.result, Verdict::Error);
    assert!(o.detail.contains("radiology"));
    let o = find(&out, "injected Pods");
    assert_eq!(o.result, Verdict::Error);
    assert!(o.detail.contains("pacs/old-0 (0.0.1)"), "{o:?}");
    // The operator's version comes from its Lease.
    s.lease = Some(lease("operator-a", now(), Some("0.0.1")));
    s.injected = vec![("pacs/old-0".into(), "0.0.1".into())];
    let out = evaluate(&s, &limits(), now());
    assert_eq!(find(&out, "injected Pods").result, Verdict::Success);
}
