"""The deployment artefacts hold the trust model: the Kubernetes manifests parse, agree with the
daemon's flags, config keys and routes, and run it non-root, off the host network, without a
service-account token, with mutual TLS on the peer port; scripts/peer-tls makes certificates the
daemon's own TLS contexts accept from each other and refuse from anyone else."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from cached.config import load
from cached.daemon import build_parser, parse_config, tls_contexts
from cached.types import parse_size

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extras (via huggingface_hub)")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
UNIT = REPO / "systemd" / "cached.service"
PEER_TLS = REPO / "scripts" / "peer-tls"
# What the downward API would hand the DaemonSet's pod.
DOWNWARD = {"NODE_NAME": "gpu-01", "NODE_IP": "10.0.0.11", "POD_IP": "10.244.3.7"}


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in docs(name)}


def pod_spec() -> dict:
    return by_kind("daemonset.yaml")["DaemonSet"]["spec"]["template"]["spec"]


def daemon_container(spec: dict) -> dict:
    (c,) = [c for c in spec["containers"] if c["name"] == "cached"]
    return c


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args and env values."""
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], value)


def field_refs(container: dict) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container.get("env", []) if "valueFrom" in e}


def mounted_secret(spec: dict, container: dict, path: Path) -> tuple[str, str]:
    """(Secret name, key) that a file path in the container comes from; fails if it is not a Secret."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in container["volumeMounts"]:
        if path.parent == Path(m["mountPath"]) and "secret" in volumes[m["name"]]:
            assert m.get("readOnly") is True, m
            return volumes[m["name"]]["secret"]["secretName"], path.name
    raise AssertionError(f"{path} is not in a mounted Secret")


def daemon_config(tmp_path: Path) -> Any:
    """The Config the DaemonSet's pod would run with: its ConfigMap plus its args."""
    spec = pod_spec()
    container = daemon_container(spec)
    assert set(field_refs(container)) >= set(DOWNWARD)
    config = tmp_path / "config.toml"
    config.write_text(by_kind("daemonset.yaml")["ConfigMap"]["data"]["config.toml"])
    args = [expand(a, DOWNWARD) for a in container["args"] if not a.startswith("--config")]
    return parse_config(["--config", str(config), *args])


# --- the DaemonSet ------------------------------------------------------------------------------


def test_daemonset_runs_non_root_off_the_host_network_without_a_service_account_token() -> None:
    spec = pod_spec()
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    # The daemon never calls the API server: nothing in it knows the in-cluster API.
    assert spec["automountServiceAccountToken"] is False
    for path in (REPO / "cached").rglob("*.py"):
        assert not re.search(r"KUBERNETES_SERVICE|serviceaccount|kube-apiserver", path.read_text()), path
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0 and pod_sc["runAsGroup"] > 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}

    container = daemon_container(spec)
    sc = container["securityContext"]
    assert "runAsUser" not in sc and "runAsNonRoot" not in sc, "the pod's non-root user applies"
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # The same memory bound as the systemd unit.
    unit = {
        k: v
        for k, _, v in (
            line.partition("=") for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
        )
    }
    limit = container["resources"]["limits"]["memory"]
    assert parse_size(limit.removesuffix("i")) == parse_size(unit["MemoryMax"]), (limit, unit["MemoryMax"])

    # Only the one-off init container runs as root, with just what chown/chmod of the cache
    # directory need, and it hands the directory to the daemon's uid/gid.
    (init,) = spec["initContainers"]
    isc = init["securityContext"]
    assert isc["runAsUser"] == 0 and isc["allowPrivilegeEscalation"] is False and isc["readOnlyRootFilesystem"] is True
    assert isc["capabilities"]["drop"] == ["ALL"] and set(isc["capabilities"]["add"]) <= {
        "CHOWN",
        "FOWNER",
        "DAC_READ_SEARCH",
    }
    script = init["command"][-1]
    owner = f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}"
    assert f"chown -h {owner}" in script and 'chmod 0750 "$d"' in script and f"{owner}:750" in script
    assert [m["mountPath"] for m in init["volumeMounts"]] == ["/var/cache/cached"]

    # The image's user is the pod's.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"(?m)^USER {pod_sc['runAsUser']}:{pod_sc['runAsGroup']}$", dockerfile)


def test_daemonset_config_uses_mutual_tls_secrets_pod_ips_a_headless_seed_and_no_mdns(tmp_path: Path) -> None:
    spec = pod_spec()
    container = daemon_container(spec)
    cfg = daemon_config(tmp_path)

    assert cfg.discovery.mdns is False and "--no-mdns" in container["args"]
    # Mutual TLS on the peer port, every file from the same Secret.
    tls = [cfg.peer.tls_cert_file, cfg.peer.tls_key_file, cfg.peer.tls_ca_file]
    assert all(p is not None for p in tls)
    assert {mounted_secret(spec, container, p)[0] for p in tls} == {"cached-peer-tls"}
    assert sorted(mounted_secret(spec, container, p)[1] for p in tls) == ["ca.crt", "tls.crt", "tls.key"]
    # The cluster token and the admin token from Secrets.
    assert mounted_secret(spec, container, cfg.cluster.token_file) == ("cached-token", "token")
    assert mounted_secret(spec, container, cfg.api.admin_token_file) == ("cached-admin-token", "token")
    for v in spec["volumes"]:
        if "secret" in v:
            assert v["secret"]["defaultMode"] & 0o007 == 0, v  # not world-readable in the pod
    # The Secret files are root-owned; fsGroup makes them the daemon's group's.
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]

    # Peers: the pod IP, no hostPort; seeds: the headless Service, which lists unready pods too.
    assert field_refs(container)["POD_IP"] == "status.podIP" and field_refs(container)["NODE_IP"] == "status.hostIP"
    assert cfg.peer.advertise == f"{DOWNWARD['POD_IP']}:{cfg.peer.listen.port}"
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["peer"]["containerPort"] == cfg.peer.listen.port and "hostPort" not in ports["peer"]
    service = by_kind("daemonset.yaml")["Service"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == spec_labels()
    (seed,) = cfg.peer.seeds
    meta = service["metadata"]
    assert seed == f"{meta['name']}.{meta['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}"

    # The local API: published on the node IP by a hostPort, which the API accepts as Host.
    assert ports["api"]["containerPort"] == ports["api"]["hostPort"] == cfg.api.listen.port
    assert DOWNWARD["NODE_IP"] in cfg.api.allowed_hosts
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        get = probe["httpGet"]
        assert get["port"] == cfg.api.listen.port and "host" not in get
        assert {"name": "Host", "value": "localhost"} in get["httpHeaders"]
    assert cfg.store.cache_dir == Path("/var/cache/cached")
    assert {"path": "/var/cache/cached", "type": "DirectoryOrCreate"} in [v.get("hostPath") for v in spec["volumes"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_init_container_hands_a_root_owned_store_to_the_daemon_once(tmp_path: Path) -> None:
    """What a store left by the old root DaemonSet (or a fresh kubelet-made dir) becomes."""
    spec = pod_spec()
    uid, gid = spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]
    (init,) = spec["initContainers"]
    store = tmp_path / "cache"
    blob = store / "blobs" / "ab" / "ab12"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x")
    blob.chmod(0o444)
    (store / "models").mkdir()
    (store / "models" / "m.bin").hardlink_to(blob)
    store.chmod(0o755)
    script = init["command"][-1].replace("/var/cache/cached", str(store))

    def run() -> None:
        subprocess.run([*init["command"][:-1], script], check=True, timeout=60)

    run()
    for p in [store, *store.rglob("*")]:
        assert (p.stat().st_uid, p.stat().st_gid) == (uid, gid), p
    assert store.stat().st_mode & 0o777 == 0o750
    # Done once: a file that is root's afterwards (it would not be, but it shows the walk is skipped).
    (store / "later").write_bytes(b"")
    run()
    assert (store / "later").stat().st_uid == 0


def spec_labels() -> dict:
    return by_kind("daemonset.yaml")["DaemonSet"]["spec"]["selector"]["matchLabels"]


def test_every_daemonset_flag_is_one_the_daemon_accepts() -> None:
    for container in pod_spec()["containers"]:
        build_parser().parse_args([expand(a, DOWNWARD) for a in container["args"]])


# --- the example workload pod and the scheduler ---------------------------------------------------


def test_example_pod_reaches_the_api_on_the_node_ip_and_reads_models_through_the_group() -> None:
    (pod,) = docs("pod-example.yaml")
    assert pod["metadata"]["annotations"]["cached.io/model"].startswith("hf://")
    spec = pod["spec"]
    assert not spec.get("hostNetwork") and spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert field_refs(c)["NODE_IP"] == "status.hostIP"
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    ds = daemon_container(pod_spec())
    api_port = {p["name"]: p for p in ds["ports"]}["api"]["hostPort"]
    assert env["CACHED_API"] == f"http://$(NODE_IP):{api_port}"
    assert env["HF_ENDPOINT"] == f"http://$(NODE_IP):{api_port}/hf"
    # The store is closed to others: the pod reads it as a member of the daemon's group.
    assert pod_spec()["securityContext"]["runAsGroup"] in spec["securityContext"]["supplementalGroups"]
    assert all(m["readOnly"] is True for m in c["volumeMounts"])
    assert "Content-Type: application/json" in c["args"][0]


def test_scheduler_config_points_at_the_extender_routes() -> None:
    (config,) = docs("scheduler-config.yaml")
    (ext,) = config["extenders"]
    assert ext["urlPrefix"].endswith("/v1/k8s")
    assert (ext["filterVerb"], ext["prioritizeVerb"]) == ("filter", "prioritize")


# --- scripts/peer-tls ---------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/peer-tls needs the openssl command")


def peer_tls(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PEER_TLS), *map(str, args)], capture_output=True, text=True, timeout=60)


def tls_for(pki: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cfg = load(
        None,
        {
            "node_id": name,
            "peer.tls_cert_file": str(pki / f"{name}.crt"),
            "peer.tls_key_file": str(pki / f"{name}.key"),
            "peer.tls_ca_file": str(pki / "ca.crt"),
        },
        default_file=Path("/nonexistent"),
    )
    server, client = tls_contexts(cfg)
    assert server is not None and client is not None
    return server, client


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str | None:
    """A TLS handshake over loopback; the client's certificate CN as the server saw it, or None if refused."""
    seen: list[Any] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.append(dict(x[0] for x in tls.getpeercert()["subject"])["commonName"])
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as e:
                seen.append(e)

        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw) as tls:
                    tls.recv(2)  # TLS 1.3 reports a refused client certificate on the first read
        except (ssl.SSLError, OSError):
            pass
        t.join(timeout=20)
    (result,) = seen
    return result if isinstance(result, str) else None


@needs_openssl
def test_peer_tls_makes_a_ca_and_node_certificates_that_mutual_tls_accepts_and_is_idempotent(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    first = peer_tls("--dir", pki, "node", "gpu-01", "--ip", "10.0.0.11")
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout and (pki / "ca.key").exists()
    assert peer_tls("--dir", pki, "node", "gpu-02").returncode == 0
    # Private keys are for their owner alone; the directory too.
    for key in ("ca.key", "gpu-01.key", "gpu-02.key"):
        assert (pki / key).stat().st_mode & 0o777 == 0o600, key
    assert pki.stat().st_mode & 0o777 == 0o700

    # A second run keeps everything and says so.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in pki.iterdir()}
    again = peer_tls("--dir", pki, "node", "gpu-01", "--ip", "10.0.0.11")
    assert again.returncode == 0, again.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in pki.iterdir()} == before
    assert not re.search(r"(?m)^(created|reissued)", again.stdout), again.stdout
    assert peer_tls("--dir", pki, "check", "gpu-01").returncode == 0

    # The daemon's own contexts: two nodes of the cluster talk, both ways.
    a_server, a_client = tls_for(pki, "gpu-01")
    b_server, b_client = tls_for(pki, "gpu-02")
    assert handshake(a_server, b_client) == "gpu-02"
    assert handshake(b_server, a_client) == "gpu-01"

    # A certificate from another CA (same names, same script) is refused, as a client and as a server.
    other = tmp_path / "other"
    assert peer_tls("--dir", other, "node", "gpu-02").returncode == 0
    x_server, x_client = tls_for(other, "gpu-02")
    assert handshake(a_server, x_client) is None
    assert handshake(x_server, a_client) is None

    # --force reissues; the old certificate's key no longer matches the new one.
    forced = peer_tls("--dir", pki, "--force", "node", "gpu-02")
    assert forced.returncode == 0 and "reissued" in forced.stdout, forced.stdout + forced.stderr
    assert (pki / "gpu-02.key").read_bytes() != before["gpu-02.key"][1]


@needs_openssl
def test_peer_tls_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    for args in (["node", "../etc"], ["node"], ["--days", "ten", "node", "a"], ["frobnicate"]):
        ran = peer_tls("--dir", tmp_path / "pki", *args)
        assert ran.returncode != 0 and "Traceback" not in ran.stderr and ran.stderr.strip(), (args, ran.stderr)
    assert not (tmp_path / "pki" / "..").joinpath("etc.key").exists()
    usage = peer_tls("--help")
    assert usage.returncode == 0 and "install NAME" in usage.stdout
