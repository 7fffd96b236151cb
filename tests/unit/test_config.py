"""Config loading: defaults < TOML file < flags, every error naming its key, the result frozen.

Files are written under tmp_path and ``default_file`` always points somewhere that does not exist
(or at a tmp_path file), so the host's /etc/cached/config.toml is never read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.config import _DEFAULTS, MOVED_KEYS, Config, TransferConfig, load
from cached.errors import ConfigError
from cached.types import DEFAULT_PIECE_SIZE, MAX_PIECE_SIZE, MIN_PIECE_SIZE

NO_FILE = Path("/nonexistent/cached-unit-test/config.toml")
# See test_types.py: the loop guard fails a plain test that runs past 1 s.
PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_for(key: str, value: Any) -> str:
    *table, leaf = key.split(".")
    head = f"[{'.'.join(table)}]\n" if table else ""
    return f"{head}{leaf} = {toml_value(value)}\n"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, flags: dict[str, Any] | None = None) -> Config:
    return load(write(tmp_path, text), flags or {}, default_file=NO_FILE)


def config_error(tmp_path: Path, text: str | None = None, flags: dict[str, Any] | None = None) -> ConfigError:
    file = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as info:
        load(file, flags or {}, default_file=NO_FILE)
    return info.value


# --- defaults and precedence -------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    cfg = load(None, {}, default_file=NO_FILE)
    assert cfg.node_id == socket.gethostname()
    assert (cfg.api.listen.host, cfg.api.listen.port) == ("127.0.0.1", 7470)
    assert (cfg.peer.listen.host, cfg.peer.listen.port) == ("0.0.0.0", 7471)
    assert cfg.peer.seeds == ()
    assert cfg.cluster.name == "default"
    assert cfg.discovery.mdns is True
    assert cfg.origins.hf.endpoint == "https://huggingface.co"
    assert cfg.store.max_bytes is None
    assert cfg.store.piece_size_bytes == DEFAULT_PIECE_SIZE == 16 * 1024 * 1024
    assert cfg.store.low_watermark < cfg.store.high_watermark
    assert cfg.log.format == "text"


def test_file_overrides_defaults_and_flags_override_the_file(tmp_path: Path) -> None:
    text = """
        node_id = "node-from-file"
        [cluster]
        name = "from-file"
        [store]
        max_bytes = "500G"
        [log]
        level = "debug"
        [origins.http]
        retries = 2
    """
    cfg = load_text(tmp_path, text, {"cluster.name": "from-flag", "store.max_bytes": "1.5T", "log.level": None})
    assert cfg.node_id == "node-from-file"
    assert cfg.cluster.name == "from-flag"
    assert cfg.store.max_bytes == 3 * 1024**4 // 2
    # An absent flag arrives as None and must not clobber the file.
    assert cfg.log.level == "debug"
    # origins.http.retries is the old name of transfer.retries, still accepted.
    assert cfg.transfer.retries == 2
    # Untouched keys keep their defaults.
    assert cfg.transfer.connections == load(None, {}, default_file=NO_FILE).transfer.connections


def test_transfer_limits_are_read_under_their_new_and_their_old_name(tmp_path: Path) -> None:
    new = load_text(tmp_path, '[transfer]\nretries = 2\nmax_rate_bps = "1M"\n')
    old = load_text(tmp_path, '[origins.http]\nretries = 2\nmax_rate_bps = "1M"\n')
    assert new == old and new.transfer == TransferConfig(retries=2, max_rate_bps=1 << 20)
    assert load(None, {"origins.http.connections": "3"}, default_file=NO_FILE).transfer.connections == 3
    assert load(None, {"transfer.connections": "3"}, default_file=NO_FILE).transfer.connections == 3
    # A flag overrides the file under either name.
    assert load_text(tmp_path, "[transfer]\nretries = 2\n", {"origins.http.retries": "7"}).transfer.retries == 7


def test_a_moved_key_set_under_both_names_is_an_error_naming_the_old_one(tmp_path: Path) -> None:
    err = config_error(tmp_path, "[origins.http]\nretries = 2\n[transfer]\nretries = 2\n")
    assert err.key == "origins.http.retries"
    assert "transfer.retries" in str(err)


def test_every_default_is_its_dataclass_field_default() -> None:
    # The file's table of keys is derived from the dataclasses: one default per key, once.
    cfg = load(None, {}, default_file=NO_FILE)
    assert _DEFAULTS["transfer"] == {
        f.name: getattr(TransferConfig(), f.name) for f in dataclasses.fields(TransferConfig)
    }
    assert cfg.transfer == TransferConfig()
    assert _DEFAULTS["api"]["socket_mode"] == "0660" and cfg.api.socket_mode == 0o660
    assert "connections" not in _DEFAULTS["origins"]["http"]


def test_default_file_is_read_only_when_no_file_is_named(tmp_path: Path) -> None:
    default = write(tmp_path, '[cluster]\nname = "from-default"\n', "default.toml")
    assert load(None, {}, default_file=default).cluster.name == "from-default"
    explicit = write(tmp_path, '[log]\nlevel = "debug"\n', "explicit.toml")
    cfg = load(explicit, {}, default_file=default)
    assert cfg.log.level == "debug"
    assert cfg.cluster.name == "default"


def test_loads_do_not_leak_into_each_other(tmp_path: Path) -> None:
    load_text(
        tmp_path, '[peer]\nseeds = ["10.0.0.1:7471"]\n[store]\nmax_bytes = "1T"\n', {"peer.seeds": ["10.0.0.2:7471"]}
    )
    fresh = load(None, {}, default_file=NO_FILE)
    assert fresh.peer.seeds == ()
    assert fresh.store.max_bytes is None


def test_config_is_frozen() -> None:
    cfg = load(None, {}, default_file=NO_FILE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.store.max_bytes = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node_id = "other"  # type: ignore[misc]


# --- file errors -------------------------------------------------------------------------------------


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(missing, {}, default_file=NO_FILE)
    assert info.value.key == "--config"
    assert str(missing) in str(info.value)


def test_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    err = config_error(tmp_path, "[store\nmax_bytes = ")
    assert err.key == "--config"
    assert "config.toml" in str(err)


@pytest.mark.parametrize(
    "text, key",
    [
        ('cache_directory = "/srv/cache"\n', "cache_directory"),
        ("[store]\nmax_byte = 1\n", "store.max_byte"),
        ("[origins.http]\nretry = 3\n", "origins.http.retry"),
        ("[origins.s3]\nbucket = 'x'\n", "origins.s3.bucket"),
        ("[origins.gopher]\nurl = 'x'\n", "origins.gopher"),
        ("[nosuch]\na = 1\n", "nosuch"),
    ],
)
def test_unknown_keys_in_the_file_are_errors_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    err = config_error(tmp_path, text)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")


@pytest.mark.parametrize("text, key", [("store = 5\n", "store"), ("[origins]\nhttp = 'fast'\n", "origins.http")])
def test_a_scalar_where_a_table_belongs_is_an_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert config_error(tmp_path, text).key == key


# --- value errors ------------------------------------------------------------------------------------

BAD_VALUES = [
    ("node_id", "has space"),
    ("cache_dir", "relative/cache"),
    ("cache_dir", 5),
    ("api.listen", "localhost"),
    ("api.listen", "127.0.0.1:70000"),
    ("api.listen", "127.0.0.1:http"),
    ("api.listen", "unix:run/cached.sock"),
    ("api.socket_mode", "rw-rw----"),
    ("peer.listen", ":7471"),
    ("peer.seeds", ["10.0.0.1:7471", "nope"]),
    ("peer.seeds", 7471),
    ("cluster.name", ""),
    ("cluster.name", "x" * 64),
    ("cluster.token_file", 5),
    ("discovery.mdns", "yes"),
    ("origins.hf.endpoint", "ftp://mirror.example"),
    ("origins.hf.endpoint", "huggingface.co"),
    ("origins.http.connections", 0),
    ("origins.http.connections", 65),
    ("origins.http.connections", 2.5),
    ("origins.http.connections", True),
    ("origins.http.connect_timeout_s", 0),
    ("origins.http.read_timeout_s", "soon"),
    ("origins.http.retries", -1),
    ("origins.http.backoff_max_s", 1e9),
    ("transfer.connections", 0),
    ("transfer.retries", -1),
    ("transfer.backoff_s", "soon"),
    ("transfer.max_rate_bps", "12Q"),
    ("store.max_bytes", "12Q"),
    ("store.max_bytes", -5),
    ("store.piece_size_bytes", "1K"),
    ("store.piece_size_bytes", "1G"),
    ("store.high_watermark", 2.0),
    ("store.high_watermark", float("nan")),
    ("jobs.max_concurrent", 0),
    ("log.format", "xml"),
    ("log.level", "loud"),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_a_bad_value_in_the_file_names_its_key(tmp_path: Path, key: str, value: Any) -> None:
    err = config_error(tmp_path, toml_for(key, value))
    assert err.key == key
    assert str(err).startswith(f"{key}: ")


@pytest.mark.parametrize(
    "key, value",
    [(k, v) for k, v in BAD_VALUES if isinstance(v, str) and not k.startswith(("origins.http", "jobs", "store.high"))]
    + [("peer.seeds", ["nope"])],
)
def test_a_bad_flag_names_its_key(key: str, value: Any) -> None:
    err = config_error(Path("/unused"), flags={key: value})
    assert err.key == key


def test_low_watermark_above_high_is_an_error_naming_low(tmp_path: Path) -> None:
    err = config_error(tmp_path, "[store]\nhigh_watermark = 0.5\nlow_watermark = 0.6\n")
    assert err.key == "store.low_watermark"


NUMERIC_KEYS = [
    "origins.http.connections",
    "origins.http.connect_timeout_s",
    "origins.http.read_timeout_s",
    "origins.http.retries",
    "origins.http.backoff_s",
    "origins.http.backoff_max_s",
    "transfer.connections",
    "transfer.retries",
    "transfer.backoff_s",
    "transfer.backoff_max_s",
    "store.max_bytes",
    "store.piece_size_bytes",
    "store.high_watermark",
    "store.low_watermark",
    "jobs.max_concurrent",
]
not_a_count = st.one_of(
    st.integers(max_value=-1),
    st.floats(max_value=-1e-9),
    st.text(st.sampled_from("abcxyzQ_ -"), min_size=1, max_size=8),
    st.just(True),
    st.lists(st.integers(0, 9), max_size=2),
)


@PROPS
@given(st.sampled_from(NUMERIC_KEYS), not_a_count)
def test_a_negative_or_non_numeric_value_for_any_numeric_key_names_that_key(
    tmp_path: Path, key: str, value: Any
) -> None:
    err = config_error(tmp_path, toml_for(key, value))
    assert err.key == key
    assert key in str(err)


valid_numbers = {
    "origins.http.connections": st.integers(1, 64),
    "origins.http.retries": st.integers(0, 100),
    "jobs.max_concurrent": st.integers(1, 64),
    "origins.http.connect_timeout_s": st.floats(0.1, 600),
    "origins.http.backoff_s": st.floats(0, 600),
    "transfer.connections": st.integers(1, 64),
    "transfer.backoff_max_s": st.floats(0, 3600),
    "store.high_watermark": st.floats(0.85, 1.0),
    "store.low_watermark": st.floats(0.05, 0.95),
    "store.max_bytes": st.integers(1, 1 << 50),
    "store.piece_size_bytes": st.integers(MIN_PIECE_SIZE, MAX_PIECE_SIZE),
}


@PROPS
@given(st.sampled_from(sorted(valid_numbers)).flatmap(lambda k: st.tuples(st.just(k), valid_numbers[k])))
def test_a_flag_spelled_as_text_means_what_the_number_means_in_the_file(tmp_path: Path, item: tuple[str, Any]) -> None:
    # The daemon's flags arrive from argparse as strings; the file has TOML numbers.
    key, value = item
    from_file = load_text(tmp_path, toml_for(key, value))
    from_flag = load(None, {key: str(value)}, default_file=NO_FILE)
    assert from_file == from_flag
    assert from_file != load(None, {}, default_file=NO_FILE) or value == _default_of(key)


def _default_of(key: str) -> Any:
    key = MOVED_KEYS.get(key, key)  # the Config holds a moved key under its new name
    node: Any = load(None, {}, default_file=NO_FILE)
    section, *rest = key.split(".")
    node = getattr(node, section)
    for part in rest:
        node = getattr(node, part)
    return node


# --- values that parse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, host, port, unix",
    [
        ("unix:/run/cached/api.sock", "", 0, "/run/cached/api.sock"),
        ("[::1]:7470", "::1", 7470, ""),
        ("0.0.0.0:0", "0.0.0.0", 0, ""),
        ("node-3.cluster.local:8080", "node-3.cluster.local", 8080, ""),
    ],
)
def test_listen_addresses(value: str, host: str, port: int, unix: str) -> None:
    listen = load(None, {"api.listen": value}, default_file=NO_FILE).api.listen
    assert (listen.host, listen.port, listen.unix_path) == (host, port, unix)
    if unix:
        assert str(listen) == value


def test_sizes_octal_modes_and_case_are_normalised(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
        [api]
        socket_mode = "0600"
        [origins.hf]
        endpoint = "http://mirror.internal:8080/"
        [store]
        piece_size_bytes = "4M"
        [log]
        level = "DEBUG"
        """,
    )
    assert cfg.api.socket_mode == 0o600
    assert cfg.origins.hf.endpoint == "http://mirror.internal:8080"
    assert cfg.store.piece_size_bytes == 4 << 20
    assert cfg.log.level == "debug"
    assert load_text(tmp_path, "[api]\nsocket_mode = 0o640\n").api.socket_mode == 0o640


def test_seeds_accept_one_string_or_a_list(tmp_path: Path) -> None:
    assert load_text(tmp_path, '[peer]\nseeds = "10.0.0.1:7471"\n').peer.seeds == ("10.0.0.1:7471",)
    flags = {"peer.seeds": ["10.0.0.1:7471", "[fd00::2]:7471"]}
    assert load(None, flags, default_file=NO_FILE).peer.seeds == ("10.0.0.1:7471", "[fd00::2]:7471")


def test_token_files_are_paths_and_empty_means_none(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[cluster]\ntoken_file = "/etc/cached/token"\n[origins.hf]\ntoken_file = ""\n')
    assert cfg.cluster.token_file == Path("/etc/cached/token")
    assert cfg.origins.hf.token_file is None


# --- the flag side of "unknown keys are errors" -------------------------------------------------------


@pytest.mark.parametrize("key", ["store.max_byte", "nosuch.key", "store"])
def test_a_flag_for_an_unknown_key_is_an_error_naming_it(key: str) -> None:
    # Flags are dotted keys too (tests/support/node.py passes them straight through): a typo must
    # fail like a typo in the file, as a ConfigError (exit 78), not be ignored or crash.
    with pytest.raises(ConfigError) as info:
        load(None, {key: "1G"}, default_file=NO_FILE)
    assert info.value.key == key


def test_advertise_is_validated_as_host_port(tmp_path: Path) -> None:
    assert load_text(tmp_path, '[peer]\nadvertise = "10.0.0.5:7471"\n').peer.advertise == "10.0.0.5:7471"
    assert load(None, {}, default_file=NO_FILE).peer.advertise == ""
    # CONTRACT: --advertise HOST:PORT. Peers dial it, so a bad one must fail at start, naming the key,
    # like peer.listen and peer.seeds do.
    err = config_error(tmp_path, '[peer]\nadvertise = "not an address"\n')
    assert err.key == "peer.advertise"


def test_labels_past_what_peers_accept_are_a_config_error() -> None:
    # A member whose labels exceed these is refused by every peer (peers.membership): a node
    # configured so must not start and then be dropped from its cluster without a word.
    from cached.types import MAX_LABEL_KEY_CHARS, MAX_LABELS

    for labels in (
        {f"k{i}": "v" for i in range(MAX_LABELS + 1)},
        {"k" * (MAX_LABEL_KEY_CHARS + 1): "v"},
        {"gpu": "x" * 254},
    ):
        with pytest.raises(ConfigError) as e:
            load(None, {"cache_dir": "/tmp/c", "labels": labels}, default_file=Path("/nonexistent"))
        assert e.value.key == "labels"
    cfg = load(None, {"cache_dir": "/tmp/c", "labels": {"gpu": "h100", "zone": "a"}}, default_file=Path("/nonexistent"))
    assert cfg.labels == {"gpu": "h100", "zone": "a"}


def test_the_new_origins_sections_are_validated_and_named(tmp_path: Path) -> None:
    assert config_error(tmp_path, "[origins.s3]\naddressing_style = 'sideways'\n").key == "origins.s3.addressing_style"
    assert config_error(tmp_path, "[origins.s3]\nendpoint_url = 'minio:9000'\n").key == "origins.s3.endpoint_url"
    assert config_error(tmp_path, "[origins.oci]\nplain_http = ['nohost']\n").key == "origins.oci.plain_http"
    assert (
        config_error(tmp_path, "[origins.oci]\ndefault_registry = 'https://r'\n").key == "origins.oci.default_registry"
    )
    assert config_error(tmp_path, "[origins.modelscope]\nendpoint = 'ftp://x'\n").key == "origins.modelscope.endpoint"
