#!/usr/bin/env python3
"""medmesh's Grafana dashboards, written with grafana-foundation-sdk (PyPI, pinned 0.0.21).

  dashboards.py OUT_DIR     writes one JSON file per dashboard (charts/medmesh/dashboards)

scripts/check-dashboards regenerates them and fails when the committed files differ, validates
them, and lints their queries. Every query reads only metrics the components export, selects
by the `namespace`, `workload` and `pod` labels the chart's monitors attach, and uses
`$__rate_interval` inside rate(); no label or legend carries anything of a patient or a study.
"""
import json
import os
import sys

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueGraphMode, LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SIDECAR = 'namespace=~"$namespace",workload=~"$workload"'
# The archive clusters' peers (PodMonitor job medmesh-archive), by namespace.
ARCHIVE = 'job="medmesh-archive",namespace=~"$namespace"'


def q(expr, legend="__auto"):
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def ts(title, desc, unit, *queries):
    legend = VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
    p = (timeseries.Panel().title(title).description(desc).unit(unit).datasource(DS).fill_opacity(10)
         .legend(legend))
    for ref, query in zip("ABCDEFGH", queries):
        p = p.with_target(query.ref_id(ref).datasource(DS))
    return p


def st(title, desc, unit, query):
    return (stat.Panel().title(title).description(desc).unit(unit).datasource(DS)
            .graph_mode(BigValueGraphMode.NONE).with_target(query.instant().ref_id("A").datasource(DS)))


def bars(title, desc, unit, query):
    return (bargauge.Panel().title(title).description(desc).unit(unit).datasource(DS)
            .with_target(query.instant().ref_id("A").datasource(DS)))


def variable(name, label, query, include_all=True):
    v = (dashboard.QueryVariable(name).label(label).datasource(DS).query(query)
         .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(include_all))
    if include_all:
        v = v.include_all(True).all_value(".*")
    return v


def board(uid, title, desc, variables, rows):
    d = (dashboard.Dashboard(title).uid(uid).description(desc).tags(["medmesh"]).editable()
         .refresh("30s").time("now-1h", "now").timezone("browser")
         .with_variable(dashboard.DatasourceVariable("datasource").label("Data Source").type("prometheus")))
    d = d.readonly() if hasattr(d, "readonly") else d
    for v in variables:
        d = d.with_variable(v)
    for row_title, panels in rows:
        d = d.with_row(dashboard.Row(row_title))
        for p in panels:
            d = d.with_panel(p.height(8).span(12))
    return d.build()


def namespace_var(metric):
    return variable("namespace", "Namespace", f"label_values({metric}, namespace)")


def workload_var(metric):
    return variable("workload", "Workload", f'label_values({metric}{{namespace=~"$namespace"}}, workload)')


def mesh():
    m = "medmesh_sidecar_connections_total"
    return board("medmesh-mesh", "Medmesh / Mesh",
                 "Connections through the medmesh sidecars: mTLS, authorisation, detection, certificates.",
                 [namespace_var(m), workload_var(m)], [
        ("Traffic", [
            ts("Connections by direction and transport", "New connections per second through the sidecars.", "cps",
               q(f"sum by (direction, tls) (rate(medmesh_sidecar_connections_total{{{SIDECAR}}}[$__rate_interval]))",
                 "{{direction}} {{tls}}")),
            st("Inbound over mTLS", "Share of inbound connections that arrived over mTLS (the rest: plaintext, refused or audited as such).", "percentunit",
               q(f'sum(rate(medmesh_sidecar_connections_total{{{SIDECAR},direction="inbound",tls="mtls"}}[$__rate_interval])) '
                 f'/ sum(rate(medmesh_sidecar_connections_total{{{SIDECAR},direction="inbound"}}[$__rate_interval]))')),
            ts("Open connections", "Connections open now, by workload and direction.", "short",
               q(f"sum by (workload, direction) (medmesh_sidecar_open_connections{{{SIDECAR}}})", "{{workload}} {{direction}}")),
            ts("Throughput", "Bytes per second relayed, by direction (inbound/outbound) and way (to or from the application).", "Bps",
               q(f"sum by (direction, way) (rate(medmesh_sidecar_bytes_total{{{SIDECAR}}}[$__rate_interval]))", "{{direction}} {{way}}")),
            ts("Protocol detection", "What the sidecars detected on new connections.", "cps",
               q(f"sum by (direction, protocol) (rate(medmesh_sidecar_protocol_detections_total{{{SIDECAR}}}[$__rate_interval]))",
                 "{{direction}} {{protocol}}")),
        ]),
        ("Security", [
            ts("Authorisation decisions", "Policy decisions per second by transport (mtls, plaintext) and decision (allow, deny, audit_deny).", "ops",
               q(f"sum by (kind, decision) (rate(medmesh_sidecar_authz_decisions_total{{{SIDECAR}}}[$__rate_interval]))",
                 "{{kind}} {{decision}}")),
            ts("Denials by port", "Connections denied (or, in audit mode, that would be) per second, by inbound port (a port the policy declares, else other), transport and decision. A denial is the absence of any allowing policy.", "ops",
               q(f"sum by (port, kind, decision) (rate(medmesh_sidecar_authz_decisions_total{{{SIDECAR}, decision!=\"allow\"}}[$__rate_interval]))",
                 "port {{port}} {{kind}} {{decision}}")),
            ts("TLS handshake failures", "Failed mTLS handshakes per second, by direction and reason.", "ops",
               q(f"sum by (direction, reason) (rate(medmesh_sidecar_tls_handshake_failures_total{{{SIDECAR}}}[$__rate_interval]))",
                 "{{direction}} {{reason}}")),
            ts("Refused connections", "Connections refused before any upstream connection, by reason.", "ops",
               q(f"sum by (direction, reason) (rate(medmesh_sidecar_refused_connections_total{{{SIDECAR}}}[$__rate_interval]))",
                 "{{direction}} {{reason}}")),
            bars("Workload certificate time to expiry", "Seconds until each pod's X.509-SVID expires (renewed at half-life).", "s",
                 q(f"min by (namespace, pod) (medmesh_sidecar_certificate_expiry_timestamp_seconds{{{SIDECAR}}}) - time()",
                   "{{namespace}}/{{pod}}")),
        ]),
    ])


def audit():
    m = "medmesh_sidecar_audit_records_total"
    return board("medmesh-audit", "Medmesh / Audit pipeline",
                 "From a transfer to its ledger record: records by delivery result, the spool, failures returned to clients.",
                 [namespace_var(m), workload_var(m)], [
        ("Records", [
            ts("Records by delivery result", "Audit records per second: acknowledged (enforce), spooled, delivered from the spool, not acknowledged, dropped.", "ops",
               q(f"sum by (result) (rate(medmesh_sidecar_audit_records_total{{{SIDECAR}}}[$__rate_interval]))", "{{result}}")),
            ts("Events by kind and outcome", "Audit records made per second, by event kind (instance_stored, association_opened, ...) and outcome.", "ops",
               q(f"sum by (kind, outcome) (rate(medmesh_sidecar_audit_events_total{{{SIDECAR}}}[$__rate_interval]))",
                 "{{kind}} {{outcome}}")),
            ts("Enforce gate latency", "Time for the ledger to acknowledge the records a response waits for (enforce), or to time out.", "s",
               q(f"histogram_quantile(0.5, sum by (le) (rate(medmesh_sidecar_audit_gate_seconds_bucket{{{SIDECAR}}}[$__rate_interval])))", "p50"),
               q(f"histogram_quantile(0.99, sum by (le) (rate(medmesh_sidecar_audit_gate_seconds_bucket{{{SIDECAR}}}[$__rate_interval])))", "p99")),
            ts("Spool depth", "Records in each sidecar's spool, not yet acknowledged by the ledger.", "short",
               q(f"sum by (namespace, pod) (medmesh_sidecar_spool_depth{{{SIDECAR}}})", "{{namespace}}/{{pod}}")),
            ts("Oldest spooled record", "Age of the oldest record waiting in each sidecar's spool (0 when the spool is empty).", "s",
               q(f"max by (namespace, pod) ((time() - medmesh_sidecar_spool_oldest_timestamp_seconds{{{SIDECAR}}}) "
                 f"* (medmesh_sidecar_spool_depth{{{SIDECAR}}} > bool 0))", "{{namespace}}/{{pod}}")),
            ts("Stores answered as failed", "Successful stores replaced by failures because their record could not be made safe (enforce).", "ops",
               q(f"sum by (namespace, pod) (rate(medmesh_sidecar_audit_failed_responses_total{{{SIDECAR}}}[$__rate_interval]))",
                 "{{namespace}}/{{pod}}")),
            ts("Delivery failures and drops", "Records the ledger did not acknowledge in time, and records that could not be spooled.", "ops",
               q(f'sum by (namespace, pod, result) (rate(medmesh_sidecar_audit_records_total{{{SIDECAR},result=~"not_acknowledged|dropped"}}[$__rate_interval]))',
                 "{{namespace}}/{{pod}} {{result}}")),
        ]),
    ])


def ledger():
    m = "medmesh_ledger_tree_size"
    sel = 'namespace=~"$namespace"'
    return board("medmesh-ledger", "Medmesh / Ledger",
                 "The audit ledger: appends, latency, batches, tree and checkpoints, the search index, Raft replication.",
                 [namespace_var(m)], [
        ("Log", [
            st("Tree size", "Committed entries (the largest replica).", "short",
               q(f"max(medmesh_ledger_tree_size{{{sel}}})")),
            st("Checkpoint age", "Seconds since the newest signed checkpoint (a checkpoint follows every growth within a second; an idle ledger does not re-sign).", "s",
               q(f"time() - max(medmesh_ledger_checkpoint_timestamp_seconds{{{sel}}})")),
            ts("Appends", "Append requests per second by result.", "ops",
               q(f"sum by (result) (rate(medmesh_ledger_appends_total{{{sel}}}[$__rate_interval]))", "{{result}}")),
            ts("Append latency", "Time from an append request to its durable acknowledgement.", "s",
               q(f"histogram_quantile(0.5, sum by (le) (rate(medmesh_ledger_append_latency_seconds_bucket{{{sel}}}[$__rate_interval])))", "p50"),
               q(f"histogram_quantile(0.99, sum by (le) (rate(medmesh_ledger_append_latency_seconds_bucket{{{sel}}}[$__rate_interval])))", "p99")),
            ts("Batch size", "Entries per write transaction.", "short",
               q(f"histogram_quantile(0.5, sum by (le) (rate(medmesh_ledger_batch_entries_bucket{{{sel}}}[$__rate_interval])))", "p50"),
               q(f"histogram_quantile(0.99, sum by (le) (rate(medmesh_ledger_batch_entries_bucket{{{sel}}}[$__rate_interval])))", "p99")),
            ts("Commit and disk sync time", "p99 of one write transaction, and of one fdatasync of the write-ahead log that acknowledges the appends committed ahead of it (single-node ledgers; a slow or failing disk shows here first).", "s",
               q(f"histogram_quantile(0.99, sum by (le) (rate(medmesh_ledger_commit_seconds_bucket{{{sel}}}[$__rate_interval])))", "commit p99"),
               q(f"histogram_quantile(0.99, sum by (le) (rate(medmesh_ledger_wal_sync_seconds_bucket{{{sel}}}[$__rate_interval])))", "log sync p99")),
            ts("Tree and checkpoint", "Committed entries and the size of the latest signed checkpoint, per replica.", "short",
               q(f"max by (pod) (medmesh_ledger_tree_size{{{sel}}})", "tree {{pod}}"),
               q(f"max by (pod) (medmesh_ledger_checkpoint_size{{{sel}}})", "checkpoint {{pod}}")),
            ts("Index lag", "Entries not yet in the search index, per replica.", "short",
               q(f"max by (pod) (medmesh_ledger_index_lag_entries{{{sel}}})", "{{pod}}")),
            ts("API requests", "Requests per second by route and status class.", "reqps",
               q(f"sum by (route, status) (rate(medmesh_ledger_http_requests_total{{{sel}}}[$__rate_interval]))", "{{route}} {{status}}")),
        ]),
        ("Replication", [
            ts("Raft term and leader", "The Raft term per replica, and which replica leads (1).", "short",
               q(f"max by (pod) (medmesh_ledger_raft_term{{{sel}}})", "term {{pod}}"),
               q(f"max by (pod) (medmesh_ledger_raft_is_leader{{{sel}}})", "leader {{pod}}")),
            ts("Follower lag", "Log entries each follower is behind the leader (as the leader sees it).", "short",
               q(f"max by (pod) (medmesh_ledger_raft_follower_lag_entries{{{sel}}})", "{{pod}}")),
        ]),
    ])


def identity():
    op = 'namespace=~"$namespace"'
    return board("medmesh-identity", "Medmesh / Identity and operator",
                 "The workload CA and identity service, the injection webhook, the controllers and their leader.",
                 [namespace_var("medmesh_operator_leader")], [
        ("Identity", [
            ts("Certificate requests", "SVID requests per second by result (issued, unauthenticated, forbidden, bad_request, error).", "ops",
               q(f"sum by (result) (rate(medmesh_operator_certificates_total{{{op}}}[$__rate_interval]))", "{{result}}")),
            st("Soonest workload certificate expiry", "Seconds until the first SVID of any sidecar expires.", "s",
               q("min(medmesh_sidecar_certificate_expiry_timestamp_seconds) - time()")),
            bars("CA time to expiry", "Seconds until the workload and serving CAs expire.", "s",
                 q(f"min by (ca) (medmesh_operator_ca_certificate_expiry_timestamp_seconds{{{op}}}) - time()", "{{ca}}")),
        ]),
        ("Operator", [
            ts("Admissions", "Injection webhook answers per second by result.", "ops",
               q(f"sum by (result) (rate(medmesh_operator_admissions_total{{{op}}}[$__rate_interval]))", "{{result}}")),
            ts("Admission latency", "Time to answer an admission request.", "s",
               q(f"histogram_quantile(0.99, sum by (le) (rate(medmesh_operator_admission_duration_seconds_bucket{{{op}}}[$__rate_interval])))", "p99")),
            ts("Reconciles", "Reconciles per second by controller and result.", "ops",
               q(f"sum by (controller, result) (rate(medmesh_operator_reconciles_total{{{op}}}[$__rate_interval]))", "{{controller}} {{result}}")),
            ts("Leader", "Which operator replica holds the Lease (1).", "short",
               q(f"max by (pod) (medmesh_operator_leader{{{op}}})", "{{pod}}")),
        ]),
    ])


def archive():
    m = "medmesh_sidecar_archive_backlog"
    return board("medmesh-archive", "Medmesh / Archive",
                 "Encrypted archiving of stored instances into the ImageArchive: staging, backlog, uploads.",
                 [namespace_var(m), workload_var(m)], [
        ("Archive", [
            ts("Backlog", "Instances staged and not yet confirmed archived, per pod.", "short",
               q(f"sum by (namespace, pod) (medmesh_sidecar_archive_backlog{{{SIDECAR}}})", "{{namespace}}/{{pod}}")),
            ts("Staging area", "Ciphertext bytes staged, against the staging limit.", "bytes",
               q(f"sum by (namespace, pod) (medmesh_sidecar_archive_staged_bytes{{{SIDECAR}}})", "staged {{namespace}}/{{pod}}"),
               q(f"sum by (namespace, pod) (medmesh_sidecar_archive_staging_limit_bytes{{{SIDECAR}}})", "limit {{namespace}}/{{pod}}")),
            ts("Objects by result", "Instances per second: staged, archived, skipped_full, staging_failed, discarded, corrupt.", "ops",
               q(f"sum by (result) (rate(medmesh_sidecar_archive_objects_total{{{SIDECAR}}}[$__rate_interval]))", "{{result}}")),
            ts("Archived bytes and failures", "Ciphertext bytes confirmed archived per second, and failed upload attempts per second.", "Bps",
               q(f"sum(rate(medmesh_sidecar_archive_bytes_total{{{SIDECAR}}}[$__rate_interval]))", "archived"),
               q(f"sum(rate(medmesh_sidecar_archive_upload_failures_total{{{SIDECAR}}}[$__rate_interval]))", "failed uploads")),
        ]),
        ("Archive cluster", [
            ts("Pins by status", "The archive cluster's pins, from each ipfs-cluster peer's own metrics (job medmesh-archive): pinned on its Kubo, pinning, queued, in error; and the cluster-wide pinset.", "short",
               q(f"sum by (namespace) (ipfscluster_pins_ipfs_pins{{{ARCHIVE}}})", "pinned {{namespace}}"),
               q(f"sum by (namespace) (ipfscluster_pins_pinning{{{ARCHIVE}}})", "pinning {{namespace}}"),
               q(f"sum by (namespace) (ipfscluster_pins_pin_queued{{{ARCHIVE}}})", "queued {{namespace}}"),
               q(f"sum by (namespace) (ipfscluster_pins_pin_error{{{ARCHIVE}}})", "error {{namespace}}"),
               q(f"max by (namespace) (ipfscluster_pins{{{ARCHIVE}}})", "pinset {{namespace}}")),
        ]),
    ])


def main(out):
    os.makedirs(out, exist_ok=True)
    for build in (mesh, audit, ledger, identity, archive):
        d = build()
        text = json.dumps(d, cls=JSONEncoder, sort_keys=True, indent=2)
        with open(os.path.join(out, f"{d.uid}.json"), "w") as f:
            f.write(text + "\n")
        print(f"{d.uid}.json: {len(d.panels)} panels and rows")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "charts/medmesh/dashboards")
