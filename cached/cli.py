"""``cachectl``: the operator's and launcher's command line for the local API.

Exit codes (CONTRACT): 0 success, 1 the operation failed (message on stderr), 2 usage error,
3 the daemon is unreachable. ``--json`` prints exactly one JSON document on stdout.

Admin commands (``evict --force``, ``pin``, ``unpin``, ``replicate``, ``gc``, ``verify``) send the
admin token from ``--admin-token-file``, else ``$CACHED_ADMIN_TOKEN_FILE``, else the daemon's
``api.admin_token_file`` in /etc/cached/config.toml when this user can read it. Without one the
daemon answers 401/403 (exit 1, with its message), unless the unix socket admits the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import tomllib
from typing import Any, NoReturn

from cached.api.client import ADMIN_TOKEN_ENV, ApiClient, ApiError, parse_address, read_token_file
from cached.config import DEFAULT_API_LISTEN, DEFAULT_CONFIG_FILE
from cached.errors import DaemonUnreachable, RefError
from cached.types import ModelRef, format_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"cachectl: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    common.add_argument(
        "--admin-token-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="admin token for evict --force, pin, unpin, replicate, gc and verify (default $CACHED_ADMIN_TOKEN_FILE, "
        "then api.admin_token_file of /etc/cached/config.toml when readable; on the unix socket root, the daemon's "
        "user and api.admin_group need none)",
    )
    p = _Parser(prog="cachectl", description="Control the cached daemon on this node.", parents=[common])
    p.add_argument("--api", help="http://HOST:PORT, HOST:PORT or unix:/path (default $CACHED_API, then 127.0.0.1:7470)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[common], description=help_)

    c = cmd("status", "one model, or the node summary")
    c.add_argument("ref", nargs="?")
    cmd("ls", "models known on this node")
    c = cmd("prefetch", "make REF ready on this node")
    c.add_argument("ref")
    c.add_argument("--wait", action="store_true", help="return when the model is ready; print its path")
    c.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    c.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="with --wait: give up waiting after S seconds"
    )
    c.add_argument("--refresh", action="store_true", help="re-resolve a branch; fetch only the files that changed")
    c.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="hf refs: only files matching (repeatable)"
    )
    c.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="hf refs: skip files matching (repeatable)"
    )
    c = cmd("path", "print the local directory of a ready model")
    c.add_argument("ref")
    c = cmd("evict", "remove REF from this node")
    c.add_argument("ref")
    c.add_argument("--force", action="store_true", help="even if pinned or leased (admin)")
    for name, help_ in (("pin", "keep REF regardless of pressure (admin)"), ("unpin", "stop keeping REF (admin)")):
        c = cmd(name, help_)
        c.add_argument("ref")
    c = cmd("lease", "take a launcher lease on a ready model; prints the lease id")
    c.add_argument("ref")
    c.add_argument("--holder", required=True)
    c.add_argument("--ttl", type=float, default=3600.0, metavar="S")
    c = cmd("release", "release a lease")
    c.add_argument("lease_id")
    c = cmd("replicate", "keep N copies of REF in the cluster (admin)")
    c.add_argument("ref")
    c.add_argument("--replicas", type=int, required=True)
    c = cmd("locate", "which nodes hold REF")
    c.add_argument("ref")
    cmd("peers", "membership as this node sees it")
    c = cmd("verify", "re-hash stored blobs; repair bad pieces (admin)")
    c.add_argument("ref", nargs="?")
    cmd("gc", "run eviction now (admin)")
    return p


def _check_ref(text: str) -> str:
    try:
        return ModelRef.parse(text).canonical
    except RefError as e:
        raise UsageError(e.message) from None


def admin_token(flag: str | None) -> str | None:
    """The admin token to send: the flag's file (must be readable), else the environment's or
    the daemon config's file when readable, else None."""
    if flag:
        try:
            return read_token_file(flag)
        except (OSError, ValueError) as e:
            raise UsageError(f"--admin-token-file: {getattr(e, 'strerror', None) or e}: {flag}") from None
    candidates = [os.environ.get(ADMIN_TOKEN_ENV)]
    try:
        with open(DEFAULT_CONFIG_FILE, "rb") as f:
            candidates.append((tomllib.load(f).get("api") or {}).get("admin_token_file"))
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        pass
    for path in candidates:
        if isinstance(path, str) and path:
            try:
                return read_token_file(path)
            except (OSError, ValueError):
                continue
    return None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    args.admin_token_file = getattr(args, "admin_token_file", None)
    addr = args.api or os.environ.get("CACHED_API") or DEFAULT_API_LISTEN
    try:
        parse_address(addr)
        code = asyncio.run(_run(args, addr))
    except UsageError as e:
        print(f"cachectl: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except ValueError as e:
        print(f"cachectl: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except DaemonUnreachable as e:
        print(f"cachectl: {e}", file=sys.stderr)
        code = EXIT_UNREACHABLE
    except ApiError as e:
        if args.json and e.body:
            print(json.dumps(e.body))
        print(f"cachectl: {e.code}: {e.message}", file=sys.stderr)
        code = EXIT_USAGE if e.code in ("bad_ref", "bad_request") else EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # The reader of our output went away (`cachectl ls | head`): not worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)


def _out(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=None if not sys.stdout.isatty() else 2) if args.json else human)


async def _run(args: argparse.Namespace, addr: str) -> int:
    if getattr(args, "ref", None) is not None:
        args.ref = _check_ref(args.ref)
    async with ApiClient(addr, admin_token=admin_token(args.admin_token_file) or "") as api:
        handler = globals()[f"_cmd_{args.command}"]
        return await handler(api, args)


async def _cmd_status(api: ApiClient, args: argparse.Namespace) -> int:
    if args.ref is None:
        node = await api.request("GET", "/v1/node")
        _out(args, node, _human_node(node))
    else:
        model = await api.request("GET", "/v1/models/status", params={"ref": args.ref})
        _out(args, model, _human_model(model))
    return EXIT_OK


async def _cmd_ls(api: ApiClient, args: argparse.Namespace) -> int:
    models = await api.request("GET", "/v1/models")
    if args.json:
        _out(args, models, "")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("REF", "STATE", "SIZE", "DONE", "PIN", "LEASES"):
        table.add_column(col)
    for m in models:
        pct = f"{100 * m['bytes_done'] / m['bytes_total']:.0f}%" if m["bytes_total"] else "-"
        table.add_row(
            m["ref"],
            m["state"],
            format_size(m["bytes_total"]),
            pct,
            "yes" if m["pinned"] else "",
            str(len(m["leases"])),
        )
    Console(highlight=False).print(table) if models else print("no models")
    return EXIT_OK


async def _cmd_prefetch(api: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"ref": args.ref, "priority": args.priority}
    if args.refresh:
        body["refresh"] = True
    if args.include or args.exclude:
        body.update(include=args.include, exclude=args.exclude)
        args.ref = ModelRef.parse(args.ref).with_patterns(args.include, args.exclude).canonical
    if not args.wait:
        model = await api.request("POST", "/v1/prefetch", body=body)
        _out(args, model, f"{model['ref']}: {model['state']}")
        return EXIT_OK
    if sys.stderr.isatty() and not args.json:
        model = await _prefetch_with_bar(api, args, body)
    else:
        body.update(wait=True)
        if args.timeout is not None:
            body["timeout_s"] = args.timeout
        model = await api.request("POST", "/v1/prefetch", body=body)
    if model["state"] != "ready":
        _out(
            args,
            model,
            f"{model['ref']}: {model['state']} ({format_size(model['bytes_done'])} of {format_size(model['bytes_total'])})",
        )
        print(f"cachectl: {model['ref']} is not ready yet ({model['state']})", file=sys.stderr)
        return EXIT_FAILED
    _out(args, model, model["path"])
    return EXIT_OK


async def _prefetch_with_bar(api: ApiClient, args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    deadline = time.monotonic() + args.timeout if args.timeout else None
    await api.request("POST", "/v1/prefetch", body=body)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    from rich.console import Console

    # The bar goes to stderr so that `P=$(cachectl prefetch --wait REF)` captures only the path.
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(args.ref, total=None)

        async def follow() -> None:
            async for ev in api.events(args.ref):
                bar.update(task, total=ev.get("bytes_total") or None, completed=ev.get("bytes_done", 0))
                if ev.get("state") in ("ready", "failed", "absent"):
                    return

        try:
            await asyncio.wait_for(follow(), None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
    model = await api.request("GET", "/v1/models/status", params={"ref": args.ref})
    if model["state"] == "failed":
        raise ApiError(
            500, model.get("error_code") or "failed", model.get("error") or "prefetch failed", {"model": model}
        )
    return model


async def _cmd_path(api: ApiClient, args: argparse.Namespace) -> int:
    model = await api.request("GET", "/v1/models/status", params={"ref": args.ref})
    if model["state"] != "ready":
        print(f"cachectl: {args.ref} is not ready on this node (state: {model['state']})", file=sys.stderr)
        return EXIT_FAILED
    _out(args, {"ref": model["ref"], "path": model["path"], "hf_path": model.get("hf_path")}, model["path"])
    return EXIT_OK


async def _cmd_evict(api: ApiClient, args: argparse.Namespace) -> int:
    model = await api.request("POST", "/v1/evict", body={"ref": args.ref, "force": args.force})
    _out(args, model, f"evicted {args.ref} (freed {format_size(model.get('freed_bytes', 0))})")
    return EXIT_OK


async def _cmd_pin(api: ApiClient, args: argparse.Namespace) -> int:
    model = await api.request("POST", "/v1/pin", body={"ref": args.ref})
    _out(args, model, f"pinned {args.ref}")
    return EXIT_OK


async def _cmd_unpin(api: ApiClient, args: argparse.Namespace) -> int:
    model = await api.request("POST", "/v1/unpin", body={"ref": args.ref})
    _out(args, model, f"unpinned {args.ref}")
    return EXIT_OK


async def _cmd_lease(api: ApiClient, args: argparse.Namespace) -> int:
    lease = await api.request("POST", "/v1/leases", body={"ref": args.ref, "holder": args.holder, "ttl_s": args.ttl})
    _out(args, lease, lease["lease_id"])
    return EXIT_OK


async def _cmd_release(api: ApiClient, args: argparse.Namespace) -> int:
    lease = await api.request("DELETE", f"/v1/leases/{args.lease_id}")
    _out(args, lease, f"released {args.lease_id}")
    return EXIT_OK


async def _cmd_replicate(api: ApiClient, args: argparse.Namespace) -> int:
    if args.replicas < 0:
        raise UsageError("--replicas must be 0 or more")
    entry = await api.request("POST", "/v1/replicate", body={"ref": args.ref, "replicas": args.replicas})
    _out(args, entry, f"{args.ref}: {args.replicas} replicas")
    return EXIT_OK


async def _cmd_locate(api: ApiClient, args: argparse.Namespace) -> int:
    loc = await api.request("GET", "/v1/locate", params={"ref": args.ref})
    lines = [
        f"{n['node_id']}\t{n['state']}\t{format_size(n['bytes_done'])}/{format_size(n['bytes_total'])}"
        + (f"\tzone={n['zone']}" if n.get("zone") else "")
        + (f"\track={n['rack']}" if n.get("rack") else "")
        for n in loc["nodes"]
    ]
    _out(args, loc, "\n".join(lines) or f"no node holds {args.ref}")
    return EXIT_OK


async def _cmd_peers(api: ApiClient, args: argparse.Namespace) -> int:
    peers = await api.request("GET", "/v1/peers")
    _out(args, peers, "\n".join(f"{p['node_id']}\t{p['address']}\t{p['state']}" for p in peers) or "no peers")
    return EXIT_OK


async def _cmd_verify(api: ApiClient, args: argparse.Namespace) -> int:
    body = {"ref": args.ref} if args.ref else {}
    report = await api.request("POST", "/v1/verify", body=body, long=True)
    human = f"checked {format_size(report['checked_bytes'])}, bad pieces: {report['bad_pieces']}, repaired blobs: {report['repaired_blobs']}"
    _out(args, report, human)
    for err in report["errors"]:
        print(f"cachectl: not repaired: {err}", file=sys.stderr)
    return EXIT_FAILED if report["errors"] else EXIT_OK


async def _cmd_gc(api: ApiClient, args: argparse.Namespace) -> int:
    result = await api.request("POST", "/v1/gc", body={}, long=True)
    _out(
        args,
        result,
        f"freed {format_size(result['freed_bytes'])}; evicted {len(result['evicted'])} model(s)"
        + "".join(f"\n  {r}" for r in result["evicted"]),
    )
    return EXIT_OK


def _human_model(m: dict[str, Any]) -> str:
    lines = [f"ref:      {m['ref']}", f"state:    {m['state']}"]
    if m["bytes_total"]:
        lines.append(f"progress: {format_size(m['bytes_done'])} / {format_size(m['bytes_total'])}")
    if m.get("path"):
        lines.append(f"path:     {m['path']}")
    if m.get("manifest"):
        lines.append(f"manifest: {m['manifest']}")
    lines.append(f"pinned:   {'yes' if m['pinned'] else 'no'}")
    lines.append(f"leases:   {', '.join(lease['holder'] for lease in m['leases']) or 'none'}")
    src = m.get("sources") or {}
    if any(src.values()):
        lines.append(f"sources:  origin {format_size(src.get('origin', 0))}, peers {format_size(src.get('peer', 0))}")
    if m.get("error"):
        lines.append(f"error:    {m['error']}")
    return "\n".join(lines)


def _human_node(n: dict[str, Any]) -> str:
    cap = n["capacity_bytes"] or 1
    lines = [
        f"node:      {n['node_id']} (cached {n['version']}, pid {n['pid']})",
        f"cache:     {n['cache_dir']}",
        f"used:      {format_size(n['used_bytes'])} of {format_size(n['capacity_bytes'])} ({100 * n['used_bytes'] / cap:.1f}%)",
        "models:    " + ", ".join(f"{k} {v}" for k, v in n["models"].items() if v)
        if any(n["models"].values())
        else "models:    none",
        f"claims:    {n['pins']} pinned, {n['leases']} leases",
    ]
    if n["transfers"]:
        lines.append("transfers:")
        for t in n["transfers"]:
            pct = 100 * t["bytes_done"] / t["bytes_total"] if t["bytes_total"] else 0
            lines.append(f"  {t['ref']}  {t['state']}  {pct:.0f}%  {format_size(t['rate_bps'])}/s")
    lines.append(f"peers:     {len(n['peers'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
