//! HTTP/1.1 to a workload through its sidecar.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;
use medmesh_core::SpiffeId;
use medmesh_core::tls::{Identity, MESH_ALPN, ServerIdentity, TrustBundle};

use crate::ArchiveError;

/// A request body: streamed, fallible with I/O errors (files).
pub type Body = BoxBody<Bytes, std::io::Error>;

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The mTLS settings for reaching a meshed workload.
#[derive(Clone)]
pub struct MeshTls {
    /// This workload's SVID.
    pub identity: Identity,
    /// The trust bundle.
    pub bundle: TrustBundle,
    /// The server's SPIFFE ID (pinned).
    pub server: SpiffeId,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("identity", self.identity.id())
            .field("server", &self.server)
            .finish()
    }
}

/// One HTTP endpoint (`http://host:port`), reached through the mesh (mTLS to the workload's
/// sidecar) or, without [`MeshTls`], in plaintext (loopback and tests only).
#[derive(Clone)]
pub struct MeshEndpoint {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
}

impl std::fmt::Debug for MeshEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MeshEndpoint({}:{}, {})",
            self.host,
            self.port,
            if self.tls.is_some() { "mesh" } else { "plain" }
        )
    }
}

impl MeshEndpoint {
    /// An endpoint at `url` (`http://host:port`; the scheme names the application protocol,
    /// the mesh adds TLS).
    ///
    /// # Errors
    /// When the URL is not `http://host[:port]` or the TLS configuration cannot be built.
    pub fn new(url: &str, tls: Option<&MeshTls>, timeout: Duration) -> Result<Self, ArchiveError> {
        let bad = |reason: &str| ArchiveError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("the scheme must be http (the mesh adds TLS)"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(bad("give only the scheme, host and port"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let tls = match tls {
            None => None,
            Some(t) => Some(Arc::new(
                medmesh_core::tls::client_config(
                    Some(&t.identity),
                    &t.bundle,
                    ServerIdentity::Exact(t.server.clone()),
                    // A sidecar terminates only TLS that offers the mesh's ALPN.
                    &[MESH_ALPN],
                )
                .map_err(|e| ArchiveError::Tls(e.to_string()))?,
            )),
        };
        Ok(Self {
            host,
            port,
            tls,
            timeout,
        })
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn target(&self, path: &str) -> String {
        format!("{}:{}{path}", self.host, self.port)
    }

    /// Sends one request on a new connection; the response head must arrive within the
    /// endpoint's timeout (the body is the caller's to read).
    ///
    /// # Errors
    /// When connecting, the handshake or the exchange fails.
    pub async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, ArchiveError> {
        let target = self.target(path_and_query);
        let fail = |reason: String| ArchiveError::Transport {
            target: target.clone(),
            reason,
        };
        let work = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| fail(format!("connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let mut req = http::Request::builder()
                .method(method)
                .uri(path_and_query)
                .header(http::header::HOST, self.authority());
            if let Some(ct) = content_type {
                req = req.header(http::header::CONTENT_TYPE, ct);
            }
            let req = req.body(body).map_err(|e| fail(e.to_string()))?;
            match &self.tls {
                Some(cfg) => {
                    let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                        .map_err(|e| fail(format!("server name: {e}")))?;
                    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| fail(format!("TLS: {e}")))?;
                    exchange(hyper_util::rt::TokioIo::new(tls), req)
                        .await
                        .map_err(fail)
                }
                None => exchange(hyper_util::rt::TokioIo::new(tcp), req)
                    .await
                    .map_err(fail),
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))?
    }

    /// Sends a request and reads the whole answer (at most `limit` bytes), which must be a
    /// success.
    ///
    /// # Errors
    /// Transport errors, an error status, or an answer over the limit.
    pub async fn call(
        &self,
        method: http::Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Body,
        limit: usize,
    ) -> Result<Bytes, ArchiveError> {
        let target = self.target(path_and_query);
        let resp = self
            .send(method, path_and_query, content_type, body)
            .await?;
        let status = resp.status();
        let body = tokio::time::timeout(
            self.timeout,
            http_body_util::Limited::new(resp.into_body(), limit).collect(),
        )
        .await
        .map_err(|_| ArchiveError::Transport {
            target: target.clone(),
            reason: format!("answer not complete within {:?}", self.timeout),
        })?
        .map_err(|e| ArchiveError::Transport {
            target: target.clone(),
            reason: format!("reading the answer: {e}"),
        })?
        .to_bytes();
        if !status.is_success() {
            return Err(ArchiveError::Status {
                target,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        Ok(body)
    }
}

async fn exchange<I>(
    io: I,
    req: http::Request<Body>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))
}

impl MeshEndpoint {
    /// The same endpoint with another timeout (uploads scale it with their size).
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }
}
