"""The Kubernetes manifests parse and agree with the daemon's routes, flags and annotations."""

from __future__ import annotations

from pathlib import Path

import pytest

from cached.daemon import build_parser

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extras (via huggingface_hub)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_daemonset_runs_on_the_host_network_with_the_token_from_a_secret() -> None:
    by_kind = {d["kind"]: d for d in docs("daemonset.yaml")}
    spec = by_kind["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    container = spec["containers"][0]
    # Every flag it passes is one the daemon accepts.
    parser = build_parser()
    parser.parse_args([a.replace("$(NODE_NAME)", "n").replace("$(NODE_IP)", "10.0.0.1") for a in container["args"]])
    secret_volumes = [v for v in spec["volumes"] if "secret" in v]
    assert secret_volumes and secret_volumes[0]["secret"]["secretName"] == "cached-token"
    config = by_kind["ConfigMap"]["data"]["config.toml"]
    assert 'token_file = "/etc/cached/token/token"' in config
    assert {"path": "/var/cache/cached", "type": "DirectoryOrCreate"} in [v.get("hostPath") for v in spec["volumes"]]


def test_scheduler_config_points_at_the_extender_routes() -> None:
    (config,) = docs("scheduler-config.yaml")
    (ext,) = config["extenders"]
    assert ext["urlPrefix"].endswith("/v1/k8s")
    assert (ext["filterVerb"], ext["prioritizeVerb"]) == ("filter", "prioritize")


def test_example_pod_names_its_model_in_the_annotation() -> None:
    (pod,) = docs("pod-example.yaml")
    assert pod["metadata"]["annotations"]["cached.io/model"].startswith("hf://")
