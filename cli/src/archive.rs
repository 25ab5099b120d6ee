//! `medmesh archive get|restore`: an archived original, found through the ledger (every entry
//! proven against the trusted checkpoint), fetched by CID from the archive (the CID recomputed
//! from the bytes received), decrypted with the namespace's archive identity, and checked
//! against the SHA-256 the ledger recorded before anything is written or sent.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use medmesh_archive::{LocalStore, MeshEndpoint, MeshTls, Source, fetch_verified};
use medmesh_core::merkle::{self, Hash};
use medmesh_core::record::{EventKind, Protocol, UidKey};
use medmesh_core::seal::ArchiveKey;
use medmesh_core::tls::{Identity, TrustBundle};
use medmesh_core::{TrustDomain, dicom};
use medmesh_ledger_client::{LedgerClient, ProvenEntry};
use sha2::Digest as _;

#[derive(clap::Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    conn: crate::ledger::Conn,
    #[command(flatten)]
    src: SourceArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct SourceArgs {
    /// The archive's Kubo gateway (`http://host:port`), reached through the mesh with
    /// --cert/--key/--ca as a reader of the archive.
    #[arg(long, env = "MEDMESH_ARCHIVE_GATEWAY", global = true)]
    gateway: Option<String>,
    /// The archive's SPIFFE ID, pinned for the gateway (without it the gateway is reached in
    /// plaintext: loopback only).
    #[arg(long, env = "MEDMESH_ARCHIVE_ID", global = true)]
    archive_id: Option<String>,
    /// A local object store instead of a gateway (the demo's).
    #[arg(long, env = "MEDMESH_ARCHIVE_STORE", global = true)]
    store: Option<PathBuf>,
    /// The namespace's archive identity (age key file, `AGE-SECRET-KEY-1…`).
    #[arg(long = "identity", env = "MEDMESH_ARCHIVE_IDENTITY", global = true)]
    identity: Option<PathBuf>,
    /// The namespace's UID key: finds the archived original of a file that no longer matches
    /// any record, by its SOP Instance UID.
    #[arg(long, env = "MEDMESH_AUDIT_KEY", global = true)]
    uid_key: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Write the archived original of WHAT (a ledger index, a SHA-256, or a file) to --out, as
    /// a DICOM Part 10 file.
    Get {
        /// Ledger index, SHA-256 (64 hex digits), or the path of a file.
        what: String,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// Write the archived bytes as they were transferred (a DIMSE data set is not wrapped
        /// into a Part 10 file).
        #[arg(long)]
        raw: bool,
    },
    /// Send the archived original of WHAT back to a PACS (C-STORE or STOW-RS) or to a file.
    Restore {
        /// Ledger index, SHA-256 (64 hex digits), or the path of a file.
        what: String,
        /// Write it as a Part 10 file.
        #[arg(long, group = "to")]
        to_file: Option<PathBuf>,
        /// C-STORE it to `host:port`.
        #[arg(long, group = "to")]
        dicom: Option<String>,
        /// Calling AE title for --dicom.
        #[arg(long, default_value = "MEDMESH")]
        calling: String,
        /// Called AE title for --dicom.
        #[arg(long, default_value = "ANY-SCP")]
        called: String,
        /// STOW-RS it to this base URL (`http://host:port/dicom-web`).
        #[arg(long, group = "to")]
        stow: Option<String>,
        /// HTTP Basic user for --stow; the password is read from `MEDMESH_STOW_PASSWORD`
        /// (never from the command line, which other users can see).
        #[arg(long, requires = "stow", conflicts_with = "stow_token_file")]
        stow_user: Option<String>,
        /// A file holding a bearer token for --stow (OAuth 2 / OpenID Connect PACS).
        #[arg(long, requires = "stow")]
        stow_token_file: Option<PathBuf>,
    },
    /// Crypto-shredding: record in the ledger, then delete, the archive key of a namespace
    /// (the Secret `medmesh-archive-key`, through the current kubeconfig). Everything archived
    /// under it becomes unreadable forever; the ciphertexts stay in the archive. Needs an SVID
    /// the ledger accepts as an appender.
    Shred {
        /// The namespace whose key is destroyed.
        #[arg(long)]
        namespace: String,
        /// The `ImageArchive` the key served (default: the one the namespace's policies name).
        #[arg(long)]
        archive: Option<String>,
        /// Confirms without a prompt: must repeat the namespace.
        #[arg(long)]
        confirm: Option<String>,
    },
}

/// The `instance_archived` entry for `what`.
pub(crate) async fn find_archived(
    client: &LedgerClient,
    cp: &medmesh_core::Checkpoint,
    what: &str,
    uid_key: Option<&Path>,
) -> anyhow::Result<ProvenEntry> {
    let archived_of = |hits: Vec<ProvenEntry>, about: Option<medmesh_core::record::RecordId>| {
        hits.into_iter()
            .filter(|h| h.entry.record.kind == EventKind::InstanceArchived)
            .filter(|h| about.is_none() || h.entry.record.archived_record == about)
            .max_by_key(|h| h.index)
    };
    let by_sha = |sha: Hash, about| async move {
        let (scp, hits, _) = client.search("sha256", &sha.to_hex()).await?;
        crate::ledger::check_related(client, cp, &scp.checkpoint).await?;
        anyhow::Ok(archived_of(hits, about))
    };
    if let Ok(index) = what.parse::<u64>() {
        let e = client.prove_entry(index, cp).await?;
        let r = &e.entry.record;
        if r.kind == EventKind::InstanceArchived {
            return Ok(e);
        }
        let sha = r
            .content_sha256
            .with_context(|| format!("entry {index} ({}) records no content", r.kind))?;
        return by_sha(sha, Some(r.record_id)).await?.with_context(|| {
            format!(
                "entry {index} ({}) has no archived copy in the ledger",
                r.kind
            )
        });
    }
    if what.len() == 64 && what.bytes().all(|b| b.is_ascii_hexdigit()) {
        let sha = Hash::from_hex(what)?;
        return by_sha(sha, None)
            .await?
            .with_context(|| format!("no archived instance has sha256={what}"));
    }
    let file = Path::new(what);
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let p10 = dicom::split_part10(&bytes)?;
    let mut digests = vec![merkle::sha256(&bytes)];
    if let Some(p) = &p10 {
        digests.push(merkle::sha256(p.dataset));
    }
    for d in digests {
        if let Some(e) = by_sha(d, None).await? {
            return Ok(e);
        }
    }
    // The file matches no record: look for the archived original of the same instance.
    let Some(key_path) = uid_key else {
        anyhow::bail!(
            "{} matches no archived instance; give --uid-key (the namespace's UID key) to find the original of the same SOP instance",
            file.display()
        );
    };
    let key = UidKey::new(
        std::fs::read(key_path).with_context(|| format!("read {}", key_path.display()))?,
    )?;
    let p = p10.with_context(|| format!("{} is not a DICOM Part 10 file", file.display()))?;
    let ts = p
        .transfer_syntax
        .as_deref()
        .unwrap_or(dicom::EXPLICIT_VR_LE);
    let uid = dicom::dataset_text(p.dataset, ts, 0x0008, 0x0018)
        .with_context(|| format!("{} has no SOP Instance UID", file.display()))?;
    let keyed = key.hash_uid(&uid);
    let (scp, hits, _) = client.search("uid", &keyed.to_string()).await?;
    crate::ledger::check_related(client, cp, &scp.checkpoint).await?;
    let e = hits
        .into_iter()
        .filter(|h| {
            h.entry.record.kind == EventKind::InstanceArchived
                && h.entry.record.sop_instance_uid == Some(keyed)
        })
        .max_by_key(|h| h.index)
        .with_context(|| {
            format!(
                "{} differs from every recorded transfer, and no archived copy of its SOP instance is in the ledger",
                file.display()
            )
        })?;
    println!(
        "{} differs from every recorded transfer; the ledger holds an archived original of the same SOP instance",
        file.display()
    );
    Ok(e)
}

fn source(conn: &crate::ledger::Conn, src: &SourceArgs) -> anyhow::Result<Source> {
    match (&src.gateway, &src.store) {
        (Some(_), Some(_)) => anyhow::bail!("give --gateway or --store, not both"),
        (None, None) => {
            anyhow::bail!("give the archive: --gateway URL (with --archive-id) or --store DIR")
        }
        (None, Some(dir)) => Ok(Source::Store(LocalStore::open(dir)?)),
        (Some(url), None) => {
            let tls = match &src.archive_id {
                None => None,
                Some(id) => {
                    let need = |o: &Option<PathBuf>, flag: &str| {
                        o.clone()
                            .with_context(|| format!("--{flag} is required with --archive-id"))
                    };
                    let (cert, key, ca) = (
                        need(&conn.cert, "cert")?,
                        need(&conn.key, "key")?,
                        need(&conn.ca, "ca")?,
                    );
                    Some(MeshTls {
                        identity: Identity::from_pem(
                            &std::fs::read(&cert)?,
                            &std::fs::read(&key)?,
                        )?,
                        bundle: TrustBundle::from_pem(
                            &std::fs::read(&ca)?,
                            TrustDomain::new(&conn.trust_domain)?,
                        )?,
                        server: id.parse()?,
                    })
                }
            };
            Ok(Source::Gateway(MeshEndpoint::new(
                url,
                tls.as_ref(),
                Duration::from_secs(60),
            )?))
        }
    }
}

/// What was recovered: the verified plaintext in a file next to the destination.
pub(crate) struct Recovered {
    plaintext: PathBuf,
    len: u64,
}

impl Drop for Recovered {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.plaintext);
    }
}

/// Fetches, verifies and decrypts the object of `e` into a temporary file beside `near`.
pub(crate) async fn recover(
    e: &ProvenEntry,
    src: &Source,
    identity: &Path,
    near: &Path,
) -> anyhow::Result<Recovered> {
    let r = &e.entry.record;
    let cid = r.cid.clone().context("the archived record names no CID")?;
    let sha = r
        .content_sha256
        .context("the archived record names no plaintext hash")?;
    let dir = near
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tag = hex::encode(&r.record_id.0[..8]);
    let cipher = dir.join(format!(".medmesh-{tag}.age"));
    let plain = dir.join(format!(".medmesh-{tag}.plain"));
    let got = fetch_verified(src, &cid, &cipher).await;
    let n = match got {
        Ok(n) => n,
        Err(err) => anyhow::bail!("fetching {cid}: {err}"),
    };
    println!("fetched {cid}: the CID recomputed from the {n} bytes received matches the ledger's");
    let result = (|| -> anyhow::Result<Recovered> {
        anyhow::ensure!(
            n == r.bytes,
            "the archived object is {n} bytes; the ledger recorded {}",
            r.bytes
        );
        let key_text = std::fs::read_to_string(identity).with_context(|| {
            format!(
                "read the archive identity {} (if the namespace's archive key was shredded, nothing archived under it can be decrypted)",
                identity.display()
            )
        })?;
        let key: ArchiveKey = key_text.parse()?;
        let input = std::fs::File::open(&cipher)?;
        let mut reader = medmesh_core::seal::open(std::io::BufReader::new(input), &key)
            .map_err(|err| anyhow::anyhow!("cannot decrypt {cid} with {}: {err} (the object was sealed to other keys; a shredded key cannot be replaced)", identity.display()))?;
        let mut recovered = Recovered {
            plaintext: plain.clone(),
            len: 0,
        };
        let mut out = std::fs::File::create(&plain)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut len = 0u64;
        loop {
            let k = reader.read(&mut buf).with_context(|| {
                format!("decrypting {cid}: the ciphertext does not authenticate")
            })?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])?;
            len += k as u64;
        }
        out.sync_all()?;
        let got = Hash(h.finalize().into());
        anyhow::ensure!(
            got == sha,
            "decrypted {len} bytes hash to {got}, not the ledger's {sha}: refused"
        );
        println!(
            "decrypted with {}: sha256={got} equals the ledger's record",
            identity.display()
        );
        recovered.len = len;
        Ok(recovered)
    })();
    let _ = std::fs::remove_file(&cipher);
    result
}

/// Writes the recovered instance to `out`: as archived (`raw`, or already Part 10), or a DIMSE
/// data set wrapped into a Part 10 file.
pub(crate) fn write_out(
    e: &ProvenEntry,
    rec: &Recovered,
    out: &Path,
    raw: bool,
) -> anyhow::Result<&'static str> {
    let r = &e.entry.record;
    let tmp = out.with_extension("medmesh-part");
    let mut dst =
        std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut src = std::fs::File::open(&rec.plaintext)?;
    let mut head = [0u8; 132];
    let n = src.read(&mut head)?;
    let is_part10 = n == 132 && &head[128..132] == b"DICM";
    let what = if raw || is_part10 || r.protocol != Protocol::Dimse {
        "as archived"
    } else {
        // The data set as DIMSE carried it: a new file meta group, as a storage SCP writes.
        let mut start = vec![0u8; rec.len.min(64 * 1024) as usize];
        let mut f = std::fs::File::open(&rec.plaintext)?;
        let k = f.read(&mut start)?;
        start.truncate(k);
        let ts = r
            .transfer_syntax_uid
            .as_ref()
            .map_or(dicom::EXPLICIT_VR_LE, |t| t.as_str());
        let class = r
            .sop_class_uid
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .or_else(|| dicom::dataset_text(&start, ts, 0x0008, 0x0016))
            .context("no SOP Class UID for the file meta group")?;
        let instance = dicom::dataset_text(&start, ts, 0x0008, 0x0018)
            .context("the data set has no SOP Instance UID")?;
        dst.write_all(&dicom::part10(&class, &instance, ts, &[]))?;
        "as a Part 10 file"
    };
    dst.write_all(&head[..n])?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(what)
}

pub async fn run(args: ArchiveArgs) -> anyhow::Result<ExitCode> {
    if let Cmd::Shred {
        namespace,
        archive,
        confirm,
    } = &args.cmd
    {
        return shred(
            &args.conn,
            namespace,
            archive.as_deref(),
            confirm.as_deref(),
        )
        .await;
    }
    let (client, store, _origin) = crate::ledger::client(&args.conn)?;
    let cp = client.update_trusted(&store).await?.new.checkpoint;
    let src = source(&args.conn, &args.src)?;
    let identity = args
        .src
        .identity
        .clone()
        .context("--identity (the namespace's archive identity file) is required")?;
    let what = match &args.cmd {
        Cmd::Get { what, .. } | Cmd::Restore { what, .. } => what.clone(),
        Cmd::Shred { .. } => unreachable!("handled above"),
    };
    let e = find_archived(&client, &cp, &what, args.src.uid_key.as_deref()).await?;
    let r = &e.entry.record;
    println!(
        "archived copy: entry {} (instance_archived by {} into {}, cid {}, {} bytes) verified in checkpoint size={} ({} proof hashes); archive of record {}",
        e.index,
        r.source,
        r.destination,
        r.cid.as_ref().map(ToString::to_string).unwrap_or_default(),
        r.bytes,
        cp.size,
        e.proof.len(),
        r.archived_record
            .map(|id| id.to_string())
            .unwrap_or_default(),
    );
    match args.cmd {
        Cmd::Get { out, raw, .. } => {
            let rec = recover(&e, &src, &identity, &out).await?;
            let how = write_out(&e, &rec, &out, raw)?;
            println!(
                "wrote {} ({} bytes recovered, {how})",
                out.display(),
                rec.len
            );
        }
        Cmd::Restore {
            to_file,
            dicom: scp,
            calling,
            called,
            stow,
            stow_user,
            stow_token_file,
            ..
        } => {
            // Credentials are checked before anything is fetched.
            let auth = stow_auth(stow_user.as_deref(), stow_token_file.as_deref())?;
            // Fetched and decrypted beside the file, or in a private temporary directory.
            let tmp = tempfile::tempdir()?;
            let near = to_file
                .clone()
                .unwrap_or_else(|| tmp.path().join("restore"));
            let rec = recover(&e, &src, &identity, &near).await?;
            if let Some(out) = to_file {
                let how = write_out(&e, &rec, &out, false)?;
                println!("restored to {} ({how})", out.display());
            } else if let Some(addr) = scp {
                let bytes = std::fs::read(&rec.plaintext)?;
                let item = if dicom::split_part10(&bytes)?.is_some() {
                    crate::dimse::StoreItem::from_part10(&bytes)?
                } else {
                    let ts = r
                        .transfer_syntax_uid
                        .as_ref()
                        .map_or(dicom::EXPLICIT_VR_LE, |t| t.as_str())
                        .to_owned();
                    let class = r.sop_class_uid.as_ref().map(|c| c.as_str().to_owned());
                    crate::dimse::StoreItem::from_dataset(bytes, &ts, class.as_deref())?
                };
                let statuses = tokio::task::spawn_blocking(move || {
                    crate::dimse::store(&addr, &calling, &called, &[item])
                })
                .await??;
                let status = statuses.first().copied().unwrap_or(0xFFFF);
                anyhow::ensure!(status == 0, "C-STORE answered status {status:04X}");
                println!("restored by C-STORE: status 0000");
            } else if let Some(base) = stow {
                let file = near.with_extension("medmesh-stow");
                write_out(&e, &rec, &file, false)?;
                let body = std::fs::read(&file);
                let _ = std::fs::remove_file(&file);
                let status = stow_rs(&base, body?, auth.as_deref()).await?;
                println!("restored by STOW-RS: HTTP {status}");
            } else {
                anyhow::bail!("give --to-file, --dicom or --stow");
            }
        }
        Cmd::Shred { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// The `Authorization` value for --stow: Basic from --stow-user and `MEDMESH_STOW_PASSWORD`,
/// or Bearer from --stow-token-file.
fn stow_auth(user: Option<&str>, token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    use base64::Engine as _;
    if let Some(user) = user {
        anyhow::ensure!(
            !user.contains(':'),
            "--stow-user cannot contain ':' (HTTP Basic)"
        );
        let password = std::env::var("MEDMESH_STOW_PASSWORD").map_err(|_| {
            anyhow::anyhow!("--stow-user {user}: set MEDMESH_STOW_PASSWORD to the password")
        })?;
        let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        return Ok(Some(format!("Basic {pair}")));
    }
    if let Some(f) = token_file {
        let token = std::fs::read_to_string(f)
            .with_context(|| format!("--stow-token-file {}", f.display()))?;
        let token = token.trim();
        anyhow::ensure!(
            !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()),
            "--stow-token-file {}: not a bearer token (empty, or spaces or control characters inside)",
            f.display()
        );
        return Ok(Some(format!("Bearer {token}")));
    }
    Ok(None)
}

/// POSTs one Part 10 file as a STOW-RS request to `base` (`http://host:port/<prefix>`), with
/// `auth` as its `Authorization` header.
async fn stow_rs(base: &str, file: Vec<u8>, auth: Option<&str>) -> anyhow::Result<u16> {
    use http_body_util::BodyExt as _;
    let uri: http::Uri = base.parse()?;
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().context("--stow needs host:port")?
    );
    let path = format!("{}/studies", uri.path().trim_end_matches('/'));
    let ep = MeshEndpoint::new(&origin, None, Duration::from_secs(60))?;
    // The CLI speaks plain HTTP (as a meshed application does: its sidecar adds mTLS). Sent
    // anywhere but this host, credentials are protected only by such a sidecar: say so.
    let local = uri.host().is_some_and(|h| {
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    if auth.is_some() && !local {
        eprintln!(
            "warning: the STOW-RS credentials go to {origin} in plaintext unless a medmesh sidecar intercepts this connection (run the restore from a meshed pod)"
        );
    }
    let boundary = hex::encode(medmesh_core::record::RecordId::random()?.0);
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let body = http_body_util::Full::new(bytes::Bytes::from(body))
        .map_err(|never| match never {})
        .boxed();
    let ct = format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let resp = ep
        .send_with(http::Method::POST, &path, Some(&ct), auth, body)
        .await?;
    let status = resp.status().as_u16();
    let answer = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status != 401 && status != 403,
        "STOW-RS to {base} answered HTTP {status}: {} (give the PACS's credentials: --stow-user with MEDMESH_STOW_PASSWORD, or --stow-token-file)",
        if auth.is_some() {
            "the credentials were refused"
        } else {
            "it needs credentials"
        }
    );
    anyhow::ensure!(
        status == 200,
        "STOW-RS to {base} answered HTTP {status}: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    Ok(status)
}

/// `medmesh dev archive-key`: a new key pair; the identity into `out` (0600, never replaced),
/// the recipient printed.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = ArchiveKey::generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("create {}", out.display()))?;
    f.write_all(format!("{}\n", key.to_secret_string()).as_bytes())?;
    f.sync_all()?;
    println!("{}", key.recipient());
    Ok(())
}

/// The `archive_key_shredded` record: this identity destroyed the key whose recipient hashes to
/// `content_sha256`, which served `archive`.
pub fn shred_record(
    me: &medmesh_core::SpiffeId,
    archive: &medmesh_core::SpiffeId,
    recipient: &str,
) -> anyhow::Result<medmesh_core::AuditRecord> {
    use medmesh_core::record::{Outcome, RecordId};
    let mut rec = medmesh_core::AuditRecord::event(
        RecordId::new()?,
        EventKind::ArchiveKeyShredded,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros() as u64,
        me.clone(),
        archive.clone(),
        Protocol::Opaque,
        Outcome::Success,
    );
    rec.content_sha256 = Some(merkle::sha256(recipient.as_bytes()));
    Ok(rec)
}

async fn shred(
    conn: &crate::ledger::Conn,
    namespace: &str,
    archive: Option<&str>,
    confirm: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, DeleteParams, ListParams, Preconditions};
    use medmesh_operator::names::{ARCHIVE_KEY_SECRET, ARCHIVE_RECIPIENT_KEY};
    let kube = kube::Client::try_default()
        .await
        .context("connect to the API server of the current kubeconfig")?;
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), namespace);
    let secret = secrets
        .get_opt(ARCHIVE_KEY_SECRET)
        .await?
        .with_context(|| format!("{namespace} has no archive key (Secret {ARCHIVE_KEY_SECRET})"))?;
    let recipient = secret
        .data
        .as_ref()
        .and_then(|d| d.get(ARCHIVE_RECIPIENT_KEY))
        .and_then(|v| std::str::from_utf8(&v.0).ok())
        .map(|s| s.trim().to_owned())
        .context("the archive key Secret has no recipient")?;
    let archive = match archive {
        Some(a) => a.to_owned(),
        None => {
            let policies: Api<medmesh_operator::crd::MeshPolicy> =
                Api::namespaced(kube.clone(), namespace);
            let names: std::collections::BTreeSet<String> = policies
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter_map(|p| p.spec.audit?.archive.map(|a| a.archive_ref.name))
                .collect();
            match names.len() {
                1 => names.into_iter().next().unwrap_or_default(),
                0 => anyhow::bail!("no MeshPolicy of {namespace} archives: give --archive"),
                _ => anyhow::bail!(
                    "the policies of {namespace} name several archives {names:?}: give --archive"
                ),
            }
        }
    };
    let td = TrustDomain::new(&conn.trust_domain)?;
    let archive_id = td.workload(namespace, &archive)?;
    println!(
        "This destroys the archive key of namespace {namespace} (recipient {recipient}): everything archived under it into {archive_id} becomes unreadable, forever."
    );
    let typed = match confirm {
        Some(c) => c.to_owned(),
        None => {
            print!("Type the namespace to confirm: ");
            std::io::stdout().flush()?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim().to_owned()
        }
    };
    anyhow::ensure!(typed == namespace, "not confirmed: nothing was changed");
    // Recorded first: a key is never destroyed without the ledger saying so.
    let (client, _store, _origin) = crate::ledger::client(conn)?;
    let me = Identity::from_pem(
        &std::fs::read(conn.cert.as_ref().context("--cert is required")?)?,
        &std::fs::read(conn.key.as_ref().context("--key is required")?)?,
    )?
    .id()
    .clone();
    let rec = shred_record(&me, &archive_id, &recipient)?;
    let appended = client
        .append(&rec, true)
        .await
        .context("record the shredding in the ledger (is this identity an appender?)")?;
    println!(
        "recorded: entry {} (archive_key_shredded by {me}, key sha256={})",
        appended.result.index,
        merkle::sha256(recipient.as_bytes())
    );
    // Only the Secret that was read and recorded: a newer key is never deleted by mistake.
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: secret.metadata.uid.clone(),
            resource_version: secret.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    secrets.delete(ARCHIVE_KEY_SECRET, &dp).await.with_context(|| {
        format!(
            "the ledger records the shredding (entry {}) but Secret {namespace}/{ARCHIVE_KEY_SECRET} could not be deleted: delete it by hand",
            appended.result.index
        )
    })?;
    println!(
        "deleted Secret {namespace}/{ARCHIVE_KEY_SECRET}: the archive key is gone; the operator makes a new one for what is archived next"
    );
    Ok(ExitCode::SUCCESS)
}
