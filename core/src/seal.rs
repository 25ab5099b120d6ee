//! Sealing archived objects: the age format (age-encryption.org/v1) with X25519 recipients, so
//! that an image leaves its pod for the archive only encrypted.
//!
//! Each object gets a fresh random file key (no convergent encryption: two archives of one image
//! are unrelated ciphertexts), wrapped for every recipient (the namespace's archive key and an
//! optional break-glass key), and a payload of 64 KiB ChaCha20-Poly1305 chunks whose nonces
//! number them and mark the last, so truncation, reordering and any edited byte are detected.
//! Both directions stream in constant memory. [`Sealer`] also hashes the plaintext as it passes
//! (the SHA-256 an audit record holds), so that what was archived can be tied to what was stored;
//! [`open`] decrypts for the holder of a key; any error, including one at the very end of the
//! stream, means the plaintext must be discarded.
//!
//! The ciphertext is an ordinary age file: `age -d -i key.txt` (Go) or `rage` opens it.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use age::secrecy::ExposeSecret as _;
use sha2::{Digest as _, Sha256};

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// A recipient is not an `age1…` X25519 public key.
    #[error("archive recipient {0:?} is not an age X25519 recipient (age1…)")]
    Recipient(String),
    /// A key is not an `AGE-SECRET-KEY-1…` X25519 identity.
    #[error("archive key is not an age X25519 identity (AGE-SECRET-KEY-1…)")]
    Key,
    /// No recipient was given.
    #[error("sealing needs at least one recipient")]
    NoRecipients,
    /// The input is not an age file this key can open.
    #[error("cannot open the archived object: {0}")]
    Open(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A public archive key: what sidecars seal to (`age1…`).
#[derive(Clone)]
pub struct Recipient(age::x25519::Recipient);

impl FromStr for Recipient {
    type Err = SealError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse()
            .map(Self)
            .map_err(|_| SealError::Recipient(s.chars().take(80).collect()))
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({})", self.0)
    }
}

/// A private archive key (`AGE-SECRET-KEY-1…`): only restorers hold it.
pub struct ArchiveKey(age::x25519::Identity);

impl ArchiveKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(age::x25519::Identity::generate())
    }

    /// Its public half.
    pub fn recipient(&self) -> Recipient {
        Recipient(self.0.to_public())
    }

    /// The key as age writes it in a key file (secret: store it only in a Secret).
    pub fn to_secret_string(&self) -> String {
        self.0.to_string().expose_secret().to_owned()
    }
}

impl FromStr for ArchiveKey {
    type Err = SealError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // An age key file may carry `# created:` and `# public key:` comment lines.
        let line = s
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or(SealError::Key)?;
        line.parse().map(Self).map_err(|_| SealError::Key)
    }
}

// Never print the secret.
impl fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArchiveKey({})", self.0.to_public())
    }
}

/// What a sealed object contained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Plaintext bytes.
    pub plaintext_len: u64,
    /// SHA-256 of the plaintext.
    pub plaintext_sha256: [u8; 32],
}

/// Encrypts what is written to it into `W`, hashing the plaintext on the way.
pub struct Sealer<W: Write> {
    inner: age::stream::StreamWriter<W>,
    sha: Sha256,
    len: u64,
}

impl<W: Write> Sealer<W> {
    /// Starts an age file for `recipients` in `out` (the header is written at once).
    ///
    /// # Errors
    /// When there is no recipient or writing the header fails.
    pub fn new(recipients: &[Recipient], out: W) -> Result<Self, SealError> {
        if recipients.is_empty() {
            return Err(SealError::NoRecipients);
        }
        // age's own messages are localized at run time: describe errors here instead.
        let enc =
            age::Encryptor::with_recipients(recipients.iter().map(|r| &r.0 as &dyn age::Recipient))
                .map_err(|e| {
                    SealError::Open(match e {
                        age::EncryptError::Io(e) => e.to_string(),
                        _ => "the recipients cannot be combined".into(),
                    })
                })?;
        Ok(Self {
            inner: enc.wrap_output(out)?,
            sha: Sha256::new(),
            len: 0,
        })
    }

    /// Ends the file (the last chunk and its tag); without it the ciphertext is incomplete.
    ///
    /// # Errors
    /// When writing fails.
    pub fn finish(self) -> Result<(W, Sealed), SealError> {
        let out = self.inner.finish()?;
        Ok((
            out,
            Sealed {
                plaintext_len: self.len,
                plaintext_sha256: self.sha.finalize().into(),
            },
        ))
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader of the plaintext of an age file sealed to `key`. Reads fail (with
/// `InvalidData`) on any authentication failure, including a truncated end.
///
/// # Errors
/// When the header is not age, or no stanza opens with `key`.
pub fn open<'k, R: Read + 'k>(input: R, key: &'k ArchiveKey) -> Result<impl Read + 'k, SealError> {
    let dec = age::Decryptor::new(input).map_err(decrypt_error)?;
    dec.decrypt(std::iter::once(&key.0 as &dyn age::Identity))
        .map_err(decrypt_error)
}

/// age's own messages are localized at run time: describe its errors here instead.
fn decrypt_error(e: age::DecryptError) -> SealError {
    use age::DecryptError as E;
    SealError::Open(match e {
        E::NoMatchingKeys => "it was not sealed to this key".into(),
        E::InvalidHeader | E::UnknownFormat => "not an age file (bad header)".into(),
        E::InvalidMac => "its header does not authenticate (edited)".into(),
        E::DecryptionFailed | E::KeyDecryptionFailed => {
            "decryption failed (edited or truncated)".into()
        }
        E::ExcessiveWork { .. } => "its header demands excessive work".into(),
        E::Io(e) => format!("reading its header: {e}"),
        _ => "unsupported age file".into(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn seal(recipients: &[Recipient], data: &[u8], piece: usize) -> (Vec<u8>, Sealed) {
        let mut s = Sealer::new(recipients, Vec::new()).unwrap();
        for p in data.chunks(piece.max(1)) {
            s.write_all(p).unwrap();
        }
        s.finish().unwrap()
    }

    fn read_all(r: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut r = r;
        r.read_to_end(&mut out).map(|_| out)
    }

    #[test]
    fn every_recipient_opens_and_the_plaintext_is_hashed() {
        let (archive, glass) = (ArchiveKey::generate(), ArchiveKey::generate());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let (ct, sealed) = seal(&[archive.recipient(), glass.recipient()], &data, 10_000);
        assert!(ct.starts_with(b"age-encryption.org/v1\n"));
        assert_eq!(sealed.plaintext_len, data.len() as u64);
        assert_eq!(
            sealed.plaintext_sha256,
            <[u8; 32]>::from(Sha256::digest(&data))
        );
        for k in [&archive, &glass] {
            assert_eq!(read_all(open(&ct[..], k).unwrap()).unwrap(), data);
        }
        // A fresh file key each time: the same image never seals to the same bytes.
        let (again, _) = seal(&[archive.recipient()], &data, 300_000);
        assert_ne!(again[100..200], ct[100..200]);
    }

    #[test]
    fn wrong_keys_edits_and_truncation_are_refused() {
        let key = ArchiveKey::generate();
        let data = vec![7u8; 200_000];
        let (ct, _) = seal(&[key.recipient()], &data, 4096);
        let other = ArchiveKey::generate();
        assert!(matches!(open(&ct[..], &other), Err(SealError::Open(_))));
        // One flipped payload bit: the chunk's tag fails.
        let mut edited = ct.clone();
        let at = edited.len() - 1000;
        edited[at] ^= 1;
        assert!(read_all(open(&edited[..], &key).unwrap()).is_err());
        // Cut at a chunk boundary and elsewhere: the missing last-chunk flag is detected.
        for cut in [ct.len() - 17, ct.len() - 1, ct.len() / 2] {
            let r = open(&ct[..cut], &key).and_then(|r| Ok(read_all(r)?));
            assert!(r.is_err(), "truncated at {cut} of {}", ct.len());
        }
        assert!(matches!(
            open(&b"not age"[..], &key),
            Err(SealError::Open(_))
        ));
        assert!(matches!(
            Sealer::new(&[], Vec::new()),
            Err(SealError::NoRecipients)
        ));
    }

    #[test]
    fn keys_round_trip_in_age_formats_and_never_print_the_secret() {
        let key = ArchiveKey::generate();
        let text = key.to_secret_string();
        assert!(text.starts_with("AGE-SECRET-KEY-1"));
        let file = format!(
            "# created: now\n# public key: {}\n{text}\n",
            key.recipient()
        );
        let back: ArchiveKey = file.parse().unwrap();
        assert_eq!(back.recipient().to_string(), key.recipient().to_string());
        let r: Recipient = key.recipient().to_string().parse().unwrap();
        assert!(r.to_string().starts_with("age1"));
        assert!(!format!("{key:?}").contains("SECRET"));
        assert!(matches!(
            "age1nope".parse::<Recipient>(),
            Err(SealError::Recipient(_))
        ));
        assert!(matches!(
            "# only a comment".parse::<ArchiveKey>(),
            Err(SealError::Key)
        ));
    }
}
