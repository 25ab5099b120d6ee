//! Leader election on a `coordination.k8s.io/v1` Lease (RBAC: `leases` `get create update` in
//! the operator's namespace).
//!
//! Every replica calls [`LeaseLock::try_acquire_or_renew`] every [`RENEW`]: the holder renews
//! (a `replace` guarded by the `resourceVersion` it read), the others take the Lease over only
//! once its `renewTime + leaseDurationSeconds` has passed. A conflict (409) on any write means
//! another replica wrote first: this one is not the leader. A leader that cannot renew within
//! [`LEASE_DURATION`] of its last success stops leading on its own ([`Elector`]), before a
//! successor can take over.
//!
//! Decisions take the time as an argument (tests fix it); a Lease's times are whole
//! microseconds (`MicroTime`).

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// How long a Lease stays valid after its last renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and the others try).
pub const RENEW: Duration = Duration::from_secs(5);

/// The Lease's annotations with the holder's version (`medmesh check` compares injected
/// sidecars with it).
fn stamp(
    annotations: Option<std::collections::BTreeMap<String, String>>,
) -> std::collections::BTreeMap<String, String> {
    let mut a = annotations.unwrap_or_default();
    a.insert(
        crate::names::OPERATOR_VERSION_ANNOTATION.to_owned(),
        crate::names::VERSION.to_owned(),
    );
    a
}

/// A Lease-based lock held by `identity`.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn micro(t: SystemTime) -> MicroTime {
    let us = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(us)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn to_system(t: &MicroTime) -> SystemTime {
    let us = t.0.as_microsecond();
    if us >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// Whether the Lease is held by someone at `now`.
pub fn held_by_other(spec: &LeaseSpec, me: &str, now: SystemTime) -> bool {
    let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) else {
        return false;
    };
    if holder == me {
        return false;
    }
    let duration = Duration::from_secs(
        spec.lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0),
    );
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(t) => to_system(t) + duration > now,
        // Held but never renewed: treat as expired.
        None => false,
    }
}

impl LeaseLock {
    /// A lock on Lease `name` in `api`'s namespace for `identity` (unique per replica: the pod
    /// name).
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration: LEASE_DURATION,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, now: SystemTime, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or_else(|| micro(now))),
            renew_time: Some(micro(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the Lease at `now`. `Ok(true)`: this replica leads until
    /// `now + LEASE_DURATION` at least.
    ///
    /// # Errors
    /// When the API fails other than by a conflict (the caller keeps its last state until the
    /// lease would have run out).
    pub async fn try_acquire_or_renew(&self, now: SystemTime) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    annotations: Some(stamp(None)),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let old = lease.spec.clone().unwrap_or_default();
        if held_by_other(&old, &self.identity, now) {
            return Ok(false);
        }
        let mine = old.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = old.lease_transitions.unwrap_or(0);
        let spec = if mine {
            self.spec(now, old.acquire_time.clone(), transitions)
        } else {
            self.spec(now, None, transitions.saturating_add(1))
        };
        let mut metadata = lease.metadata.clone();
        metadata.annotations = Some(stamp(metadata.annotations.take()));
        let new = Lease {
            // Keeps metadata.resourceVersion: the replace fails with 409 if anyone wrote since.
            metadata,
            spec: Some(spec),
        };
        match self
            .api
            .replace(&self.name, &PostParams::default(), &new)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (at shutdown) so that another replica takes over at once.
    ///
    /// # Errors
    /// When the API fails; the Lease then simply expires.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        let new = Lease {
            metadata: lease.metadata,
            spec: Some(spec),
        };
        match self
            .api
            .replace(&self.name, &PostParams::default(), &new)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Runs the election loop: publishes `true` while this replica leads, until `stop` turns
/// true, then releases the Lease.
pub async fn run(lock: LeaseLock, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
    let mut last_ok: Option<tokio::time::Instant> = None;
    loop {
        let now = SystemTime::now();
        match lock.try_acquire_or_renew(now).await {
            Ok(true) => {
                last_ok = Some(tokio::time::Instant::now());
                if !*leading.borrow() {
                    tracing::info!(identity = lock.identity(), "became leader");
                }
                let _ = leading.send_if_modified(|l| !std::mem::replace(l, true));
            }
            Ok(false) => {
                last_ok = None;
                if leading.send_if_modified(|l| std::mem::replace(l, false)) {
                    tracing::warn!(identity = lock.identity(), "lost leadership");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                // Stop leading before the Lease can have expired for the others.
                if last_ok.is_some_and(|t| t.elapsed() + RENEW >= LEASE_DURATION)
                    && leading.send_if_modified(|l| std::mem::replace(l, false))
                {
                    tracing::warn!(identity = lock.identity(), "lost leadership (cannot renew)");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RENEW) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = leading.send(false);
    if let Err(e) = lock.release().await {
        tracing::debug!(error = %e, "lease release failed");
    }
}

#[cfg(test)]
mod tests;
