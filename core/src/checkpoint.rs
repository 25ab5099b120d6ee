//! Signed tree heads: C2SP `tlog-checkpoint` bodies in C2SP `signed-note` envelopes, Ed25519.
//!
//! Key strings use the Go `golang.org/x/mod/sumdb/note` formats, so that standard tooling can read
//! them: verifier keys are `<name>+<8 hex key id>+base64(0x01 ‖ public key)`, private keys
//! `PRIVATE+KEY+<name>+<8 hex key id>+base64(0x01 ‖ seed)`. The key id is the first four bytes of
//! `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)`.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

const ALG_ED25519: u8 = 0x01;
const SIG_PREFIX: &str = "\u{2014} ";
/// Signatures a note may carry before it is refused.
pub const MAX_SIGNATURES: usize = 16;

/// Why a key, note or checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    /// A key string is malformed.
    #[error("malformed {kind} key: {reason}")]
    Key {
        /// Verifier or private.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A key name is empty or has spaces or '+'.
    #[error("key name {0:?} is empty or contains a space, '+' or a control character")]
    KeyName(String),
    /// The note is not text, blank line, signature lines.
    #[error("malformed signed note: {0}")]
    Malformed(String),
    /// No signature line from the expected key.
    #[error("note has no signature from key {name} ({key_id:08x})")]
    Unsigned {
        /// Expected key name.
        name: String,
        /// Expected key id.
        key_id: u32,
    },
    /// A signature from the expected key does not verify.
    #[error("signature by key {0} does not verify: the note was altered or signed by another key")]
    BadSignature(String),
    /// The checkpoint body is malformed.
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
    /// The checkpoint is for another log.
    #[error("checkpoint origin is {got:?}, expected {want:?}")]
    Origin {
        /// Origin in the checkpoint.
        got: String,
        /// Expected origin.
        want: String,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

fn key_id(name: &str, public: &VerifyingKey) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A key that signs notes.
pub struct NoteSigner {
    name: String,
    id: u32,
    key: SigningKey,
}

impl NoteSigner {
    /// A signer from a 32-byte Ed25519 seed.
    ///
    /// # Errors
    /// When the name is not a valid key name.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::KeyName(name.to_owned()));
        }
        let key = SigningKey::from_bytes(&seed);
        Ok(Self {
            name: name.to_owned(),
            id: key_id(name, &key.verifying_key()),
            key,
        })
    }

    /// Parses `PRIVATE+KEY+<name>+<id>+<base64(0x01 ‖ seed)>`, checking the id.
    ///
    /// # Errors
    /// When the string is malformed, uses another algorithm, or its id does not match.
    pub fn from_private_key(s: &str) -> Result<Self, NoteError> {
        let bad = |reason: &str| NoteError::Key {
            kind: "private",
            reason: reason.to_owned(),
        };
        let rest = s
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| bad("does not start with PRIVATE+KEY+"))?;
        let (name, id, key) = split_key(rest).ok_or_else(|| bad("expected <name>+<id>+<key>"))?;
        let raw = B64.decode(key).map_err(|_| bad("key is not base64"))?;
        let (alg, seed) = raw.split_first().ok_or_else(|| bad("empty key"))?;
        if *alg != ALG_ED25519 {
            return Err(bad(&format!("algorithm {alg:#04x} is not Ed25519 (0x01)")));
        }
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| bad(&format!("Ed25519 seed is {} bytes, not 32", seed.len())))?;
        let signer = Self::from_seed(name, seed)?;
        if signer.id != id {
            return Err(bad(&format!(
                "key id {id:08x} does not match the key ({:08x})",
                signer.id
            )));
        }
        Ok(signer)
    }

    /// The private key string (a secret: never log it).
    pub fn private_key(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.id,
            B64.encode(raw)
        )
    }

    /// The public verifier key string.
    pub fn verifier_key(&self) -> String {
        self.verifier().to_string()
    }

    /// The matching verifier.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Signs `text` (which must end with a newline) into a signed note.
    ///
    /// # Errors
    /// When the text is empty, lacks its final newline, or contains a control character.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        let sig = self.key.sign(text.as_bytes());
        let mut raw = Vec::with_capacity(68);
        raw.extend_from_slice(&self.id.to_be_bytes());
        raw.extend_from_slice(&sig.to_bytes());
        Ok(format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.name,
            B64.encode(raw)
        ))
    }
}

impl fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .field("key_id", &format_args!("{:08x}", self.id))
            .field("key", &"<redacted>")
            .finish()
    }
}

fn split_key(s: &str) -> Option<(&str, u32, &str)> {
    let mut parts = s.splitn(3, '+');
    let name = parts.next()?;
    let id = parts.next()?;
    let key = parts.next()?;
    if id.len() != 8 {
        return None;
    }
    Some((name, u32::from_str_radix(id, 16).ok()?, key))
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if text.is_empty() || !text.ends_with('\n') {
        return Err(NoteError::Malformed("text must end with a newline".into()));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed(
            "text contains a control character".into(),
        ));
    }
    Ok(())
}

/// A public key that checks note signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses `<name>+<id>+<base64(0x01 ‖ public key)>`, checking the id.
    ///
    /// # Errors
    /// When the string is malformed, uses another algorithm, or its id does not match.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let bad = |reason: String| NoteError::Key {
            kind: "verifier",
            reason,
        };
        let (name, id, key) =
            split_key(s.trim()).ok_or_else(|| bad("expected <name>+<8 hex id>+<key>".into()))?;
        if !valid_name(name) {
            return Err(NoteError::KeyName(name.to_owned()));
        }
        let raw = B64
            .decode(key)
            .map_err(|_| bad("key is not base64".into()))?;
        let (alg, public) = raw.split_first().ok_or_else(|| bad("empty key".into()))?;
        if *alg != ALG_ED25519 {
            return Err(bad(format!("algorithm {alg:#04x} is not Ed25519 (0x01)")));
        }
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| bad(format!("Ed25519 key is {} bytes, not 32", public.len())))?;
        let key = VerifyingKey::from_bytes(&public).map_err(|e| bad(e.to_string()))?;
        if key_id(name, &key) != id {
            return Err(bad(format!("key id {id:08x} does not match the key")));
        }
        Ok(Self {
            name: name.to_owned(),
            id,
            key,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that `note` carries a valid signature by this key and returns its text.
    ///
    /// # Errors
    /// When the note is malformed, has no signature from this key, or the signature is bad.
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let (text, sigs) = split_note(note)?;
        let mut found = false;
        for line in sigs.lines() {
            let rest = line.strip_prefix(SIG_PREFIX).ok_or_else(|| {
                NoteError::Malformed(format!(
                    "signature line {line:?} does not start with an em dash"
                ))
            })?;
            let (name, b64) = rest.split_once(' ').ok_or_else(|| {
                NoteError::Malformed(format!("signature line {line:?} has no signature"))
            })?;
            let raw = B64
                .decode(b64)
                .map_err(|_| NoteError::Malformed(format!("signature of {name} is not base64")))?;
            if raw.len() < 4 {
                return Err(NoteError::Malformed(format!(
                    "signature of {name} is too short"
                )));
            }
            let id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            if name != self.name || id != self.id {
                continue;
            }
            found = true;
            let sig = Signature::from_slice(&raw[4..])
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
            self.key
                .verify(text.as_bytes(), &sig)
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
        }
        if !found {
            return Err(NoteError::Unsigned {
                name: self.name.clone(),
                key_id: self.id,
            });
        }
        Ok(text)
    }
}

impl fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }
}

impl fmt::Debug for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoteVerifier({self})")
    }
}

/// Splits a signed note into its text (with the final newline) and its signature block.
fn split_note(note: &str) -> Result<(&str, &str), NoteError> {
    if note.len() > 64 * 1024 {
        return Err(NoteError::Malformed(format!(
            "note is {} bytes, over 64 KiB",
            note.len()
        )));
    }
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed(
            "note contains a control character".into(),
        ));
    }
    if !note.ends_with('\n') {
        return Err(NoteError::Malformed(
            "note does not end with a newline".into(),
        ));
    }
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
    let (text, sigs) = (&note[..=split], &note[split + 2..]);
    let count = sigs.lines().count();
    if count == 0 {
        return Err(NoteError::Malformed("no signature lines".into()));
    }
    if count > MAX_SIGNATURES {
        return Err(NoteError::Malformed(format!(
            "{count} signatures, over {MAX_SIGNATURES}"
        )));
    }
    Ok((text, sigs))
}

/// A tree head: the log's origin, its size and its root.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The log's name (`tlog-checkpoint` origin line).
    pub origin: String,
    /// Number of entries.
    pub size: u64,
    /// RFC 9162 root of the first `size` entries.
    pub root: Hash,
}

impl Checkpoint {
    /// The `tlog-checkpoint` note text: origin, decimal size, base64 root, each with a newline.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root.0)
        )
    }

    /// Parses a `tlog-checkpoint` text, ignoring extension lines.
    ///
    /// # Errors
    /// When a line is missing or malformed.
    pub fn parse_body(text: &str) -> Result<Self, NoteError> {
        let bad = |s: String| NoteError::Checkpoint(s);
        let mut lines = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("text does not end with a newline".into()))?
            .split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| bad("empty origin line".into()))?;
        let size_line = lines
            .next()
            .ok_or_else(|| bad("no tree size line".into()))?;
        let size_ok = !size_line.is_empty()
            && size_line.bytes().all(|b| b.is_ascii_digit())
            && (size_line == "0" || !size_line.starts_with('0'));
        let size: u64 = size_line.parse().ok().filter(|_| size_ok).ok_or_else(|| {
            bad(format!(
                "tree size {size_line:?} is not a decimal number without leading zeros"
            ))
        })?;
        let root_line = lines
            .next()
            .ok_or_else(|| bad("no root hash line".into()))?;
        let root = B64
            .decode(root_line)
            .ok()
            .and_then(|b| Hash::from_slice(&b).ok())
            .ok_or_else(|| bad(format!("root {root_line:?} is not a base64 SHA-256 hash")))?;
        if lines.any(str::is_empty) {
            return Err(bad("empty extension line".into()));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }

    /// Signs this checkpoint into a signed note.
    ///
    /// # Errors
    /// When the origin contains a newline or control character.
    pub fn sign(&self, signer: &NoteSigner) -> Result<String, NoteError> {
        if self.origin.is_empty() || self.origin.contains('\n') {
            return Err(bad_origin(&self.origin));
        }
        signer.sign(&self.body())
    }

    /// Verifies a signed checkpoint from the log named `origin`.
    ///
    /// # Errors
    /// When the signature does not verify, the body is malformed or the origin differs.
    pub fn open(note: &str, verifier: &NoteVerifier, origin: &str) -> Result<Self, NoteError> {
        let text = verifier.open(note)?;
        let cp = Self::parse_body(text)?;
        if cp.origin != origin {
            return Err(NoteError::Origin {
                got: cp.origin,
                want: origin.to_owned(),
            });
        }
        Ok(cp)
    }
}

fn bad_origin(o: &str) -> NoteError {
    NoteError::Checkpoint(format!("origin {o:?} must be one non-empty line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PETER_PRIVATE: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_VERIFIER: &str =
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";

    /// The vector of golang.org/x/mod/sumdb/note's tests: byte-for-byte interoperable.
    #[test]
    fn go_note_vector() {
        let signer = NoteSigner::from_private_key(PETER_PRIVATE).unwrap();
        assert_eq!(signer.verifier_key(), PETER_VERIFIER);
        assert_eq!(signer.private_key(), PETER_PRIVATE);
        let note = signer.sign(TEXT).unwrap();
        assert_eq!(
            note,
            format!(
                "{TEXT}\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
            )
        );
        let v = NoteVerifier::parse(PETER_VERIFIER).unwrap();
        assert_eq!(v.open(&note).unwrap(), TEXT);
    }

    /// The example of the C2SP signed-note specification, with a second signer present.
    #[test]
    fn c2sp_spec_vector() {
        let v = NoteVerifier::parse(
            "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        )
        .unwrap();
        let note = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        assert_eq!(v.open(note).unwrap(), "This is an example message.\n");
        let tampered = note.replace("example message", "exampel message");
        assert!(matches!(v.open(&tampered), Err(NoteError::BadSignature(_))));
    }

    #[test]
    fn rejects_bad_keys() {
        for k in [
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "no-plus-signs",
        ] {
            assert!(NoteVerifier::parse(k).is_err(), "{k}");
        }
    }

    #[test]
    fn checkpoint_round_trip_and_refusals() {
        let signer = NoteSigner::from_seed("medmesh.local/ledger", [7; 32]).unwrap();
        let v = signer.verifier();
        let cp = Checkpoint {
            origin: "medmesh.local/ledger".into(),
            size: 20852163,
            root: Hash([0xab; 32]),
        };
        let note = cp.sign(&signer).unwrap();
        // The example of docs/ledger-format.md §6 (signed independently with Python's Ed25519).
        assert_eq!(
            note,
            "medmesh.local/ledger\n20852163\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n\n\u{2014} medmesh.local/ledger Ea0ZbtS7fR1an/Q0GXx69WIejM7Oa0/DcalVGG5z3k+QrxEn0wYb5YNQnPaPwMpuG+qEAzUDLyFGbK3zeW6qXAIhEQU=\n"
        );
        assert_eq!(
            signer.verifier_key(),
            "medmesh.local/ledger+11ad196e+AepKbGPinFIKvvVQexMuxfmVR3auvr57kkIe6mkURtIs"
        );
        assert_eq!(
            Checkpoint::open(&note, &v, "medmesh.local/ledger").unwrap(),
            cp
        );
        assert!(matches!(
            Checkpoint::open(&note, &v, "other"),
            Err(NoteError::Origin { .. })
        ));
        let other = NoteSigner::from_seed("medmesh.local/ledger", [8; 32]).unwrap();
        assert!(matches!(
            Checkpoint::open(&note, &other.verifier(), "medmesh.local/ledger"),
            Err(NoteError::Unsigned { .. })
        ));
        let forged = note.replace("20852163", "20852164");
        assert!(matches!(
            Checkpoint::open(&forged, &v, "medmesh.local/ledger"),
            Err(NoteError::BadSignature(_))
        ));
        for body in [
            "o\n01\nAAAA\n",
            "o\n1\n",
            "\n1\nq6s=\n",
            "o\n1\nnot base64!\n",
            "o\n-1\nq6s=\n",
        ] {
            assert!(Checkpoint::parse_body(body).is_err(), "{body:?}");
        }
    }
}
