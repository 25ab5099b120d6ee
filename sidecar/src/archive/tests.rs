use std::io::Read as _;

use super::*;
use medmesh_core::seal::ArchiveKey;

fn audit_json(recipients: &[String]) -> String {
    serde_json::to_string(&medmesh_core::wire::SidecarAudit {
        ledger_url: "https://l.ns.svc:8443".into(),
        ledger_id: None,
        ledger_verifier: "unused".into(),
        ledger_origin: "unused".into(),
        delivery: "spool".into(),
        key_file: "/etc/medmesh/audit/key".into(),
        archive: Some(medmesh_core::wire::SidecarArchive {
            url: "http://a.ns.svc:9094".into(),
            id: "spiffe://td/ns/ns/sa/a".into(),
            recipients: recipients.to_vec(),
            mode: "async".into(),
            replication_min: 1,
            replication_max: 1,
        }),
    })
    .unwrap()
}

/// Stages `data` and returns its ciphertext (then discards it).
fn sealed(a: &Archiver, dir: &Path, data: &[u8]) -> Vec<u8> {
    let mut w = a.begin();
    w.write(data);
    let staged = w.finish().unwrap();
    let bytes = std::fs::read(dir.join(format!("staging/tmp/{}.age", staged.id))).unwrap();
    a.staging.discard(&staged);
    bytes
}

fn opens_with(cipher: &[u8], key: &ArchiveKey) -> bool {
    let mut out = Vec::new();
    medmesh_core::seal::open(cipher, key)
        .and_then(|mut r| r.read_to_end(&mut out).map_err(Into::into))
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_namespace_key_in_the_audit_settings_applies_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, glass, new) = (
        ArchiveKey::generate(),
        ArchiveKey::generate(),
        ArchiveKey::generate(),
    );
    let file = dir.path().join("audit.json");
    let both = |k: &ArchiveKey| vec![k.recipient().to_string(), glass.recipient().to_string()];
    std::fs::write(&file, audit_json(&both(&old))).unwrap();
    let metrics = crate::metrics::Metrics::register(&prometheus::Registry::new());
    let archiver = Archiver::open(
        ArchiveConfig {
            mode: Mode::Async,
            target: Target::Store(dir.path().join("store")),
            recipients: vec![old.recipient(), glass.recipient()],
            recipients_file: Some(file.clone()),
            staging_dir: dir.path().join("staging"),
            staging_max_bytes: 1 << 30,
        },
        metrics.clone(),
    )
    .unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    archiver.follow_recipients(
        file.clone(),
        Duration::from_millis(20),
        metrics.clone(),
        stop,
    );
    let data = b"an instance".repeat(1000);
    let c = sealed(&archiver, dir.path(), &data);
    assert!(opens_with(&c, &old) && opens_with(&c, &glass) && !opens_with(&c, &new));

    // The operator replaced the shredded key (kubelet swaps the mounted file).
    let next = dir.path().join("audit.json.new");
    std::fs::write(&next, audit_json(&both(&new))).unwrap();
    std::fs::rename(&next, &file).unwrap();
    let reloads = || metrics.archive_key_reloads.with_label_values(&["ok"]).get();
    for _ in 0..250 {
        if reloads() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reloads(), 1);
    let c = sealed(&archiver, dir.path(), &data);
    assert!(opens_with(&c, &new) && opens_with(&c, &glass) && !opens_with(&c, &old));

    // A broken version changes nothing: counted, the new key stays in force.
    std::fs::write(&file, "{ not json").unwrap();
    let errors = || {
        metrics
            .archive_key_reloads
            .with_label_values(&["error"])
            .get()
    };
    for _ in 0..250 {
        if errors() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(errors() >= 1);
    let c = sealed(&archiver, dir.path(), &data);
    assert!(opens_with(&c, &new));
    stop_tx.send(true).unwrap();
}
