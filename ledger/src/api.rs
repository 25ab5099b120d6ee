//! The ledger's HTTP API (served over mTLS by `server`). Every refusal is a JSON body
//! `{"error": <precise message>, "reason": <bounded label>}` and a metric.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use medmesh_core::SpiffeId;
use medmesh_core::merkle::Hash;
use medmesh_core::record::{AuditRecord, ContentId, KeyedHash, LogEntry};
use medmesh_core::tls::SvidError;
use medmesh_core::wire::{
    AppendResponse, AppendResult, BatchRequest, BatchResponse, ConsistencyView, EntryView,
    InclusionView,
};
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument as _;

mod peer;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::replication::Replica;
use crate::sequencer::{AppendError, Sequencer};
use crate::storage::{NewEntry, Placed, Reader, SearchKey, Storage, StorageError};

/// Most records in one batch request.
pub const MAX_BATCH_RECORDS: usize = 1000;
/// Most entries in one range read.
pub const MAX_RANGE: u64 = 1000;
/// Most requests served at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 512;
/// Most hits of one search.
pub const MAX_SEARCH_HITS: usize = 100;
/// Longest a search waits for the indexes to cover the checkpoint it answers for.
const SEARCH_INDEX_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The client identity of a connection, as established by the TLS layer, and when its
/// certificate expires (checked on every request: a connection outliving its certificate loses
/// its rights).
#[derive(Debug, Clone)]
pub struct PeerAuth(pub Result<(SpiffeId, i64), SvidError>);

/// Shared state of the handlers. axum clones it for every extractor of every request: one
/// reference count.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    /// The state of the handlers made of its parts.
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// What the handlers share (see [`AppState`]).
pub struct AppParts {
    /// Checked configuration.
    pub cfg: Arc<Config>,
    /// The database.
    pub storage: Storage,
    /// The writer.
    pub seq: Sequencer,
    /// Metrics.
    pub metrics: Metrics,
    /// How many entries the search indexes cover.
    pub indexed: tokio::sync::watch::Receiver<u64>,
    /// Replication, when this ledger is one replica of several.
    pub replica: Option<Replica>,
}

/// A refused or failed request.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
    fn bad(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason, message)
    }
}

/// Label of a refusal, carried on the response so the metrics layer can count it.
#[derive(Debug, Clone, Copy)]
struct Refusal(&'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": self.message, "reason": self.reason})),
        )
            .into_response();
        resp.extensions_mut().insert(Refusal(self.reason));
        resp
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage error while serving a request");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(Clone, Copy)]
enum Role {
    Append,
    Read,
}

/// A replica that is not ready (no leader, no recent contact with it, or behind what it
/// committed) does not serve reads: what it holds may be older than what another replica
/// already served. 503, so that a client (or the Service) goes to another replica.
fn serving(state: &AppState) -> ApiResult<()> {
    match &state.replica {
        Some(r) => crate::replication::node::ready(r).map_err(|why| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("this replica does not serve reads now: {why}"),
            )
        }),
        None => Ok(()),
    }
}

fn authorize(state: &AppState, auth: &PeerAuth, role: Role) -> ApiResult<SpiffeId> {
    let expired;
    let id = match &auth.0 {
        Ok((id, not_after)) if *not_after > now_us() as i64 / 1_000_000 => id,
        Ok(_) => {
            expired = Err(SvidError::Expired);
            return authorize(state, &PeerAuth(expired), role);
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                match e {
                    SvidError::Missing => "no_client_certificate",
                    SvidError::Expired => "certificate_expired",
                    SvidError::UnknownIssuer => "unknown_issuer",
                    SvidError::ForeignTrustDomain { .. } => "foreign_trust_domain",
                    _ => "bad_client_certificate",
                },
                format!("client authentication failed: {e}"),
            ));
        }
    };
    let (ok, what) = match role {
        Role::Append => (state.cfg.may_append(id), "append to"),
        Role::Read => (state.cfg.may_read(id), "read"),
    };
    if !ok {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{id} is not allowed to {what} this ledger"),
        ));
    }
    Ok(id.clone())
}

async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Bytes> {
    read_body_limited(state.cfg.max_body_bytes, headers, body).await
}

async fn read_body_limited(
    limit: usize,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad(
            "body_read",
            format!("cannot read request body: {e}"),
        )),
    }
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("bad_json", format!("invalid {what}: {e}")))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("worker failed: {e}"),
        )
    })?
}

/// Builds the API router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/entries", post(append_one).get(get_range))
        .route("/v1/entries/batch", post(append_batch))
        .route("/v1/entries/{index}", get(get_entry))
        .route("/v1/checkpoint", get(get_checkpoint))
        .route("/v1/proof/inclusion", get(inclusion))
        .route("/v1/proof/consistency", get(consistency))
        .route("/v1/search", get(search))
        .route("/v1/status", get(status))
        .merge(peer::routes())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        // Inside the count: appends are traced as spans of the caller's trace.
        .layer(axum::middleware::from_fn(trace_appends))
        // Outermost: count every response, including refusals made by inner layers.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| match m.as_str() {
            "/v1/entries" => "entries",
            "/v1/entries/batch" => "batch",
            "/v1/entries/{index}" => "entry",
            "/v1/checkpoint" => "checkpoint",
            "/v1/proof/inclusion" => "inclusion",
            "/v1/proof/consistency" => "consistency",
            "/v1/search" => "search",
            "/v1/status" => "status",
            p if p.starts_with(crate::replication::PEER_PATH) => "raft",
            _ => "other",
        });
    let resp = next.run(req).await;
    let class = match resp.status().as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    state
        .metrics
        .requests
        .with_label_values(&[route, class])
        .inc();
    if let Some(Refusal(reason)) = resp.extensions().get::<Refusal>() {
        state.metrics.refusals.with_label_values(&[reason]).inc();
    }
    resp
}

/// Each append request (public or forwarded by a follower) is a `ledger.append` server span
/// whose parent is the caller's span named by W3C Trace Context (`traceparent`), with
/// `url.path` (the route, never a query), `medmesh.forwarded` and `http.response.status_code`.
/// [`append`] adds a `ledger.commit` child per submission.
async fn trace_appends(req: Request, next: Next) -> Response {
    // The span takes the route while it is borrowed: nothing is copied per request.
    let span = match req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some(p @ ("/v1/entries" | "/v1/entries/batch"))
            if req.method() == axum::http::Method::POST =>
        {
            append_span(p, false)
        }
        Some(p) if p.starts_with(crate::replication::FORWARD_PATH) => append_span(p, true),
        _ => return next.run(req).await,
    };
    medmesh_telemetry::extract(&span, req.headers());
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    if resp.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    resp
}

/// The server span of an append on `route` (see [`trace_appends`]).
fn append_span(route: &str, forwarded: bool) -> tracing::Span {
    tracing::debug_span!(
        "ledger.append",
        otel.kind = "server",
        url.path = route,
        medmesh.forwarded = forwarded,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AppendParams {
    #[serde(default)]
    proof: bool,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t).map_err(|e| {
        ApiError::bad(
            "bad_query",
            format!("invalid query parameters: {}", e.body_text()),
        )
    })
}

async fn append(
    state: AppState,
    submitter: SpiffeId,
    records: Vec<AuditRecord>,
    want_proof: bool,
) -> ApiResult<(Vec<AppendResult>, Option<String>)> {
    let received_us = now_us();
    let span = tracing::debug_span!(
        "ledger.commit",
        medmesh.entries = records.len() as u64,
        medmesh.replicated = state.replica.is_some(),
        medmesh.leaf_index = tracing::field::Empty,
        medmesh.duplicates = tracing::field::Empty,
        medmesh.tree_size = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let entries = records
        .into_iter()
        .map(|record| NewEntry {
            record,
            submitter: submitter.clone(),
            received_us,
        })
        .collect();
    let committed = state
        .seq
        .append(entries, want_proof)
        .instrument(span.clone())
        .await
        .inspect_err(|_| {
            span.record("otel.status_code", "error");
        })
        .map_err(|e| match e {
            AppendError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            AppendError::Commit(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "commit_failed",
                e.to_string(),
            ),
            AppendError::NotLeader(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_leader",
                "leadership changed while the entries were submitted; nothing was stored, retry",
            ),
            AppendError::Unsynced(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "commit_unsynced",
                e.to_string(),
            ),
            AppendError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "replication_failed",
                e.to_string(),
            ),
        })?;
    let results: Vec<AppendResult> = committed
        .placed
        .iter()
        .map(|p| match *p {
            Placed::Appended {
                index,
                leaf,
                received_us,
            }
            | Placed::Duplicate {
                index,
                leaf,
                received_us,
            } => AppendResult {
                index,
                leaf_hash: leaf,
                received_us,
                duplicate: matches!(p, Placed::Duplicate { .. }),
                conflict: false,
                inclusion_proof: None,
            },
            Placed::Conflict { index, leaf } => AppendResult {
                index,
                leaf_hash: leaf,
                received_us: 0,
                duplicate: false,
                conflict: true,
                inclusion_proof: None,
            },
        })
        .collect();
    // The first leaf this submission placed, and the tree it is durable in: worked out only
    // when the span is exported.
    if !span.is_disabled() {
        if let Some(first) = results
            .iter()
            .filter(|r| !r.conflict)
            .map(|r| r.index)
            .min()
        {
            span.record("medmesh.leaf_index", first);
        }
        span.record(
            "medmesh.duplicates",
            results.iter().filter(|r| r.duplicate).count() as u64,
        );
        span.record("medmesh.tree_size", state.seq.head().size);
    }
    if want_proof && committed.checkpoint.is_none() {
        let stored: Vec<String> = results
            .iter()
            .filter(|r| !r.conflict)
            .map(|r| r.index.to_string())
            .collect();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_checkpoint",
            format!(
                "entries are stored at [{}] but no checkpoint could be published to prove them; retry with the same record ids",
                stored.join(", ")
            ),
        ));
    }
    let note = match (&committed.checkpoint, want_proof) {
        (Some(cp), true) => {
            let size = cp.checkpoint.size;
            let metrics = state.metrics.clone();
            let storage = state.storage.clone();
            let mut results = results;
            let results = blocking(move || {
                let reader = storage.reader()?;
                for r in results.iter_mut().filter(|r| !r.conflict) {
                    let t = std::time::Instant::now();
                    r.inclusion_proof = Some(reader.inclusion_proof(r.index, size)?);
                    metrics.proof_seconds.observe(t.elapsed().as_secs_f64());
                }
                Ok(results)
            })
            .await?;
            return Ok((results, Some(cp.note.clone())));
        }
        _ => None,
    };
    Ok((results, note))
}

async fn append_one(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<AppendParams>, QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let submitter = authorize(&state, &auth, Role::Append)?;
    let params = query(params)?;
    let body = read_body(&state, &headers, body).await?;
    peer::append_or_forward(state, submitter, params, body, false).await
}

async fn append_one_here(
    state: AppState,
    submitter: SpiffeId,
    params: AppendParams,
    body: Bytes,
) -> ApiResult<Response> {
    let record: AuditRecord = parse_json(&body, "record")?;
    let (mut results, checkpoint) = append(state, submitter, vec![record], params.proof).await?;
    let result = results.remove(0);
    if result.conflict {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "record_id_conflict",
            format!(
                "record id is already used by entry {} with different content or submitter; nothing was stored",
                result.index
            ),
        ));
    }
    let status = if result.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(AppendResponse { result, checkpoint })).into_response())
}

async fn append_batch(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<AppendParams>, QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let submitter = authorize(&state, &auth, Role::Append)?;
    let params = query(params)?;
    let body = read_body(&state, &headers, body).await?;
    peer::append_or_forward(state, submitter, params, body, true).await
}

async fn append_batch_here(
    state: AppState,
    submitter: SpiffeId,
    params: AppendParams,
    body: Bytes,
) -> ApiResult<Response> {
    let batch: BatchRequest = parse_json(&body, "batch")?;
    if batch.records.is_empty() {
        return Err(ApiError::bad("empty_batch", "batch has no records"));
    }
    if batch.records.len() > MAX_BATCH_RECORDS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "batch has {} records; the limit is {MAX_BATCH_RECORDS}",
                batch.records.len()
            ),
        ));
    }
    // Records whose id conflicts are reported per record (`conflict: true`); the others are stored.
    let (results, checkpoint) = append(state, submitter, batch.records, params.proof).await?;
    Ok(Json(BatchResponse {
        results,
        checkpoint,
    })
    .into_response())
}

fn view(r: &Reader, index: u64, bytes: &[u8]) -> Result<EntryView, StorageError> {
    let (decoded, decode_error) = match LogEntry::decode(bytes) {
        Ok(e) => (Some(e), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(EntryView {
        index,
        leaf_hash: r.leaf_hash(index)?,
        entry: B64.encode(bytes),
        decoded,
        decode_error,
        inclusion_proof: None,
    })
}

fn index_behind(indexed: u64, size: u64) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "index_behind",
        format!("the search index covers {indexed} of {size} entries; retry shortly"),
    )
}

fn parse_index(s: &str, what: &str) -> ApiResult<u64> {
    s.parse().map_err(|_| {
        ApiError::bad(
            "bad_parameter",
            format!("{what} {s:?} is not a non-negative integer"),
        )
    })
}

async fn get_entry(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    index: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<EntryView>> {
    authorize(&state, &auth, Role::Read)?;
    serving(&state)?;
    let Path(index) =
        index.map_err(|e| ApiError::bad("bad_parameter", format!("index: {}", e.body_text())))?;
    let index = parse_index(&index, "index")?;
    let storage = state.storage.clone();
    let v = blocking(move || {
        let r = storage.reader()?;
        match r.entry(index)? {
            Some(b) => Ok(view(&r, index, &b)?),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no entry {index}: the log has {} entries", r.size()),
            )),
        }
    })
    .await?;
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeParams {
    start: u64,
    end: u64,
}

async fn get_range(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<RangeParams>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &auth, Role::Read)?;
    serving(&state)?;
    let p = query(params)?;
    if p.start > p.end {
        return Err(ApiError::bad(
            "bad_range",
            format!("start {} is greater than end {}", p.start, p.end),
        ));
    }
    if p.end - p.start > MAX_RANGE {
        return Err(ApiError::bad(
            "bad_range",
            format!(
                "range of {} entries exceeds the limit of {MAX_RANGE}",
                p.end - p.start
            ),
        ));
    }
    let storage = state.storage.clone();
    blocking(move || {
        let r = storage.reader()?;
        let entries = r
            .entries(p.start, p.end)?
            .iter()
            .map(|(i, b)| view(&r, *i, b))
            .collect::<Result<Vec<EntryView>, _>>()?;
        Ok(Json(json!({"tree_size": r.size(), "entries": entries})))
    })
    .await
}

async fn get_checkpoint(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
) -> ApiResult<Response> {
    authorize(&state, &auth, Role::Read)?;
    serving(&state)?;
    match state.seq.head().checkpoint {
        Some(cp) => Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            cp.note.clone(),
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_checkpoint",
            "no checkpoint has been published yet",
        )),
    }
}

/// `GET /v1/status`: this replica's view (readers only).
async fn status(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
) -> ApiResult<Response> {
    authorize(&state, &auth, Role::Read)?;
    let head = state.seq.head();
    Ok(Json(crate::replication::node::status(
        state.replica.as_ref(),
        head.size,
        head.checkpoint.as_ref().map(|c| c.checkpoint.size),
    ))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InclusionParams {
    tree_size: u64,
    index: Option<u64>,
    leaf_hash: Option<String>,
}

fn check_size(r: &Reader, size: u64, what: &str) -> ApiResult<()> {
    if size > r.size() {
        return Err(ApiError::bad(
            "bad_tree_size",
            format!("{what} {size} exceeds the log size {}", r.size()),
        ));
    }
    Ok(())
}

async fn inclusion(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<InclusionParams>, QueryRejection>,
) -> ApiResult<Json<InclusionView>> {
    authorize(&state, &auth, Role::Read)?;
    serving(&state)?;
    let p = query(params)?;
    let leaf = match &p.leaf_hash {
        Some(h) => Some(
            Hash::from_hex(h)
                .map_err(|e| ApiError::bad("bad_parameter", format!("leaf_hash: {e}")))?,
        ),
        None => None,
    };
    if leaf.is_some() {
        // Lookups by leaf hash go through the search index, which trails the log slightly.
        let mut indexed = state.indexed.clone();
        let want = p.tree_size;
        if tokio::time::timeout(SEARCH_INDEX_WAIT, indexed.wait_for(|i| *i >= want))
            .await
            .is_err()
        {
            return Err(index_behind(*indexed.borrow(), want));
        }
    }
    let storage = state.storage.clone();
    let metrics = state.metrics.clone();
    let v = blocking(move || {
        let r = storage.reader()?;
        check_size(&r, p.tree_size, "tree_size")?;
        let index = match (p.index, leaf) {
            (Some(i), None) => i,
            (None, Some(h)) => r
                .index_of_leaf(&h)?
                .filter(|i| *i < p.tree_size)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no leaf {h} in the first {} entries", p.tree_size),
                    )
                })?,
            _ => {
                return Err(ApiError::bad(
                    "bad_parameter",
                    "give exactly one of index and leaf_hash",
                ));
            }
        };
        if index >= p.tree_size {
            return Err(ApiError::bad(
                "bad_parameter",
                format!("index {index} is outside a tree of size {}", p.tree_size),
            ));
        }
        let t = std::time::Instant::now();
        let proof = r.inclusion_proof(index, p.tree_size)?;
        metrics.proof_seconds.observe(t.elapsed().as_secs_f64());
        Ok(InclusionView {
            index,
            tree_size: p.tree_size,
            leaf_hash: r.leaf_hash(index)?,
            proof,
        })
    })
    .await?;
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyParams {
    from: u64,
    to: u64,
}

async fn consistency(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<ConsistencyParams>, QueryRejection>,
) -> ApiResult<Json<ConsistencyView>> {
    authorize(&state, &auth, Role::Read)?;
    serving(&state)?;
    let p = query(params)?;
    if p.from > p.to {
        return Err(ApiError::bad(
            "bad_parameter",
            format!("from {} is greater than to {}", p.from, p.to),
        ));
    }
    let storage = state.storage.clone();
    let metrics = state.metrics.clone();
    let v = blocking(move || {
        let r = storage.reader()?;
        check_size(&r, p.to, "to")?;
        let t = std::time::Instant::now();
        let proof = r.consistency_proof(p.from, p.to)?;
        metrics.proof_seconds.observe(t.elapsed().as_secs_f64());
        Ok(ConsistencyView {
            from: p.from,
            to: p.to,
            proof,
        })
    })
    .await?;
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchParams {
    sha256: Option<String>,
    cid: Option<String>,
    identity: Option<String>,
    uid: Option<String>,
}

async fn search(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &auth, Role::Read)?;
    serving(&state)?;
    let p = query(params)?;
    let bad = |e: String| ApiError::bad("bad_parameter", e);
    let key = match (p.sha256, p.cid, p.identity, p.uid) {
        (Some(h), None, None, None) => {
            SearchKey::Sha256(Hash::from_hex(&h).map_err(|e| bad(format!("sha256: {e}")))?)
        }
        (None, Some(c), None, None) => SearchKey::Cid(
            c.parse::<ContentId>()
                .map_err(|e| bad(format!("cid: {e}")))?
                .multihash_bytes(),
        ),
        (None, None, Some(i), None) => {
            let id: SpiffeId = i.parse().map_err(|e| bad(format!("identity: {e}")))?;
            SearchKey::Identity(id.to_string())
        }
        (None, None, None, Some(u)) => SearchKey::Uid(
            u.parse::<KeyedHash>()
                .map_err(|e| bad(format!("uid: {e}")))?
                .0,
        ),
        _ => {
            return Err(bad(
                "give exactly one of sha256, cid, identity and uid".into()
            ));
        }
    };
    let Some(cp) = state.seq.head().checkpoint else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_checkpoint",
            "no checkpoint has been published yet",
        ));
    };
    // The indexes trail the log slightly; give them a moment to cover this checkpoint.
    let size = cp.checkpoint.size;
    let mut indexed = state.indexed.clone();
    if tokio::time::timeout(SEARCH_INDEX_WAIT, indexed.wait_for(|i| *i >= size))
        .await
        .is_err()
    {
        // A partial answer would read as "not recorded": refuse instead.
        return Err(index_behind(*indexed.borrow(), size));
    }
    let storage = state.storage.clone();
    blocking(move || {
        let r = storage.reader()?;
        // Only entries the checkpoint covers come with a proof; later ones are left to the next.
        let (indexes, truncated) = r.search(&key, size, MAX_SEARCH_HITS)?;
        let mut hits = Vec::new();
        for i in indexes {
            let Some(bytes) = r.entry(i)? else { continue };
            let mut v = view(&r, i, &bytes)?;
            v.inclusion_proof = Some(r.inclusion_proof(i, size)?);
            hits.push(v);
        }
        Ok(Json(json!({
            "tree_size": size,
            "indexed_size": r.indexed().min(size),
            "checkpoint": cp.note,
            "hits": hits,
            "truncated": truncated,
        })))
    })
    .await
}
