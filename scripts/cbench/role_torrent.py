"""The BitTorrent side: the ``_seed`` role (the origin as the only initial seed) and the ``_leech``
role (one per node, trackerless, connecting to the origin and every other node explicitly), and
the model's ``.torrent``. libtorrent is imported only here, and only when used."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from cbench.channel import Control, emit
from cbench.common import BT_PORT


def make_torrent(path: Path, torrent: Path) -> None:
    """Write ``torrent`` for the file ``path``; nothing when libtorrent is not importable."""
    try:
        import libtorrent as lt
    except ImportError:
        return
    fs = lt.file_storage()
    lt.add_files(fs, str(path))
    ct = lt.create_torrent(fs)
    lt.set_piece_hashes(ct, str(path.parent))
    torrent.write_bytes(lt.bencode(ct.generate()))


def piece_length(torrent: Path) -> int:
    import libtorrent as lt

    return lt.torrent_info(str(torrent)).piece_length()


def lt_session(bind_ip: str) -> Any:
    import libtorrent as lt

    return lt.session(
        {
            "listen_interfaces": f"{bind_ip}:{BT_PORT}",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "dht_bootstrap_nodes": "",
            "enable_ip_notifier": False,
            "enable_incoming_utp": False,
            "enable_outgoing_utp": False,  # TCP, like cached and curl
            "alert_mask": 0,
            "user_agent": "cbench",
        }
    )


def add_torrent(ses: Any, ti: Any, save: Path, seed: bool) -> Any:
    import libtorrent as lt

    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(save)
    if seed:
        atp.flags |= lt.torrent_flags.seed_mode  # the origin has the file; skip re-hashing it
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    return ses.add_torrent(atp)


def role_seed(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_seed")
    p.add_argument("--torrent", type=Path, required=True)
    p.add_argument("--save", type=Path, required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--max-seconds", type=float, default=1800)
    a = p.parse_args(argv)
    import libtorrent as lt

    ses = lt_session(a.bind)  # held for the whole run: the handle dies with its session
    h = add_torrent(ses, lt.torrent_info(str(a.torrent)), a.save, seed=True)
    control = Control()
    deadline = time.monotonic() + a.max_seconds
    emit({"ready": True})
    while not control.quit.is_set() and time.monotonic() < deadline:
        s = h.status()
        tmp = a.stats.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"t": time.monotonic(), "bytes": s.total_payload_upload, "wire": s.total_upload, "peers": s.num_peers}
            )
        )
        os.replace(tmp, a.stats)
        control.quit.wait(0.2)


def role_leech(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_leech")
    p.add_argument("--torrent", type=Path, required=True)
    p.add_argument("--save", type=Path, required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--peers", required=True, help="ip,ip,... to connect to (port 6881)")
    p.add_argument("--max-seconds", type=float, default=1800)
    a = p.parse_args(argv)
    import libtorrent as lt

    ses = lt_session(a.bind)
    ti = lt.torrent_info(str(a.torrent))
    control = Control()
    deadline = time.monotonic() + a.max_seconds
    emit({"ready": True})
    if not control.wait_go(deadline):
        return
    t_go = time.monotonic()
    h = add_torrent(ses, ti, a.save, seed=False)
    peers = [(ip, BT_PORT) for ip in a.peers.split(",") if ip]
    for peer in peers:
        h.connect_peer(peer)
    leech(h, peers, control, deadline, t_go)
    s = h.status()
    emit({"final": True, "down": s.total_payload_download, "up": s.total_payload_upload})


def leech(h: Any, peers: list[tuple[str, int]], control: Control, deadline: float, t_go: float) -> None:
    """Report ``done`` once finished; keep seeding to the others until told to quit (or deadline)."""
    import libtorrent as lt

    done_sent = False
    last_connect = time.monotonic()
    while not control.quit.is_set() and time.monotonic() < deadline:
        s = h.status()
        if not done_sent and s.is_finished and s.state in (lt.torrent_status.seeding, lt.torrent_status.finished):
            emit(
                {
                    "done": True,
                    "t_go": t_go,
                    "t_done": time.monotonic(),
                    "down": s.total_payload_download,
                    "up": s.total_payload_upload,
                }
            )
            done_sent = True
        if time.monotonic() - last_connect > 2.0 and s.num_peers < len(peers):
            for peer in peers:  # a dropped or refused early connection: try again (bounded by deadline)
                h.connect_peer(peer)
            last_connect = time.monotonic()
        control.quit.wait(0.05)
