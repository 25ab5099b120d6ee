//! Observes one DICOM Part 10 file as it streams past (a STOW-RS or WADO-RS part): SHA-256 of
//! every byte of the file (what WADO-RS returns byte-identical), and the data set's UIDs, read
//! in the transfer syntax the file meta group names. Only the meta group is buffered (at most
//! [`MAX_META`] bytes).

use sha2::{Digest, Sha256};

use super::dataset::{DataSetObserver, Observed};

/// Largest file meta group kept while looking for the transfer syntax.
pub const MAX_META: usize = 64 * 1024;

enum State {
    /// Collecting the preamble, magic and meta group.
    Head(Vec<u8>),
    /// In the data set.
    Body(Box<DataSetObserver>),
    /// Not a Part 10 file (no `DICM`) or a meta group over the limit: hashed only.
    Opaque,
}

/// The observer of one file.
pub struct Part10Observer {
    sha: Sha256,
    bytes: u64,
    state: State,
    ts: Option<String>,
}

impl std::fmt::Debug for Part10Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part10Observer")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Default for Part10Observer {
    fn default() -> Self {
        Self::new()
    }
}

/// What was seen of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10Observed {
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// Size of the whole file.
    pub bytes: u64,
    /// Transfer syntax from the meta group.
    pub transfer_syntax: Option<String>,
    /// The data set's UIDs, when it was parsed (its `sha256` is not computed: zeroes).
    pub dataset: Option<Observed>,
}

impl Part10Observer {
    /// A new observer.
    pub fn new() -> Self {
        Self {
            sha: Sha256::new(),
            bytes: 0,
            state: State::Head(Vec::new()),
            ts: None,
        }
    }

    /// Feeds the next bytes of the file.
    pub fn feed(&mut self, b: &[u8]) {
        self.sha.update(b);
        self.bytes += b.len() as u64;
        let head = match &mut self.state {
            State::Body(o) => {
                o.feed(b);
                return;
            }
            State::Opaque => return,
            State::Head(h) => h,
        };
        head.extend_from_slice(b);
        if head.len() < 132 + 12 {
            return;
        }
        if &head[128..132] != b"DICM" {
            self.state = State::Opaque;
            return;
        }
        // (0002,0000) UL group length gives the meta group's end; without it, the file is only
        // hashed (no UIDs).
        if head[132..138] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
            self.state = State::Opaque;
            return;
        }
        let group_len = u32::from_le_bytes([head[140], head[141], head[142], head[143]]) as usize;
        let end = 144 + group_len;
        if end > MAX_META + 144 {
            self.state = State::Opaque;
            return;
        }
        if head.len() < end {
            return;
        }
        let ts = medmesh_core::dicom::split_part10(&head[..end])
            .ok()
            .flatten()
            .and_then(|p| p.transfer_syntax)
            .unwrap_or_else(|| super::dataset::IMPLICIT_VR_LE.to_owned());
        // The file is hashed whole here; the data set needs no hash of its own.
        let mut obs = DataSetObserver::without_hash(&ts);
        obs.feed(&head[end..]);
        self.ts = Some(ts);
        self.state = State::Body(Box::new(obs));
    }

    /// The result.
    pub fn finish(self) -> Part10Observed {
        let dataset = match self.state {
            State::Body(o) => Some(o.finish()),
            _ => None,
        };
        Part10Observed {
            sha256: self.sha.finalize().into(),
            bytes: self.bytes,
            transfer_syntax: self.ts,
            dataset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_file_hash_and_uids_at_every_split() {
        let file = medmesh_core::dicom::synthetic_ct(&medmesh_core::dicom::SyntheticInstance {
            study_uid: "2.25.7".into(),
            series_uid: "2.25.7.1".into(),
            sop_instance_uid: "2.25.7.1.1".into(),
            patient_name: "X^Y".into(),
            patient_id: "Z".into(),
            rows: 8,
            columns: 8,
            seed: 1,
        });
        let want_sha: [u8; 32] = Sha256::digest(&file).into();
        for s in 0..=file.len() {
            let mut o = Part10Observer::new();
            o.feed(&file[..s]);
            o.feed(&file[s..]);
            let r = o.finish();
            assert_eq!(
                (r.sha256, r.bytes),
                (want_sha, file.len() as u64),
                "split {s}"
            );
            assert_eq!(
                r.transfer_syntax.as_deref(),
                Some(medmesh_core::dicom::EXPLICIT_VR_LE)
            );
            let d = r.dataset.unwrap();
            assert_eq!(d.study_uid.as_deref(), Some("2.25.7"), "split {s}");
            assert_eq!(d.sop_instance_uid.as_deref(), Some("2.25.7.1.1"));
        }
        // Not Part 10: hashed, not parsed.
        let mut o = Part10Observer::new();
        o.feed(&[0u8; 300]);
        let r = o.finish();
        assert!(r.dataset.is_none() && r.bytes == 300);
    }
}
