//! Cluster tests that change what every other test relies on, so they run alone, one at a time
//! (their own nextest invocation after the others, test group `cluster-serial`):
//! - leader hand-over between the two operator replicas of `scripts/cluster-e2e up`: only the
//!   Lease holder reconciles; `kill -9` of the holder hands the Lease to the other replica within
//!   the lease duration, and it reconciles what is created after; the killed replica is then
//!   started again;
//! - `medmesh check` against the real control plane: all ✓ on a healthy mesh, and ✗ with the
//!   right check when the webhook is down, a CRD is missing or a ledger stops answering.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cluster.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use medmesh_operator::crd::AuditLedger;
use medmesh_operator::leader::{LEASE_DURATION, RENEW};
use serde_json::json;
use support::{Env, TestNs, eventually, eventually_for, get};

/// Starts replica `name` again with the harness's own command, and waits until it is ready.
async fn restart(env: &Env, name: &str) {
    let script = env.dir.join(format!("start-operator-{name}"));
    let mut child = std::process::Command::new(&script)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    // It runs until `scripts/cluster-e2e down`; reaped whenever it ends.
    std::thread::spawn(move || child.wait());
    let admin = env
        .operators
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a.clone())
        .unwrap();
    eventually(&format!("operator {name} ready again"), || {
        let admin = admin.clone();
        async move {
            let r = reqwest::get(format!("http://{admin}/ready")).await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
}

fn kill_9(env: &Env, name: &str) {
    let pid = std::fs::read_to_string(env.dir.join(format!("pid/operator-{name}")))
        .unwrap()
        .trim()
        .to_owned();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

const LEASE: &str = "medmesh-operator";

/// The sum of `medmesh_operator_reconciles_total` on an operator's admin listener.
async fn reconciles(admin: &str) -> Option<u64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("medmesh_operator_reconciles_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get(LEASE).await.ok()?.spec?.holder_identity
}

fn ledger(name: &str) -> AuditLedger {
    serde_json::from_value(json!({
        "apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger",
        "metadata": {"name": name},
        "spec": {"replicas": 1, "storage": {"size": "1Gi"}, "signingKey": {"generate": {}}},
    }))
    .unwrap()
}

#[tokio::test]
async fn killing_the_leader_hands_over_within_the_lease_duration() {
    let env = Env::get();
    let ns = TestNs::new("e2e-leader", false).await;
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &env.namespace);
    let leader = eventually("a Lease holder", || holder(&leases)).await;
    let name_of = |identity: &str| identity.strip_prefix("operator-").unwrap().to_owned();
    let (lead_name, lead_admin) = env
        .operators
        .iter()
        .find(|(n, _)| *n == name_of(&leader))
        .cloned()
        .unwrap_or_else(|| panic!("holder {leader} is none of {:?}", env.operators));
    let (follow_name, follow_admin) = env
        .operators
        .iter()
        .find(|(n, _)| *n != lead_name)
        .cloned()
        .unwrap();

    // Only the leader reconciles: after a new ledger is handled, the follower has done nothing.
    let ledgers: Api<AuditLedger> = ns.api();
    ledgers
        .create(&PostParams::default(), &ledger("before"))
        .await
        .unwrap();
    let _: StatefulSet = get(&ns.api(), "before").await;
    assert!(reconciles(&lead_admin).await.unwrap() > 0);
    assert_eq!(
        reconciles(&follow_admin).await.unwrap(),
        0,
        "the follower {follow_name} reconciled while {lead_name} held the Lease"
    );

    // kill -9: no release of the Lease; the follower must wait for it to expire, then lead.
    let killed = Instant::now();
    kill_9(&env, &lead_name);
    let expected = format!("operator-{follow_name}");
    eventually_for(
        "the follower to take the Lease",
        LEASE_DURATION + RENEW * 2,
        || {
            let leases = leases.clone();
            let expected = expected.clone();
            async move { (holder(&leases).await? == expected).then_some(()) }
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= LEASE_DURATION + RENEW + Duration::from_secs(1),
        "hand-over took {took:?}"
    );
    eprintln!("hand-over after kill -9: {took:?}");

    // The new leader reconciles: a ledger created now gets its children and a status.
    ledgers
        .create(&PostParams::default(), &ledger("after"))
        .await
        .unwrap();
    let _: StatefulSet = get(&ns.api(), "after").await;
    eventually("a status on the ledger created after the hand-over", || {
        let ledgers = ledgers.clone();
        async move { ledgers.get("after").await.ok()?.status.map(|_| ()) }
    })
    .await;
    assert!(reconciles(&follow_admin).await.unwrap() > 0);

    // The killed replica comes back as a follower.
    restart(&env, &lead_name).await;
    tokio::time::sleep(RENEW * 2).await;
    assert_eq!(holder(&leases).await.as_deref(), Some(expected.as_str()));
    assert_eq!(reconciles(&lead_admin).await.unwrap(), 0);
}

/// `medmesh check -o json` with the harness's --resolve; (exit success, the checks).
fn medmesh_check(env: &Env, extra: &[&str]) -> (bool, Vec<serde_json::Value>) {
    let resolve = format!("ledger.{}.svc:8443={}", env.ledger.0, env.ledger.1);
    let out = std::process::Command::new(support::target_bin("medmesh"))
        .args([
            "check",
            "-o",
            "json",
            "--namespace",
            &env.namespace,
            "--webhook",
            &env.webhook,
        ])
        .args(["--resolve", &resolve])
        .args(extra)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "medmesh check printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        doc["success"].as_bool(),
        Some(out.status.success()),
        "{doc:#}"
    );
    (
        out.status.success(),
        doc["checks"].as_array().unwrap().clone(),
    )
}

fn verdict<'a>(checks: &'a [serde_json::Value], prefix: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["description"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no check {prefix:?}: {checks:#?}"))
}

fn failures(checks: &[serde_json::Value]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c["result"] == "error")
        .map(|c| format!("{} [{}]", c["description"], c["detail"]))
        .collect()
}

#[tokio::test]
async fn medmesh_check_passes_on_a_healthy_mesh_and_names_what_breaks() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use medmesh_operator::crd::MeshPolicy;
    let env = Env::get();
    // A healthy mesh: a labelled namespace with a policy, and a ledger that answers.
    let meshed = TestNs::new("e2e-check", true).await;
    let policies: Api<MeshPolicy> = meshed.api();
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "pacs"},
                "spec": {"podSelector": {}, "ports": [{"port": 4242, "protocol": "dicom", "allow": [{"namespace": "radiology"}]}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let ledger_ns = TestNs::named(&env.ledger.0, false).await;
    support::volume_for(&ledger_ns.client, &ledger_ns.name, "data-ledger-0", "1Gi").await;
    let ledgers: Api<AuditLedger> = ledger_ns.api();
    ledgers
        .create(&PostParams::default(), &ledger("ledger"))
        .await
        .unwrap();
    let running = support::run_ledger(&ledger_ns, "ledger", &env.ledger.1, 1).await;
    eventually_for(
        "the ledger Ready and not Degraded",
        Duration::from_secs(90),
        || {
            let ledgers = ledgers.clone();
            async move {
                let s = ledgers.get("ledger").await.ok()?.status?;
                let ok =
                    |t: &str, v: &str| s.conditions.iter().any(|c| c.type_ == t && c.status == v);
                (ok("Ready", "True") && ok("Degraded", "False")).then_some(())
            }
        },
    )
    .await;
    // An injected Pod, so the version check has something to compare.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = meshed.api();
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orthanc"},
            "spec": {"containers": [{"name": "app", "image": "registry.example/orthanc:1"}]},
        }))
        .unwrap(),
    )
    .await
    .unwrap();

    // Namespaces of earlier tests may still be terminating: check until they are gone.
    let checks = eventually_for("medmesh check to pass", Duration::from_secs(120), || {
        let env = env.clone();
        async move {
            let (ok, checks) = medmesh_check(&env, &[]);
            if !ok {
                eprintln!("not yet: {:?}", failures(&checks));
            }
            ok.then_some(checks)
        }
    })
    .await;
    for c in &checks {
        let d = c["description"].as_str().unwrap();
        let expected = if d.starts_with("operator pods are ready") {
            "warning" // out of cluster: no Deployment
        } else {
            "success"
        };
        assert_eq!(c["result"], expected, "{c:#}");
    }
    assert!(
        verdict(
            &checks,
            &format!("ledger {}/ledger checkpoint verifies", ledger_ns.name)
        )["detail"]
            .as_str()
            .unwrap()
            .starts_with("signed checkpoint of size")
    );
    assert!(
        verdict(&checks, "injected Pods")["detail"]
            .as_str()
            .unwrap()
            .starts_with("1 Pod(s)")
    );

    // The ledger stops answering: its checkpoint cannot be verified, and soon the operator
    // marks it Degraded.
    drop(running);
    let checks = eventually("medmesh check to see the ledger gone", || {
        let env = env.clone();
        async move {
            let (ok, checks) = medmesh_check(&env, &[]);
            let gone = !ok
                && checks.iter().any(|c| {
                    c["description"]
                        .as_str()
                        .unwrap()
                        .ends_with("/ledger is Ready")
                        && c["result"] == "error"
                });
            gone.then_some(checks)
        }
    })
    .await;
    let v = verdict(
        &checks,
        &format!("ledger {}/ledger checkpoint verifies", ledger_ns.name),
    );
    assert_eq!(v["result"], "error", "{v:#}");
    // A stale checkpoint, by the limit given.
    let (ok, checks) = medmesh_check(&env, &["--max-checkpoint-age", "0"]);
    assert!(!ok);
    let v = verdict(
        &checks,
        &format!("ledger {}/ledger has a fresh checkpoint", ledger_ns.name),
    );
    assert_eq!(v["result"], "error", "{v:#}");
    drop(ledger_ns);

    // The webhook stops answering: the dry-run probe fails (the replica the URL names).
    kill_9(&env, "a");
    let (ok, checks) = medmesh_check(&env, &[]);
    assert!(!ok);
    let v = verdict(&checks, "the webhook injects Pods");
    assert_eq!(v["result"], "error", "{v:#}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("failed calling webhook"),
        "{v:#}"
    );
    restart(&env, "a").await;

    // A CRD goes missing (restored afterwards exactly as the chart installed it).
    let crds: Api<CustomResourceDefinition> = Api::all(meshed.client.clone());
    let name = "meshpolicies.medmesh.io";
    let mut saved = crds.get(name).await.unwrap();
    support::delete_and_wait(&crds, name).await;
    let (ok, checks) = medmesh_check(&env, &[]);
    assert!(!ok);
    let v = verdict(&checks, &format!("CRD {name}"));
    assert_eq!(v["result"], "error", "{v:#}");
    assert_eq!(v["detail"], "not found");
    saved.metadata.resource_version = None;
    saved.metadata.uid = None;
    saved.metadata.creation_timestamp = None;
    saved.metadata.managed_fields = None;
    saved.status = None;
    crds.create(&PostParams::default(), &saved).await.unwrap();
    eventually("the CRD established again", || {
        let crds = crds.clone();
        async move {
            let c = crds.get(name).await.ok()?;
            c.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;
}
