//! Forwarding of a DICOM association with auditing. Requestor → application bytes stream
//! through unchanged (and are observed). Application → requestor bytes go PDU by PDU: a PDU that
//! completes a C-STORE is released only once its record is safe (see `deliver`); if it cannot
//! be made safe, the response's status becomes a failure (A700, out of resources), so no client
//! ever sees success for an unrecorded instance.

use std::sync::{Arc, Mutex};

use medmesh_core::SpiffeId;
use medmesh_core::record::UidKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::audit;
use crate::deliver::Delivery;
use crate::dicom::command;
use crate::dicom::pdu::PduReader;
use crate::dicom::tracker::{Dir, Kind, Tracker, Transfer};
use crate::metrics::Metrics;

/// PDUs up to this size are held until processed; larger ones (never a response) stream.
const MAX_HOLD: usize = 1 << 20;
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
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Feeds bytes to the reader and tracker; returns the transfers they completed. A parse error
/// ends observation of this direction (the bytes are still forwarded).
fn observe(
    reader: &mut Option<PduReader>,
    tracker: &Mutex<Tracker>,
    dir: Dir,
    bytes: &[u8],
) -> Vec<Transfer> {
    let Some(r) = reader.as_mut() else {
        return Vec::new();
    };
    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = r.feed(bytes, |ev| t.on_event(dir, &ev)) {
        tracing::warn!(error = %e, ?dir, "DICOM stream not understood; no longer observed");
        *reader = None;
    }
    t.drain()
}

async fn record_later(ctx: &AuditCtx, ts: Vec<Transfer>) {
    for t in ts {
        match audit::dimse_record(&t, &ctx.requestor, &ctx.acceptor, &ctx.key, now_us()) {
            Ok(rec) => ctx.delivery.later(rec).await,
            Err(e) => tracing::error!(error = %e, "cannot make a record id"),
        }
    }
}

/// Proxies one association between `client` (the requestor, after mTLS) and `app`. Returns the
/// bytes moved (to the app, from the app).
pub async fn proxy<C, A>(client: C, app: A, ctx: AuditCtx) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let tracker = Mutex::new(Tracker::new());
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ar, mut aw) = tokio::io::split(app);
    let up = async {
        let mut reader = Some(PduReader::new());
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Observe before forwarding: the application cannot answer a request before the
            // tracker has seen it.
            let done = observe(&mut reader, &tracker, Dir::FromRequestor, &buf[..n]);
            if aw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            n_total += n as u64;
            record_later(&ctx, done).await;
        }
        let _ = aw.shutdown().await;
        n_total
    };
    let down = async {
        let mut reader = Some(PduReader::new());
        let mut n_total = 0u64;
        let mut header = [0u8; 6];
        loop {
            if ar.read_exact(&mut header).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
            if len > MAX_HOLD {
                // Too large to be a response: stream it.
                let mut done = observe(&mut reader, &tracker, Dir::FromAcceptor, &header);
                if cw.write_all(&header).await.is_err() {
                    break;
                }
                let mut left = len;
                let mut buf = vec![0u8; 64 * 1024];
                while left > 0 {
                    let want = left.min(buf.len());
                    let n = match ar.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    done.extend(observe(&mut reader, &tracker, Dir::FromAcceptor, &buf[..n]));
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    left -= n;
                }
                n_total += (6 + len - left) as u64;
                record_later(&ctx, done).await;
                if left > 0 {
                    break;
                }
                continue;
            }
            let mut pdu = Vec::with_capacity(6 + len);
            pdu.extend_from_slice(&header);
            pdu.resize(6 + len, 0);
            if ar.read_exact(&mut pdu[6..]).await.is_err() {
                // Forward what there is, then end.
                let _ = cw.write_all(&header).await;
                break;
            }
            let done = observe(&mut reader, &tracker, Dir::FromAcceptor, &pdu);
            let mut failed = Vec::new();
            let mut later = Vec::new();
            for t in done {
                if t.kind == Kind::Stored
                    && t.status
                        .is_some_and(|s| s == 0 || (0xB000..=0xBFFF).contains(&s))
                {
                    // The gate: a store the client will see as successful.
                    let rec = match audit::dimse_record(
                        &t,
                        &ctx.requestor,
                        &ctx.acceptor,
                        &ctx.key,
                        now_us(),
                    ) {
                        Ok(r) => r,
                        Err(_) => {
                            failed.extend(t.message_id);
                            continue;
                        }
                    };
                    if let Err(e) = ctx.delivery.commit(rec).await {
                        tracing::warn!(error = %e, "record not safe: the store is reported as failed");
                        failed.extend(t.message_id);
                    }
                } else {
                    later.push(t);
                }
            }
            if !failed.is_empty() {
                ctx.metrics.failed_responses.inc_by(failed.len() as u64);
                pdu = fail_store_responses(&pdu, &failed).unwrap_or(pdu);
            }
            if cw.write_all(&pdu).await.is_err() {
                break;
            }
            n_total += pdu.len() as u64;
            record_later(&ctx, later).await;
        }
        let _ = cw.shutdown().await;
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
