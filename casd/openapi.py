"""docs/PROTOCOL.md as an OpenAPI 3.1 document, served at `GET /v1/openapi.json`."""

from __future__ import annotations

import json
from functools import cache

from aiohttp import web

from casd import __version__, protocol

_HEX = "^([0-9a-fA-F]{32}|[0-9a-fA-F]{64})$"
_FILE_NAME = "^" + protocol.FILE_NAME_PATTERN + "$"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return {"$ref": "#/components/responses/Error", "description": description}


# Every answer may be an error in the one JSON shape; the codes listed per operation are the
# ones PROTOCOL.md names, and `default` covers the rest (401, 405, 413, 415, 429, 500, 507...).
_ERRORS = {"default": _error("an error in the JSON error shape")}
# A request body of raw bytes: a chunk, or a whole one-chunk file.
_BINARY_BODY = {
    "required": True,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
# In tenant mode (docs/tenants.md) a token whose role may not do an operation gets 403.
_ROLE = {"403": _error("forbidden: this token's role may not do this (tenant mode)")}

_UPLOAD_ID = {
    "name": "upload_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_LINK_UPLOAD = {"upload_id": "$response.body#/upload_id"}


def _schemas() -> dict:
    digest = {"type": "string", "pattern": _HEX}
    # In a request the algorithm may be left out or null: MD5, as for a v1 client.
    algo_asked = {"enum": ["md5", "sha256", None]}
    chunk = {
        "type": "object",
        "properties": {"md5": digest, "sha256": digest, "size": {"type": "integer", "minimum": 1}},
        "required": ["size"],
    }
    complete = {
        "type": "object",
        "properties": {
            "status": {"const": "complete"},
            "algo": {"enum": ["md5", "sha256"]},
            "md5": digest,
            "sha256": digest,
            "size": {"type": "integer", "minimum": 0},
            "url": {"type": "string"},
            # A streamed upload's merge that found the file stored already (PROTOCOL.md).
            "instant": {"const": True},
        },
        "required": ["status", "size", "url"],
    }
    pending = {
        "type": "object",
        "properties": {
            "status": {"const": "pending"},
            "algo": {"enum": ["md5", "sha256"]},
            "md5": digest,
            "sha256": digest,
            "size": {"type": "integer", "minimum": 0},
            "upload_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "missing": {"type": "array", "items": {"type": "string"}},
            "expires_at": {"type": "string", "format": "date-time"},
        },
        "required": ["status", "upload_id", "missing", "expires_at"],
    }
    return {
        "Error": {
            "type": "object",
            "description": "Every error answer. `error` is a code of PROTOCOL.md's table or"
            " notes; the list is open: new codes may appear, clients treat unknown ones by"
            " their HTTP status.",
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "missing": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["error", "message"],
        },
        "Handshake": {
            "type": "object",
            "properties": {
                "algo": algo_asked,
                "md5": digest,
                "sha256": digest,
                "size": {"type": "integer", "minimum": 0},
                "ext": {"type": ["string", "null"], "pattern": "^(" + protocol.EXT_PATTERN + ")?$"},
                "name": {"type": ["string", "null"], "maxLength": 255},
                "chunks": {"type": "array", "items": chunk},
            },
            "required": ["size", "chunks"],
        },
        "Complete": complete,
        "Pending": pending,
        # GET /v1/uploads/{id} of a v1.1 streamed upload still taking digests (no digest yet).
        "OpenUpload": {
            "type": "object",
            "properties": {
                "status": {"const": "open"},
                "upload_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "algo": {"enum": ["md5", "sha256"]},
                "size": {"type": "integer", "minimum": 0},
                "expires_at": {"type": "string", "format": "date-time"},
                "missing": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["status", "upload_id", "missing", "expires_at"],
        },
        "ChunkStored": {
            "type": "object",
            "properties": {
                "stored": {"type": "boolean"},
                "missing": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["stored"],
        },
        "Capabilities": {
            "type": "object",
            "properties": {
                "protocol": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "stream_uploads": {"type": "boolean"},
                "algos": {"type": "array", "items": {"enum": ["md5", "sha256"]}},
                "max_chunk_size": {"type": "integer"},
                "max_chunks": {"type": "integer"},
                "max_file_size": {"type": "integer"},
                "max_batch": {"type": "integer"},
                "file_put": {
                    "type": "boolean",
                    "description": "v1.1: PUT /v1/files/{name} takes a file of one chunk",
                },
            },
            "required": ["protocol", "versions", "stream_uploads"],
        },
        "OpenStream": {
            "type": "object",
            "properties": {
                "algo": algo_asked,
                "ext": {"type": ["string", "null"], "pattern": "^(" + protocol.EXT_PATTERN + ")?$"},
                "name": {"type": ["string", "null"], "maxLength": 255},
                # The file's size, required in tenant mode (quota); merge must claim it.
                "size": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "Opened": {
            "type": "object",
            "properties": {
                "status": {"const": "open"},
                "upload_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "algo": {"enum": ["md5", "sha256"]},
                "count": {"type": "integer", "minimum": 0},
                "size": {"type": "integer", "minimum": 0},
                "expires_at": {"type": "string", "format": "date-time"},
            },
            "required": ["status", "upload_id", "algo", "expires_at"],
        },
        "Batch": {
            "type": "object",
            "properties": {
                "algo": algo_asked,
                "start": {"type": "integer", "minimum": 0},
                "chunks": {"type": "array", "items": chunk},
            },
            "required": ["start", "chunks"],
        },
        "Listed": {
            "type": "object",
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "size": {"type": "integer", "minimum": 0},
                "missing": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["count", "size", "missing"],
        },
        "Claim": {
            "type": "object",
            "description": "a streamed upload's file digest and size, given at merge (v1.1)",
            "properties": {
                "algo": algo_asked,
                "md5": digest,
                "sha256": digest,
                "size": {"type": "integer", "minimum": 0},
            },
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"const": "ok"}},
            "required": ["status"],
        },
    }


@cache
def document() -> dict:
    """The OpenAPI 3.1 description of every route `create_app` registers."""
    file_name = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "the file's digest, optionally followed by .ext (not on DELETE)",
        "schema": {"type": "string", "pattern": _FILE_NAME},
    }
    file_ok = {
        "description": "the file's bytes (206: the requested range)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    download = {
        "parameters": [file_name, {"name": "Range", "in": "header", "schema": {"type": "string"}}],
        "responses": {
            "200": file_ok,
            "206": file_ok,
            "304": {"description": "not modified"},
            "404": _error("no such file"),
            "416": _error("range not satisfiable"),
            **_ERRORS,
        },
    }
    paths = {
        "/v1/handshake": {
            "post": {
                "operationId": "handshake",
                "summary": "describe a file by its chunks; learn which chunks are missing",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref("Handshake"),
                            # A one-byte file ("a"): pending on a fresh server, so links reach its upload.
                            "examples": {
                                "one_byte": {
                                    "value": {
                                        "md5": "0cc175b9c0f1b6a831c399e269772661",
                                        "size": 1,
                                        "name": "a.txt",
                                        "chunks": [
                                            {"md5": "0cc175b9c0f1b6a831c399e269772661", "size": 1}
                                        ],
                                    }
                                }
                            },
                        }
                    },
                },
                "responses": {
                    "200": {
                        **_json(
                            {"oneOf": [_ref("Complete"), _ref("Pending")]},
                            "complete (instant upload) or pending",
                        ),
                        "links": {
                            "status": {"operationId": "uploadStatus", "parameters": _LINK_UPLOAD},
                            "merge": {"operationId": "merge", "parameters": _LINK_UPLOAD},
                            "abort": {"operationId": "abort", "parameters": _LINK_UPLOAD},
                        },
                    },
                    "400": _error("malformed handshake"),
                    **_ROLE,
                    "413": _error(
                        "over a limit (too_large), or over the tenant's quota (quota_exceeded,"
                        " with `quota` and `usage` in bytes)"
                    ),
                    **_ERRORS,
                },
            }
        },
        "/v1/uploads/{upload_id}": {
            "get": {
                "operationId": "uploadStatus",
                "parameters": [_UPLOAD_ID],
                "responses": {
                    "200": _json(
                        {"oneOf": [_ref("Pending"), _ref("OpenUpload")]},
                        "the pending upload (v1.1: open, while it takes digests)",
                    ),
                    "404": _error("no such pending upload"),
                    **_ROLE,
                    **_ERRORS,
                },
            },
            "delete": {
                "operationId": "abort",
                "parameters": [_UPLOAD_ID],
                "responses": {
                    "204": {"description": "aborted"},
                    "404": _error("no such pending upload"),
                    **_ROLE,
                    **_ERRORS,
                },
            },
        },
        "/v1/uploads/{upload_id}/chunks/{digest}": {
            "put": {
                "operationId": "putChunk",
                "parameters": [
                    _UPLOAD_ID,
                    {
                        "name": "digest",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": _HEX},
                    },
                ],
                "requestBody": _BINARY_BODY,
                "responses": {
                    "201": _json(_ref("ChunkStored"), "stored"),
                    "200": _json(_ref("ChunkStored"), "already held"),
                    "404": _error("no such pending upload"),
                    **_ROLE,
                    "409": _error("not in the manifest"),
                    "422": _error("digest or size mismatch"),
                    **_ERRORS,
                },
            }
        },
        "/v1/capabilities": {
            "get": {
                "operationId": "capabilities",
                "summary": "what this server offers (v1.1: streamed uploads)",
                "responses": {"200": _json(_ref("Capabilities"), "the offer"), **_ERRORS},
            }
        },
        "/v1/uploads": {
            "post": {
                "operationId": "openStream",
                "summary": "v1.1: open a streamed upload (404 when the server does not offer it)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("OpenStream")}},
                },
                "responses": {
                    "201": _json(_ref("Opened"), "opened"),
                    "400": _error("malformed request, or an algorithm the policy refuses"),
                    "404": _error("streamed uploads are not offered"),
                    **_ROLE,
                    "413": _error("too large, or over the tenant's quota (tenant mode)"),
                    **_ERRORS,
                },
            }
        },
        "/v1/uploads/{upload_id}/chunks": {
            "post": {
                "operationId": "listChunks",
                "summary": "v1.1: list the next chunks of a streamed upload; which are missing",
                "parameters": [_UPLOAD_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Batch")}},
                },
                "responses": {
                    "200": _json(_ref("Listed"), "listed"),
                    "400": _error("malformed batch"),
                    "404": _error("no such open streamed upload"),
                    "409": _error("the batch does not start where the list ends (`count`)"),
                    "413": _error("over a limit"),
                    **_ERRORS,
                },
            }
        },
        "/v1/uploads/{upload_id}/merge": {
            "post": {
                "operationId": "merge",
                "parameters": [_UPLOAD_ID],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("Claim")}},
                },
                "responses": {
                    "200": _json(_ref("Complete"), "merged"),
                    "404": _error("no such upload"),
                    **_ROLE,
                    "409": _error("chunks still missing (`missing`)"),
                    "422": _error("file digest mismatch"),
                    **_ERRORS,
                },
            }
        },
        "/v1/files": {
            "get": {
                "operationId": "listFiles",
                "summary": "tenant mode only: the files this tenant owns (an admin's token:"
                " every file), in digest order, a page at a time; 404 without tenants",
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "list the files whose digest sorts after this one"
                        " (the `next` of the page before)",
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{0,64}$"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "at most this many files (default and most: 1000)",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["files", "next"],
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": [
                                            "algo",
                                            "size",
                                            "name",
                                            "ext",
                                            "created",
                                            "url",
                                        ],
                                        "properties": {
                                            "algo": {"enum": ["md5", "sha256"]},
                                            "md5": {"type": "string", "pattern": _HEX},
                                            "sha256": {"type": "string", "pattern": _HEX},
                                            "size": {"type": "integer", "minimum": 0},
                                            "name": {"type": "string"},
                                            "ext": {"type": "string"},
                                            "created": {"type": "string", "format": "date-time"},
                                            "url": {"type": "string"},
                                        },
                                    },
                                },
                                "next": {
                                    "type": ["string", "null"],
                                    "description": "the `after` of the next page; null: no"
                                    " more files",
                                },
                            },
                        },
                        "a page of the tenant's files",
                    ),
                    "404": _error("not in tenant mode: no such endpoint"),
                    **_ROLE,
                    **_ERRORS,
                },
            }
        },
        # One path for the two routes on /v1/files/...: OpenAPI treats templates that differ
        # only in parameter names as the same path.
        "/v1/files/{name}": {
            "get": {"operationId": "download", **download},
            "head": {"operationId": "downloadHead", **download},
            "put": {
                "operationId": "putFile",
                "summary": "v1.1: upload a file of at most one chunk in one request (handshake,"
                " chunk PUT and merge in one; the same checks)",
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "the file's digest (32 or 64 hex: MD5 or SHA-256), then"
                        " optionally its ext, as in the URL a merge answers",
                        "schema": {
                            "type": "string",
                            "pattern": "^([0-9a-fA-F]{32}|[0-9a-fA-F]{64})("
                            + protocol.EXT_PATTERN
                            + ")?$",
                        },
                    },
                    {
                        "name": "name",
                        "in": "query",
                        "required": False,
                        "description": "the file's name (at most 255 characters), only echoed",
                        "schema": {"type": "string", "maxLength": 255},
                    },
                    {
                        "name": "size",
                        "in": "query",
                        "required": False,
                        "description": "the body's size when it has no Content-Length",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "requestBody": _BINARY_BODY,
                "responses": {
                    "201": _json(_ref("Complete"), "stored by this request"),
                    "200": _json(_ref("Complete"), "complete already; the body was not read"),
                    "400": _error("bad digest, ext, name or size"),
                    **_ROLE,
                    "413": _error("over the chunk limit, or over the tenant's quota"),
                    "422": _error("digest or size mismatch: nothing was stored"),
                    **_ERRORS,
                },
            },
            "delete": {
                "operationId": "deleteFile",
                "parameters": [file_name],
                "responses": {
                    "204": {"description": "deleted (in tenant mode: this tenant's ownership)"},
                    "404": _error("no such file"),
                    **_ROLE,
                    **_ERRORS,
                },
            },
        },
        "/v1/files/{name}/chunks": {
            "get": {
                "operationId": "fileChunks",
                "parameters": [file_name],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["algo", "size", "count", "chunks"],
                            "properties": {
                                "algo": {"enum": ["md5", "sha256"]},
                                "size": {"type": "integer", "minimum": 0},
                                "count": {"type": "integer", "minimum": 0},
                                "chunks": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["digest", "size", "offset"],
                                        "properties": {
                                            "digest": {"type": "string"},
                                            "size": {"type": "integer", "minimum": 1},
                                            "offset": {"type": "integer", "minimum": 0},
                                            "xxh3": {
                                                "type": "string",
                                                "pattern": "^[0-9a-f]{32}$",
                                                "description": "optional: xxh3-128 of the"
                                                " chunk's bytes, as verified on upload",
                                            },
                                        },
                                    },
                                },
                            },
                        },
                        "the file's manifest, in order",
                    ),
                    "404": _error("no such file"),
                    **_ERRORS,
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "this document"), **_ERRORS},
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "responses": {
                    "200": _json(_ref("Health"), "healthy"),
                    "503": _error("unhealthy"),
                    **_ERRORS,
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text format (docs/operating.md)",
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            }
        },
        "/": {
            "get": {
                "operationId": "uploadPage",
                "responses": {
                    "200": {
                        "description": "the upload page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            }
        },
        "/static/{path}": {
            "get": {
                "operationId": "static",
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "a file of the upload page"}, **_ERRORS},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "casd",
            "version": __version__,
            "description": "Content-addressed, deduplicating, resumable uploads."
            " The prose contract is docs/PROTOCOL.md.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "responses": {"Error": _json(_ref("Error"), "an error")},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# Routes only a tenant-mode daemon has (docs/tenants.md); another leaves them out.
TENANT_ONLY = ("/v1/files",)


async def serve(request: web.Request) -> web.Response:
    tenants = request.app.router.named_resources().get("listFiles") is not None
    return web.Response(text=_text(tenants), content_type="application/json")


@cache
def _text(tenants: bool) -> str:
    doc = document()
    if not tenants:  # a copy: document() is cached, and every caller gets the whole
        paths = {p: ops for p, ops in doc["paths"].items() if p not in TENANT_ONLY}
        doc = {**doc, "paths": paths}
    return json.dumps(doc, indent=1)
