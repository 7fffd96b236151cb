"""The model-status values and the pure parts of "who holds this model": the model object's JSON
(keys, their order, what is left out), a node's copy read from its gossiped holdings, and the
extender's score."""

from __future__ import annotations

import json

from cached.api.k8s import score
from cached.cluster import Holding, holding_in
from cached.peers.holdings import NodeHoldings
from cached.status import Copy, ModelStatus, Replicas, Revision, SourceBytes
from cached.store.claims import Lease
from cached.types import BlobId, FileEntry, JobState, Manifest, OriginFile
from tests.support.contract import MODEL_FIELDS

D1, D2 = "1" * 64, "2" * 64
BASE_KEYS = list(MODEL_FIELDS)


def test_an_absent_model_has_the_base_keys_only_in_contract_order() -> None:
    got = ModelStatus(ref="https://h/m.gguf", state=JobState.ABSENT).to_json()
    assert list(got) == BASE_KEYS
    assert got == {
        "ref": "https://h/m.gguf",
        "state": "absent",
        "bytes_total": 0,
        "bytes_done": 0,
        "path": None,
        "hf_path": None,
        "manifest": None,
        "pinned": False,
        "leases": [],
        "error": None,
        "sources": {"peer": 0, "origin": 0},
    }


def test_a_fetching_model_adds_its_rate_rounded() -> None:
    got = ModelStatus(
        ref="https://h/m.gguf",
        state=JobState.FETCHING,
        bytes_total=100,
        bytes_done=40,
        rate_bps=1234.6,
        bytes_in_flight=7,
        sources=SourceBytes(peer=30, origin=10),
    ).to_json()
    assert list(got) == BASE_KEYS + ["rate_bps", "bytes_in_flight"]
    assert got["bytes_in_flight"] == 7  # arrived, not verified: apart from bytes_done
    assert got["rate_bps"] == 1235 and got["sources"] == {"peer": 30, "origin": 10}


def test_a_failed_model_carries_its_error_and_code_after_the_rate() -> None:
    got = ModelStatus(
        ref="https://h/m.gguf",
        state=JobState.FAILED,
        error="origin said 404",
        error_code="origin_not_found",
        rate_bps=0.0,
    ).to_json()
    assert list(got) == BASE_KEYS + ["rate_bps", "error_code"]
    assert (got["error"], got["error_code"]) == ("origin said 404", "origin_not_found")


def test_a_ready_hf_model_in_the_catalog_has_every_key() -> None:
    lease = Lease(lease_id="l1", ref="hf://org/m@main", holder="vllm@pod-1", expires_at=5000.0, manifest=D2)
    status = ModelStatus(
        ref="hf://org/m@main",
        state=JobState.READY,
        bytes_total=9,
        bytes_done=9,
        pinned=True,
        leases=(lease,),
        rate_bps=0.0,
        replicas=Replicas(target=2, owners=("a", "b"), spare=False),
        copy=Copy(
            path="/c/models/m",
            manifest=D1,
            revision="c0ffee",
            files=3,
            last_used=1000.5,
            hf_path="/c/hf",
            snapshot_path="/c/hf/models--org--m/snapshots/c0ffee",
            revisions=(
                Revision(revision="c0ffee", manifest=D1, current=True),
                Revision(revision="beef", manifest=D2, current=False, leases=("l1",)),
            ),
        ),
    )
    got = status.to_json()
    assert list(got) == BASE_KEYS + [
        "rate_bps",
        "replicas",
        "revision",
        "files",
        "last_used",
        "snapshot_path",
        "revisions",
    ]
    assert got["path"] == "/c/models/m" and got["hf_path"] == "/c/hf" and got["manifest"] == f"blake3:{D1}"
    assert got["leases"] == [
        {
            "lease_id": "l1",
            "ref": "hf://org/m@main",
            "holder": "vllm@pod-1",
            "expires_at": 5000.0,
            "manifest": f"blake3:{D2}",
        }
    ]
    assert got["replicas"] == {"target": 2, "owners": ["a", "b"], "spare": False}
    assert got["revisions"] == [
        {"revision": "c0ffee", "manifest": f"blake3:{D1}", "current": True},
        {"revision": "beef", "manifest": f"blake3:{D2}", "current": False, "leases": ["l1"]},
    ]
    json.dumps(got)  # plain JSON all the way down


def test_a_ready_non_hf_model_has_no_snapshot_path() -> None:
    copy = Copy(
        path="/c/models/m",
        manifest=D1,
        revision=None,
        files=1,
        last_used=1.0,
        revisions=(Revision(revision=None, manifest=D1, current=True),),
    )
    got = ModelStatus(ref="https://h/m.gguf", state=JobState.READY, copy=copy).to_json()
    assert list(got) == BASE_KEYS + ["revision", "files", "last_used", "revisions"]
    assert got["hf_path"] is None and got["revision"] is None


# --- a node's copy from its holdings ------------------------------------------------------------

PIECE = 1 << 20
REF = "https://models.example/m"


def entry(path: str, size: int, blob_digit: str) -> FileEntry:
    return FileEntry(
        path=path, size=size, blob=BlobId(blob_digit * 64), origin={"identity": f"{REF}/{path}|etag|{size}"}
    )


def key_of(f: FileEntry) -> str:
    return OriginFile(path=f.path, size=f.size, identity=f.origin["identity"]).key


FILES = (entry("a.bin", 3 * PIECE, "a"), entry("b.bin", 2 * PIECE + 100, "b"))
MANIFEST = Manifest(ref=REF, piece_size=PIECE, files=FILES)
TOTAL = 5 * PIECE + 100


def test_a_ref_in_the_holdings_is_a_ready_copy() -> None:
    h = NodeHoldings(refs={REF: MANIFEST.digest})
    assert holding_in("a", REF, h, MANIFEST) == Holding(
        node_id="a", state=JobState.READY, bytes_done=TOTAL, bytes_total=TOTAL
    )
    assert holding_in("a", REF, h, None) == Holding(node_id="a", state=JobState.READY, bytes_done=0, bytes_total=0)


def test_a_partial_of_one_of_its_files_is_a_copy_in_flight_counted_by_verified_pieces() -> None:
    h = NodeHoldings(blobs={"a" * 64: 3 * PIECE})  # a.bin complete
    h.apply(["partial+", key_of(FILES[1]), FILES[1].size, PIECE])
    h.apply(["piece", key_of(FILES[1]), 2, "f" * 64])  # the short last piece: 100 bytes
    got = holding_in("b", REF, h, MANIFEST)
    assert got == Holding(node_id="b", state=JobState.FETCHING, bytes_done=3 * PIECE + 100, bytes_total=TOTAL)
    assert score(got) == int((3 * PIECE + 100) / TOTAL * 9)


def test_a_partial_with_nothing_verified_yet_still_counts_as_in_flight() -> None:
    h = NodeHoldings()
    h.apply(["partial+", key_of(FILES[0]), FILES[0].size, PIECE])
    got = holding_in("b", REF, h, MANIFEST)
    assert got is not None and got.state is JobState.FETCHING and got.bytes_done == 0
    assert score(got) == 1


def test_blobs_alone_or_an_unknown_manifest_say_nothing() -> None:
    # Files another model shares are no sign of a fetch of this one.
    assert holding_in("c", REF, NodeHoldings(blobs={"a" * 64: 3 * PIECE}), MANIFEST) is None
    h = NodeHoldings()
    h.apply(["partial+", key_of(FILES[0]), FILES[0].size, PIECE])
    assert holding_in("c", REF, h, None) is None  # which partials are this model's is not known
    assert holding_in("c", REF, NodeHoldings(), MANIFEST) is None


def test_scores() -> None:
    assert score(None) == 0
    assert score(Holding(node_id="a", state=JobState.READY, bytes_done=0, bytes_total=0)) == 10
    assert score(Holding(node_id="a", state=JobState.QUEUED, bytes_done=0, bytes_total=0)) == 1
    assert (
        score(Holding(node_id="a", state=JobState.FETCHING, bytes_done=99, bytes_total=100)) == 8
    )  # floor of 9 x progress
    assert (
        score(Holding(node_id="a", state=JobState.FETCHING, bytes_done=100, bytes_total=100)) == 9
    )  # complete, not yet ready
