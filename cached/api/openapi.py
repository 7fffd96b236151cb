"""The OpenAPI 3 document of the local API (``GET /v1/openapi.json``).

Written by hand, next to the routes it describes (``cached.api.local``), so that it says what the
API promises rather than what a generator guessed: JSON bodies, a model object, and errors as
``{"error", "message"}`` with a 4xx/5xx status. Admin operations carry the ``adminToken`` security
requirement (401 without a credential, 403 with a wrong one); every operation may answer 421 (a
Host that is not this daemon's) or 403 (a foreign Origin), and body operations 415 (not JSON).
Schemathesis runs against it in the test suite, with and without the admin token.
"""

from __future__ import annotations

from typing import Any

from cached import __version__

_ERROR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **(_json(schema) if schema else {})}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:  # OpenAPI 3.0 forbids an empty list here
        schema["required"] = required
    return {"required": True, **_json(schema)}


REF = {"type": "string", "description": "hf://org/name[@rev], http(s)://host/file or file:///path"}
REF_QUERY = {"name": "ref", "in": "query", "required": True, "schema": REF}
MODEL = {"$ref": "#/components/schemas/Model"}
ERRORS = {"400": _ERROR, "404": _ERROR, "409": _ERROR, "415": _ERROR, "421": _ERROR, "default": _ERROR}
ADMIN = {"security": [{"adminToken": []}]}
ADMIN_ERRORS = {"401": _ERROR, "403": _ERROR}


def _admin(operation: dict[str, Any]) -> dict[str, Any]:
    """An admin operation: the security requirement and its 401/403 answers."""
    return {**operation, **ADMIN, "responses": {**operation["responses"], **ADMIN_ERRORS}}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "cached local API", "version": __version__},
        "paths": {
            "/v1/prefetch": {
                "post": {
                    "summary": "make a model ready on this node",
                    "requestBody": _body(
                        {
                            "ref": REF,
                            "wait": {"type": "boolean"},
                            "priority": {"type": "string", "enum": ["high", "normal", "low"]},
                            "timeout_s": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 86400},
                            "refresh": {"type": "boolean"},
                            "include": {"type": "array", "items": {"type": "string"}},
                            "exclude": {"type": "array", "items": {"type": "string"}},
                        },
                        ["ref"],
                    ),
                    "responses": {
                        "200": _ok("ready", MODEL),
                        "202": _ok("accepted, or still fetching", MODEL),
                        **ERRORS,
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "models known here",
                    "parameters": [
                        {
                            "name": "all",
                            "in": "query",
                            "required": False,
                            "description": "1: also failed prefetches older than jobs.failed_ttl_s",
                            "schema": {"type": "string", "enum": ["0", "1"]},
                        }
                    ],
                    "responses": {"200": _ok("models", {"type": "array", "items": MODEL})},
                }
            },
            "/v1/models/status": {
                "get": {
                    "summary": "one model",
                    "parameters": [REF_QUERY],
                    "responses": {"200": _ok("model", MODEL), **ERRORS},
                }
            },
            "/v1/evict": {
                "post": {
                    "summary": "evict a model (with force: an admin operation)",
                    "requestBody": _body({"ref": REF, "force": {"type": "boolean"}}, ["ref"]),
                    "responses": {"200": _ok("model", MODEL), **ERRORS, **ADMIN_ERRORS},
                    # Only 'force' needs the credential; without it evict is open to local callers.
                    "security": [{}, {"adminToken": []}],
                }
            },
            **{
                f"/v1/{verb}": {
                    "post": _admin(
                        {
                            "summary": f"{verb} a model (admin)",
                            "requestBody": _body({"ref": REF}, ["ref"]),
                            "responses": {"200": _ok("model", MODEL), **ERRORS},
                        }
                    )
                }
                for verb in ("pin", "unpin")
            },
            "/v1/leases": {
                "get": {"summary": "active leases", "responses": {"200": _ok("leases", {"type": "array"})}},
                "post": {
                    "summary": "take a lease on a ready model",
                    "requestBody": _body(
                        {
                            "ref": REF,
                            "holder": {"type": "string"},
                            "ttl_s": {"type": "number", "minimum": 1, "maximum": 604800},
                        },
                        ["ref", "holder"],
                    ),
                    "responses": {"201": _ok("lease", {"type": "object"}), **ERRORS},
                },
            },
            "/v1/leases/{lease_id}": {
                "delete": {
                    "summary": "release a lease",
                    "parameters": [{"name": "lease_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _ok("released", {"type": "object"}), **ERRORS},
                }
            },
            "/v1/leases/{lease_id}/renew": {
                "post": {
                    "summary": "extend a live lease to ttl_s from now (a launcher's heartbeat); 404 once it is gone",
                    "parameters": [{"name": "lease_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "requestBody": _body({"ttl_s": {"type": "number", "minimum": 1, "maximum": 604800}}, []),
                    "responses": {"200": _ok("lease", {"type": "object"}), **ERRORS},
                }
            },
            "/v1/verify": {
                "post": _admin(
                    {
                        "summary": "re-hash stored blobs and repair bad pieces (admin)",
                        "requestBody": {"required": False, **_json({"type": "object", "properties": {"ref": REF}})},
                        "responses": {"200": _ok("report", {"type": "object"}), **ERRORS},
                    }
                )
            },
            "/v1/gc": {
                "post": _admin(
                    {
                        "summary": "run eviction now (admin)",
                        "responses": {"200": _ok("result", {"type": "object"}), **ERRORS},
                    }
                )
            },
            "/v1/node": {"get": {"summary": "node summary", "responses": {"200": _ok("node", {"type": "object"})}}},
            "/v1/peers": {"get": {"summary": "membership", "responses": {"200": _ok("peers", {"type": "array"})}}},
            "/v1/locate": {
                "get": {
                    "summary": "who holds a model",
                    "parameters": [REF_QUERY],
                    "responses": {"200": _ok("nodes", {"type": "object"}), **ERRORS},
                }
            },
            "/v1/replicate": {
                "post": _admin(
                    {
                        "summary": "keep N copies in the cluster (admin)",
                        "requestBody": _body(
                            {
                                "ref": REF,
                                "replicas": {"type": "integer", "minimum": 0, "maximum": 1000},
                                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            },
                            ["ref", "replicas"],
                        ),
                        "responses": {"200": _ok("catalog entry", {"type": "object"}), **ERRORS},
                    }
                )
            },
            "/v1/catalog": {
                "get": {
                    "summary": "the cluster catalog",
                    "responses": {"200": _ok("entries", {"type": "array"}), **ERRORS},
                }
            },
            "/v1/cluster": {
                "get": {
                    "summary": "the cluster as this node sees it: members, and which nodes hold or fetch each model",
                    "responses": {"200": _ok("members and models", {"$ref": "#/components/schemas/Cluster"})},
                }
            },
            "/v1/k8s/filter": {
                "post": {
                    "summary": "scheduler extender filter",
                    "requestBody": _body(
                        {"Pod": {"type": "object"}, "NodeNames": {"type": "array", "items": {"type": "string"}}}, []
                    ),
                    "responses": {"200": _ok("ExtenderFilterResult", {"type": "object"}), **ERRORS},
                }
            },
            "/v1/k8s/prioritize": {
                "post": {
                    "summary": "scheduler extender prioritize",
                    "requestBody": _body(
                        {"Pod": {"type": "object"}, "NodeNames": {"type": "array", "items": {"type": "string"}}}, []
                    ),
                    "responses": {"200": _ok("HostPriorityList", {"type": "array"}), **ERRORS},
                }
            },
            "/healthz": {"get": {"summary": "process alive", "responses": {"200": _ok("ok", {"type": "object"})}}},
            "/readyz": {
                "get": {"summary": "store indexed, APIs up", "responses": {"200": _ok("ready"), "503": _ok("starting")}}
            },
        },
        "components": {
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the token in api.admin_token_file (--admin-token-file); a unix-socket caller that is "
                    "root, the daemon's user or in api.admin_group needs none",
                }
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                    "required": ["error", "message"],
                },
                "Cluster": {
                    "type": "object",
                    "description": "GET /v1/cluster (what the status page draws); from gossip, a round behind",
                    "properties": {
                        "node_id": {"type": "string"},
                        "members": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "node_id": {"type": "string"},
                                    "address": {"type": "string", "nullable": True},
                                    "state": {"type": "string", "enum": ["alive", "suspect", "dead"]},
                                    "self": {"type": "boolean"},
                                },
                                "required": ["node_id", "address", "state", "self"],
                            },
                        },
                        "models": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "ref": {"type": "string"},
                                    "replicas": {"type": "integer", "nullable": True},
                                    "holders": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "node_id": {"type": "string"},
                                                "state": {
                                                    "type": "string",
                                                    "enum": ["queued", "fetching", "ready", "failed"],
                                                },
                                                "bytes_done": {"type": "integer"},
                                                "bytes_total": {"type": "integer"},
                                            },
                                            "required": ["node_id", "state", "bytes_done", "bytes_total"],
                                        },
                                    },
                                },
                                "required": ["ref", "replicas", "holders"],
                            },
                        },
                        "truncated": {"type": "boolean"},
                    },
                    "required": ["node_id", "members", "models", "truncated"],
                },
                "Model": {
                    "type": "object",
                    "properties": {
                        "ref": {"type": "string"},
                        "state": {"type": "string", "enum": ["absent", "queued", "fetching", "ready", "failed"]},
                        "bytes_total": {"type": "integer"},
                        "bytes_done": {"type": "integer"},
                        "bytes_in_flight": {
                            "type": "integer",
                            "description": "fetching only: bytes arrived and not verified yet (not in bytes_done)",
                        },
                        "partial": {
                            "type": "boolean",
                            "description": "a model pulled through /hf that holds only some of the repo's files",
                        },
                        "files_held": {"type": "array", "items": {"type": "string"}},
                        "files_missing": {"type": "array", "items": {"type": "string"}, "nullable": True},
                        "path": {"type": "string", "nullable": True},
                        "hf_path": {"type": "string", "nullable": True},
                        "modelscope_path": {
                            "type": "string",
                            "description": "modelscope refs: the MODELSCOPE_CACHE root",
                        },
                        "manifest": {"type": "string", "nullable": True},
                        "pinned": {"type": "boolean"},
                        "leases": {"type": "array"},
                        "error": {"type": "string", "nullable": True},
                        "sources": {
                            "type": "object",
                            "properties": {"peer": {"type": "integer"}, "origin": {"type": "integer"}},
                        },
                    },
                    "required": ["ref", "state", "bytes_total", "bytes_done", "pinned", "leases", "sources"],
                },
            },
        },
    }
