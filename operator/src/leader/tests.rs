//! Acquire, renew, wait and take over, against a mocked API server (`mock_api_*`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{self, ApiServer, status_body};

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/medmesh-system/leases/medmesh-operator";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/medmesh-system/leases";

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000 + secs)
}

fn lock(me: &str) -> (LeaseLock, ApiServer) {
    let (client, api) = mock::pair();
    (
        LeaseLock::new(
            Api::namespaced(client, "medmesh-system"),
            "medmesh-operator",
            me,
        ),
        api,
    )
}

fn lease(holder: &str, renewed: u64, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "medmesh-operator", "namespace": "medmesh-system", "resourceVersion": "17"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2025-06-15T15:06:40.000000Z",
            "renewTime": micro(t(renewed)),
            "leaseTransitions": transitions,
        },
    })
}

async fn attempt(lock: &LeaseLock, now: SystemTime) -> bool {
    Box::pin(lock.try_acquire_or_renew(now)).await.unwrap()
}

#[tokio::test]
async fn mock_api_lease_is_created_when_absent() {
    let (lock, mut api) = lock("op-a");
    let (won, created) = mock::run(
        attempt(&lock, t(0)),
        async {
            api.not_found(LEASE).await;
            api.expect("POST", LEASES, 201, |s| s.body.clone())
                .await
                .body
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(won);
    assert_eq!(created["spec"]["holderIdentity"], "op-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);
    assert_eq!(
        created["metadata"]["annotations"]["medmesh.io/operator-version"],
        crate::names::VERSION
    );
}

#[tokio::test]
async fn mock_api_lease_create_race_is_lost() {
    let (lock, mut api) = lock("op-a");
    let (won, ()) = mock::run(
        attempt(&lock, t(0)),
        async {
            api.not_found(LEASE).await;
            api.expect("POST", LEASES, 409, |_| status_body(409, "AlreadyExists"))
                .await;
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(!won);
}

#[tokio::test]
async fn mock_api_holder_renews_with_its_resource_version() {
    let (lock, mut api) = lock("op-a");
    let (won, put) = mock::run(
        attempt(&lock, t(5)),
        async {
            api.expect("GET", LEASE, 200, |_| lease("op-a", 0, 2)).await;
            api.expect("PUT", LEASE, 200, |s| s.body.clone()).await.body
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(won);
    assert_eq!(put["metadata"]["resourceVersion"], "17");
    assert_eq!(put["spec"]["holderIdentity"], "op-a");
    assert_eq!(put["spec"]["renewTime"], json!(micro(t(5))));
    // Renewal keeps the acquire time and the transition count.
    assert_eq!(put["spec"]["acquireTime"], "2025-06-15T15:06:40.000000Z");
    assert_eq!(put["spec"]["leaseTransitions"], 2);
    // The holder stamps its version (checked against injected sidecars).
    assert_eq!(
        put["metadata"]["annotations"]["medmesh.io/operator-version"],
        crate::names::VERSION
    );
}

#[tokio::test]
async fn mock_api_a_live_lease_of_another_is_left_alone() {
    let (lock, mut api) = lock("op-b");
    let (won, ()) = mock::run(
        attempt(&lock, t(14)),
        async {
            api.expect("GET", LEASE, 200, |_| lease("op-a", 0, 0)).await;
            api.quiet(Duration::from_millis(100)).await;
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(!won, "renewed 14 s ago with a 15 s lease: still op-a's");
}

#[tokio::test]
async fn mock_api_an_expired_lease_is_taken_over() {
    let (lock, mut api) = lock("op-b");
    let (won, put) = mock::run(
        attempt(&lock, t(16)),
        async {
            api.expect("GET", LEASE, 200, |_| lease("op-a", 0, 4)).await;
            api.expect("PUT", LEASE, 200, |s| s.body.clone()).await.body
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(won);
    assert_eq!(put["spec"]["holderIdentity"], "op-b");
    assert_eq!(put["spec"]["leaseTransitions"], 5);
    assert_eq!(put["spec"]["acquireTime"], json!(micro(t(16))));
    assert_eq!(put["metadata"]["resourceVersion"], "17");
}

#[tokio::test]
async fn mock_api_a_conflicting_write_loses() {
    let (lock, mut api) = lock("op-b");
    let (won, ()) = mock::run(
        attempt(&lock, t(16)),
        async {
            api.expect("GET", LEASE, 200, |_| lease("op-a", 0, 4)).await;
            // Someone else replaced it after our read.
            api.expect("PUT", LEASE, 409, |_| status_body(409, "Conflict"))
                .await;
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(!won);
}

#[tokio::test]
async fn mock_api_release_clears_the_holder() {
    let (lock, mut api) = lock("op-a");
    let (r, put) = mock::run(
        Box::pin(lock.release()),
        async {
            api.expect("GET", LEASE, 200, |_| lease("op-a", 0, 1)).await;
            api.expect("PUT", LEASE, 200, |s| s.body.clone()).await.body
        },
        Duration::from_secs(5),
    )
    .await;
    r.unwrap();
    assert!(put["spec"].get("holderIdentity").is_none());
    assert_eq!(put["spec"]["leaseDurationSeconds"], 1);
}

#[tokio::test]
async fn mock_api_elector_publishes_leadership_and_releases_on_stop() {
    let (lock, mut api) = lock("op-a");
    let (lead_tx, mut lead_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let elector = tokio::spawn(run(lock, lead_tx, stop_rx));
    api.not_found(LEASE).await;
    api.expect("POST", LEASES, 201, |s| s.body.clone()).await;
    tokio::time::timeout(Duration::from_secs(5), lead_rx.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    stop_tx.send(true).unwrap();
    // Release: read, then clear.
    api.expect("GET", LEASE, 200, |_| lease("op-a", 0, 0)).await;
    api.expect("PUT", LEASE, 200, |s| s.body.clone()).await;
    tokio::time::timeout(Duration::from_secs(5), elector)
        .await
        .unwrap()
        .unwrap();
    assert!(!*lead_rx.borrow());
}

#[test]
fn expiry_is_renew_time_plus_duration() {
    let spec: LeaseSpec = serde_json::from_value(lease("op-a", 0, 0)["spec"].clone()).unwrap();
    assert!(held_by_other(&spec, "op-b", t(14)));
    assert!(!held_by_other(&spec, "op-b", t(15)));
    assert!(
        !held_by_other(&spec, "op-a", t(1)),
        "never held against its holder"
    );
    let free = LeaseSpec::default();
    assert!(!held_by_other(&free, "op-b", t(0)));
}
