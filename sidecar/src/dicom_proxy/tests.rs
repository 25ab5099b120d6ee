//! The audited association proxy over in-memory streams: what a client sees when a success
//! cannot be recorded, and how long it may hold a connection the application has closed.

use std::time::Duration;

use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, PDataValue, PDataValueType, Pdu, PresentationContextProposed,
    PresentationContextResult, PresentationContextResultReason,
};
use medmesh_core::checkpoint::NoteSigner;
use medmesh_core::tls::ServerIdentity;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

use super::*;
use crate::deliver::{LedgerTarget, Mode};
use crate::dicom::command::{self, Command};
use crate::spool::Spool;

/// An enforce-mode context whose ledger can never acknowledge (no credentials yet).
fn unrecordable(dir: &std::path::Path) -> AuditCtx {
    let metrics = Metrics::register(&prometheus::Registry::new());
    let (_tx, creds) = watch::channel(None);
    let signer = NoteSigner::from_seed("test/ledger", [1; 32]).unwrap();
    let delivery = Delivery::new(
        Mode::Enforce,
        LedgerTarget {
            url: "https://127.0.0.1:1".into(),
            server: ServerIdentity::AnyInTrustDomain,
            verifier: signer.verifier(),
            origin: "test/ledger".into(),
        },
        Duration::from_millis(100),
        creds,
        Spool::open(dir, 1 << 20).unwrap(),
        metrics.clone(),
    );
    AuditCtx {
        delivery,
        key: Arc::new(UidKey::new(vec![1; 32]).unwrap()),
        requestor: "spiffe://td/ns/a/sa/scanner".parse().unwrap(),
        acceptor: "spiffe://td/ns/b/sa/pacs".parse().unwrap(),
        metrics,
        archive: None,
    }
}

fn pdu(p: &Pdu) -> Vec<u8> {
    let mut b = Vec::new();
    dicom_ul::pdu::write_pdu(&mut b, p).unwrap();
    b
}

fn pdv(command: bool, last: bool, data: Vec<u8>) -> PDataValue {
    PDataValue {
        presentation_context_id: 1,
        value_type: if command {
            PDataValueType::Command
        } else {
            PDataValueType::Data
        },
        is_last: last,
        data,
    }
}

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

/// Association request, acceptance, and one C-STORE-RQ with its data set.
fn store_request() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let rq = pdu(&Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "SCU".into(),
        called_ae_title: "PACS".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: CT.into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2.1".into()],
        }],
        user_variables: vec![],
    }));
    let ac = pdu(&Pdu::AssociationAC(AssociationAC {
        protocol_version: 1,
        calling_ae_title: "SCU".into(),
        called_ae_title: "PACS".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextResult {
            id: 1,
            reason: PresentationContextResultReason::Acceptance,
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
        }],
        user_variables: vec![],
    }));
    let cmd = command::encode(&Command {
        field: command::C_STORE_RQ,
        message_id: Some(5),
        sop_class: Some(CT.into()),
        sop_instance: Some("2.25.5".into()),
        has_dataset: true,
        ..Default::default()
    });
    let data = pdu(&Pdu::PData {
        data: vec![
            pdv(true, true, cmd),
            pdv(false, true, vec![0x08, 0, 0x16, 0, 0, 0, 0, 0]),
        ],
    });
    (rq, ac, data)
}

fn success_rsp() -> Vec<u8> {
    command::encode(&Command {
        field: command::C_STORE_RSP,
        responded_to: Some(5),
        sop_class: Some(CT.into()),
        sop_instance: Some("2.25.5".into()),
        status: Some(0x0000),
        ..Default::default()
    })
}

/// Runs a store through the proxy; the application answers with `response` PDU bytes.
/// Returns everything the client received after the A-ASSOCIATE-AC.
async fn client_view(response: Vec<u8>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let ctx = unrecordable(dir.path());
    let (mut client, proxy_client) = tokio::io::duplex(1 << 16);
    let (proxy_app, mut app) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(proxy(proxy_client, proxy_app, ctx));
    let (rq, ac, data) = store_request();
    client.write_all(&rq).await.unwrap();
    read_n(&mut app, rq.len()).await;
    app.write_all(&ac).await.unwrap();
    assert_eq!(read_n(&mut client, ac.len()).await, ac);
    client.write_all(&data).await.unwrap();
    read_n(&mut app, data.len()).await;
    app.write_all(&response).await.unwrap();
    drop(app);
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut seen)).await;
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    seen
}

async fn read_n(s: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).await.unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_success_in_one_pdv_becomes_a700() {
    let rsp = pdu(&Pdu::PData {
        data: vec![pdv(true, true, success_rsp())],
    });
    let seen = client_view(rsp).await;
    assert_eq!(seen[0], 0x04, "a P-DATA-TF reaches the client: {seen:02x?}");
    let cmd = &seen[12..];
    let c = command::parse(cmd).unwrap();
    assert_eq!(
        (c.field, c.status),
        (command::C_STORE_RSP, Some(STATUS_OUT_OF_RESOURCES))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_success_split_over_pdvs_is_replaced_by_a_abort() {
    let rsp = success_rsp();
    let (a, b) = rsp.split_at(rsp.len() / 2);
    let split = pdu(&Pdu::PData {
        data: vec![pdv(true, false, a.to_vec()), pdv(true, true, b.to_vec())],
    });
    let seen = client_view(split).await;
    assert_eq!(
        seen, A_ABORT,
        "the client must get an A-ABORT and nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_success_split_over_pdus_is_replaced_by_a_abort() {
    let rsp = success_rsp();
    let (a, b) = rsp.split_at(rsp.len() / 2);
    let mut two = pdu(&Pdu::PData {
        data: vec![pdv(true, false, a.to_vec())],
    });
    two.extend(pdu(&Pdu::PData {
        data: vec![pdv(true, true, b.to_vec())],
    }));
    let seen = client_view(two.clone()).await;
    // The first PDU completes nothing and passes; the second, which completes the success,
    // is replaced by the abort.
    let first_len = two.len()
        - pdu(&Pdu::PData {
            data: vec![pdv(true, true, b.to_vec())],
        })
        .len();
    assert_eq!(&seen[..first_len], &two[..first_len]);
    assert_eq!(&seen[first_len..], A_ABORT);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_client_holding_a_closed_association_is_cut_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = unrecordable(dir.path());
    let (client, proxy_client) = tokio::io::duplex(1 << 16);
    let (proxy_app, app) = tokio::io::duplex(1 << 16);
    let start = tokio::time::Instant::now();
    let task = tokio::spawn(proxy(proxy_client, proxy_app, ctx));
    // The application closes at once; the client neither sends nor closes.
    drop(app);
    tokio::time::sleep(CLIENT_GRACE - Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "cut before the grace period ended");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("not cut after the grace period")
        .unwrap();
    assert!(start.elapsed() >= CLIENT_GRACE);
    drop(client);
}
