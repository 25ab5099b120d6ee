//! Just enough of the DICOM upper layer (PS3.8) and data set encoding (PS3.5) to audit what
//! crosses the mesh: PDUs, association negotiation, DIMSE command sets and, for each data set,
//! its SHA-256 and Study/Series UIDs. Everything streams: memory stays bounded whatever the
//! PDU or data set sizes, and nothing here ever changes the bytes being forwarded.

pub use medmesh_core::dicom::command;
pub mod dataset;
pub mod part10;
pub mod pdu;
pub mod tracker;

#[cfg(test)]
mod tests;
