//! Client of the medmesh audit ledger.
//!
//! The client trusts the ledger for nothing it can check itself: it verifies checkpoint
//! signatures, recomputes leaf hashes from the entry bytes it receives, verifies every proof with
//! `medmesh-core`, and keeps the last checkpoint it accepted in a [`TrustedStore`] so that a
//! rolled-back or forked log is detected on the next update.
//!
//! Appends are traced: each is a `ledger.append` client span (`medmesh.records`, `url.path`,
//! `http.response.status_code`) under the caller's current span, and its W3C Trace Context
//! goes along in `traceparent`, so the ledger's spans join the caller's trace.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use medmesh_core::merkle::{self, Frontier, Hash, ProofError};
use medmesh_core::record::{AuditRecord, LogEntry};
use medmesh_core::tls::{self, Identity, ServerIdentity, TrustBundle};
use medmesh_core::wire::{
    AppendResponse, BatchResponse, ConsistencyView, EntryView, ErrorBody, InclusionView,
    RangeResponse, SearchResponse,
};
use medmesh_core::{Checkpoint, NoteError, NoteVerifier};
use tracing::Instrument as _;

/// The client span of one append request (see the module documentation).
fn append_span(path: &'static str, records: usize) -> tracing::Span {
    tracing::debug_span!(
        "ledger.append",
        otel.kind = "client",
        url.path = path,
        medmesh.records = records as u64,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Marks `span` failed; the error's kind only (messages may carry URLs, never identifiers, but
/// spans keep to bounded values).
fn failed(span: &tracing::Span, e: &ClientError) {
    span.record("otel.status_code", "error");
    let kind = match e {
        ClientError::Http { .. } => "transport",
        ClientError::Refused { .. } => "refused",
        _ => "invalid_response",
    };
    span.record("error.type", kind);
}

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request did not complete.
    #[error("ledger {url}: {reason}")]
    Http {
        /// Request URL.
        url: String,
        /// What failed: connecting, TLS, the exchange, a timeout.
        reason: String,
    },
    /// The ledger refused the request.
    #[error("ledger {url}: HTTP {status}: {message}")]
    Refused {
        /// Request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The ledger's message.
        message: String,
    },
    /// The answer is not what the API promises.
    #[error("ledger {url}: malformed response: {reason}")]
    Malformed {
        /// Request URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint did not verify.
    #[error("checkpoint rejected: {0}")]
    Checkpoint(#[from] NoteError),
    /// A proof did not verify.
    #[error("{what}: {source}")]
    Proof {
        /// Which proof.
        what: String,
        /// Why.
        source: ProofError,
    },
    /// The ledger now claims a smaller tree than one it signed before.
    #[error(
        "ROLLBACK: the ledger serves a checkpoint of size {got}, smaller than the trusted checkpoint of size {trusted}"
    )]
    Rollback {
        /// Trusted size.
        trusted: u64,
        /// Served size.
        got: u64,
    },
    /// The ledger's new checkpoint does not extend the trusted one.
    #[error(
        "FORK: checkpoint of size {new} does not extend the trusted checkpoint of size {trusted}: {reason}"
    )]
    Fork {
        /// Trusted size.
        trusted: u64,
        /// Served size.
        new: u64,
        /// Why.
        reason: String,
    },
    /// An entry's bytes disagree with the tree.
    #[error("entry {index}: {reason}")]
    Entry {
        /// Entry index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// Local state could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS material is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// How to reach and trust a ledger.
#[derive(Debug, Clone)]
pub struct LedgerClientConfig {
    /// Base URL, e.g. `https://127.0.0.1:8443`.
    pub url: String,
    /// The client's own SVID.
    pub identity: Identity,
    /// The mesh trust bundle.
    pub bundle: TrustBundle,
    /// Which server identity to accept.
    pub server: ServerIdentity,
    /// The ledger's checkpoint verifier key.
    pub verifier: NoteVerifier,
    /// The ledger's origin.
    pub origin: String,
    /// Timeout of one request.
    pub timeout: Duration,
}

/// A verified checkpoint and its signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// Its note, as signed.
    pub note: String,
}

/// An entry whose inclusion in a checkpoint was verified.
#[derive(Debug, Clone)]
pub struct ProvenEntry {
    /// Index.
    pub index: u64,
    /// Leaf hash (recomputed from the bytes).
    pub leaf_hash: Hash,
    /// The decoded entry.
    pub entry: LogEntry,
    /// The inclusion proof that verified.
    pub proof: Vec<Hash>,
}

/// Longest [`LedgerClient::update_trusted`] waits for a replica serving a checkpoint older than
/// the trusted one to catch up before reporting a rollback.
pub const STALE_REPLICA_WAIT: Duration = Duration::from_secs(3);

/// The append endpoints, indexed by `proof as usize`.
const APPEND_ONE: [&str; 2] = ["/v1/entries?proof=false", "/v1/entries?proof=true"];
const APPEND_BATCH: [&str; 2] = [
    "/v1/entries/batch?proof=false",
    "/v1/entries/batch?proof=true",
];

/// Largest answer read from a ledger: a page of 1000 entries with their proofs is a few MB.
const ANSWER_LIMIT: usize = 64 << 20;

/// A batch request that borrows its records (the client keeps them to check the leaves).
#[derive(serde::Serialize)]
struct BatchRef<'a> {
    records: &'a [AuditRecord],
}

/// Client of one ledger.
#[derive(Debug, Clone)]
pub struct LedgerClient {
    /// Kept-alive HTTP/1.1 connections to the ledger.
    http: medmesh_httpc::Endpoint,
    /// The base URL, for messages.
    base: String,
    /// Timeout of one request (its answer, then its body).
    timeout: Duration,
    verifier: NoteVerifier,
    origin: String,
    /// This client's SPIFFE ID: the submitter the ledger records for its appends.
    me: medmesh_core::SpiffeId,
}

impl LedgerClient {
    /// Builds a client.
    ///
    /// # Errors
    /// When the TLS configuration cannot be built.
    pub fn new(cfg: LedgerClientConfig) -> Result<Self, ClientError> {
        let base = cfg.url.trim_end_matches('/').to_owned();
        let bad = |reason: &str| ClientError::Malformed {
            url: cfg.url.clone(),
            reason: reason.to_owned(),
        };
        let (host, port) = medmesh_httpc::origin(&base, "https", "the scheme must be https")
            .map_err(|reason| bad(&reason))?;
        let tls = tls::client_config(
            Some(&cfg.identity),
            &cfg.bundle,
            cfg.server,
            // HTTP/1.1 keep-alive: every append is one small request answered once its entry
            // is durable, so HTTP/2's multiplexing buys nothing here, while its framing, flow
            // control and per-stream tasks cost both sides about a fifth of the CPU per
            // append (bench/ledger). A connection is kept per concurrent append.
            &[b"http/1.1"],
        )?;
        let http = medmesh_httpc::Endpoint::new(
            &host,
            port,
            Some(Arc::new(tls)),
            medmesh_httpc::Keep {
                max: 64,
                // The ledger closes an HTTP/1.1 connection idle for `API_HEADER_TIMEOUT`; one
                // given up sooner here is never picked just as the ledger closes it.
                idle_for: medmesh_core::wire::CLIENT_POOL_IDLE,
            },
        );
        Ok(Self {
            http,
            timeout: cfg.timeout,
            base,
            verifier: cfg.verifier,
            origin: cfg.origin,
            me: cfg.identity.id().clone(),
        })
    }

    /// The ledger's origin.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The full URL of `path` on this ledger, for messages.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `method path` with `body` (JSON) and the W3C Trace Context of the current span,
    /// and returns the answer's body, which must be a success.
    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, ClientError> {
        let url = || self.url(path);
        let http_err = |reason: String| ClientError::Http { url: url(), reason };
        let json = body.is_some();
        let body = bytes::Bytes::from(body.unwrap_or_default());
        let mut req = self
            .http
            .request(method, path, medmesh_httpc::full(body.clone()))
            .map_err(http_err)?;
        let headers = req.headers_mut();
        if json {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        medmesh_telemetry::inject(&tracing::Span::current(), headers);
        // Every request this client makes may be sent twice: reads are reads, and the ledger
        // answers a record it already holds with its entry. So a request whose kept-alive
        // connection was lost before any answer is sent once more, on a new connection.
        let again = medmesh_httpc::copy_with_body(&req, medmesh_httpc::full(body));
        let answer = self
            .http
            .call(req, Some(again), ANSWER_LIMIT, self.timeout)
            .await
            .map_err(http_err)?;
        let status = answer.status.as_u16();
        tracing::Span::current().record("http.response.status_code", status);
        if answer.status.is_success() {
            return Ok(answer.body);
        }
        let message = serde_json::from_slice::<ErrorBody>(&answer.body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&answer.body).into_owned());
        Err(ClientError::Refused {
            url: url(),
            status,
            message,
        })
    }

    /// `GET path`, its answer decoded from JSON.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.send(http::Method::GET, path, None).await?;
        self.decode(path, &body)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::Malformed {
            url: self.url(path),
            reason: e.to_string(),
        })
    }

    /// `POST path` with `value` as JSON, its answer decoded from JSON.
    async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        value: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(value).map_err(|e| ClientError::Malformed {
            url: self.url(path),
            reason: format!("request not encoded: {e}"),
        })?;
        let body = self.send(http::Method::POST, path, Some(body)).await?;
        self.decode(path, &body)
    }

    /// Appends one record; with `proof`, the answer carries a checkpoint and an inclusion proof,
    /// both verified here.
    ///
    /// # Errors
    /// When the ledger refuses, or a returned proof does not verify.
    pub async fn append(
        &self,
        record: &AuditRecord,
        proof: bool,
    ) -> Result<AppendResponse, ClientError> {
        let span = append_span("/v1/entries", 1);
        self.append_traced(record, proof)
            .instrument(span.clone())
            .await
            .inspect_err(|e| failed(&span, e))
    }

    async fn append_traced(
        &self,
        record: &AuditRecord,
        proof: bool,
    ) -> Result<AppendResponse, ClientError> {
        let path = APPEND_ONE[usize::from(proof)];
        let body: AppendResponse = self.post_json(path, record).await?;
        self.check_leaf(&body.result, record, path)?;
        if proof {
            self.check_append_proof(&body.result, body.checkpoint.as_deref(), path)?;
        }
        Ok(body)
    }

    /// Appends a batch of records (at most 1000).
    ///
    /// # Errors
    /// When the ledger refuses, or a returned proof does not verify.
    pub async fn append_batch(
        &self,
        records: Vec<AuditRecord>,
        proof: bool,
    ) -> Result<BatchResponse, ClientError> {
        let span = append_span("/v1/entries/batch", records.len());
        self.append_batch_traced(records, proof)
            .instrument(span.clone())
            .await
            .inspect_err(|e| failed(&span, e))
    }

    async fn append_batch_traced(
        &self,
        records: Vec<AuditRecord>,
        proof: bool,
    ) -> Result<BatchResponse, ClientError> {
        let path = APPEND_BATCH[usize::from(proof)];
        let body: BatchResponse = self
            .post_json(path, &BatchRef { records: &records })
            .await?;
        if body.results.len() != records.len() {
            return Err(ClientError::Malformed {
                url: self.url(path),
                reason: format!(
                    "{} results for {} records",
                    body.results.len(),
                    records.len()
                ),
            });
        }
        // Conflicted records were not stored: they carry no proof and another entry's leaf.
        for (r, rec) in body
            .results
            .iter()
            .zip(&records)
            .filter(|(r, _)| !r.conflict)
        {
            self.check_leaf(r, rec, path)?;
            if proof {
                self.check_append_proof(r, body.checkpoint.as_deref(), path)?;
            }
        }
        Ok(body)
    }

    /// The ledger's leaf must be the hash of the entry this client submitted: its record, its own
    /// SPIFFE ID and the receive time the ledger reports. Otherwise a proof would prove another
    /// entry.
    fn check_leaf(
        &self,
        r: &medmesh_core::wire::AppendResult,
        record: &AuditRecord,
        path: &str,
    ) -> Result<(), ClientError> {
        let leaf = merkle::leaf_hash(&LogEntry::encode_parts(r.received_us, &self.me, record));
        if leaf != r.leaf_hash {
            return Err(ClientError::Malformed {
                url: self.url(path),
                reason: format!(
                    "entry {} has leaf {} but the submitted record hashes to {leaf}",
                    r.index, r.leaf_hash
                ),
            });
        }
        Ok(())
    }

    fn check_append_proof(
        &self,
        r: &medmesh_core::wire::AppendResult,
        note: Option<&str>,
        path: &str,
    ) -> Result<(), ClientError> {
        let malformed = |reason: &str| ClientError::Malformed {
            url: self.url(path),
            reason: reason.to_owned(),
        };
        let note = note.ok_or_else(|| malformed("proof requested but no checkpoint returned"))?;
        let cp = Checkpoint::open(note, &self.verifier, &self.origin)?;
        let proof = r
            .inclusion_proof
            .as_ref()
            .ok_or_else(|| malformed("proof requested but none returned"))?;
        merkle::verify_inclusion(&r.leaf_hash, r.index, cp.size, proof, &cp.root).map_err(
            |source| ClientError::Proof {
                what: format!("inclusion of appended entry {}", r.index),
                source,
            },
        )
    }

    /// Fetches and verifies the latest checkpoint (signature and origin only).
    ///
    /// # Errors
    /// When the request fails or the signature does not verify.
    pub async fn checkpoint(&self) -> Result<VerifiedCheckpoint, ClientError> {
        let path = "/v1/checkpoint";
        let body = self.send(http::Method::GET, path, None).await?;
        let note = String::from_utf8(body.to_vec()).map_err(|e| ClientError::Malformed {
            url: self.url(path),
            reason: e.to_string(),
        })?;
        let checkpoint = Checkpoint::open(&note, &self.verifier, &self.origin)?;
        Ok(VerifiedCheckpoint { checkpoint, note })
    }

    /// The replica's own view of the ledger and its Raft cluster (`GET /v1/status`; readers
    /// only). Unsigned: for operations, not for trust.
    ///
    /// # Errors
    /// When the request fails.
    pub async fn status(&self) -> Result<medmesh_core::wire::LedgerStatus, ClientError> {
        self.get_json("/v1/status").await
    }

    /// Fetches one entry (unverified: see [`LedgerClient::prove_entry`]).
    ///
    /// # Errors
    /// When the request fails.
    pub async fn entry(&self, index: u64) -> Result<EntryView, ClientError> {
        self.get_json(&format!("/v1/entries/{index}")).await
    }

    /// Fetches entries `[start, end)` (at most 1000).
    ///
    /// # Errors
    /// When the request fails.
    pub async fn entries(&self, start: u64, end: u64) -> Result<RangeResponse, ClientError> {
        self.get_json(&format!("/v1/entries?start={start}&end={end}"))
            .await
    }

    /// Fetches an inclusion proof by index.
    ///
    /// # Errors
    /// When the request fails.
    pub async fn inclusion_proof(
        &self,
        index: u64,
        tree_size: u64,
    ) -> Result<InclusionView, ClientError> {
        self.get_json(&format!(
            "/v1/proof/inclusion?index={index}&tree_size={tree_size}"
        ))
        .await
    }

    /// Fetches an inclusion proof by leaf hash.
    ///
    /// # Errors
    /// When the request fails.
    pub async fn inclusion_proof_by_leaf(
        &self,
        leaf: &Hash,
        tree_size: u64,
    ) -> Result<InclusionView, ClientError> {
        self.get_json(&format!(
            "/v1/proof/inclusion?leaf_hash={leaf}&tree_size={tree_size}"
        ))
        .await
    }

    /// Fetches a consistency proof.
    ///
    /// # Errors
    /// When the request fails.
    pub async fn consistency_proof(
        &self,
        from: u64,
        to: u64,
    ) -> Result<ConsistencyView, ClientError> {
        self.get_json(&format!("/v1/proof/consistency?from={from}&to={to}"))
            .await
    }

    /// Searches one index (`sha256`, `cid`, `identity` or `uid`) and verifies every hit's proof
    /// against the returned checkpoint.
    ///
    /// # Errors
    /// When the request fails, the checkpoint or any proof does not verify.
    pub async fn search(
        &self,
        key: &str,
        value: &str,
    ) -> Result<(VerifiedCheckpoint, Vec<ProvenEntry>, bool), ClientError> {
        let path = format!("/v1/search?{key}={}", urlencode(value));
        let resp: SearchResponse = self.get_json(&path).await?;
        let checkpoint = Checkpoint::open(&resp.checkpoint, &self.verifier, &self.origin)?;
        let mut hits = Vec::with_capacity(resp.hits.len());
        for h in resp.hits {
            let proof = h
                .inclusion_proof
                .clone()
                .ok_or_else(|| ClientError::Malformed {
                    url: path.clone(),
                    reason: format!("hit {} has no proof", h.index),
                })?;
            let hit = verify_entry_view(&h, &proof, &checkpoint)?;
            if !matches_key(&hit.entry, key, value) {
                return Err(ClientError::Entry {
                    index: hit.index,
                    reason: format!("returned for {key}={value} but does not contain it"),
                });
            }
            hits.push(hit);
        }
        Ok((
            VerifiedCheckpoint {
                checkpoint,
                note: resp.checkpoint,
            },
            hits,
            resp.truncated,
        ))
    }

    /// Fetches entry `index` and its inclusion proof in `cp`, and verifies both.
    ///
    /// # Errors
    /// When anything does not verify.
    pub async fn prove_entry(
        &self,
        index: u64,
        cp: &Checkpoint,
    ) -> Result<ProvenEntry, ClientError> {
        let view = self.entry(index).await?;
        let proof = self.inclusion_proof(index, cp.size).await?;
        if proof.leaf_hash != view.leaf_hash {
            return Err(ClientError::Entry {
                index,
                reason: format!(
                    "the ledger reports leaf hash {} with the entry but {} with the proof",
                    view.leaf_hash, proof.leaf_hash
                ),
            });
        }
        verify_entry_view(&view, &proof.proof, cp)
    }

    /// Fetches the latest checkpoint, checks it extends the trusted one (consistency proof), and
    /// stores it as the new trusted state.
    ///
    /// # Errors
    /// [`ClientError::Rollback`] or [`ClientError::Fork`] when the log does not extend what was
    /// trusted; any verification or I/O failure.
    pub async fn update_trusted(&self, store: &TrustedStore) -> Result<TrustUpdate, ClientError> {
        let old = store.load(&self.verifier, &self.origin)?;
        let mut new = self.checkpoint().await?;
        if let Some(old) = &old {
            // Behind a Service, a replicated ledger's replica that is a few entries behind
            // serves an older checkpoint than one another replica served: give it time to
            // catch up before calling it a rollback (a rolled-back log never catches up).
            let deadline = std::time::Instant::now() + STALE_REPLICA_WAIT;
            while new.checkpoint.size < old.checkpoint.size && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
                new = self.checkpoint().await?;
            }
            self.check_extends(&old.checkpoint, &new.checkpoint).await?;
        }
        if old
            .as_ref()
            .is_none_or(|o| o.checkpoint.size < new.checkpoint.size)
        {
            store.save(&new.note)?;
        }
        Ok(TrustUpdate { old, new })
    }

    /// Verifies that `new` extends `old` with a consistency proof from the ledger.
    ///
    /// # Errors
    /// [`ClientError::Rollback`] or [`ClientError::Fork`].
    pub async fn check_extends(
        &self,
        old: &Checkpoint,
        new: &Checkpoint,
    ) -> Result<(), ClientError> {
        if new.size < old.size {
            return Err(ClientError::Rollback {
                trusted: old.size,
                got: new.size,
            });
        }
        let proof = if new.size == old.size || old.size == 0 {
            Vec::new()
        } else {
            self.consistency_proof(old.size, new.size).await?.proof
        };
        merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &proof).map_err(|e| {
            ClientError::Fork {
                trusted: old.size,
                new: new.size,
                reason: e.to_string(),
            }
        })
    }

    /// Downloads every entry up to `cp.size`, rebuilds the tree, and compares it with `cp`; then
    /// verifies `sample_proofs` inclusion proofs spread over the log (all of them when it is at
    /// least the size). On a mismatch, finds the first entry that diverges.
    ///
    /// # Errors
    /// Transport failures; divergences are reported in the [`AuditReport`], not as errors.
    pub async fn audit(
        &self,
        cp: &Checkpoint,
        sample_proofs: u64,
    ) -> Result<AuditReport, ClientError> {
        let mut frontier = Frontier::new();
        // Leaf hashes (32 bytes per entry) and a frontier snapshot every SNAPSHOT entries, from
        // which any prefix root is rebuilt in at most SNAPSHOT hashes during the bisection.
        const SNAPSHOT: u64 = 4096;
        let mut snapshots = vec![Frontier::new()];
        let mut leaves: Vec<Hash> = Vec::new();
        let mut problems = Vec::new();
        let mut next = 0u64;
        while next < cp.size {
            let end = (next + 1000).min(cp.size);
            let page = self.entries(next, end).await?;
            let mut expect = next;
            for v in &page.entries {
                if v.index != expect {
                    problems.push(AuditProblem {
                        index: expect,
                        what: format!(
                            "entry {expect} is missing (the ledger returned entry {} next)",
                            v.index
                        ),
                    });
                    break;
                }
                let bytes = B64.decode(&v.entry).map_err(|e| ClientError::Malformed {
                    url: format!("/v1/entries?start={next}"),
                    reason: format!("entry {}: {e}", v.index),
                })?;
                let leaf = merkle::leaf_hash(&bytes);
                if leaf != v.leaf_hash && problems.len() < 100 {
                    problems.push(AuditProblem {
                        index: v.index,
                        what: format!(
                            "entry {} hashes to {leaf} but the tree holds leaf {} for it",
                            v.index, v.leaf_hash
                        ),
                    });
                }
                if let Some(e) = &v.decode_error
                    && problems.len() < 100
                {
                    problems.push(AuditProblem {
                        index: v.index,
                        what: format!("entry {} does not decode: {e}", v.index),
                    });
                }
                frontier.push(leaf, |_| {});
                if frontier.size().is_multiple_of(SNAPSHOT) {
                    snapshots.push(frontier.clone());
                }
                leaves.push(leaf);
                expect += 1;
            }
            if expect != end {
                if problems.last().is_none_or(|p| p.index != expect) {
                    problems.push(AuditProblem {
                        index: expect,
                        what: format!(
                            "entry {expect} is missing: the ledger returned entries up to {}",
                            expect
                        ),
                    });
                }
                break;
            }
            next = end;
        }
        let complete = frontier.size() == cp.size;
        let root_matches = complete && frontier.root() == cp.root;
        let mut first_bad = None;
        if !root_matches {
            // Largest prefix the checkpoint vouches for: binary search with consistency proofs.
            let (mut good, mut bad) = (0u64, frontier.size() + 1);
            if complete {
                bad = cp.size;
            }
            while bad - good > 1 {
                let mid = good + (bad - good) / 2;
                let mut prefix = snapshots[(mid / SNAPSHOT) as usize].clone();
                for leaf in &leaves[prefix.size() as usize..mid as usize] {
                    prefix.push(*leaf, |_| {});
                }
                let ok = match self.consistency_proof(mid, cp.size).await {
                    Ok(p) => {
                        merkle::verify_consistency(mid, cp.size, &prefix.root(), &cp.root, &p.proof)
                            .is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    good = mid;
                } else {
                    bad = mid;
                }
            }
            first_bad = Some(good);
            problems.insert(
                0,
                AuditProblem {
                    index: good,
                    what: format!(
                        "first bad entry is {good}: entries 0..{good} match the signed checkpoint of size {}, \
                         entry {good} does not (root rebuilt from {} entries is {}, checkpoint root is {})",
                        cp.size,
                        frontier.size(),
                        frontier.root(),
                        cp.root
                    ),
                },
            );
        }
        // Proofs the ledger serves must verify against the same checkpoint.
        let mut proofs_checked = 0;
        if complete && cp.size > 0 {
            let step = (cp.size / sample_proofs.max(1)).max(1);
            let mut i = 0;
            while i < cp.size {
                proofs_checked += 1;
                match self.inclusion_proof(i, cp.size).await {
                    Ok(p) => {
                        if let Err(e) = merkle::verify_inclusion(
                            &leaves[i as usize],
                            i,
                            cp.size,
                            &p.proof,
                            &cp.root,
                        ) {
                            problems.push(AuditProblem {
                                index: i,
                                what: format!("the ledger's inclusion proof for entry {i} does not verify: {e}"),
                            });
                        }
                    }
                    Err(e) => problems.push(AuditProblem {
                        index: i,
                        what: format!("no inclusion proof for entry {i}: {e}"),
                    }),
                }
                i += step;
            }
        }
        problems.sort_by_key(|p| p.index);
        Ok(AuditReport {
            checkpoint: cp.clone(),
            entries: frontier.size(),
            rebuilt_root: frontier.root(),
            first_bad,
            proofs_checked,
            problems,
        })
    }
}

/// Whether `entry` holds the searched value (the ledger is not trusted to have searched right).
fn matches_key(entry: &LogEntry, key: &str, value: &str) -> bool {
    let r = &entry.record;
    match key {
        "sha256" => Hash::from_hex(value).is_ok_and(|h| r.content_sha256 == Some(h)),
        "cid" => value
            .parse::<medmesh_core::record::ContentId>()
            .is_ok_and(|c| {
                r.cid
                    .as_ref()
                    .is_some_and(|rc| rc.multihash_bytes() == c.multihash_bytes())
            }),
        "identity" => [&r.source, &r.destination, &entry.submitter]
            .iter()
            .any(|id| id.as_str() == value),
        "uid" => value
            .parse::<medmesh_core::record::KeyedHash>()
            .is_ok_and(|u| [r.study_uid, r.series_uid, r.sop_instance_uid].contains(&Some(u))),
        _ => false,
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Verifies that `view`'s bytes hash to its leaf and that `proof` places it in `cp`.
///
/// # Errors
/// When the bytes, the stored leaf hash and the proof disagree.
pub fn verify_entry_view(
    view: &EntryView,
    proof: &[Hash],
    cp: &Checkpoint,
) -> Result<ProvenEntry, ClientError> {
    let index = view.index;
    let bytes = B64.decode(&view.entry).map_err(|e| ClientError::Entry {
        index,
        reason: format!("entry is not base64: {e}"),
    })?;
    let leaf = merkle::leaf_hash(&bytes);
    if leaf != view.leaf_hash {
        return Err(ClientError::Entry {
            index,
            reason: format!(
                "entry bytes hash to {leaf} but the tree holds leaf {}: the entry was altered",
                view.leaf_hash
            ),
        });
    }
    merkle::verify_inclusion(&leaf, index, cp.size, proof, &cp.root).map_err(|source| {
        ClientError::Proof {
            what: format!(
                "inclusion of entry {index} in checkpoint of size {}",
                cp.size
            ),
            source,
        }
    })?;
    let entry = LogEntry::decode(&bytes).map_err(|e| ClientError::Entry {
        index,
        reason: format!("entry does not decode: {e}"),
    })?;
    Ok(ProvenEntry {
        index,
        leaf_hash: leaf,
        entry,
        proof: proof.to_vec(),
    })
}

/// The result of [`LedgerClient::update_trusted`].
#[derive(Debug, Clone)]
pub struct TrustUpdate {
    /// What was trusted before, if anything.
    pub old: Option<VerifiedCheckpoint>,
    /// The checkpoint now trusted.
    pub new: VerifiedCheckpoint,
}

/// One divergence found by an audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditProblem {
    /// Entry index concerned.
    pub index: u64,
    /// What is wrong.
    pub what: String,
}

/// The outcome of [`LedgerClient::audit`].
#[derive(Debug, Clone)]
pub struct AuditReport {
    /// The checkpoint audited against.
    pub checkpoint: Checkpoint,
    /// Entries downloaded.
    pub entries: u64,
    /// Root rebuilt from them.
    pub rebuilt_root: Hash,
    /// First entry that diverges from the checkpoint, if any.
    pub first_bad: Option<u64>,
    /// Inclusion proofs checked.
    pub proofs_checked: u64,
    /// Every problem found, by index.
    pub problems: Vec<AuditProblem>,
}

impl AuditReport {
    /// Whether the log matched its checkpoint in every respect checked.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The last checkpoint a client accepted, kept in a file.
#[derive(Debug, Clone)]
pub struct TrustedStore {
    path: PathBuf,
}

impl TrustedStore {
    /// A store at `path` (created on first save).
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_owned(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The trusted checkpoint, re-verified.
    ///
    /// # Errors
    /// When the file is unreadable or no longer verifies.
    pub fn load(
        &self,
        verifier: &NoteVerifier,
        origin: &str,
    ) -> Result<Option<VerifiedCheckpoint>, ClientError> {
        let note = match std::fs::read_to_string(&self.path) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ClientError::Io {
                    what: format!("read trusted checkpoint {}", self.path.display()),
                    source,
                });
            }
        };
        let checkpoint = Checkpoint::open(&note, verifier, origin)?;
        Ok(Some(VerifiedCheckpoint { checkpoint, note }))
    }

    /// Replaces the trusted checkpoint atomically.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, note: &str) -> Result<(), ClientError> {
        let io = |what: &str, source| ClientError::Io {
            what: format!("{what} {}", self.path.display()),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("create directory for", e))?;
        }
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("write", e))?;
            f.write_all(note.as_bytes()).map_err(|e| io("write", e))?;
            f.sync_all().map_err(|e| io("sync", e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| io("replace", e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("sync directory of", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use medmesh_core::TrustDomain;
    use medmesh_core::merkle::sha256;
    use medmesh_core::record::{EventKind, KeyedHash, Outcome, Protocol, RecordId};
    use medmesh_core::wire::BatchRequest;

    use super::*;

    fn record(i: u8) -> AuditRecord {
        let td = TrustDomain::new("test.local").unwrap();
        let mut r = AuditRecord::event(
            RecordId([i; 16]),
            EventKind::InstanceStored,
            1_700_000_000_000_000,
            td.workload("ct", "scanner").unwrap(),
            td.workload("pacs", "writer").unwrap(),
            Protocol::Dimse,
            Outcome::Success,
        );
        r.bytes = 1024;
        r.content_sha256 = Some(sha256(&[i]));
        r.study_uid = Some(KeyedHash([i; 32]));
        r
    }

    #[test]
    fn a_borrowed_batch_is_sent_as_the_wire_batch() {
        let records = vec![record(1), record(2)];
        let borrowed = serde_json::to_vec(&BatchRef { records: &records }).unwrap();
        assert_eq!(
            borrowed,
            serde_json::to_vec(&BatchRequest {
                records: records.clone()
            })
            .unwrap()
        );
        let back: BatchRequest = serde_json::from_slice(&borrowed).unwrap();
        assert_eq!(back.records, records);
    }
}
