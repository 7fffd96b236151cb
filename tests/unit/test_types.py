"""Value types: refs, their escaped names, blob ids, pieces, manifests, sizes, priorities.

Properties over arbitrary input where hostile input is likely (refs, manifests, file paths),
worked examples where the contract fixes an exact spelling.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from urllib.parse import quote, unquote

import blake3
import pytest
from huggingface_hub.utils import HFValidationError, validate_repo_id
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cached import ranges
from cached.errors import IntegrityError, RefError
from cached.ranges import ByteSpan, RangeRequest, parse_range
from cached.types import (
    MAX_NAME_BYTES,
    MAX_PIECE_SIZE,
    MAX_REVISION_BYTES,
    MIN_PIECE_SIZE,
    BlobAdded,
    BlobId,
    BlobRemoved,
    FileEntry,
    Manifest,
    ManifestAdded,
    ManifestRemoved,
    ModelRef,
    PartialDropped,
    PartialStarted,
    PieceVerified,
    Priority,
    RefChanged,
    RefKind,
    StoreEvent,
    format_size,
    hash_piece,
    parse_size,
    piece_count,
    piece_span,
    validate_file_path,
)

# The autouse loop guard (tests/conftest.py) counts a plain test's whole run as the loop being
# blocked and fails it past 1 s, so example counts stay small; failures found are replayed first
# from the hypothesis database. The guard fixture is function-scoped; sharing it is harmless.
PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- strategies ----------------------------------------------------------------------------------


def chars(*ranges: tuple[int, int]) -> st.SearchStrategy[str]:
    # Code point ranges rather than st.characters(): category and codec based alphabets build
    # hypothesis's Unicode tables on a fresh checkout, which alone takes longer than the guard allows.
    return st.one_of(*(st.integers(lo, hi) for lo, hi in ranges)).map(chr)


# Any code point, lone surrogates included: they reach parse() from JSON bodies ("\ud800") and from
# argv decoded with surrogateescape.
any_char = chars((0, 0x7F), (0x80, 0xFFFF), (0xD800, 0xDFFF), (0x10000, 0x10FFFF))
unicode_char = chars((0, 0x7F), (0x80, 0xD7FF), (0xE000, 0x10FFFF))  # no lone surrogates
ref_alphabet = st.one_of(st.sampled_from(list("/.@%:?#~-_ aZ09\\")), any_char)
schemes = st.sampled_from(
    [
        "hf://",
        "HF://",
        "http://",
        "https://",
        "HTTPS://",
        "file://",
        "file:///",
        "file://localhost/",
        "s3://bucket/",
        "modelscope://",
        "oci://reg.example:5000/",
        "ollama://",
        "",
    ]
)
ref_like = st.builds(str.__add__, schemes, st.text(ref_alphabet, max_size=60))
# The same without lone surrogates, for properties of refs that do parse.
ref_like_text = st.builds(
    str.__add__, schemes, st.text(st.sampled_from(list("/.@%:?#~-_ aZ09\\")) | unicode_char, max_size=60)
)
# Shapes that parse() accepts often enough to exercise canonical forms.
alnum = st.sampled_from("abcXYZ0129")
hf_part = st.builds(str.__add__, alnum, st.text(st.sampled_from("abZ09._-"), max_size=12))
hf_revision = st.builds(str.__add__, alnum | st.just("_"), st.text(st.sampled_from("abZ09._/-"), max_size=16))
url_char = st.sampled_from(list("abcXYZ019-._~%!$&'()*+,;=:@/ ")) | chars((0xA0, 0x2FF))
path_segment = st.text(
    chars((0x20, 0x2E), (0x30, 0x7E), (0xA0, 0xD7FF), (0xE000, 0x10FFFF)), min_size=1, max_size=12
).filter(lambda s: s not in (".", ".."))


@st.composite
def valid_refs(draw: st.DrawFn) -> ModelRef:
    kind = draw(st.sampled_from(["hf", "http", "file", "s3", "oci"]))
    if kind == "s3":
        key = "/".join(draw(st.lists(path_segment, min_size=0, max_size=4)))
        text = "s3://bucket-1/" + quote(key) + draw(st.sampled_from(["", "/"]))
    elif kind == "oci":
        repo = "/".join(
            draw(st.lists(st.text(st.sampled_from("abc019"), min_size=1, max_size=6), min_size=1, max_size=3))
        )
        text = f"oci://reg.example:5000/{repo}" + draw(
            st.sampled_from(["", ":v1", "@sha256:" + "0" * 64, "?path=/x/y"])
        )
    elif kind == "hf":
        repo = "/".join(draw(st.lists(hf_part, min_size=1, max_size=2)))
        rev = draw(st.none() | hf_revision)
        text = f"hf://{repo}" + (f"@{rev}" if rev is not None else "")
    elif kind == "http":
        host = draw(st.sampled_from(["example.com", "127.0.0.1", "[::1]", "models.internal:8080"]))
        dirs = draw(st.text(url_char, max_size=12))
        # Repetition reaches names long enough to be shortened by ``escaped`` at little cost.
        name = draw(st.text(st.sampled_from("abc019-_~"), min_size=1, max_size=6)) * draw(st.integers(1, 60))
        text = f"{draw(st.sampled_from(['http', 'https']))}://{host}/{dirs}/{name}"
    else:
        segments = draw(st.lists(path_segment, min_size=1, max_size=6)) * draw(st.integers(1, 8))
        text = "file://" + quote("/" + "/".join(segments))
    try:
        return ModelRef.parse(text)
    except RefError:
        assume(False)
        raise


# --- ModelRef.parse --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, canonical, fields",
    [
        ("hf://org/name", RefKind.HF, "hf://org/name@main", {"repo": "org/name", "revision": "main"}),
        ("hf://org/name@v1.0", RefKind.HF, "hf://org/name@v1.0", {"repo": "org/name", "revision": "v1.0"}),
        ("hf://gpt2", RefKind.HF, "hf://gpt2@main", {"repo": "gpt2", "revision": "main"}),
        ("hf://org/name@refs/pr/1", RefKind.HF, "hf://org/name@refs/pr/1", {"revision": "refs/pr/1"}),
        ("  HF://Org/Name_2.5  \n", RefKind.HF, "hf://Org/Name_2.5@main", {"repo": "Org/Name_2.5"}),
        (
            "https://example.com/m/model.gguf",
            RefKind.HTTP,
            "https://example.com/m/model.gguf",
            {"url": "https://example.com/m/model.gguf"},
        ),
        (
            "http://example.com/model.gguf#part",
            RefKind.HTTP,
            "http://example.com/model.gguf",
            {"url": "http://example.com/model.gguf"},
        ),
        ("file:///srv/models/llama", RefKind.FILE, "file:///srv/models/llama", {"path": "/srv/models/llama"}),
        ("file://localhost/srv/m.gguf", RefKind.FILE, "file:///srv/m.gguf", {"path": "/srv/m.gguf"}),
        ("file:///srv//models/", RefKind.FILE, "file:///srv/models", {"path": "/srv/models"}),
        ("file:///srv/my%20model", RefKind.FILE, "file:///srv/my%20model", {"path": "/srv/my model"}),
        (
            "s3://models/llama/m.gguf",
            RefKind.S3,
            "s3://models/llama/m.gguf",
            {"bucket": "models", "key": "llama/m.gguf"},
        ),
        ("s3://models/llama/", RefKind.S3, "s3://models/llama/", {"key": "llama/"}),
        ("s3://models/", RefKind.S3, "s3://models/", {"key": ""}),
        ("s3://models/a%3Fb", RefKind.S3, "s3://models/a%3Fb", {"key": "a?b"}),
        ("s3://models/d/?include=*.json", RefKind.S3, "s3://models/d/?include=*.json", {"include": ("*.json",)}),
        (
            "modelscope://Qwen/Qwen2-0.5B",
            RefKind.MODELSCOPE,
            "modelscope://Qwen/Qwen2-0.5B@master",
            {"repo": "Qwen/Qwen2-0.5B"},
        ),
        (
            "modelscope://org/m@v1?exclude=*.bin",
            RefKind.MODELSCOPE,
            "modelscope://org/m@v1?exclude=*.bin",
            {"revision": "v1"},
        ),
        (
            "oci://127.0.0.1:5000/models/llama",
            RefKind.OCI,
            "oci://127.0.0.1:5000/models/llama:latest",
            {"revision": "latest"},
        ),
        ("oci://ghcr.io/o/m:v2", RefKind.OCI, "oci://ghcr.io/o/m:v2", {"registry": "ghcr.io", "repo": "o/m"}),
        ("oci://r.example/m@sha256:" + "ab" * 32, RefKind.OCI, "oci://r.example/m@sha256:" + "ab" * 32, {"repo": "m"}),
        ("oci://r.example/m?path=/data/", RefKind.OCI, "oci://r.example/m:latest?path=/data", {"path": "/data"}),
        ("oci://r.example/m", RefKind.OCI, "oci://r.example/m:latest", {"path": "/models"}),
        (
            "ollama://llama3",
            RefKind.OLLAMA,
            "ollama://registry.ollama.ai/library/llama3:latest",
            {"repo": "library/llama3"},
        ),
        ("ollama://u/m:7b", RefKind.OLLAMA, "ollama://registry.ollama.ai/u/m:7b", {"revision": "7b"}),
        (
            "ollama://localhost:11434/x/y",
            RefKind.OLLAMA,
            "ollama://localhost:11434/x/y:latest",
            {"registry": "localhost:11434"},
        ),
    ],
)
def test_parse_accepts_each_documented_form(text: str, kind: RefKind, canonical: str, fields: dict[str, str]) -> None:
    ref = ModelRef.parse(text)
    assert ref.kind is kind
    assert ref.canonical == canonical == str(ref)
    for name, value in fields.items():
        assert getattr(ref, name) == value


HOSTILE_REFS = [
    "",
    "   ",
    "org/name",
    "hf:/org/name",
    "ftp://host/file.bin",
    # file: traversal, relative, hosts, NUL
    "file:///../..",
    "file:///a/../b",
    "file:///a/./b",
    "file:///%2e%2e/etc/passwd",
    "file:///srv/%2E%2E/%2E%2E/etc",
    "file:///",
    "file://",
    "file:",
    "file://evil.example/etc/passwd",
    "file:///a%00b",
    # hf: traversal, shape, empty revision
    "hf://",
    "hf://../../x",
    "hf://org/..",
    "hf://../name",
    "hf://org/name@",
    "hf://org/name@../../etc",
    "hf://org/name@a//b",
    "hf://org/name@a/",
    "hf://org/name@/abs",
    "hf://org/",
    "hf:///name",
    "hf://a/b/c",
    "hf://org/name.",
    "hf://.org/name",
    "hf://org/na me",
    # http: no host, no file name
    "http://",
    "https://",
    "http:///model.gguf",
    "http://host",
    "http://host/",
    "http://host/dir/",
    "http://host/..",
    "http://host:99999/model.gguf",
    "http://[::1/model.gguf",
    # control characters anywhere but the strippable ends
    "hf://org/na\x00me",
    "hf://org/\nname",
    "file:///a\tb",
    "file:///a\x1bb",
    "http://host/a\x7fb",
    "https://host/a\rb.gguf",
    "hf://" + "a" * 5000,
    # s3: bucket names, traversal in keys, patterns on one object
    "s3://",
    "s3://bucket",
    "s3://b/key",
    "s3://Bucket/key",
    "s3://bucket/a/../b",
    "s3://bucket/a//b",
    "s3://bucket/./b",
    "s3://bucket/key?include=*",
    "s3://bucket/d/?color=red",
    # modelscope: same shape rules as hf
    "modelscope://",
    "modelscope://a/b/c",
    "modelscope://org/name@",
    "modelscope://org/name@../x",
    # oci / ollama: registry, repository grammar, tags, digests, options
    "oci://",
    "oci://registry.example",
    "oci://registry.example/",
    "oci://registry.example/Upper",
    "oci://registry.example/a/../b",
    "oci://registry.example/m@sha256:short",
    "oci://registry.example/m@md5:" + "a" * 32,
    "oci://registry.example/m:bad/tag",
    "oci://registry.example:99999/m",
    "oci://registry.example/m?path=/a/../b",
    "oci://registry.example/m?other=1",
    "ollama://",
    "ollama://m@sha256:" + "a" * 64,
    "ollama://m?x=1",
]


@pytest.mark.parametrize("text", HOSTILE_REFS)
def test_hostile_refs_are_rejected_with_a_reason(text: str) -> None:
    with pytest.raises(RefError) as info:
        ModelRef.parse(text)
    err = info.value
    assert err.code == "bad_ref"
    assert str(err).startswith("invalid ref ")
    reason = str(err).rpartition(": ")[2]
    assert reason.strip(), f"no reason given for {text!r}"
    # The message quotes the ref (or its start) so the user sees what was rejected.
    assert text.strip()[:32] in err.ref


@pytest.mark.parametrize(
    "text",
    [
        # A '.' path segment in a revision is traversal in the HF cache layout (refs/<revision>,
        # snapshots/...) just as it is in file:// paths, and git itself refuses such ref names.
        "hf://org/name@.",
        "hf://org/name@a/./b",
        "hf://org/name@./main",
    ],
)
def test_dot_segments_in_hf_revisions_are_rejected(text: str) -> None:
    with pytest.raises(RefError):
        ModelRef.parse(text)


@PROPS
@given(st.one_of(st.text(any_char, max_size=80), ref_like))
@example("file:///\ud800")
@example("hf://org/name@\udcff")
@example("http://host/\udc80.gguf")
def test_parse_raises_nothing_but_referror(text: str) -> None:
    try:
        ref = ModelRef.parse(text)
    except RefError:
        return
    schemes = ("http", "https") if ref.kind is RefKind.HTTP else (ref.kind.value,)
    assert ref.canonical.split("://", 1)[0] in schemes


@PROPS
@given(st.one_of(ref_like_text, valid_refs().map(lambda r: r.canonical)))
def test_parse_of_canonical_is_a_fixed_point(text: str) -> None:
    # The store re-parses the canonical spelling from refs/ at start: it must come back identical.
    try:
        ref = ModelRef.parse(text)
    except RefError:
        assume(False)
        return
    again = ModelRef.parse(ref.canonical)
    assert again == ref
    assert ModelRef.parse(str(again)).canonical == ref.canonical


@PROPS
@given(st.lists(path_segment, min_size=1, max_size=8), st.sampled_from(["file://", "file://localhost"]))
def test_file_ref_round_trips_any_path_through_percent_encoding(segments: list[str], prefix: str) -> None:
    path = "/" + "/".join(segments)
    ref = ModelRef.parse(prefix + quote(path))
    assert ref.kind is RefKind.FILE
    assert ref.path == path
    assert ModelRef.parse(ref.canonical).path == path


@PROPS
@given(st.lists(hf_part, min_size=1, max_size=2), st.none() | hf_revision)
@example(["org", "name--v2"], None)
def test_accepted_hf_repo_ids_are_ones_huggingface_hub_accepts(parts: list[str], revision: str | None) -> None:
    repo = "/".join(parts)
    text = f"hf://{repo}" + (f"@{revision}" if revision else "")
    try:
        ref = ModelRef.parse(text)
    except RefError:
        return
    assert ref.repo == repo
    assert ref.revision == (revision or "main")
    # huggingface_hub refuses '--' (its cache folder separator: 'a--b/c' and 'a/b--c' would share
    # models--a--b--c), '..', a trailing '-' or '.', and '.git'. A ref the hub client cannot name
    # must fail here, before any I/O, with our message.
    try:
        validate_repo_id(ref.repo)
    except HFValidationError as e:
        pytest.fail(f"{text!r} parsed, but huggingface_hub rejects repo {ref.repo!r}: {e}")


# --- names that become file names ------------------------------------------------------------------

# What the store adds to a name when it writes it: ".<name>.<8 hex>.tmp" (cached.store.durable).
TEMP_OVERHEAD = len(".") + len(".0123abcd.tmp")


def test_a_245_character_revision_is_refused_naming_the_limit() -> None:
    # The finding: prefetching this ref made hf/models--org--name/refs/<revision> a file name over
    # 255 bytes, and the daemon could never start again. It must fail at parse, before any I/O.
    with pytest.raises(RefError) as info:
        ModelRef.parse("hf://org/name@" + "r" * 245)
    assert str(MAX_REVISION_BYTES) in str(info.value) and "revision" in str(info.value)


def test_the_longest_accepted_revision_still_fits_on_disk_everywhere() -> None:
    rev = "v" * MAX_REVISION_BYTES
    ref = ModelRef.parse(f"hf://{'o' * 96}/{'n' * 96}@{rev}?include=" + ",".join(["*" + "x" * 200] * 10))
    assert ref.revision == rev
    assert len(ref.escaped.encode()) + TEMP_OVERHEAD <= 255
    assert len(rev.encode()) + TEMP_OVERHEAD <= 255
    with pytest.raises(RefError):
        ModelRef.parse(f"hf://org/name@{rev}v")


@PROPS
@given(st.text(st.sampled_from("ab09._/-"), min_size=1, max_size=400))
def test_every_accepted_revision_segment_fits_a_file_name(tail: str) -> None:
    try:
        ref = ModelRef.parse(f"hf://org/name@a{tail}")
    except RefError:
        return
    assert all(len(seg.encode()) + TEMP_OVERHEAD <= 255 for seg in ref.revision.split("/"))


def test_an_http_file_name_too_long_for_disk_is_refused() -> None:
    ModelRef.parse("https://example.com/" + "a" * (MAX_NAME_BYTES - 5) + ".gguf")
    with pytest.raises(RefError):
        ModelRef.parse("https://example.com/" + "a" * MAX_NAME_BYTES + ".gguf")
    with pytest.raises(RefError):
        ModelRef.parse("https://example.com/" + "%C3%A9" * 121)  # 242 bytes once decoded


def test_a_file_ref_segment_longer_than_any_file_name_is_refused() -> None:
    with pytest.raises(RefError):
        ModelRef.parse("file:///srv/" + "a" * 256)


# --- ModelRef.escaped ------------------------------------------------------------------------------


@PROPS
@given(valid_refs())
def test_escaped_is_one_safe_file_name_component(ref: ModelRef) -> None:
    esc = ref.escaped
    assert esc not in ("", ".", "..")
    assert "/" not in esc and "\0" not in esc
    assert len(esc.encode()) <= 255
    assert posixpath.basename(esc) == esc
    assert ModelRef.parse(ref.canonical).escaped == esc


@PROPS
@given(valid_refs(), valid_refs())
def test_escaped_differs_for_different_refs(a: ModelRef, b: ModelRef) -> None:
    assume(a.canonical != b.canonical)
    assert a.escaped != b.escaped


def test_escaped_name_of_a_long_ref_cannot_be_claimed_by_another_ref() -> None:
    # A long ref is shortened to a prefix plus a hash. Anyone can compute that name, read it back
    # as a ref (it is a plain URL), and prefetch it: the two refs must not share refs/ and models/.
    long_ref = ModelRef.parse("https://example.com/" + "/".join(["a" * 100] * 3) + ".gguf")
    forged = ModelRef.parse(unquote(long_ref.escaped))
    assert forged.canonical != long_ref.canonical
    assert forged.escaped != long_ref.escaped


# --- BlobId, pieces ------------------------------------------------------------------------------

digest32 = st.binary(min_size=32, max_size=32)
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)


@PROPS
@given(
    st.integers(0, 1 << 45),
    st.integers(MIN_PIECE_SIZE, MAX_PIECE_SIZE),
    st.lists(digest32, min_size=2, max_size=6),
    st.data(),
)
def test_blob_id_depends_on_length_piece_size_and_each_ordered_digest(
    size: int, piece_size: int, digests: list[bytes], data: st.DataObject
) -> None:
    base = BlobId.compute(size, piece_size, digests)
    assert BlobId.compute(size, piece_size, iter(digests)) == base
    assert BlobId.compute(size + 1, piece_size, digests) != base
    assert BlobId.compute(size, piece_size + 1, digests) != base
    i = data.draw(st.integers(0, len(digests) - 1))
    flipped = bytearray(digests[i])
    flipped[data.draw(st.integers(0, 31))] ^= 1 << data.draw(st.integers(0, 7))
    assert BlobId.compute(size, piece_size, digests[:i] + [bytes(flipped)] + digests[i + 1 :]) != base
    assert BlobId.compute(size, piece_size, digests[:i] + digests[i + 1 :]) != base
    if digests[0] != digests[-1]:
        assert BlobId.compute(size, piece_size, digests[::-1]) != base


@PROPS
@given(hex64)
def test_blob_id_parses_its_own_wire_and_file_name_spellings(h: str) -> None:
    blob = BlobId.parse(h)
    assert str(blob) == f"blake3:{h}"
    assert BlobId.parse(str(blob)) == blob
    assert blob.hex == h


@pytest.mark.parametrize(
    "text",
    [
        "",
        "blake3:",
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "blake3:" + "g" * 64,
        "sha256:" + "a" * 64,
        " " + "a" * 64,
        "blake3:blake3:" + "a" * 64,
    ],
)
def test_blob_id_rejects_anything_but_64_lowercase_hex(text: str) -> None:
    with pytest.raises(ValueError):
        BlobId.parse(text)


def test_blob_id_constructor_keeps_hex_bare() -> None:
    # BlobId.hex names files in blobs/ and is prefixed once by __str__; the constructor must not
    # accept a value that is not bare hex.
    h = "ab" * 32
    try:
        blob = BlobId(hex=f"blake3:{h}")
    except ValueError:
        return
    assert blob.hex == h
    assert str(blob) == f"blake3:{h}"


@PROPS
@given(st.integers(MIN_PIECE_SIZE, MAX_PIECE_SIZE), st.integers(0, 300), st.integers(-1, 1), st.data())
def test_pieces_tile_the_blob_exactly(piece_size: int, whole: int, nudge: int, data: st.DataObject) -> None:
    size = max(0, whole * piece_size + nudge * data.draw(st.integers(1, piece_size - 1)))
    n = piece_count(size, piece_size)
    end = 0
    for i in range(n):
        offset, length = piece_span(i, size, piece_size)
        assert offset == end
        assert 0 < length <= piece_size
        if i < n - 1:
            assert length == piece_size
        end = offset + length
    assert end == size


def test_hash_piece_is_blake3_for_small_and_threaded_sizes() -> None:
    for n in (0, 1, 4 << 20, (4 << 20) + 1):
        data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        expect = blake3.blake3(data).digest()
        assert hash_piece(data) == expect
        assert hash_piece(bytearray(data)) == expect
        assert hash_piece(memoryview(data)) == expect


# --- file paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../b",
        "a/..",
        "./a",
        "a/./b",
        ".",
        "..",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "a\0b",
        "x" * 1025,
        "x" * (MAX_NAME_BYTES + 1),  # one name longer than the store can write (temp name > 255)
        "d/" + "日" * 81,  # 243 bytes in UTF-8, 81 characters
        "/".join(["日" * 60] * 6),  # 1085 bytes, 365 characters
        "a/\ud800",
    ],
)
def test_hostile_file_paths_are_rejected(path: str) -> None:
    with pytest.raises(ValueError):
        validate_file_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "config.json",
        "sub/dir/model-00001-of-00002.safetensors",
        ".gitattributes",
        "a..b/c",
        "日本/モデル.bin",
        "x" * MAX_NAME_BYTES,
        "/".join(["y" * 200] * 5),
    ],
)
def test_ordinary_file_paths_are_kept_verbatim(path: str) -> None:
    assert validate_file_path(path) == path


@PROPS
@given(st.text(st.sampled_from(list("ab./\\\0")) | any_char, max_size=30))
def test_an_accepted_file_path_stays_strictly_inside_the_model_directory(path: str) -> None:
    try:
        validate_file_path(path)
    except ValueError:
        return
    root = "/cache/models/x"
    joined = posixpath.join(root, path)
    assert posixpath.normpath(joined) == joined
    assert joined.startswith(root + "/") and len(joined) > len(root) + 1


# --- Manifest ----------------------------------------------------------------------------------------

file_path = st.lists(
    st.builds(str.__add__, st.sampled_from("ab09_-"), st.text(st.sampled_from("ab09._-"), max_size=6)),
    min_size=1,
    max_size=3,
).map("/".join)
origin_meta = st.sampled_from([{}, {"etag": "e1"}, {"sha256": "ab", "url": "http://h/a"}])
file_entry = st.builds(
    lambda p, s, b, o: FileEntry(path=p, size=s, blob=BlobId(b), origin=o),
    file_path,
    st.integers(0, 1 << 40),
    hex64,
    origin_meta,
)
manifests = st.builds(
    lambda ref, rev, ps, files: Manifest(ref=ref, revision=rev, piece_size=ps, files=tuple(files)),
    st.text(unicode_char, max_size=8),
    st.none() | st.text(unicode_char, max_size=4),
    st.integers(MIN_PIECE_SIZE, MAX_PIECE_SIZE),
    st.lists(file_entry, max_size=4, unique_by=lambda f: f.path),
)


@PROPS
@given(manifests, st.data())
def test_manifest_digest_ignores_file_order_and_survives_a_round_trip(m: Manifest, data: st.DataObject) -> None:
    shuffled = dataclasses.replace(m, files=tuple(data.draw(st.permutations(m.files))))
    assert shuffled.digest == m.digest
    assert shuffled.canonical_bytes() == m.canonical_bytes()
    back = Manifest.from_bytes(m.canonical_bytes(), expect_digest=m.digest)
    assert back.digest == m.digest
    assert sorted(back.files, key=lambda f: f.path) == sorted(m.files, key=lambda f: f.path)
    assert (back.ref, back.revision, back.piece_size) == (m.ref, m.revision, m.piece_size)
    assert back.total_bytes == sum(f.size for f in m.files)


@PROPS
@given(manifests, st.data())
def test_manifest_digest_changes_when_any_field_changes(m: Manifest, data: st.DataObject) -> None:
    choices = ["ref", "revision", "piece_size"] + (["path", "size", "blob", "origin"] if m.files else [])
    what = data.draw(st.sampled_from(choices))
    if what == "ref":
        other = dataclasses.replace(m, ref=m.ref + "x")
    elif what == "revision":
        other = dataclasses.replace(m, revision=None if m.revision is not None else "")
    elif what == "piece_size":
        other = dataclasses.replace(m, piece_size=m.piece_size + (1 if m.piece_size < MAX_PIECE_SIZE else -1))
    else:
        i = data.draw(st.integers(0, len(m.files) - 1))
        f = m.files[i]
        if what == "path":
            new = data.draw(file_path.filter(lambda p: p not in {g.path for g in m.files}))
            changed = dataclasses.replace(f, path=new)
        elif what == "size":
            changed = dataclasses.replace(f, size=f.size + 1)
        elif what == "blob":
            changed = dataclasses.replace(f, blob=BlobId(data.draw(hex64.filter(lambda h: h != f.blob.hex))))
        else:
            changed = dataclasses.replace(f, origin={**f.origin, "etag": f.origin.get("etag", "") + "x"})
        other = dataclasses.replace(m, files=m.files[:i] + (changed,) + m.files[i + 1 :])
    assert other.digest != m.digest


@PROPS
@given(manifests, st.data())
def test_manifest_bytes_that_do_not_match_the_digest_are_refused(m: Manifest, data: st.DataObject) -> None:
    raw = bytearray(m.canonical_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(bytes(raw), expect_digest=m.digest)
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(m.canonical_bytes(), expect_digest=blake3.blake3(bytes(raw)).hexdigest())


_GOOD_FILE = {"path": "a.bin", "size": 3, "blob": "blake3:" + "ab" * 32, "origin": {}}


def _doc(**over: object) -> bytes:
    doc = {
        "version": 1,
        "ref": "hf://org/name@main",
        "revision": None,
        "piece_size": MIN_PIECE_SIZE,
        "files": [_GOOD_FILE],
    }
    doc.update(over)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'"manifest"',
        _doc(version=2),
        _doc(files="a.bin"),
        _doc(files={"a.bin": 1}),
        _doc(files=[{**_GOOD_FILE, "path": "../../etc/passwd"}]),
        _doc(files=[{**_GOOD_FILE, "path": "/abs"}]),
        _doc(files=[{**_GOOD_FILE, "size": -1}]),
        _doc(files=[{**_GOOD_FILE, "size": True}]),
        _doc(files=[{**_GOOD_FILE, "size": 1.5}]),
        _doc(files=[{**_GOOD_FILE, "blob": "blake3:xyz"}]),
        _doc(files=[{**_GOOD_FILE, "origin": {"sha256": 5}}]),
        _doc(files=[_GOOD_FILE, _GOOD_FILE]),
        _doc(piece_size=1),
        _doc(piece_size="big"),
        _doc(piece_size=None),
        _doc(revision=["main"]),
        b'{"version":1,"ref":"x","revision":null,"piece_size":Infinity,"files":[]}',
        b"[" * 10_000,
    ],
    ids=lambda d: repr(d[:60]),
)
def test_malformed_manifests_raise_integrity_error(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(data)


@PROPS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_integrity_error(data: bytes) -> None:
    try:
        m = Manifest.from_bytes(data)
    except IntegrityError:
        return
    assert all(validate_file_path(f.path) == f.path for f in m.files)


# Infinity is left to the explicit case above.
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_infinity=False)
    | st.text(unicode_char, max_size=8)
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(unicode_char, max_size=6), kids, max_size=3),
    max_leaves=12,
)


@PROPS
@given(
    st.fixed_dictionaries(
        {"version": st.just(1) | json_value, "ref": json_value, "piece_size": json_value, "files": json_value},
        optional={"revision": json_value},
    )
)
def test_manifest_shaped_json_parses_or_raises_integrity_error(doc: dict[str, object]) -> None:
    try:
        Manifest.from_bytes(json.dumps(doc).encode())
    except IntegrityError:
        pass


# --- sizes, priorities -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expect",
    [
        ("500G", 500 * 1024**3),
        ("1.5T", 3 * 1024**4 // 2),
        ("1048576", 1 << 20),
        ("0", 0),
        ("1k", 1024),
        ("2KiB", 2048),
        ("2kb", 2048),
        ("3M", 3 << 20),
        (" 7 G ", 7 << 30),
        ("1P", 1 << 50),
        ("10B", 10),
        (4096, 4096),
    ],
)
def test_parse_size_reads_binary_units(text: str | int, expect: int) -> None:
    assert parse_size(text) == expect


@pytest.mark.parametrize("text", ["", "G", "-1", "12Q", "1.5.5G", "1e3", ".5G", "1 GG", "five", -1, True, False])
def test_parse_size_rejects_non_sizes(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@PROPS
@given(
    st.integers(0, (1 << 53) - 1),
    st.sampled_from([("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40), ("P", 50)]),
    st.sampled_from(["", "B", "iB"]),
    st.booleans(),
)
def test_parse_size_is_exact_for_whole_numbers(n: int, unit: tuple[str, int], suffix: str, lower: bool) -> None:
    letter, shift = unit
    if not letter and suffix == "iB":
        suffix = ""
    text = f"{n}{letter}{suffix}"
    assert parse_size(text.lower() if lower else text) == n << shift


@pytest.mark.parametrize(
    "n, digits, expect",
    [
        (0, 1, "0 B"),
        (1023, 1, "1023 B"),
        (1024, 1, "1.0 KiB"),
        (1536, 2, "1.50 KiB"),
        ((1 << 20) - 1, 2, "1024.00 KiB"),
        (256 << 20, 2, "256.00 MiB"),
        (3 << 29, 1, "1.5 GiB"),
        (1 << 30, 2, "1.00 GiB"),
        (5 << 40, 1, "5.0 TiB"),
        (1 << 50, 1, "1024.0 TiB"),
        (-2048, 1, "-2.0 KiB"),
    ],
)
def test_format_size_names_binary_units(n: int, digits: int, expect: str) -> None:
    assert format_size(n, digits) == expect


@PROPS
@given(st.integers(0, (1 << 40) - 1))
def test_format_size_reads_back_through_parse_size(n: int) -> None:
    # Two decimals of a binary unit: within 0.5 % (+ rounding) of the bytes formatted.
    text = format_size(n, 2).replace(" ", "")
    assert abs(parse_size(text) - n) <= max(1, n // 200)


@pytest.mark.parametrize("member", list(Priority))
def test_priority_parses_its_name_in_any_case(member: Priority) -> None:
    for spelling in (member.name, member.name.lower(), member.name.capitalize()):
        assert Priority.parse(spelling) is member


@pytest.mark.parametrize("text", ["", "urgent", "0", " high", None])
def test_priority_rejects_unknown_names(text: str) -> None:
    with pytest.raises(ValueError):
        Priority.parse(text)


def test_high_priority_sorts_before_normal_before_low() -> None:
    assert sorted([Priority.LOW, Priority.HIGH, Priority.NORMAL]) == [Priority.HIGH, Priority.NORMAL, Priority.LOW]


# --- store events --------------------------------------------------------------------------------

EVENTS = [
    BlobAdded(blob_hex="1" * 64, size=10, identity_key="http|u|e|10"),
    BlobRemoved(blob_hex="1" * 64),
    PartialStarted(key="k" * 64, size=10, piece_size=MIN_PIECE_SIZE),
    PieceVerified(key="k" * 64, index=0, digest=b"\0" * 32),
    PartialDropped(key="k" * 64),
    ManifestAdded(digest="a" * 64),
    ManifestRemoved(digest="a" * 64),
    RefChanged(ref="hf://o/n@main", digest=None),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_store_events_are_frozen_keyword_only_values(event: StoreEvent) -> None:
    assert isinstance(event, StoreEvent)  # the union names every kind the store announces
    fields = dataclasses.asdict(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, next(iter(fields)), None)
    assert not hasattr(event, "__dict__"), "slots: many piece events are alive at once during a fetch"
    assert type(event)(**fields) == event
    with pytest.raises(TypeError):
        type(event)(*fields.values())  # keyword-only: a swapped size and piece size cannot compile
    assert hash(event) == hash(type(event)(**fields))


def test_the_event_union_is_exactly_the_eight_kinds() -> None:
    assert set(StoreEvent.__args__) == {type(e) for e in EVENTS}  # type: ignore[attr-defined]


# --- Range and Content-Range (cached.ranges: the package's one parser) ----------------------------


@pytest.mark.parametrize(
    "value, first, last",
    [
        ("bytes=0-9", 0, 9),
        ("bytes=5-", 5, None),
        ("bytes=-50", None, 50),
        ("  bytes=7-8 ", 7, 8),
        ("bytes=99999999999999999999-", ranges.BEYOND, None),  # more than 18 digits: beyond any file
        ("bytes=0-0000000000000000000001", 0, ranges.BEYOND),
    ],
)
def test_parse_range_reads_the_three_forms(value: str, first: int | None, last: int | None) -> None:
    assert parse_range(value) == RangeRequest(first=first, last=last)


@pytest.mark.parametrize(
    "value", [None, "", "bytes=-", "lines=0-9", "bytes=0-1,5-6", "bytes=a-b", "bytes 0-9", "bytes=0-9-", "bytes=+1-2"]
)
def test_parse_range_finds_no_usable_range(value: str | None) -> None:
    assert parse_range(value) is None


@pytest.mark.parametrize(
    "value, size, span",
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-200", 100, (90, 99)),  # the last byte is clamped to the file
        ("bytes=90-", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-500", 100, (0, 99)),  # a suffix longer than the file is the whole file
        ("bytes=0-0", 1, (0, 0)),
        ("bytes=100-", 100, None),
        ("bytes=20-10", 100, None),
        ("bytes=-0", 100, None),
        ("bytes=0-", 0, None),
        ("bytes=-5", 0, None),
        ("bytes=99999999999999999999-", 100, None),
        ("bytes=0-99999999999999999999", 100, None),  # as before the parsers were one: never satisfiable
        ("bytes=-99999999999999999999", 100, None),
    ],
)
def test_span_resolves_a_range_against_a_file(value: str, size: int, span: tuple[int, int] | None) -> None:
    rng = parse_range(value)
    assert rng is not None
    got = rng.span(size)
    assert (None if got is None else (got.start, got.end)) == span
    if got is not None:
        assert got.length == got.end - got.start + 1 and got.content_range == f"bytes {got.start}-{got.end}/{size}"


@PROPS
@given(st.integers(0, 1000), st.integers(0, 1200), st.none() | st.integers(0, 1200), st.booleans())
def test_a_span_is_the_slice_the_range_names(size: int, a: int, b: int | None, suffix: bool) -> None:
    """Against Python's own slicing: what a Range names in ``data`` is what we serve."""
    data = bytes(range(256)) * 5
    data = data[:size]
    value = f"bytes=-{a}" if suffix else f"bytes={a}-{'' if b is None else b}"
    rng = parse_range(value)
    assert rng is not None
    span = rng.span(size)
    expected = (data[-a:] if a else b"") if suffix else data[a : None if b is None else b + 1]
    if span is None:
        assert expected == b"", value
    else:
        assert 0 <= span.start <= span.end < size
        assert data[span.start : span.end + 1] == expected
        back = ranges.content_range({"Content-Range": span.content_range})
        assert back == (span.start, span.end, size)


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("bytes 0-9/100", (0, 9, 100)),
        ("bytes 5-5/*", (5, 5, None)),
        ("bytes */100", None),
        ("bytes 0-9", None),
        ("", None),
        ("items 0-9/100", None),
    ],
)
def test_content_range(value: str, parsed: tuple[int, int, int | None] | None) -> None:
    assert ranges.content_range({"Content-Range": value}) == parsed
    assert ranges.content_range({}) is None


def test_unsatisfiable_names_the_size() -> None:
    assert ranges.unsatisfiable(123) == "bytes */123"
    assert ByteSpan(start=0, end=0, size=1).content_range == "bytes 0-0/1"
