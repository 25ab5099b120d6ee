//! Signed notes, checkpoint bodies and key strings from untrusted text: never panic, and never
//! accept a note the key did not sign.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_core::{Checkpoint, NoteSigner, NoteVerifier};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let signer = NoteSigner::from_seed("fuzz.example/log", [42; 32]).unwrap();
    let verifier = signer.verifier();
    if let Ok(body) = verifier.open(text) {
        // Only notes this key signed can open; the fuzzer cannot forge Ed25519. (The note may
        // carry other keys' signature lines too.)
        let ours = signer.sign(body).unwrap();
        let line = ours.rsplit_once("\n\n").unwrap().1;
        assert!(text.starts_with(body) && text.contains(line));
    }
    let _ = Checkpoint::parse_body(text);
    let _ = Checkpoint::open(text, &verifier, "fuzz.example/log");
    let _ = NoteVerifier::parse(text);
    let _ = NoteSigner::from_private_key(text);
    if let Ok(cp) = Checkpoint::parse_body(text) {
        // A parsed body re-signs and re-opens to the same checkpoint.
        let note = cp.sign(&signer);
        if let Ok(note) = note {
            assert_eq!(Checkpoint::open(&note, &verifier, &cp.origin).unwrap(), cp);
        }
    }
});
