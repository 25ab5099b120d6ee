//! Just enough of DICOM Part 10 files to find the data set a DIMSE transfer carries.
//!
//! A C-STORE transfers the data set without the 128-byte preamble, the `DICM` magic and the file
//! meta group (0002,xxxx); receivers write a new meta group. So the hash that identifies an
//! instance across DIMSE hops is that of the bytes after the meta group.

/// Why a Part 10 header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Part10Error {
    /// The file meta group is cut short.
    #[error("file meta group truncated at offset {0}")]
    Truncated(usize),
}

/// A Part 10 file split at the end of its meta group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10<'a> {
    /// Transfer syntax UID from (0002,0010), padding removed.
    pub transfer_syntax: Option<String>,
    /// The data set bytes after the meta group.
    pub dataset: &'a [u8],
}

/// Splits a Part 10 file (`preamble ‖ "DICM" ‖ meta group ‖ data set`). Returns `Ok(None)` when
/// the bytes have no `DICM` magic at offset 128 (not a Part 10 file).
///
/// # Errors
/// When the meta group is malformed.
pub fn split_part10(b: &[u8]) -> Result<Option<Part10<'_>>, Part10Error> {
    if b.len() < 132 || &b[128..132] != b"DICM" {
        return Ok(None);
    }
    let mut pos = 132;
    let mut ts = None;
    // The meta group is always explicit VR little endian.
    while pos + 8 <= b.len() {
        let group = u16::from_le_bytes([b[pos], b[pos + 1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([b[pos + 2], b[pos + 3]]);
        let vr = &b[pos + 4..pos + 6];
        let long = matches!(
            vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        let (len, header) = if long {
            if pos + 12 > b.len() {
                return Err(Part10Error::Truncated(pos));
            }
            (
                u32::from_le_bytes([b[pos + 8], b[pos + 9], b[pos + 10], b[pos + 11]]) as usize,
                12,
            )
        } else {
            (u16::from_le_bytes([b[pos + 6], b[pos + 7]]) as usize, 8)
        };
        let start = pos + header;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= b.len())
            .ok_or(Part10Error::Truncated(pos))?;
        if element == 0x0010 {
            ts = Some(
                String::from_utf8_lossy(&b[start..end])
                    .trim_end_matches(['\0', ' '])
                    .to_owned(),
            );
        }
        pos = end;
    }
    Ok(Some(Part10 {
        transfer_syntax: ts,
        dataset: &b[pos..],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&tag.0.to_le_bytes());
        v.extend_from_slice(&tag.1.to_le_bytes());
        v.extend_from_slice(vr);
        if vr == b"OB" {
            v.extend_from_slice(&[0, 0]);
            v.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn splits_meta_group() {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        f.extend(element((2, 0), b"UL", &[0; 4]));
        f.extend(element((2, 1), b"OB", &[0, 1]));
        f.extend(element((2, 0x10), b"UI", b"1.2.840.10008.1.2.1\0"));
        let ds = element((8, 0x16), b"UI", b"1.2.3\0");
        f.extend_from_slice(&ds);
        let p = split_part10(&f).unwrap().unwrap();
        assert_eq!(p.transfer_syntax.as_deref(), Some("1.2.840.10008.1.2.1"));
        assert_eq!(p.dataset, ds.as_slice());
        assert_eq!(split_part10(b"not dicom").unwrap(), None);
        for n in 133..f.len() - ds.len() {
            // Every cut inside the meta group is reported, never a panic.
            let _ = split_part10(&f[..n]);
        }
    }
}
