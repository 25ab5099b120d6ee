//! Follows one DICOM association from both directions' PDU events and yields what auditing
//! records: one [`Transfer`] per instance moved (C-STORE, including the C-STORE sub-operations
//! of C-GET), with the outcome taken from its response, plus queries, verifications and the
//! association's own events. Identifiers stay in clear here: the record builder keys them.

use std::collections::HashMap;

use super::command::{self, Command};
use super::dataset::{DataSetObserver, Observed};
use super::pdu::{Association, Event};
use crate::archive::{StageError, StageWriter, Staged, Staging};
use std::sync::Arc;

/// Which side sent the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// The association requestor (the SCU that connected).
    FromRequestor,
    /// The association acceptor (the server behind the sidecar).
    FromAcceptor,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An instance sent by the requestor (C-STORE).
    Stored,
    /// An instance sent by the acceptor (C-GET sub-operation).
    Retrieved,
    /// A C-FIND, C-GET or C-MOVE request completed (nothing of its keys is kept).
    Query,
    /// A C-ECHO.
    Echo,
    /// The association was accepted.
    Opened,
    /// The association was rejected.
    Refused,
    /// Released or aborted.
    Closed,
}

/// One audited event of the association.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// What happened.
    pub kind: Kind,
    /// Calling AE title.
    pub calling_ae: String,
    /// Called AE title.
    pub called_ae: String,
    /// SOP class UID (stores), or the abstract syntax of the context.
    pub sop_class: Option<String>,
    /// SOP instance UID from the command (stores).
    pub sop_instance: Option<String>,
    /// Transfer syntax of the data set.
    pub transfer_syntax: Option<String>,
    /// The data set as observed (stores).
    pub dataset: Option<Observed>,
    /// DIMSE status of the response; `None` when there was none (aborted, released first).
    pub status: Option<u16>,
    /// Message ID of the request.
    pub message_id: Option<u16>,
    /// The instance sealed into the archive staging area as it streamed (stores, when
    /// archiving): to be committed or discarded by whoever takes the transfer.
    pub staged: Option<Result<Staged, StageError>>,
}

/// Largest command set assembled from fragments.
const MAX_COMMAND_BYTES: usize = command::MAX_COMMAND;

#[derive(Debug, Default)]
struct Flow {
    ctx: u8,
    cmd_buf: Vec<u8>,
    cmd_too_large: bool,
    /// A command that announced a data set, waiting for (or receiving) it, and the archive
    /// copy being sealed (stores).
    pending_data: Option<(Command, DataSetObserver, Option<StageWriter>)>,
}

#[derive(Debug)]
struct Outstanding {
    kind: Kind,
    command: Command,
    transfer_syntax: Option<String>,
    dataset: Option<Observed>,
    staged: Option<Result<Staged, StageError>>,
}

/// The state of one association.
#[derive(Debug, Default)]
pub struct Tracker {
    rq: Option<Association>,
    accepted: HashMap<u8, (Option<String>, String)>,
    flows: HashMap<Dir, Flow>,
    /// Requests waiting for their response, by (direction of the request, message id).
    outstanding: HashMap<(Dir, u16), Outstanding>,
    out: Vec<Transfer>,
    closed: bool,
    /// Message ids of success/warning C-STORE-RSPs that answer no request this tracker saw.
    unmatched: Vec<u16>,
    /// The association broke an assumption auditing relies on (two outstanding requests with
    /// one message id): the proxy must abort it.
    poisoned: bool,
    /// Where stored instances are sealed for the archive, when archiving.
    staging: Option<Arc<Staging>>,
}

/// How a DIMSE status reads (PS3.7 Annex C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 0000.
    Success,
    /// B000, B006, B007, 0001, 0107, 0116.
    Warning,
    /// FF00, FF01: more responses follow.
    Pending,
    /// FE00.
    Cancel,
    /// Everything else.
    Failure,
}

/// Classifies a DIMSE status.
pub fn status_class(s: u16) -> StatusClass {
    match s {
        0x0000 => StatusClass::Success,
        0xFF00 | 0xFF01 => StatusClass::Pending,
        0xFE00 => StatusClass::Cancel,
        0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => StatusClass::Warning,
        _ => StatusClass::Failure,
    }
}

impl Tracker {
    /// A tracker for a new association.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker that also seals every instance the requestor stores into `staging`.
    pub fn with_archive(staging: Option<Arc<Staging>>) -> Self {
        Self {
            staging,
            ..Self::default()
        }
    }

    fn aes(&self) -> (String, String) {
        self.rq
            .as_ref()
            .map(|a| (a.calling_ae.clone(), a.called_ae.clone()))
            .unwrap_or_default()
    }

    fn push(&mut self, kind: Kind, o: Option<Outstanding>, status: Option<u16>) {
        let (calling_ae, called_ae) = self.aes();
        let (sop_class, sop_instance, transfer_syntax, dataset, message_id, staged) = match o {
            Some(o) => (
                o.command.sop_class,
                o.command.sop_instance,
                o.transfer_syntax,
                o.dataset,
                o.command.message_id,
                o.staged,
            ),
            None => (None, None, None, None, None, None),
        };
        self.out.push(Transfer {
            kind,
            calling_ae,
            called_ae,
            sop_class,
            sop_instance,
            transfer_syntax,
            dataset,
            status,
            message_id,
            staged,
        });
    }

    /// Takes the transfers completed so far.
    pub fn drain(&mut self) -> Vec<Transfer> {
        std::mem::take(&mut self.out)
    }

    /// Takes the message ids of success/warning C-STORE-RSPs that match no request seen: the
    /// proxy must not let them reach the client.
    pub fn take_unmatched(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.unmatched)
    }

    /// Whether the association must be aborted (see the field).
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Ends the association (connection closed): requests still waiting for a response are
    /// reported without a status.
    pub fn finish(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut left: Vec<_> = self.outstanding.drain().collect();
        left.sort_by_key(|((_, id), _)| *id);
        for (_, o) in left {
            let kind = o.kind;
            self.push(kind, Some(o), None);
        }
        if self.rq.is_some() {
            self.push(Kind::Closed, None, None);
        }
    }

    /// Handles one event from `dir`.
    pub fn on_event(&mut self, dir: Dir, ev: &Event<'_>) {
        match ev {
            Event::AssociateRq(a) if dir == Dir::FromRequestor => self.rq = Some(a.clone()),
            Event::AssociateAc(a) if dir == Dir::FromAcceptor => {
                let proposed: HashMap<u8, Option<String>> = self
                    .rq
                    .as_ref()
                    .map(|rq| {
                        rq.contexts
                            .iter()
                            .map(|c| (c.id, c.abstract_syntax.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                for c in &a.contexts {
                    if c.result == Some(0)
                        && let Some(ts) = c.transfer_syntaxes.first()
                    {
                        self.accepted
                            .insert(c.id, (proposed.get(&c.id).cloned().flatten(), ts.clone()));
                    }
                }
                self.push(Kind::Opened, None, None);
            }
            Event::AssociateRj { .. } => self.push(Kind::Refused, None, None),
            Event::ReleaseRp | Event::Abort { .. } => self.finish(),
            Event::Pdv {
                ctx,
                command,
                last,
                end,
                data,
            } => self.on_pdv(dir, *ctx, *command, *last, *end, data),
            _ => {}
        }
    }

    fn on_pdv(&mut self, dir: Dir, ctx: u8, is_command: bool, last: bool, end: bool, data: &[u8]) {
        let ts = self.accepted.get(&ctx).map(|(_, ts)| ts.clone());
        let flow = self.flows.entry(dir).or_default();
        if is_command {
            flow.ctx = ctx;
            if flow.cmd_buf.len() + data.len() > MAX_COMMAND_BYTES {
                flow.cmd_too_large = true;
            } else {
                flow.cmd_buf.extend_from_slice(data);
            }
            if !(last && end) {
                return;
            }
            let bytes = std::mem::take(&mut flow.cmd_buf);
            let too_large = std::mem::take(&mut flow.cmd_too_large);
            let Ok(cmd) = command::parse(&bytes)
                .map_err(|_| ())
                .and_then(|c| if too_large { Err(()) } else { Ok(c) })
            else {
                // A command the application may understand but auditing cannot: fail closed.
                self.poisoned = true;
                return;
            };
            if cmd.has_dataset && cmd.field & 0x8000 == 0 {
                // A request whose data set follows (C-STORE-RQ, C-FIND-RQ, C-GET-RQ, C-MOVE-RQ).
                let obs =
                    DataSetObserver::new(ts.as_deref().unwrap_or(super::dataset::IMPLICIT_VR_LE));
                let stage = match (&self.staging, cmd.field, dir) {
                    (Some(s), command::C_STORE_RQ, Dir::FromRequestor) => Some(s.begin()),
                    _ => None,
                };
                flow.pending_data = Some((cmd, obs, stage));
                return;
            }
            self.on_command(dir, ctx, cmd, None, None);
            return;
        }
        let Some((_, obs, stage)) = flow.pending_data.as_mut() else {
            return;
        };
        obs.feed(data);
        if let Some(w) = stage {
            w.write(data);
        }
        if last
            && end
            && let Some((cmd, obs, stage)) = flow.pending_data.take()
        {
            let staged = stage.map(StageWriter::finish);
            self.on_command(dir, ctx, cmd, Some(obs.finish()), staged);
        }
    }

    fn on_command(
        &mut self,
        dir: Dir,
        ctx: u8,
        cmd: Command,
        dataset: Option<Observed>,
        staged: Option<Result<Staged, StageError>>,
    ) {
        let transfer_syntax = self.accepted.get(&ctx).map(|(_, ts)| ts.clone());
        let abstract_syntax = self.accepted.get(&ctx).and_then(|(a, _)| a.clone());
        let other = match dir {
            Dir::FromRequestor => Dir::FromAcceptor,
            Dir::FromAcceptor => Dir::FromRequestor,
        };
        match cmd.field {
            command::C_STORE_RQ
            | command::C_FIND_RQ
            | command::C_GET_RQ
            | command::C_MOVE_RQ
            | command::C_ECHO_RQ => {
                let kind = match (cmd.field, dir) {
                    (command::C_STORE_RQ, Dir::FromRequestor) => Kind::Stored,
                    (command::C_STORE_RQ, Dir::FromAcceptor) => Kind::Retrieved,
                    (command::C_ECHO_RQ, _) => Kind::Echo,
                    _ => Kind::Query,
                };
                let Some(id) = cmd.message_id else {
                    if let (Some(Ok(s)), Some(st)) = (&staged, &self.staging) {
                        st.discard(s);
                    }
                    return;
                };
                let mut command = cmd;
                if kind == Kind::Query {
                    // Nothing of a query's keys is kept: only that it happened.
                    command.sop_instance = None;
                }
                if command.sop_class.is_none() {
                    command.sop_class = abstract_syntax;
                }
                let dataset = if matches!(kind, Kind::Stored | Kind::Retrieved) {
                    dataset
                } else {
                    None
                };
                let previous = self.outstanding.insert(
                    (dir, id),
                    Outstanding {
                        kind,
                        command,
                        transfer_syntax,
                        dataset,
                        staged,
                    },
                );
                if let Some(Outstanding {
                    staged: Some(Ok(s)),
                    ..
                }) = &previous
                    && let Some(st) = &self.staging
                {
                    st.discard(s);
                }
                if previous.is_some() {
                    // PS3.7 requires distinct ids among outstanding requests; which response
                    // answers which instance is now ambiguous.
                    self.poisoned = true;
                }
            }
            field if field & 0x8000 != 0 => {
                let Some(id) = cmd.responded_to else { return };
                let status = cmd.status.unwrap_or(0xFFFF);
                // Pending responses (C-FIND matches, C-GET/C-MOVE progress) keep the request open.
                if status_class(status) == StatusClass::Pending {
                    return;
                }
                match self.outstanding.remove(&(other, id)) {
                    Some(o) => {
                        let kind = o.kind;
                        self.push(kind, Some(o), Some(status));
                    }
                    None if field == command::C_STORE_RSP
                        && matches!(
                            status_class(status),
                            StatusClass::Success | StatusClass::Warning
                        ) =>
                    {
                        self.unmatched.push(id);
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }
}
