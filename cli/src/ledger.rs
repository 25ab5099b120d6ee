//! `medmesh ledger ...`: every command verifies what the ledger says against the trusted
//! checkpoint kept locally, and fails loudly on a rollback, fork or bad proof.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use medmesh_core::merkle::{self, Hash};
use medmesh_core::tls::{Identity, ServerIdentity, TrustBundle};
use medmesh_core::{NoteVerifier, SpiffeId, TrustDomain};
use medmesh_ledger_client::{LedgerClient, LedgerClientConfig, ProvenEntry, TrustedStore};

#[derive(clap::Args)]
pub struct LedgerArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
pub(crate) struct Conn {
    /// Ledger API base URL.
    #[arg(
        long,
        env = "MEDMESH_LEDGER_URL",
        global = true,
        default_value = "https://127.0.0.1:8443"
    )]
    pub(crate) url: String,
    /// Client certificate chain (PEM X.509-SVID).
    #[arg(long, env = "MEDMESH_CERT", global = true)]
    pub(crate) cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "MEDMESH_KEY", global = true)]
    pub(crate) key: Option<PathBuf>,
    /// Trust bundle (PEM).
    #[arg(long, env = "MEDMESH_CA", global = true)]
    pub(crate) ca: Option<PathBuf>,
    /// Trust domain.
    #[arg(
        long,
        env = "MEDMESH_TRUST_DOMAIN",
        global = true,
        default_value = "medmesh.local"
    )]
    pub(crate) trust_domain: String,
    /// Expected SPIFFE ID of the ledger (default: any identity of the trust domain).
    #[arg(long, env = "MEDMESH_LEDGER_ID", global = true)]
    pub(crate) ledger_id: Option<String>,
    /// The ledger's checkpoint verifier key (`name+id+key`), or `@FILE`.
    #[arg(long, env = "MEDMESH_LEDGER_KEY", global = true)]
    pub(crate) verifier_key: Option<String>,
    /// Log origin (default: the verifier key's name).
    #[arg(long, env = "MEDMESH_LEDGER_ORIGIN", global = true)]
    pub(crate) origin: Option<String>,
    /// File holding the last trusted checkpoint.
    #[arg(long, env = "MEDMESH_LEDGER_STATE", global = true)]
    pub(crate) state: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Fetch the latest checkpoint, verify its signature and its consistency with the trusted
    /// one, then trust it.
    Checkpoint,
    /// Show the replica's view: its Raft role, leader, term, indexes and, on the leader, each
    /// follower's lag (operational, unsigned; trusts nothing).
    Status,
    /// Fetch one entry and verify it is in the trusted checkpoint.
    Get {
        /// Entry index.
        index: u64,
    },
    /// Verify the inclusion of an entry (by index or leaf hash) in the trusted checkpoint.
    Prove {
        /// Entry index.
        index: Option<u64>,
        /// Leaf hash (hex) instead of an index.
        #[arg(long, conflicts_with = "index")]
        leaf: Option<String>,
    },
    /// Search an index; every hit's proof is verified.
    Search {
        /// SHA-256 of transferred bytes (hex).
        #[arg(long, group = "search_key")]
        sha256: Option<String>,
        /// IPFS CID.
        #[arg(long, group = "search_key")]
        cid: Option<String>,
        /// Workload SPIFFE ID.
        #[arg(long, group = "search_key")]
        identity: Option<String>,
        /// Keyed hash of a Study/Series/SOP Instance UID (hex).
        #[arg(long, group = "search_key")]
        uid: Option<String>,
    },
    /// Hash a file (for DICOM Part 10 files, also its data set as DIMSE carries it), find its
    /// records and verify their proofs. Fails when no record matches.
    VerifyFile {
        /// The file.
        file: PathBuf,
        /// The namespace's UID key: when the file matches no record, look for an archived
        /// original of its SOP instance.
        #[arg(long, env = "MEDMESH_AUDIT_KEY")]
        uid_key: Option<PathBuf>,
    },
    /// Download every entry, rebuild the tree and compare it with the trusted checkpoint;
    /// report the first bad index.
    Audit {
        /// Inclusion proofs to spot-check (0 = none; at least the log size = all).
        #[arg(long, default_value_t = 256)]
        proofs: u64,
    },
}

fn read_verifier(v: &str) -> anyhow::Result<NoteVerifier> {
    let text = match v.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("read verifier key {path}"))?
        }
        None => v.to_owned(),
    };
    Ok(NoteVerifier::parse(text.trim())?)
}

pub(crate) fn client(conn: &Conn) -> anyhow::Result<(LedgerClient, TrustedStore, String)> {
    let need = |o: &Option<PathBuf>, flag: &str| -> anyhow::Result<PathBuf> {
        o.clone().with_context(|| {
            format!(
                "--{flag} is required (or set MEDMESH_{})",
                flag.to_uppercase()
            )
        })
    };
    let cert = need(&conn.cert, "cert")?;
    let key = need(&conn.key, "key")?;
    let ca = need(&conn.ca, "ca")?;
    let identity = Identity::from_pem(
        &std::fs::read(&cert).with_context(|| format!("read {}", cert.display()))?,
        &std::fs::read(&key).with_context(|| format!("read {}", key.display()))?,
    )?;
    let td = TrustDomain::new(&conn.trust_domain)?;
    let bundle = TrustBundle::from_pem(
        &std::fs::read(&ca).with_context(|| format!("read {}", ca.display()))?,
        td,
    )?;
    let verifier = read_verifier(
        conn.verifier_key
            .as_deref()
            .context("--verifier-key is required (or set MEDMESH_LEDGER_KEY)")?,
    )?;
    let origin = conn
        .origin
        .clone()
        .unwrap_or_else(|| verifier.name().to_owned());
    let server = match &conn.ledger_id {
        Some(id) => ServerIdentity::Exact(id.parse::<SpiffeId>()?),
        None => ServerIdentity::AnyInTrustDomain,
    };
    let state = match &conn.state {
        Some(p) => p.clone(),
        None => {
            let base = std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
                .unwrap_or_else(|| PathBuf::from("."));
            let safe: String = origin
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            base.join("medmesh").join(format!("{safe}.checkpoint"))
        }
    };
    let client = LedgerClient::new(LedgerClientConfig {
        url: conn.url.clone(),
        identity,
        bundle,
        server,
        verifier,
        origin: origin.clone(),
        timeout: Duration::from_secs(30),
    })?;
    Ok((client, TrustedStore::new(state), origin))
}

fn print_entry(p: &ProvenEntry, size: u64) {
    let json = serde_json::to_string(&p.entry).unwrap_or_default();
    println!(
        "entry {} leaf={} verified in checkpoint size={size} ({} proof hashes)",
        p.index,
        p.leaf_hash,
        p.proof.len()
    );
    println!("{json}");
}

/// The text `medmesh ledger status` prints.
fn status_text(s: &medmesh_core::wire::LedgerStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let ready = match &s.not_ready {
        None => "ready".to_owned(),
        Some(why) => format!("NOT READY: {why}"),
    };
    let cp = s
        .checkpoint_size
        .map_or_else(|| "none".to_owned(), |c| c.to_string());
    if !s.replicated {
        let _ = writeln!(
            out,
            "single node; tree size {}, checkpoint {cp}; {ready}",
            s.tree_size
        );
        return out;
    }
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let _ = writeln!(
        out,
        "replica {} ({}) of {}; leader {}, term {}; Raft log {}, applied {}, snapshot {}; tree size {}, checkpoint {cp}; {ready}",
        opt(s.id),
        s.state.as_deref().unwrap_or("?"),
        s.members.len(),
        opt(s.leader),
        opt(s.term),
        opt(s.last_log_index),
        opt(s.applied_index),
        opt(s.snapshot_index),
        s.tree_size,
    );
    for m in &s.members {
        let progress = s
            .followers
            .iter()
            .find(|f| f.id == m.id)
            .map(|f| format!(", matched {} (lag {})", f.matched, f.lag))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  member {} {} {}{progress}",
            m.id,
            m.addr,
            if m.voter { "voter" } else { "learner" }
        );
    }
    out
}

pub async fn run(args: LedgerArgs) -> anyhow::Result<ExitCode> {
    let (client, store, _origin) = client(&args.conn)?;
    if let Cmd::Status = args.cmd {
        let s = client.status().await?;
        print!("{}", status_text(&s));
        return Ok(if s.ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    // Every command first moves the trusted state forward; a rollback or fork stops it here.
    let update = client.update_trusted(&store).await?;
    let cp = update.new.checkpoint.clone();
    match args.cmd {
        Cmd::Status => unreachable!("answered above"),
        Cmd::Checkpoint => {
            match &update.old {
                Some(old) => println!(
                    "checkpoint size={} root={} consistent with trusted size={} (state: {})",
                    cp.size,
                    cp.root,
                    old.checkpoint.size,
                    store.path().display()
                ),
                None => println!(
                    "checkpoint size={} root={} trusted on first use (state: {})",
                    cp.size,
                    cp.root,
                    store.path().display()
                ),
            }
            print!("{}", update.new.note);
        }
        Cmd::Get { index } => {
            anyhow::ensure!(
                index < cp.size,
                "entry {index} is not in the trusted checkpoint of size {}",
                cp.size
            );
            let p = client.prove_entry(index, &cp).await?;
            print_entry(&p, cp.size);
        }
        Cmd::Prove { index, leaf } => {
            let view = match (index, leaf) {
                (Some(i), None) => client.inclusion_proof(i, cp.size).await?,
                (None, Some(h)) => {
                    client
                        .inclusion_proof_by_leaf(&Hash::from_hex(&h)?, cp.size)
                        .await?
                }
                _ => anyhow::bail!("give an index or --leaf"),
            };
            merkle::verify_inclusion(&view.leaf_hash, view.index, cp.size, &view.proof, &cp.root)
                .with_context(|| format!("inclusion proof of entry {} does not verify", view.index))?;
            // Also check that the entry's bytes are the leaf the proof is for.
            let p = client.prove_entry(view.index, &cp).await?;
            println!(
                "entry {} leaf={} is included in checkpoint size={} root={} ({} proof hashes): OK",
                p.index,
                p.leaf_hash,
                cp.size,
                cp.root,
                p.proof.len()
            );
        }
        Cmd::Search {
            sha256,
            cid,
            identity,
            uid,
        } => {
            let (key, value) = match (sha256, cid, identity, uid) {
                (Some(v), None, None, None) => ("sha256", v),
                (None, Some(v), None, None) => ("cid", v),
                (None, None, Some(v), None) => ("identity", v),
                (None, None, None, Some(v)) => ("uid", v),
                _ => anyhow::bail!("give one of --sha256, --cid, --identity, --uid"),
            };
            let (scp, hits, truncated) = client.search(key, &value).await?;
            check_related(&client, &cp, &scp.checkpoint).await?;
            for h in &hits {
                print_entry(h, scp.checkpoint.size);
            }
            println!(
                "{} hits{}",
                hits.len(),
                if truncated { " (truncated)" } else { "" }
            );
        }
        Cmd::VerifyFile { file, uid_key } => {
            if verify_file(&client, &cp, &file, uid_key.as_deref()).await? == 0 {
                return Ok(ExitCode::from(2));
            }
        }
        Cmd::Audit { proofs } => {
            let report = client.audit(&cp, proofs).await?;
            println!(
                "audited {} entries against checkpoint size={} root={}; rebuilt root={}; {} inclusion proofs checked",
                report.entries, cp.size, cp.root, report.rebuilt_root, report.proofs_checked
            );
            if report.ok() {
                println!("audit OK");
            } else {
                for p in &report.problems {
                    println!("PROBLEM at entry {}: {}", p.index, p.what);
                }
                match report.first_bad {
                    Some(i) => println!("audit FAILED: first bad index {i}"),
                    None => println!("audit FAILED"),
                }
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks that the checkpoint a search answered from and the trusted one are the same log: the
/// newer must extend the older (the search may race a newer or an older checkpoint).
pub(crate) async fn check_related(
    client: &LedgerClient,
    trusted: &medmesh_core::Checkpoint,
    answered: &medmesh_core::Checkpoint,
) -> anyhow::Result<()> {
    if answered.size >= trusted.size {
        client.check_extends(trusted, answered).await?;
    } else {
        client.check_extends(answered, trusted).await?;
    }
    Ok(())
}

/// Hashes `file` (whole, and for DICOM Part 10 files its data set as DIMSE carries it), finds the
/// ledger records with those hashes and verifies their proofs. Returns how many matched; prints
/// `NOT RECORDED` when none did.
pub async fn verify_file(
    client: &LedgerClient,
    cp: &medmesh_core::Checkpoint,
    file: &std::path::Path,
    uid_key: Option<&std::path::Path>,
) -> anyhow::Result<usize> {
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let mut digests = vec![("file", merkle::sha256(&bytes))];
    if let Some(p10) = medmesh_core::dicom::split_part10(&bytes)? {
        digests.push(("data set", merkle::sha256(p10.dataset)));
    }
    let mut found = 0;
    for (what, d) in &digests {
        let (scp, hits, _) = client.search("sha256", &d.to_hex()).await?;
        check_related(client, cp, &scp.checkpoint).await?;
        for h in &hits {
            println!(
                "{what} sha256={d}: entry {} ({} {} -> {}, {}) verified in checkpoint size={}",
                h.index,
                h.entry.record.kind,
                h.entry.record.source,
                h.entry.record.destination,
                h.entry.record.outcome,
                scp.checkpoint.size
            );
        }
        found += hits.len();
    }
    if found == 0 {
        println!(
            "NOT RECORDED: no ledger entry has the hash of {} ({}); the file differs from every transfer the ledger recorded",
            file.display(),
            digests
                .iter()
                .map(|(w, d)| format!("{w} sha256={d}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        archived_hint(client, cp, &bytes, file, uid_key).await?;
    } else {
        println!("verified: {found} record(s) match {}", file.display());
    }
    Ok(found)
}

/// After a mismatch: whether the ledger holds an archived original of the file's SOP instance,
/// and how to restore it.
async fn archived_hint(
    client: &LedgerClient,
    cp: &medmesh_core::Checkpoint,
    bytes: &[u8],
    file: &std::path::Path,
    uid_key: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let Some(key_path) = uid_key else {
        println!(
            "  to look for an archived original of this instance, give --uid-key (the namespace's UID key)"
        );
        return Ok(());
    };
    let key = medmesh_core::record::UidKey::new(
        std::fs::read(key_path).with_context(|| format!("read {}", key_path.display()))?,
    )?;
    let Some(p) = medmesh_core::dicom::split_part10(bytes)? else {
        println!("  not a DICOM Part 10 file: no SOP instance to look up");
        return Ok(());
    };
    let ts = p
        .transfer_syntax
        .as_deref()
        .unwrap_or(medmesh_core::dicom::EXPLICIT_VR_LE);
    let Some(uid) = medmesh_core::dicom::dataset_text(p.dataset, ts, 0x0008, 0x0018) else {
        println!("  the file has no SOP Instance UID: no archived original to look up");
        return Ok(());
    };
    let keyed = key.hash_uid(&uid);
    let (scp, hits, _) = client.search("uid", &keyed.to_string()).await?;
    check_related(client, cp, &scp.checkpoint).await?;
    let archived = hits
        .iter()
        .filter(|h| {
            h.entry.record.kind == medmesh_core::record::EventKind::InstanceArchived
                && h.entry.record.sop_instance_uid == Some(keyed)
        })
        .max_by_key(|h| h.index);
    match archived {
        Some(h) => {
            let r = &h.entry.record;
            println!(
                "  ARCHIVED ORIGINAL: entry {} holds an encrypted copy of this SOP instance as received (sha256={}, cid {}), verified in checkpoint size={}",
                h.index,
                r.content_sha256.map(|s| s.to_hex()).unwrap_or_default(),
                r.cid.as_ref().map(ToString::to_string).unwrap_or_default(),
                scp.checkpoint.size
            );
            println!(
                "  restore it: medmesh archive restore {} --identity <archive identity> --gateway <archive gateway> --archive-id <archive id> --to-file {}.original",
                h.index,
                file.display()
            );
        }
        None => println!("  no archived original of this SOP instance is in the ledger"),
    }
    Ok(())
}
