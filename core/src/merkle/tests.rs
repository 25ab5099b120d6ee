use proptest::prelude::*;

use super::*;

/// A tree held in memory level by level: the reference the algorithms are checked against.
struct Levels(Vec<Vec<Hash>>);

impl Levels {
    fn new(leaves: &[Hash]) -> Self {
        let mut levels = vec![leaves.to_vec()];
        while levels.last().map_or(0, Vec::len) > 1 {
            let prev = levels.last().map(Vec::as_slice).unwrap_or_default();
            let next = prev
                .chunks_exact(2)
                .map(|p| node_hash(&p[0], &p[1]))
                .collect();
            levels.push(next);
        }
        Self(levels)
    }
}

impl NodeSource for Levels {
    type Error = String;
    fn node(&self, level: u8, index: u64) -> Result<Hash, String> {
        self.0
            .get(level as usize)
            .and_then(|l| l.get(index as usize))
            .copied()
            .ok_or_else(|| format!("node ({level}, {index}) is not complete"))
    }
}

/// MTH straight from RFC 9162 §2.1.1.
fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split_point(n as u64) as usize;
            node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// PATH straight from RFC 9162 §2.1.3.1.
fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return vec![];
    }
    let k = split_point(n as u64) as usize;
    if m < k {
        let mut p = path(m, &leaves[..k]);
        p.push(mth(&leaves[k..]));
        p
    } else {
        let mut p = path(m - k, &leaves[k..]);
        p.push(mth(&leaves[..k]));
        p
    }
}

/// SUBPROOF straight from RFC 9162 §2.1.4.1.
fn subproof(m: usize, leaves: &[Hash], b: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if b { vec![] } else { vec![mth(leaves)] };
    }
    let k = split_point(n as u64) as usize;
    if m <= k {
        let mut p = subproof(m, &leaves[..k], b);
        p.push(mth(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(mth(&leaves[..k]));
        p
    }
}

fn leaves(n: usize) -> Vec<Hash> {
    (0..n as u64).map(|i| leaf_hash(&i.to_be_bytes())).collect()
}

#[test]
fn known_answers_from_transparency_dev() {
    // The reference vectors of transparency-dev/merkle (also in RFC 6962 test suites).
    let data: [&[u8]; 8] = [
        b"",
        &[0x00],
        &[0x10],
        &[0x20, 0x21],
        &[0x30, 0x31],
        &[0x40, 0x41, 0x42, 0x43],
        &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
        &[
            0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
            0x6e, 0x6f,
        ],
    ];
    let hashes: Vec<Hash> = data.iter().map(|d| leaf_hash(d)).collect();
    assert_eq!(
        mth(&hashes).to_hex(),
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    );
    let mut f = Frontier::new();
    for h in &hashes {
        f.push(*h, |_| {});
    }
    assert_eq!(f.root(), mth(&hashes));
    assert_eq!(
        empty_root().to_hex(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn frontier_emits_every_complete_node_once() {
    let l = leaves(37);
    let mut f = Frontier::new();
    let mut got = Vec::new();
    for h in &l {
        f.push(*h, |n| got.push(n));
    }
    let levels = Levels::new(&l);
    let want: usize = levels.0.iter().map(Vec::len).sum();
    assert_eq!(got.len(), want);
    for n in got {
        assert_eq!(levels.node(n.level, n.index).unwrap(), n.hash);
    }
    let reloaded = Frontier::load(&levels, 37).unwrap();
    assert_eq!(reloaded, f);
}

#[test]
fn rejects_bad_parameters() {
    let l = leaves(10);
    let src = Levels::new(&l);
    let root = root_at(&src, 10).unwrap();
    assert_eq!(inclusion_proof(&src, 10, 10), Err(None));
    assert_eq!(consistency_proof(&src, 11, 10), Err(None));
    assert!(matches!(
        verify_inclusion(&l[0], 10, 10, &[], &root),
        Err(ProofError::IndexOutOfRange {
            index: 10,
            size: 10
        })
    ));
    assert!(matches!(
        verify_consistency(11, 10, &root, &root, &[]),
        Err(ProofError::SizesReversed { from: 11, to: 10 })
    ));
    assert!(matches!(
        verify_consistency(10, 10, &root, &l[0], &[]),
        Err(ProofError::RootMismatch { .. })
    ));
    verify_consistency(0, 10, &Hash::default(), &root, &[]).unwrap();
    verify_consistency(10, 10, &root, &root, &[]).unwrap();
}

/// Cross-check against ct-merkle, an independent RFC 6962 implementation.
#[test]
fn agrees_with_ct_merkle() {
    use ct_merkle::mem_backed_tree::MemoryBackedTree;
    for n in [1usize, 2, 3, 5, 8, 13, 64, 100, 257, 1000] {
        let entries: Vec<Vec<u8>> = (0..n).map(|i| format!("entry {i}").into_bytes()).collect();
        let mut theirs = MemoryBackedTree::<sha2::Sha256, Vec<u8>>::new();
        let mut ours = Frontier::new();
        let mut hashes = Vec::new();
        for e in &entries {
            theirs.push(e.clone());
            let h = leaf_hash(e);
            hashes.push(h);
            ours.push(h, |_| {});
        }
        let their_root = theirs.root();
        assert_eq!(
            ours.root().0.as_slice(),
            their_root.as_bytes().as_slice(),
            "root n={n}"
        );
        let src = Levels::new(&hashes);
        for i in [0, n / 3, n / 2, n - 1] {
            let ours = inclusion_proof(&src, i as u64, n as u64).unwrap();
            let flat: Vec<u8> = ours.iter().flat_map(|h| h.0).collect();
            assert_eq!(
                flat,
                theirs.prove_inclusion(i).as_bytes(),
                "inclusion {i} of {n}"
            );
        }
        for m in [1, n / 3, n / 2, n - 1, n] {
            if m == 0 {
                continue;
            }
            let ours = consistency_proof(&src, m as u64, n as u64).unwrap();
            let flat: Vec<u8> = ours.iter().flat_map(|h| h.0).collect();
            assert_eq!(
                flat,
                theirs.prove_consistency(n - m).as_bytes(),
                "consistency {m} -> {n}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every inclusion proof matches the RFC definition, verifies, and fails once corrupted.
    #[test]
    fn inclusion_proofs(size in 1u64..10_000, idx_seed in any::<u64>(), flip in any::<(usize, u8)>()) {
        let l = leaves(size as usize);
        let src = Levels::new(&l);
        let index = idx_seed % size;
        let root = root_at(&src, size).unwrap();
        prop_assert_eq!(root, mth(&l));
        let proof = inclusion_proof(&src, index, size).unwrap();
        prop_assert_eq!(proof.len(), inclusion_proof_len(index, size));
        if size <= 2048 {
            prop_assert_eq!(&proof, &path(index as usize, &l));
        }
        verify_inclusion(&l[index as usize], index, size, &proof, &root).unwrap();

        // Corruptions: a flipped bit in any hash, another leaf, another index, another size,
        // a truncated or extended proof.
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let at = flip.0 % bad.len();
            bad[at].0[flip.1 as usize % 32] ^= 1;
            prop_assert!(verify_inclusion(&l[index as usize], index, size, &bad, &root).is_err());
            prop_assert!(verify_inclusion(&l[index as usize], index, size, &proof[1..], &root).is_err());
        }
        let mut longer = proof.clone();
        longer.push(root);
        prop_assert!(verify_inclusion(&l[index as usize], index, size, &longer, &root).is_err());
        let other = leaf_hash(b"not in the tree");
        prop_assert!(verify_inclusion(&other, index, size, &proof, &root).is_err());
        if size > 1 {
            let j = (index + 1) % size;
            prop_assert!(verify_inclusion(&l[index as usize], j, size, &proof, &root).is_err());
        }
    }

    /// Every consistency proof matches the RFC definition, verifies, and fails once corrupted.
    #[test]
    fn consistency_proofs(new in 1u64..10_000, old_seed in any::<u64>(), flip in any::<(usize, u8)>()) {
        let l = leaves(new as usize);
        let src = Levels::new(&l);
        let old = 1 + old_seed % new;
        let old_root = root_at(&src, old).unwrap();
        let new_root = root_at(&src, new).unwrap();
        let proof = consistency_proof(&src, old, new).unwrap();
        prop_assert_eq!(proof.len(), consistency_proof_len(old, new));
        if new <= 2048 && old < new {
            prop_assert_eq!(&proof, &subproof(old as usize, &l, true));
        }
        verify_consistency(old, new, &old_root, &new_root, &proof).unwrap();
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let at = flip.0 % bad.len();
            bad[at].0[flip.1 as usize % 32] ^= 1;
            prop_assert!(verify_consistency(old, new, &old_root, &new_root, &bad).is_err());
            prop_assert!(verify_consistency(old, new, &old_root, &new_root, &proof[1..]).is_err());
        }
        // A forked old tree: same size, one leaf changed.
        let mut forked = l.clone();
        forked[(old - 1) as usize] = leaf_hash(b"forged");
        let forked_root = mth(&forked[..old as usize]);
        prop_assert!(verify_consistency(old, new, &forked_root, &new_root, &proof).is_err());
        let wrong_new = leaf_hash(b"other root");
        prop_assert!(verify_consistency(old, new, &old_root, &wrong_new, &proof).is_err());
    }
}
