//! Starting one replica: Raft with its log store, state machine and network; cluster
//! initialisation by replica 0; the proposer; Raft metrics; readiness.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use medmesh_core::wire::{FollowerStatus, LedgerStatus, MemberStatus};
use medmesh_core::{Checkpoint, NoteSigner, NoteVerifier};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;

use super::log_store::LogStore;
use super::network::{Forwarder, NetworkFactory, PeerTls};
use super::proposer::{Proposer, ProposerConfig};
use super::state_machine::{Shared, StateMachine};
use super::{NodeId, Raft, Replica};
use crate::StartError;
use crate::config::{Config, Replication};
use crate::metrics::Metrics;
use crate::sequencer::{Head, Sequencer, SignedCheckpoint, SignerStateFile};
use crate::server::Creds;
use crate::storage::{Recovered, Storage};

/// What a replica starts from.
pub struct Parts<'a> {
    /// The whole configuration.
    pub cfg: &'a Config,
    /// Its replication part.
    pub rep: &'a Replication,
    /// The opened database.
    pub storage: Storage,
    /// Its recovered tree state.
    pub recovered: Recovered,
    /// Checkpoint signer (used only while leading).
    pub signer: NoteSigner,
    /// Checkpoint verifier.
    pub verifier: NoteVerifier,
    /// The signer state file.
    pub state_path: std::path::PathBuf,
    /// TLS credentials in force.
    pub creds: watch::Receiver<Arc<Creds>>,
    /// Ledger metrics.
    pub metrics: Metrics,
    /// Where Raft metrics are registered.
    pub registry: &'a Registry,
}

/// A started replica.
pub struct Started {
    /// The sequencer the API submits to.
    pub seq: Sequencer,
    /// Replication handle for the API, and the proposer task.
    pub replica: (Replica, tokio::task::JoinHandle<()>),
}

fn raft_err(e: impl std::fmt::Display) -> StartError {
    StartError::Raft(e.to_string())
}

/// The largest of the database's latest checkpoint and the signer state file's (the leader
/// records and serves a checkpoint before it is replicated into the database; the file was
/// checked against the database by `reconcile_signer_state`).
fn latest_checkpoint(
    recovered: &Recovered,
    path: &std::path::Path,
    verifier: &NoteVerifier,
    origin: &str,
) -> Option<(Checkpoint, String)> {
    let from_file = std::fs::read_to_string(path)
        .ok()
        .and_then(|n| Some((Checkpoint::open(&n, verifier, origin).ok()?, n)));
    match (recovered.checkpoint.clone(), from_file) {
        (Some(a), Some(b)) => Some(if b.0.size > a.0.size { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Starts Raft, initialises the cluster when this is replica 0 of a new one, and starts the
/// proposer.
///
/// # Errors
/// When Raft's files cannot be opened or Raft refuses its configuration.
pub async fn start(p: Parts<'_>) -> Result<Started, StartError> {
    let Parts {
        cfg,
        rep,
        storage,
        recovered,
        signer,
        verifier,
        state_path,
        creds,
        metrics,
        registry,
    } = p;
    let latest = latest_checkpoint(&recovered, &state_path, &verifier, &cfg.origin);
    let signer_state = Arc::new(SignerStateFile::new(
        state_path,
        latest.as_ref().map_or(0, |(c, _)| c.size),
    ));
    let (head_tx, head_rx) = watch::channel(Head {
        size: recovered.frontier.size(),
        checkpoint: latest
            .map(|(checkpoint, note)| Arc::new(SignedCheckpoint { checkpoint, note })),
    });
    metrics.tree_size.set(recovered.frontier.size() as i64);
    let head_tx = Arc::new(head_tx);
    let sm = StateMachine::new(
        storage,
        recovered.frontier,
        cfg.data_dir.join("raft-snapshots"),
        Shared {
            head: head_tx.clone(),
            signer_state: signer_state.clone(),
            verifier,
            origin: cfg.origin.clone(),
            metrics: metrics.clone(),
        },
    )?;
    let log_path = cfg.data_dir.join("raft.redb");
    let log = tokio::task::spawn_blocking(move || LogStore::open(&log_path))
        .await
        .map_err(raft_err)?
        .map_err(|e| raft_err(format!("raft.redb: {e}")))?;
    let election = rep.election_timeout.as_millis() as u64;
    let config = openraft::Config {
        cluster_name: cfg.origin.clone(),
        heartbeat_interval: rep.heartbeat.as_millis() as u64,
        election_timeout_min: election,
        election_timeout_max: 2 * election,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(rep.snapshot_logs),
        max_in_snapshot_log_to_keep: rep.snapshot_logs / 2,
        max_payload_entries: 64,
        // openraft times one AppendEntries out after a heartbeat interval: payloads are kept
        // small enough (see `network::MAX_APPEND_BYTES`); a snapshot chunk gets longer.
        install_snapshot_timeout: 10_000,
        snapshot_max_chunk_size: 1 << 20,
        ..Default::default()
    }
    .validate()
    .map_err(raft_err)?;
    let tls = Arc::new(PeerTls::new(creds.clone()));
    let resolve = Arc::new(std::sync::RwLock::new(rep.resolve.clone()));
    let raft = Raft::new(
        rep.id,
        Arc::new(config),
        NetworkFactory::new(tls.clone(), metrics.clone(), resolve.clone()),
        log,
        sm,
    )
    .await
    .map_err(raft_err)?;
    let leader_wait = 2 * Duration::from_millis(2 * election);
    if rep.id == 0 {
        tokio::spawn(initialise(raft.clone(), rep.peers.clone(), leader_wait));
    }
    if let Some(path) = cfg.source.clone() {
        tokio::spawn(follow_membership(
            raft.clone(),
            rep.id,
            path,
            resolve.clone(),
        ));
    }
    spawn_metrics(raft.clone(), registry, rep.id);

    let proposer = Arc::new(Proposer::new(
        raft.clone(),
        head_tx,
        signer,
        signer_state,
        ProposerConfig {
            id: rep.id,
            origin: cfg.origin.clone(),
            checkpoint_interval: cfg.checkpoint_interval,
            max_batch_entries: cfg.max_batch_entries,
        },
        metrics,
    ));
    let (seq, rx) = Sequencer::replicated(head_rx);
    let task = tokio::spawn(proposer.run(rx));
    let peer_id = creds.borrow().identity.id().clone();
    tracing::info!(id = rep.id, peers = ?rep.peers, "Raft replica started");
    Ok(Started {
        seq,
        replica: (
            Replica {
                raft,
                contact: Arc::default(),
                id: rep.id,
                peer_id,
                // A leader that does not answer within this is likely gone: the client retries (with
                // the same record ids) and meets the new leader.
                forwarder: Arc::new(Forwarder::new(tls, Duration::from_secs(5), resolve)),
                leader_wait,
            },
            task,
        ),
    })
}

/// Replica 0 initialises a new cluster once: only when its own Raft state is empty and no
/// leader has contacted it within `wait` (a replica 0 that lost its disk rejoins the existing
/// cluster through the leader instead).
async fn initialise(raft: Raft, peers: Vec<String>, wait: Duration) {
    if raft.is_initialized().await.unwrap_or(true) {
        return;
    }
    let mut m = raft.metrics();
    let heard = tokio::time::timeout(wait, async {
        loop {
            if m.borrow_and_update().current_leader.is_some() {
                return;
            }
            if m.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok();
    if heard || raft.is_initialized().await.unwrap_or(true) {
        return;
    }
    let members: BTreeMap<NodeId, BasicNode> = peers
        .iter()
        .enumerate()
        .map(|(i, addr)| (i as NodeId, BasicNode { addr: addr.clone() }))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!(replicas = peers.len(), "initialised a new Raft cluster"),
        Err(e) => tracing::warn!(error = %e, "cluster initialisation refused"),
    }
}

/// Resolves when Raft stops on its own: a fatal error, or its core task gone.
pub async fn stopped(raft: &Raft) -> String {
    let mut rx = raft.metrics();
    loop {
        if let Err(e) = &rx.borrow_and_update().running_state {
            return format!("Raft stopped: {e}");
        }
        if rx.changed().await.is_err() {
            return "Raft's core task ended".into();
        }
    }
}

/// How often the leader compares the membership with the configuration file.
const MEMBERSHIP_EVERY: Duration = Duration::from_secs(2);
/// A learner within this many Raft entries of the leader is promoted.
const CAUGHT_UP: u64 = 64;

/// On the leader, every [`MEMBERSHIP_EVERY`]: makes the voters exactly the replicas the
/// configuration file lists in `peers` (re-read, so that a scaled StatefulSet's new ConfigMap
/// takes effect without restarts). A replica newly listed is added as a learner first and
/// promoted once it has caught up; a replica no longer listed is removed (joint consensus: a
/// quorum of the old and of the new set agree). One change at a time; a file that does not
/// parse changes nothing.
async fn follow_membership(
    raft: Raft,
    me: NodeId,
    path: std::path::PathBuf,
    resolve: Arc<std::sync::RwLock<BTreeMap<String, String>>>,
) {
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(MEMBERSHIP_EVERY).await;
        let rx = raft.metrics();
        if rx.has_changed().is_err() {
            return;
        }
        let m = rx.borrow().clone();
        if m.current_leader != Some(me) {
            continue;
        }
        let rep = match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| Config::from_yaml(&t).map_err(|e| e.to_string()))
        {
            Ok(cfg) => match cfg.replication {
                Some(r) => r,
                None => continue,
            },
            Err(e) => {
                if e != last_error {
                    tracing::warn!(path = %path.display(), error = %e, "configuration unreadable; membership unchanged");
                    last_error = e;
                }
                continue;
            }
        };
        if let Ok(mut r) = resolve.write() {
            r.clone_from(&rep.resolve);
        }
        let desired: BTreeMap<NodeId, BasicNode> = rep
            .peers
            .iter()
            .enumerate()
            .map(|(i, addr)| (i as NodeId, BasicNode { addr: addr.clone() }))
            .collect();
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            continue; // a change is being committed
        }
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: std::collections::BTreeSet<NodeId> =
            membership.nodes().map(|(id, _)| *id).collect();
        let result = if let Some((id, node)) = desired.iter().find(|(id, _)| !known.contains(id)) {
            tracing::info!(replica = id, addr = %node.addr, "adding a replica as a learner");
            raft.add_learner(*id, node.clone(), false).await.map(|_| ())
        } else {
            let want: std::collections::BTreeSet<NodeId> = desired.keys().copied().collect();
            let last = m.last_log_index.unwrap_or(0);
            let caught_up = |id: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).copied().flatten())
                    .is_some_and(|l| l.index + CAUGHT_UP >= last)
            };
            if want != voters {
                if want.iter().all(|id| voters.contains(id) || caught_up(id)) {
                    tracing::info!(from = ?voters, to = ?want, "changing the voters");
                    raft.change_membership(want, false).await.map(|_| ())
                } else {
                    Ok(()) // learners still catching up
                }
            } else {
                let extra: std::collections::BTreeSet<NodeId> =
                    known.difference(&want).copied().collect();
                if extra.is_empty() {
                    Ok(())
                } else {
                    tracing::info!(replicas = ?extra, "removing replicas no longer listed");
                    raft.change_membership(openraft::ChangeMembers::RemoveNodes(extra), false)
                        .await
                        .map(|_| ())
                }
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "membership change not made; will retry");
        }
    }
}

/// A follower this many Raft entries behind its leader's last announced commit still serves.
const FOLLOWER_SLACK: u64 = 16;

/// Why this replica cannot serve yet, if it cannot: it must know a leader, and a leader must
/// have heard from a quorum recently; a follower must have applied what it holds.
///
/// # Errors
/// The reason, for `/ready`.
pub fn ready(replica: &Replica) -> Result<(), String> {
    let raft = &replica.raft;
    let rx = raft.metrics();
    if rx.has_changed().is_err() {
        return Err("Raft's core task ended".into());
    }
    // Read in place (no await below): this runs on every read request.
    let m = rx.borrow();
    if let Err(e) = &m.running_state {
        return Err(format!("Raft stopped: {e}"));
    }
    let Some(leader) = m.current_leader else {
        return Err(format!("no Raft leader known (term {})", m.current_term));
    };
    if m.state == ServerState::Leader {
        let limit = 2 * raft.config().election_timeout_max;
        match m.millis_since_quorum_ack {
            Some(ms) if ms <= limit => {}
            Some(ms) => return Err(format!("leader has not heard from a quorum for {ms} ms")),
            None => return Err("leader has not heard from a quorum yet".into()),
        }
    }
    let applied = m.last_applied.map_or(0, |l| l.index);
    let last = m.last_log_index.unwrap_or(0);
    if last.saturating_sub(applied) > 64 {
        return Err(format!(
            "catching up: applied {applied} of {last} Raft entries (leader {leader})"
        ));
    }
    if m.state != ServerState::Leader {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let since = now.saturating_sub(replica.contact.at_ms.load(Ordering::Relaxed));
        let limit = 2 * raft.config().election_timeout_max;
        if since > limit {
            return Err(format!("no entries from leader {leader} for {since} ms"));
        }
        let commit = replica.contact.commit.load(Ordering::Relaxed);
        if applied + FOLLOWER_SLACK < commit {
            return Err(format!(
                "catching up: applied {applied} of the {commit} Raft entries leader {leader} committed"
            ));
        }
    }
    Ok(())
}

/// This replica's view of the cluster, as `/status` and `/v1/status` serve it (and
/// `medmesh ledger status` prints): role, leader, term, Raft indexes, and on the leader each
/// follower's lag.
pub fn status(
    replica: Option<&Replica>,
    tree_size: u64,
    checkpoint_size: Option<u64>,
) -> LedgerStatus {
    let Some(replica) = replica else {
        return LedgerStatus {
            replicated: false,
            ready: checkpoint_size.is_some(),
            not_ready: checkpoint_size
                .is_none()
                .then(|| "no checkpoint yet".to_owned()),
            tree_size,
            checkpoint_size,
            ..LedgerStatus::default()
        };
    };
    let m = replica.raft.metrics().borrow().clone();
    let last = m.last_log_index.unwrap_or(0);
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let not_ready = match ready(replica) {
        Ok(()) => checkpoint_size
            .is_none()
            .then(|| "no checkpoint yet".to_owned()),
        Err(e) => Some(e),
    };
    LedgerStatus {
        replicated: true,
        id: Some(m.id),
        state: Some(format!("{:?}", m.state)),
        leader: m.current_leader,
        term: Some(m.current_term),
        last_log_index: m.last_log_index,
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        members: membership
            .nodes()
            .map(|(id, n)| MemberStatus {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect(),
        followers: m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, matched)| {
                let at = matched.map_or(0, |l| l.index);
                FollowerStatus {
                    id: *id,
                    matched: at,
                    lag: last.saturating_sub(at),
                }
            })
            .collect(),
        ready: not_ready.is_none(),
        not_ready,
        tree_size,
        checkpoint_size,
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

/// Mirrors Raft's own metrics into Prometheus.
fn spawn_metrics(raft: Raft, registry: &Registry, me: NodeId) {
    let gauge = |name: &str, help: &str| {
        let g = must(IntGauge::new(name, help));
        must(registry.register(Box::new(g.clone())));
        g
    };
    let term = gauge("medmesh_ledger_raft_term", "Current Raft term");
    let leader = gauge(
        "medmesh_ledger_raft_is_leader",
        "1 when this replica is the Raft leader",
    );
    let has_leader = gauge(
        "medmesh_ledger_raft_has_leader",
        "1 when this replica knows a Raft leader",
    );
    let last_log = gauge(
        "medmesh_ledger_raft_last_log_index",
        "Index of the last entry in this replica's Raft log",
    );
    let applied = gauge(
        "medmesh_ledger_raft_applied_index",
        "Index of the last Raft entry applied to the ledger",
    );
    let snapshot = gauge(
        "medmesh_ledger_raft_snapshot_index",
        "Index of the last Raft entry covered by this replica's snapshot",
    );
    let changes = must(IntCounter::new(
        "medmesh_ledger_raft_leader_changes_total",
        "Times this replica saw the Raft leader change",
    ));
    must(registry.register(Box::new(changes.clone())));
    let lag = must(IntGaugeVec::new(
        Opts::new(
            "medmesh_ledger_raft_follower_lag_entries",
            "On the leader: Raft entries each follower has yet to replicate",
        ),
        &["follower"],
    ));
    must(registry.register(Box::new(lag.clone())));
    let mut rx = raft.metrics();
    tokio::spawn(async move {
        let mut known_leader = None;
        loop {
            {
                let m = rx.borrow_and_update();
                term.set(m.current_term as i64);
                leader.set(i64::from(m.current_leader == Some(me)));
                has_leader.set(i64::from(m.current_leader.is_some()));
                if m.current_leader.is_some() && m.current_leader != known_leader {
                    if known_leader.is_some() {
                        changes.inc();
                    }
                    known_leader = m.current_leader;
                }
                let last = m.last_log_index.unwrap_or(0);
                last_log.set(last as i64);
                applied.set(m.last_applied.map_or(0, |l| l.index) as i64);
                snapshot.set(m.snapshot.map_or(0, |l| l.index) as i64);
                lag.reset();
                if let Some(rep) = &m.replication {
                    for (id, matched) in rep {
                        if *id != me {
                            let at = matched.map_or(0, |l| l.index);
                            lag.with_label_values(&[&id.to_string()])
                                .set(last.saturating_sub(at) as i64);
                        }
                    }
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}
