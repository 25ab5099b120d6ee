//! HTTP/1.1 client connections to one endpoint (`host:port`), kept alive between requests,
//! over TLS (the mesh's mTLS, the ledger's API) or plaintext (loopback).
//!
//! Built on hyper's connection API rather than a general client: the callers (the ledger
//! client, the archive's cluster and gateway clients) always talk to one endpoint whose TLS
//! configuration they built, so there is no pool keyed by origin, no URL parsing or redirect
//! and retry layers per request. `bench/ledger` measured the ledger client's CPU per append
//! about a quarter lower than through `reqwest`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;

/// A request body: streamed, fallible with I/O errors (files).
pub type Body = BoxBody<Bytes, std::io::Error>;

/// The sending half of one HTTP/1.1 connection.
pub type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A connection that answered its last request whole and may carry the next one.
struct IdleConn {
    send: Sender,
    since: Instant,
}

/// How many idle connections an [`Endpoint`] keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    /// Idle connections kept at most (more are closed when their exchange ends).
    pub max: usize,
    /// An idle connection older than this is closed rather than used: below the server's
    /// own idle timeout, so the client never picks one just as the server closes it.
    pub idle_for: Duration,
}

/// How long a kept connection may take to turn to its next request before another is used.
const READY_WAIT: Duration = Duration::from_secs(1);

/// One endpoint and its kept connections, shared by the endpoint's clones.
#[derive(Clone)]
pub struct Endpoint {
    /// Host as given (an IPv6 literal in brackets), for `Host`.
    authority: String,
    /// Host to connect to and to name in TLS (brackets removed).
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    keep: Keep,
    idle: Arc<Mutex<Vec<IdleConn>>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Endpoint({}, {})",
            self.authority,
            if self.tls.is_some() { "TLS" } else { "plain" }
        )
    }
}

/// What one [`Endpoint::call`] got: the status and the whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: http::StatusCode,
    /// The body, read whole.
    pub body: Bytes,
}

impl Endpoint {
    /// The endpoint `host:port` (`host` as in a URL: a name, an IPv4 address or a bracketed
    /// IPv6 address), with TLS when `tls` is given.
    pub fn new(host: &str, port: u16, tls: Option<Arc<rustls::ClientConfig>>, keep: Keep) -> Self {
        Self {
            authority: format!("{host}:{port}"),
            host: host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
                .to_owned(),
            port,
            tls,
            keep,
            idle: Arc::default(),
        }
    }

    /// `host:port`, as sent in `Host`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A request for `path_and_query` with `Host` set.
    ///
    /// # Errors
    /// When `path_and_query` is not a valid request target.
    pub fn request(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Body,
    ) -> Result<http::Request<Body>, String> {
        http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, &self.authority)
            .body(body)
            .map_err(|e| e.to_string())
    }

    /// A new connection (TCP, then TLS when configured), its HTTP/1.1 handshake done.
    ///
    /// # Errors
    /// When connecting or a handshake fails; the message says which.
    pub async fn connect(&self) -> Result<Sender, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(cfg) => {
                let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("server name: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                handshake(hyper_util::rt::TokioIo::new(tls)).await
            }
            None => handshake(hyper_util::rt::TokioIo::new(tcp)).await,
        }
    }

    /// A kept connection that is open, if one is kept. One whose last answer was read whole
    /// but whose connection task has not yet turned to the next request is waited for: it
    /// becomes ready as soon as that task runs, or closes.
    async fn take_idle(&self) -> Option<Sender> {
        loop {
            let mut send = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let idle_for = self.keep.idle_for;
                idle.retain(|c| c.since.elapsed() < idle_for && !c.send.is_closed());
                idle.pop()?.send
            };
            if send.is_ready() {
                return Some(send);
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, send.ready()).await {
                return Some(send);
            }
        }
    }

    /// Keeps `send`, whose exchange was read whole, for the next request.
    pub fn keep(&self, send: Sender) {
        if send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keep.max {
            idle.push(IdleConn {
                send,
                since: Instant::now(),
            });
        }
    }

    /// One exchange on a kept connection, or on a new one when none is kept or the kept one
    /// closed before taking the request. A request that fails on a kept connection after it
    /// was written (the server may have closed the idle connection as it arrived, or reset
    /// it) is sent once more on a new connection when `replay` holds a copy: only requests
    /// safe to send twice come with one.
    ///
    /// # Errors
    /// When connecting or the exchange fails.
    pub async fn exchange(
        &self,
        req: http::Request<Body>,
        replay: Option<http::Request<Body>>,
    ) -> Result<(Sender, http::Response<hyper::body::Incoming>), String> {
        let fail = |e: hyper::Error| format!("HTTP: {e}");
        let req = match self.take_idle().await {
            Some(mut send) => match send.try_send_request(req).await {
                Ok(resp) => return Ok((send, resp)),
                Err(mut e) => match (e.take_message(), replay) {
                    // Never written: the server closed the idle connection first.
                    (Some(req), _) => req,
                    (None, Some(again)) => again,
                    (None, None) => return Err(fail(e.into_error())),
                },
            },
            None => req,
        };
        // Boxed: connecting (TCP, TLS) is rare and its future large; the exchange's stays small.
        let mut send = Box::pin(self.connect()).await?;
        let resp = send.send_request(req).await.map_err(fail)?;
        Ok((send, resp))
    }

    /// Sends a request and reads the whole answer (at most `limit` bytes), each within
    /// `timeout`; the connection is then kept for the next request. `replay` as in
    /// [`Endpoint::exchange`].
    ///
    /// # Errors
    /// Transport errors, timeouts, or an answer over the limit.
    pub async fn call(
        &self,
        req: http::Request<Body>,
        replay: Option<http::Request<Body>>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let (send, resp) = tokio::time::timeout(timeout, self.exchange(req, replay))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
        let status = resp.status();
        let body = tokio::time::timeout(
            timeout,
            http_body_util::Limited::new(resp.into_body(), limit).collect(),
        )
        .await
        .map_err(|_| format!("answer not complete within {timeout:?}"))?
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
        // Read whole: the connection may carry the next request.
        self.keep(send);
        Ok(Answer { status, body })
    }
}

/// The host and port of `url`, which must be `scheme://host[:port]` with nothing after the
/// authority but an optional `/` (the port defaults to the scheme's: 80 for http, 443 for
/// https). `scheme_reason` is the message when the scheme is another.
///
/// # Errors
/// A message saying what is wrong with `url`.
pub fn origin(url: &str, scheme: &str, scheme_reason: &str) -> Result<(String, u16), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    if uri.scheme_str() != Some(scheme) {
        return Err(scheme_reason.to_owned());
    }
    if uri
        .path_and_query()
        .is_some_and(|p| !matches!(p.as_str(), "" | "/"))
    {
        return Err("give only the scheme, host and port".to_owned());
    }
    let host = uri.host().ok_or("no host")?.to_owned();
    // `http::Uri` takes a port that is not a number for none: read it from the authority.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let after_host = authority
        .rsplit_once(']')
        .map_or(authority, |(_, rest)| rest);
    let port = match after_host.rsplit_once(':') {
        None => {
            if scheme == "https" {
                443
            } else {
                80
            }
        }
        Some((_, p)) => p
            .parse()
            .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))?,
    };
    Ok((host, port))
}

/// A copy of `req` (method, target, headers) with `body`, to send again.
pub fn copy_with_body(req: &http::Request<Body>, body: Body) -> http::Request<Body> {
    let mut again = http::Request::new(body);
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.headers_mut() = req.headers().clone();
    again
}

async fn handshake<I>(io: I) -> Result<Sender, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    const KEEP: Keep = Keep {
        max: 4,
        idle_for: Duration::from_secs(10),
    };

    /// Reads one request (head and `Content-Length` body) from `tcp`; its body, or `None` at
    /// the end of the stream.
    async fn read_request(tcp: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + len {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        Some(buf[head_end..head_end + len].to_vec())
    }

    /// A loopback server that answers the first request of each connection with its body
    /// (keeping the connection alive), then reads the second and closes without an answer, as
    /// a server closing an idle connection just as a request arrives. Returns its port, the
    /// connections accepted and the requests lost that way.
    async fn answers_once_per_connection() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let (counted, lost_counted) = (conns.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let lost = lost_counted.clone();
                tokio::spawn(async move {
                    let Some(body) = read_request(&mut tcp).await else {
                        return;
                    };
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    tcp.write_all(head.as_bytes()).await.unwrap();
                    tcp.write_all(&body).await.unwrap();
                    if read_request(&mut tcp).await.is_some() {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        (port, conns, lost)
    }

    /// A loopback server answering every request of every connection with its body. Returns
    /// its port and the connections accepted.
    async fn answers_all() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    while let Some(body) = read_request(&mut tcp).await {
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        let answer = [head.as_bytes(), &body].concat();
                        if tcp.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, conns)
    }

    /// A request right after the last answer was read goes on the same connection, even before
    /// the connection's task has turned to the next request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_one_after_another_share_one_connection() {
        let (port, conns) = answers_all().await;
        let ep = Endpoint::new("127.0.0.1", port, None, KEEP);
        for i in 0..200 {
            let body = format!("request {i}");
            let answer = ep
                .call(
                    ep.request(http::Method::POST, "/", full(body.clone()))
                        .unwrap(),
                    None,
                    1024,
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            assert_eq!(answer.body, body.as_bytes());
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    fn post(ep: &Endpoint, body: &'static str) -> http::Request<Body> {
        ep.request(http::Method::POST, "/append", full(body))
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_lost_on_a_kept_connection_is_sent_again_only_with_a_copy() {
        let (port, conns, lost) = answers_once_per_connection().await;
        let ep = Endpoint::new("127.0.0.1", port, None, KEEP);
        let timeout = Duration::from_secs(5);

        let first = ep
            .call(post(&ep, "one"), None, 1024, timeout)
            .await
            .unwrap();
        assert_eq!(
            (first.status, &first.body[..]),
            (http::StatusCode::OK, &b"one"[..])
        );

        // The kept connection takes the request and closes: the copy goes on a new one, body
        // and all.
        let req = post(&ep, "two");
        let copy = copy_with_body(&req, full("two"));
        assert_eq!(copy.uri(), "/append");
        assert_eq!(
            copy.headers()[http::header::HOST],
            format!("127.0.0.1:{port}")
        );
        let second = ep.call(req, Some(copy), 1024, timeout).await.unwrap();
        assert_eq!(&second.body[..], b"two");
        assert_eq!(
            lost.load(Ordering::SeqCst),
            1,
            "sent on the kept connection first"
        );
        assert_eq!(conns.load(Ordering::SeqCst), 2);

        // Without a copy, the loss is the caller's to handle.
        let err = ep
            .call(post(&ep, "three"), None, 1024, timeout)
            .await
            .unwrap_err();
        assert!(err.starts_with("HTTP: "), "{err}");
        assert_eq!(lost.load(Ordering::SeqCst), 2);
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "no new connection was made"
        );
    }

    #[tokio::test]
    async fn answers_over_the_limit_and_unreachable_endpoints_are_refused_with_a_reason() {
        let (port, _, _) = answers_once_per_connection().await;
        let ep = Endpoint::new("127.0.0.1", port, None, KEEP);
        let err = ep
            .call(post(&ep, "0123456789"), None, 4, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.starts_with("reading the answer: "), "{err}");

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let ep = Endpoint::new("127.0.0.1", port, None, KEEP);
        let err = ep
            .call(post(&ep, "x"), None, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.starts_with("connect: "), "{err}");
    }

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        let https = |u: &str| origin(u, "https", "https only");
        assert_eq!(https("https://ledger:8443"), Ok(("ledger".into(), 8443)));
        assert_eq!(https("https://ledger/"), Ok(("ledger".into(), 443)));
        assert_eq!(https("https://[::1]:9"), Ok(("[::1]".into(), 9)));
        assert_eq!(
            origin("http://archive", "http", "x"),
            Ok(("archive".into(), 80))
        );
        assert_eq!(https("http://ledger:8443"), Err("https only".into()));
        assert_eq!(
            https("https://ledger:8443/v1"),
            Err("give only the scheme, host and port".into())
        );
        assert_eq!(
            https("https://ledger:x"),
            Err("port \"x\" is not a number from 0 to 65535".into())
        );
    }

    #[test]
    fn an_ipv6_literal_keeps_its_brackets_in_host_only() {
        let ep = Endpoint::new("[::1]", 8443, None, KEEP);
        assert_eq!(ep.authority(), "[::1]:8443");
        assert_eq!(ep.host, "::1");
    }
}
