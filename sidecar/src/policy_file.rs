//! The policy file: read whole, checked whole, reloaded when it changes. A bad new version is
//! refused and the previous policy stays in force.
//!
//! The file is either one policy document, or the operator's [`PolicySet`] (a document per
//! MeshPolicy, each with its pod selector), of which the sidecar enforces the union of those
//! selecting its pod, whose labels it reads from a downward-API file (`key="value"` lines).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use medmesh_core::TrustDomain;
use std::collections::BTreeMap;

use medmesh_core::policy::{Policy, PolicyDoc, PolicyError, PolicySet};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Reads and checks a policy file (JSON or YAML).
///
/// # Errors
/// When the file is unreadable or the policy invalid; the message lists every problem.
pub fn load(path: &Path, labels: Option<&Path>, td: &TrustDomain) -> Result<Policy, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("policy {}: {e}", path.display()))?;
    let parse_err = |e: String| format!("policy {}: {}", path.display(), PolicyError::Parse(e));
    // A policy set has a top-level `selected` list; a document never does.
    let value: serde_json::Value =
        serde_saphyr::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
    let doc: PolicyDoc = if value.get("selected").is_some() {
        let set: PolicySet = serde_saphyr::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        let labels = match labels {
            Some(l) => read_labels(l)?,
            None => BTreeMap::new(),
        };
        set.for_labels(&labels)
    } else {
        serde_saphyr::from_str(&text).map_err(|e| parse_err(e.to_string()))?
    };
    Policy::new(doc, td.clone()).map_err(|e| format!("policy {}: {e}", path.display()))
}

/// Reads a downward-API labels file: one `key="value"` per line, values quoted as Go does.
/// A missing file means no labels.
///
/// # Errors
/// When a line is malformed.
pub fn read_labels(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("pod labels {}: {e}", path.display())),
    };
    let mut out = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = || {
            format!(
                "pod labels {} line {}: not key=\"value\"",
                path.display(),
                i + 1
            )
        };
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        let v: String = serde_json::from_str(v.trim()).map_err(|_| bad())?;
        out.insert(k.trim().to_owned(), v);
    }
    Ok(out)
}

/// When a file last changed, and its length.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Publishes `initial`, then reloads `path` every `period` when it changes.
pub fn watch(
    path: Option<PathBuf>,
    labels: Option<PathBuf>,
    initial: Policy,
    td: TrustDomain,
    period: Duration,
    metrics: Metrics,
) -> watch::Receiver<Arc<Policy>> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    if let Some(path) = path {
        tokio::spawn(async move {
            let stamps = |p: &Path| (stamp(p), labels.as_deref().and_then(stamp));
            let mut last = stamps(&path);
            loop {
                tokio::time::sleep(period).await;
                if tx.is_closed() {
                    return;
                }
                let now = stamps(&path);
                if now == last {
                    continue;
                }
                last = now;
                let (p, l, td2) = (path.clone(), labels.clone(), td.clone());
                match tokio::task::spawn_blocking(move || load(&p, l.as_deref(), &td2)).await {
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
