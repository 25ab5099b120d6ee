//! Protocol detection from the first bytes of a stream. Pure functions over untrusted input:
//! they never panic and ask for more bytes only up to a fixed bound.

/// ALPN protocol id that marks medmesh's own mTLS between sidecars.
pub const MEDMESH_ALPN: &[u8] = medmesh_core::tls::MESH_ALPN;
/// Most bytes detection ever waits for (one full TLS record).
pub const MAX_PEEK: usize = 5 + 16 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// What the first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello, with the ALPN protocols it offers.
    Tls {
        /// Offered ALPN protocol ids, in order.
        alpn: Vec<Vec<u8>>,
    },
    /// HTTP/1.x request.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// A DICOM A-ASSOCIATE-RQ PDU.
    Dicom,
    /// Anything else.
    Opaque,
}

impl Detected {
    /// Whether this is medmesh's own mTLS.
    pub fn is_medmesh_tls(&self) -> bool {
        matches!(self, Self::Tls { alpn } if alpn.iter().any(|p| p == MEDMESH_ALPN))
    }

    /// A bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Tls { .. } => "tls",
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Dicom => "dicom",
            Self::Opaque => "opaque",
        }
    }
}

/// Classifies `buf`, or returns `None` when more bytes are needed to decide. Callers stop
/// waiting after a timeout (server-speaks-first protocols send nothing) or at [`MAX_PEEK`]
/// bytes, and then treat the stream as opaque.
pub fn detect(buf: &[u8]) -> Option<Detected> {
    let first = *buf.first()?;
    if first == 0x16 {
        return tls(buf);
    }
    if buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Some(Detected::Http1);
    }
    // Still a prefix of the HTTP/2 preface or of a method: undecided.
    if H2_PREFACE.starts_with(buf) || METHODS.iter().any(|m| m.starts_with(buf)) {
        return None;
    }
    if first == 0x01 {
        // A-ASSOCIATE-RQ: type 0x01, reserved, u32 length, u16 protocol version 1.
        if buf.len() < 8 {
            return if buf.len() >= 2 && buf[1] != 0 {
                Some(Detected::Opaque)
            } else {
                None
            };
        }
        let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
        let version = u16::from_be_bytes([buf[6], buf[7]]);
        return Some(
            if buf[1] == 0 && version & 1 == 1 && (68..=1 << 20).contains(&len) {
                Detected::Dicom
            } else {
                Detected::Opaque
            },
        );
    }
    Some(Detected::Opaque)
}

fn tls(buf: &[u8]) -> Option<Detected> {
    if buf.len() < 5 {
        return None;
    }
    // Record header: type 0x16, legacy version 0x03 0x0X, length.
    if buf[1] != 0x03 {
        return Some(Detected::Opaque);
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len == 0 || len > 16 * 1024 {
        return Some(Detected::Opaque);
    }
    if buf.len() < 5 + len {
        return None;
    }
    Some(match client_hello_alpn(&buf[5..5 + len]) {
        Some(alpn) => Detected::Tls { alpn },
        None => Detected::Opaque,
    })
}

/// The ALPN list of a ClientHello handshake message (the first record's payload). `None` when it
/// is not a well-formed ClientHello contained in this record.
fn client_hello_alpn(hs: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut r = Cursor(hs);
    if r.u8()? != 0x01 {
        return None;
    }
    let body_len = r.u24()?;
    let mut r = Cursor(r.take(body_len)?);
    r.take(2 + 32)?; // legacy_version, random
    let sid = usize::from(r.u8()?);
    r.take(sid)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let comp = usize::from(r.u8()?);
    r.take(comp)?;
    if r.0.is_empty() {
        return Some(Vec::new());
    }
    let ext_len = usize::from(r.u16()?);
    let mut exts = Cursor(r.take(ext_len)?);
    let mut alpn = Vec::new();
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let data = exts.take(len)?;
        if ty == 16 {
            let mut d = Cursor(data);
            let list_len = usize::from(d.u16()?);
            let mut list = Cursor(d.take(list_len)?);
            while !list.0.is_empty() {
                let n = usize::from(list.u8()?);
                alpn.push(list.take(n)?.to_vec());
            }
        }
    }
    Some(alpn)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests;
