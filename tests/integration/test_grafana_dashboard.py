"""``deploy/grafana/cached.json`` is importable as is and queries only what a daemon exports.

``promtool`` is not installed here, so a small PromQL tokenizer reads every query of the dashboard
(panel targets and template variables): metric names, label matchers (``{label op "value"}``),
grouping labels (``by``/``without``/``on``/``ignoring``), the labels of ``label_values`` and of
legends (``{{label}}``). A real daemon, after a small fetch from a loopback origin (so the fetch
histogram has a ``result="ok"`` series) and one of a missing file (so origin errors have a
``kind``), is scraped; each metric must be one of its sample names,
each label one it puts on that metric (or ``job``/``instance``, which Prometheus adds when it
scrapes), and each literal ``=`` value one it exports. A dashboard that drifts from the metrics
(a renamed metric or label) fails here rather than as an empty panel in someone's Grafana.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.node import REPO, running_daemon
from tests.support.origin import Origin, write_random_file

DASHBOARD = REPO / "deploy" / "grafana" / "cached.json"
# Labels Prometheus attaches to every series it scrapes: the dashboard filters on them.
TARGET_LABELS = frozenset({"job", "instance"})
# What the issue asks the dashboard to show, as the CONTRACT names them.
CONTRACT_METRICS = {
    "cached_fetched_bytes_total",
    "cached_store_bytes",
    "cached_store_capacity_bytes",
    "cached_models",
    "cached_peers",
    "cached_fetch_duration_seconds_bucket",
    "cached_piece_verify_failures_total",
    "cached_evictions_total",
}
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
)
AGGREGATORS = frozenset(
    {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group"}
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[A-Za-z_][A-Za-z0-9_:]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<duration>[0-9]+(?:ms|[smhdwy])(?:[0-9]+(?:ms|[smhdwy]))*)
  | (?P<number>[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?|\.[0-9]+)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],:@])
    """,
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(expr):
        m = _TOKEN.match(expr, at)
        assert m is not None, f"cannot tokenize {expr[at : at + 30]!r} in {expr!r}"
        at = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup or "", m.group()))
    return out


@dataclass
class Query:
    """What one PromQL expression names."""

    metrics: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str, str]] = field(default_factory=list)  # metric, label, op, value
    grouping: set[str] = field(default_factory=set)


def parse(expr: str) -> Query:
    q, toks, i = Query(), tokens(expr), 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "op" and text == "[":  # a range or subquery duration
            while toks[i][1] != "]":
                i += 1
        elif kind == "ident" and text in GROUPING and nxt == "(":
            i += 2
            while toks[i][1] != ")":
                if toks[i][0] == "ident":
                    q.grouping.add(toks[i][1])
                i += 1
        elif kind == "ident" and nxt == "(":
            pass  # a function or an aggregation: its arguments follow
        elif kind == "ident" and text not in KEYWORDS and text not in AGGREGATORS:
            q.metrics.add(text)
            if nxt == "{":
                i = _matchers(q, text, toks, i + 2)
        elif kind == "op" and text == "{":  # a selector with no metric name
            i = _matchers(q, "", toks, i + 1)
        i += 1
    return q


def _matchers(q: Query, metric: str, toks: list[tuple[str, str]], i: int) -> int:
    """Read ``label op "value", ...}`` from ``i``; return the index of the ``}``."""
    while toks[i][1] != "}":
        if toks[i][1] == ",":
            i += 1
            continue
        (lk, label), (_, op), (vk, value) = toks[i], toks[i + 1], toks[i + 2]
        assert lk == "ident" and op in ("=", "!=", "=~", "!~") and vk == "string", toks[i : i + 3]
        q.matchers.append((metric, label, op, value[1:-1]))
        i += 3
    return i


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expr, legend) for every target of every panel, rows' panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                yield f"panel {p['title']!r} target {t['refId']}", t["expr"], t.get("legendFormat", "")
            yield from walk(p.get("panels", []))

    yield from walk(dashboard["panels"])


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\)$")


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, selector, label) of every ``label_values(selector, label)`` template variable."""
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        text = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = LABEL_VALUES.match(text.strip())
        assert m is not None, f"variable {v['name']}: not a label_values() query: {text!r}"
        yield f"variable {v['name']}", m["selector"], m["label"]


# --- the tokenizer itself ----------------------------------------------------------------------


def test_the_tokenizer_reads_metrics_matchers_and_grouping() -> None:
    q = parse(
        'histogram_quantile(0.9, sum by (le) (rate(cached_fetch_duration_seconds_bucket{result="ok", '
        'instance=~"$instance"}[$__rate_interval]))) / on(instance) group_left sum(cached_store_bytes offset 5m)'
    )
    assert q.metrics == {"cached_fetch_duration_seconds_bucket", "cached_store_bytes"}
    assert q.matchers == [
        ("cached_fetch_duration_seconds_bucket", "result", "=", "ok"),
        ("cached_fetch_duration_seconds_bucket", "instance", "=~", "$instance"),
    ]
    assert q.grouping == {"le", "instance"}


def test_the_dashboard_is_importable_as_is() -> None:
    d = json.loads(DASHBOARD.read_text())
    inputs = {i["name"]: i for i in d["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ids = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            ids.append(p["id"])
            assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
                assert p["targets"], p["title"]
                for t in p["targets"]:
                    assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"].strip(), p["title"]
            walk(p.get("panels", []))

    walk(d["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for v in d["templating"]["list"]:
        assert v["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert d["uid"] and d["title"] and d["id"] is None  # an exported dashboard carries no instance id
    named = set().union(*(parse(expr).metrics for _, expr, _ in queries(d)))
    assert CONTRACT_METRICS <= named, f"not on the dashboard: {sorted(CONTRACT_METRICS - named)}"


# --- against a running daemon --------------------------------------------------------------------


async def _exported(tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it is exported with, after one small fetch."""
    write_random_file(tmp_path / "o" / "m.bin", 1 << 20)
    async with Origin(tmp_path / "o") as origin, running_daemon(tmp_path / "c") as d:
        async with aiohttp.ClientSession() as s:
            body = {"ref": origin.file_url("m.bin"), "wait": True}
            async with s.post(d.api_address + "/v1/prefetch", json=body) as resp:
                assert resp.status == 200, await resp.text()
            # And one that fails at the origin, so the origin error counter has a series too.
            body = {"ref": origin.file_url("missing.bin"), "wait": True}
            async with s.post(d.api_address + "/v1/prefetch", json=body) as resp:
                assert resp.status == 404, await resp.text()
            async with s.get(d.api_address + "/metrics") as resp:
                text = await resp.text()
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


async def test_every_metric_and_label_the_dashboard_queries_is_exported(tmp_path: Path) -> None:
    d = json.loads(DASHBOARD.read_text())
    exported = await _exported(tmp_path)

    def labels_of(metric: str) -> set[str]:
        return set().union(*(s.keys() for s in exported[metric])) | TARGET_LABELS

    problems: list[str] = []
    checked = 0
    for where, expr, legend in queries(d):
        q = parse(expr)
        for metric in sorted(q.metrics):
            checked += 1
            if metric not in exported:
                problems.append(f"{where}: metric {metric} is not exported")
        known = [m for m in q.metrics if m in exported]
        for metric, label, op, value in q.matchers:
            if metric not in exported:
                continue
            if label not in labels_of(metric):
                problems.append(f"{where}: {metric} has no label {label!r} (it has {sorted(labels_of(metric))})")
            elif op == "=" and label not in TARGET_LABELS and "$" not in value:
                values = {s.get(label) for s in exported[metric]}
                if value not in values:
                    problems.append(f"{where}: {metric}{{{label}={value!r}}} is never exported (values {values})")
        for label in q.grouping:
            if not any(label in labels_of(m) for m in known):
                problems.append(f"{where}: groups by {label!r}, which none of {sorted(known)} carries")
        for label in re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend):
            # After an aggregation only its grouping labels are left to name.
            kept = q.grouping if q.grouping else set().union(*(labels_of(m) for m in known))
            if label not in kept:
                problems.append(f"{where}: legend names {label!r}, which the query does not keep")
    for where, selector, label in variable_queries(d):
        q = parse(selector)
        for metric in q.metrics:
            checked += 1
            if metric not in exported:
                problems.append(f"{where}: metric {metric} is not exported")
            elif label not in labels_of(metric):
                problems.append(f"{where}: {metric} has no label {label!r}")
    assert checked > 20
    assert problems == [], "\n".join(problems)
