//! DICOM upper-layer streams, command sets and data sets from untrusted peers: the PDU reader,
//! the association tracker and the data set observer never panic, whatever the bytes and
//! however they are split; the observer's hash is always that of every byte fed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_sidecar::dicom::command;
use medmesh_sidecar::dicom::dataset::DataSetObserver;
use medmesh_sidecar::dicom::pdu::PduReader;
use medmesh_sidecar::dicom::tracker::{Dir, Tracker};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (a, b) = data.split_at(split);
    let mut t = Tracker::new();
    for (dir, bytes) in [(Dir::FromRequestor, data), (Dir::FromAcceptor, b)] {
        let mut r = PduReader::new();
        let _ = r.feed(&bytes[..bytes.len() / 2], |e| t.on_event(dir, &e));
        let _ = r.feed(&bytes[bytes.len() / 2..], |e| t.on_event(dir, &e));
    }
    t.finish();
    let _ = t.drain();
    for ts in ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"] {
        let mut o = DataSetObserver::new(ts);
        o.feed(a);
        o.feed(b);
        assert_eq!(o.finish().bytes, data.len() as u64);
    }
    let _ = command::parse(data);
});
