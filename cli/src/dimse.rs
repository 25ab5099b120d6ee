//! A minimal C-STORE SCU: the demo's "scanner" and `medmesh archive restore --dicom`.

use anyhow::Context as _;
use medmesh_core::dicom;

/// One instance to store: its data set as DIMSE carries it.
pub struct StoreItem {
    /// SOP Class UID.
    pub sop_class: String,
    /// SOP Instance UID.
    pub sop_instance: String,
    /// Transfer syntax of `dataset`.
    pub transfer_syntax: String,
    /// The data set.
    pub dataset: Vec<u8>,
}

impl StoreItem {
    /// The instance of a Part 10 file.
    ///
    /// # Errors
    /// When the file is not Part 10 or names no SOP class or instance.
    pub fn from_part10(file: &[u8]) -> anyhow::Result<Self> {
        let p10 = dicom::split_part10(file)?.context("not a DICOM Part 10 file")?;
        let ts = p10
            .transfer_syntax
            .clone()
            .unwrap_or_else(|| dicom::EXPLICIT_VR_LE.to_owned());
        Self::from_dataset(p10.dataset.to_vec(), &ts, None)
    }

    /// An instance from its data set; the SOP class is read from it unless given.
    ///
    /// # Errors
    /// When the data set names no SOP class or instance.
    pub fn from_dataset(
        dataset: Vec<u8>,
        transfer_syntax: &str,
        sop_class: Option<&str>,
    ) -> anyhow::Result<Self> {
        let sop_instance = dicom::dataset_text(&dataset, transfer_syntax, 0x0008, 0x0018)
            .context("the data set has no SOP Instance UID (0008,0018) near its start")?;
        let sop_class = match sop_class {
            Some(c) => c.to_owned(),
            None => dicom::dataset_text(&dataset, transfer_syntax, 0x0008, 0x0016)
                .context("the data set has no SOP Class UID (0008,0016) near its start")?,
        };
        Ok(Self {
            sop_class,
            sop_instance,
            transfer_syntax: transfer_syntax.to_owned(),
            dataset,
        })
    }
}

/// Stores `items` in one association from `calling` to `called` at `addr`; returns each
/// response's DIMSE status.
///
/// # Errors
/// When the association or a PDU exchange fails.
pub fn store(
    addr: &str,
    calling: &str,
    called: &str,
    items: &[StoreItem],
) -> anyhow::Result<Vec<u16>> {
    use dicom_ul::association::client::ClientAssociationOptions;
    use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
    use medmesh_core::dicom::command::{self, Command};
    let mut opts = ClientAssociationOptions::new()
        .calling_ae_title(calling)
        .called_ae_title(called);
    let mut proposed: Vec<(String, String)> = Vec::new();
    for i in items {
        let pair = (i.sop_class.clone(), i.transfer_syntax.clone());
        if !proposed.contains(&pair) {
            opts = opts.with_presentation_context(pair.0.clone(), vec![pair.1.clone()]);
            proposed.push(pair);
        }
    }
    let mut assoc = opts
        .establish(addr)
        .with_context(|| format!("association with {called} at {addr}"))?;
    let max = (assoc.acceptor_max_pdu_length() as usize).clamp(4096, 1 << 20) - 12;
    let mut statuses = Vec::new();
    for (n, item) in items.iter().enumerate() {
        // Contexts are numbered 1, 3, 5… in the order proposed.
        let k = proposed
            .iter()
            .position(|p| p.0 == item.sop_class && p.1 == item.transfer_syntax)
            .context("no context proposed")?;
        let ctx = (2 * k + 1) as u8;
        anyhow::ensure!(
            assoc.presentation_contexts().iter().any(|c| c.id == ctx),
            "{called} refused {} in {}",
            item.sop_class,
            item.transfer_syntax
        );
        let rq = command::encode(&Command {
            field: command::C_STORE_RQ,
            message_id: Some((n % 0xFFFF + 1) as u16),
            sop_class: Some(item.sop_class.clone()),
            sop_instance: Some(item.sop_instance.clone()),
            has_dataset: true,
            ..Default::default()
        });
        assoc.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: ctx,
                value_type: PDataValueType::Command,
                is_last: true,
                data: rq,
            }],
        })?;
        let chunks: Vec<&[u8]> = item.dataset.chunks(max).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            assoc.send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: ctx,
                    value_type: PDataValueType::Data,
                    is_last: i + 1 == chunks.len(),
                    data: chunk.to_vec(),
                }],
            })?;
        }
        match assoc.receive()? {
            Pdu::PData { data } => {
                let bytes: Vec<u8> = data.into_iter().flat_map(|v| v.data).collect();
                statuses.push(command::parse(&bytes)?.status.unwrap_or(0xFFFF));
            }
            other => anyhow::bail!("unexpected answer: {}", other.short_description()),
        }
    }
    assoc.release()?;
    Ok(statuses)
}
