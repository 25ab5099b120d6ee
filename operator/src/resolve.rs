//! Connect-address overrides (`--resolve`, curl's semantics) for an operator run out of
//! cluster, where Service names do not resolve. Used where the operator connects to a ledger,
//! which is authenticated by its SPIFFE ID whatever address it is reached at.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Connect-address overrides (`--resolve`): where to connect for a URL's `host:port`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolve(BTreeMap<String, SocketAddr>);

impl Resolve {
    /// Parses `host:port=addr:port` entries.
    ///
    /// # Errors
    /// One message per malformed entry.
    pub fn parse(entries: &[String]) -> Result<Self, Vec<String>> {
        let mut map = BTreeMap::new();
        let mut errs = Vec::new();
        for e in entries {
            let parsed = e.split_once('=').and_then(|(from, to)| {
                let (host, port) = from.rsplit_once(':')?;
                port.parse::<u16>().ok()?;
                (!host.is_empty()).then_some(())?;
                Some((from.to_ascii_lowercase(), to.parse::<SocketAddr>().ok()?))
            });
            match parsed {
                Some((from, to)) => {
                    map.insert(from, to);
                }
                None => errs.push(format!(
                    "resolve {e:?}: expected HOST:PORT=ADDR:PORT (an IP address and port)"
                )),
            }
        }
        if errs.is_empty() {
            Ok(Self(map))
        } else {
            Err(errs)
        }
    }

    /// `url` with its `host:port` replaced by the override, if there is one.
    pub fn apply(&self, url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_owned();
        };
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        match self.0.get(&authority.to_ascii_lowercase()) {
            Some(addr) => format!("{scheme}://{addr}{path}"),
            None => url.to_owned(),
        }
    }
}
