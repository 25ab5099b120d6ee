#!/usr/bin/env python3
"""Assertions on the rendered medmesh chart, called by scripts/check-chart.

  check_chart.py filter RENDERED OUT       drop the documents kubernetes-validate has no schema for
  check_chart.py assert CASE RENDERED RBAC  check what the operator contract requires of CASE

Each failed assertion is listed; the exit status is 1 if any failed.
"""
import json
import sys

import yaml

# Kinds whose schemas are not among the official Kubernetes ones (prometheus-operator's CRD).
NOT_IN_OFFICIAL_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
RULES_FILE = "charts/medmesh/files/rules/medmesh.rules.yaml"
RUNBOOKS = "https://github.com/medmesh/medmesh/blob/main/docs/runbooks"

# What `medmesh-operator run` reads (operator contract): environment variables the chart must set.
CONTRACT_ENV = [
    "POD_NAMESPACE", "MEDMESH_TRUST_DOMAIN", "MEDMESH_HTTPS_ADDR", "MEDMESH_ADMIN_ADDR",
    "MEDMESH_CA_SECRET", "MEDMESH_WEBHOOK_CONFIG", "MEDMESH_WEBHOOK_SERVICE",
    "MEDMESH_IDENTITY_URL", "MEDMESH_SIDECAR_IMAGE", "MEDMESH_LEDGER_IMAGE",
    "MEDMESH_LEASE_NAME", "MEDMESH_CERT_TTL_HOURS",
]
CRD_NAMES = {"auditledgers.medmesh.io", "imagearchives.medmesh.io", "meshpolicies.medmesh.io"}
KEEP = "helm.sh/resource-policy"

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
    return cond


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind, present=True):
    found = [d for d in docs if d["kind"] == kind]
    if present:
        check(len(found) == 1, f"expected one {kind}, found {len(found)}")
        return found[0] if found else {}
    check(not found, f"expected no {kind}, found {len(found)}")
    return None


def expand(rules):
    """A rule list as a set of (apiGroup, resource, verb, resourceName) grants."""
    out = set()
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    for n in r.get("resourceNames") or ["*"]:
                        out.add((g, res, v, n))
    return out


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_deployment(docs, replicas):
    d = one(docs, "Deployment")
    if not d:
        return None
    check(d["spec"]["replicas"] == replicas, f"Deployment replicas {d['spec']['replicas']} != {replicas}")
    pod = d["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot is not true")
    check(psc.get("runAsUser") == 65532, "pod securityContext.runAsUser is not 65532")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccompProfile is not RuntimeDefault")
    check(pod.get("topologySpreadConstraints"), "no topologySpreadConstraints")
    check(pod.get("affinity", {}).get("podAntiAffinity"), "no podAntiAffinity")
    check(d["spec"]["template"]["metadata"]["labels"].get("medmesh.io/inject") == "disabled",
          "operator pods are not labelled medmesh.io/inject=disabled")
    (c,) = pod["containers"]
    sc = c.get("securityContext", {})
    check(sc.get("runAsNonRoot") is True, "container runAsNonRoot is not true")
    check(sc.get("readOnlyRootFilesystem") is True, "container readOnlyRootFilesystem is not true")
    check(sc.get("allowPrivilegeEscalation") is False, "container allowPrivilegeEscalation is not false")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], "container does not drop ALL capabilities")
    check(not sc.get("capabilities", {}).get("add"), "container adds capabilities")
    check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "container seccompProfile is not RuntimeDefault")
    res = c.get("resources", {})
    check(res.get("requests") and res.get("limits", {}).get("memory"), "container resources are incomplete")
    check(c.get("command") == ["medmesh-operator"] and c.get("args", [None])[0] == "run",
          f"container does not run `medmesh-operator run`: {c.get('command')} {c.get('args')}")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports == {"https": 8443, "metrics": 9090}, f"container ports {ports}")
    for probe, path in (("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        g = c.get(probe, {}).get("httpGet", {})
        check(g.get("path") == path and ports.get(g.get("port"), g.get("port")) == 9090,
              f"{probe} is not GET {path} on 9090: {g}")
    env = env_of(c)
    for name in CONTRACT_ENV:
        check(name in env, f"env {name} missing")
    check(env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace",
          "POD_NAMESPACE is not from the downward API")
    check(env.get("MEDMESH_HTTPS_ADDR", {}).get("value") == "0.0.0.0:8443", "MEDMESH_HTTPS_ADDR")
    check(env.get("MEDMESH_ADMIN_ADDR", {}).get("value") == "0.0.0.0:9090", "MEDMESH_ADMIN_ADDR")
    return d, c, env


def check_rbac(docs, expected_path):
    with open(expected_path) as f:
        expected = json.load(f)
    cr = one(docs, "ClusterRole")
    role = one(docs, "Role")
    for name, obj, want in (("ClusterRole", cr, expected["clusterRole"]), ("Role", role, expected["role"])):
        got, exp = expand(obj.get("rules", [])), expand(want)
        check(got == exp, f"{name} rules differ from the contract: extra {sorted(got - exp)}, missing {sorted(exp - got)}")
        check(not any(v in ("*", "delete", "deletecollection", "escalate", "bind", "impersonate") for _, _, v, _ in got),
              f"{name} grants a forbidden verb")
    crb, rb = one(docs, "ClusterRoleBinding"), one(docs, "RoleBinding")
    sa = one(docs, "ServiceAccount")
    for b, role_obj in ((crb, cr), (rb, role)):
        check(b["roleRef"]["name"] == role_obj["metadata"]["name"], f"{b['kind']} refers to {b['roleRef']['name']}")
        check(b["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                 "namespace": "medmesh-system"}], f"{b['kind']} subjects {b['subjects']}")


def check_crds(docs, install, keep):
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    if not install:
        check(not crds, f"crds.install=false still renders {len(crds)} CRDs")
        return
    check({c["metadata"]["name"] for c in crds} == CRD_NAMES, f"CRDs {[c['metadata']['name'] for c in crds]}")
    for c in crds:
        ann = c["metadata"].get("annotations") or {}
        if keep:
            check(ann.get(KEEP) == "keep", f"CRD {c['metadata']['name']} lacks {KEEP}: keep")
        else:
            check(KEEP not in ann, f"CRD {c['metadata']['name']} has {KEEP} with crds.keep=false")
        spec = c["spec"]
        check(spec["group"] == "medmesh.io" and spec["scope"] == "Namespaced", f"CRD {c['metadata']['name']} group/scope")
        versions = {v["name"]: v for v in spec["versions"]}
        check("v1alpha1" in versions and "status" in versions.get("v1alpha1", {}).get("subresources", {}),
              f"CRD {c['metadata']['name']} has no v1alpha1 with a status subresource")


def check_webhook(docs, url, failure_policy, timeout):
    mwc = one(docs, "MutatingWebhookConfiguration")
    check(mwc["metadata"]["name"] == "medmesh-sidecar-injector", "webhook configuration name")
    (w,) = mwc["webhooks"]
    check(w["name"] == "inject.medmesh.io", "webhook name")
    cc = w["clientConfig"]
    if url:
        check(cc.get("url") == url and "service" not in cc, f"clientConfig is not url {url}: {cc}")
    else:
        check(cc.get("service") == {"name": "medmesh-operator", "namespace": "medmesh-system", "path": "/mutate", "port": 443}
              and "url" not in cc, f"clientConfig.service {cc}")
        # The operator writes caBundle; a chart value there would be reset on every upgrade.
        check("caBundle" not in cc, "caBundle rendered by default")
    check(w["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                          "resources": ["pods"], "scope": "Namespaced"}], f"webhook rules {w['rules']}")
    check(w["namespaceSelector"] == {"matchLabels": {"medmesh.io/inject": "enabled"}}, "namespaceSelector")
    check(w["objectSelector"] == {"matchExpressions": [{"key": "medmesh.io/inject", "operator": "NotIn", "values": ["disabled"]}]},
          "objectSelector")
    check(w["sideEffects"] == "NoneOnDryRun", "sideEffects")
    check(w["admissionReviewVersions"] == ["v1"], "admissionReviewVersions")
    check(w["failurePolicy"] == failure_policy, f"failurePolicy {w['failurePolicy']}")
    check(w["timeoutSeconds"] == timeout, f"timeoutSeconds {w['timeoutSeconds']}")


def check_service_pdb(docs, min_available):
    svc = one(docs, "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    check(ports == {"https": (443, "https"), "metrics": (9090, "metrics")}, f"Service ports {ports}")
    pdb = one(docs, "PodDisruptionBudget")
    check(pdb["spec"].get("minAvailable") == min_available, f"PDB minAvailable {pdb['spec'].get('minAvailable')}")
    dep = one(docs, "Deployment")
    sel = dep["spec"]["selector"]["matchLabels"]
    check(svc["spec"]["selector"] == sel and pdb["spec"]["selector"]["matchLabels"] == sel,
          "Service/PDB selectors differ from the Deployment's")


def case_default(docs, rbac):
    _, c, env = check_deployment(docs, 2)
    check(env["MEDMESH_SERVING_SECRET"]["value"] == "medmesh-operator-serving", "MEDMESH_SERVING_SECRET")
    check(env["MEDMESH_CA_SECRET"]["value"] == "medmesh-identity-ca", "MEDMESH_CA_SECRET")
    check(env["MEDMESH_WEBHOOK_CONFIG"]["value"] == "medmesh-sidecar-injector", "MEDMESH_WEBHOOK_CONFIG")
    check(env["MEDMESH_WEBHOOK_SERVICE"]["value"] == "medmesh-operator", "MEDMESH_WEBHOOK_SERVICE")
    check(env["MEDMESH_LEASE_NAME"]["value"] == "medmesh-operator", "MEDMESH_LEASE_NAME")
    check(env["MEDMESH_CERT_TTL_HOURS"]["value"] == "24", "MEDMESH_CERT_TTL_HOURS")
    check(env["MEDMESH_SIDECAR_IMAGE"]["value"] == "ghcr.io/medmesh/sidecar:0.1.0", "MEDMESH_SIDECAR_IMAGE")
    check(env["MEDMESH_LEDGER_IMAGE"]["value"] == "ghcr.io/medmesh/ledger:0.1.0", "MEDMESH_LEDGER_IMAGE")
    check(env["MEDMESH_IDENTITY_URL"]["value"] == "https://medmesh-operator.medmesh-system.svc:443",
          "MEDMESH_IDENTITY_URL must go through the Service port")
    check("MEDMESH_WEBHOOK_URL" not in env and "OTEL_EXPORTER_OTLP_ENDPOINT" not in env, "optional env set by default")
    check(c["args"] == ["run"], f"args {c['args']}")
    check_rbac(docs, rbac)
    check_crds(docs, install=True, keep=True)
    check_webhook(docs, None, "Fail", 5)
    check_service_pdb(docs, 1)
    one(docs, "NetworkPolicy", present=False)
    one(docs, "ServiceMonitor", present=False)
    one(docs, "PodMonitor", present=False)
    one(docs, "PrometheusRule", present=False)
    check(not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")],
          "dashboards rendered by default")


def case_all(docs, rbac):
    d, c, env = check_deployment(docs, 3)
    check("--serving-cert-file=/etc/medmesh/serving/tls.crt" in c["args"]
          and "--serving-key-file=/etc/medmesh/serving/tls.key" in c["args"], f"serving cert args {c['args']}")
    check("MEDMESH_SERVING_SECRET" not in env, "MEDMESH_SERVING_SECRET set with a user-provided certificate")
    vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    check(vols.get("serving-cert", {}).get("secret", {}).get("secretName") == "medmesh-operator-user-tls",
          "serving certificate Secret not mounted")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    check(mounts.get("serving-cert", {}).get("mountPath") == "/etc/medmesh/serving" and "subPath" not in mounts.get("serving-cert", {}),
          "serving certificate mount (a directory, so renewals reach the pod)")
    check(env["MEDMESH_CA_SECRET"]["value"] == "hospital-issuer-ca", "MEDMESH_CA_SECRET (identity.caSecret)")
    check(env.get("MEDMESH_WEBHOOK_URL", {}).get("value") == "https://operator.dev.example:8443/mutate", "MEDMESH_WEBHOOK_URL")
    check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", {}).get("value") == "http://otel-collector.observability.svc:4318", "OTLP endpoint")
    check(env["MEDMESH_TRUST_DOMAIN"]["value"] == "hospital.example", "MEDMESH_TRUST_DOMAIN")
    check(env["MEDMESH_CERT_TTL_HOURS"]["value"] == "12", "MEDMESH_CERT_TTL_HOURS")
    check(c["image"].endswith("@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"), "image digest")
    check_rbac(docs, rbac)
    check_crds(docs, install=False, keep=True)
    check_webhook(docs, "https://operator.dev.example:8443/mutate", "Ignore", 10)
    check_service_pdb(docs, 2)

    np = one(docs, "NetworkPolicy")
    spec = np.get("spec", {})
    check(spec.get("policyTypes") == ["Ingress", "Egress"], "NetworkPolicy policyTypes")
    https_rules = [r for r in spec.get("ingress", []) if any(p.get("port") in ("https", 8443) for p in r.get("ports", []))]
    check(len(https_rules) == 1 and "from" not in https_rules[0], "8443 must be open to every source (API server, sidecars)")
    metrics_rules = [r for r in spec.get("ingress", []) if any(p.get("port") in ("metrics", 9090) for p in r.get("ports", []))]
    check(len(metrics_rules) == 1 and metrics_rules[0].get("from", [{}])[0].get("namespaceSelector")
          == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "9090 must be limited to the namespace selector")
    egress_ports = {(p.get("protocol"), p.get("port")) for r in spec.get("egress", []) for p in r.get("ports", [])}
    check({("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6443)} <= egress_ports, f"NetworkPolicy egress {egress_ports}")

    sm = one(docs, "ServiceMonitor")
    check(sm.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
    ep = (sm.get("spec", {}).get("endpoints") or [{}])[0]
    check(ep.get("port") == "metrics" and ep.get("path") == "/metrics" and ep.get("interval") == "15s", f"ServiceMonitor endpoint {ep}")
    check(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack", "ServiceMonitor labels")
    check({"targetLabel": "job", "replacement": "medmesh-operator"} in ep.get("relabelings", []),
          "ServiceMonitor: job medmesh-operator")
    check_monitoring(docs)
    check_dashboards(docs)


def check_dashboards(docs):
    """One ConfigMap per committed dashboard, in the chosen namespace, labelled for Grafana's
    sidecar, holding the committed JSON unchanged."""
    import glob, os
    # Keyed by the file each holds; named after the release, so releases do not collide.
    cms = {next(iter(d.get("data", {})), ""): d for d in docs
           if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")}
    files = sorted(glob.glob("charts/medmesh/dashboards/*.json"))
    check(len(files) == 5, f"five dashboards committed, found {len(files)}")
    for f in files:
        base = os.path.basename(f)
        cm = cms.get(base)
        if not check(cm is not None, f"no ConfigMap for {base}"):
            continue
        meta = cm["metadata"]
        check(meta["name"] == "medmesh-operator-" + base[len("medmesh-"):-5] + "-dashboard", f"{base}: name {meta['name']}")
        check(meta.get("namespace") == "monitoring", f"{base}: namespace {meta.get('namespace')}")
        check(meta.get("labels", {}).get("grafana_dashboard") == "1", f"{base}: label grafana_dashboard=1")
        check(meta.get("annotations", {}).get("grafana_folder") == "Medmesh", f"{base}: folder annotation")
        with open(f) as fh:
            check(json.loads(cm["data"][base]) == json.load(fh), f"{base}: ConfigMap JSON differs from the file")
    check(len(cms) == len(files), f"{len(cms)} dashboard ConfigMaps for {len(files)} files")


def check_monitoring(docs):
    """PodMonitors for sidecars, ledgers and archive clusters, and the PrometheusRule: the rule
    file itself."""
    pms = {d["spec"]["podMetricsEndpoints"][0]["port"]: d for d in docs if d["kind"] == "PodMonitor"}
    check(set(pms) == {"medmesh-admin", "admin", "cluster-metrics"}, f"PodMonitor ports {sorted(pms)}")
    for port, job in (("medmesh-admin", "medmesh-sidecar"), ("admin", "medmesh-ledger"),
                      ("cluster-metrics", "medmesh-archive")):
        pm = pms.get(port, {})
        spec = pm.get("spec", {})
        ep = spec.get("podMetricsEndpoints", [{}])[0]
        check(spec.get("namespaceSelector") == {"any": True}, f"PodMonitor {port}: every namespace")
        check({"targetLabel": "job", "replacement": job} in ep.get("relabelings", []), f"PodMonitor {port}: job {job}")
        check(ep.get("path") == "/metrics" and ep.get("interval") == "20s", f"PodMonitor {port} endpoint {ep}")
        check(pm.get("metadata", {}).get("labels", {}).get("release") == "kube-prometheus-stack", f"PodMonitor {port} labels")
    check(pms.get("admin", {}).get("spec", {}).get("selector") == {"matchLabels": {"app.kubernetes.io/name": "medmesh-ledger"}},
          "ledger PodMonitor selector")
    check(pms.get("cluster-metrics", {}).get("spec", {}).get("selector")
          == {"matchLabels": {"app.kubernetes.io/name": "medmesh-archive"}},
          "archive PodMonitor selector")
    pr = one(docs, "PrometheusRule")
    check(pr.get("metadata", {}).get("labels", {}).get("release") == "kube-prometheus-stack", "PrometheusRule labels")
    with open(RULES_FILE) as f:
        want = yaml.safe_load(f.read().replace(RUNBOOKS, "https://wiki.hospital.example/medmesh/runbooks"))
    check(pr.get("spec") == want, "PrometheusRule spec must be the rule file, runbook base replaced")


def case_nokeep(docs, rbac):
    check_crds(docs, install=True, keep=False)


def case_outofcluster(docs, rbac):
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PodMonitor", "PrometheusRule"):
        one(docs, kind, present=False)
    check_rbac(docs, rbac)
    check_webhook(docs, "https://192.0.2.10:8443/mutate", "Fail", 5)
    check_crds(docs, install=True, keep=True)


def main(argv):
    if argv[1] == "filter":
        docs = load(argv[2])
        kept = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in NOT_IN_OFFICIAL_SCHEMAS]
        for d in docs:
            if d not in kept:
                print(f"not validated (no official schema): {d['kind']} {d['metadata']['name']}")
        with open(argv[3], "w") as f:
            yaml.safe_dump_all(kept, f, sort_keys=False)
        return 0
    if argv[1] == "assert":
        case, rendered, rbac = argv[2:5]
        docs = load(rendered)
        globals()["case_" + case](docs, rbac)
        for f in failures:
            print(f"FAIL {case}: {f}")
        if failures:
            return 1
        print(f"{case}: all assertions hold")
        return 0
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
