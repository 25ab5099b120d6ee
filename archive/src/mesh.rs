//! HTTP/1.1 to a workload through its sidecar.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use medmesh_core::SpiffeId;
use medmesh_core::tls::{Identity, MESH_ALPN, ServerIdentity, TrustBundle};

use crate::ArchiveError;

pub use medmesh_httpc::{Body, empty};

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

/// Idle keep-alive connections kept per endpoint (and its clones), and for how long: below the
/// idle timeouts of the servers behind a sidecar (ipfs-cluster's REST API closes idle
/// connections after 120 s).
const KEEP: medmesh_httpc::Keep = medmesh_httpc::Keep {
    max: 8,
    idle_for: Duration::from_secs(20),
};

/// One HTTP endpoint (`http://host:port`), reached through the mesh (mTLS to the workload's
/// sidecar) or, without [`MeshTls`], in plaintext (loopback and tests only).
///
/// [`MeshEndpoint::call`] reuses keep-alive connections (shared by the endpoint's clones):
/// an uploader's add and its pin-status polls then cost one TLS handshake, not one each.
#[derive(Clone)]
pub struct MeshEndpoint {
    conns: medmesh_httpc::Endpoint,
    timeout: Duration,
}

impl std::fmt::Debug for MeshEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshEndpoint({:?})", self.conns)
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
        let (host, port) =
            medmesh_httpc::origin(url, "http", "the scheme must be http (the mesh adds TLS)")
                .map_err(|reason| bad(&reason))?;
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
            conns: medmesh_httpc::Endpoint::new(&host, port, tls, KEEP),
            timeout,
        })
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        self.conns.authority().to_owned()
    }

    fn target(&self, path: &str) -> String {
        format!("{}{path}", self.conns.authority())
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
        self.send_with(method, path_and_query, content_type, None, body)
            .await
    }

    /// [`MeshEndpoint::send`] with an `Authorization` header.
    ///
    /// # Errors
    /// As [`MeshEndpoint::send`]; also when `authorization` is not a valid header value.
    pub async fn send_with(
        &self,
        method: http::Method,
        path_and_query: &str,
        content_type: Option<&str>,
        authorization: Option<&str>,
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, ArchiveError> {
        let target = self.target(path_and_query);
        let work = async {
            let mut req = self.request(method, path_and_query, content_type, body)?;
            if let Some(a) = authorization {
                let mut v = http::HeaderValue::from_str(a).map_err(|_| {
                    transport(
                        &target,
                        "the Authorization value is not a valid header".into(),
                    )
                })?;
                v.set_sensitive(true);
                req.headers_mut().insert(http::header::AUTHORIZATION, v);
            }
            let mut send = self
                .conns
                .connect()
                .await
                .map_err(|e| transport(&target, e))?;
            send.send_request(req)
                .await
                .map_err(|e| transport(&target, format!("HTTP: {e}")))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| transport(&target, format!("no answer within {:?}", self.timeout)))?
    }

    fn request(
        &self,
        method: http::Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Body,
    ) -> Result<http::Request<Body>, ArchiveError> {
        let fail = |e: String| transport(&self.target(path_and_query), e);
        let mut req = self
            .conns
            .request(method, path_and_query, body)
            .map_err(fail)?;
        if let Some(ct) = content_type {
            let ct = http::HeaderValue::from_str(ct).map_err(|e| fail(e.to_string()))?;
            req.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        }
        Ok(req)
    }

    /// Sends a request and reads the whole answer (at most `limit` bytes), which must be a
    /// success. Kept connections are reused; a bodiless request (a GET) that fails on a kept
    /// connection, which the server may have closed as it was written, is sent once more on a
    /// new one; a request with a body (an upload) is not replayed.
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
        let req = self.request(method, path_and_query, content_type, body)?;
        let replay = (req.method() == http::Method::GET)
            .then(|| medmesh_httpc::copy_with_body(&req, empty()));
        let answer = self
            .conns
            .call(req, replay, limit, self.timeout)
            .await
            .map_err(|e| transport(&target, e))?;
        if !answer.status.is_success() {
            let body = &answer.body;
            return Err(ArchiveError::Status {
                target,
                status: answer.status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        Ok(answer.body)
    }
}

fn transport(target: &str, reason: String) -> ArchiveError {
    ArchiveError::Transport {
        target: target.to_owned(),
        reason,
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A loopback server: `serve` runs for each accepted connection; returns its URL and the
    /// number of connections accepted.
    async fn listen<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (url, conns)
    }

    /// An HTTP/1.1 server on loopback answering every request with its path; counts the
    /// connections it accepted. With `keep_alive` false it closes each after one answer.
    async fn server(keep_alive: bool) -> (String, Arc<AtomicUsize>) {
        listen(move |tcp| async move {
            let svc = hyper::service::service_fn(|req: http::Request<_>| async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from(req.uri().path().to_owned()),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(keep_alive)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        })
        .await
    }

    #[tokio::test]
    async fn calls_share_one_keep_alive_connection_and_survive_servers_that_close() {
        let (url, conns) = server(true).await;
        let ep = MeshEndpoint::new(&url, None, Duration::from_secs(5)).unwrap();
        // Clones (an upload's longer timeout) share the kept connections.
        let longer = ep.with_timeout(Duration::from_secs(9));
        for i in 0..3 {
            let path = format!("/a{i}");
            let got = ep
                .call(http::Method::GET, &path, None, empty(), 1024)
                .await
                .unwrap();
            assert_eq!(got, path.as_bytes());
            let got = longer
                .call(http::Method::POST, "/b", None, empty(), 1024)
                .await
                .unwrap();
            assert_eq!(got, "/b".as_bytes());
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one connection for six calls"
        );

        // A server that closes after each answer: every call still succeeds, each on its own
        // connection.
        let (url, conns) = server(false).await;
        let ep = MeshEndpoint::new(&url, None, Duration::from_secs(5)).unwrap();
        for i in 0..3 {
            let path = format!("/c{i}");
            let got = ep
                .call(http::Method::GET, &path, None, empty(), 1024)
                .await
                .unwrap();
            assert_eq!(got, path.as_bytes());
            tokio::task::yield_now().await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    /// A server that answers one request per connection with a keep-alive response, then
    /// closes the connection without a word shortly after.
    async fn silent_closer() -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        listen(|mut tcp| async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_get_on_a_connection_the_server_dropped_is_sent_again() {
        let (url, conns) = silent_closer().await;
        let ep = MeshEndpoint::new(&url, None, Duration::from_secs(5)).unwrap();
        for i in 0..4 {
            let got = ep
                .call(http::Method::GET, "/pins/x", None, empty(), 1024)
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(got, "ok".as_bytes());
            // The server drops the kept connection meanwhile; the client may or may not have
            // noticed by the next call.
            tokio::time::sleep(Duration::from_millis(10 + 20 * i)).await;
        }
        assert!(conns.load(Ordering::SeqCst) >= 2);
    }
}
