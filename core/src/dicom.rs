//! Just enough of DICOM Part 10 files to find the data set a DIMSE transfer carries.
//!
//! A C-STORE transfers the data set without the 128-byte preamble, the `DICM` magic and the file
//! meta group (0002,xxxx); receivers write a new meta group. So the hash that identifies an
//! instance across DIMSE hops is that of the bytes after the meta group.

pub mod command;

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
        let long = long_vr(vr);
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

/// Implicit VR Little Endian: the only uncompressed transfer syntax without VRs on the wire.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

fn long_vr(vr: &[u8]) -> bool {
    matches!(
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
    )
}

/// The value of a top-level text element (`group`, `element`) of a little-endian data set in
/// `transfer_syntax`, padding removed; `None` when it is absent, or when an element before it
/// has an undefined length or the bytes end (this reads only the start of a data set, where
/// identifying UIDs are). Big-endian data sets are not read.
pub fn dataset_text(
    dataset: &[u8],
    transfer_syntax: &str,
    group: u16,
    element: u16,
) -> Option<String> {
    let explicit = transfer_syntax != IMPLICIT_VR_LE;
    let want = (u32::from(group) << 16) | u32::from(element);
    let b = dataset;
    let mut pos = 0usize;
    while pos + 8 <= b.len() {
        let g = u16::from_le_bytes([b[pos], b[pos + 1]]);
        let e = u16::from_le_bytes([b[pos + 2], b[pos + 3]]);
        let tag = (u32::from(g) << 16) | u32::from(e);
        if tag > want {
            return None;
        }
        let (len, header) = if explicit {
            let vr = &b[pos + 4..pos + 6];
            if long_vr(vr) {
                if pos + 12 > b.len() {
                    return None;
                }
                let l = u32::from_le_bytes([b[pos + 8], b[pos + 9], b[pos + 10], b[pos + 11]]);
                (l, 12)
            } else {
                (u32::from(u16::from_le_bytes([b[pos + 6], b[pos + 7]])), 8)
            }
        } else {
            (
                u32::from_le_bytes([b[pos + 4], b[pos + 5], b[pos + 6], b[pos + 7]]),
                8,
            )
        };
        if len == u32::MAX {
            return None;
        }
        let start = pos + header;
        let end = start.checked_add(len as usize).filter(|e| *e <= b.len())?;
        if tag == want {
            return Some(
                String::from_utf8_lossy(&b[start..end])
                    .trim_end_matches(['\0', ' '])
                    .to_owned(),
            );
        }
        pos = end;
    }
    None
}

/// Options of a synthetic instance.
#[derive(Debug, Clone)]
pub struct SyntheticInstance {
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Patient's name (synthetic: used to prove it never reaches the ledger).
    pub patient_name: String,
    /// Patient ID (synthetic).
    pub patient_id: String,
    /// Image rows.
    pub rows: u16,
    /// Image columns.
    pub columns: u16,
    /// Seed of the pixel pattern.
    pub seed: u64,
}

/// CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// medmesh's implementation class UID (under the UUID-derived 2.25 root).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.304185739190183461742458374981725011209";

fn put_element(out: &mut Vec<u8>, group: u16, element: u16, vr: &[u8; 2], value: &[u8]) {
    let pad = if value.len() % 2 == 1 {
        // UIDs pad with NUL, text with space, binary with 0.
        Some(if vr == b"UI" || vr == b"OB" || vr == b"OW" {
            0u8
        } else {
            b' '
        })
    } else {
        None
    };
    let len = value.len() + usize::from(pad.is_some());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(len as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(len as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
    if let Some(p) = pad {
        out.push(p);
    }
}

/// Wraps a data set received over DIMSE into a Part 10 file with a new file meta group, as a
/// storage SCP does.
pub fn part10(
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
    dataset: &[u8],
) -> Vec<u8> {
    let mut meta = Vec::new();
    put_element(&mut meta, 0x0002, 0x0001, b"OB", &[0, 1]);
    put_element(&mut meta, 0x0002, 0x0002, b"UI", sop_class.as_bytes());
    put_element(&mut meta, 0x0002, 0x0003, b"UI", sop_instance.as_bytes());
    put_element(&mut meta, 0x0002, 0x0010, b"UI", transfer_syntax.as_bytes());
    put_element(
        &mut meta,
        0x0002,
        0x0012,
        b"UI",
        IMPLEMENTATION_CLASS_UID.as_bytes(),
    );
    let mut file = vec![0u8; 128];
    file.extend_from_slice(b"DICM");
    put_element(
        &mut file,
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    );
    file.extend_from_slice(&meta);
    file.extend_from_slice(dataset);
    file
}

/// A synthetic CT instance as a DICOM Part 10 file (explicit VR little endian): a valid file
/// meta group and a data set with patient, study, series and image attributes and 16-bit pixel
/// data. Repo-made sample data: no download, no real patient.
pub fn synthetic_ct(i: &SyntheticInstance) -> Vec<u8> {
    let mut ds = Vec::with_capacity(usize::from(i.rows) * usize::from(i.columns) * 2 + 1024);
    put_element(&mut ds, 0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.as_bytes());
    put_element(
        &mut ds,
        0x0008,
        0x0018,
        b"UI",
        i.sop_instance_uid.as_bytes(),
    );
    put_element(&mut ds, 0x0008, 0x0060, b"CS", b"CT");
    put_element(&mut ds, 0x0010, 0x0010, b"PN", i.patient_name.as_bytes());
    put_element(&mut ds, 0x0010, 0x0020, b"LO", i.patient_id.as_bytes());
    put_element(&mut ds, 0x0020, 0x000D, b"UI", i.study_uid.as_bytes());
    put_element(&mut ds, 0x0020, 0x000E, b"UI", i.series_uid.as_bytes());
    put_element(&mut ds, 0x0028, 0x0002, b"US", &1u16.to_le_bytes());
    put_element(&mut ds, 0x0028, 0x0004, b"CS", b"MONOCHROME2");
    put_element(&mut ds, 0x0028, 0x0010, b"US", &i.rows.to_le_bytes());
    put_element(&mut ds, 0x0028, 0x0011, b"US", &i.columns.to_le_bytes());
    put_element(&mut ds, 0x0028, 0x0100, b"US", &16u16.to_le_bytes());
    put_element(&mut ds, 0x0028, 0x0101, b"US", &12u16.to_le_bytes());
    put_element(&mut ds, 0x0028, 0x0102, b"US", &11u16.to_le_bytes());
    put_element(&mut ds, 0x0028, 0x0103, b"US", &0u16.to_le_bytes());
    let mut pixels = Vec::with_capacity(usize::from(i.rows) * usize::from(i.columns) * 2);
    let mut x = i.seed | 1;
    for r in 0..u32::from(i.rows) {
        for c in 0..u32::from(i.columns) {
            // A smooth phantom-like disc plus a little noise, in 12 bits.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (dr, dc) = (
                r as i64 - i64::from(i.rows) / 2,
                c as i64 - i64::from(i.columns) / 2,
            );
            let inside = dr * dr + dc * dc < i64::from(i.rows.min(i.columns)).pow(2) / 5;
            let v = if inside { 1000 } else { 24 } + (x % 40) as u16;
            pixels.extend_from_slice(&v.to_le_bytes());
        }
    }
    put_element(&mut ds, 0x7FE0, 0x0010, b"OW", &pixels);

    part10(CT_IMAGE_STORAGE, &i.sop_instance_uid, EXPLICIT_VR_LE, &ds)
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

    #[test]
    fn synthetic_instances_split_cleanly() {
        let f = synthetic_ct(&SyntheticInstance {
            study_uid: "2.25.1".into(),
            series_uid: "2.25.1.1".into(),
            sop_instance_uid: "2.25.1.1.1".into(),
            patient_name: "DEMO^PATIENT".into(),
            patient_id: "DEMO-1".into(),
            rows: 16,
            columns: 16,
            seed: 1,
        });
        let p = split_part10(&f).unwrap().unwrap();
        assert_eq!(p.transfer_syntax.as_deref(), Some(EXPLICIT_VR_LE));
        assert_eq!(&p.dataset[..4], &[0x08, 0x00, 0x16, 0x00]);
        assert!(
            p.dataset.len() > 16 * 16 * 2,
            "pixel data is in the data set"
        );
        assert_eq!(
            dataset_text(p.dataset, EXPLICIT_VR_LE, 0x0008, 0x0018).as_deref(),
            Some("2.25.1.1.1")
        );
        assert_eq!(
            dataset_text(p.dataset, EXPLICIT_VR_LE, 0x0008, 0x0017),
            None
        );
        for n in 0..200 {
            // Every cut is an answer or None, never a panic.
            let _ = dataset_text(&p.dataset[..n], EXPLICIT_VR_LE, 0x0020, 0x000D);
        }
    }

    #[test]
    fn reads_implicit_vr_data_sets() {
        let mut ds = Vec::new();
        for (e, v) in [(0x0016u16, &b"1.2.3\0"[..]), (0x0018, b"9.8.7.6\0")] {
            ds.extend_from_slice(&8u16.to_le_bytes());
            ds.extend_from_slice(&e.to_le_bytes());
            ds.extend_from_slice(&(v.len() as u32).to_le_bytes());
            ds.extend_from_slice(v);
        }
        assert_eq!(
            dataset_text(&ds, IMPLICIT_VR_LE, 0x0008, 0x0018).as_deref(),
            Some("9.8.7.6")
        );
    }
}
