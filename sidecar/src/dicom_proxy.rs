//! Forwarding of a DICOM association with auditing. Requestor → application bytes stream
//! through unchanged (and are observed). Application → requestor bytes go PDU by PDU: a PDU that
//! completes a C-STORE is released only once its record is safe (see `deliver`); if it cannot
//! be made safe, the response's status becomes a failure (A700, out of resources), so no client
//! ever sees success for an unrecorded instance.

use std::sync::{Arc, Mutex};

use medmesh_core::SpiffeId;
use medmesh_core::record::UidKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::Instrument as _;

use crate::archive::Archiver;
use crate::audit;
use crate::deliver::Delivery;
use crate::dicom::command;
use crate::dicom::pdu::PduReader;
use crate::dicom::tracker::{Dir, Kind, Tracker, Transfer};
use crate::metrics::Metrics;

/// PDUs up to this size are held until processed; larger ones (never a response) stream.
const MAX_HOLD: usize = 1 << 20;
/// How long the client may keep its side open after the application closed its own.
const CLIENT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
/// Status sent instead of success when a record could not be made safe.
pub const STATUS_OUT_OF_RESOURCES: u16 = 0xA700;

/// What auditing needs to know of the connection.
pub struct AuditCtx {
    /// Delivery of records.
    pub delivery: Arc<Delivery>,
    /// Key of UID and AE-title hashes.
    pub key: Arc<UidKey>,
    /// The peer (association requestor), from its SVID.
    pub requestor: SpiffeId,
    /// This workload (the acceptor).
    pub acceptor: SpiffeId,
    /// Metrics.
    pub metrics: Metrics,
    /// Archiving of stored instances, when configured.
    pub archive: Option<Arc<Archiver>>,
}

/// Microseconds since the Unix epoch (record times).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the gate decides for the bytes just observed.
struct Observed {
    /// Transfers completed.
    done: Vec<Transfer>,
    /// Message ids of success responses that match no request seen.
    unmatched: Vec<u16>,
}

/// Feeds bytes to the reader and tracker. `Err` when auditing cannot follow the association
/// any more (malformed PDUs, an unparseable command, duplicate outstanding message ids): the
/// association must then be aborted, never forwarded unobserved.
fn observe(
    reader: &mut PduReader,
    tracker: &Mutex<Tracker>,
    dir: Dir,
    bytes: &[u8],
) -> Result<Observed, String> {
    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
    reader
        .feed(bytes, |ev| t.on_event(dir, &ev))
        .map_err(|e| e.to_string())?;
    if t.poisoned() {
        return Err(
            "association cannot be audited (duplicate message ids or an unparseable command)"
                .into(),
        );
    }
    Ok(Observed {
        done: t.drain(),
        unmatched: t.take_unmatched(),
    })
}

/// A-ABORT from the service provider, reason unspecified.
const A_ABORT: [u8; 10] = [0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x00];

/// Whether a transfer is a store the client will take as done (success or warning).
fn gated(t: &Transfer) -> bool {
    use crate::dicom::tracker::{StatusClass, status_class};
    t.kind == Kind::Stored
        && t.status
            .map(status_class)
            .is_some_and(|c| matches!(c, StatusClass::Success | StatusClass::Warning))
}

/// Makes every gated transfer's record safe; returns the message ids that could not be, and
/// the other transfers (recorded later). Unmatched success responses count as failed.
async fn gate(ctx: &AuditCtx, o: Observed) -> (Vec<u16>, Vec<Transfer>) {
    let mut failed = o.unmatched;
    let mut later = Vec::new();
    for mut t in o.done {
        if !gated(&t) {
            later.push(t);
            continue;
        }
        let staged = t.staged.take();
        let rec = match audit::dimse_record(&t, &ctx.requestor, &ctx.acceptor, &ctx.key, now_us()) {
            Ok(r) => r,
            Err(_) => {
                if let Some(a) = &ctx.archive {
                    a.discard(staged);
                }
                failed.extend(t.message_id);
                continue;
            }
        };
        let span = instance_span(&rec);
        if !make_safe(ctx, staged, rec).instrument(span.clone()).await {
            span.record("otel.status_code", "error");
            failed.extend(t.message_id);
        }
    }
    (failed, later)
}

/// Makes one store's record (and its archive copy) safe; `false` when the client must be told
/// the store failed (the record is then kept as such).
async fn make_safe(
    ctx: &AuditCtx,
    staged: Option<Result<crate::archive::Staged, crate::archive::StageError>>,
    rec: medmesh_core::AuditRecord,
) -> bool {
    // The archive copy is made durable first, so that a success the client sees is never
    // missing it when the mode requires it.
    let mut archived = None;
    if let Some(a) = &ctx.archive {
        archived = staged.as_ref().and_then(|s| s.as_ref().ok()).map(|s| s.id);
        if let Err(e) = a.settle(staged, &rec).await {
            tracing::warn!(error = %e, "archive copy not safe (archive mode required): the store is reported as failed");
            keep_failed(ctx, rec).await;
            return false;
        }
    }
    if let Err(e) = ctx.delivery.commit(rec.clone()).await {
        if let (Some(a), Some(id)) = (&ctx.archive, archived) {
            a.staging.withdraw(&id);
        }
        tracing::warn!(error = %e, "record not safe: the store is reported as failed");
        keep_failed(ctx, rec).await;
        return false;
    }
    true
}

/// The span of one instance moved (see [`proxy`]): its record's id and what the record holds
/// in clear (kind, SOP class, size, status), never a DICOM identifier.
pub(crate) fn instance_span(rec: &medmesh_core::AuditRecord) -> tracing::Span {
    let span = tracing::debug_span!(
        "dicom.instance",
        medmesh.record_id = %rec.record_id,
        medmesh.event = rec.kind.as_str(),
        medmesh.outcome = rec.outcome.as_str(),
        medmesh.bytes = rec.bytes,
        dicom.sop_class_uid = tracing::field::Empty,
        dicom.status = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(c) = &rec.sop_class_uid {
        span.record("dicom.sop_class_uid", c.as_str());
    }
    if let Some(st) = rec.status {
        span.record("dicom.status", u64::from(st));
    }
    span
}

/// Records a store as the client is told it: a failure (out of resources).
async fn keep_failed(ctx: &AuditCtx, mut rec: medmesh_core::AuditRecord) {
    rec.status = Some(STATUS_OUT_OF_RESOURCES);
    rec.outcome = medmesh_core::record::Outcome::Failure;
    ctx.delivery.later(rec).await;
}

/// Spools the records of `ts` with one fsync.
async fn record_later(ctx: &AuditCtx, ts: Vec<Transfer>) {
    let mut recs = Vec::with_capacity(ts.len());
    for mut t in ts {
        // Not a store the client takes as done: its archive copy goes.
        if let Some(a) = &ctx.archive {
            a.discard(t.staged.take());
        }
        match audit::dimse_record(&t, &ctx.requestor, &ctx.acceptor, &ctx.key, now_us()) {
            Ok(rec) => {
                if matches!(t.kind, Kind::Stored | Kind::Retrieved) {
                    // Closed at once: these wait for nothing.
                    drop(instance_span(&rec));
                }
                recs.push(rec);
            }
            Err(e) => tracing::error!(error = %e, "cannot make a record id"),
        }
    }
    ctx.delivery.later_all(recs).await;
}

/// Proxies one association between `client` (the requestor, after mTLS) and `app`. Returns the
/// bytes moved (to the app, from the app).
///
/// Traced as a `dicom.association` server span (`medmesh.peer` and `medmesh.workload`: the
/// two SPIFFE IDs; the bytes each way), with a `dicom.instance` child per instance moved; a
/// gated store's span is the parent of the ledger append that makes its record safe.
pub async fn proxy<C, A>(client: C, app: A, ctx: AuditCtx) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let span = tracing::debug_span!(
        "dicom.association",
        otel.kind = "server",
        medmesh.peer = %ctx.requestor,
        medmesh.workload = %ctx.acceptor,
        medmesh.bytes.to_app = tracing::field::Empty,
        medmesh.bytes.from_app = tracing::field::Empty,
    );
    let (to_app, from_app) = associate(client, app, ctx).instrument(span.clone()).await;
    span.record("medmesh.bytes.to_app", to_app);
    span.record("medmesh.bytes.from_app", from_app);
    (to_app, from_app)
}

async fn associate<C, A>(client: C, app: A, ctx: AuditCtx) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let tracker = Mutex::new(Tracker::with_archive(
        ctx.archive.as_ref().map(|a| a.staging.clone()),
    ));
    let (abort_tx, abort_rx) = tokio::sync::watch::channel(false);
    // Set when the requestor side ended; lets the application side stop waiting for it.
    let (up_done_tx, up_done_rx) = tokio::sync::watch::channel(false);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ar, mut aw) = tokio::io::split(app);
    let up = async {
        let mut reader = PduReader::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        let mut abort = abort_rx.clone();
        loop {
            let n = tokio::select! {
                r = cr.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                _ = abort.wait_for(|a| *a) => break,
            };
            // Observe before forwarding: the application cannot answer a request before the
            // tracker has seen it.
            let seen = match observe(&mut reader, &tracker, Dir::FromRequestor, &buf[..n]) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "aborting the association");
                    abort_tx.send_replace(true);
                    break;
                }
            };
            let write = aw.write_all(&buf[..n]).await;
            record_later(&ctx, seen.done).await;
            if write.is_err() {
                break;
            }
            n_total += n as u64;
        }
        let _ = aw.shutdown().await;
        up_done_tx.send_replace(true);
        n_total
    };
    let down = async {
        let mut reader = PduReader::new();
        let mut n_total = 0u64;
        let mut header = [0u8; 6];
        let mut abort = abort_rx.clone();
        let mut aborted = false;
        'pdus: loop {
            let got = tokio::select! {
                r = ar.read_exact(&mut header) => r.is_ok(),
                _ = abort.wait_for(|a| *a) => { aborted = true; false }
            };
            if !got {
                break;
            }
            let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
            if len > MAX_HOLD {
                // Too large to hold: observe each chunk before forwarding it, and abort if a
                // chunk completes a store whose record cannot be made safe.
                let mut pending: Vec<u8> = header.to_vec();
                let mut left = len;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let seen = match observe(&mut reader, &tracker, Dir::FromAcceptor, &pending) {
                        Ok(o) => o,
                        Err(_) => {
                            aborted = true;
                            break 'pdus;
                        }
                    };
                    let (failed, later) = gate(&ctx, seen).await;
                    record_later(&ctx, later).await;
                    if !failed.is_empty() {
                        ctx.metrics.failed_responses.inc_by(failed.len() as u64);
                        aborted = true;
                        break 'pdus;
                    }
                    if cw.write_all(&pending).await.is_err() {
                        break 'pdus;
                    }
                    n_total += pending.len() as u64;
                    if left == 0 {
                        break;
                    }
                    let want = left.min(buf.len());
                    let n = match ar.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => break 'pdus,
                        Ok(n) => n,
                    };
                    left -= n;
                    pending.clear();
                    pending.extend_from_slice(&buf[..n]);
                }
                continue;
            }
            let mut pdu = Vec::with_capacity(6 + len);
            pdu.extend_from_slice(&header);
            pdu.resize(6 + len, 0);
            if ar.read_exact(&mut pdu[6..]).await.is_err() {
                break;
            }
            let seen = match observe(&mut reader, &tracker, Dir::FromAcceptor, &pdu) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "aborting the association");
                    aborted = true;
                    break;
                }
            };
            let (failed, later) = gate(&ctx, seen).await;
            if !failed.is_empty() {
                ctx.metrics.failed_responses.inc_by(failed.len() as u64);
                match fail_store_responses(&pdu, &failed) {
                    Some(rewritten) => pdu = rewritten,
                    None => {
                        // The success cannot be turned into a failure in place (a response
                        // split over PDVs or PDUs): the client must not get it at all.
                        record_later(&ctx, later).await;
                        aborted = true;
                        break;
                    }
                }
            }
            let write = cw.write_all(&pdu).await;
            record_later(&ctx, later).await;
            if write.is_err() {
                break;
            }
            n_total += pdu.len() as u64;
        }
        if aborted {
            abort_tx.send_replace(true);
            let _ = cw.write_all(&A_ABORT).await;
        }
        let _ = cw.shutdown().await;
        // The application is done: give the client a grace period to close its side, then cut
        // it (a silent or dead client must not hold the connection and its records forever).
        let mut up_done = up_done_rx.clone();
        if tokio::time::timeout(CLIENT_GRACE, up_done.wait_for(|d| *d))
            .await
            .is_err()
        {
            abort_tx.send_replace(true);
        }
        n_total
    };
    let (to_app, from_app) = tokio::join!(up, down);
    // The connection ended: whatever was left outstanding is recorded without a status.
    let rest = {
        let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
        t.finish();
        t.drain()
    };
    record_later(&ctx, rest).await;
    (to_app, from_app)
}

/// Rewrites a P-DATA-TF PDU so that the C-STORE-RSPs answering `ids` carry a failure status.
/// `None` when the PDU is not a P-DATA-TF with such a response in one complete command PDV.
pub fn fail_store_responses(pdu: &[u8], ids: &[u16]) -> Option<Vec<u8>> {
    if pdu.len() < 6 || pdu[0] != 0x04 {
        return None;
    }
    let mut out = Vec::with_capacity(pdu.len() + 16);
    let mut pos = 6;
    let mut changed = false;
    while pos + 6 <= pdu.len() {
        let len = u32::from_be_bytes([pdu[pos], pdu[pos + 1], pdu[pos + 2], pdu[pos + 3]]) as usize;
        if len < 2 || pos + 4 + len > pdu.len() {
            return None;
        }
        let (ctx, mch) = (pdu[pos + 4], pdu[pos + 5]);
        let data = &pdu[pos + 6..pos + 4 + len];
        let replacement = (mch & 3 == 3)
            .then(|| command::parse(data).ok())
            .flatten()
            .filter(|c| {
                c.field == command::C_STORE_RSP
                    && c.responded_to.is_some_and(|id| ids.contains(&id))
            })
            .map(|mut c| {
                c.status = Some(STATUS_OUT_OF_RESOURCES);
                command::encode(&c)
            });
        let body = match &replacement {
            Some(r) => {
                changed = true;
                r.as_slice()
            }
            None => data,
        };
        out.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
        out.push(ctx);
        out.push(mch);
        out.extend_from_slice(body);
        pos += 4 + len;
    }
    if !changed {
        return None;
    }
    let mut pdu_out = vec![0x04, pdu[1]];
    pdu_out.extend_from_slice(&(out.len() as u32).to_be_bytes());
    pdu_out.extend_from_slice(&out);
    Some(pdu_out)
}

#[cfg(test)]
mod tests;
