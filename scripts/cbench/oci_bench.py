"""The OCI scenario (``--scenario oci``): N nodes pull the same artifact with skopeo, through their
local cached ``/v2`` mirror versus each straight from the registry, in the same run.

The cluster is the swarm scenario's (``cbench.netns``: a switch namespace, ``cbench-origin`` shaped
to ``--origin-rate``, ``cbench-nI`` shaped to ``--node-rate``, nothing in the host's namespace). In
``cbench-origin`` runs Debian's ``docker-registry`` (plain HTTP on 198.18.0.1:5000, storage under
WORKDIR); the artifact -- a ModelPack-style manifest with one raw ``--size`` layer and a small
config -- is written as an OCI layout and pushed with ``skopeo copy`` from inside that namespace
(over its own loopback: the shaped link carries only the pulls).

  mirror   one cached daemon per node (API on 127.0.0.1:7070 inside its namespace, ``--no-mdns``,
           seeded from node 1, ``origins.oci.default_registry`` = the registry); every node runs
           ``skopeo copy docker://127.0.0.1:7070/models/big:v1 oci:DIR`` at once.
  direct   every node runs ``skopeo copy docker://198.18.0.1:5000/models/big:v1 oci:DIR`` at once.

  client floor  before either, with no network: every node namespace runs its own
           ``docker-registry`` on its loopback (127.0.0.1:5001) over its own copy of the pushed
           storage (N distinct files, as N mirrors serve N blobs), and every
           node runs ``skopeo copy docker://127.0.0.1:5001/models/big:v1 oci:DIR`` at once: what N
           concurrent pulls of the artifact from a local registry cost this machine's CPUs.

``--methods`` picks the methods (``cached`` = mirror, ``direct``; default both; ``torrent`` has no
meaning here and is skipped): ``--methods cached`` is a quick run without the direct pull.

skopeo checks every blob against its digest; the driver also compares each node's copy of the
layer with the pushed sha256. Reported per method: wall time from the common start until every
skopeo exited 0, per-node times, the registry's bytes on the wire (the origin veth's counter, TCP/IP
headers included) against the artifact size, and the wall time against the network lower bound
(mirror: max(size/origin rate, size/node rate); direct: nodes x size / origin rate). The mirror
row has a second bound, network bound + client floor: the mirror serves a blob only once it is
complete and verified whole, so a client's copy cannot overlap the fetch and starts after it; on a
machine where all N clients share the CPUs (one host running every namespace), their concurrent
copy is part of any lower bound for a verify-then-serve mirror. The direct row streams from the
registry while it copies, so it keeps the network bound alone. Needs root, ``ip``, ``tc``,
``curl``, ``docker-registry`` and ``skopeo``. Namespaces are removed on every exit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbench.common import ORIGIN_IP, ORIGIN_NS, PEER_PORT, REPO, fmt_size, log, node_ip, node_ns
from cbench.netns import our_namespaces, setup_network, switch_counters, teardown_network

REGISTRY = f"{ORIGIN_IP}:5000"
LOCAL_REGISTRY = "127.0.0.1:5001"  # the client floor's registry, on each node's own loopback
MIRROR = "127.0.0.1:7070"  # each node's own loopback, inside its namespace
IMAGE = "models/big:v1"
CONFIG = b'{"descriptor": {"name": "cbench"}}'


@dataclass
class Result:
    method: str
    ok: bool = False
    wall_s: float = 0.0
    node_s: list[float | None] = field(default_factory=list)
    registry_wire: int = 0
    lower_bound_s: float = 0.0
    client_floor_s: float = 0.0  # the mirror's: N concurrent pulls from local registries (0: not measured)
    notes: list[str] = field(default_factory=list)


def ns_run(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


def write_layout(root: Path, size: int) -> str:
    """An OCI layout holding ``IMAGE``'s tag: one raw layer of ``size`` random bytes; its sha256."""
    shutil.rmtree(root, ignore_errors=True)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp = blobs / "layer.tmp"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    layer = h.hexdigest()
    tmp.rename(blobs / layer)

    def put(data: bytes) -> dict[str, Any]:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": f"sha256:{d}", "size": len(data)}

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.model.config.v1+json", **put(CONFIG)},
        "layers": [
            {
                "mediaType": "application/vnd.cncf.model.weight.v1.raw",
                "digest": f"sha256:{layer}",
                "size": size,
                "annotations": {"org.cncf.model.filepath": "model.safetensors"},
            }
        ],
    }
    m = put(json.dumps(manifest, separators=(",", ":")).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                **m,
                "annotations": {"org.opencontainers.image.ref.name": IMAGE.split(":")[1]},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layer


def start_registry(
    work: Path, ns: str = ORIGIN_NS, addr: str = REGISTRY, fresh: bool = True, name: str = "registry"
) -> subprocess.Popen[bytes]:
    """``docker-registry`` in namespace ``ns`` on ``addr``, storage under WORKDIR/``name`` (made
    empty when ``fresh``; the client floor's registries serve copies of what the push stored)."""
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        raise SystemExit("bench-cluster oci: docker-registry not found (apt-get install docker-registry)")
    root = work / name
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    conf = root / f"config-{ns}.yml"
    conf.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: {addr}\n"
    )
    logf = open(work / "logs" / f"registry-{ns}.log", "wb")  # noqa: SIM115 - inherited by the child
    proc = subprocess.Popen(["ip", "netns", "exec", ns, binary, "serve", str(conf)], stdout=logf, stderr=logf)
    for _ in range(200):  # 20 s at most
        if ns_run(ns, "curl", "-sf", f"http://{addr}/v2/", timeout=10).returncode == 0:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"the registry did not start; see {work / 'logs' / f'registry-{ns}.log'}")


def push(layout: Path) -> None:
    r = ns_run(
        ORIGIN_NS,
        "skopeo",
        "--insecure-policy",
        "copy",
        "--dest-tls-verify=false",
        f"oci:{layout}:{IMAGE.split(':')[1]}",
        f"docker://{REGISTRY}/{IMAGE}",
        timeout=1800,
    )
    if r.returncode != 0:
        raise RuntimeError(f"skopeo push failed: {r.stderr[-2000:]}")


def start_daemons(a: argparse.Namespace, base: Path) -> list[subprocess.Popen[bytes]]:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    token = base / "token"
    token.write_text(hashlib.sha256(os.urandom(32)).hexdigest() + "\n")
    token.chmod(0o600)
    conf = base / "cached.toml"
    conf.write_text(
        f"[peer]\ngossip_interval_s = {a.gossip_interval}\n"
        f'[origins.oci]\nplain_http = ["{REGISTRY}"]\ndefault_registry = "{REGISTRY}"\n'
        '[log]\nlevel = "info"\n'
    )
    kids = []
    for i in range(1, a.nodes + 1):
        cmd = [
            str(a.cached_python),
            "-m",
            "cached",
            "--config",
            str(conf),
            "--node-id",
            f"n{i}",
            "--cache-dir",
            str(base / f"n{i}"),
            "--api-listen",
            MIRROR,
            "--peer-listen",
            f"{node_ip(i)}:{PEER_PORT}",
            "--advertise",
            f"{node_ip(i)}:{PEER_PORT}",
            "--cluster-token-file",
            str(token),
            "--no-mdns",
            "--piece-size",
            str(a.piece_size),
        ]
        if i != 1:
            cmd += ["--seed", f"{node_ip(1)}:{PEER_PORT}"]
        logf = open(a.workdir / "logs" / f"oci-n{i}.log", "wb")  # noqa: SIM115 - inherited by the child
        # The daemons run this checkout's cached/ (the one the driver sits in), whatever the venv holds.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        kids.append(subprocess.Popen(["ip", "netns", "exec", node_ns(i), *cmd], stdout=logf, stderr=logf, env=env))
    return kids


def wait_converged(nodes: int, kids: list[subprocess.Popen[bytes]]) -> None:
    """Every node's API answers and lists the n-1 others alive (polled every 0.2 s, at most 60 s)."""
    for _ in range(300):
        if any(k.poll() is not None for k in kids):
            raise RuntimeError("a cached daemon exited at start; see the oci-n*.log files")
        alive = []
        for i in range(1, nodes + 1):
            r = ns_run(node_ns(i), "curl", "-sf", f"http://{MIRROR}/v1/peers", timeout=10)
            try:
                peers = json.loads(r.stdout) if r.returncode == 0 else []
            except ValueError:
                peers = []
            alive.append(sum(1 for p in peers if p.get("state") == "alive" and p.get("node_id") != f"n{i}"))
        if min(alive) >= nodes - 1:
            return
        time.sleep(0.2)
    raise TimeoutError(f"gossip did not converge: alive peers per node {alive}")


def origin_sent() -> int:
    return switch_counters().get("s-origin", (0, 0))[0]  # rx on the switch side = what the origin sent


def pull_all(a: argparse.Namespace, source: str, out: Path, layer: str, res: Result) -> None:
    """Every node's skopeo copy of ``source`` (``docker://...``) at once; the method's times, bytes
    and verdict into ``res``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # What earlier steps wrote (the push, the floor's registry copies) is flushed first, so its
    # writeback does not land in this measurement.
    os.sync()
    before = origin_sent()
    t0 = time.monotonic()
    procs = []
    for i in range(1, a.nodes + 1):
        cmd = ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", source, f"oci:{out / f'n{i}'}"]
        procs.append(
            subprocess.Popen(["ip", "netns", "exec", node_ns(i), *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    deadline = t0 + a.timeout
    done: list[float | None] = [None] * a.nodes
    oks = [False] * a.nodes
    while any(d is None for d in done) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if done[i] is None and p.poll() is not None:
                done[i] = time.monotonic() - t0
                oks[i] = p.returncode == 0
                if not oks[i]:
                    res.notes.append(f"n{i + 1}: {p.stderr.read().decode()[-500:] if p.stderr else ''}")
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    res.registry_wire = origin_sent() - before
    res.node_s = done
    res.wall_s = max((d for d in done if d is not None), default=0.0)

    def check(i: int) -> bool:
        path = out / f"n{i}" / "blobs" / "sha256" / layer
        if not path.is_file():
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest() == layer

    with ThreadPoolExecutor(4) as pool:
        same = list(pool.map(check, range(1, a.nodes + 1)))
    if not all(same):
        res.notes.append(
            f"layer copies that do not match the pushed sha256: {[i + 1 for i, s in enumerate(same) if not s]}"
        )
    res.ok = all(oks) and all(d is not None for d in done) and all(same)
    shutil.rmtree(out, ignore_errors=True)


def stop(kids: list[subprocess.Popen[bytes]]) -> None:
    for k in kids:
        if k.poll() is None:
            k.terminate()
    for k in kids:
        try:
            k.wait(20)
        except subprocess.TimeoutExpired:
            k.kill()
            k.wait()


def report(a: argparse.Namespace, results: list[Result], floor: Result | None = None) -> str:
    rows = [
        f"OCI artifact {fmt_size(a.size)}, {a.nodes} nodes, registry link {a.origin_rate / 1e6:.0f} Mbit/s, "
        f"node links {a.node_rate / 1e6:.0f} Mbit/s",
        "",
        "| method | ok | wall s | network bound s | wall / bound | wall / (bound + client floor) "
        "| registry wire bytes | x artifact | slowest node s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bound = r.lower_bound_s or 1e-9
        second = f"{r.wall_s / (bound + r.client_floor_s):.2f}" if r.client_floor_s else "-"
        rows.append(
            f"| {r.method} | {'yes' if r.ok else 'NO'} | {r.wall_s:.1f} | {r.lower_bound_s:.1f} | "
            f"{r.wall_s / bound:.2f} | {second} | {fmt_size(r.registry_wire)} | {r.registry_wire / a.size:.3f} | "
            f"{max((s for s in r.node_s if s is not None), default=0):.1f} |"
        )
    rows.append("")
    if floor is not None:
        rows.append(
            f"client floor: {a.nodes} concurrent `skopeo copy` pulls, each from a docker-registry on its "
            f"node's own loopback (no network): {floor.wall_s:.1f} s ({'ok' if floor.ok else 'FAILED'})"
        )
        rows.append(
            "second bound (mirror): network bound + client floor. The mirror serves a blob only once it is "
            "verified whole, so no client's copy can overlap the fetch; with all clients on the same CPUs "
            "their concurrent copy is part of any lower bound. The direct pull streams while it copies."
        )
    rows.append("registry wire bytes: the origin veth counter, TCP/IP headers included")
    for r in [*results, *([floor] if floor is not None else [])]:
        rows += [f"- {r.method}: {n}" for n in r.notes]
    return "\n".join(rows)


def oci_methods(a: argparse.Namespace) -> list[str]:
    """``--methods`` as this scenario's methods, in the order given: cached (the mirror), direct."""
    names = {"cached": "mirror", "direct": "direct"}
    picked = [names[m] for m in a.methods if m in names]
    return list(dict.fromkeys(picked)) or ["mirror", "direct"]


def client_floor(a: argparse.Namespace, out: Path, layer: str) -> Result:
    """The same N concurrent pulls, each from a registry on its node's own loopback: what the
    clients (and a fast local server) cost this machine, with no network in the way."""
    local: list[subprocess.Popen[bytes]] = []
    copies = [a.workdir / f"registry-n{i}" for i in range(1, a.nodes + 1)]
    try:
        for i, copy in enumerate(copies, 1):
            # Each node serves its own copy, as each mirror serves its own store's blob: N distinct
            # files in the page cache, not one shared file.
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(a.workdir / "registry" / "data", copy / "data")
            local.append(start_registry(a.workdir, node_ns(i), LOCAL_REGISTRY, fresh=False, name=copy.name))
        floor = Result("client floor (local registries)")
        log("oci: client floor (every node pulls from a registry on its own loopback, at once)")
        pull_all(a, f"docker://{LOCAL_REGISTRY}/{IMAGE}", out, layer, floor)
        return floor
    finally:
        stop(local)
        for copy in copies:
            shutil.rmtree(copy, ignore_errors=True)


def run_oci(a: argparse.Namespace) -> int:
    """The scenario, its safety net (namespaces and children removed on every exit) and report."""
    for tool in ("skopeo",):
        if shutil.which(tool) is None:
            log(f"oci: '{tool}' not found (apt-get install {tool})")
            return 2
    work = a.workdir / "oci"
    (a.workdir / "logs").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if our_namespaces():
        # Another run (maybe another user's benchmark) owns them: never tear down what is not ours.
        log(
            f"oci: namespaces {our_namespaces()} exist; is another bench-cluster running? (scripts/bench-cluster cleans up)"
        )
        return 2
    kids: list[subprocess.Popen[bytes]] = []
    registry = None
    results: list[Result] = []
    floor = None
    methods = oci_methods(a)
    try:
        log(f"oci: writing a {fmt_size(a.size)} artifact")
        layer = write_layout(work / "layout", a.size)
        setup_network(a.nodes, a.origin_rate, a.node_rate)
        registry = start_registry(a.workdir)
        push(work / "layout")
        shutil.rmtree(work / "layout", ignore_errors=True)
        if "mirror" in methods:
            floor = client_floor(a, work / "out", layer)
        for method in methods:
            if method == "mirror":
                log("oci: starting cached daemons")
                kids = start_daemons(a, work / "nodes")
                wait_converged(a.nodes, kids)
                mirror = Result("mirror (cached)")
                mirror.lower_bound_s = max(a.size * 8 / a.origin_rate, a.size * 8 / a.node_rate)
                mirror.client_floor_s = floor.wall_s if floor is not None and floor.ok else 0.0
                log("oci: mirror pull")
                pull_all(a, f"docker://{MIRROR}/{IMAGE}", work / "out", layer, mirror)
                results.append(mirror)
                stop(kids)
                kids = []
            else:
                direct = Result("direct (registry)")
                direct.lower_bound_s = a.nodes * a.size * 8 / a.origin_rate
                log("oci: direct pull")
                pull_all(a, f"docker://{REGISTRY}/{IMAGE}", work / "out", layer, direct)
                results.append(direct)
    finally:
        stop(kids)
        if registry is not None:
            stop([registry])
        teardown_network()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(a.workdir / "registry", ignore_errors=True)
    text = report(a, results, floor)
    print(text)
    out = a.out or a.workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "oci.md").write_text(text + "\n")
    with open(out / "oci.jsonl", "a") as f:
        record = {"size": a.size, "nodes": a.nodes, "results": [r.__dict__ for r in results]}
        record["client_floor"] = floor.__dict__ if floor is not None else None
        f.write(json.dumps(record) + "\n")
    return 0 if all(r.ok for r in results) and (floor is None or floor.ok) else 1
