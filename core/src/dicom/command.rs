//! DIMSE command sets (PS3.7 §9.3, §E): group 0000 elements, always implicit VR little endian.

/// C-STORE-RQ.
pub const C_STORE_RQ: u16 = 0x0001;
/// C-STORE-RSP.
pub const C_STORE_RSP: u16 = 0x8001;
/// C-GET-RQ.
pub const C_GET_RQ: u16 = 0x0010;
/// C-GET-RSP.
pub const C_GET_RSP: u16 = 0x8010;
/// C-FIND-RQ.
pub const C_FIND_RQ: u16 = 0x0020;
/// C-FIND-RSP.
pub const C_FIND_RSP: u16 = 0x8020;
/// C-MOVE-RQ.
pub const C_MOVE_RQ: u16 = 0x0021;
/// C-MOVE-RSP.
pub const C_MOVE_RSP: u16 = 0x8021;
/// C-ECHO-RQ.
pub const C_ECHO_RQ: u16 = 0x0030;
/// C-ECHO-RSP.
pub const C_ECHO_RSP: u16 = 0x8030;

/// Largest command set accepted (they are a few hundred bytes).
pub const MAX_COMMAND: usize = 16 * 1024;

/// The fields of a command set that auditing needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    /// (0000,0100) Command Field.
    pub field: u16,
    /// (0000,0110) Message ID.
    pub message_id: Option<u16>,
    /// (0000,0120) Message ID Being Responded To.
    pub responded_to: Option<u16>,
    /// (0000,0002) Affected SOP Class UID.
    pub sop_class: Option<String>,
    /// (0000,1000) Affected SOP Instance UID.
    pub sop_instance: Option<String>,
    /// (0000,0900) Status.
    pub status: Option<u16>,
    /// (0000,0800) Command Data Set Type: whether a data set follows.
    pub has_dataset: bool,
}

/// Why a command set does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// An element runs past the end.
    #[error("command set element ({group:04x},{element:04x}) at offset {offset} runs past the end")]
    Truncated {
        /// Group.
        group: u16,
        /// Element.
        element: u16,
        /// Offset.
        offset: usize,
    },
    /// No Command Field.
    #[error("command set has no (0000,0100) Command Field")]
    NoField,
    /// Larger than [`MAX_COMMAND`].
    #[error("command set of {0} bytes exceeds {MAX_COMMAND}")]
    TooLarge(usize),
}

fn uid(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

fn u16_of(v: &[u8]) -> Option<u16> {
    (v.len() >= 2).then(|| u16::from_le_bytes([v[0], v[1]]))
}

/// Parses a whole command set.
///
/// # Errors
/// When an element runs past the end or the Command Field is missing.
pub fn parse(b: &[u8]) -> Result<Command, CommandError> {
    if b.len() > MAX_COMMAND {
        return Err(CommandError::TooLarge(b.len()));
    }
    let mut c = Command::default();
    let mut field = None;
    let mut pos = 0;
    while pos + 8 <= b.len() {
        let group = u16::from_le_bytes([b[pos], b[pos + 1]]);
        let element = u16::from_le_bytes([b[pos + 2], b[pos + 3]]);
        let len = u32::from_le_bytes([b[pos + 4], b[pos + 5], b[pos + 6], b[pos + 7]]) as usize;
        let start = pos + 8;
        let end =
            start
                .checked_add(len)
                .filter(|e| *e <= b.len())
                .ok_or(CommandError::Truncated {
                    group,
                    element,
                    offset: pos,
                })?;
        let v = &b[start..end];
        if group == 0x0000 {
            match element {
                0x0002 => c.sop_class = Some(uid(v)),
                0x0100 => field = u16_of(v),
                0x0110 => c.message_id = u16_of(v),
                0x0120 => c.responded_to = u16_of(v),
                0x0800 => c.has_dataset = u16_of(v).is_some_and(|t| t != 0x0101),
                0x0900 => c.status = u16_of(v),
                0x1000 => c.sop_instance = Some(uid(v)),
                _ => {}
            }
        }
        pos = end;
    }
    c.field = field.ok_or(CommandError::NoField)?;
    Ok(c)
}

/// Encodes a command set (implicit VR little endian, with its group length): for tests and the
/// demo's DICOM peers.
pub fn encode(c: &Command) -> Vec<u8> {
    let mut body = Vec::new();
    let mut put = |element: u16, v: &[u8]| {
        let mut v = v.to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&element.to_le_bytes());
        body.extend_from_slice(&(v.len() as u32).to_le_bytes());
        body.extend_from_slice(&v);
    };
    if let Some(s) = &c.sop_class {
        put(0x0002, s.as_bytes());
    }
    put(0x0100, &c.field.to_le_bytes());
    if let Some(m) = c.message_id {
        put(0x0110, &m.to_le_bytes());
    }
    if let Some(m) = c.responded_to {
        put(0x0120, &m.to_le_bytes());
    }
    // Priority (MEDIUM): required in C-STORE, C-FIND, C-GET and C-MOVE requests (PS3.7 §9.3).
    if matches!(c.field, C_STORE_RQ | C_FIND_RQ | C_GET_RQ | C_MOVE_RQ) {
        put(0x0700, &0u16.to_le_bytes());
    }
    put(
        0x0800,
        &(if c.has_dataset { 0x0000u16 } else { 0x0101 }).to_le_bytes(),
    );
    if let Some(s) = c.status {
        put(0x0900, &s.to_le_bytes());
    }
    if let Some(s) = &c.sop_instance {
        put(0x1000, s.as_bytes());
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}
