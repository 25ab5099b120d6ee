//! The two data paths.
//!
//! Inbound (connections redirected to the inbound listener): recover the original destination
//! port, read the first bytes, then either terminate medmesh mTLS (TLS 1.3, client SVID
//! required), authorize the peer for that port and forward to the application, or treat the
//! bytes as plaintext from outside the mesh, which only permissive ports accept.
//!
//! Outbound (connections the application opened, redirected to the outbound listener): recover
//! the original destination, route it by policy (mesh: originate mTLS to the original address,
//! optionally pinning the server identity; external: plaintext), and forward.
//!
//! Bytes are forwarded unchanged in both directions, half-closes included. Each connection is
//! counted once, when it ends, from a guard, so that a drain cannot lose the record.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use medmesh_core::policy::{Decision, Policy, ProtocolHint, Route};
use medmesh_core::tls::{SvidError, spiffe_id_of};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::Config;
use crate::detect::{self, Detected, MAX_PEEK};
use crate::identity::Credentials;
use crate::metrics::Metrics;

/// Copy buffer per direction: large enough for bulk transfers without many syscalls.
const COPY_BUF: usize = 64 * 1024;
/// Bytes of the first client read kept for protocol detection on the plaintext side.
const SNIFF: usize = 64;

/// What the proxies share.
#[derive(Clone)]
pub struct Shared {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Current credentials (`None` until loaded).
    pub creds: watch::Receiver<Option<Arc<Credentials>>>,
    /// Current policy.
    pub policy: watch::Receiver<Arc<Policy>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Open connections, for the drain.
    pub conns: Tracker,
    /// Auditing of DICOM ports, when configured.
    pub audit: Option<Arc<Audit>>,
}

/// What the DICOM path needs to record transfers.
pub struct Audit {
    /// Delivery to the ledger.
    pub delivery: Arc<crate::deliver::Delivery>,
    /// The tenant's UID key.
    pub key: Arc<medmesh_core::record::UidKey>,
    /// Archiving of stored instances, when configured.
    pub archive: Option<Arc<crate::archive::Archiver>>,
}

/// Counts open connections; the drain waits for zero.
#[derive(Clone, Debug)]
pub struct Tracker {
    open: Arc<watch::Sender<usize>>,
    /// Turns true at the drain deadline: remaining connections are cut.
    cut: watch::Receiver<bool>,
}

impl Tracker {
    /// A tracker and the sender that cuts connections.
    pub fn new() -> (Self, watch::Sender<bool>) {
        let (cut_tx, cut) = watch::channel(false);
        (
            Self {
                open: Arc::new(watch::channel(0).0),
                cut,
            },
            cut_tx,
        )
    }

    fn enter(&self) -> Entered {
        self.open.send_modify(|n| *n += 1);
        Entered(self.open.clone())
    }

    /// Resolves when no connection is open.
    pub async fn idle(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }
}

struct Entered(Arc<watch::Sender<usize>>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Why a connection was not proxied; `reason` labels the metric.
#[derive(Debug)]
struct Refused {
    reason: &'static str,
    detail: String,
}

fn refused(reason: &'static str, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        detail: detail.into(),
    }
}

/// The per-connection record, emitted once when the connection ends (from `Drop`).
struct ConnRecord {
    metrics: Metrics,
    direction: &'static str,
    protocol: &'static str,
    tls: &'static str,
    to_app: u64,
    from_app: u64,
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.connections
            .with_label_values(&[self.direction, self.protocol, self.tls])
            .inc();
        m.bytes
            .with_label_values(&[self.direction, "from_app"])
            .inc_by(self.from_app);
        m.bytes
            .with_label_values(&[self.direction, "to_app"])
            .inc_by(self.to_app);
    }
}

/// The original destination of a redirected connection, if it was redirected.
fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let dst = sock.original_dst_v4().ok()?.as_socket()?;
    // A connection that was not NATed reports no original destination; guard anyway against a
    // destination that is this listener itself.
    (Some(dst) != tcp.local_addr().ok()).then_some(dst)
}

/// Accepts on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    sh: Shared,
    inbound: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let direction = if inbound { "inbound" } else { "outbound" };
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(direction, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let sh = sh.clone();
        tokio::spawn(async move {
            let _entered = sh.conns.enter();
            sh.metrics.open.with_label_values(&[direction]).inc();
            let mut cut = sh.conns.cut.clone();
            let work = async {
                let r = if inbound {
                    // Audited connections carry the DICOM and DICOMweb state machines: on the
                    // heap, once per connection, rather than inline in every task.
                    Box::pin(inbound_conn(tcp, &sh)).await
                } else {
                    outbound_conn(tcp, &sh).await
                };
                if let Err(r) = r {
                    sh.metrics
                        .refused
                        .with_label_values(&[direction, r.reason])
                        .inc();
                    tracing::info!(direction, %peer, reason = r.reason, detail = %r.detail, "connection refused");
                }
            };
            tokio::select! {
                _ = work => {}
                _ = cut.wait_for(|c| *c) => {
                    sh.metrics.drain_cut.inc();
                }
            }
            sh.metrics.open.with_label_values(&[direction]).dec();
        });
    }
}

/// Reads until the first bytes decide the protocol, `MAX_PEEK` bytes, EOF or the timeout.
async fn read_detect<S: AsyncRead + Unpin>(
    tcp: &mut S,
    timeout: std::time::Duration,
) -> (Vec<u8>, Option<Detected>) {
    let mut buf = Vec::with_capacity(2048);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = detect::detect(&buf) {
            return (buf, Some(d));
        }
        if buf.len() >= MAX_PEEK {
            return (buf, Some(Detected::Opaque));
        }
        let mut chunk = [0u8; 4096];
        let want = (MAX_PEEK - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk[..want])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (buf, None),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn tls_reason(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "eof";
    }
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    use rustls::{CertificateError as C, Error as E};
    match err {
        E::InvalidCertificate(C::Expired) => "expired",
        E::InvalidCertificate(C::NotValidYet) => "not_yet_valid",
        E::InvalidCertificate(C::UnknownIssuer) => "unknown_issuer",
        E::InvalidCertificate(C::BadEncoding) => "malformed",
        E::InvalidCertificate(C::Other(o)) => {
            o.0.downcast_ref::<SvidError>()
                .map_or("invalid_certificate", SvidError::reason)
        }
        E::InvalidCertificate(_) => "invalid_certificate",
        E::NoCertificatesPresented => "no_certificate",
        E::PeerIncompatible(_) => "incompatible",
        E::AlertReceived(_) => "alert_received",
        _ => "other",
    }
}

/// Runs a TLS handshake with the connect timeout, counting a failure by its reason.
async fn handshake<T>(
    sh: &Shared,
    direction: &'static str,
    what: &str,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, Refused> {
    let (reason, detail) = match tokio::time::timeout(sh.cfg.connect_timeout, fut).await {
        Ok(Ok(t)) => return Ok(t),
        Ok(Err(e)) => (tls_reason(&e), e.to_string()),
        Err(_) => (
            "timeout",
            "no handshake within the connect timeout".to_owned(),
        ),
    };
    sh.metrics
        .handshake_failures
        .with_label_values(&[direction, reason])
        .inc();
    Err(refused("handshake", format!("{what}{reason}: {detail}")))
}

async fn connect(
    addr: SocketAddr,
    sh: &Shared,
    direction: &'static str,
) -> Result<TcpStream, Refused> {
    match tokio::time::timeout(sh.cfg.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            sh.metrics
                .connect_failures
                .with_label_values(&[direction])
                .inc();
            Err(refused("connect_failed", format!("{addr}: {e}")))
        }
        Err(_) => {
            sh.metrics
                .connect_failures
                .with_label_values(&[direction])
                .inc();
            Err(refused("connect_timeout", format!("{addr}: no answer")))
        }
    }
}

/// The `port` label of an authorization decision: the port when the policy declares it (a
/// bounded set the platform team chose), else `other` (so a scan of every port cannot grow
/// the series without bound).
fn port_label(policy: &Policy, port: u16) -> String {
    match policy.inbound(port) {
        Some(_) => port.to_string(),
        None => "other".to_owned(),
    }
}

async fn inbound_conn(mut tcp: TcpStream, sh: &Shared) -> Result<(), Refused> {
    let port = match (original_dst(&tcp), sh.cfg.dev_inbound_port) {
        (Some(dst), _) => dst.port(),
        (None, Some(p)) => p,
        (None, None) => return Err(refused("not_redirected", "no original destination")),
    };
    let policy = sh.policy.borrow().clone();
    let (buf, detected) = read_detect(&mut tcp, sh.cfg.detect_timeout).await;
    let app = SocketAddr::new(sh.cfg.app_host, port);
    let hint = policy.protocol(port);
    match detected {
        Some(d) if d.is_medmesh_tls() => {
            let Some(creds) = sh.creds.borrow().clone() else {
                return Err(refused(
                    "no_credentials",
                    "no workload certificate loaded yet",
                ));
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(creds.server.clone());
            let tls =
                handshake(sh, "inbound", "", acceptor.accept(Prefixed::new(buf, tcp))).await?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(spiffe_id_of);
            let peer = match peer {
                Some(Ok(id)) => id,
                _ => return Err(refused("handshake", "no peer identity")),
            };
            let decision = policy.authorize(port, &peer);
            sh.metrics
                .authz
                .with_label_values(&["mtls", decision.as_str(), &port_label(&policy, port)])
                .inc();
            if decision == Decision::AuditDeny {
                tracing::warn!(%peer, port, "audit mode: connection allowed that the policy denies");
            }
            if !decision.proceeds() {
                return Err(refused(
                    "denied",
                    format!("{peer} may not connect to port {port}"),
                ));
            }
            let upstream = connect(app, sh, "inbound").await?;
            match &sh.audit {
                Some(audit) if hint != ProtocolHint::Opaque => {
                    let ctx = crate::dicom_proxy::AuditCtx {
                        delivery: audit.delivery.clone(),
                        key: audit.key.clone(),
                        requestor: peer,
                        acceptor: creds.identity.id().clone(),
                        metrics: sh.metrics.clone(),
                        archive: audit.archive.clone(),
                    };
                    audited(tls, upstream, app, sh, hint, "mtls", ctx).await;
                }
                _ => proxy(Sniff::new(tls), upstream, sh, "inbound", hint, "mtls", true).await,
            }
        }
        other => {
            let decision = policy.allow_plaintext(port);
            sh.metrics
                .authz
                .with_label_values(&["plaintext", decision.as_str(), &port_label(&policy, port)])
                .inc();
            if !decision.proceeds() {
                let what = other.as_ref().map_or("silent", Detected::label);
                return Err(refused(
                    "plaintext",
                    format!("plaintext ({what}) to strict port {port}"),
                ));
            }
            let label = other.as_ref().map_or("opaque", Detected::label);
            let hint = if hint == ProtocolHint::Detect {
                label_hint(label)
            } else {
                hint
            };
            // Permissive plaintext is still audited: the sender is recorded as unauthenticated.
            let creds = sh.creds.borrow().clone();
            if sh.audit.is_some()
                && matches!(hint, ProtocolHint::Dicom | ProtocolHint::Http)
                && creds.is_none()
            {
                // Auditing needs this workload's identity: nothing passes unrecorded meanwhile.
                return Err(refused(
                    "no_credentials",
                    "no workload certificate loaded yet: audited plaintext refused",
                ));
            }
            if let (Some(audit), ProtocolHint::Dicom | ProtocolHint::Http, Some(creds)) =
                (&sh.audit, hint, creds)
            {
                let upstream = connect(app, sh, "inbound").await?;
                let requestor = format!("spiffe://{}/unauthenticated", sh.cfg.trust_domain)
                    .parse()
                    .map_err(|_| refused("config", "trust domain"))?;
                let ctx = crate::dicom_proxy::AuditCtx {
                    delivery: audit.delivery.clone(),
                    key: audit.key.clone(),
                    requestor,
                    acceptor: creds.identity.id().clone(),
                    metrics: sh.metrics.clone(),
                    archive: audit.archive.clone(),
                };
                audited(
                    Prefixed::new(buf, tcp),
                    upstream,
                    app,
                    sh,
                    hint,
                    "plaintext",
                    ctx,
                )
                .await;
                return Ok(());
            }
            let mut upstream = connect(app, sh, "inbound").await?;
            if !buf.is_empty()
                && let Err(e) = upstream.write_all(&buf).await
            {
                return Err(refused("io", e.to_string()));
            }
            proxy(tcp, upstream, sh, "inbound", hint, "plaintext", false).await;
        }
    }
    Ok(())
}

/// An audited inbound mTLS connection: DICOM associations and DICOMweb exchanges are followed
/// (see `dicom_proxy` and `dicomweb`); anything else is forwarded as it is. Unless the policy
/// names the protocol, it is detected from the first decrypted bytes.
async fn audited<C>(
    mut tls: C,
    upstream: TcpStream,
    app: SocketAddr,
    sh: &Shared,
    hint: ProtocolHint,
    tls_label: &'static str,
    ctx: crate::dicom_proxy::AuditCtx,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (first, label) = if hint == ProtocolHint::Dicom {
        (Vec::new(), "dicom")
    } else {
        let (b, d) = read_detect(&mut tls, sh.cfg.detect_timeout).await;
        let label = d.as_ref().map_or("opaque", Detected::label);
        (b, label)
    };
    // A port the policy names is always followed as such (HTTP that detection would miss,
    // after a pause or a leading CRLF, is still HTTP to the application). `detect` is best
    // effort: imaging ports should name their protocol.
    let proto = match hint {
        ProtocolHint::Dicom | ProtocolHint::Http => hint,
        _ => label_hint(label),
    };
    let client = Prefixed::new(first, tls);
    let counted = Counted::new(upstream);
    let (to_app, from_app) = (counted.written.clone(), counted.read.clone());
    let mut rec = ConnRecord {
        metrics: sh.metrics.clone(),
        direction: "inbound",
        protocol: "opaque",
        tls: tls_label,
        to_app: 0,
        from_app: 0,
    };
    match proto {
        ProtocolHint::Dicom => {
            rec.protocol = "dicom";
            crate::dicom_proxy::proxy(client, counted, ctx).await;
        }
        ProtocolHint::Http => {
            rec.protocol = if label == "http2" { "http2" } else { "http1" };
            let (sh2, r, w) = (sh.clone(), from_app.clone(), to_app.clone());
            let reconnect: crate::dicomweb::Reconnect<Counted<TcpStream>> = Arc::new(move || {
                let (sh, r, w) = (sh2.clone(), r.clone(), w.clone());
                Box::pin(async move {
                    let s = connect(app, &sh, "inbound").await.ok()?;
                    Some(Counted::with(s, r, w))
                })
            });
            crate::dicomweb::serve(client, counted, reconnect, label == "http2", ctx).await;
        }
        _ => {
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut { client },
                &mut { counted },
                COPY_BUF,
                COPY_BUF,
            )
            .await;
        }
    }
    rec.to_app = to_app.load(std::sync::atomic::Ordering::Relaxed);
    rec.from_app = from_app.load(std::sync::atomic::Ordering::Relaxed);
    sh.metrics
        .detect
        .with_label_values(&["inbound", rec.protocol])
        .inc();
}

/// A stream that counts the bytes read from and written to it.
struct Counted<S> {
    inner: S,
    read: Arc<std::sync::atomic::AtomicU64>,
    written: Arc<std::sync::atomic::AtomicU64>,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Self::with(inner, Arc::default(), Arc::default())
    }

    /// Counts into existing counters (a reconnection of the same client connection).
    fn with(
        inner: S,
        read: Arc<std::sync::atomic::AtomicU64>,
        written: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self {
            inner,
            read,
            written,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = r {
            self.written
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn label_hint(label: &str) -> ProtocolHint {
    match label {
        "http1" | "http2" => ProtocolHint::Http,
        "dicom" => ProtocolHint::Dicom,
        _ => ProtocolHint::Opaque,
    }
}

async fn outbound_conn(tcp: TcpStream, sh: &Shared) -> Result<(), Refused> {
    let dst = match (original_dst(&tcp), sh.cfg.dev_outbound_dst) {
        (Some(d), _) => d,
        (None, Some(d)) => d,
        (None, None) => return Err(refused("not_redirected", "no original destination")),
    };
    let policy = sh.policy.borrow().clone();
    match policy.route(dst.ip(), dst.port()) {
        Route::External => {
            let upstream = connect(dst, sh, "outbound").await?;
            proxy(
                Sniff::new(tcp),
                upstream,
                sh,
                "outbound",
                ProtocolHint::Detect,
                "none",
                true,
            )
            .await;
        }
        Route::Mesh(expected) => {
            let Some(creds) = sh.creds.borrow().clone() else {
                return Err(refused(
                    "no_credentials",
                    "no workload certificate loaded yet",
                ));
            };
            let cfg = creds
                .client_for(&expected)
                .map_err(|e| refused("tls_config", e.to_string()))?;
            let upstream = connect(dst, sh, "outbound").await?;
            let connector = tokio_rustls::TlsConnector::from(cfg);
            let name = ServerName::IpAddress(dst.ip().into());
            let what = format!("{dst}: ");
            let tls = handshake(sh, "outbound", &what, connector.connect(name, upstream)).await?;
            proxy(
                Sniff::new(tcp),
                tls,
                sh,
                "outbound",
                ProtocolHint::Detect,
                "mtls",
                true,
            )
            .await;
        }
    }
    Ok(())
}

/// Forwards both ways until both directions have ended. `client` is the side the connection
/// came from; `client_is_app_side` tells which byte counter is which.
async fn proxy<C, U>(
    mut client: C,
    mut upstream: U,
    sh: &Shared,
    direction: &'static str,
    hint: ProtocolHint,
    tls: &'static str,
    sniffed: bool,
) where
    C: AsyncRead + AsyncWrite + Unpin + SniffSource,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut rec = ConnRecord {
        metrics: sh.metrics.clone(),
        direction,
        protocol: match hint {
            ProtocolHint::Dicom => "dicom",
            ProtocolHint::Http => "http",
            ProtocolHint::Opaque => "opaque",
            ProtocolHint::Detect => "unknown",
        },
        tls,
        to_app: 0,
        from_app: 0,
    };
    let r =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUF, COPY_BUF)
            .await;
    if let Ok((c2u, u2c)) = r {
        // Inbound: client -> upstream is towards the app. Outbound: the client is the app.
        if direction == "inbound" {
            (rec.to_app, rec.from_app) = (c2u, u2c);
        } else {
            (rec.from_app, rec.to_app) = (c2u, u2c);
        }
    }
    if sniffed && hint == ProtocolHint::Detect {
        let first = client.sniffed();
        let label = match detect::detect(first) {
            Some(d) => d.label(),
            None if first.is_empty() => "silent",
            None => "opaque",
        };
        sh.metrics
            .detect
            .with_label_values(&[direction, label])
            .inc();
        rec.protocol = label;
    } else {
        sh.metrics
            .detect
            .with_label_values(&[direction, rec.protocol])
            .inc();
    }
}

/// Access to the first bytes a stream produced.
trait SniffSource {
    fn sniffed(&self) -> &[u8] {
        &[]
    }
}

impl SniffSource for TcpStream {}

/// Records the first bytes read through it (up to [`SNIFF`]), for detection after the fact,
/// without delaying or copying the stream.
struct Sniff<S> {
    inner: S,
    first: Vec<u8>,
    done: bool,
}

impl<S> Sniff<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            first: Vec::new(),
            done: false,
        }
    }
}

impl<S> SniffSource for Sniff<S> {
    fn sniffed(&self) -> &[u8] {
        &self.first
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.done && buf.filled().len() > before {
            let new = &buf.filled()[before..];
            let take = new.len().min(SNIFF - self.first.len());
            let chunk = new[..take].to_vec();
            self.first.extend_from_slice(&chunk);
            self.done = self.first.len() >= SNIFF || detect::detect(&self.first).is_some();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A stream that first replays bytes already read from it (the detection prefix).
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
