"""The failover scenario's output: the Markdown report (stdout and failover.md), one summary JSON
line (stdout and failover.jsonl), the whole record (failover-STAMP.json) and the plot."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from cbench.common import SAMPLE_S, fmt_size, log


def _t(x: float | None) -> str:
    return f"{x:.2f} s" if x is not None else "-"


def report_failover(r: dict[str, Any], a: argparse.Namespace) -> str:
    lines = header(r, a)
    if "holders" not in r:
        return "\n".join(lines + [""] + [f"- {n}" for n in r.get("notes", [])])
    return "\n".join(lines + what_happened(r, a) + detection_table(r) + timing_table(r) + where_time_goes(r, a))


def header(r: dict[str, Any], a: argparse.Namespace) -> list[str]:
    pc = r.get("peer_config") or {}
    src = r.get("peer_config_from") or {}
    cfg = ", ".join(f"peer.{k}={v} ({src.get(k, '?')})" for k, v in pc.items())
    wire = a.size * 8 / a.node_rate
    return [
        f"Failover: {a.nodes} nodes at {a.node_rate / 1e6:.0f} Mbit/s, origin at {a.origin_rate / 1e6:.0f} Mbit/s, model "
        f"{fmt_size(a.size)}, replicas {a.replicas}, kill mode {a.kill_mode}; model size / node link rate = {wire:.2f} s",
        f"cached: git {a.git}, --piece-size {fmt_size(a.piece_size)}; {cfg}; {os.cpu_count()} CPUs",
    ]


def what_happened(r: dict[str, Any], a: argparse.Namespace) -> list[str]:
    exp = ((r.get("replacement_status") or {}).get("replicas") or {}).get("owners")
    return [
        f"initial copies: replicate on n1 -> owners {', '.join(r.get('owners_at_replicate') or [])}; {len(r['holders'])} ready after "
        f"{r['initial_s']:.1f} s, origin sent {r['initial_origin_bytes'] / a.size:.3f}x the model",
        f"killed {r['victim']} (SIGKILL{' + link down' if a.kill_mode == 'node' else ''}); surviving holder "
        f"{', '.join(r['surviving_holders'])}; replacement {r.get('replacement')}"
        + (f" (owners now, as the replacement computes them: {', '.join(exp)})" if exp else ""),
    ]


def detection_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| from the kill | first survivor | median | last survivor | the replacement |",
        "|---|---|---|---|---|",
    ]
    rv = r.get("replacement_view") or {}
    for st in ("suspect", "dead"):
        d = r.get(f"{st}_s") or {}
        lines.append(
            f"| survivors mark {r['victim']} {st} | {_t(d.get('first'))} | {_t(d.get('median'))} | {_t(d.get('last'))} | {_t(rv.get(st))} |"
        )
    return lines


def timing_table(r: dict[str, Any]) -> list[str]:
    pb, ob = r.get("peer_bytes"), r.get("origin_bytes_replacement")
    return [
        "",
        "| detection (dead) | replacement queued | fetch starts | ready (verified) | transfer | total | lower bound | total / bound | origin bytes | replacement: from peers / origin |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {_t(r.get('detection_s'))} | {_t(r.get('queued_s'))} | {_t(r.get('fetching_s'))} | {_t(r.get('ready_s'))} | "
        f"{_t(r.get('transfer_s'))} | {_t(r.get('total_s'))} | {_t(r.get('lower_bound_s'))} | "
        f"{(str(r['ratio']) + 'x') if r.get('ratio') is not None else '-'} | {fmt_size(r.get('origin_bytes_failover', 0))} "
        f"({r.get('origin_requests_failover', 0)} GET, {r.get('origin_heads_failover', 0)} HEAD) | "
        f"{fmt_size(pb or 0)} / {fmt_size(ob or 0)} |",
    ]


def where_time_goes(r: dict[str, Any], a: argparse.Namespace) -> list[str]:
    wire = a.size * 8 / a.node_rate
    rv = r.get("replacement_view") or {}
    lines = ["", "Where the time goes (seconds after the kill):"]
    trig = r.get("trigger")
    if trig:
        lines.append(
            f"- the replacement stopped counting {r['victim']} as a live owner when it marked it **{trig}** "
            f"(at {_t(rv.get(trig))}); its reconcile loop queued the fetch {_t(r.get('reconcile_delay_s'))} later"
        )
    if r.get("transfer_s") is not None:
        rate = a.size * 8 / r["transfer_s"] / 1e6
        lines.append(
            f"- transfer (fetching -> ready, includes manifest/piece-table lookups, verify, fsync, commit): "
            f"{r['transfer_s']:.2f} s = {rate:.0f} Mbit/s effective, vs {wire:.2f} s at the link rate"
        )
    if r.get("lower_bound_suspect_s") is not None and trig == "suspect":
        lines.append(
            f"- bound from the replacement's *suspect* mark instead (what the daemon acts on): "
            f"{r['lower_bound_suspect_s']:.2f} s"
            + (f" -> total / that = {r['total_s'] / r['lower_bound_suspect_s']:.2f}x" if r.get("total_s") else "")
        )
    lb = r.get("link_bytes") or {}
    if lb:
        sent = ", ".join(f"{dev[2:]} {fmt_size(v['sent'])}" for dev, v in sorted(lb.items()) if v["sent"] > (1 << 20))
        lines.append(f"- link bytes sent during the failover (switch veth counters, > 1 MiB): {sent or 'none'}")
    if r.get("loadavg_at_kill"):
        lines.append(
            f"- load average at the kill: {' / '.join(map(str, r['loadavg_at_kill']))} (1/5/15 min, {os.cpu_count()} CPUs, shared machine)"
        )
    lines.append(
        f"- verified: {'yes' if r.get('ok') else 'NO'} (replacement ready, BLAKE3 of its file matches, "
        f"{sum(1 for x in r.get('locate_after') or [] if x.get('state') == 'ready')} ready copies in locate)"
    )
    for note in r.get("notes", []):
        lines.append(f"- note: {note}")
    return lines


def summary_failover(r: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "scenario",
        "ok",
        "git",
        "size",
        "nodes",
        "node_rate",
        "origin_rate",
        "replicas",
        "kill_mode",
        "peer_config",
        "initial_s",
        "initial_origin_bytes",
        "holders",
        "victim",
        "replacement",
        "fetchers",
        "suspect_s",
        "dead_s",
        "detection_s",
        "trigger",
        "queued_s",
        "fetching_s",
        "ready_s",
        "reconcile_delay_s",
        "transfer_s",
        "total_s",
        "wire_s",
        "lower_bound_s",
        "ratio",
        "lower_bound_suspect_s",
        "origin_bytes_failover",
        "origin_requests_failover",
        "peer_bytes",
        "origin_bytes_replacement",
        "loadavg_at_kill",
        "notes",
    )
    return {k: r.get(k) for k in keys if k in r}


def draw_failover(ax: Any, r: dict[str, Any], title: str | None = None) -> None:
    """One failover run on ``ax``: the replacement's verified bytes, the bytes the surviving holder
    and the origin sent, the detection marks and the two bounds (all from the run's record)."""
    gib = 1 << 30
    size, node_rate = r["size"], r["node_rate"]
    wire = size * 8 / node_rate
    prog = r.get("progress") or []
    if prog:
        ax.plot(
            [t for t, _ in prog],
            [b / gib for _, b in prog],
            color="tab:red",
            lw=1.8,
            marker=".",
            label=f"replacement {r.get('replacement')}: verified bytes (job events)",
        )
    for dev, pts in (r.get("link_samples") or {}).items():
        ax.plot(
            [t for t, _ in pts],
            [b / gib for _, b in pts],
            lw=1.1,
            ls="-" if dev != "s-origin" else ":",
            color="tab:blue" if dev != "s-origin" else "black",
            label=f"bytes sent by {dev[2:]} (link counter, sampled every {SAMPLE_S} s)",
        )
    det = r.get("detection_s")
    if det is not None:
        ax.plot(
            [det, det + wire],
            [0, size / gib],
            color="grey",
            ls="--",
            lw=1,
            label=f"lower bound: dead mark + size / link rate = {det + wire:.1f} s",
        )
    rv = r.get("replacement_view") or {}
    if rv.get("suspect") is not None:
        ax.plot(
            [rv["suspect"], rv["suspect"] + wire],
            [0, size / gib],
            color="grey",
            ls=":",
            lw=1,
            label=f"suspect mark + size / link rate = {rv['suspect'] + wire:.1f} s",
        )
    marks = [
        ("suspect", rv.get("suspect"), "tab:orange"),
        ("dead", rv.get("dead"), "tab:purple"),
        ("fetch starts", r.get("fetching_s"), "tab:green"),
        ("ready", r.get("ready_s"), "tab:red"),
    ]
    for label, t, color in marks:
        if t is not None:
            ax.axvline(t, color=color, lw=0.9, ls="-.", label=f"{label} ({t:.1f} s)")
    ax.set_xlabel(f"s since the kill of {r.get('victim')} ({r.get('kill_mode')})")
    ax.set_ylabel("GiB")
    ax.set_title(
        title
        or (
            f"Failover: {fmt_size(size)} model, replicas {r.get('replicas')}, {r.get('nodes')} nodes @ "
            f"{node_rate / 1e6:.0f} Mbit/s (total {_t(r.get('total_s'))}, {r.get('ratio', '-')}x the bound)"
        ),
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlim(left=-1)


def plot_failover(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    draw_failover(ax, r)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish_failover(r: dict[str, Any], a: argparse.Namespace, out: Path) -> int:
    text = report_failover(r, a)
    print(text)
    line = json.dumps(summary_failover(r), default=str)
    print(line)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / "failover.md").write_text(text + "\n")
    (out / f"failover-{stamp}.json").write_text(json.dumps(r, indent=1, default=str))
    with open(out / "failover.jsonl", "a") as f:
        f.write(line + "\n")
    plot_path = a.plot or out / f"failover-{stamp}.png"
    try:
        if "holders" in r:
            plot_failover(r, plot_path)
            log(f"plot: {plot_path}")
    except ImportError as e:
        log(f"no plot (matplotlib missing: {e})")
    log(f"results: {out}/failover.md, failover-{stamp}.json, failover.jsonl")
    return 0 if r.get("ok") else 1
