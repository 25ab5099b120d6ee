//! The generated schemas are structural and follow the API server's rules for list maps and
//! CEL transition rules; the committed YAML is what the types generate.

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};

use super::*;

/// Checks the structural-schema rules (and a few of our own) at every node, collecting every
/// violation with its path.
fn walk(s: &JSONSchemaProps, path: &str, in_atomic_list: bool, errs: &mut Vec<String>) {
    let exempt = s.x_kubernetes_int_or_string == Some(true)
        || s.x_kubernetes_preserve_unknown_fields == Some(true);
    if s.type_.as_deref().is_none_or(str::is_empty) && !exempt {
        errs.push(format!("{path}: no type"));
    }
    if s.nullable.is_some() {
        errs.push(format!("{path}: nullable"));
    }
    for (what, present) in [
        ("anyOf", s.any_of.is_some()),
        ("oneOf", s.one_of.is_some()),
        ("allOf", s.all_of.is_some()),
        ("not", s.not.is_some()),
        ("$ref", s.ref_path.is_some()),
        ("definitions", s.definitions.is_some()),
        ("patternProperties", s.pattern_properties.is_some()),
        ("additionalItems", s.additional_items.is_some()),
    ] {
        if present {
            errs.push(format!("{path}: uses {what}"));
        }
    }
    if s.properties.is_some() && s.additional_properties.is_some() {
        errs.push(format!("{path}: both properties and additionalProperties"));
    }
    match s.type_.as_deref() {
        Some("object") => {}
        Some(_) if s.properties.is_some() || s.additional_properties.is_some() => {
            errs.push(format!("{path}: properties on a non-object"));
        }
        _ => {}
    }
    for r in s.required.iter().flatten() {
        if !s.properties.as_ref().is_some_and(|p| p.contains_key(r)) {
            errs.push(format!("{path}: required {r:?} is not a property"));
        }
    }
    for rule in s.x_kubernetes_validations.iter().flatten() {
        if rule.rule.contains("oldSelf") && in_atomic_list {
            errs.push(format!(
                "{path}: transition rule {:?} inside an atomic or set list (never evaluated)",
                rule.rule
            ));
        }
        if rule.message.as_deref().is_none_or(str::is_empty) {
            errs.push(format!(
                "{path}: CEL rule {:?} without a message",
                rule.rule
            ));
        }
    }
    if let Some(props) = &s.properties {
        for (name, p) in props {
            walk(p, &format!("{path}.{name}"), in_atomic_list, errs);
        }
    }
    if let Some(JSONSchemaPropsOrBool::Schema(ap)) = &s.additional_properties {
        walk(ap, &format!("{path}[*]"), in_atomic_list, errs);
    }
    match (&s.type_.as_deref(), &s.items) {
        (Some("array"), Some(JSONSchemaPropsOrArray::Schema(items))) => {
            let list_type = s.x_kubernetes_list_type.as_deref().unwrap_or("atomic");
            if list_type == "map" {
                let keys = s.x_kubernetes_list_map_keys.as_deref().unwrap_or_default();
                if keys.is_empty() {
                    errs.push(format!("{path}: list-type map without list-map-keys"));
                }
                for k in keys {
                    let required = items.required.iter().flatten().any(|r| r == k);
                    let scalar = items
                        .properties
                        .as_ref()
                        .and_then(|p| p.get(k))
                        .and_then(|p| p.type_.as_deref())
                        .is_some_and(|t| matches!(t, "string" | "integer" | "boolean"));
                    if !required || !scalar {
                        errs.push(format!(
                            "{path}: list-map key {k:?} must be a required scalar property of the items"
                        ));
                    }
                }
            } else if s.x_kubernetes_list_map_keys.is_some() {
                errs.push(format!("{path}: list-map-keys on a {list_type} list"));
            }
            let has_rules = |p: &JSONSchemaProps| p.x_kubernetes_validations.is_some();
            if (has_rules(items) || subtree_has_rules(items)) && s.max_items.is_none() {
                errs.push(format!(
                    "{path}: list of items with CEL rules needs maxItems (rule cost budget)"
                ));
            }
            walk(
                items,
                &format!("{path}[]"),
                in_atomic_list || list_type != "map",
                errs,
            );
        }
        (Some("array"), _) => errs.push(format!("{path}: array without a single items schema")),
        (_, Some(_)) => errs.push(format!("{path}: items on a non-array")),
        _ => {}
    }
}

fn subtree_has_rules(s: &JSONSchemaProps) -> bool {
    s.properties
        .iter()
        .flat_map(|p| p.values())
        .any(|p| p.x_kubernetes_validations.is_some() || subtree_has_rules(p))
        || matches!(&s.items, Some(JSONSchemaPropsOrArray::Schema(i)) if i.x_kubernetes_validations.is_some() || subtree_has_rules(i))
}

fn root(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
    let [v] = crd.spec.versions.as_slice() else {
        panic!("one version expected")
    };
    v.schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema")
}

#[test]
fn schemas_are_structural() {
    for crd in all() {
        let name = crd.metadata.name.clone().unwrap();
        let mut errs = Vec::new();
        walk(root(&crd), &name, false, &mut errs);
        assert!(errs.is_empty(), "{name}:\n  {}", errs.join("\n  "));
    }
}

#[test]
fn walker_catches_violations() {
    // The checks above must be able to fail: a schema with typical mistakes.
    let bad: JSONSchemaProps = serde_json::from_value(serde_json::json!({
        "type": "object",
        "required": ["missing"],
        "properties": {
            "untyped": {"description": "no type"},
            "nul": {"type": "string", "nullable": true},
            "either": {"type": "object", "anyOf": [{"type": "string"}]},
            "list": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["id"],
                "items": {"type": "object", "properties": {"id": {"type": "string"}},
                          "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "m"}]}
            }
        }
    }))
    .unwrap();
    let mut errs = Vec::new();
    walk(&bad, "bad", false, &mut errs);
    let text = errs.join("\n");
    for want in [
        "bad.untyped: no type",
        "bad.nul: nullable",
        "bad.either: uses anyOf",
        "required \"missing\" is not a property",
        "list-map key \"id\" must be a required scalar",
        "needs maxItems",
    ] {
        assert!(text.contains(want), "{want:?} not reported in:\n{text}");
    }
}

#[test]
fn crds_have_status_printer_columns_and_rules() {
    let crds = all();
    let names: Vec<_> = crds
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "auditledgers.medmesh.io",
            "meshpolicies.medmesh.io",
            "imagearchives.medmesh.io"
        ]
    );
    for crd in &crds {
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let cols = v.additional_printer_columns.as_deref().unwrap_or_default();
        assert!(
            cols.iter()
                .any(|c| c.json_path.contains("@.type==\"Ready\""))
        );
        let status = &root(crd).properties.as_ref().unwrap()["status"];
        let conds = &status.properties.as_ref().unwrap()["conditions"];
        assert_eq!(conds.x_kubernetes_list_type.as_deref(), Some("map"));
        assert_eq!(
            conds.x_kubernetes_list_map_keys.as_deref(),
            Some(&["type".to_owned()][..])
        );
        assert!(
            status
                .properties
                .as_ref()
                .unwrap()
                .contains_key("observedGeneration")
        );
    }
    let json = serde_json::to_string(&crds[0]).unwrap();
    for rule in [
        "self == oldSelf",
        "has(self.generate) != has(self.secretRef)",
        "self.storageClassName == oldSelf.storageClassName",
        "has(self.spiffeId) != has(self.serviceAccount)",
    ] {
        assert!(
            json.contains(&rule.replace('"', "\\\"")),
            "missing rule {rule}"
        );
    }
    let spec = &root(&crds[0]).properties.as_ref().unwrap()["spec"];
    let replicas = &spec.properties.as_ref().unwrap()["replicas"];
    let allowed: Vec<_> = replicas
        .enum_
        .iter()
        .flatten()
        .map(|j| j.0.clone())
        .collect();
    assert_eq!(
        allowed,
        [
            serde_json::json!(1),
            serde_json::json!(3),
            serde_json::json!(5)
        ]
    );
}

fn repo_crds() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

#[test]
fn committed_crds_are_up_to_date() {
    let regen = "regenerate with: cargo run -p medmesh-operator -- crds --out-dir crds";
    for crd in all() {
        let path = repo_crds().join(file_name(&crd));
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; {regen}", path.display()));
        assert!(
            committed == document(&crd).unwrap(),
            "{} differs from the generated CRD; {regen}",
            path.display()
        );
    }
}

#[test]
fn committed_crds_parse_as_custom_resource_definitions() {
    for crd in all() {
        let path = repo_crds().join(file_name(&crd));
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(parsed, crd, "{} does not round-trip", path.display());
    }
    // The `crds` command prints the same bytes as the files, in order.
    let files: String = all()
        .iter()
        .map(|c| std::fs::read_to_string(repo_crds().join(file_name(c))).unwrap())
        .collect();
    assert_eq!(yaml().unwrap(), files);
}

#[test]
fn sample_resources_deserialize() {
    let ledger: AuditLedger = serde_saphyr::from_str(
        r#"
apiVersion: medmesh.io/v1alpha1
kind: AuditLedger
metadata: {name: audit, namespace: radiology}
spec:
  replicas: 3
  storage: {size: 10Gi, storageClassName: fast}
  signingKey: {generate: {}}
  appenders:
  - serviceAccount: {name: orthanc}
  readers:
  - spiffeId: spiffe://cluster.local/ns/audit/sa/auditor
"#,
    )
    .unwrap();
    assert_eq!(ledger.spec.replicas, 3);
    assert_eq!(
        ledger.spec.signing_key.generate,
        Some(GenerateKey::default())
    );
    let policy: MeshPolicy = serde_saphyr::from_str(
        r#"
apiVersion: medmesh.io/v1alpha1
kind: MeshPolicy
metadata: {name: pacs, namespace: radiology}
spec:
  podSelector: {matchLabels: {app: orthanc}}
  ports:
  - port: 4242
    protocol: dicom
    allow:
    - serviceAccount: {name: modality}
    - namespace: viewers
  audit:
    ledgerRef: {name: audit}
    keySecretRef: {name: audit-key, key: key}
"#,
    )
    .unwrap();
    assert_eq!(policy.spec.mode, PolicyMode::Enforce);
    assert_eq!(policy.spec.audit.unwrap().delivery, AuditDelivery::Spool);
}
