"""The ``scale`` scenario's output: one row per node count (time over the lower bound, origin
bytes over the model, the same for libtorrent in the same run), the targets of issue 16, the
JSON record and an SVG figure (drawn here: matplotlib is not a dependency)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cbench.common import fmt_size, log
from cbench.measure import MethodResult
from cbench.report import lower_bound

Point = tuple[int, list[MethodResult]]


def by_name(results: list[MethodResult], name: str) -> MethodResult | None:
    return next((r for r in results if r.name == name and not r.skipped), None)


def cell(r: MethodResult | None, bound: float, size: int) -> tuple[str, str, str]:
    """(time, time over the bound, origin payload over the model) for a table row."""
    if r is None:
        return "-", "-", "-"
    if r.all_done_s is None:
        return "not all done", "-", f"{r.origin_payload / size:.3f}x"
    return f"{r.all_done_s:.1f} s", f"{r.all_done_s / bound:.2f}x", f"{r.origin_payload / size:.3f}x"


def report_scale(points: list[Point], a: argparse.Namespace) -> str:
    bound = lower_bound(a)
    lines = [
        f"scale: nodes at {a.node_rate / 1e6:.0f} Mbit/s, origin at {a.origin_rate / 1e6:.0f} Mbit/s, model "
        f"{fmt_size(a.size)}; lower bound {bound:.1f} s at every point; cached git {a.git}, "
        f"peer.gossip_interval_s={a.gossip_interval or 'daemon default'}; {os.cpu_count()} CPUs",
        "",
        "| nodes | cached | vs lower bound | origin bytes | torrent | vs lower bound | origin bytes | torrent time / cached time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, results in points:
        c, t = by_name(results, "cached"), by_name(results, "torrent")
        ct, cr, co = cell(c, bound, a.size)
        tt, tr, to = cell(t, bound, a.size)
        vs = f"{t.all_done_s / c.all_done_s:.2f}" if c and t and c.all_done_s and t.all_done_s else "-"
        lines.append(f"| {n} | {ct} | {cr} | {co} | {tt} | {tr} | {to} | {vs} |")
    lines += ["", "Targets (issue 16):"] + scale_targets(points, a, bound)
    for n, results in points:
        for r in results:
            for note in r.notes:
                lines.append(f"- note ({n} nodes, {r.name}): {note}")
    return "\n".join(lines)


def scale_targets(points: list[Point], a: argparse.Namespace, bound: float) -> list[str]:
    cached = [(n, by_name(rs, "cached"), by_name(rs, "torrent")) for n, rs in points]
    times = [c.all_done_s / bound for _, c, _ in cached if c and c.all_done_s]
    origin = [c.origin_payload / a.size for _, c, _ in cached if c]
    out = []
    if len(times) == len(cached) and times:
        out.append(
            f"- time over the lower bound flat within 1.15x: {min(times):.2f}x..{max(times):.2f}x -> "
            f"{'met' if max(times) <= 1.15 else 'MISSED'}"
        )
    else:
        out.append("- time over the lower bound: not every point finished -> MISSED")
    if origin:
        out.append(
            f"- origin <= 1.02x at every point: max {max(origin):.3f}x -> {'met' if max(origin) <= 1.02 else 'MISSED'}"
        )
    for n, c, t in cached:
        if c and t and c.all_done_s and t.all_done_s:
            out.append(f"- {n} nodes, faster than libtorrent: {'met' if c.all_done_s < t.all_done_s else 'MISSED'}")
    return out


def svg(points: list[Point], a: argparse.Namespace) -> str:
    """Two panels: time over the lower bound, and origin bytes over the model, against nodes;
    cached and libtorrent; the targets as dashed lines."""
    bound = lower_bound(a)
    w, h, pad, gap = 720, 300, 60, 40
    xs = [n for n, _ in points] or [1]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {"time": {}, "origin": {}}
    for n, results in points:
        for name in ("cached", "torrent"):
            r = by_name(results, name)
            if r is None:
                continue
            if r.all_done_s:
                series["time"].setdefault(name, []).append((n, r.all_done_s / bound))
            series["origin"].setdefault(name, []).append((n, r.origin_payload / a.size))
    colors = {"cached": "#d62728", "torrent": "#ff7f0e"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * 2 + gap}" height="{h}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{w * 2 + gap}" height="{h}" fill="white"/>',
    ]
    panels = (("time", "time / lower bound", 1.15), ("origin", "origin bytes / model", 1.02))
    for k, (key, title, target) in enumerate(panels):
        x0 = k * (w + gap)
        vals = [v for pts in series[key].values() for _, v in pts] + [target, 1.0]
        top = max(vals) * 1.1
        lo, hi = min(xs), max(xs)

        def px(n: float, x0: int = x0, lo: int = lo, hi: int = hi) -> float:
            return x0 + pad + (n - lo) / max(1, hi - lo) * (w - 2 * pad)

        def py(v: float, top: float = top) -> float:
            return h - pad + 10 - v / top * (h - 2 * pad)

        parts.append(f'<text x="{x0 + w / 2}" y="20" text-anchor="middle" font-weight="bold">{title}</text>')
        parts.append(f'<line x1="{px(lo)}" y1="{py(0)}" x2="{px(hi)}" y2="{py(0)}" stroke="black"/>')
        parts.append(f'<line x1="{px(lo)}" y1="{py(0)}" x2="{px(lo)}" y2="{py(top)}" stroke="black"/>')
        for n in xs:
            parts.append(f'<text x="{px(n)}" y="{py(0) + 16}" text-anchor="middle">{n}</text>')
        parts.append(f'<text x="{x0 + w / 2}" y="{h - 8}" text-anchor="middle">nodes</text>')
        for v in (1.0, target):
            parts.append(
                f'<line x1="{px(lo)}" y1="{py(v)}" x2="{px(hi)}" y2="{py(v)}" stroke="grey" stroke-dasharray="4 3"/>'
            )
            parts.append(f'<text x="{px(lo) - 4}" y="{py(v) + 4}" text-anchor="end">{v:.2f}</text>')
        for j, (name, pts) in enumerate(sorted(series[key].items())):
            path = " ".join(f"{px(n):.1f},{py(v):.1f}" for n, v in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colors[name]}" stroke-width="2"/>')
            for n, v in pts:
                parts.append(f'<circle cx="{px(n):.1f}" cy="{py(v):.1f}" r="3" fill="{colors[name]}"/>')
                parts.append(f'<text x="{px(n) + 5:.1f}" y="{py(v) - 5:.1f}" fill="{colors[name]}">{v:.2f}</text>')
            parts.append(
                f'<text x="{x0 + w - pad}" y="{40 + 16 * j}" text-anchor="end" fill="{colors[name]}">{name}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def finish_scale(points: list[Point], a: argparse.Namespace, out: Path) -> int:
    text = report_scale(points, a)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(text + "\n")
    record: dict[str, Any] = {
        "size": a.size,
        "node_rate": a.node_rate,
        "origin_rate": a.origin_rate,
        "gossip_interval_s": a.gossip_interval,
        "git": a.git,
        "cpus": os.cpu_count(),
        "points": [{"nodes": n, "results": [r.__dict__ for r in rs]} for n, rs in points],
    }
    (out / "scale.json").write_text(json.dumps(record, indent=1, default=str))
    figure = a.plot if a.plot and str(a.plot).endswith(".svg") else out / "scale.svg"
    figure.write_text(svg(points, a))
    log(f"figure: {figure}; results: {out}")
    return 0 if all(r.ok or r.skipped for _, rs in points for r in rs) else 1
