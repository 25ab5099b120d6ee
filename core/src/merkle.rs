//! RFC 9162 Merkle tree hashing, proof construction and proof verification.
//!
//! Hashes: a leaf is `SHA-256(0x00 ‖ entry)`, an interior node `SHA-256(0x01 ‖ left ‖ right)`, the
//! empty tree `SHA-256("")`. A tree of `n` leaves splits at `k`, the largest power of two below `n`.
//!
//! Storage model: a *node* `(level, index)` is the root of the complete, aligned subtree that covers
//! leaves `[index·2^level, (index+1)·2^level)`. Every hash a proof needs is either such a node or the
//! hash of the tree's ragged right edge, which is a fold of at most `log2 n` nodes; so proofs are
//! `O(log n)` node reads (see [`NodeSource`]).

use std::fmt;

use sha2::{Digest, Sha256};

/// A SHA-256 digest in the tree.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        crate::base16::encode(&self.0).as_str().to_owned()
    }

    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// When the input is not exactly 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, HashParseError> {
        crate::base16::decode(s)
            .map(Self)
            .ok_or_else(|| HashParseError(s.chars().take(80).collect()))
    }

    /// Builds a hash from a slice of exactly 32 bytes.
    ///
    /// # Errors
    /// When the slice is not 32 bytes long.
    pub fn from_slice(b: &[u8]) -> Result<Self, HashParseError> {
        <[u8; 32]>::try_from(b)
            .map(Self)
            .map_err(|_| HashParseError(format!("{} bytes", b.len())))
    }
}

/// A string or slice that is not a SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a SHA-256 digest (64 hex digits / 32 bytes)")]
pub struct HashParseError(String);

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::base16::encode(&self.0).as_str())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(crate::base16::encode(&self.0).as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Hash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// `SHA-256(data)`.
pub fn sha256(data: &[u8]) -> Hash {
    Hash(Sha256::digest(data).into())
}

/// The root of the empty tree, `SHA-256("")`.
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    Hash(h.finalize().into())
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left.0);
    h.update(right.0);
    Hash(h.finalize().into())
}

/// Why a proof was refused or could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange {
        /// Requested index.
        index: u64,
        /// Tree size.
        size: u64,
    },
    /// A consistency proof was asked from a larger size to a smaller one.
    #[error("consistency proof from size {from} to smaller size {to}")]
    SizesReversed {
        /// Older size.
        from: u64,
        /// Newer size.
        to: u64,
    },
    /// The proof has the wrong number of hashes for these sizes.
    #[error("proof has {got} hashes, {want} expected for these tree sizes")]
    WrongLength {
        /// Hashes supplied.
        got: usize,
        /// Hashes the sizes call for.
        want: usize,
    },
    /// The proof recomputes a root that differs from the one claimed.
    #[error("proof recomputes root {computed}, but the expected root is {expected}")]
    RootMismatch {
        /// Root the proof leads to.
        computed: Hash,
        /// Root that was expected.
        expected: Hash,
    },
    /// A consistency proof does not reproduce the older root.
    #[error("consistency proof recomputes old root {computed}, but the old root is {expected}")]
    OldRootMismatch {
        /// Root the proof leads to.
        computed: Hash,
        /// The older root.
        expected: Hash,
    },
}

/// Number of hashes in an inclusion proof for `index` in a tree of `size` leaves.
pub fn inclusion_proof_len(index: u64, size: u64) -> usize {
    // Levels where the paths to `index` and to the last leaf differ, plus the levels above them
    // where `index`'s ancestor is a right child (RFC 9162 §2.1.3; as in transparency-dev).
    let inner = 64 - (index ^ (size - 1)).leading_zeros();
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner + border) as usize
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
///
/// # Errors
/// [`ProofError::IndexOutOfRange`] when `index >= size`, [`ProofError::WrongLength`] when the proof
/// is too long or too short, [`ProofError::RootMismatch`] when it does not lead to `root`.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let want = inclusion_proof_len(index, size);
    if proof.len() != want {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want,
        });
    }
    let computed = root_from_inclusion_proof(leaf, index, size, proof);
    if &computed != root {
        return Err(ProofError::RootMismatch {
            computed,
            expected: *root,
        });
    }
    Ok(())
}

fn root_from_inclusion_proof(leaf: &Hash, index: u64, size: u64, proof: &[Hash]) -> Hash {
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    r
}

/// Verifies a consistency proof between two tree heads (RFC 9162 §2.1.4.2).
///
/// A tree of size 0 is consistent with every tree (empty proof); equal sizes need an empty proof
/// and equal roots.
///
/// # Errors
/// [`ProofError::SizesReversed`] when `old_size > new_size`, [`ProofError::WrongLength`] for a proof
/// of the wrong length, [`ProofError::OldRootMismatch`] / [`ProofError::RootMismatch`] when the
/// proof does not reproduce the old / new root.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesReversed {
            from: old_size,
            to: new_size,
        });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want: 0,
            });
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootMismatch {
                computed: *old_root,
                expected: *new_root,
            });
        }
        return Ok(());
    }
    let want = consistency_proof_len(old_size, new_size);
    if proof.len() != want {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want,
        });
    }
    let mut path = proof.iter();
    let first_is_pow2 = old_size.is_power_of_two();
    let seed = if first_is_pow2 {
        *old_root
    } else {
        // Length was checked above and is at least 1 when the old size is not a power of two.
        match path.next() {
            Some(h) => *h,
            None => {
                return Err(ProofError::WrongLength { got: 0, want });
            }
        }
    };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (seed, seed);
    for c in path {
        if snode == 0 {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want,
            });
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if &fr != old_root {
        return Err(ProofError::OldRootMismatch {
            computed: fr,
            expected: *old_root,
        });
    }
    if &sr != new_root || snode != 0 {
        return Err(ProofError::RootMismatch {
            computed: sr,
            expected: *new_root,
        });
    }
    Ok(())
}

/// Number of hashes in a consistency proof from `old_size` to `new_size` (`0 < old < new`).
pub fn consistency_proof_len(old_size: u64, new_size: u64) -> usize {
    // Mirrors SUBPROOF: count the siblings collected on the way down.
    fn sub(m: u64, n: u64, complete: bool) -> usize {
        if m == n {
            return usize::from(!complete);
        }
        let k = split_point(n);
        if m <= k {
            sub(m, k, complete) + 1
        } else {
            sub(m - k, n - k, false) + 1
        }
    }
    if old_size == 0 || old_size >= new_size {
        return 0;
    }
    sub(old_size, new_size, true)
}

/// The largest power of two strictly below `n` (`n >= 2`).
pub fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Read access to the complete, aligned nodes of a tree.
pub trait NodeSource {
    /// The error of a failed read.
    type Error;

    /// The hash of node `(level, index)`, which covers leaves `[index << level, (index+1) << level)`.
    /// Callers only ask for nodes that are complete in the tree being proven.
    ///
    /// # Errors
    /// When the node cannot be read.
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error>;
}

/// The hash of the subtree over leaves `[lo, hi)`, where `lo` is aligned to the largest power of
/// two not above `hi - lo` (true for every subtree of the RFC 9162 split). Reads at most
/// `log2(hi - lo) + 1` nodes.
///
/// # Errors
/// When a node read fails.
pub fn subtree_hash<S: NodeSource>(src: &S, lo: u64, hi: u64) -> Result<Hash, S::Error> {
    debug_assert!(hi > lo);
    let width = hi - lo;
    if width.is_power_of_two() {
        let level = width.trailing_zeros() as u8;
        return src.node(level, lo >> level);
    }
    // Decompose into complete subtrees from the left, then fold from the right.
    let mut parts = Vec::with_capacity(64);
    let mut start = lo;
    while start < hi {
        let w = 1u64 << (63 - (hi - start).leading_zeros());
        let level = w.trailing_zeros() as u8;
        parts.push(src.node(level, start >> level)?);
        start += w;
    }
    Ok(fold_right(&parts))
}

fn fold_right(parts: &[Hash]) -> Hash {
    let mut iter = parts.iter().rev();
    let Some(last) = iter.next() else {
        return empty_root();
    };
    iter.fold(*last, |acc, left| node_hash(left, &acc))
}

/// The root of the first `size` leaves.
///
/// # Errors
/// When a node read fails.
pub fn root_at<S: NodeSource>(src: &S, size: u64) -> Result<Hash, S::Error> {
    if size == 0 {
        return Ok(empty_root());
    }
    subtree_hash(src, 0, size)
}

/// Builds the inclusion proof for leaf `index` in the tree of the first `size` leaves
/// (RFC 9162 §2.1.3.1), bottom-up.
///
/// # Errors
/// `Err(None)` when `index >= size`, `Err(Some(e))` when a node read fails.
pub fn inclusion_proof<S: NodeSource>(
    src: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, Option<S::Error>> {
    if index >= size {
        return Err(None);
    }
    let mut proof = Vec::with_capacity(64);
    let (mut lo, mut hi) = (0u64, size);
    // Walk down, collecting siblings top-down; reverse at the end.
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if index < lo + k {
            proof.push(subtree_hash(src, lo + k, hi).map_err(Some)?);
            hi = lo + k;
        } else {
            proof.push(subtree_hash(src, lo, lo + k).map_err(Some)?);
            lo += k;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// Builds the consistency proof from the tree of `old_size` leaves to that of `new_size` leaves
/// (RFC 9162 §2.1.4.1), bottom-up. Empty when `old_size` is 0 or equal to `new_size`.
///
/// # Errors
/// `Err(None)` when `old_size > new_size`, `Err(Some(e))` when a node read fails.
pub fn consistency_proof<S: NodeSource>(
    src: &S,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, Option<S::Error>> {
    if old_size > new_size {
        return Err(None);
    }
    if old_size == 0 || old_size == new_size {
        return Ok(Vec::new());
    }
    let mut proof = Vec::with_capacity(64);
    let (mut lo, mut hi) = (0u64, new_size);
    let mut m = old_size;
    let mut complete = true;
    loop {
        let n = hi - lo;
        if m == n {
            if !complete {
                proof.push(subtree_hash(src, lo, hi).map_err(Some)?);
            }
            break;
        }
        let k = split_point(n);
        if m <= k {
            proof.push(subtree_hash(src, lo + k, hi).map_err(Some)?);
            hi = lo + k;
        } else {
            proof.push(subtree_hash(src, lo, lo + k).map_err(Some)?);
            lo += k;
            m -= k;
            complete = false;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// A node that [`Frontier::push`] completed: store it to serve proofs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewNode {
    /// Height above the leaves (0 for the leaf itself).
    pub level: u8,
    /// Position among the nodes of that level.
    pub index: u64,
    /// The node's hash.
    pub hash: Hash,
}

/// The right edge of a growing tree: the roots of its maximal complete subtrees, largest first.
/// Appending needs only this, never a read of older nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// `(level, hash)` from the leftmost (largest) subtree to the rightmost.
    peaks: Vec<(u8, Hash)>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the frontier of the first `size` leaves from stored nodes (`O(log n)` reads).
    ///
    /// # Errors
    /// When a node read fails.
    pub fn load<S: NodeSource>(src: &S, size: u64) -> Result<Self, S::Error> {
        let mut peaks = Vec::new();
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            if size & (1u64 << level) != 0 {
                peaks.push((level, src.node(level, start >> level)?));
                start += 1u64 << level;
            }
        }
        Ok(Self { size, peaks })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash and reports every node this completes, the leaf itself first.
    pub fn push(&mut self, leaf: Hash, mut out: impl FnMut(NewNode)) {
        let index = self.size;
        out(NewNode {
            level: 0,
            index,
            hash: leaf,
        });
        let mut cur = (0u8, leaf);
        while let Some(&(level, left)) = self.peaks.last() {
            if level != cur.0 {
                break;
            }
            self.peaks.pop();
            let hash = node_hash(&left, &cur.1);
            let level = level + 1;
            out(NewNode {
                level,
                index: index >> level,
                hash,
            });
            cur = (level, hash);
        }
        self.peaks.push(cur);
        self.size += 1;
    }

    /// The tree's root.
    pub fn root(&self) -> Hash {
        let hashes: Vec<Hash> = self.peaks.iter().map(|(_, h)| *h).collect();
        fold_right(&hashes)
    }
}

#[cfg(test)]
mod tests;
