//! SPIFFE identities: trust domains and SPIFFE IDs, parsed once and valid by construction.
//!
//! The grammar follows the SPIFFE ID specification: `spiffe://<trust-domain><path>` where the trust
//! domain is lowercase letters, digits, `.`, `-` and `_`, and the path is a sequence of `/segment`
//! with segments of letters, digits, `.`, `-` and `_` (never empty, never `.` or `..`). No port,
//! user info, query or fragment is allowed, and the whole ID is at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted, in bytes (SPIFFE specification §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The ID does not start with `spiffe://`.
    #[error("SPIFFE ID {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    /// The trust domain is empty.
    #[error("SPIFFE ID or trust domain {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    /// The trust domain contains a character outside `[a-z0-9._-]`.
    #[error(
        "trust domain {input:?} contains {ch:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar {
        /// The offending input.
        input: String,
        /// The first bad character.
        ch: char,
    },
    /// A path segment contains a character outside `[A-Za-z0-9._-]`.
    #[error(
        "SPIFFE ID {input:?} has {ch:?} in its path; only letters, digits, '.', '-' and '_' are allowed"
    )]
    PathChar {
        /// The offending input.
        input: String,
        /// The first bad character.
        ch: char,
    },
    /// The path has an empty, `.` or `..` segment, or a trailing slash.
    #[error("SPIFFE ID {0:?} has an empty, '.' or '..' path segment")]
    PathSegment(String),
    /// The ID or trust domain is too long.
    #[error("SPIFFE ID or trust domain is {len} bytes, longer than the limit of {max}")]
    TooLong {
        /// Actual length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The ID is not of the Kubernetes workload form `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "SPIFFE ID {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    NotWorkload(String),
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (without `spiffe://`).
    ///
    /// # Errors
    /// When the name is empty, too long or contains characters the SPIFFE spec forbids.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name, name)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of a Kubernetes workload in this trust domain.
    ///
    /// # Errors
    /// When the namespace or service account are not valid path segments.
    pub fn workload(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::from_str(&format!(
            "{SCHEME}{}/ns/{namespace}/sa/{service_account}",
            self.0
        ))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn validate_trust_domain(td: &str, input: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain(input.to_owned()));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TooLong {
            len: td.len(),
            max: MAX_TRUST_DOMAIN_LEN,
        });
    }
    if let Some(ch) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeIdError::TrustDomainChar {
            input: input.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// A SPIFFE ID such as `spiffe://cluster.local/ns/pacs/sa/orthanc`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (== id.len() when the path is empty).
    path_start: usize,
}

impl SpiffeId {
    /// The full ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path, starting with `/`, or empty.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// Whether this ID belongs to the given trust domain.
    pub fn is_in(&self, td: &TrustDomain) -> bool {
        self.trust_domain() == td.as_str()
    }

    /// The namespace and service account of a Kubernetes workload ID
    /// (`/ns/<namespace>/sa/<service-account>`).
    ///
    /// # Errors
    /// When the path has any other shape.
    pub fn workload(&self) -> Result<(&str, &str), SpiffeIdError> {
        let mut parts = self.path().split('/').skip(1);
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Ok((ns, sa)),
            _ => Err(SpiffeIdError::NotWorkload(self.id.clone())),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong {
                len: s.len(),
                max: MAX_SPIFFE_ID_LEN,
            });
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        validate_trust_domain(&rest[..td_len], s)?;
        let path = &rest[td_len..];
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(SpiffeIdError::PathSegment(s.to_owned()));
                }
                if let Some(ch) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(SpiffeIdError::PathChar {
                        input: s.to_owned(),
                        ch,
                    });
                }
            }
        }
        Ok(Self {
            id: s.to_owned(),
            path_start: SCHEME.len() + td_len,
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/pacs/sa/orthanc".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/pacs/sa/orthanc");
        assert_eq!(id.workload().unwrap(), ("pacs", "orthanc"));
        let td = TrustDomain::new("cluster.local").unwrap();
        assert!(id.is_in(&td));
        assert_eq!(td.workload("pacs", "orthanc").unwrap(), id);
    }

    #[test]
    fn trust_domain_only_is_valid_but_not_a_workload() {
        let id: SpiffeId = "spiffe://example.org".parse().unwrap();
        assert_eq!(id.path(), "");
        assert!(matches!(id.workload(), Err(SpiffeIdError::NotWorkload(_))));
    }

    #[test]
    fn rejects_bad_ids() {
        for (input, want) in [
            ("http://x/y", "does not start"),
            ("spiffe://", "empty trust domain"),
            ("spiffe:///ns/a", "empty trust domain"),
            ("spiffe://Example.org/a", "contains 'E'"),
            ("spiffe://example.org:8080/a", "contains ':'"),
            ("spiffe://user@example.org/a", "contains '@'"),
            ("spiffe://example.org/", "empty"),
            ("spiffe://example.org//a", "empty"),
            ("spiffe://example.org/a/../b", "'..'"),
            ("spiffe://example.org/a?x=1", "'?'"),
            ("spiffe://example.org/a#f", "'#'"),
            ("spiffe://example.org/a%20b", "'%'"),
        ] {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
        let long = format!("spiffe://a/{}", "x".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(
            long.parse::<SpiffeId>(),
            Err(SpiffeIdError::TooLong { .. })
        ));
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://a.b/ns/x/sa/y\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://a.b/ns/x/sa/y\""
        );
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://A/x\"").is_err());
    }
}
