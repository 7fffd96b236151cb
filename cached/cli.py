"""``cachectl``: the operator's and launcher's command line for the local API.

Exit codes (CONTRACT): 0 success, 1 the operation failed (message on stderr), 2 usage error,
3 the daemon is unreachable. ``--json`` prints exactly one JSON document on stdout.

Admin commands (``evict --force``, ``pin``, ``unpin``, ``replicate``, ``gc``, ``verify``) send the
admin token from ``--admin-token-file``, else ``$CACHED_ADMIN_TOKEN_FILE``, else the daemon's
``api.admin_token_file`` in /etc/cached/config.toml when this user can read it. Without one the
daemon answers 401/403 (exit 1, with its message), unless the unix socket admits the caller.

``run`` (prefetch, lease, launch an engine) is split out: ``cached.cli_run`` runs the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import time
import tomllib
from typing import Any, NoReturn

import yarl

from cached import __version__, cli_run
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
    p.add_argument("--version", action="version", version=f"cachectl (cached) {__version__}")
    p.add_argument("--api", help="http://HOST:PORT, HOST:PORT or unix:/path (default $CACHED_API, then 127.0.0.1:7470)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[common], description=help_)

    c = cmd("status", "one model, or the node summary")
    c.add_argument("ref", nargs="?")
    c = cmd("ls", "models known on this node")
    c.add_argument("--all", action="store_true", help="also failed prefetches the daemon no longer lists")
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
    c = cmd("run", "make REF ready, lease it, and run a command on it: cachectl run REF [options] -- CMD [ARG...]")
    c.add_argument("ref")
    c.add_argument("--holder", default=None, help="who holds the lease (default: the command, host and pid)")
    c.add_argument(
        "--ttl",
        type=float,
        default=RUN_TTL_S,
        metavar="S",
        help=f"lease TTL, renewed every TTL/3 while the command runs (default {RUN_TTL_S:g})",
    )
    c.add_argument("--timeout", type=float, default=None, metavar="S", help="give up waiting for REF after S seconds")
    c.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    return p


# `cachectl run`'s lease: renewed while the command runs, so it can be short; if cachectl itself
# is killed (SIGKILL), the model is free again within this time.
RUN_TTL_S = 120.0


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


def split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(cachectl's own arguments, the command after the first ``--`` or None). The command is
    never parsed by cachectl: its options (``--help``, ``--port``) are its own."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def check_api_address(addr: str, source: str) -> None:
    """A usage error naming ``addr`` and what is wrong with it, before any connection."""
    hint = "use http://HOST:PORT, HOST:PORT or unix:/path"
    try:
        base, unix = parse_address(addr)
    except ValueError:
        raise UsageError(f"{source} {addr!r} is not an API address; {hint}") from None
    if unix is not None:
        if not unix:
            raise UsageError(f"{source} {addr!r} names no socket path; {hint}")
        return
    try:
        url = yarl.URL(base)
        port = url.port
    except ValueError as e:
        raise UsageError(f"{source} {addr!r} is not an API address ({e}); {hint}") from None
    if not url.host or port is None or url.path not in ("", "/"):
        raise UsageError(f"{source} {addr!r} is not an API address (it needs a host and port and no path); {hint}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    own, command = split_command(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(own)
    args.json = getattr(args, "json", False)
    args.admin_token_file = getattr(args, "admin_token_file", None)
    if args.command == "run":
        if not command:
            parser.error("run needs a command after '--': cachectl run REF [options] -- CMD [ARG...]")
        args.run_command = command
    elif command is not None:
        parser.error(f"{args.command} takes no command after '--' (only run does)")
    addr = args.api or os.environ.get("CACHED_API") or DEFAULT_API_LISTEN
    source = "--api" if args.api else ("$CACHED_API" if os.environ.get("CACHED_API") else "the default address")
    try:
        check_api_address(addr, source)
        if args.command == "run":
            _check_run_args(args)
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
    # --all: the daemon also lists failed prefetches it has stopped listing (issue 17).
    models = await api.request("GET", "/v1/models", params={"all": "1"} if args.all else None)
    if args.json:
        _out(args, models, "")
        return EXIT_OK
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    print(ls_table(models, width) if models else "no models")
    return EXIT_OK


LS_COLUMNS = ("REF", "STATE", "SIZE", "DONE", "PIN", "LEASES")
MIN_REF_WIDTH = 24


def ls_table(models: list[dict[str, Any]], width: int | None) -> str:
    """``ls`` as aligned columns. With ``width`` (a terminal) refs too long for it are shortened
    to their scheme and their tail, where refs of one repo differ (``@rev``, ``?include=``);
    without (a pipe or file) nothing is cut, so scripts see whole refs."""
    rows = [
        [
            m["ref"],
            m["state"],
            format_size(m["bytes_total"]),
            f"{100 * m['bytes_done'] / m['bytes_total']:.0f}%" if m["bytes_total"] else "-",
            "yes" if m["pinned"] else "",
            str(len(m["leases"])),
        ]
        for m in models
    ]
    widths = [max(len(r[i]) for r in [list(LS_COLUMNS), *rows]) for i in range(len(LS_COLUMNS))]
    if width is not None:
        room = max(MIN_REF_WIDTH, width - sum(w + 2 for w in widths[1:]))
        if widths[0] > room:
            widths[0] = room
            for r in rows:
                r[0] = shorten_ref(r[0], room)
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in [LS_COLUMNS, *rows]
    ]
    return "\n".join(lines)


def shorten_ref(ref: str, width: int) -> str:
    """``ref`` in ``width`` characters: the scheme, an ellipsis, and as much of the tail as fits."""
    if len(ref) <= width:
        return ref
    scheme = ref[: ref.index("://") + 3] if "://" in ref else ""
    keep = width - len(scheme) - 1
    if keep < 8:
        scheme, keep = "", width - 1
    return f"{scheme}…{ref[-keep:]}"


async def _cmd_prefetch(api: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"ref": args.ref, "priority": args.priority}
    if args.refresh:
        body["refresh"] = True
    if args.include or args.exclude:
        body.update(include=args.include, exclude=args.exclude)
        try:
            args.ref = ModelRef.parse(args.ref).with_patterns(args.include, args.exclude).canonical
        except RefError as e:
            # The daemon would answer 400 bad_ref with the same reason: a usage error, exit 2.
            raise UsageError(f"--include/--exclude: {e.message}") from None
    if not args.wait:
        model = await api.request("POST", "/v1/prefetch", body=body)
        _out(args, model, f"{model['ref']}: {model['state']}")
        return EXIT_OK
    model = await _prefetch_and_wait(api, args, body)
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


async def _prefetch_and_wait(api: ApiClient, args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    """The model once ready (or once waiting ended): a bar on a terminal, quiet otherwise."""
    if sys.stderr.isatty() and not args.json:
        return await _prefetch_with_bar(api, args, body)
    body = {**body, "wait": True}
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    return await api.request("POST", "/v1/prefetch", body=body)


async def _prefetch_with_bar(api: ApiClient, args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class BinarySpeedColumn(ProgressColumn):
        # rich's TransferSpeedColumn speaks MB/s; `status` and the bar's sizes speak MiB.
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{format_size(speed)}/s", style="progress.data.speed")

    deadline = time.monotonic() + args.timeout if args.timeout else None
    await api.request("POST", "/v1/prefetch", body=body)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        BinarySpeedColumn(),
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
        arriving = f" (+{format_size(m['bytes_in_flight'])} arriving)" if m.get("bytes_in_flight") else ""
        lines.append(f"progress: {format_size(m['bytes_done'])} / {format_size(m['bytes_total'])}{arriving}")
    if m.get("partial"):
        # A repo pulled file by file through /hf: which of its files are here, which are not.
        missing = m.get("files_missing")
        lines.append(f"partial:  {len(m['files_held'])} files held" + (", listing unknown" if missing is None else ""))
        lines.extend(f"  held     {f}" for f in m["files_held"])
        lines.extend(f"  missing  {f}" for f in missing or ())
    if m.get("path"):
        lines.append(f"path:     {m['path']}")
    if m.get("manifest"):
        lines.append(f"manifest: {m['manifest']}")
    lines.append(f"pinned:   {'yes' if m['pinned'] else 'no'}")
    lines.append(f"leases:   {', '.join(lease['holder'] for lease in m['leases']) or 'none'}")
    if m.get("replicas"):
        r = m["replicas"]
        owners = ", ".join(r.get("owners") or []) or "none alive"
        spare = "; this copy is spare" if r.get("spare") else ""
        lines.append(f"replicas: {r['target']} wanted, owners {owners}{spare}")
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
        *([f"warning:   {n['capacity_warning']}"] if n.get("capacity_warning") else []),
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


def _check_run_args(args: argparse.Namespace) -> None:
    """Everything ``run`` can refuse before it prefetches anything (exit 2)."""
    if not 1 <= args.ttl <= 7 * 24 * 3600:
        raise UsageError("--ttl must be between 1 and 604800 seconds")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    program = args.run_command[0]
    if shutil.which(program) is None:
        raise UsageError(f"run: command not found or not executable: {program}")
    if args.holder is None:
        args.holder = f"{os.path.basename(program)}@{socket.gethostname()} (cachectl run, pid {os.getpid()})"
    if not args.holder or len(args.holder) > 256:
        raise UsageError("--holder must be 1 to 256 characters")


async def _cmd_run(api: ApiClient, args: argparse.Namespace) -> int:
    model = await _prefetch_and_wait(api, args, {"ref": args.ref, "priority": args.priority})
    if model["state"] != "ready":
        why = f": {model['error']}" if model.get("error") else ""
        print(
            f"cachectl: {args.ref} is not ready ({model['state']}{why}); not starting {args.run_command[0]}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    lease = await api.request("POST", "/v1/leases", body={"ref": args.ref, "holder": args.holder, "ttl_s": args.ttl})
    return await cli_run.run_command(
        api, ref=args.ref, holder=args.holder, ttl_s=args.ttl, command=args.run_command, lease=lease
    )


if __name__ == "__main__":
    main()
