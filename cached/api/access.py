"""Who is calling the local API, and what they may do: callers, admin credentials, local Hosts.

A ``Caller`` is what the kernel says about the other end of a connection: on the unix socket its
uid, gid and pid from ``SO_PEERCRED``; over TCP from loopback the uid that owns the client socket
in ``/proc/net/tcp{,6}`` (the identd technique; same network namespace only). Anything else is an
unknown caller. Identity is used for two things only: which files a ``file://`` import may read
(``cached.origins.local``), and whether a unix-socket caller counts as an admin.

Admin routes need the bearer token of ``api.admin_token_file`` (compared in constant time) or a
unix-socket caller that is root, the daemon's own uid, or a member of ``api.admin_group``. A TCP
caller is never an admin by identity alone: a browser runs as a local user too.

This module decides; ``cached.api.local`` maps its refusals to 401/403/421 answers.
"""

from __future__ import annotations

import grp
import hmac
import ipaddress
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yarl import URL

from cached.config import MIN_TOKEN_CHARS, read_secret
from cached.errors import CachedError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1", "ip6-localhost"})


class Unauthenticated(CachedError):
    code = "admin_required"


class Forbidden(CachedError):
    code = "forbidden"


class MisdirectedHost(CachedError):
    code = "host_not_allowed"


class ForeignOrigin(CachedError):
    code = "origin_not_allowed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """The other end of one connection. ``uid`` None: unknown (TCP from elsewhere)."""

    uid: int | None
    gids: frozenset[int] = frozenset()
    pid: int | None = None
    unix: bool = False

    @property
    def known(self) -> bool:
        return self.uid is not None

    def describe(self) -> str:
        if self.uid is None:
            return "an unidentified TCP caller"
        return (
            f"uid {self.uid}"
            + (f" (pid {self.pid})" if self.pid else "")
            + (" on the unix socket" if self.unix else " over loopback TCP")
        )


UNKNOWN = Caller(uid=None)


def read_admin_token(path: Path | None) -> str | None:
    """The admin token from ``api.admin_token_file`` (read once, at start)."""
    if path is None:
        return None
    return read_secret(path, "api.admin_token_file", min_chars=MIN_TOKEN_CHARS)


# --- who is calling ------------------------------------------------------------------------------


def caller_of(transport: Any) -> Caller:
    """The caller on ``transport`` (an asyncio transport); UNKNOWN when the kernel cannot say."""
    if transport is None:
        return UNKNOWN
    sock = transport.get_extra_info("socket")
    if sock is None:
        return UNKNOWN
    if sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return UNKNOWN
        pid, uid, gid = struct.unpack("3i", raw)
        return Caller(uid=uid, gids=_groups(pid, uid, gid), pid=pid, unix=True)
    peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not peer or not local or not _loopback(peer[0]):
        return UNKNOWN
    uid = _tcp_owner(sock.family, peer, local)
    if uid is None:
        return UNKNOWN
    return Caller(uid=uid, gids=_groups(None, uid, None))


def _loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _proc_addr(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host byte order, in hex."""
    if family == socket.AF_INET:
        words = struct.unpack("=I", socket.inet_aton(host))
    else:
        words = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0]))
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _tcp_owner(family: int, peer: tuple[Any, ...], local: tuple[Any, ...]) -> int | None:
    """The uid owning the client end of this loopback connection: asked of the kernel for that
    one socket (sock_diag), else found in /proc/net/tcp{,6}."""
    try:
        return _diag_owner(family, peer, local)
    except OSError:
        pass
    table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    try:
        want = f" {_proc_addr(family, peer[0], peer[1])} {_proc_addr(family, local[0], local[1])} ".encode()
        with open(table, "rb") as f:
            data = f.read()
        at = data.find(want)
        if at < 0:
            return None
        # local, remote, state, queues, timer, retransmits, uid
        cols = data[at : data.find(b"\n", at)].split()
        return int(cols[6]) if len(cols) > 6 else None
    except (OSError, ValueError):
        return None


_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF


def _diag_owner(family: int, peer: tuple[Any, ...], local: tuple[Any, ...]) -> int | None:
    """One sock_diag request (netlink, inet_diag_req_v2) for the exact 4-tuple of the client's
    socket. Reading all of /proc/net/tcp instead cost ~2 ms of the event loop per new connection
    with a few hundred open, which two hundred launchers connecting at once turned into stalls."""

    def addr(host: str) -> bytes:  # idiag_src/idiag_dst: 16 bytes, an IPv4 address first
        return socket.inet_pton(family, host.split("%", 1)[0]).ljust(16, b"\0")

    sockid = (
        struct.pack("!HH", peer[1], local[1])
        + addr(peer[0])
        + addr(local[0])
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.settimeout(1.0)
        nl.send(msg)
        reply = nl.recv(8192)
    if len(reply) < 16:
        raise OSError("short sock_diag answer")
    _length, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", reply, 16)
        if err == -2:  # ENOENT: no such socket (it closed meanwhile)
            return None
        raise OSError(-err, "sock_diag refused")
    # inet_diag_msg: family, state, timer, retrans (4 x u8), sockid (48), expires, rqueue, wqueue, uid
    (uid,) = struct.unpack_from("=I", reply, 16 + 4 + 48 + 12)
    return uid


def _groups(pid: int | None, uid: int, gid: int | None) -> frozenset[int]:
    """The caller's groups: the live process's own (``/proc/PID/status``), else the passwd ones."""
    if pid:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[1]) == uid:  # the pid is still the caller (effective uid)
                return frozenset(int(g) for g in fields.get("Groups", "").split()) | {int(fields["Gid"].split()[1])}
        except (OSError, KeyError, ValueError, IndexError):
            pass
    try:
        pw = pwd.getpwuid(uid)
        return frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid if gid is None else gid))
    except (KeyError, OSError):
        return frozenset({gid}) if gid is not None else frozenset()


# --- what the caller may do ----------------------------------------------------------------------


class AdminPolicy:
    """Decides whether a request may use an admin route."""

    def __init__(self, *, token: str | None, group: str = "", own_uid: int | None = None) -> None:
        self._token = token.encode() if token else None
        self._group = group
        self._group_gid: int | None = None
        self._own_uid = os.geteuid() if own_uid is None else own_uid

    def _admin_gid(self) -> int | None:
        if self._group and self._group_gid is None:
            try:
                self._group_gid = grp.getgrnam(self._group).gr_gid
            except KeyError:
                return None
        return self._group_gid

    def check(self, authorization: str | None, caller: Caller) -> None:
        """Return if the request may act as admin; raise Unauthenticated or Forbidden."""
        if self._admin_by_identity(caller):
            return
        how = self._how_to()
        if authorization:
            scheme, _, presented = authorization.partition(" ")
            # Headers arrive as str with surrogates for undecodable bytes; compare bytes.
            given = presented.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() == "bearer" and self._token is not None and hmac.compare_digest(given, self._token):
                return
            raise Forbidden(f"the admin token presented is not the one this daemon accepts; {how}")
        if caller.unix and caller.uid is not None:
            raise Forbidden(f"{caller.describe()} is not an admin of this daemon; {how}")
        raise Unauthenticated(f"this operation needs an admin credential; {how}")

    def _admin_by_identity(self, caller: Caller) -> bool:
        if not caller.unix or caller.uid is None:
            return False
        gid = self._admin_gid()
        return caller.uid in (0, self._own_uid) or (gid is not None and gid in caller.gids)

    def _how_to(self) -> str:
        ways = []
        if self._token is not None:
            ways.append(
                "send the token of api.admin_token_file as 'Authorization: Bearer <token>' (cachectl --admin-token-file FILE or $CACHED_ADMIN_TOKEN_FILE)"
            )
        else:
            ways.append("the daemon has no admin token (start it with --admin-token-file FILE to allow one)")
        group = f", or a member of group {self._group!r} (api.admin_group)" if self._group else ""
        ways.append(f"or call over the unix socket as root, the daemon's user{group}")
        return " ".join(ways)


class HostPolicy:
    """Local ``Host`` and ``Origin`` values only: no DNS rebinding, no cross-site requests."""

    def __init__(self, *, listen_host: str = "", allowed_hosts: tuple[str, ...] = ()) -> None:
        names = set(LOOPBACK_NAMES) | {h.lower().strip("[]") for h in allowed_hosts}
        if listen_host and listen_host not in ("0.0.0.0", "::", ""):
            names.add(listen_host.lower().strip("[]"))
        self._names = frozenset(names)

    def accepts(self, host: str, local_ip: str | None) -> bool:
        """``host``: a Host header value or a URL's host, with or without a port."""
        name = _host_name(host)
        if name is None:
            return False
        # An IP literal that is this very socket's address: the client dialled us by address.
        return name in self._names or (local_ip is not None and name == local_ip.lower().split("%", 1)[0])

    def check(self, *, host: str | None, origin: str | None, unix: bool, local_ip: str | None) -> None:
        if host is not None and not unix and not self.accepts(host, local_ip):
            raise MisdirectedHost(
                f"Host {_printable(host)!r} is not a name of this daemon; use localhost or 127.0.0.1, "
                "or add the name to api.allowed_hosts"
            )
        if origin is not None and not self._origin_ok(origin, host, unix, local_ip):
            raise ForeignOrigin(
                f"requests from web pages of {_printable(origin)!r} are refused (cross-site request); "
                "add the host to api.allowed_hosts if it is this node"
            )

    def _origin_ok(self, origin: str, host: str | None, unix: bool, local_ip: str | None) -> bool:
        try:
            url = URL(origin)
        except (ValueError, TypeError):
            return False
        if not url.host or url.scheme not in ("http", "https"):
            return False
        if unix and host is not None and _host_name(host) == url.host.lower():
            return True
        return self.accepts(url.host, local_ip)


def _host_name(value: str) -> str | None:
    value = value.strip().lower()
    if not value or not value.isascii():
        return None
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else None
    name, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    if port and not port.isdigit():
        return None
    return name


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text[:200])
