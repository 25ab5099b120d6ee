//! STOW-RS multipart bodies on untrusted bytes: never panic; whether a body can be followed,
//! and for one that can, the instances seen (hashes, sizes, UIDs) and its completeness, do not
//! depend on how it is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_sidecar::dicomweb::Parts;

const CT: &str = "multipart/related; type=\"application/dicom\"; boundary=b0und";

fn run(chunks: &[&[u8]]) -> (Vec<medmesh_sidecar::dicom::part10::Part10Observed>, bool, bool) {
    let Ok(mut p) = Parts::store(CT) else {
        unreachable!("the boundary is valid")
    };
    for c in chunks {
        p.feed(c);
    }
    p.end(true);
    (p.done, p.complete, p.error.is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let whole = run(&[body]);
    let at = (cut as usize * body.len()) / 255;
    let (a, b) = body.split_at(at.min(body.len()));
    let split = run(&[a, b]);
    // Whether the body can be followed must not depend on the split; what was seen before an
    // error may (a failed body withholds the response anyway).
    assert_eq!(split.2, whole.2, "split at {at} changes whether the body is followable");
    if !whole.2 {
        assert_eq!(split, whole, "split at {at} changes what is seen");
    }
});
