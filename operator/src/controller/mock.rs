//! A mocked API server for reconciler tests (the `tower-test` pattern of kube-rs/controller-rs
//! `src/fixtures.rs`): the code under test gets a real `kube::Client` whose transport is a
//! mock; the test answers each request in turn, asserting method, path and body, and a
//! timeout catches a request that never comes or one too many.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Longest a scenario may wait for the next request.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// One request the code under test made.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
}

/// The API server side of the mock.
pub struct ApiServer {
    handle: Handle,
    /// Every request answered so far.
    pub log: Vec<Seen>,
}

/// A client wired to a fresh mocked API server.
pub fn pair() -> (Client, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (
        Client::new(svc, "default"),
        ApiServer {
            handle,
            log: Vec::new(),
        },
    )
}

/// The JSON `Status` of a failed request.
pub fn status_body(code: u16, reason: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("mock: {reason}"), "reason": reason, "code": code,
    })
}

impl ApiServer {
    /// Waits for the next request, checks its method and path, answers `status` with `body`
    /// (a function of the request, e.g. echoing an applied object) and returns it.
    pub async fn expect(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        respond: impl FnOnce(&Seen) -> Value,
    ) -> Seen {
        let (req, send) = tokio::time::timeout(STEP_TIMEOUT, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("timeout waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("client dropped before {method} {path}"));
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let seen = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
        };
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            (method, path),
            "unexpected request (after {:?})",
            self.log
                .iter()
                .map(|s| format!("{} {}", s.method, s.path))
                .collect::<Vec<_>>()
        );
        let answer = respond(&seen);
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        self.log.push(seen.clone());
        seen
    }

    /// Answers a GET with 404.
    pub async fn not_found(&mut self, path: &str) -> Seen {
        self.expect("GET", path, 404, |_| status_body(404, "NotFound"))
            .await
    }

    /// Answers a server-side apply (PATCH with our field manager) by echoing the object with
    /// `extra` merged in (e.g. a `status`), and returns it.
    pub async fn apply(&mut self, path: &str, extra: Value) -> Seen {
        let seen = self
            .expect("PATCH", path, 200, |s| {
                let mut v = s.body.clone();
                merge(&mut v, &extra);
                v
            })
            .await;
        assert!(
            seen.query.contains("fieldManager=medmesh-operator")
                && seen.query.contains("force=true"),
            "{path}: not a forced server-side apply by medmesh-operator: {}",
            seen.query
        );
        seen
    }

    /// Asserts that no further request arrives within `wait`.
    pub async fn quiet(&mut self, wait: Duration) {
        if let Ok(Some((req, _))) = tokio::time::timeout(wait, self.handle.next_request()).await {
            panic!("unexpected extra request {} {}", req.method(), req.uri());
        }
    }
}

/// Merges `extra` into `v` (objects recursively; anything else replaces).
pub fn merge(v: &mut Value, extra: &Value) {
    match (v, extra) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, x) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), x);
            }
        }
        (v, x) => *v = x.clone(),
    }
}

/// Runs the code under test and the scenario together, failing when either does not finish
/// within `limit`. Both are boxed: a reconcile future is large.
pub fn run<'a, T: 'a, S: 'a>(
    code: impl Future<Output = T> + 'a,
    scenario: impl Future<Output = S> + 'a,
    limit: Duration,
) -> std::pin::Pin<Box<dyn Future<Output = (T, S)> + 'a>> {
    let code = Box::pin(code);
    let scenario = Box::pin(scenario);
    Box::pin(async move {
        tokio::time::timeout(limit, async { tokio::join!(code, scenario) })
            .await
            .expect("scenario timed out")
    })
}
