//! UnixFS file DAGs exactly as Kubo and ipfs-cluster build them with `cid-version=1`
//! (raw leaves, fixed-size chunks, balanced layout, at most 174 links per node, SHA-256), so
//! that a CID can be computed, and later recomputed from the bytes fetched, without trusting
//! the node that stored them.
//!
//! The layout follows boxo's `importer/balanced` builder: every leaf sits at the same depth;
//! leaves are grouped 174 to a node from left to right, those nodes 174 to a node, and so on
//! until one node remains. A file of at most one chunk is a single raw block (its CID is
//! `bafkrei…`); the empty file is the empty raw block. An internal node is a DAG-PB `PBNode`
//! whose links (`Hash`, an empty `Name`, `Tsize` = the bytes of the child's whole sub-DAG) come
//! before its `Data`: a UnixFS `File` with `filesize` and one `blocksizes` entry per child.
//! `e2e/tests/archive_formats.rs` compares every boundary case with Kubo's `ipfs add --only-hash`.

use cid::Cid;
use sha2::{Digest as _, Sha256};

/// Kubo's default chunk size (`size-262144`).
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Links per internal node (boxo's `DefaultLinksPerBlock`, 8192 / 47).
pub const MAX_LINKS: usize = 174;
/// The parameters, as recorded with each archived object.
pub const PROFILE: &str = "unixfs/cidv1/raw-leaves/size-262144/balanced-174/sha2-256";

const RAW: u64 = 0x55;
const DAG_PB: u64 = 0x70;
const SHA2_256: u64 = 0x12;

/// A link to a finished sub-DAG.
#[derive(Debug, Clone)]
struct Link {
    cid: Cid,
    /// Bytes of the sub-DAG (every block under and including the child).
    tsize: u64,
    /// File bytes under the child.
    filesize: u64,
}

fn cid_of(codec: u64, block: &[u8]) -> Cid {
    let digest = Sha256::digest(block);
    // A 32-byte digest always fits the 64-byte multihash.
    let mh = cid::multihash::Multihash::<64>::wrap(SHA2_256, &digest)
        .unwrap_or_else(|_| unreachable!("32-byte digest"));
    Cid::new_v1(codec, mh)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An internal node over `links`, as boxo encodes it.
fn node_block(links: &[Link]) -> Vec<u8> {
    let mut data = vec![0x08, 0x02]; // Type = File
    data.push(0x18); // filesize
    varint(links.iter().map(|l| l.filesize).sum(), &mut data);
    for l in links {
        data.push(0x20); // blocksizes (not packed)
        varint(l.filesize, &mut data);
    }
    let mut out = Vec::with_capacity(links.len() * 48 + data.len() + 8);
    for l in links {
        let mut pl = Vec::with_capacity(48);
        field_bytes(0x0a, &l.cid.to_bytes(), &mut pl); // Hash
        pl.extend_from_slice(&[0x12, 0x00]); // Name = ""
        pl.push(0x18); // Tsize
        varint(l.tsize, &mut pl);
        field_bytes(0x12, &pl, &mut out); // Links
    }
    field_bytes(0x0a, &data, &mut out); // Data
    out
}

/// Builds the DAG of one file from its bytes, in O(depth × 174) memory plus one chunk.
///
/// Every block is passed to the sink as it is made (a block store keeps them; a verifier
/// ignores them).
pub struct FileBuilder {
    chunk_size: usize,
    buf: Vec<u8>,
    /// `levels[0]`: leaves not yet grouped; `levels[k]`: nodes of level k not yet grouped.
    levels: Vec<Vec<Link>>,
    len: u64,
}

impl Default for FileBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl FileBuilder {
    /// A builder with Kubo's default chunk size.
    pub fn new() -> Self {
        Self::with_chunk_size(CHUNK_SIZE)
    }

    /// A builder with another chunk size (Kubo's `--chunker=size-<n>`; tests build deep trees
    /// from small inputs with it).
    ///
    /// # Panics
    /// When `chunk_size` is 0.
    pub fn with_chunk_size(chunk_size: usize) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        Self {
            chunk_size,
            buf: Vec::with_capacity(chunk_size.min(CHUNK_SIZE)),
            levels: vec![Vec::new()],
            len: 0,
        }
    }

    /// Bytes pushed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds file bytes; complete blocks go to `sink`.
    pub fn push(&mut self, mut data: &[u8], sink: &mut impl FnMut(&Cid, &[u8])) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            let take = (self.chunk_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.chunk_size {
                self.leaf(sink);
            }
        }
    }

    fn leaf(&mut self, sink: &mut impl FnMut(&Cid, &[u8])) {
        let cid = cid_of(RAW, &self.buf);
        sink(&cid, &self.buf);
        let n = self.buf.len() as u64;
        self.buf.clear();
        self.add(
            0,
            Link {
                cid,
                tsize: n,
                filesize: n,
            },
            sink,
        );
    }

    /// Adds a link at `level`, grouping full levels upwards.
    fn add(&mut self, level: usize, link: Link, sink: &mut impl FnMut(&Cid, &[u8])) {
        if self.levels.len() == level {
            self.levels.push(Vec::new());
        }
        self.levels[level].push(link);
        if self.levels[level].len() == MAX_LINKS {
            let links = std::mem::take(&mut self.levels[level]);
            let node = Self::node(&links, sink);
            self.add(level + 1, node, sink);
        }
    }

    fn node(links: &[Link], sink: &mut impl FnMut(&Cid, &[u8])) -> Link {
        let block = node_block(links);
        let cid = cid_of(DAG_PB, &block);
        sink(&cid, &block);
        Link {
            cid,
            tsize: block.len() as u64 + links.iter().map(|l| l.tsize).sum::<u64>(),
            filesize: links.iter().map(|l| l.filesize).sum(),
        }
    }

    /// Finishes the file: the root CID (the last block given to `sink` is the root's).
    pub fn finish(mut self, sink: &mut impl FnMut(&Cid, &[u8])) -> Cid {
        if !self.buf.is_empty() || self.len == 0 {
            // The last, short chunk; or the empty file's one empty raw block.
            self.leaf(sink);
        }
        let top = self.levels.len() - 1;
        for level in 0..top {
            if !self.levels[level].is_empty() {
                let links = std::mem::take(&mut self.levels[level]);
                let node = Self::node(&links, sink);
                self.levels[level + 1].push(node);
            }
        }
        let last = &self.levels[top];
        if last.len() == 1 {
            return last[0].cid;
        }
        let links = std::mem::take(&mut self.levels[top]);
        Self::node(&links, sink).cid
    }
}

/// The CID Kubo gives `bytes` (`ipfs add --cid-version=1`).
pub fn file_cid(bytes: &[u8]) -> Cid {
    let mut b = FileBuilder::new();
    b.push(bytes, &mut |_, _| {});
    b.finish(&mut |_, _| {})
}

/// The CID of everything `r` yields, read in chunks (constant memory).
///
/// # Errors
/// When reading fails.
pub fn reader_cid(mut r: impl std::io::Read) -> std::io::Result<Cid> {
    let mut b = FileBuilder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(b.finish(&mut |_, _| {}));
        }
        b.push(&buf[..n], &mut |_, _| {});
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    // Kubo's own CIDs (rust-unixfs's interop vectors, captured from `ipfs add --only-hash
    // --cid-version=1`; e2e/tests/archive_formats.rs compares many more with a live Kubo).
    #[test]
    fn single_block_files_match_kubo() {
        assert_eq!(
            file_cid(b"").to_string(),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
        assert_eq!(
            file_cid(b"hello world\n").to_string(),
            "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
        );
    }

    #[test]
    fn streaming_in_any_pieces_gives_the_same_dag() {
        let data: Vec<u8> = (0..(3 * 174 + 5) * 7)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let whole = {
            let mut b = FileBuilder::with_chunk_size(7);
            let mut blocks = Vec::new();
            b.push(&data, &mut |c, blk| blocks.push((*c, blk.to_vec())));
            let root = b.finish(&mut |c, blk| blocks.push((*c, blk.to_vec())));
            (root, blocks)
        };
        for step in [1, 3, 7, 100, 4096] {
            let mut b = FileBuilder::with_chunk_size(7);
            let mut blocks = Vec::new();
            for piece in data.chunks(step) {
                b.push(piece, &mut |c, blk| blocks.push((*c, blk.to_vec())));
            }
            let root = b.finish(&mut |c, blk| blocks.push((*c, blk.to_vec())));
            assert_eq!((root, &blocks), (whole.0, &whole.1), "step {step}");
        }
        // Every block's CID is its hash; the root is the last block.
        for (c, blk) in &whole.1 {
            assert_eq!(cid_of(c.codec(), blk), *c);
        }
        assert_eq!(whole.1.last().unwrap().0, whole.0);
        assert_eq!(whole.0.codec(), DAG_PB);
        assert_eq!(reader_cid(&data[..]).unwrap(), {
            let mut b = FileBuilder::new();
            b.push(&data, &mut |_, _| {});
            b.finish(&mut |_, _| {})
        });
    }
}
