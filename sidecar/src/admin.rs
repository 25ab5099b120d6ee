//! The admin listener: `/live`, `/ready` (false until credentials are loaded), `/metrics`, and
//! `POST /shutdown`, which only a client on loopback may call.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::Credentials;

#[derive(Clone)]
struct AdminState {
    creds: watch::Receiver<Option<Arc<Credentials>>>,
    registry: prometheus::Registry,
    shutdown: Arc<watch::Sender<bool>>,
}

/// Serves the admin endpoints until `stop` turns true. `shutdown` is what `POST /shutdown`
/// triggers.
pub async fn serve(
    listener: TcpListener,
    creds: watch::Receiver<Option<Arc<Credentials>>>,
    registry: prometheus::Registry,
    shutdown: Arc<watch::Sender<bool>>,
    mut stop: watch::Receiver<bool>,
) {
    let state = AdminState {
        creds,
        registry,
        shutdown,
    };
    let app = Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route(
            "/ready",
            get(|State(s): State<AdminState>| async move {
                match s.creds.borrow().as_ref() {
                    Some(c) => (StatusCode::OK, format!("ready: {}\n", c.identity.id())),
                    None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no certificate loaded\n".into()),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move {
                let mut out = String::new();
                match prometheus::TextEncoder::new().encode_utf8(&s.registry.gather(), &mut out) {
                    Ok(()) => ([("content-type", "text/plain; version=0.0.4")], out).into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }),
        )
        .route(
            "/shutdown",
            post(|State(s): State<AdminState>, ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                if !peer.ip().is_loopback() {
                    return (StatusCode::FORBIDDEN, "shutdown is only accepted from localhost\n");
                }
                s.shutdown.send_replace(true);
                (StatusCode::ACCEPTED, "shutting down\n")
            }),
        )
        .with_state(state);
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    if let Err(e) = served.await {
        tracing::warn!(error = %e, "admin listener failed");
    }
}
