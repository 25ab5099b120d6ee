//! Reads the SOP Instance UID (0008,0018) from the start of an explicit VR little endian data
//! set, for the demo's sender (which must name the instance in its C-STORE-RQ).

/// The SOP Instance UID, if it is among the first elements.
pub fn instance_of(ds: &[u8]) -> Option<String> {
    let mut pos = 0;
    while pos + 8 <= ds.len() {
        let group = u16::from_le_bytes([ds[pos], ds[pos + 1]]);
        let element = u16::from_le_bytes([ds[pos + 2], ds[pos + 3]]);
        if group > 0x0008 {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([ds[pos + 6], ds[pos + 7]]));
        let v = ds.get(pos + 8..pos + 8 + len)?;
        if (group, element) == (0x0008, 0x0018) {
            return Some(
                String::from_utf8_lossy(v)
                    .trim_end_matches(['\0', ' '])
                    .to_owned(),
            );
        }
        pos += 8 + len;
    }
    None
}
