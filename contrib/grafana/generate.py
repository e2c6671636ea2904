#!/usr/bin/env python3
"""Writes matrix-edge.json, the Grafana dashboard, from the panel list below
(kept as code so panels stay consistent; run it after editing).

    generate.py [OUTPUT]     default: matrix-edge.json beside this script
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'

PANELS = [
    # (title, unit, [(expr, legend)], kind)
    ("Requests per second by group", "reqps",
     [(f'sum by (group) (rate(matrix_edge_requests_total{{{SEL}}}[$__rate_interval]))', "{{group}}")], "timeseries"),
    ("5xx per second by group and worker", "reqps",
     [(f'sum by (group, worker) (rate(matrix_edge_requests_total{{{SEL}, status=~"5..|5xx"}}[$__rate_interval]))', "{{group}} {{worker}}")], "timeseries"),
    ("4xx per second by group", "reqps",
     [(f'sum by (group) (rate(matrix_edge_requests_total{{{SEL}, status=~"4..|4xx"}}[$__rate_interval]))', "{{group}}")], "timeseries"),
    ("Request latency (p50, p90, p99), long-polls included", "s",
     [(f'histogram_quantile({q}, sum by (le) (rate(matrix_edge_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', f"p{int(q*100)}") for q in (0.5, 0.9, 0.99)], "timeseries"),
    ("Upstream time to response header, p99 by group", "s",
     [(f'histogram_quantile(0.99, sum by (le, group) (rate(matrix_edge_upstream_response_seconds_bucket{{{SEL}}}[$__rate_interval])))', "{{group}}")], "timeseries"),
    ("Requests in flight", "short",
     [(f'sum(matrix_edge_requests_in_flight{{{SEL}}})', "in flight")], "timeseries"),
    ("Worker health (1 up, 0 down)", "short",
     [(f'min by (group, worker) (matrix_edge_worker_up{{{SEL}}})', "{{group}} {{worker}}")], "state-timeline"),
    ("TLS handshakes per second by certificate", "ops",
     [(f'sum by (certificate) (rate(matrix_edge_tls_handshakes_total{{{SEL}}}[$__rate_interval]))', "{{certificate}}")], "timeseries"),
    ("TLS handshake failures per second by certificate", "ops",
     [(f'sum by (certificate) (rate(matrix_edge_tls_handshakes_started_total{{{SEL}}}[$__rate_interval])) - sum by (certificate) (rate(matrix_edge_tls_handshakes_total{{{SEL}}}[$__rate_interval]))', "{{certificate}}")], "timeseries"),
    ("Certificate expiry (days left)", "d",
     [(f'min by (certificate) ((matrix_edge_certificate_expiry_timestamp_seconds{{{SEL}}} - time()) / 86400)', "{{certificate}}")], "bargauge"),
    ("Configuration reloads", "short",
     [(f'sum by (result) (increase(matrix_edge_config_reloads_total{{{SEL}}}[$__range]))', "{{result}}")], "stat"),
    ("Configuration age", "s",
     [(f'time() - max(matrix_edge_config_loaded_timestamp_seconds{{{SEL}}})', "since last (re)load")], "stat"),
    ("Rate-limited requests per second by class", "reqps",
     [(f'sum by (class) (rate(matrix_edge_rate_limited_total{{{SEL}}}[$__rate_interval]))', "{{class}}")], "timeseries"),
    ("Connections refused (per-address cap)", "ops",
     [(f'sum(rate(matrix_edge_connections_refused_total{{{SEL}}}[$__rate_interval]))', "refused")], "timeseries"),
    ("WebSockets open, and upgrades per second by upstream", "short",
     [(f'sum(matrix_edge_websockets_open{{{SEL}}})', "open"),
      (f'sum by (upstream) (rate(matrix_edge_websocket_upgrades_total{{{SEL}}}[$__rate_interval]))', "upgrades {{upstream}}")], "timeseries"),
    ("Requests in flight per worker (long-polls apart)", "short",
     [(f'sum by (group, worker) (matrix_edge_worker_in_flight{{{SEL}}})', "{{group}} {{worker}}"),
      (f'sum by (group) (matrix_edge_worker_long_polls{{{SEL}}})', "long-polls {{group}}")], "timeseries"),
    ("Queued requests, and queue wait p99 by group", "short",
     [(f'sum by (group) (matrix_edge_queued_requests{{{SEL}}})', "queued {{group}}"),
      (f'histogram_quantile(0.99, sum by (le, group) (rate(matrix_edge_queue_wait_seconds_bucket{{{SEL}}}[$__rate_interval])))', "wait p99 {{group}} (s)")], "timeseries"),
    ("Shed (503, no slot) per second by group and reason", "reqps",
     [(f'sum by (group, reason) (rate(matrix_edge_shed_total{{{SEL}}}[$__rate_interval]))', "{{group}} {{reason}}")], "timeseries"),
    ("Federation requests per second by gate outcome and reason", "reqps",
     [(f'sum by (outcome, reason) (rate(matrix_edge_federation_requests_total{{{SEL}}}[$__rate_interval]))', "{{outcome}} {{reason}}")], "timeseries"),
    ("Origin key fetches per second by result", "ops",
     [(f'sum by (result) (rate(matrix_edge_federation_key_fetches_total{{{SEL}}}[$__rate_interval]))', "{{result}}")], "timeseries"),
    ("Workers ejected, requests rescued from stalls, retries refused", "short",
     [(f'sum by (group, worker, reason) (increase(matrix_edge_ejections_total{{{SEL}}}[$__rate_interval]))', "ejected {{group}} {{worker}} ({{reason}})"),
      (f'sum by (group) (increase(matrix_edge_rescued_total{{{SEL}}}[$__rate_interval]))', "rescued {{group}}"),
      (f'sum by (group) (increase(matrix_edge_retries_denied_total{{{SEL}}}[$__rate_interval]))', "retries refused {{group}}")], "timeseries"),
]


def panel(index, title, unit, targets, kind):
    width = 12
    return {
        "id": index + 1,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * width, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + n), "datasource": DS, "expr": expr, "legendFormat": legend}
            for n, (expr, legend) in enumerate(targets)
        ],
    }


dashboard = {
    "title": "matrix-edge",
    "uid": "matrix-edge",
    "description": "The front door of a Matrix homeserver: traffic by Synapse worker group and named upstream, errors, latency, worker health, TLS and certificates, reloads, rate limits, WebSockets.",
    "tags": ["matrix", "synapse", "matrix-edge"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "instance", "type": "query", "datasource": DS, "label": "Edge",
         "query": {"query": "label_values(matrix_edge_config_loaded_timestamp_seconds, instance)", "refId": "instances"},
         "definition": "label_values(matrix_edge_config_loaded_timestamp_seconds, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2},
    ]},
    "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
}

default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "matrix-edge.json")
with open(sys.argv[1] if len(sys.argv) > 1 else default, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
