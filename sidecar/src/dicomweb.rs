//! DICOMweb auditing on the inbound path: an HTTP/1.1 or HTTP/2 proxy (hyper on both sides)
//! between the mTLS peer and the application that observes, without buffering, the instances
//! moving in STOW-RS requests and WADO-RS responses.
//!
//! - **STOW-RS** (`POST …/studies[/{study}]`, `multipart/related; type="application/dicom"`):
//!   each part is hashed whole (SHA-256 of the Part 10 file, which is what WADO-RS returns) and
//!   its UIDs read from the data set header as it streams to the application. When the
//!   application answers 2xx, its (small) response is read to learn per-instance failures; the
//!   records of stored instances are made safe together (see [`crate::deliver`]) before the response is
//!   released. If they cannot be, the client gets 503 and the records are kept as failures.
//! - **WADO-RS** (`GET …/studies/{study}[/series/{series}[/instances/{instance}]]`): each
//!   `application/dicom` part of the response is hashed as it streams to the client and recorded
//!   as retrieved when it ends (a part cut short is recorded as aborted).
//! - Everything else is forwarded unchanged (headers, bodies, upgrades).

use std::convert::Infallible;
use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use medmesh_core::record::{AuditRecord, EventKind, Outcome, RecordId};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument as _;

use crate::archive::staging::StagedSet;
use crate::archive::{StageWriter, Staging};
use crate::audit;
use crate::dicom::part10::{Part10Observed, Part10Observer};
use crate::dicom_proxy::{AuditCtx, now_us};
use crate::multipart::{MultipartReader, Part, boundary_of, media_type, param};

type BoxError = Box<dyn StdError + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// Largest STOW-RS response read to learn per-instance outcomes (larger ones stream, and the
/// HTTP status alone gives the outcome).
const MAX_STOW_RESPONSE: usize = 4 << 20;
/// Concurrent HTTP/2 streams per client connection (bounds the responses held at once).
const MAX_H2_STREAMS: u32 = 32;
/// How long an HTTP/1 client may take to send a request head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The DICOMweb transaction a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transaction {
    /// STOW-RS store of `multipart/related` DICOM parts.
    Stow,
    /// WADO-RS retrieval of a study, series or instance.
    Wado,
}

/// The path's segments as the application routes them: percent-decoded, matrix parameters
/// (`;…`) removed, `.` and `..` resolved, empty segments dropped. `None` when a segment does
/// not decode to UTF-8 (refused for a store: the application might read it otherwise).
pub fn segments(path: &str) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for raw in path.split('?').next().unwrap_or("").split('/') {
        let raw = raw.split(';').next().unwrap_or("");
        let mut bytes = Vec::with_capacity(raw.len());
        let b = raw.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if b[i] == b'%'
                && let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                )
            {
                bytes.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
            bytes.push(b[i]);
            i += 1;
        }
        let seg = String::from_utf8(bytes).ok()?;
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    Some(out)
}

/// Which transaction `method path` is, if any. Every POST to `…/studies[/{study}]` is a store,
/// whatever its content type: one the sidecar cannot follow is refused, never let through.
pub fn classify(method: &Method, path: &str) -> Option<Transaction> {
    let Some(segs) = segments(path) else {
        // Undecodable: a store is refused, anything else passes unobserved.
        return (method == Method::POST).then_some(Transaction::Stow);
    };
    let at = segs
        .iter()
        .rposition(|s| s.eq_ignore_ascii_case("studies"))?;
    let rest: Vec<&str> = segs[at + 1..].iter().map(String::as_str).collect();
    if method == Method::POST {
        return (rest.len() <= 1).then_some(Transaction::Stow);
    }
    if method == Method::GET {
        // studies/{s}, studies/{s}/series/{r}, studies/{s}/series/{r}/instances/{i}.
        let shape = matches!(
            rest.as_slice(),
            [_] | [_, "series", _] | [_, "series", _, "instances", _]
        );
        return shape.then_some(Transaction::Wado);
    }
    None
}

/// The one content type of a store request the sidecar can follow: `multipart/related` with a
/// single `type="application/dicom"` and a single boundary. Anything else (missing, repeated,
/// not UTF-8, duplicate parameters, other part types) is refused with the reason.
pub fn stow_content_type(values: &[&HeaderValue]) -> Result<String, String> {
    let [v] = values else {
        return Err(format!(
            "a store needs exactly one Content-Type header, got {}",
            values.len()
        ));
    };
    let ct = v
        .to_str()
        .map_err(|_| "the Content-Type header is not ASCII".to_owned())?;
    if media_type(ct) != "multipart/related" {
        return Err(format!(
            "only multipart/related stores of application/dicom parts are audited, not {}",
            media_type(ct)
        ));
    }
    for name in ["type", "boundary"] {
        let n = ct
            .split(';')
            .skip(1)
            .filter(|p| {
                p.split_once('=')
                    .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            })
            .count();
        if n != 1 {
            return Err(format!(
                "the Content-Type needs exactly one {name} parameter"
            ));
        }
    }
    if !is_multipart_dicom(ct) {
        return Err(
            "only multipart/related stores of application/dicom parts are audited".to_owned(),
        );
    }
    Ok(ct.to_owned())
}

/// `multipart/related` whose root type is `application/dicom`.
fn is_multipart_dicom(ct: &str) -> bool {
    media_type(ct) == "multipart/related"
        && param(ct, "type").is_some_and(|t| t.eq_ignore_ascii_case("application/dicom"))
}

/// The instances seen in one body.
#[derive(Debug, Default)]
pub struct Parts {
    reader: Option<MultipartReader>,
    /// Observe every part, whatever its declared type (a store: the application decides).
    every_part: bool,
    current: Option<Part10Observer>,
    /// Where stored instances are sealed for the archive, when archiving a store.
    staging: Option<Arc<Staging>>,
    /// The archive copy of the current part.
    current_stage: Option<StageWriter>,
    /// Completed instances, in order.
    pub done: Vec<Part10Observed>,
    /// Their archive copies (same order as `done`), when archiving; whoever takes them commits
    /// or discards them (what is left is discarded when the parts are dropped).
    pub staged: StagedSet,
    /// A part that the body ended inside (cut short).
    pub cut: Option<Part10Observed>,
    /// The body ended where it should (closing delimiter, or end of a single instance).
    pub complete: bool,
    /// Why the body could not be followed.
    pub error: Option<String>,
}

impl Parts {
    /// The parts of a `multipart/related` body with content type `ct` (a response: parts
    /// declared `application/dicom` are instances).
    ///
    /// # Errors
    /// When `ct` has no valid boundary.
    pub fn multipart(ct: &str) -> Result<Self, String> {
        let b = boundary_of(ct).ok_or_else(|| "multipart body without a boundary".to_owned())?;
        let reader = MultipartReader::new(&b).map_err(|e| e.to_string())?;
        Ok(Self {
            reader: Some(reader),
            ..Self::default()
        })
    }

    /// The parts of a store request: no preamble, one Content-Type per part at most, and every
    /// part observed as an instance whatever it declares.
    ///
    /// # Errors
    /// When `ct` has no valid boundary.
    pub fn store(ct: &str) -> Result<Self, String> {
        let b = boundary_of(ct).ok_or_else(|| "multipart body without a boundary".to_owned())?;
        let reader = MultipartReader::strict(&b).map_err(|e| e.to_string())?;
        Ok(Self {
            reader: Some(reader),
            every_part: true,
            ..Self::default()
        })
    }

    /// A body that is one instance (`application/dicom`).
    pub fn single() -> Self {
        Self {
            current: Some(Part10Observer::new()),
            ..Self::default()
        }
    }

    /// Seals every instance of the body into `staging` too (a store, when archiving).
    pub fn with_archive(mut self, staging: Option<Arc<Staging>>) -> Self {
        if self.reader.is_none() && self.current.is_some() {
            self.current_stage = staging.as_ref().map(|s| s.begin());
        }
        self.staged = StagedSet::new(staging.clone());
        self.staging = staging;
        self
    }

    /// Observes the next bytes of the body.
    pub fn feed(&mut self, b: &[u8]) {
        if self.error.is_some() || self.complete && self.reader.is_some() {
            return;
        }
        let Some(reader) = self.reader.as_mut() else {
            if let Some(c) = self.current.as_mut() {
                c.feed(b);
            }
            if let Some(w) = self.current_stage.as_mut() {
                w.write(b);
            }
            return;
        };
        let (current, done, complete) = (&mut self.current, &mut self.done, &mut self.complete);
        let (stage, staged, staging) = (
            &mut self.current_stage,
            &mut self.staged,
            self.staging.as_ref(),
        );
        let every_part = self.every_part;
        let mut dup = false;
        let r = reader.feed(b, |p| match p {
            Part::Start(headers) => {
                let mut types = headers.iter().filter(|(k, _)| k == "content-type");
                let first = types.next();
                dup |= types.next().is_some();
                let dicom =
                    every_part || first.is_none_or(|(_, v)| media_type(v) == "application/dicom");
                *current = dicom.then(Part10Observer::new);
                *stage = staging.filter(|_| dicom).map(|s| s.begin());
            }
            Part::Data(d) => {
                if let Some(c) = current.as_mut() {
                    c.feed(d);
                }
                if let Some(w) = stage.as_mut() {
                    w.write(d);
                }
            }
            Part::End => {
                if let Some(c) = current.take() {
                    done.push(c.finish());
                    if staging.is_some() {
                        staged.push(stage.take().map(StageWriter::finish));
                    }
                }
            }
            Part::Finished => *complete = true,
        });
        if let Err(e) = r {
            self.error = Some(e.to_string());
        } else if dup && every_part {
            self.error = Some("a part has more than one Content-Type header".into());
        }
    }

    /// The body ended: `clean` when its stream said so, not when it was dropped or failed.
    pub fn end(&mut self, clean: bool) {
        if self.reader.is_none() {
            if let Some(c) = self.current.take() {
                if clean {
                    self.done.push(c.finish());
                    if self.staging.is_some() {
                        self.staged
                            .push(self.current_stage.take().map(StageWriter::finish));
                    }
                    self.complete = true;
                } else {
                    self.cut = Some(c.finish());
                }
            }
        } else if !self.complete {
            self.cut = self.current.take().map(Part10Observer::finish);
        }
    }
}

type Shared = Arc<Mutex<Parts>>;

fn lock(p: &Shared) -> std::sync::MutexGuard<'_, Parts> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A body passed through unchanged while its bytes are observed; `on_end` runs once, when the
/// body ended or was dropped.
struct Tap<B> {
    inner: B,
    parts: Option<Shared>,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<B> Tap<B> {
    fn finish(&mut self, clean: bool) {
        if let Some(p) = &self.parts {
            lock(p).end(clean);
        }
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

impl<B> Drop for Tap<B> {
    fn drop(&mut self) {
        if self.on_end.is_some() {
            self.finish(false);
        }
    }
}

impl<B> Body for Tap<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(p)) = (f.data_ref(), &self.parts) {
                    lock(p).feed(d);
                }
            }
            Poll::Ready(None) => self.finish(true),
            _ => {}
        }
        r.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn tap<B>(
    inner: B,
    parts: Option<Shared>,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
) -> ProxyBody
where
    B: Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    BoxBody::new(Tap {
        inner,
        parts,
        on_end,
    })
}

fn text(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(BoxBody::new(
        http_body_util::Full::new(Bytes::from(format!("{msg}\n"))).map_err(|e| match e {}),
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A connection to the application in the client's HTTP version.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

/// Connects to the application (again, after it closed an idle connection).
pub type Reconnect<A> =
    Arc<dyn Fn() -> Pin<Box<dyn std::future::Future<Output = Option<A>> + Send>> + Send + Sync>;

/// The application side of one client connection. Applications close idle keep-alive
/// connections on their own schedule (Orthanc after 1 s); a request that finds the connection
/// closed, before any of it was sent, goes over a new one.
struct Upstream<A> {
    h2: bool,
    conn: tokio::sync::Mutex<Option<Conn>>,
    reconnect: Reconnect<A>,
}

async fn handshake<A>(app: A, h2: bool) -> Result<Conn, hyper::Error>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(app)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H2(send))
    } else {
        // Header names keep their case both ways, as an unproxied exchange would.
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .title_case_headers(false)
            .handshake(TokioIo::new(app))
            .await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Conn::H1(send))
    }
}

impl<A> Upstream<A>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn connect(&self) -> Result<Conn, String> {
        let app = (self.reconnect)()
            .await
            .ok_or_else(|| "cannot reach the application".to_owned())?;
        handshake(app, self.h2).await.map_err(|e| e.to_string())
    }

    async fn send(&self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, String> {
        // HTTP/1 requests on one connection are sequential: the lock is held until the
        // response head. HTTP/2 streams share the connection: it is held only to clone it.
        let mut slot = self.conn.lock().await;
        for attempt in 0..2 {
            let ready = match slot.as_mut() {
                Some(Conn::H1(s)) => s.ready().await.is_ok(),
                Some(Conn::H2(s)) => s.ready().await.is_ok(),
                None => false,
            };
            if !ready {
                *slot = Some(self.connect().await?);
            }
            let sent = match slot.as_mut() {
                Some(Conn::H1(s)) => s.try_send_request(req).await,
                Some(Conn::H2(s)) => {
                    let mut s = s.clone();
                    drop(slot);
                    return s.send_request(req).await.map_err(|e| e.to_string());
                }
                None => return Err("no application connection".into()),
            };
            match sent {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection closed under it; once more on a new one.
                    Some(back) if attempt == 0 => {
                        req = back;
                        *slot = None;
                    }
                    _ => return Err(e.into_error().to_string()),
                },
            }
        }
        Err("the application closed the connection twice".into())
    }
}

/// Serves one HTTP connection from the mTLS peer `client` to the application: `app` is a
/// connection already open, `reconnect` opens another. `h2` when the client's first bytes were
/// the HTTP/2 preface. Returns when the client connection ended.
pub async fn serve<C, A>(client: C, app: A, reconnect: Reconnect<A>, h2: bool, ctx: AuditCtx)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ctx);
    let first = match handshake(app, h2).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "handshake with the application failed");
            return;
        }
    };
    let upstream = Arc::new(Upstream {
        h2,
        conn: tokio::sync::Mutex::new(Some(first)),
        reconnect,
    });
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (up, ctx) = (upstream.clone(), ctx.clone());
        async move {
            // Classified once: the span and the handler both need it.
            let tx = classify(req.method(), req.uri().path());
            let span = request_span(&req, tx, &ctx);
            let resp = handle(req, tx, &*up, ctx).instrument(span.clone()).await;
            span.record("http.response.status_code", resp.status().as_u16());
            if resp.status().is_server_error() {
                span.record("otel.status_code", "error");
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let io = TokioIo::new(client);
    let r = if h2 {
        // Each stream may hold a STOW-RS response (up to MAX_STOW_RESPONSE): bound them.
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .preserve_header_case(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(io, svc)
            .with_upgrades()
            .await
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// The `dicomweb.request` server span of one request: the method, which transaction it is
/// (`stow`, `wado` or `other`), the two workloads and the response status; never the path or
/// the query (they name studies). Each instance stored or retrieved is a `dicom.instance`
/// child (see [`crate::dicom_proxy::proxy`]); a store's ledger append is a child too.
fn request_span(req: &Request<Incoming>, tx: Option<Transaction>, ctx: &AuditCtx) -> tracing::Span {
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    };
    let tx = match tx {
        Some(Transaction::Stow) => "stow",
        Some(Transaction::Wado) => "wado",
        None => "other",
    };
    tracing::debug_span!(
        "dicomweb.request",
        otel.kind = "server",
        http.request.method = method,
        medmesh.transaction = tx,
        medmesh.peer = %ctx.requestor,
        medmesh.workload = %ctx.acceptor,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

async fn handle<A>(
    mut req: Request<Incoming>,
    tx: Option<Transaction>,
    up: &Upstream<A>,
    ctx: Arc<AuditCtx>,
) -> Response<ProxyBody>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Only WebSocket upgrades pass: after any other (h2c…) the exchange could not be followed.
    if let Some(u) = req.headers().get(header::UPGRADE) {
        let websocket = u
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
        if !websocket || tx.is_some() {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "medmesh: this upgrade cannot be audited and is refused",
            );
        }
    }
    let upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let stow = match tx {
        Some(Transaction::Stow) => {
            let values: Vec<&HeaderValue> =
                req.headers().get_all(header::CONTENT_TYPE).iter().collect();
            let staging = ctx.archive.as_ref().map(|a| a.staging.clone());
            let parts = stow_content_type(&values)
                .and_then(|ct| Parts::store(&ct))
                .map(|p| p.with_archive(staging));
            match parts {
                Ok(p) => Some(Arc::new(Mutex::new(p))),
                Err(e) => {
                    return text(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        &format!("medmesh: this store cannot be audited: {e}"),
                    );
                }
            }
        }
        _ => None,
    };
    let req = req.map(|b| tap(b, stow.clone(), None));
    let mut resp = match up.send(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "application request failed");
            if let Some(parts) = &stow {
                // Whatever reached the application may be stored: recorded as not confirmed.
                record_unconfirmed(parts, &ctx).await;
            }
            return text(StatusCode::BAD_GATEWAY, "the application did not answer");
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_up) = upgrade
    {
        let app_up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(a)) = (client_up.await, app_up.await) {
                let (mut c, mut a) = (TokioIo::new(c), TokioIo::new(a));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut a).await;
            }
        });
    }
    match (tx, stow) {
        (Some(Transaction::Stow), Some(parts)) => stow_response(resp, parts, &ctx).await,
        // 200 only: a 206 carries part of an instance.
        (Some(Transaction::Wado), _) if resp.status() == StatusCode::OK => wado_response(resp, ctx),
        _ => resp.map(|b| tap(b, None, None)),
    }
}

/// Per-instance outcomes named by a STOW-RS response (DICOM JSON): SOP Instance UIDs of the
/// Failed SOP Sequence (0008,1198), and of Referenced SOP Sequence (0008,1199) items that carry
/// a Warning Reason (0008,1196).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StowOutcomes {
    /// Instances the application refused.
    pub failed: Vec<String>,
    /// Instances stored with a warning.
    pub warned: Vec<String>,
    /// Instances stored.
    pub stored: Vec<String>,
}

/// Reads the outcomes from a DICOM JSON STOW-RS response body; `None` when it is not one.
pub fn stow_outcomes(body: &[u8]) -> Option<StowOutcomes> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    // A bare object, or an array of one.
    let obj = match &v {
        serde_json::Value::Array(a) => a.first()?,
        o => o,
    };
    let uids = |seq: &str, need: Option<&str>| -> Vec<String> {
        obj.get(seq)
            .and_then(|s| s.get("Value"))
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter(|item| need.is_none_or(|t| item.get(t).is_some()))
            .filter_map(|item| {
                item.get("00081155")?
                    .get("Value")?
                    .as_array()?
                    .first()?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    };
    Some(StowOutcomes {
        failed: uids("00081198", None),
        warned: uids("00081199", Some("00081196")),
        stored: uids("00081199", None),
    })
}

/// The outcome of one stored part given the response.
fn part_outcome(status: StatusCode, uid: Option<&str>, named: Option<&StowOutcomes>) -> Outcome {
    // The response names what happened to each instance, whatever its status (an application
    // may store part of a batch and answer 409).
    match (named, uid) {
        (Some(n), Some(u)) if n.failed.iter().any(|f| f == u) => Outcome::Failure,
        (Some(n), Some(u)) if n.warned.iter().any(|f| f == u) => Outcome::Warning,
        (Some(n), Some(u)) if n.stored.iter().any(|f| f == u) => Outcome::Success,
        _ if !status.is_success() => Outcome::Failure,
        // Not named: 200 means all stored; 202 means some were not, so not this one for sure.
        _ if status == StatusCode::OK => Outcome::Success,
        _ => Outcome::Warning,
    }
}

/// `rec` as the client saw it: a failure with `status`, under a new record id (the original
/// may already be in the ledger if only its acknowledgement was lost; both then stand).
fn as_failure(mut rec: AuditRecord, status: Option<u16>, outcome: Outcome) -> AuditRecord {
    if let Ok(id) = RecordId::new() {
        rec.record_id = id;
    }
    rec.status = status;
    rec.outcome = outcome;
    rec
}

/// Records the parts of a store whose answer never came (or broke): they may be stored.
async fn record_unconfirmed(parts: &Shared, ctx: &AuditCtx) {
    let seen: Vec<Part10Observed> = {
        let mut p = lock(parts);
        let mut v = std::mem::take(&mut p.done);
        v.extend(p.cut.take());
        let staged = p.staged.take();
        if let Some(a) = &ctx.archive {
            for s in staged {
                a.discard(s);
            }
        }
        v
    };
    let recs: Vec<AuditRecord> = seen
        .iter()
        .filter_map(|part| {
            audit::dicomweb_record(
                part,
                EventKind::InstanceStored,
                &ctx.requestor,
                &ctx.acceptor,
                &ctx.key,
                None,
                Outcome::Aborted,
                now_us(),
            )
            .ok()
        })
        .collect();
    ctx.delivery.later_all(recs).await;
}

async fn stow_response(
    resp: Response<Incoming>,
    parts: Shared,
    ctx: &AuditCtx,
) -> Response<ProxyBody> {
    let status = resp.status();
    let (head, mut body) = resp.into_parts();
    // Read a small response whole: it names per-instance failures, and it must be held anyway
    // until the records are safe.
    let mut held = Vec::new();
    let mut rest = None;
    loop {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    held.extend_from_slice(d);
                }
                if held.len() > MAX_STOW_RESPONSE {
                    rest = Some(body);
                    break;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "STOW-RS response failed mid-body");
                record_unconfirmed(&parts, ctx).await;
                return text(StatusCode::BAD_GATEWAY, "the application's response failed");
            }
            None => break,
        }
    }
    let named = if rest.is_none()
        && head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| media_type(ct).ends_with("json"))
    {
        stow_outcomes(&held)
    } else {
        None
    };
    let (done, complete, error, mut staged) = {
        let mut p = lock(&parts);
        (
            std::mem::take(&mut p.done),
            p.complete,
            p.error.take(),
            p.staged.take(),
        )
    };
    staged.resize_with(done.len(), || None);
    let mut gated_staged = Vec::new();
    // One span per instance, ended when this function returns (after the records are safe).
    let mut gated_spans = Vec::new();
    let requestor = &ctx.requestor;
    let acceptor = &ctx.acceptor;
    let mut gated = Vec::new();
    let mut later = Vec::new();
    let mut no_id = false;
    for (part, staged) in done.iter().zip(staged) {
        let uid = part
            .dataset
            .as_ref()
            .and_then(|d| d.sop_instance_uid.as_deref());
        let outcome = part_outcome(status, uid, named.as_ref());
        let rec = match audit::dicomweb_record(
            part,
            EventKind::InstanceStored,
            requestor,
            acceptor,
            &ctx.key,
            Some(status.as_u16()),
            outcome,
            now_us(),
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot make a record id");
                no_id = true;
                if let Some(a) = &ctx.archive {
                    a.discard(staged);
                }
                continue;
            }
        };
        let span = crate::dicom_proxy::instance_span(&rec);
        // Only what the client takes as stored waits for its record.
        if status.is_success() && matches!(outcome, Outcome::Success | Outcome::Warning) {
            gated.push(rec);
            gated_staged.push(staged);
            gated_spans.push(span);
        } else {
            later.push(rec);
            if let Some(a) = &ctx.archive {
                a.discard(staged);
            }
        }
    }
    // Every instance the application says it stored must be one the sidecar saw.
    let unseen = named.as_ref().and_then(|n| {
        n.stored.iter().find(|u| {
            !done.iter().any(|p| {
                p.dataset
                    .as_ref()
                    .and_then(|d| d.sop_instance_uid.as_deref())
                    == Some(u.as_str())
            })
        })
    });
    // A success that cannot be matched to every instance sent must not reach the client.
    let why = if !status.is_success() {
        None
    } else if let Some(e) = &error {
        Some(e.clone())
    } else if !complete {
        Some("body ended before its closing delimiter".to_owned())
    } else if unseen.is_some() {
        Some("the application stored an instance the sidecar did not see".to_owned())
    } else if no_id {
        Some("a record id could not be made".to_owned())
    } else {
        None
    };
    let mut failed = why.is_some();
    if let Some(why) = why {
        tracing::warn!(reason = %why, "STOW-RS request could not be followed: the success is withheld");
    }
    // The archive copies are made durable first (see `dicom_proxy::gate`).
    let mut archived = Vec::new();
    if let Some(a) = &ctx.archive {
        for (rec, staged) in gated.iter().zip(gated_staged) {
            if failed {
                a.discard(staged);
                continue;
            }
            let id = staged.as_ref().and_then(|s| s.as_ref().ok()).map(|s| s.id);
            match a.settle(staged, rec).await {
                Ok(()) => archived.extend(id),
                Err(e) => {
                    tracing::warn!(error = %e, "archive copy not safe (archive mode required): the success is withheld");
                    failed = true;
                }
            }
        }
    }
    if !failed && let Err(e) = ctx.delivery.commit_all(gated.clone()).await {
        tracing::warn!(error = %e, "STOW-RS records not safe: the success is withheld");
        failed = true;
    }
    if failed && let Some(a) = &ctx.archive {
        for id in &archived {
            a.staging.withdraw(id);
        }
    }
    if failed {
        for span in &gated_spans {
            span.record("otel.status_code", "error");
        }
        ctx.metrics
            .failed_responses
            .inc_by(gated.len().max(1) as u64);
        // Keep what the client is told: a failure.
        let status = Some(StatusCode::SERVICE_UNAVAILABLE.as_u16());
        later.extend(
            gated
                .into_iter()
                .map(|r| as_failure(r, status, Outcome::Failure)),
        );
        ctx.delivery.later_all(later).await;
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "medmesh: the stored instances could not be recorded in the audit ledger; retry",
        );
    }
    ctx.delivery.later_all(later).await;
    let body = http_body_util::Full::new(Bytes::from(held));
    let body: ProxyBody = match rest {
        None => BoxBody::new(body.map_err(|e| match e {})),
        Some(rest) => BoxBody::new(Chain {
            first: Some(body),
            rest,
        }),
    };
    Response::from_parts(head, body)
}

/// `first`, then `rest`.
struct Chain<A, B> {
    first: Option<A>,
    rest: B,
}

impl<A, B> Body for Chain<A, B>
where
    A: Body<Data = Bytes, Error = Infallible> + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(a) = self.first.as_mut() {
            match Pin::new(a).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => return Poll::Ready(Some(Ok(f))),
                Poll::Ready(Some(Err(e))) => match e {},
                Poll::Ready(None) => self.first = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(Into::into)))
    }
}

fn wado_response(resp: Response<Incoming>, ctx: Arc<AuditCtx>) -> Response<ProxyBody> {
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = if media_type(ct) == "multipart/related" {
        match Parts::multipart(ct) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "WADO-RS response not followed");
                return resp.map(|b| tap(b, None, None));
            }
        }
    } else if media_type(ct) == "application/dicom" {
        Parts::single()
    } else {
        // Metadata, rendered or bulk data: not an instance transfer.
        return resp.map(|b| tap(b, None, None));
    };
    let status = resp.status().as_u16();
    let parts = Arc::new(Mutex::new(parts));
    let seen = parts.clone();
    // The request's span lasts until the body ends: its instances are its children.
    let request = tracing::Span::current();
    let on_end: Box<dyn FnOnce() + Send + Sync> = Box::new(move || {
        let (done, cut) = {
            let mut p = lock(&seen);
            (std::mem::take(&mut p.done), p.cut.take())
        };
        let mut recs = Vec::new();
        let all = done
            .iter()
            .map(|d| (d, Outcome::Success))
            .chain(cut.iter().map(|d| (d, Outcome::Aborted)));
        for (part, outcome) in all {
            match audit::dicomweb_record(
                part,
                EventKind::InstanceRetrieved,
                &ctx.requestor,
                &ctx.acceptor,
                &ctx.key,
                Some(status),
                outcome,
                now_us(),
            ) {
                Ok(r) => {
                    drop(request.in_scope(|| crate::dicom_proxy::instance_span(&r)));
                    recs.push(r);
                }
                Err(e) => tracing::error!(error = %e, "cannot make a record id"),
            }
        }
        drop(request);
        if recs.is_empty() {
            return;
        }
        // Spooling is blocking work; the body may be dropped outside a task.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move { ctx.delivery.later_all(recs).await });
            }
            Err(_) => {
                ctx.metrics
                    .records
                    .with_label_values(&["dropped"])
                    .inc_by(recs.len() as u64);
                tracing::error!(
                    records = recs.len(),
                    "retrieval records dropped: no runtime to spool them"
                );
            }
        }
    });
    resp.map(|b| tap(b, Some(parts), Some(on_end)))
}

#[cfg(test)]
mod tests;
