"""The failover's figures, computed from what was watched: who fetched, when each survivor marked
the victim suspect and dead (log line first, poll as fallback), the replacement's job timeline,
the link bytes, and the bounds and ratio. Pure functions over the run's record ``r`` (a dict,
written to failover-STAMP.json as it is); the only I/O is reading the daemons' log files."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbench.failover_watch import log_events
from cbench.measure import Samples

JOB_EVENTS = ("queued", "fetching", "ready", "failed")


def who_fetched(r: dict[str, Any], events: list[dict[str, Any]]) -> str | None:
    """Sets fetchers and replacement (the first survivor ready, else the first that fetched)."""
    fetchers = sorted({e["node"] for e in events if e.get("event") in JOB_EVENTS})
    r["fetchers"] = fetchers
    if len(fetchers) > 1:
        r["notes"].append(f"more than one survivor started a fetch: {fetchers}")
    ready_ev = sorted((e for e in events if e.get("event") == "ready"), key=lambda e: e["time"])
    repl = ready_ev[0]["node"] if ready_ev else (fetchers[0] if fetchers else None)
    r["replacement"] = repl
    return repl


def detections(
    r: dict[str, Any], survivors: list[str], views: dict[str, dict[str, float]], logs: Path, t0_wall: float
) -> dict[str, dict[str, Any]]:
    """Per survivor: seconds after the kill when it marked the victim suspect and dead; sets views,
    suspect_s and dead_s (first / median / last over the survivors)."""
    victim = r["victim"]
    per: dict[str, dict[str, Any]] = {}
    for node in survivors:
        logged = log_events(logs / f"failover-{node}.log", t0_wall)
        entry: dict[str, Any] = {"poll": views.get(node, {})}
        for st in ("suspect", "dead"):
            hit = next((t for t, msg in logged if f"peer status changed node={victim} status={st}" in msg), None)
            entry[st] = round(hit - t0_wall, 3) if hit is not None else views.get(node, {}).get(st)
            entry[f"{st}_from"] = "log" if hit is not None else "poll"
        per[node] = entry
    r["views"] = per
    for st in ("suspect", "dead"):
        ts = sorted(v[st] for v in per.values() if v.get(st) is not None)
        r[f"{st}_s"] = {"first": ts[0], "median": ts[len(ts) // 2], "last": ts[-1], "n": len(ts)} if ts else None
    return per


def replacement_timeline(
    r: dict[str, Any],
    events: list[dict[str, Any]],
    repl: str,
    per: dict[str, dict[str, Any]],
    logs: Path,
    t0_wall: float,
) -> None:
    """The replacement's job events (queued, fetching, ready, failed), its progress, its view of
    the victim and its own log lines, in seconds after the kill."""
    rel: Callable[[float], float] = lambda t: round(t - t0_wall, 3)  # noqa: E731
    mine = [e for e in events if e["node"] == repl and "time" in e]
    for kind in JOB_EVENTS:
        t = next((e["time"] for e in mine if e.get("event") == kind), None)
        r[f"{kind}_s"] = rel(t) if t is not None else None
    r["progress"] = [
        (rel(e["time"]), e.get("bytes_done", 0)) for e in mine if e.get("event") in ("progress", "fetching", "ready")
    ]
    r["replacement_view"] = per.get(repl, {})
    logged = log_events(logs / f"failover-{repl}.log", t0_wall)
    r["replacement_log"] = [f"+{t - t0_wall:.3f}s {msg}"[:240] for t, msg in logged][:60]


def link_figures(r: dict[str, Any], samples: Samples, t0: float) -> None:
    """Bytes each host sent / received on its link during the failover (switch-side veths), and
    the origin's and surviving holders' sent bytes over time."""
    if len(samples) < 2:
        return
    first, last = samples[0][1], samples[-1][1]
    r["link_bytes"] = {
        dev: {"sent": last[dev][0] - first.get(dev, (0, 0))[0], "received": last[dev][1] - first.get(dev, (0, 0))[1]}
        for dev in last
    }
    r["link_samples"] = {
        dev: [(round(t - t0, 3), c.get(dev, (0, 0))[0] - first.get(dev, (0, 0))[0]) for t, c in samples]
        for dev in ["s-origin"] + [f"s-{h}" for h in r["surviving_holders"]]
    }


def bounds(r: dict[str, Any], a: argparse.Namespace) -> None:
    """detection + size / node link rate is the bound; total / bound is the ratio; which mark
    (suspect or dead) made the replacement queue its fetch, and how long after it."""
    wire = a.size * 8 / a.node_rate
    r["wire_s"] = round(wire, 3)
    rv = r.get("replacement_view") or {}
    r["detection_s"] = rv.get("dead") if rv.get("dead") is not None else (r["dead_s"] or {}).get("median")
    if r.get("ready_s") is not None and r.get("fetching_s") is not None:
        r["transfer_s"] = round(r["ready_s"] - r["fetching_s"], 3)
        r["total_s"] = r["ready_s"]
    if r.get("detection_s") is not None:
        r["lower_bound_s"] = round(r["detection_s"] + wire, 3)
        if r.get("total_s") is not None:
            r["ratio"] = round(r["total_s"] / r["lower_bound_s"], 3)
    if rv.get("suspect") is not None:
        r["lower_bound_suspect_s"] = round(rv["suspect"] + wire, 3)
    if r.get("queued_s") is not None:
        trig = "suspect" if rv.get("dead") is None or r["queued_s"] < rv["dead"] else "dead"
        r["trigger"] = trig
        if rv.get(trig) is not None:
            r["reconcile_delay_s"] = round(r["queued_s"] - rv[trig], 3)


def verdict(r: dict[str, Any], replicas: int) -> None:
    """ok = the replacement is ready, its file verified, and locate shows ``replicas`` ready copies."""
    src = (r.get("replacement_status") or {}).get("sources") or {}
    r["ok"] = bool(
        r.get("replacement_file_ok")
        and (r.get("replacement_status") or {}).get("state") == "ready"
        and sum(1 for x in r.get("locate_after") or [] if x.get("state") == "ready") >= replicas
    )
    r["peer_bytes"], r["origin_bytes_replacement"] = src.get("peer"), src.get("origin")
