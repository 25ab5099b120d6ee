//! The routes replicas call on each other (Raft RPCs, forwarded appends), and the choice between
//! appending here and forwarding to the leader. Only a client presenting this ledger's own
//! SPIFFE ID (the ID every replica shares) may call a peer route.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use medmesh_core::SpiffeId;
use medmesh_core::tls::SvidError;

use super::{
    ApiError, ApiResult, AppState, AppendParams, PeerAuth, Query, QueryRejection, now_us, query,
    read_body, read_body_limited,
};
use crate::replication::{
    self, APPEND_PATH, FORWARD_PATH, PEER_PATH, RPC_CONTENT_TYPE, Route, SNAPSHOT_PATH,
    SUBMITTER_HEADER, VOTE_PATH,
};

/// Largest Raft RPC body (a batch of Raft entries or one snapshot chunk).
const MAX_RPC_BYTES: usize = 256 << 20;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PEER_PATH}/{{rpc}}"), post(raft_rpc))
        .route(FORWARD_PATH, post(forwarded_one))
        .route(&format!("{FORWARD_PATH}/batch"), post(forwarded_batch))
}

fn not_replicated() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_replicated",
        "this ledger is not replicated",
    )
}

/// Accepts only this ledger's own identity, with a certificate still valid.
fn authorize_peer(state: &AppState, auth: &PeerAuth) -> ApiResult<replication::Replica> {
    let replica = state.replica.clone().ok_or_else(not_replicated)?;
    match &auth.0 {
        Ok((id, not_after)) if *not_after > now_us() as i64 / 1_000_000 => {
            if *id == replica.peer_id {
                Ok(replica)
            } else {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("{id} is not a replica of this ledger"),
                ))
            }
        }
        Ok(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "certificate_expired",
            format!("client authentication failed: {}", SvidError::Expired),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_client_certificate",
            format!("client authentication failed: {e}"),
        )),
    }
}

fn rpc_response<T: serde::Serialize>(v: &T) -> ApiResult<Response> {
    let body = replication::encode(v).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode Raft response: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, RPC_CONTENT_TYPE)], body).into_response())
}

fn rpc_request<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8]) -> ApiResult<T> {
    replication::decode(bytes)
        .map_err(|e| ApiError::bad("bad_rpc", format!("Raft request does not decode: {e}")))
}

/// `POST /v1/raft/{append|vote|snapshot}`: one Raft RPC, postcard in and out.
async fn raft_rpc(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    Path(rpc): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let r = authorize_peer(&state, &auth)?;
    let bytes = read_body_limited(MAX_RPC_BYTES, &headers, body).await?;
    let started = std::time::Instant::now();
    let (label, resp) = match format!("{PEER_PATH}/{rpc}").as_str() {
        APPEND_PATH => {
            let req: openraft::raft::AppendEntriesRequest<crate::replication::TypeConfig> =
                rpc_request(&bytes)?;
            let commit = req.leader_commit.map(|l| l.index);
            let resp = r.raft.append_entries(req).await;
            if matches!(resp, Ok(openraft::raft::AppendEntriesResponse::Success)) {
                r.contact.record(commit);
            }
            ("append", rpc_response(&resp))
        }
        VOTE_PATH => (
            "vote",
            rpc_response(&r.raft.vote(rpc_request(&bytes)?).await),
        ),
        SNAPSHOT_PATH => (
            "snapshot",
            rpc_response(&r.raft.install_snapshot(rpc_request(&bytes)?).await),
        ),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no Raft RPC {rpc:?}"),
            ));
        }
    };
    state
        .metrics
        .raft_rpc_seconds
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// The submitter a follower authenticated, re-checked against this replica's rules.
fn forwarded_submitter(state: &AppState, headers: &HeaderMap) -> ApiResult<SpiffeId> {
    let id: SpiffeId = headers
        .get(SUBMITTER_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::bad("no_submitter", "forwarded append names no submitter"))?
        .parse()
        .map_err(|e| ApiError::bad("bad_submitter", format!("forwarded submitter: {e}")))?;
    if !state.cfg.may_append(&id) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{id} is not allowed to append to this ledger"),
        ));
    }
    Ok(id)
}

async fn forwarded_one(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<AppendParams>, QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    forwarded(state, auth, params, headers, body, false).await
}

async fn forwarded_batch(
    State(state): State<AppState>,
    axum::Extension(auth): axum::Extension<PeerAuth>,
    params: Result<Query<AppendParams>, QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    forwarded(state, auth, params, headers, body, true).await
}

/// An append a follower forwarded: proposed here or refused (never forwarded again).
async fn forwarded(
    state: AppState,
    auth: PeerAuth,
    params: Result<Query<AppendParams>, QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
    batch: bool,
) -> ApiResult<Response> {
    authorize_peer(&state, &auth)?;
    let submitter = forwarded_submitter(&state, &headers)?;
    let params = query(params)?;
    let body = read_body(&state, &headers, body).await?;
    if batch {
        super::append_batch_here(state, submitter, params, body).await
    } else {
        super::append_one_here(state, submitter, params, body).await
    }
}

/// Appends here when this ledger is a single node or the leader, else forwards to the leader;
/// when leadership moves between the choice and the proposal, chooses once more.
pub(super) async fn append_or_forward(
    state: AppState,
    submitter: SpiffeId,
    params: AppendParams,
    body: Bytes,
    batch: bool,
) -> ApiResult<Response> {
    let here = |state: AppState, submitter: SpiffeId, body: Bytes| async move {
        let params = AppendParams {
            proof: params.proof,
        };
        if batch {
            super::append_batch_here(state, submitter, params, body).await
        } else {
            super::append_one_here(state, submitter, params, body).await
        }
    };
    let Some(replica) = state.replica.clone() else {
        return here(state, submitter, body).await;
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let route = replica.route().await.ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_leader",
                format!(
                    "no Raft leader was elected within {:?}; nothing was stored, retry",
                    replica.leader_wait
                ),
            )
        })?;
        match route {
            Route::Local => {
                let r = here(state.clone(), submitter.clone(), body.clone()).await;
                match r {
                    Err(e) if e.reason == "not_leader" && attempts < 3 => continue,
                    r => return r,
                }
            }
            Route::Leader(_, addr) => {
                let path = format!(
                    "{FORWARD_PATH}{}?proof={}",
                    if batch { "/batch" } else { "" },
                    params.proof
                );
                let f = replica
                    .forwarder
                    .forward(&addr, &path, submitter.as_str(), body.clone())
                    .await
                    .map_err(|e| {
                        ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "leader_unreachable",
                            format!(
                                "the leader did not answer (the entries may or may not be stored; retry with the same record ids): {e}"
                            ),
                        )
                    })?;
                let moved = f.status == StatusCode::SERVICE_UNAVAILABLE
                    && serde_json::from_slice::<serde_json::Value>(&f.body)
                        .is_ok_and(|b| b["reason"] == "not_leader");
                if moved && attempts < 3 {
                    continue;
                }
                let mut resp = (f.status, f.body).into_response();
                if let Some(ct) = f.content_type.and_then(|c| c.parse().ok()) {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                return Ok(resp);
            }
        }
    }
}
