//! The ledger API end to end, in process: real TLS 1.3, real redb, certificates made at test time.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use medmesh_core::devca::LeafOptions;
use medmesh_core::merkle;
use medmesh_ledger_client::{ClientError, TrustedStore};
use time::{Duration, OffsetDateTime};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_proven_searched_and_consistent() {
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let writer = l.client(&pki, WRITER);
    let auditor = l.client(&pki, AUDITOR);
    let (src, dst) = (pki.id(("ct", "scanner")), pki.id(WRITER));

    // Concurrent single appends and batches, half of them asking for proofs.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let w = writer.clone();
        let (src, dst) = (src.clone(), dst.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..10 {
                let mut r = record(t * 100 + i, &src, &dst);
                if i == 3 {
                    r.cid = Some(
                        "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
                            .parse()
                            .unwrap(),
                    );
                }
                let resp = w.append(&r, i % 2 == 0).await.unwrap();
                out.push((resp.result.index, r));
            }
            out
        }));
    }
    let batch: Vec<_> = (0..50).map(|i| record(10_000 + i, &src, &dst)).collect();
    let b = writer.append_batch(batch.clone(), true).await.unwrap();
    assert_eq!(b.results.len(), 50);
    let mut all: Vec<_> = b.results.iter().map(|r| r.index).zip(batch).collect();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let mut indexes: Vec<u64> = all.iter().map(|(i, _)| *i).collect();
    indexes.sort();
    assert_eq!(
        indexes,
        (0..130).collect::<Vec<_>>(),
        "indexes are dense and unique"
    );

    // The auditor trusts a checkpoint covering everything, then verifies every entry.
    let store = TrustedStore::new(pki.dir.path().join("trusted.cp"));
    let cp = trusted_at(&auditor, &store, 130).await;
    for (index, rec) in &all {
        let p = auditor.prove_entry(*index, &cp).await.unwrap();
        assert_eq!(&p.entry.record, rec);
        assert_eq!(
            p.entry.submitter,
            pki.id(WRITER),
            "submitter comes from mTLS, not the body"
        );
    }
    // Consistency from every earlier size the log had.
    for old in [1, 2, 7, 64, 100, 129, 130] {
        let old_root = auditor.consistency_proof(old, 130).await.unwrap();
        let older = auditor.entries(0, old).await.unwrap();
        let mut f = merkle::Frontier::new();
        for e in &older.entries {
            f.push(e.leaf_hash, |_| {});
        }
        merkle::verify_consistency(old, 130, &f.root(), &cp.root, &old_root.proof).unwrap();
    }
    // Each search index finds its entries, with proofs the client verified.
    let (i, r) = &all[7];
    let (_, hits, _) = auditor
        .search("sha256", &r.content_sha256.unwrap().to_hex())
        .await
        .unwrap();
    assert_eq!(hits.iter().map(|h| h.index).collect::<Vec<_>>(), vec![*i]);
    let (_, hits, _) = auditor
        .search("uid", &r.sop_instance_uid.unwrap().to_string())
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    let (_, hits, _) = auditor
        .search("uid", &r.study_uid.unwrap().to_string())
        .await
        .unwrap();
    assert!(hits.len() > 10);
    let (_, hits, _) = auditor
        .search(
            "cid",
            "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        )
        .await
        .unwrap();
    assert_eq!(hits.len(), 8);
    let (_, hits, truncated) = auditor.search("identity", src.as_str()).await.unwrap();
    assert_eq!((hits.len(), truncated), (100, true));
    assert_eq!(hits[0].entry.record.source, src);

    // Inclusion proofs by leaf hash find the same entry.
    let (i, _) = &all[42];
    let by_index = auditor.inclusion_proof(*i, cp.size).await.unwrap();
    let by_leaf = auditor
        .inclusion_proof_by_leaf(&by_index.leaf_hash, cp.size)
        .await
        .unwrap();
    assert_eq!(by_leaf, by_index);

    // Audit of the whole log passes with every proof checked.
    let report = auditor.audit(&cp, 1000).await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.proofs_checked, 130);

    let m = l.metrics().await;
    assert!(
        m.contains("medmesh_ledger_appends_total{result=\"appended\"} 130"),
        "{m}"
    );
    assert!(m.contains("medmesh_ledger_tree_size 130"));
    assert!(m.contains("medmesh_ledger_checkpoint_age_seconds"));
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_idempotent_and_conflicts_refused() {
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let w = l.client(&pki, WRITER);
    let r = record(1, &pki.id(("ct", "scanner")), &pki.id(WRITER));
    let first = w.append(&r, false).await.unwrap();
    let again = w.append(&r, true).await.unwrap();
    assert!(!first.result.duplicate);
    assert!(again.result.duplicate);
    assert_eq!(first.result.index, again.result.index);
    assert!(again.checkpoint.is_some() && again.result.inclusion_proof.is_some());
    // Same id twice inside one batch, and an id reused for other content.
    let b = w
        .append_batch(vec![r.clone(), r.clone()], false)
        .await
        .unwrap();
    assert!(
        b.results
            .iter()
            .all(|x| x.duplicate && x.index == first.result.index)
    );
    let mut other = r.clone();
    other.bytes += 1;
    let err = w.append(&other, false).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status: 409, message, .. } if message.contains("record id is already used by entry 0")),
        "{err}"
    );
    // In a batch, a conflicting record is reported and skipped; the others are stored.
    let fresh = record(2, &pki.id(("ct", "scanner")), &pki.id(WRITER));
    let b = w
        .append_batch(vec![other.clone(), fresh], false)
        .await
        .unwrap();
    assert!(b.results[0].conflict && b.results[0].index == 0);
    assert!(!b.results[1].conflict && b.results[1].index == 1);
    // A restart keeps the dedupe index.
    l.restart().await.unwrap();
    let w = l.client(&pki, WRITER);
    assert!(w.append(&r, false).await.unwrap().result.duplicate);
    l.stop().await;
}

/// What the cutting proxy does to the next bytes a kept-alive connection carries.
const FORWARD: u8 = 0;
const CUT_REQUEST: u8 = 1;
const CUT_ANSWER: u8 = 2;

/// A TCP proxy in front of the ledger (TLS passes through it untouched). Armed with
/// `CUT_REQUEST`, it closes the next connection made before the arming that sends bytes, without
/// passing them on; with `CUT_ANSWER`, it passes that request on and closes the connection when
/// the answer comes, without passing the answer on. Returns its address and the number of cuts.
async fn cutting_proxy(
    ledger: std::net::SocketAddr,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cuts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = cuts.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            let (mode, born, cuts) = (mode.clone(), epoch.load(SeqCst), counted.clone());
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(ledger).await.unwrap();
                let (mut cb, mut sb) = (vec![0u8; 65536], vec![0u8; 65536]);
                let mut drop_answer = false;
                loop {
                    tokio::select! {
                        n = c.read(&mut cb) => {
                            let Ok(n @ 1..) = n else { return };
                            // Only a connection older than the arming: the one the client kept.
                            if born < epoch.load(SeqCst) {
                                match mode.swap(FORWARD, SeqCst) {
                                    CUT_REQUEST => { cuts.fetch_add(1, SeqCst); return }
                                    CUT_ANSWER => drop_answer = true,
                                    _ => {}
                                }
                            }
                            if s.write_all(&cb[..n]).await.is_err() { return }
                        }
                        n = s.read(&mut sb) => {
                            let Ok(n @ 1..) = n else { return };
                            if drop_answer { cuts.fetch_add(1, SeqCst); return }
                            if c.write_all(&sb[..n]).await.is_err() { return }
                        }
                    }
                }
            });
        }
    });
    (addr, cuts)
}

/// A kept-alive connection lost before the ledger answers (the ledger closing it while idle, a
/// reset) must not fail the append: the client sends it again on a new connection, and the
/// ledger, which may already hold it, stores it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_before_the_answer_costs_no_append_and_no_duplicate() {
    use std::sync::atomic::Ordering::SeqCst;
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(FORWARD));
    let epoch = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (proxy, cuts) = cutting_proxy(
        l.ledger.as_ref().unwrap().api_addr,
        mode.clone(),
        epoch.clone(),
    )
    .await;
    let w = l.client_via(&pki, WRITER, &format!("https://{proxy}"));
    let (src, dst) = (pki.id(("ct", "scanner")), pki.id(WRITER));
    let r0 = record(0, &src, &dst);
    assert_eq!(w.append(&r0, false).await.unwrap().result.index, 0);

    // The request never reaches the ledger.
    epoch.fetch_add(1, SeqCst);
    mode.store(CUT_REQUEST, SeqCst);
    let r1 = record(1, &src, &dst);
    let a1 = w
        .append(&r1, false)
        .await
        .expect("sent again after the cut");
    assert_eq!(cuts.load(SeqCst), 1, "the kept connection was cut");
    assert!(!a1.result.duplicate);
    assert_eq!(a1.result.index, 1);

    // The ledger stores the record, but its answer is lost: sent again, it is a duplicate.
    epoch.fetch_add(1, SeqCst);
    mode.store(CUT_ANSWER, SeqCst);
    let r2 = record(2, &src, &dst);
    let a2 = w
        .append_batch(vec![r2], false)
        .await
        .expect("sent again after the lost answer");
    assert_eq!(cuts.load(SeqCst), 2, "the answer was cut");
    assert!(a2.results[0].duplicate, "{:?}", a2.results[0]);
    assert_eq!(a2.results[0].index, 2);

    // Nothing was stored twice: the next record is entry 3.
    let r3 = record(3, &src, &dst);
    assert_eq!(w.append(&r3, false).await.unwrap().result.index, 3);
    l.stop().await;
}

async fn status_and_body(resp: reqwest::Response) -> (u16, String) {
    let s = resp.status().as_u16();
    (s, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_precise_refusals_and_metrics() {
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let url = format!("{}/v1/checkpoint", l.api());
    let now = OffsetDateTime::now_utc();
    let other_pki = Pki::new();

    type Case = (
        &'static str,
        Option<(std::path::PathBuf, std::path::PathBuf)>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "no certificate",
            None,
            401,
            "no client certificate presented",
        ),
        (
            "expired",
            Some(pki.issue_with(
                AUDITOR,
                &LeafOptions {
                    not_before: now - Duration::days(3),
                    not_after: now - Duration::days(1),
                    ..Default::default()
                },
            )),
            401,
            "certificate expired",
        ),
        (
            "wrong CA",
            Some(other_pki.issue(AUDITOR)),
            401,
            "unknown issuer",
        ),
        (
            "two URI SANs",
            Some(pki.issue_with(
                AUDITOR,
                &LeafOptions {
                    extra_uris: vec!["spiffe://medmesh.test/ns/audit/sa/other".into()],
                    ..Default::default()
                },
            )),
            401,
            "certificate has 2 URI SANs",
        ),
        (
            "not in any role",
            Some(pki.issue(("pacs", "intruder"))),
            403,
            "is not allowed to read",
        ),
    ];
    for (what, ck, status, want) in &cases {
        let c = raw_client(
            ck.as_ref().map(|(a, b)| (a.as_path(), b.as_path())),
            false,
            false,
        );
        let (s, body) = status_and_body(c.get(&url).send().await.unwrap()).await;
        assert_eq!(
            (s, body.contains(want)),
            (*status, true),
            "{what}: {s} {body}"
        );
    }
    // A certificate of another trust domain, from a CA the ledger trusts.
    let other_td = medmesh_core::TrustDomain::new("elsewhere.test").unwrap();
    let issued = pki
        .ca
        .issue(
            &other_td.workload("audit", "auditor").unwrap(),
            &LeafOptions::default(),
        )
        .unwrap();
    let (c, k) = (
        pki.dir.path().join("foreign.pem"),
        pki.dir.path().join("foreign-key.pem"),
    );
    std::fs::write(&c, issued.cert_pem).unwrap();
    std::fs::write(&k, issued.key_pem).unwrap();
    let (s, body) = status_and_body(
        raw_client(Some((&c, &k)), false, false)
            .get(&url)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401, "{body}");
    assert!(
        body.contains("is not in trust domain medmesh.test"),
        "{body}"
    );

    // A reader may not append; TLS 1.2 is refused at the handshake.
    let auditor = pki.issue(AUDITOR);
    let c = raw_client(Some((&auditor.0, &auditor.1)), false, true);
    let (s, body) = status_and_body(
        c.post(format!("{}/v1/entries", l.api()))
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let tls12 = raw_client(Some((&auditor.0, &auditor.1)), true, false);
    assert!(
        tls12.get(&url).send().await.is_err(),
        "TLS 1.2 must be refused"
    );

    // Malformed requests from an authorised writer: each a precise 4xx, nothing written.
    let wk = pki.issue(WRITER);
    let w = raw_client(Some((&wk.0, &wk.1)), false, false);
    let post = |path: &str, body: Vec<u8>| w.post(format!("{}{path}", l.api())).body(body).send();
    let big = vec![b' '; 70_000];
    for (path, body, status, want) in [
        (
            "/v1/entries",
            big.clone(),
            413,
            "exceeds the limit of 65536 bytes",
        ),
        (
            "/v1/entries",
            b"{\"record_id\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid record",
        ),
        (
            "/v1/entries",
            b"{\"unknown_field\": 1}".to_vec(),
            400,
            "unknown field `unknown_field`",
        ),
        ("/v1/entries", b"[".to_vec(), 400, "EOF while parsing"),
        (
            "/v1/entries/batch",
            b"{\"records\": []}".to_vec(),
            400,
            "batch has no records",
        ),
        (
            "/v1/entries?proof=maybe",
            b"{}".to_vec(),
            400,
            "invalid query parameters",
        ),
    ] {
        let (s, body) = status_and_body(post(path, body).await.unwrap()).await;
        assert_eq!(
            (s, body.contains(want)),
            (status, true),
            "{path}: {s} {body}"
        );
    }
    let a = raw_client(Some((&auditor.0, &auditor.1)), false, false);
    for (q, want) in [
        (
            "/v1/proof/consistency?from=5&to=1",
            "from 5 is greater than to 1",
        ),
        (
            "/v1/proof/consistency?from=0&to=99",
            "to 99 exceeds the log size 0",
        ),
        (
            "/v1/proof/inclusion?tree_size=0&index=0",
            "index 0 is outside a tree of size 0",
        ),
        (
            "/v1/proof/inclusion?tree_size=1",
            "tree_size 1 exceeds the log size 0",
        ),
        (
            "/v1/proof/inclusion?tree_size=-1&index=0",
            "invalid query parameters",
        ),
        ("/v1/entries?start=5&end=2", "start 5 is greater than end 2"),
        ("/v1/entries?start=0&end=5000", "exceeds the limit of 1000"),
        ("/v1/entries/abc", "is not a non-negative integer"),
        ("/v1/search?sha256=zz", "sha256"),
        ("/v1/search?sha256=00&cid=x", "exactly one of"),
    ] {
        let (s, body) =
            status_and_body(a.get(format!("{}{q}", l.api())).send().await.unwrap()).await;
        assert_eq!((s, body.contains(want)), (400, true), "{q}: {s} {body}");
    }
    let (s, _) = status_and_body(
        a.get(format!("{}/v1/entries/0", l.api()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 404);

    let m = l.metrics().await;
    for want in [
        "medmesh_ledger_refusals_total{reason=\"no_client_certificate\"} 1",
        "medmesh_ledger_refusals_total{reason=\"certificate_expired\"} 1",
        "medmesh_ledger_refusals_total{reason=\"unknown_issuer\"} 1",
        "medmesh_ledger_refusals_total{reason=\"forbidden\"} 2",
        "medmesh_ledger_refusals_total{reason=\"body_too_large\"} 1",
        "medmesh_ledger_refusals_total{reason=\"foreign_trust_domain\"} 1",
        "medmesh_ledger_tls_handshake_failures_total 1",
    ] {
        assert!(m.contains(want), "missing {want}:\n{m}");
    }
    assert!(
        m.contains("medmesh_ledger_tree_size 0"),
        "nothing was written"
    );
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http1_and_http2_and_reports_readiness() {
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let ready = reqwest::get(format!("{}/ready", l.admin())).await.unwrap();
    // The first checkpoint (size 0) is published within one interval.
    let mut ok = ready.status().as_u16() == 200;
    for _ in 0..50 {
        if ok {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        ok = reqwest::get(format!("{}/ready", l.admin()))
            .await
            .unwrap()
            .status()
            == 200;
    }
    assert!(ok, "ledger never became ready");
    let a = pki.issue(AUDITOR);
    for http1 in [true, false] {
        let c = raw_client(Some((&a.0, &a.1)), false, http1);
        let resp = c
            .get(format!("{}/v1/checkpoint", l.api()))
            .send()
            .await
            .unwrap();
        let want = if http1 {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(resp.version(), want);
        let note = resp.text().await.unwrap();
        medmesh_core::Checkpoint::open(&note, &l.verifier, ORIGIN).unwrap();
    }
    assert_eq!(
        reqwest::get(format!("{}/live", l.admin()))
            .await
            .unwrap()
            .status(),
        200
    );
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growth_is_covered_by_a_checkpoint_within_a_second() {
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let w = l.client(&pki, WRITER);
    let a = l.client(&pki, AUDITOR);
    for round in 1..=3u64 {
        // No proof requested: only the writer's timer publishes the checkpoint.
        let r = w
            .append(
                &record(round, &pki.id(("ct", "scanner")), &pki.id(WRITER)),
                false,
            )
            .await
            .unwrap();
        let appended = std::time::Instant::now();
        loop {
            let cp = a.checkpoint().await.unwrap().checkpoint;
            if cp.size > r.result.index {
                break;
            }
            assert!(
                appended.elapsed() < std::time::Duration::from_secs(1),
                "no checkpoint covered entry {} within a second",
                r.result.index
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_leaf_proofs_between_checkpoints() {
    let pki = Pki::new();
    // Slow checkpoints: entries appended after one stay uncovered for up to a second.
    let mut l = TestLedger::start_with(&pki, 1000).await;
    let w = l.client(&pki, WRITER);
    let a = l.client(&pki, AUDITOR);
    let (src, dst) = (pki.id(("ct", "scanner")), pki.id(WRITER));
    let first = w.append(&record(1, &src, &dst), true).await.unwrap();
    let second = w.append(&record(2, &src, &dst), false).await.unwrap();
    assert_eq!((first.result.index, second.result.index), (0, 1));
    // The search answers from the latest checkpoint (size 1) without an error; the entry it
    // does not cover yet is left for the next one.
    let (cp, hits, _) = a.search("identity", src.as_str()).await.unwrap();
    assert_eq!(cp.checkpoint.size, 1);
    assert_eq!(hits.iter().map(|h| h.index).collect::<Vec<_>>(), vec![0]);
    // A proof by leaf hash waits for the index instead of answering 404.
    let by_leaf = a
        .inclusion_proof_by_leaf(&second.result.leaf_hash, 2)
        .await
        .unwrap();
    assert_eq!(by_leaf.index, 1);
    l.stop().await;
}

/// The checkpoint `a` trusts in `store` once the ledger has signed one of `size` entries.
async fn trusted_at(
    a: &medmesh_ledger_client::LedgerClient,
    store: &TrustedStore,
    size: u64,
) -> medmesh_core::Checkpoint {
    loop {
        let u = a.update_trusted(store).await.unwrap();
        if u.new.checkpoint.size == size {
            return u.new.checkpoint;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The indexes a search for `key=value` finds once it finds any (the indexer runs behind the
/// appends), or none after 10 s.
async fn search_once_indexed(
    a: &medmesh_ledger_client::LedgerClient,
    key: &str,
    value: &str,
) -> Vec<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let hits = a.search(key, value).await.unwrap().1;
        if !hits.is_empty() || std::time::Instant::now() > deadline {
            return hits.iter().map(|h| h.index).collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An `index.redb` of the first layout (multimap tables, no format key) is rebuilt from the log
/// on start: its stale rows are gone and every search finds exactly the log's entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_of_the_first_layout_is_rebuilt_from_the_log() {
    use redb::{
        MultimapTableDefinition, MultimapTableHandle, ReadableDatabase, ReadableTable,
        TableDefinition,
    };
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let w = l.client(&pki, WRITER);
    let (src, dst) = (pki.id(("ct", "scanner")), pki.id(WRITER));
    let records: Vec<_> = (0..30).map(|i| record(i, &src, &dst)).collect();
    let appended = w.append_batch(records.clone(), false).await.unwrap();
    assert_eq!(appended.results.len(), 30);
    // Wait until the indexer covers the batch, so that the index claims all 30 entries.
    let a = l.client(&pki, AUDITOR);
    let sha0 = records[0].content_sha256.unwrap().to_hex();
    assert_eq!(search_once_indexed(&a, "sha256", &sha0).await.len(), 1);
    l.stop().await;

    // Rewrite the index as the first layout held it, with a wrong row to be forgotten: record
    // 0's content hash pointing at entry 29.
    let path = l.data.join("index.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        for name in ["leaf_epochs", "sha256_epochs", "cid_entries", "uid_epochs"] {
            let t: TableDefinition<&[u8], ()> = TableDefinition::new(name);
            txn.delete_table(t).unwrap();
        }
        let v1: MultimapTableDefinition<[u8; 32], u64> = MultimapTableDefinition::new("by_sha256");
        txn.open_multimap_table(v1)
            .unwrap()
            .insert(records[0].content_sha256.unwrap().0, 29)
            .unwrap();
        let meta: TableDefinition<&str, u64> = TableDefinition::new("index_meta");
        let mut m = txn.open_table(meta).unwrap();
        m.remove("index_format").unwrap();
        assert_eq!(m.get("indexed_size").unwrap().unwrap().value(), 30);
        drop(m);
        txn.commit().unwrap();
    }

    l.restart().await.unwrap();
    let a = l.client(&pki, AUDITOR);
    for (r, placed) in records.iter().zip(&appended.results) {
        let hits = search_once_indexed(&a, "sha256", &r.content_sha256.unwrap().to_hex()).await;
        assert_eq!(
            hits,
            vec![placed.index],
            "the rebuilt index holds exactly the log's entry for each hash"
        );
        let by_uid = a
            .search("uid", &r.sop_instance_uid.unwrap().to_string())
            .await
            .unwrap()
            .1;
        assert_eq!(by_uid.len(), 1);
        assert_eq!(by_uid[0].entry.record, *r);
    }
    // The study key is shared by every seventh record: a range of rows under one key.
    let (_, study, truncated) = a
        .search("uid", &records[3].study_uid.unwrap().to_string())
        .await
        .unwrap();
    assert_eq!((study.len(), truncated), (4, false));
    assert!(study.windows(2).all(|p| p[0].index < p[1].index));
    l.stop().await;

    // The first layout's tables are gone, and the format is recorded.
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let left: Vec<String> = txn
        .list_multimap_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    assert_eq!(left, vec!["by_identity".to_owned()]);
    let meta: TableDefinition<&str, u64> = TableDefinition::new("index_meta");
    let m = txn.open_table(meta).unwrap();
    assert_eq!(m.get("index_format").unwrap().unwrap().value(), 4);
}

/// A ledger of format 1 (Merkle nodes keyed by level, then index) is moved to post-order keys
/// when it opens: the signed checkpoint still verifies, every proof still checks, and it goes on
/// appending in the new layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_of_the_first_format_is_moved_to_post_order_nodes() {
    use redb::{
        ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
    };
    // Both layouts, written out here as the format document gives them.
    fn post_order(level: u8, index: u64) -> u64 {
        let last = ((index + 1) << level) - 1;
        2 * last - u64::from(last.count_ones()) + u64::from(level)
    }
    fn by_level(level: u8, index: u64) -> u64 {
        (u64::from(level) << 56) | index
    }
    let new_nodes: TableDefinition<u64, [u8; 32]> = TableDefinition::new("tree_nodes");
    let old_nodes: TableDefinition<u64, [u8; 32]> = TableDefinition::new("nodes");
    let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");

    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let w = l.client(&pki, WRITER);
    let a = l.client(&pki, AUDITOR);
    let (src, dst) = (pki.id(("ct", "scanner")), pki.id(WRITER));
    // 37 = 32 + 4 + 1: a ragged right edge with three peaks.
    let records: Vec<_> = (0..37).map(|i| record(i, &src, &dst)).collect();
    w.append_batch(records.clone(), false).await.unwrap();
    let store = TrustedStore::new(pki.dir.path().join("trusted.cp"));
    let cp37 = trusted_at(&a, &store, 37).await;
    l.stop().await;

    // Rewrite the node table as format 1 kept it.
    let path = l.data.join("ledger.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let new = txn.open_table(new_nodes).unwrap();
            // 2n − popcount(n) complete nodes, and no others.
            assert_eq!(new.len().unwrap(), 2 * 37 - 3);
            let mut old = txn.open_table(old_nodes).unwrap();
            for level in 0..6u8 {
                for index in 0..(37 >> level) {
                    let hash = new.get(post_order(level, index)).unwrap().unwrap().value();
                    old.insert(by_level(level, index), hash).unwrap();
                }
            }
            assert_eq!(old.len().unwrap(), 2 * 37 - 3);
            txn.open_table(meta)
                .unwrap()
                .insert("format_version", 1)
                .unwrap();
        }
        txn.delete_table(new_nodes).unwrap();
        txn.commit().unwrap();
    }

    l.restart().await.unwrap();
    let a = l.client(&pki, AUDITOR);
    for (i, r) in records.iter().enumerate() {
        let p = a.prove_entry(i as u64, &cp37).await.unwrap();
        assert_eq!(&p.entry.record, r);
    }
    let report = a.audit(&cp37, 1000).await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.proofs_checked, 37);
    // It appends in the new layout, consistently with what it signed before.
    let more: Vec<_> = (37..42).map(|i| record(i, &src, &dst)).collect();
    l.client(&pki, WRITER)
        .append_batch(more, false)
        .await
        .unwrap();
    // The auditor's trusted checkpoint of size 37 must be extended consistently.
    let cp42 = trusted_at(&a, &store, 42).await;
    let c = a.consistency_proof(37, 42).await.unwrap();
    merkle::verify_consistency(37, 42, &cp37.root, &cp42.root, &c.proof).unwrap();
    l.stop().await;

    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let tables: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    assert!(!tables.contains(&"nodes".to_owned()), "{tables:?}");
    assert_eq!(
        txn.open_table(meta)
            .unwrap()
            .get("format_version")
            .unwrap()
            .unwrap()
            .value(),
        2
    );
    let nodes = txn.open_table(new_nodes).unwrap();
    assert_eq!(nodes.len().unwrap(), 2 * 42 - 3);
    // The last leaf and the nodes it completed are the table's last rows.
    let last: Vec<u64> = nodes
        .range(post_order(0, 41)..)
        .unwrap()
        .map(|r| r.unwrap().0.value())
        .collect();
    assert_eq!(last, vec![post_order(0, 41), post_order(1, 20)]);
}

/// Hashes and UIDs are indexed by their first 8 bytes: entries whose keys share those bytes but
/// differ after them are never returned for each other, by searches or by leaf-hash proofs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sharing_an_index_prefix_are_told_apart() {
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let w = l.client(&pki, WRITER);
    let a = l.client(&pki, AUDITOR);
    let (src, dst) = (pki.id(("ct", "scanner")), pki.id(WRITER));
    // Three records whose content hash and instance UID share their first 8 bytes.
    let records: Vec<_> = (0..3u8)
        .map(|k| {
            let mut r = record(u64::from(k), &src, &dst);
            let mut key = [0x5a; 32];
            key[31] = k;
            r.content_sha256 = Some(medmesh_core::merkle::Hash(key));
            r.sop_instance_uid = Some(medmesh_core::record::KeyedHash(key));
            r
        })
        .collect();
    let appended = w.append_batch(records.clone(), false).await.unwrap();
    for (r, placed) in records.iter().zip(&appended.results) {
        let hits = search_once_indexed(&a, "sha256", &r.content_sha256.unwrap().to_hex()).await;
        assert_eq!(
            hits,
            vec![placed.index],
            "only the entry with the whole hash"
        );
        let by_uid = a
            .search("uid", &r.sop_instance_uid.unwrap().to_string())
            .await
            .unwrap()
            .1;
        assert_eq!(
            by_uid.iter().map(|h| h.index).collect::<Vec<_>>(),
            vec![placed.index]
        );
        let by_leaf = a
            .inclusion_proof_by_leaf(&placed.leaf_hash, placed.index + 1)
            .await
            .unwrap();
        assert_eq!(by_leaf.index, placed.index);
    }
    // A hash sharing the prefix of all three, held by none of them, finds nothing.
    let mut other = [0x5a; 32];
    other[31] = 9;
    let none = a
        .search("sha256", &medmesh_core::merkle::Hash(other).to_hex())
        .await
        .unwrap()
        .1;
    assert!(none.is_empty());
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_with_a_conflict_and_proofs() {
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    let w = l.client(&pki, WRITER);
    let (src, dst) = (pki.id(("ct", "scanner")), pki.id(WRITER));
    let taken = record(1, &src, &dst);
    w.append(&taken, false).await.unwrap();
    let mut reuse = taken.clone();
    reuse.bytes += 1;
    let b = w
        .append_batch(vec![reuse, record(2, &src, &dst)], true)
        .await
        .unwrap();
    assert!(b.results[0].conflict && b.results[0].inclusion_proof.is_none());
    assert!(!b.results[1].conflict && b.results[1].inclusion_proof.is_some());
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_by_a_stalled_client() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let mut l = TestLedger::start(&pki).await;
    // An unauthenticated client that completes TLS and then sends half a request, forever.
    let c = raw_client(None, false, true);
    let url = format!("{}/v1/checkpoint", l.api());
    let _ = c.get(&url).send().await;
    let addr = l.ledger.as_ref().unwrap().api_addr;
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(8), l.stop())
        .await
        .expect("shutdown hung on a stalled connection");
    // The drain deadline is 2 s in these tests.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
