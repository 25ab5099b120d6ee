//! A streaming reader of DICOM upper-layer PDUs (PS3.8 §9.3). Feed it the bytes of one
//! direction of a connection in chunks of any size; it reports association PDUs whole and the
//! data of P-DATA-TF PDVs as it arrives, without buffering it.

/// Largest association-control PDU kept whole (A-ASSOCIATE-RQ/AC/RJ, release, abort).
pub const MAX_CONTROL_PDU: usize = 64 * 1024;

/// One presentation context, proposed (RQ) or answered (AC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentationContext {
    /// Context id (odd, 1–255).
    pub id: u8,
    /// Abstract syntax (SOP class) UID; proposals only.
    pub abstract_syntax: Option<String>,
    /// Proposed transfer syntaxes, or the accepted one.
    pub transfer_syntaxes: Vec<String>,
    /// Result/reason of an answer (0 = acceptance); answers only.
    pub result: Option<u8>,
}

/// The negotiation content of an A-ASSOCIATE-RQ or -AC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    /// Called AE title, trimmed.
    pub called_ae: String,
    /// Calling AE title, trimmed.
    pub calling_ae: String,
    /// Presentation contexts.
    pub contexts: Vec<PresentationContext>,
}

/// What the reader found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// A-ASSOCIATE-RQ.
    AssociateRq(Association),
    /// A-ASSOCIATE-AC.
    AssociateAc(Association),
    /// A-ASSOCIATE-RJ.
    AssociateRj {
        /// Result (1 permanent, 2 transient).
        result: u8,
        /// Source.
        source: u8,
        /// Reason.
        reason: u8,
    },
    /// A-RELEASE-RQ.
    ReleaseRq,
    /// A-RELEASE-RP.
    ReleaseRp,
    /// A-ABORT.
    Abort {
        /// Source.
        source: u8,
        /// Reason.
        reason: u8,
    },
    /// Some bytes of one PDV (a fragment of a command or data set).
    Pdv {
        /// Presentation context id.
        ctx: u8,
        /// Command (true) or data set (false) fragment.
        command: bool,
        /// Whether this fragment is the last of its command or data set.
        last: bool,
        /// Whether this chunk ends the fragment.
        end: bool,
        /// The bytes.
        data: &'a [u8],
    },
    /// A PDU of an unknown type (skipped).
    Unknown(u8),
}

/// Why the stream is not DICOM (any more). Observation stops; forwarding is not affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PduError {
    /// A control PDU is larger than this reader keeps.
    #[error("PDU type {ty:#04x} of {len} bytes exceeds the {MAX_CONTROL_PDU}-byte limit")]
    TooLarge {
        /// PDU type.
        ty: u8,
        /// Declared length.
        len: usize,
    },
    /// A PDV does not fit its PDU.
    #[error("PDV of {pdv} bytes in a P-DATA-TF with {left} bytes left")]
    BadPdv {
        /// Declared PDV length.
        pdv: usize,
        /// Bytes left in the PDU.
        left: usize,
    },
    /// An association PDU is malformed.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which PDU.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The reader already failed.
    #[error("stream already failed: {0}")]
    Failed(String),
}

#[derive(Debug)]
enum State {
    Header {
        buf: [u8; 6],
        have: usize,
    },
    Whole {
        ty: u8,
        len: usize,
        buf: Vec<u8>,
    },
    PdvHeader {
        pdu_left: usize,
        buf: [u8; 6],
        have: usize,
    },
    PdvData {
        pdu_left: usize,
        pdv_left: usize,
        ctx: u8,
        mch: u8,
    },
    Skip {
        ty: u8,
        left: usize,
    },
}

/// The reader of one direction.
#[derive(Debug)]
pub struct PduReader {
    state: State,
    failed: Option<PduError>,
}

impl Default for PduReader {
    fn default() -> Self {
        Self::new()
    }
}

impl PduReader {
    /// A reader at the start of a stream.
    pub fn new() -> Self {
        Self {
            state: State::Header {
                buf: [0; 6],
                have: 0,
            },
            failed: None,
        }
    }

    /// Consumes `input`, reporting events to `sink` in order.
    ///
    /// # Errors
    /// When the bytes are not valid upper-layer PDUs; every later call fails too.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        mut sink: impl FnMut(Event<'_>),
    ) -> Result<(), PduError> {
        if let Some(e) = &self.failed {
            return Err(PduError::Failed(e.to_string()));
        }
        while !input.is_empty() {
            match self.step(&mut input, &mut sink) {
                Ok(()) => {}
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn step(
        &mut self,
        input: &mut &[u8],
        sink: &mut impl FnMut(Event<'_>),
    ) -> Result<(), PduError> {
        match &mut self.state {
            State::Header { buf, have } => {
                let n = (6 - *have).min(input.len());
                buf[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                *input = &input[n..];
                if *have < 6 {
                    return Ok(());
                }
                let ty = buf[0];
                let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
                self.state = match ty {
                    0x04 => State::PdvHeader {
                        pdu_left: len,
                        buf: [0; 6],
                        have: 0,
                    },
                    0x01..=0x07 => {
                        if len > MAX_CONTROL_PDU {
                            return Err(PduError::TooLarge { ty, len });
                        }
                        State::Whole {
                            ty,
                            len,
                            buf: Vec::with_capacity(len),
                        }
                    }
                    _ => State::Skip { ty, left: len },
                };
                self.finish_empty(sink)?;
            }
            State::Whole { ty, len, buf } => {
                let n = (*len - buf.len()).min(input.len());
                buf.extend_from_slice(&input[..n]);
                *input = &input[n..];
                if buf.len() == *len {
                    let ev = control(*ty, buf)?;
                    sink(ev);
                    self.state = State::Header {
                        buf: [0; 6],
                        have: 0,
                    };
                }
            }
            State::PdvHeader {
                pdu_left,
                buf,
                have,
            } => {
                if *pdu_left == 0 {
                    self.state = State::Header {
                        buf: [0; 6],
                        have: 0,
                    };
                    return Ok(());
                }
                let n = (6 - *have).min(input.len());
                buf[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                *input = &input[n..];
                if *have < 6 {
                    return Ok(());
                }
                let pdv = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if pdv < 2 || pdv + 4 > *pdu_left {
                    return Err(PduError::BadPdv {
                        pdv,
                        left: *pdu_left,
                    });
                }
                let (ctx, mch) = (buf[4], buf[5]);
                let pdu_left = *pdu_left - 4 - pdv;
                let pdv_left = pdv - 2;
                if pdv_left == 0 {
                    sink(Event::Pdv {
                        ctx,
                        command: mch & 1 == 1,
                        last: mch & 2 == 2,
                        end: true,
                        data: &[],
                    });
                    self.state = State::PdvHeader {
                        pdu_left,
                        buf: [0; 6],
                        have: 0,
                    };
                } else {
                    self.state = State::PdvData {
                        pdu_left,
                        pdv_left,
                        ctx,
                        mch,
                    };
                }
            }
            State::PdvData {
                pdu_left,
                pdv_left,
                ctx,
                mch,
            } => {
                let n = (*pdv_left).min(input.len());
                *pdv_left -= n;
                let end = *pdv_left == 0;
                sink(Event::Pdv {
                    ctx: *ctx,
                    command: *mch & 1 == 1,
                    last: *mch & 2 == 2,
                    end,
                    data: &input[..n],
                });
                *input = &input[n..];
                if end {
                    self.state = State::PdvHeader {
                        pdu_left: *pdu_left,
                        buf: [0; 6],
                        have: 0,
                    };
                }
            }
            State::Skip { ty, left } => {
                let n = (*left).min(input.len());
                *left -= n;
                *input = &input[n..];
                if *left == 0 {
                    sink(Event::Unknown(*ty));
                    self.state = State::Header {
                        buf: [0; 6],
                        have: 0,
                    };
                }
            }
        }
        Ok(())
    }

    /// PDUs whose body is empty complete without more input.
    fn finish_empty(&mut self, sink: &mut impl FnMut(Event<'_>)) -> Result<(), PduError> {
        match &self.state {
            State::Whole { ty, len: 0, .. } => {
                let ev = control(*ty, &[])?;
                sink(ev);
                self.state = State::Header {
                    buf: [0; 6],
                    have: 0,
                };
            }
            State::Skip { ty, left: 0 } => {
                sink(Event::Unknown(*ty));
                self.state = State::Header {
                    buf: [0; 6],
                    have: 0,
                };
            }
            _ => {}
        }
        Ok(())
    }
}

fn control(ty: u8, b: &[u8]) -> Result<Event<'static>, PduError> {
    let bad = |what: &'static str, reason: &str| PduError::Malformed {
        what,
        reason: reason.to_owned(),
    };
    Ok(match ty {
        0x01 | 0x02 => {
            let what = if ty == 1 {
                "A-ASSOCIATE-RQ"
            } else {
                "A-ASSOCIATE-AC"
            };
            let a = association(b, ty == 1).map_err(|r| bad(what, &r))?;
            if ty == 1 {
                Event::AssociateRq(a)
            } else {
                Event::AssociateAc(a)
            }
        }
        0x03 => {
            if b.len() < 4 {
                return Err(bad("A-ASSOCIATE-RJ", "shorter than 4 bytes"));
            }
            Event::AssociateRj {
                result: b[1],
                source: b[2],
                reason: b[3],
            }
        }
        0x05 => Event::ReleaseRq,
        0x06 => Event::ReleaseRp,
        _ => {
            if b.len() < 4 {
                return Err(bad("A-ABORT", "shorter than 4 bytes"));
            }
            Event::Abort {
                source: b[2],
                reason: b[3],
            }
        }
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_matches([' ', '\0'])
        .to_owned()
}

fn association(b: &[u8], rq: bool) -> Result<Association, String> {
    if b.len() < 68 {
        return Err(format!(
            "{} bytes, shorter than the 68-byte fixed part",
            b.len()
        ));
    }
    let called_ae = text(&b[4..20]);
    let calling_ae = text(&b[20..36]);
    let mut contexts = Vec::new();
    let mut items = &b[68..];
    while !items.is_empty() {
        let (ty, body, rest) = item(items)?;
        items = rest;
        match (ty, rq) {
            (0x20, true) | (0x21, false) => {
                if body.len() < 4 {
                    return Err("presentation context item shorter than 4 bytes".into());
                }
                let mut pc = PresentationContext {
                    id: body[0],
                    abstract_syntax: None,
                    transfer_syntaxes: Vec::new(),
                    result: (!rq).then_some(body[2]),
                };
                let mut subs = &body[4..];
                while !subs.is_empty() {
                    let (sty, sbody, srest) = item(subs)?;
                    subs = srest;
                    match sty {
                        0x30 => pc.abstract_syntax = Some(text(sbody)),
                        0x40 => pc.transfer_syntaxes.push(text(sbody)),
                        _ => {}
                    }
                }
                contexts.push(pc);
            }
            _ => {}
        }
    }
    Ok(Association {
        called_ae,
        calling_ae,
        contexts,
    })
}

/// One variable item: type, reserved, u16 length, body.
fn item(b: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    if b.len() < 4 {
        return Err(format!("item header cut short ({} bytes)", b.len()));
    }
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    if b.len() < 4 + len {
        return Err(format!(
            "item of type {:#04x} claims {len} bytes, {} remain",
            b[0],
            b.len() - 4
        ));
    }
    Ok((b[0], &b[4..4 + len], &b[4 + len..]))
}
