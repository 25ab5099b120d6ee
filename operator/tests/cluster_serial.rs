//! Leader hand-over between the two operator replicas of `scripts/cluster-e2e up`, against the
//! real API server: only the Lease holder reconciles; `kill -9` of the holder hands the Lease to
//! the other replica within the lease duration, and it reconciles what is created after.
//!
//! It kills a replica that the other cluster tests use, so it runs in its own nextest
//! invocation after them (scripts/check).

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
    let pid = std::fs::read_to_string(env.dir.join(format!("pid/operator-{lead_name}")))
        .unwrap()
        .trim()
        .to_owned();
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    assert!(status.success());
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
}
