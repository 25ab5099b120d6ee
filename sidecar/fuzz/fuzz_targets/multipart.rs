//! STOW-RS / WADO-RS multipart bodies on untrusted bytes: never panic, and the instances seen
//! (hashes, sizes, UIDs), completeness and failure do not depend on how the body is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_sidecar::dicomweb::Parts;

const CT: &str = "multipart/related; type=\"application/dicom\"; boundary=b0und";

fn run(chunks: &[&[u8]]) -> (Vec<medmesh_sidecar::dicom::part10::Part10Observed>, bool, bool) {
    let Ok(mut p) = Parts::multipart(CT) else {
        unreachable!("the boundary is valid")
    };
    for c in chunks {
        p.feed(c);
    }
    p.end();
    (p.done, p.complete, p.error.is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let whole = run(&[body]);
    let at = (cut as usize * body.len()) / 255;
    let (a, b) = body.split_at(at.min(body.len()));
    assert_eq!(run(&[a, b]), whole, "split at {at} changes what is seen");
});
