//! Hexadecimal for the fixed-size hashes and ids that cross JSON on every append: table-driven
//! and without allocation. Each audit record carries up to six of them and each answer one or
//! more; with the `hex` crate's char-by-char `String`, encoding and decoding them was about a
//! sixth of the client's CPU in `bench/ledger`'s batched appends.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Value of each byte as a hex digit (either case); `INVALID` for the rest.
const VALUES: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};
const INVALID: u8 = 0xff;

/// Up to 32 bytes as lowercase hex, held inline.
#[derive(Clone, Copy)]
pub struct Encoded {
    buf: [u8; 64],
    len: usize,
}

impl Encoded {
    /// The hex digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// `bytes` as lowercase hex.
pub fn encode<const N: usize>(bytes: &[u8; N]) -> Encoded {
    const { assert!(N <= 32, "base16::encode holds at most 32 bytes") };
    let mut buf = [0u8; 64];
    for (pair, b) in buf.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    Encoded { buf, len: 2 * N }
}

/// Exactly `2·N` hex digits (either case) as `N` bytes; `None` for any other input.
pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (VALUES[usize::from(pair[0])], VALUES[usize::from(pair[1])]);
        // Valid digits are < 16; INVALID has its high bits set.
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 0x0f);
    }
    (bad < 16).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_hex_crate_both_ways() {
        let mut x = [0u8; 32];
        for round in 0..=255u8 {
            for (i, b) in x.iter_mut().enumerate() {
                *b = round.wrapping_mul(31).wrapping_add(i as u8 * 7);
            }
            let e = encode(&x);
            assert_eq!(e.as_str(), hex::encode(x));
            assert_eq!(decode::<32>(e.as_str()), Some(x));
            assert_eq!(decode::<32>(&e.as_str().to_uppercase()), Some(x));
        }
        let id = [0xa5u8; 16];
        assert_eq!(encode(&id).as_str(), "a5".repeat(16));
        assert_eq!(encode(&[0u8; 0]).as_str(), "");
    }

    #[test]
    fn refuses_what_is_not_exactly_hex() {
        let good = "00".repeat(32);
        assert!(decode::<32>(&good).is_some());
        assert_eq!(decode::<32>(&good[1..]), None, "odd length");
        assert_eq!(decode::<32>(&"00".repeat(33)), None, "too long");
        assert_eq!(decode::<16>(&good), None, "wrong size");
        for bad in ['g', 'G', ' ', '/', ':', '@', '`', '\u{e9}'] {
            let mut s = "0".repeat(63);
            s.insert(17, bad);
            let s: String = s.chars().take(64).collect();
            if s.len() == 64 {
                assert_eq!(decode::<32>(&s), None, "{bad:?}");
            }
            let t = format!("{bad}{}", &good[bad.len_utf8()..]);
            assert_eq!(decode::<32>(&t), None, "{bad:?} first");
        }
    }
}
