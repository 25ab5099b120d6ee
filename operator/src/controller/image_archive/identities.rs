//! The archive's generated key material: created once, extended on scale-up, never rewritten.

// The parent's names and imports: one concern split in files.
use super::*;

/// One replica's two libp2p identities.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The Kubo node's.
    pub kubo: PeerKey,
    /// The ipfs-cluster peer's.
    pub cluster: PeerKey,
}

/// The generated key material of one archive.
#[derive(Debug, Clone)]
pub struct Identities {
    /// ipfs-cluster's secret.
    pub cluster_secret: ClusterSecret,
    /// The Kubo private-network key.
    pub swarm_key: SwarmKey,
    /// Per replica, in order; never shorter than the replicas ever deployed.
    pub peers: Vec<PeerIdentity>,
}

fn kubo_key(i: usize) -> String {
    format!("kubo-{i}.key")
}

fn cluster_key(i: usize) -> String {
    format!("cluster-{i}.key")
}

fn crypto(what: &str) -> impl FnOnce(medmesh_core::p2p::P2pError) -> Error + '_ {
    move |e| Error::Crypto {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

impl Identities {
    /// Fresh material for `replicas` peers.
    ///
    /// # Errors
    /// When the system has no randomness.
    pub fn generate(replicas: usize) -> Result<Self, Error> {
        let mut ids = Self {
            cluster_secret: ClusterSecret::generate().map_err(crypto("cluster secret"))?,
            swarm_key: SwarmKey::generate().map_err(crypto("swarm key"))?,
            peers: Vec::new(),
        };
        ids.extend_to(replicas)?;
        Ok(ids)
    }

    /// Adds identities until there are `replicas`; existing ones are never changed.
    ///
    /// # Errors
    /// When the system has no randomness.
    pub fn extend_to(&mut self, replicas: usize) -> Result<(), Error> {
        while self.peers.len() < replicas {
            self.peers.push(PeerIdentity {
                kubo: PeerKey::generate().map_err(crypto("Kubo identity"))?,
                cluster: PeerKey::generate().map_err(crypto("cluster identity"))?,
            });
        }
        Ok(())
    }

    /// The material in `secret`, or what is wrong with it.
    ///
    /// # Errors
    /// A message naming the Secret and the key that is missing or malformed.
    pub fn from_secret(secret: &Secret) -> Result<Self, String> {
        let name = secret.name_any();
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let text = |key: &str| -> Result<String, String> {
            let b = data
                .get(key)
                .ok_or_else(|| format!("Secret {name} has no key {key:?}"))?;
            String::from_utf8(b.0.clone())
                .map_err(|_| format!("Secret {name} key {key:?} is not text"))
        };
        let bad = |key: &str, e: &dyn std::fmt::Display| format!("Secret {name} key {key:?}: {e}");
        let cluster_secret = text(CLUSTER_SECRET_KEY)?
            .parse::<ClusterSecret>()
            .map_err(|e| bad(CLUSTER_SECRET_KEY, &e))?;
        let swarm_key = SwarmKey::from_file(&text(SWARM_KEY)?).map_err(|e| bad(SWARM_KEY, &e))?;
        let mut peers = Vec::new();
        while data.contains_key(&kubo_key(peers.len()))
            || data.contains_key(&cluster_key(peers.len()))
        {
            let i = peers.len();
            let (k, c) = (kubo_key(i), cluster_key(i));
            peers.push(PeerIdentity {
                kubo: PeerKey::from_libp2p_base64(&text(&k)?).map_err(|e| bad(&k, &e))?,
                cluster: PeerKey::from_libp2p_base64(&text(&c)?).map_err(|e| bad(&c, &e))?,
            });
        }
        Ok(Self {
            cluster_secret,
            swarm_key,
            peers,
        })
    }

    /// The Secret's data.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::from([
            (
                CLUSTER_SECRET_KEY.to_owned(),
                ByteString(self.cluster_secret.to_hex().into_bytes()),
            ),
            (
                SWARM_KEY.to_owned(),
                ByteString(self.swarm_key.to_file().into_bytes()),
            ),
        ]);
        for (i, p) in self.peers.iter().enumerate() {
            data.insert(
                kubo_key(i),
                ByteString(p.kubo.to_libp2p_base64().into_bytes()),
            );
            data.insert(
                cluster_key(i),
                ByteString(p.cluster.to_libp2p_base64().into_bytes()),
            );
        }
        data
    }

    /// The cluster peer IDs of the first `replicas` replicas (the trusted set).
    pub fn cluster_ids(&self, replicas: usize) -> Vec<PeerId> {
        self.peers
            .iter()
            .take(replicas)
            .map(|p| p.cluster.peer_id())
            .collect()
    }
}

/// The identities Secret (no owner: see the module documentation).
pub fn identities_secret(names: &Names, ids: &Identities) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(names.identities.clone()),
            namespace: Some(names.namespace.clone()),
            labels: Some(labels(names)),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(ids.secret_data()),
        ..Secret::default()
    }
}
