//! The audit record: what the ledger stores about one image transfer, and its canonical bytes.
//!
//! The record has no free-text field. Identifiers that could point at a patient (Study, Series and
//! SOP Instance UIDs, AE titles) are only ever present as [`KeyedHash`]es made with a per-tenant
//! secret; the only strings are SPIFFE IDs and UIDs of *types* (SOP class, transfer syntax), which
//! are digits and dots by construction. The byte layout is documented in `docs/ledger-format.md`.

use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::merkle::Hash;
use crate::spiffe::SpiffeId;

/// Version byte of the record encoding.
pub const RECORD_VERSION: u8 = 1;
/// Version byte of the log entry encoding.
pub const ENTRY_VERSION: u8 = 1;
/// Largest encoded entry the ledger accepts, in bytes.
pub const MAX_ENTRY_LEN: usize = 16 * 1024;

/// A 128-bit id chosen by the submitter so that a retried append is recognised, not duplicated.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(pub [u8; 16]);

impl RecordId {
    /// A new record id: 48 bits of Unix milliseconds, then 80 random bits (the UUIDv7 layout).
    /// Ids made this way sort by time, so the ledger's dedupe index grows at its end instead of
    /// at random places (several times cheaper to insert); any 128-bit id is still accepted.
    ///
    /// # Errors
    /// When the OS generator fails.
    pub fn new() -> Result<Self, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b[6..])?;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        Ok(Self(b))
    }

    /// A random record id from the operating system's generator.
    ///
    /// # Errors
    /// When the OS generator fails.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)?;
        Ok(Self(b))
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::base16::encode(&self.0).as_str())
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({self})")
    }
}

impl FromStr for RecordId {
    type Err = RecordError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::base16::decode(s)
            .map(Self)
            .ok_or_else(|| RecordError::RecordId(s.chars().take(64).collect()))
    }
}

/// An HMAC-SHA-256 of an identifier under a tenant's secret key: linkable within the tenant,
/// meaningless without the key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyedHash(pub [u8; 32]);

impl fmt::Display for KeyedHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::base16::encode(&self.0).as_str())
    }
}

impl fmt::Debug for KeyedHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyedHash({self})")
    }
}

impl FromStr for KeyedHash {
    type Err = RecordError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::base16::decode(s)
            .map(Self)
            .ok_or_else(|| RecordError::KeyedHash(s.chars().take(80).collect()))
    }
}

/// The secret that keys UID and AE-title hashes for one tenant (namespace).
#[derive(Clone)]
pub struct UidKey(Vec<u8>);

impl UidKey {
    /// Minimum key length in bytes.
    pub const MIN_LEN: usize = 32;

    /// Wraps key bytes.
    ///
    /// # Errors
    /// When the key is shorter than [`UidKey::MIN_LEN`] bytes.
    pub fn new(key: Vec<u8>) -> Result<Self, RecordError> {
        if key.len() < Self::MIN_LEN {
            return Err(RecordError::KeyTooShort(key.len()));
        }
        Ok(Self(key))
    }

    fn mac(&self, domain: &[u8], value: &[u8]) -> KeyedHash {
        // HMAC accepts keys of any length; `new` checked the minimum.
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) else {
            unreachable!("HMAC takes keys of every length")
        };
        mac.update(domain);
        mac.update(value);
        KeyedHash(mac.finalize().into_bytes().into())
    }

    /// Keyed hash of a DICOM UID (Study, Series or SOP Instance): `HMAC(key, "uid\0" ‖ uid)`,
    /// with trailing NUL or space padding removed first.
    pub fn hash_uid(&self, uid: &str) -> KeyedHash {
        self.mac(b"uid\0", uid.trim_end_matches(['\0', ' ']).as_bytes())
    }

    /// Keyed hash of an AE title: `HMAC(key, "ae\0" ‖ title)`, leading and trailing spaces and
    /// NULs removed (AE titles are space-padded on the wire).
    pub fn hash_ae_title(&self, ae: &str) -> KeyedHash {
        self.mac(b"ae\0", ae.trim_matches([' ', '\0']).as_bytes())
    }
}

impl fmt::Debug for UidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UidKey(<redacted>)")
    }
}

/// A DICOM UID naming a *type* (SOP class, transfer syntax): 1–64 characters of digits and dots.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TypeUid(String);

impl TypeUid {
    /// The UID text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TypeUid {
    type Err = RecordError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim_end_matches(['\0', ' ']);
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && !s.starts_with('.')
            && !s.ends_with('.')
            && !s.contains("..");
        if !ok {
            return Err(RecordError::Uid(s.chars().take(80).collect()));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TypeUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TypeUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TypeUid({})", self.0)
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(RecordId);
string_serde!(KeyedHash);
string_serde!(TypeUid);
string_serde!(ContentId);

/// An IPFS content identifier (CID v0 or v1), held in its binary form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ContentId(cid::Cid);

impl ContentId {
    /// The CID's binary encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// Parses a binary CID, refusing trailing bytes and non-canonical encodings.
    ///
    /// # Errors
    /// When the bytes are not exactly one canonical CID.
    pub fn from_bytes(b: &[u8]) -> Result<Self, RecordError> {
        let c = cid::Cid::try_from(b).map_err(|e| RecordError::Cid(e.to_string()))?;
        if c.to_bytes() != b {
            return Err(RecordError::Cid("non-canonical binary CID".into()));
        }
        Ok(Self(c))
    }

    /// The multihash (code, length, digest): equal for CIDv0 and CIDv1 of the same content, so
    /// CIDs are compared by it, never by string.
    pub fn multihash_bytes(&self) -> Vec<u8> {
        self.0.hash().to_bytes()
    }
}

impl FromStr for ContentId {
    type Err = RecordError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        cid::Cid::from_str(s)
            .map(Self)
            .map_err(|e| RecordError::Cid(format!("{s:.80}: {e}")))
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.0)
    }
}

macro_rules! byte_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:literal => $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[non_exhaustive]
        pub enum $name { $($(#[$vm])* $v = $n,)+ }

        impl $name {
            /// Every variant, in code order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// The variant's code in the canonical encoding.
            pub fn code(self) -> u8 { self as u8 }

            /// The variant with this code.
            pub fn from_code(c: u8) -> Option<Self> {
                match c { $($n => Some(Self::$v),)+ _ => None }
            }

            /// The variant's name, as in JSON and in metric labels.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s,)+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

byte_enum!(
    /// What happened.
    EventKind {
        /// A DICOM instance was stored (C-STORE, STOW-RS).
        InstanceStored = 1 => "instance_stored",
        /// A DICOM instance was retrieved (C-GET/C-MOVE sub-operation, WADO-RS).
        InstanceRetrieved = 2 => "instance_retrieved",
        /// A DICOM association was accepted.
        AssociationOpened = 3 => "association_opened",
        /// A DICOM association was rejected.
        AssociationRefused = 4 => "association_refused",
        /// A query was answered (C-FIND, QIDO-RS); nothing of its keys is recorded.
        QueryPerformed = 5 => "query_performed",
        /// A connection or request was denied by policy.
        RequestDenied = 6 => "request_denied",
        /// A verification (C-ECHO).
        Verification = 7 => "verification",
        /// An association ended (A-RELEASE or A-ABORT).
        AssociationClosed = 8 => "association_closed",
        /// A stored instance was archived, encrypted, and confirmed pinned: `archived_record`
        /// names the instance's record, `content_sha256` its plaintext hash, `cid` and `bytes`
        /// the ciphertext.
        InstanceArchived = 9 => "instance_archived",
        /// An archive key was destroyed (crypto-shredding): what was archived under it can no
        /// longer be decrypted.
        ArchiveKeyShredded = 10 => "archive_key_shredded",
    }
);

byte_enum!(
    /// The protocol the transfer used.
    Protocol {
        /// DICOM upper layer (DIMSE over TCP).
        Dimse = 1 => "dimse",
        /// DICOMweb over HTTP.
        DicomWeb = 2 => "dicomweb",
        /// Other HTTP.
        Http = 3 => "http",
        /// An undetected byte stream.
        Opaque = 4 => "opaque",
    }
);

byte_enum!(
    /// How the transfer ended.
    Outcome {
        /// The peer reported success.
        Success = 1 => "success",
        /// The peer reported success with a warning.
        Warning = 2 => "warning",
        /// The peer reported failure.
        Failure = 3 => "failure",
        /// The mesh refused it (policy, authentication).
        Denied = 4 => "denied",
        /// The exchange was cut off before an answer.
        Aborted = 5 => "aborted",
    }
);

/// One audited event, as a sidecar submits it.
///
/// # Guarantees
/// No field can hold free text: patient names, IDs, accession numbers or UIDs in clear cannot be
/// represented.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Submitter-chosen id; a retried append with the same id is not stored twice.
    pub record_id: RecordId,
    /// What happened.
    pub kind: EventKind,
    /// When it happened, in microseconds since the Unix epoch (the sidecar's clock).
    pub time_us: u64,
    /// The workload that sent the request (client side of the mTLS session).
    pub source: SpiffeId,
    /// The workload that received it (server side of the mTLS session).
    pub destination: SpiffeId,
    /// The protocol.
    pub protocol: Protocol,
    /// How it ended.
    pub outcome: Outcome,
    /// Protocol status code (DIMSE status or HTTP status), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Bytes transferred (the data set or body part).
    pub bytes: u64,
    /// SHA-256 of the transferred bytes (the data set for DIMSE, the part for DICOMweb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_sha256: Option<Hash>,
    /// Keyed hash of the Study Instance UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_uid: Option<KeyedHash>,
    /// Keyed hash of the Series Instance UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series_uid: Option<KeyedHash>,
    /// Keyed hash of the SOP Instance UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sop_instance_uid: Option<KeyedHash>,
    /// Keyed hash of the calling AE title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calling_ae: Option<KeyedHash>,
    /// Keyed hash of the called AE title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub called_ae: Option<KeyedHash>,
    /// The SOP Class UID (a type, e.g. CT Image Storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sop_class_uid: Option<TypeUid>,
    /// The transfer syntax UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_syntax_uid: Option<TypeUid>,
    /// Where the instance was archived in IPFS, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<ContentId>,
    /// The record this one is about (`instance_archived`: the instance's `instance_stored`
    /// record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_record: Option<RecordId>,
}

/// A record as the ledger stores it: the record plus what the ledger itself vouches for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    /// When the ledger accepted it, in microseconds since the Unix epoch (the ledger's clock).
    pub received_us: u64,
    /// The submitter as authenticated by mTLS; never taken from the request body.
    pub submitter: SpiffeId,
    /// The submitted record.
    pub record: AuditRecord,
}

/// Why bytes or text are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The input ended before the named field.
    #[error("record truncated: {field} needs {need} more bytes at offset {offset}")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Where.
        offset: usize,
        /// How many bytes were missing.
        need: usize,
    },
    /// An unknown version byte.
    #[error("unsupported {what} version {version} (this build reads version 1)")]
    Version {
        /// Record or entry.
        what: &'static str,
        /// The byte found.
        version: u8,
    },
    /// An enum field holds an unknown code.
    #[error("{field} has unknown code {code}")]
    UnknownCode {
        /// The field.
        field: &'static str,
        /// The code found.
        code: u8,
    },
    /// Presence flags with reserved bits set.
    #[error("presence flags {0:#06x} set reserved bits")]
    ReservedFlags(u16),
    /// Bytes after the last field.
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
    /// A string field is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    /// A SPIFFE ID field is invalid.
    #[error("{field}: {source}")]
    Spiffe {
        /// The field.
        field: &'static str,
        /// Why.
        source: crate::spiffe::SpiffeIdError,
    },
    /// A type UID is not digits and dots.
    #[error("{0:?} is not a DICOM UID (1-64 digits and dots)")]
    Uid(String),
    /// A CID is invalid.
    #[error("invalid CID: {0}")]
    Cid(String),
    /// A record id is not 32 hex digits.
    #[error("{0:?} is not a record id (32 hex digits)")]
    RecordId(String),
    /// A keyed hash is not 64 hex digits.
    #[error("{0:?} is not a keyed hash (64 hex digits)")]
    KeyedHash(String),
    /// The UID key is too short.
    #[error("UID hashing key is {0} bytes; at least 32 are required")]
    KeyTooShort(usize),
    /// The encoded entry is larger than [`MAX_ENTRY_LEN`].
    #[error("entry is {0} bytes, larger than the limit of {MAX_ENTRY_LEN}")]
    TooLarge(usize),
}

const F_STATUS: u16 = 1 << 0;
const F_SHA256: u16 = 1 << 1;
const F_STUDY: u16 = 1 << 2;
const F_SERIES: u16 = 1 << 3;
const F_INSTANCE: u16 = 1 << 4;
const F_CALLING: u16 = 1 << 5;
const F_CALLED: u16 = 1 << 6;
const F_SOP_CLASS: u16 = 1 << 7;
const F_TSYNTAX: u16 = 1 << 8;
const F_CID: u16 = 1 << 9;
const F_ARCHIVED: u16 = 1 << 10;
const F_ALL: u16 = (1 << 11) - 1;

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // SPIFFE IDs are at most 2048 bytes (checked at parse), so the length fits in u16.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl AuditRecord {
    /// A record of `kind` with every optional field absent (set those that apply).
    pub fn event(
        record_id: RecordId,
        kind: EventKind,
        time_us: u64,
        source: SpiffeId,
        destination: SpiffeId,
        protocol: Protocol,
        outcome: Outcome,
    ) -> Self {
        Self {
            record_id,
            kind,
            time_us,
            source,
            destination,
            protocol,
            outcome,
            status: None,
            bytes: 0,
            content_sha256: None,
            study_uid: None,
            series_uid: None,
            sop_instance_uid: None,
            calling_ae: None,
            called_ae: None,
            sop_class_uid: None,
            transfer_syntax_uid: None,
            cid: None,
            archived_record: None,
        }
    }

    /// Appends the canonical encoding (docs/ledger-format.md, "Record v1") to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.record_id.0);
        out.push(self.kind.code());
        out.push(self.protocol.code());
        out.push(self.outcome.code());
        out.extend_from_slice(&self.time_us.to_be_bytes());
        out.extend_from_slice(&self.bytes.to_be_bytes());
        put_str16(out, self.source.as_str());
        put_str16(out, self.destination.as_str());
        let mut flags = 0u16;
        let opt = [
            (F_STATUS, self.status.is_some()),
            (F_SHA256, self.content_sha256.is_some()),
            (F_STUDY, self.study_uid.is_some()),
            (F_SERIES, self.series_uid.is_some()),
            (F_INSTANCE, self.sop_instance_uid.is_some()),
            (F_CALLING, self.calling_ae.is_some()),
            (F_CALLED, self.called_ae.is_some()),
            (F_SOP_CLASS, self.sop_class_uid.is_some()),
            (F_TSYNTAX, self.transfer_syntax_uid.is_some()),
            (F_CID, self.cid.is_some()),
            (F_ARCHIVED, self.archived_record.is_some()),
        ];
        for (bit, present) in opt {
            if present {
                flags |= bit;
            }
        }
        out.extend_from_slice(&flags.to_be_bytes());
        if let Some(s) = self.status {
            out.extend_from_slice(&s.to_be_bytes());
        }
        for h in [&self.content_sha256.map(|h| h.0)]
            .into_iter()
            .flatten()
            .chain(
                [
                    &self.study_uid,
                    &self.series_uid,
                    &self.sop_instance_uid,
                    &self.calling_ae,
                    &self.called_ae,
                ]
                .into_iter()
                .flatten()
                .map(|k| &k.0),
            )
        {
            out.extend_from_slice(h);
        }
        for uid in [&self.sop_class_uid, &self.transfer_syntax_uid]
            .into_iter()
            .flatten()
        {
            // Type UIDs are at most 64 bytes (checked at parse).
            out.push(uid.0.len() as u8);
            out.extend_from_slice(uid.0.as_bytes());
        }
        if let Some(c) = &self.cid {
            let b = c.to_bytes();
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(&b);
        }
        if let Some(id) = &self.archived_record {
            out.extend_from_slice(&id.0);
        }
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.encode_into(&mut out);
        out
    }

    /// Parses a canonical encoding; the whole input must be one record.
    ///
    /// # Errors
    /// On any deviation from the canonical layout.
    pub fn decode(b: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader { b, pos: 0 };
        let rec = Self::read(&mut r)?;
        r.finish()?;
        Ok(rec)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, RecordError> {
        let version = r.u8("record version")?;
        if version != RECORD_VERSION {
            return Err(RecordError::Version {
                what: "record",
                version,
            });
        }
        let record_id = RecordId(r.array("record id")?);
        let kind = r.enum_code("kind", EventKind::from_code)?;
        let protocol = r.enum_code("protocol", Protocol::from_code)?;
        let outcome = r.enum_code("outcome", Outcome::from_code)?;
        let time_us = u64::from_be_bytes(r.array("time")?);
        let bytes = u64::from_be_bytes(r.array("bytes")?);
        let source = r.spiffe("source")?;
        let destination = r.spiffe("destination")?;
        let flags = u16::from_be_bytes(r.array("flags")?);
        if flags & !F_ALL != 0 {
            return Err(RecordError::ReservedFlags(flags));
        }
        let has = |bit| flags & bit != 0;
        let status = if has(F_STATUS) {
            Some(u16::from_be_bytes(r.array("status")?))
        } else {
            None
        };
        let content_sha256 = if has(F_SHA256) {
            Some(Hash(r.array("content sha256")?))
        } else {
            None
        };
        let mut keyed = |bit, field| -> Result<Option<KeyedHash>, RecordError> {
            Ok(if has(bit) {
                Some(KeyedHash(r.array(field)?))
            } else {
                None
            })
        };
        let study_uid = keyed(F_STUDY, "study uid")?;
        let series_uid = keyed(F_SERIES, "series uid")?;
        let sop_instance_uid = keyed(F_INSTANCE, "sop instance uid")?;
        let calling_ae = keyed(F_CALLING, "calling ae")?;
        let called_ae = keyed(F_CALLED, "called ae")?;
        let mut type_uid = |bit, field| -> Result<Option<TypeUid>, RecordError> {
            if !has(bit) {
                return Ok(None);
            }
            let len = r.u8(field)? as usize;
            let s =
                std::str::from_utf8(r.take(field, len)?).map_err(|_| RecordError::Utf8(field))?;
            let uid: TypeUid = s.parse()?;
            if uid.0.len() != len {
                // Padding would make two encodings of one value.
                return Err(RecordError::Uid(s.to_owned()));
            }
            Ok(Some(uid))
        };
        let sop_class_uid = type_uid(F_SOP_CLASS, "sop class uid")?;
        let transfer_syntax_uid = type_uid(F_TSYNTAX, "transfer syntax uid")?;
        let cid = if has(F_CID) {
            let len = u16::from_be_bytes(r.array("cid length")?) as usize;
            Some(ContentId::from_bytes(r.take("cid", len)?)?)
        } else {
            None
        };
        let archived_record = if has(F_ARCHIVED) {
            Some(RecordId(r.array("archived record")?))
        } else {
            None
        };
        Ok(Self {
            record_id,
            kind,
            time_us,
            source,
            destination,
            protocol,
            outcome,
            status,
            bytes,
            content_sha256,
            study_uid,
            series_uid,
            sop_instance_uid,
            calling_ae,
            called_ae,
            sop_class_uid,
            transfer_syntax_uid,
            cid,
            archived_record,
        })
    }
}

impl LogEntry {
    /// The canonical encoding (docs/ledger-format.md, "Entry v1"): these are the bytes the
    /// Merkle leaf hashes.
    pub fn encode(&self) -> Vec<u8> {
        Self::encode_parts(self.received_us, &self.submitter, &self.record)
    }

    /// [`LogEntry::encode`] of the entry these parts make, without assembling (and copying
    /// them into) a `LogEntry`.
    pub fn encode_parts(received_us: u64, submitter: &SpiffeId, record: &AuditRecord) -> Vec<u8> {
        let mut out = Vec::with_capacity(320);
        out.push(ENTRY_VERSION);
        out.extend_from_slice(&received_us.to_be_bytes());
        put_str16(&mut out, submitter.as_str());
        record.encode_into(&mut out);
        out
    }

    /// Parses a canonical entry; the whole input must be one entry.
    ///
    /// # Errors
    /// On any deviation from the canonical layout, or when larger than [`MAX_ENTRY_LEN`].
    pub fn decode(b: &[u8]) -> Result<Self, RecordError> {
        if b.len() > MAX_ENTRY_LEN {
            return Err(RecordError::TooLarge(b.len()));
        }
        let mut r = Reader { b, pos: 0 };
        let version = r.u8("entry version")?;
        if version != ENTRY_VERSION {
            return Err(RecordError::Version {
                what: "entry",
                version,
            });
        }
        let received_us = u64::from_be_bytes(r.array("received time")?);
        let submitter = r.spiffe("submitter")?;
        let record = AuditRecord::read(&mut r)?;
        r.finish()?;
        Ok(Self {
            received_us,
            submitter,
            record,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], RecordError> {
        let rest = &self.b[self.pos..];
        if rest.len() < n {
            return Err(RecordError::Truncated {
                field,
                offset: self.pos,
                need: n - rest.len(),
            });
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], RecordError> {
        let s = self.take(field, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, RecordError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn enum_code<T>(
        &mut self,
        field: &'static str,
        f: fn(u8) -> Option<T>,
    ) -> Result<T, RecordError> {
        let code = self.u8(field)?;
        f(code).ok_or(RecordError::UnknownCode { field, code })
    }

    fn spiffe(&mut self, field: &'static str) -> Result<SpiffeId, RecordError> {
        let len = u16::from_be_bytes(self.array(field)?) as usize;
        let s =
            std::str::from_utf8(self.take(field, len)?).map_err(|_| RecordError::Utf8(field))?;
        s.parse()
            .map_err(|source| RecordError::Spiffe { field, source })
    }

    fn finish(&self) -> Result<(), RecordError> {
        match self.b.len() - self.pos {
            0 => Ok(()),
            n => Err(RecordError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests;
