"""A self-signed certificate for a node on 127.0.0.1, made with the openssl command, for tests
that need a TLS listener without a cluster CA (``tests/integration/test_peer_tls.py`` builds one)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(d: Path) -> tuple[Path, Path]:
    """(certificate, key) in ``d``: CN=node, IP SAN 127.0.0.1, valid two days."""
    d.mkdir(parents=True, exist_ok=True)
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out", "c.pem"]
    subj = ["-days", "2", "-subj", "/CN=node", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run([*cmd, *subj], check=True, capture_output=True, cwd=d)
    return d / "c.pem", d / "k.pem"
