//! Observes a data set as it streams past: SHA-256 of every byte, and the Study and Series
//! Instance UIDs read from its header. Memory is bounded (a 12-byte element header, a 64-byte
//! value, a 32-level nesting stack) whatever the data set size; pixel data is never buffered
//! (parsing stops once past group 0020).

use sha2::{Digest, Sha256};

/// Implicit VR Little Endian.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Big Endian (retired): hashed, not parsed.
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
/// Deflated Explicit VR Little Endian: hashed, not parsed.
pub const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// Inside a sequence of undefined length: items or its delimiter.
    Seq,
    /// Inside an item of undefined length: elements or its delimiter.
    Item,
}

#[derive(Debug)]
enum Parse {
    Header,
    Value {
        tag: (u16, u16),
        left: usize,
        keep: bool,
    },
    Done,
}

/// What was seen of one data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// SHA-256 of the data set bytes.
    pub sha256: [u8; 32],
    /// Bytes seen.
    pub bytes: u64,
    /// (0020,000D) Study Instance UID.
    pub study_uid: Option<String>,
    /// (0020,000E) Series Instance UID.
    pub series_uid: Option<String>,
    /// (0008,0018) SOP Instance UID.
    pub sop_instance_uid: Option<String>,
    /// (0008,0016) SOP Class UID.
    pub sop_class_uid: Option<String>,
}

/// The observer of one data set.
#[derive(Debug)]
pub struct DataSetObserver {
    /// `None` when the caller hashes the bytes itself (a Part 10 file is hashed whole).
    sha: Option<Sha256>,
    bytes: u64,
    explicit: bool,
    state: Parse,
    head: Vec<u8>,
    value: Vec<u8>,
    stack: Vec<Level>,
    study: Option<String>,
    series: Option<String>,
    instance: Option<String>,
    class: Option<String>,
}

impl DataSetObserver {
    /// An observer for a data set in `transfer_syntax`.
    pub fn new(transfer_syntax: &str) -> Self {
        let parseable = transfer_syntax != EXPLICIT_VR_BE && transfer_syntax != DEFLATED;
        Self {
            sha: Some(Sha256::new()),
            bytes: 0,
            explicit: transfer_syntax != IMPLICIT_VR_LE,
            state: if parseable {
                Parse::Header
            } else {
                Parse::Done
            },
            head: Vec::with_capacity(12),
            value: Vec::with_capacity(64),
            stack: Vec::new(),
            study: None,
            series: None,
            instance: None,
            class: None,
        }
    }

    /// An observer that only reads UIDs; [`Observed::sha256`] is then all zeroes.
    pub fn without_hash(transfer_syntax: &str) -> Self {
        Self {
            sha: None,
            ..Self::new(transfer_syntax)
        }
    }

    /// Feeds the next bytes.
    pub fn feed(&mut self, mut b: &[u8]) {
        if let Some(sha) = self.sha.as_mut() {
            sha.update(b);
        }
        self.bytes += b.len() as u64;
        while !b.is_empty() && !matches!(self.state, Parse::Done) {
            self.step(&mut b);
        }
    }

    /// The result.
    pub fn finish(self) -> Observed {
        Observed {
            sha256: self.sha.map_or([0; 32], |s| s.finalize().into()),
            bytes: self.bytes,
            study_uid: self.study,
            series_uid: self.series,
            sop_instance_uid: self.instance,
            sop_class_uid: self.class,
        }
    }

    fn header_len(&self) -> usize {
        if self.head.len() < 4 {
            return 8;
        }
        let group = u16::from_le_bytes([self.head[0], self.head[1]]);
        if group == 0xFFFE || !self.explicit {
            return 8;
        }
        if self.head.len() < 6 {
            return 8;
        }
        match &self.head[4..6] {
            b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN"
            | b"UR" | b"UT" | b"UV" => 12,
            _ => 8,
        }
    }

    fn step(&mut self, b: &mut &[u8]) {
        match &mut self.state {
            Parse::Header => {
                let want = self.header_len();
                let n = (want - self.head.len()).min(b.len());
                self.head.extend_from_slice(&b[..n]);
                *b = &b[n..];
                // The header length may grow once the VR is known.
                if self.head.len() < self.header_len() {
                    return;
                }
                self.element();
            }
            Parse::Value { tag, left, keep } => {
                let n = (*left).min(b.len());
                if *keep {
                    self.value.extend_from_slice(&b[..n]);
                }
                *left -= n;
                *b = &b[n..];
                if *left == 0 {
                    let tag = *tag;
                    let keep = *keep;
                    self.state = Parse::Header;
                    if keep {
                        let v = String::from_utf8_lossy(&self.value)
                            .trim_end_matches(['\0', ' '])
                            .to_owned();
                        match tag {
                            (0x0020, 0x000D) => self.study = Some(v),
                            (0x0020, 0x000E) => self.series = Some(v),
                            (0x0008, 0x0016) => self.class = Some(v),
                            (0x0008, 0x0018) => self.instance = Some(v),
                            _ => {}
                        }
                        self.value.clear();
                    }
                    if self.study.is_some() && self.series.is_some() && self.instance.is_some() {
                        self.state = Parse::Done;
                    }
                }
            }
            Parse::Done => *b = &[],
        }
    }

    /// A complete element header is in `head`.
    fn element(&mut self) {
        let h = std::mem::take(&mut self.head);
        let tag = (
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
        );
        let (vr, len) = if tag.0 == 0xFFFE || !self.explicit {
            (None, u32::from_le_bytes([h[4], h[5], h[6], h[7]]))
        } else if h.len() == 12 {
            (
                Some([h[4], h[5]]),
                u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            )
        } else {
            (
                Some([h[4], h[5]]),
                u32::from(u16::from_le_bytes([h[6], h[7]])),
            )
        };
        self.head = h;
        self.head.clear();
        let undefined = len == 0xFFFF_FFFF;
        let depth0 = self.stack.is_empty();
        match tag {
            (0xFFFE, 0xE000) => {
                // An item: skip it whole when its length is known, else descend.
                if undefined {
                    self.push(Level::Item);
                } else {
                    self.skip(tag, len as usize);
                }
                return;
            }
            (0xFFFE, 0xE00D) | (0xFFFE, 0xE0DD) => {
                self.stack.pop();
                return;
            }
            _ => {}
        }
        if depth0 && tag.0 > 0x0020 {
            // Past the header: nothing more to find (and pixel data is not buffered).
            self.state = Parse::Done;
            return;
        }
        if undefined {
            // A sequence (or, in implicit VR, an element we cannot size): descend.
            let is_sq = vr.is_none_or(|v| &v == b"SQ" || &v == b"UN");
            if is_sq {
                self.push(Level::Seq);
            } else {
                self.state = Parse::Done;
            }
            return;
        }
        let keep = depth0
            && matches!(
                tag,
                (0x0020, 0x000D) | (0x0020, 0x000E) | (0x0008, 0x0016) | (0x0008, 0x0018)
            )
            && len <= 64;
        self.state = if len == 0 {
            Parse::Header
        } else {
            Parse::Value {
                tag,
                left: len as usize,
                keep,
            }
        };
    }

    fn push(&mut self, l: Level) {
        if self.stack.len() >= MAX_DEPTH {
            self.state = Parse::Done;
        } else {
            self.stack.push(l);
        }
    }

    fn skip(&mut self, tag: (u16, u16), len: usize) {
        self.state = if len == 0 {
            Parse::Header
        } else {
            Parse::Value {
                tag,
                left: len,
                keep: false,
            }
        };
    }
}
