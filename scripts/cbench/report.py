"""The swarm scenario's output: the Markdown table and targets (stdout and results.md), the JSON
record (results.json) and the plot (per-node completion, origin throughput over time)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cbench.common import SAMPLE_S, fmt_size, log
from cbench.measure import MethodResult


def lower_bound(a: argparse.Namespace) -> float:
    """Seconds no method can beat: the model through the slowest link it must cross whole (the
    origin's; a node's own; with two zones, the link between them, which zone b's copy crosses)."""
    rates = [a.origin_rate, a.node_rate] + ([a.zone_link_rate] if getattr(a, "zones", 1) > 1 else [])
    return a.size * 8 / min(rates)


def report(results: list[MethodResult], a: argparse.Namespace) -> str:
    bound = lower_bound(a)
    zones = getattr(a, "zones", 1)
    lines = [
        f"{a.nodes} nodes at {a.node_rate / 1e6:.0f} Mbit/s, origin at {a.origin_rate / 1e6:.0f} Mbit/s, "
        + (f"{zones} zones joined at {a.zone_link_rate / 1e6:.0f} Mbit/s, " if zones > 1 else "")
        + f"model {fmt_size(a.size)}; lower bound (model size / slowest link it must cross) = {bound:.1f} s",
        f"cached: git {a.git}, --piece-size {fmt_size(a.piece_size)}, origins.http.connections={a.origin_connections}, "
        f"peer.gossip_interval_s={a.gossip_interval or 'daemon default'}"
        + (f", peer.stall_timeout_s={a.stall_timeout}" if a.stall_timeout else "")
        + f"; {os.cpu_count()} CPUs",
        "",
        "| method | all nodes verified | vs lower bound | first / median node | origin payload sent | vs model size | origin wire bytes | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [table_row(r, a, bound) for r in results]
    lines += ["", "Targets:"] + targets(results, a, bound)
    if zones > 1:
        lines += ["", "Across the zone link (wire bytes, TCP/IP headers included):"] + zone_lines(results, a, bound)
    if getattr(a, "scenario", "") == "shards":
        lines += ["", "One file vs shards (same bytes, same origin, same run):"] + shard_lines(results)
    for r in results:
        if r.name.startswith("cached") and "config" in r.extra:
            cfg = "; ".join(line for line in r.extra["config"].splitlines() if "=" in line or "--" in line)
            lines.append(
                f"- config ({r.name}): {cfg}"
                + (f"; code from {r.extra['pythonpath']}" if r.extra.get("pythonpath") else "")
            )
    for r in results:
        for note in r.notes:
            lines.append(f"- note ({r.name}): {note}")
    return "\n".join(lines)


def table_row(r: MethodResult, a: argparse.Namespace, bound: float) -> str:
    if r.skipped:
        return f"| {r.name} | skipped: {r.skipped} | | | | | | |"
    done = sorted(s for s in r.node_s if s is not None)
    med = done[len(done) // 2] if done else None
    t = f"{r.all_done_s:.1f} s" if r.all_done_s is not None else f"{len(done)}/{a.nodes} done"
    ratio = f"{r.all_done_s / bound:.2f}x" if r.all_done_s is not None else "-"
    fm = f"{done[0]:.1f} / {med:.1f} s" if done else "-"
    return (
        f"| {r.name} | {t} | {ratio} | {fm} | {fmt_size(r.origin_payload)} | {r.origin_payload / a.size:.3f}x | "
        f"{fmt_size(r.origin_wire)} | {'yes' if r.ok else 'NO'} |"
    )


def targets(results: list[MethodResult], a: argparse.Namespace, bound: float) -> list[str]:
    """Each cached run against the targets: time, origin bytes, and the BitTorrent swarm."""
    b = next((r for r in reversed(results) if r.name == "torrent"), None)
    lines = []
    for c in (r for r in results if r.name.startswith("cached")):
        if c.all_done_s is None:
            lines.append(f"- {c.name}: not every node finished, so every target is MISSED")
            continue
        lines.append(
            f"- {c.name} within 1.15x of the lower bound: {c.all_done_s / bound:.2f}x -> {'met' if c.all_done_s <= 1.15 * bound else 'MISSED'}"
        )
        lines.append(
            f"- {c.name} origin bytes <= 1.05x model size: {c.origin_payload / a.size:.3f}x -> {'met' if c.origin_payload <= 1.05 * a.size else 'MISSED'}"
        )
        if b and b.all_done_s is not None:
            lines.append(
                f"- {c.name} faster than the BitTorrent swarm: {c.all_done_s:.1f} s vs {b.all_done_s:.1f} s "
                f"({b.all_done_s / c.all_done_s:.2f}x) -> {'met' if c.all_done_s < b.all_done_s else 'MISSED'}"
            )
    return lines


def zone_lines(results: list[MethodResult], a: argparse.Namespace, bound: float) -> list[str]:
    """Per method: the bytes that crossed into each zone (the zone link's tx, each end) against
    the model size, and the time against the bound."""
    out = []
    for r in results:
        links = r.extra.get("links")
        if r.skipped or not links:
            continue
        into_b, into_a = links.get("s-zone-a", (0, 0))[1], links.get("s-zone-b", (0, 0))[1]
        t = f"{r.all_done_s:.1f} s ({r.all_done_s / bound:.2f}x)" if r.all_done_s is not None else "not all done"
        ok = "met" if into_b <= 1.05 * a.size and into_a <= 1.05 * a.size else "MISSED"
        out.append(
            f"- {r.name}: into zone b {fmt_size(into_b)} ({into_b / a.size:.3f}x model), into zone a "
            f"{fmt_size(into_a)} ({into_a / a.size:.3f}x); all done {t}; <= 1.05x per zone -> {ok}"
        )
        r.extra["zone_bytes"] = {"into_b": into_b, "into_a": into_a}
    return out


def shard_lines(results: list[MethodResult]) -> list[str]:
    """Each method family's sharded time against its one-file time (target: within 5%)."""
    out = []
    for family in ("cached", "torrent"):
        one = next((r for r in results if r.name == f"{family} (1 file)"), None)
        many = next((r for r in results if r.name.startswith(f"{family} (") and r is not one), None)
        if one is None or many is None or one.all_done_s is None or many.all_done_s is None:
            continue
        ratio = many.all_done_s / one.all_done_s
        out.append(
            f"- {many.name}: {many.all_done_s:.1f} s vs {one.all_done_s:.1f} s for one file ({ratio:.3f}x)"
            + (f" -> {'met' if ratio <= 1.05 else 'MISSED'} (within 5%)" if family == "cached" else "")
        )
    return out


def write_results(results: list[MethodResult], a: argparse.Namespace, text: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "size": a.size,
                "nodes": a.nodes,
                "origin_rate": a.origin_rate,
                "node_rate": a.node_rate,
                "piece_size": a.piece_size,
                "origin_connections": a.origin_connections,
                "variants": a.variants,
                "gossip_interval_s": a.gossip_interval,
                "zones": getattr(a, "zones", 1),
                "zone_link_rate": getattr(a, "zone_link_rate", 0),
                "scenario": getattr(a, "scenario", "swarm"),
                "cpus": os.cpu_count(),
                "git": a.git,
                "results": [r.__dict__ for r in results],
            },
            indent=1,
            default=str,
        )
    )


def finish_swarm(results: list[MethodResult], a: argparse.Namespace, out: Path) -> int:
    """Print and write the report, draw the plot; the exit code (0: every method ok or skipped)."""
    text = report(results, a)
    print(text)
    write_results(results, a, text, out)
    try:
        plot(results, a, a.plot)
        log(f"plot: {a.plot}; results: {out}")
    except ImportError as e:
        log(f"no plot (matplotlib missing: {e})")
    return 0 if all(r.ok or r.skipped for r in results) else 1


def method_colors(results: list[MethodResult]) -> dict[str, str]:
    colors = {"cached": "tab:red", "torrent": "tab:orange", "direct": "tab:blue"}
    spare = iter(["tab:olive", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:cyan"])
    for r in results:
        if r.name not in colors:
            colors[r.name] = next(spare, "tab:gray")
    return colors


def draw_completion(ax: Any, shown: list[MethodResult], colors: dict[str, str], a: argparse.Namespace) -> None:
    """Per node: seconds until its verified copy (hatched: not done within the method's budget)."""
    bound = lower_bound(a)
    width = 0.8 / max(1, len(shown))
    for k, r in enumerate(shown):
        xs = [i + 1 + (k - (len(shown) - 1) / 2) * width for i in range(len(r.node_s))]
        cap = r.extra.get("budget_s", max((s for s in r.node_s if s), default=1.0))
        ys = [s if s is not None else cap for s in r.node_s]
        hatch = [None if s is not None else "xx" for s in r.node_s]
        label = (
            f"{r.name} (all: {r.all_done_s:.1f} s)" if r.all_done_s else f"{r.name} (hatched: not done by {cap:.0f} s)"
        )
        bars = ax.bar(xs, ys, width=width, color=colors[r.name], label=label)
        for bar, h in zip(bars, hatch):
            if h:
                bar.set_hatch(h)
                bar.set_alpha(0.45)
    ax.axhline(bound, color="black", ls="--", lw=1, label=f"lower bound {bound:.1f} s")
    ax.axhline(bound * 1.15, color="grey", ls=":", lw=1, label="1.15x lower bound")
    ax.set_xlabel("node")
    ax.set_ylabel("s until verified copy")
    ax.set_xticks(range(1, a.nodes + 1))
    ax.set_title(
        f"Per-node completion: {fmt_size(a.size)} model, {a.nodes} nodes @ {a.node_rate / 1e6:.0f} Mbit/s, "
        f"origin @ {a.origin_rate / 1e6:.0f} Mbit/s"
    )
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def rates_of(pts: list[tuple[float, int]]) -> tuple[list[float], list[float]]:
    """(mid time, Mbit/s) between consecutive samples of a byte counter."""
    ts, rates = [], []
    for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
        if t1 > t0:
            ts.append((t0 + t1) / 2)
            rates.append((b1 - b0) * 8 / (t1 - t0) / 1e6)
    return ts, rates


def draw_throughput(ax: Any, shown: list[MethodResult], colors: dict[str, str], a: argparse.Namespace) -> None:
    """The origin's sending rate over time, from the sampled link counter (and, with zones, the
    zone link's rate into zone b, dashed)."""
    for r in shown:
        ts, rates = rates_of(r.samples)
        ax.plot(
            ts,
            rates,
            color=colors[r.name],
            lw=1.2,
            label=f"{r.name}: origin sent {r.origin_wire / a.size:.2f}x model (wire)",
        )
        if r.extra.get("into_zone_b"):
            ts, rates = rates_of(r.extra["into_zone_b"])
            ax.plot(ts, rates, color=colors[r.name], lw=0.9, ls="--", label=f"{r.name}: zone link into zone b")
    ax.axhline(a.origin_rate / 1e6, color="black", ls="--", lw=1, label="origin link rate")
    ax.set_xlabel("s since start")
    ax.set_ylabel("origin throughput, Mbit/s")
    ax.set_title(f"Origin throughput over time (switch-side veth counter, sampled every {SAMPLE_S} s)")
    ax.legend(fontsize=8)


def plot(results: list[MethodResult], a: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = method_colors(results)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8.5))
    shown = [r for r in results if not r.skipped and r.node_s]
    draw_completion(ax1, shown, colors, a)
    draw_throughput(ax2, shown, colors, a)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
