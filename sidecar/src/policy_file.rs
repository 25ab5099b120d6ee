//! The policy file: read whole, checked whole, reloaded when it changes. A bad new version is
//! refused and the previous policy stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use medmesh_core::TrustDomain;
use medmesh_core::policy::{Policy, PolicyDoc, PolicyError};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Reads and checks a policy file (JSON or YAML).
///
/// # Errors
/// When the file is unreadable or the policy invalid; the message lists every problem.
pub fn load(path: &Path, td: &TrustDomain) -> Result<Policy, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("policy {}: {e}", path.display()))?;
    let doc: PolicyDoc = serde_saphyr::from_str(&text).map_err(|e| {
        format!(
            "policy {}: {}",
            path.display(),
            PolicyError::Parse(e.to_string())
        )
    })?;
    Policy::new(doc, td.clone()).map_err(|e| format!("policy {}: {e}", path.display()))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Publishes `initial`, then reloads `path` every `period` when it changes.
pub fn watch(
    path: Option<PathBuf>,
    initial: Policy,
    td: TrustDomain,
    period: Duration,
    metrics: Metrics,
) -> watch::Receiver<Arc<Policy>> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    if let Some(path) = path {
        tokio::spawn(async move {
            let mut last = stamp(&path);
            loop {
                tokio::time::sleep(period).await;
                if tx.is_closed() {
                    return;
                }
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                let (p, td2) = (path.clone(), td.clone());
                match tokio::task::spawn_blocking(move || load(&p, &td2)).await {
                    Ok(Ok(policy)) => {
                        metrics.policy_reloads.with_label_values(&["ok"]).inc();
                        tracing::info!(path = %path.display(), "policy reloaded");
                        tx.send_replace(Arc::new(policy));
                    }
                    Ok(Err(e)) => {
                        metrics.policy_reloads.with_label_values(&["error"]).inc();
                        tracing::warn!(error = %e, "new policy refused; the previous one stays in force");
                    }
                    Err(e) => tracing::warn!(error = %e, "policy loader failed"),
                }
            }
        });
    }
    rx
}
