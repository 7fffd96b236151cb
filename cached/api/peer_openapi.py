"""The OpenAPI 3 document of the peer API (``/p2p/v1``, ``cached.api.peer``).

Written by hand, like the local document (``cached.api.openapi``), so that it states what a node
promises other nodes and what it refuses: hex ids, integers in [0, 2**63), the member fields and
their length caps that ``peers.membership.MemberInfo`` enforces, a ``Range`` on every piece
request, and the answers (206 over verified bytes only, 416, 429 with Retry-After, 503 when the
replay cache is full). The signature headers of ``peers.auth`` are the security scheme: five
``apiKey`` headers, all required together; a request without a correct signature is 401 and
reaches no handler. Every answer to an accepted request carries ``X-Cached-Node`` and
``X-Cached-Answer`` (the answer MAC); refused ones do not.

It is not served on the peer port (a node has nothing to say to a caller without the key); the
test suite loads it, checks it against the router, and runs schemathesis from it against a real
daemon, signing each generated request.
"""

from __future__ import annotations

from typing import Any

from cached import __version__
from cached.api import openapi as local_openapi
from cached.api.peer import MAX_BODY_BYTES
from cached.peers import auth
from cached.peers.gossip import MAX_MEMBERS_PER_MESSAGE
from cached.peers.membership import (
    MAX_ADDRESS_CHARS,
    MAX_ID_CHARS,
    MAX_INT,
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
)
from cached.transfer.wants import MAX_PIECES

HEX64 = "^[0-9a-f]{64}$"
BLOB_ID = "^(blake3:)?[0-9a-f]{64}$"
COUNT = {"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_INT}
LABELS = {
    "type": "object",
    "maxProperties": MAX_LABELS,
    "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE_CHARS},
    "description": f"keys of 1..{MAX_LABEL_KEY_CHARS} characters",
}

# The five request headers of ``peers.auth``; a request needs all of them (one requirement).
SECURITY_SCHEMES = {
    "peerNode": (auth.HEADER_NODE, "the sender's node id (1..253 printable ASCII characters)"),
    "peerTime": (
        auth.HEADER_TIME,
        f"unix time in seconds when signed; within {auth.WINDOW_S} s of the receiver's clock",
    ),
    "peerNonce": (auth.HEADER_NONCE, "32..128 lower-case hex characters, never reused"),
    "peerBodyDigest": (auth.HEADER_BODY, "hex SHA-256 of the request body (of b'' when there is none)"),
    "peerAuth": (
        auth.HEADER_MAC,
        "hex HMAC-SHA256 under the cluster key over ('cached-request', METHOD, path with query as sent, time, nonce, "
        "body digest, node id)",
    ),
}
SECURITY = [{name: [] for name in SECURITY_SCHEMES}]

_ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}
_SIGNED = {
    auth.HEADER_NODE: {
        "required": True,
        "description": "the answering node's id",
        "schema": {"type": "string", "minLength": 1, "maxLength": 253},
    },
    auth.HEADER_ANSWER: {
        "required": True,
        "description": "HMAC over ('cached-answer', request nonce, status, body digest or range headers, node id)",
        "schema": {"type": "string", "pattern": HEX64},
    },
}
_RETRY_AFTER = {"Retry-After": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _signed(description: str, content: dict[str, Any] | None = None, **headers: Any) -> dict[str, Any]:
    """An answer to an accepted request: signed, with ``content`` if it has a body."""
    return {"description": description, "headers": {**_SIGNED, **headers}, **({"content": content} if content else {})}


def _error(description: str) -> dict[str, Any]:
    return _signed(description, _json(_ERROR_SCHEMA))


# Answers any operation may give: refused (not signed), the replay cache full, or a handler's 4xx.
COMMON = {
    "400": _error("malformed parameter or body"),
    "401": {
        "description": "not signed with the cluster key (nothing reached a handler; not signed)",
        "content": _json(_ERROR_SCHEMA),
    },
    "503": {
        "description": "the replay cache is full of unexpired nonces: retry (not signed)",
        "headers": _RETRY_AFTER,
        "content": _json(_ERROR_SCHEMA),
    },
}
NOT_FOUND = {"404": _error("not held here, or not shared with peers")}
RANGE = {
    "name": "Range",
    "in": "header",
    "required": True,
    "description": "one span, bytes=a-b or bytes=a- (peers always ask for a span)",
    "schema": {"type": "string", "pattern": "^bytes=[0-9]{1,18}-[0-9]{0,18}$"},
}
RANGE_ANSWERS = {
    "206": _signed(
        "the verified bytes of the span (the answer MAC covers Content-Range and Content-Length)",
        {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        **{
            "Content-Range": {"required": True, "schema": {"type": "string", "pattern": "^bytes [0-9]+-[0-9]+/[0-9]+$"}}
        },
    ),
    "416": _signed(
        "no Range, a span outside the blob (with Content-Range: bytes */size), or over pieces not verified here",
        _json(_ERROR_SCHEMA),
        **{"Content-Range": {"required": False, "schema": {"type": "string", "pattern": "^bytes \\*/[0-9]+$"}}},
    ),
    "429": {
        "description": "serving at capacity (max_uploads): try another source",
        "headers": {**_SIGNED, **_RETRY_AFTER},
        "content": _json(_ERROR_SCHEMA),
    },
}
REF_QUERY = {
    "name": "ref",
    "in": "query",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
    "description": "hf:// or http(s):// ref (file:// refs are 404: local to their node)",
}


def _path(name: str, pattern: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": pattern},
    }


def _get(summary: str, responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**COMMON, **responses}}
    if parameters:
        op["parameters"] = parameters
    return {"get": op}


BLOB = _path("id", BLOB_ID, "blob id: BLAKE3 hex of the piece table, optionally prefixed blake3:")
PARTIAL = _path("key", HEX64, "partial key: BLAKE3 hex of the origin identity (holdings list them)")


def schemas() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            "required": ["error", "message"],
        },
        "Member": {
            "type": "object",
            "description": "one node as gossip describes it; a malformed entry is dropped and counted, the rest of the message taken",
            "properties": {
                "node_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
                "address": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_ADDRESS_CHARS,
                    "description": "HOST:PORT of its peer API",
                },
                "cluster": {"type": "string", "maxLength": MAX_ID_CHARS},
                "incarnation": {
                    **COUNT,
                    "description": "start time in ms; more than a day past the receiver's clock is refused",
                },
                "heartbeat": COUNT,
                "holdings_version": COUNT,
                "capacity_bytes": COUNT,
                "labels": LABELS,
            },
            "required": ["node_id", "address", "cluster", "incarnation"],
        },
        "CatalogEntry": {
            "type": "object",
            "description": "file:// and internal http(s):// refs are dropped and counted",
            "properties": {
                "ref": {"type": "string"},
                "replicas": {"type": "integer", "minimum": 0, "maximum": 1000},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "updated_at": {"type": "number"},
                "updated_by": {"type": "string"},
            },
            "required": ["ref", "replicas", "updated_at", "updated_by"],
        },
        "Gossip": {
            "type": "object",
            "properties": {
                "cluster": {
                    "type": "string",
                    "maxLength": MAX_ID_CHARS,
                    "description": "another cluster's message is 403",
                },
                "members": {
                    "type": "array",
                    "maxItems": MAX_MEMBERS_PER_MESSAGE,
                    "items": {"$ref": "#/components/schemas/Member"},
                },
                "catalog": {"type": "array", "items": {"$ref": "#/components/schemas/CatalogEntry"}},
            },
            "required": ["cluster", "members"],
        },
        "Holdings": {
            "type": "object",
            "description": "the deltas after 'base' when the log reaches back, else a snapshot",
            "properties": {
                "version": COUNT,
                "base": COUNT,
                "deltas": {"type": "array", "items": {"type": "array"}},
                "snapshot": {
                    "type": "object",
                    "properties": {
                        "version": COUNT,
                        "blobs": {"type": "object", "additionalProperties": COUNT},
                        "blob_keys": {"type": "object", "additionalProperties": {"type": "string"}},
                        "manifests": {"type": "array", "items": {"type": "string"}},
                        "refs": {"type": "object", "additionalProperties": {"type": "string"}},
                        "partials": {
                            "type": "object",
                            "additionalProperties": {"$ref": "#/components/schemas/PieceTable"},
                        },
                    },
                    "required": ["version", "blobs", "manifests", "refs", "partials"],
                },
            },
            "required": ["version"],
        },
        "PieceTable": {
            "type": "object",
            "description": "verified pieces of a partial blob: index -> BLAKE3 hex",
            "properties": {
                "size": COUNT,
                "piece_size": COUNT,
                "pieces": {"type": "object", "additionalProperties": {"type": "string", "pattern": HEX64}},
            },
            "required": ["size", "piece_size", "pieces"],
        },
        "Manifest": {
            "type": "object",
            "description": "canonical JSON; its BLAKE3 is the digest asked for",
            "properties": {
                "version": {"type": "integer", "enum": [1]},
                "ref": {"type": "string"},
                "revision": {"type": "string", "nullable": True},
                "piece_size": COUNT,
                "files": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "path": {"type": "string"},
                            "size": COUNT,
                            "blob": {"type": "string", "pattern": "^blake3:[0-9a-f]{64}$"},
                            "origin": {"type": "object"},
                        },
                        "required": ["path", "size", "blob"],
                    },
                },
            },
            "required": ["version", "ref", "piece_size", "files"],
        },
        "RefDigest": {
            "type": "object",
            "properties": {
                "ref": {"type": "string"},
                "manifest": {"type": "string", "pattern": "^blake3:[0-9a-f]{64}$"},
            },
            "required": ["ref", "manifest"],
        },
        "Model": local_openapi.document()["components"]["schemas"]["Model"],
        "Want": {
            "type": "object",
            "description": "the sender wants (or no longer wants) an origin file; recorded as it is answered",
            "properties": {
                "key": {"type": "string", "pattern": HEX64, "description": "the origin file's identity key"},
                "want": {"type": "boolean"},
                "size": COUNT,
                "piece_size": COUNT,
                "claimed": _CLAIMS,
                "done": {
                    "type": "object",
                    "maxProperties": MAX_PIECES,
                    "additionalProperties": {"type": "string", "pattern": HEX64},
                    "description": "pieces the sender just verified: decimal piece index -> BLAKE3 hex",
                },
            },
            "required": ["key", "want", "size", "piece_size"],
        },
        "WantAnswer": {
            "type": "object",
            "properties": {
                "key": {"type": "string", "pattern": HEX64},
                "wants": {"type": "boolean", "description": "this node is fetching the same file"},
                "claimed": _CLAIMS,
            },
            "required": ["key", "wants", "claimed"],
        },
    }


_CLAIMS = {
    "type": "array",
    "maxItems": MAX_PIECES,
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_PIECES - 1},
    "description": "pieces held, or being read from the origin, by that node",
}


def peer_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "cached peer API",
            "version": __version__,
            "description": f"node to node, on --peer-listen; every request signed with the cluster key; bodies at most {MAX_BODY_BYTES} bytes",
        },
        "security": SECURITY,
        "paths": {
            "/p2p/v1/gossip": {
                "post": {
                    "summary": "push-pull membership (and the catalog): merge the sender's, answer ours",
                    "requestBody": {"required": True, "content": _json({"$ref": "#/components/schemas/Gossip"})},
                    "responses": {
                        **COMMON,
                        "200": _signed("this node's message", _json({"$ref": "#/components/schemas/Gossip"})),
                        "403": _error("a message of another cluster (not merged)"),
                        "413": _error(f"a body over {MAX_BODY_BYTES} bytes"),
                    },
                }
            },
            "/p2p/v1/wants": {
                "post": {
                    "summary": "origin single-flight: the sender wants an origin file; answer whether we do too",
                    "requestBody": {"required": True, "content": _json({"$ref": "#/components/schemas/Want"})},
                    "responses": {
                        **COMMON,
                        "200": _signed(
                            "this node's want of the same file", _json({"$ref": "#/components/schemas/WantAnswer"})
                        ),
                        "413": _error(f"a body over {MAX_BODY_BYTES} bytes"),
                    },
                }
            },
            "/p2p/v1/holdings": _get(
                "what this node holds: deltas since a version, or a snapshot",
                {"200": _signed("holdings", _json({"$ref": "#/components/schemas/Holdings"}))},
                [
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "schema": COUNT,
                        "description": "the version the caller has (0: none)",
                    }
                ],
            ),
            "/p2p/v1/blobs/{id}": _get("a span of a complete blob", {**RANGE_ANSWERS, **NOT_FOUND}, [BLOB, RANGE]),
            "/p2p/v1/blobs/{id}/pieces": _get(
                "a complete blob's piece table (the piece log: header and BLAKE3 of every piece)",
                {
                    "200": _signed(
                        "piece log", {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
                    ),
                    **NOT_FOUND,
                },
                [BLOB],
            ),
            "/p2p/v1/partials/{key}": _get(
                "a span of a blob still downloading, over verified pieces only",
                {**RANGE_ANSWERS, **NOT_FOUND},
                [PARTIAL, RANGE],
            ),
            "/p2p/v1/partials/{key}/pieces": _get(
                "the verified pieces of a blob still downloading",
                {"200": _signed("piece table", _json({"$ref": "#/components/schemas/PieceTable"})), **NOT_FOUND},
                [PARTIAL],
            ),
            "/p2p/v1/manifests/{digest}": _get(
                "a manifest by digest (never a file:// model's)",
                {"200": _signed("manifest", _json({"$ref": "#/components/schemas/Manifest"})), **NOT_FOUND},
                [
                    _path(
                        "digest",
                        BLOB_ID,
                        "manifest digest: BLAKE3 hex of its canonical JSON, optionally prefixed blake3:",
                    )
                ],
            ),
            "/p2p/v1/refs": _get(
                "the manifest digest this node holds for a ref",
                {"200": _signed("ref and digest", _json({"$ref": "#/components/schemas/RefDigest"})), **NOT_FOUND},
                [REF_QUERY],
            ),
            "/p2p/v1/status": _get(
                "this node's model object for a ref (cluster-wide locate)",
                {"200": _signed("model", _json({"$ref": "#/components/schemas/Model"})), **NOT_FOUND},
                [REF_QUERY],
            ),
        },
        "components": {
            "securitySchemes": {
                name: {"type": "apiKey", "in": "header", "name": header, "description": description}
                for name, (header, description) in SECURITY_SCHEMES.items()
            },
            "schemas": schemas(),
        },
    }
