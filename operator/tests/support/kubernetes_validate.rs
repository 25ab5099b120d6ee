//! Runs the real Kubernetes schema validator, `kubernetes-validate` (PyPI), on objects. A missing
//! validator fails the test: `scripts/check` installs it.

use std::path::Path;
use std::process::Command;

/// The oldest Kubernetes version the operator supports (k8s-openapi feature `v1_33`).
pub const KUBERNETES: &str = "1.33";

/// Validates the documents in `files` strictly (unknown fields are errors); panics with the
/// validator's output when one is invalid.
pub fn validate(files: &[&Path]) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES])
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubernetes-validate cannot run ({e}); install it with \
                 `python3 -m pip install --break-system-packages kubernetes-validate` \
                 (scripts/check does)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate refused {files:?}:\n{text}"
    );
    // It exits 0 with a warning when it does not know the kind; require a "passed" per file.
    for f in files {
        assert!(
            text.contains(&format!("{} passed", f.display())),
            "kubernetes-validate did not pass {}:\n{text}",
            f.display()
        );
    }
}

/// Writes `value` as JSON (valid YAML) into `dir/name` and validates it.
pub fn validate_value(dir: &Path, name: &str, value: &serde_json::Value) {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    validate(&[&path]);
}
