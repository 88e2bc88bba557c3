"""The contract, read from the same models that validate requests: `/openapi.json` and `/docs`."""

from __future__ import annotations

import html

from pydantic.json_schema import models_json_schema
from quart import Blueprint, Response

from server.openai_schema import (ChatRequest, CompletionRequest, DetokenizeRequest,
                                  EmbeddingRequest, TokenizeRequest)

blueprint = Blueprint("docs", __name__)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]},
        # vLLM's own refusals, relayed as vLLM gives them, carry the status as the code
        "code": {"type": ["string", "integer", "null"]}}}}}
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
FORMAT = {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}}


def _operation(summary: str, body: str | None = None, *, secured: bool = True) -> dict:
    responses = {"200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
                 "4XX": {"description": "refused, in OpenAI's error shape",
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}
    operation: dict = {"summary": summary, "responses": responses}
    if body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if secured:
        operation["security"] = BEARER
    return operation


def _object(**properties: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties, "additionalProperties": False}}}}


NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "integer"}}
LIMITS = _object(**{name: {"type": "integer", "minimum": 0}
                    for name in ("rpm", "tpm", "concurrency", "tokens_per_day")},
                 weight={"type": "number"}, priority={"enum": ["interactive", "batch"]})
MODELS = {"type": ["array", "null"], "items": {"type": "string"}}


def _admin(summary: str, *parameters: dict, body: dict | None = None) -> dict:
    operation = {**_operation(f"Admins: {summary}"), "parameters": list(parameters)}
    if body:
        operation["requestBody"] = body
    return operation


ADMIN_PATHS = {
    "/admin/users": {
        "get": _admin("every user"),
        "post": _admin("add a user", body=_object(username={"type": "string"},
                                                 password={"type": "string"},
                                                 role={"enum": ["user", "admin"]}))},
    "/admin/users/{name}": {
        "get": _admin("a user and its keys", NAME),
        "patch": _admin("disable or enable, change role or password", NAME, body=_object(
            disabled={"type": "boolean"}, role={"enum": ["user", "admin"]},
            password={"type": "string"})),
        "delete": _admin("remove a user, its keys, tasks and limits", NAME)},
    "/admin/users/{name}/keys": {
        "get": _admin("a user's API keys", NAME),
        "post": _admin("mint an API key (shown once), optionally limited to some models", NAME,
                       body=_object(name={"type": "string"}, models=MODELS))},
    "/admin/users/{name}/keys/{key_id}": {"delete": _admin("revoke an API key", NAME, KEY_ID)},
    "/admin/users/{name}/limits": {
        "get": _admin("a user's limits", NAME),
        "put": _admin("set some of a user's limits", NAME, body=LIMITS),
        "delete": _admin("remove a user's limits", NAME)},
    "/admin/users/{name}/keys/{key_id}/limits": {
        "get": _admin("a key's limits", NAME, KEY_ID),
        "put": _admin("set some of a key's limits", NAME, KEY_ID, body=LIMITS),
        "delete": _admin("remove a key's limits", NAME, KEY_ID)},
    "/admin/work": {"get": _admin(
        "every user's newest async tasks and batches, with whose they are",
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                   "maximum": 100}})},
    "/admin/usage": {"get": _admin(
        "everyone's usage, or one user's", {"name": "user", "in": "query", "schema": {"type": "string"}},
        {"name": "group_by", "in": "query",
         "schema": {"type": "string", "enum": ["model", "route", "key", "day", "user"]}},
        FORMAT)},
}


CONSOLE_PATHS = {
    "/console/session": {
        "post": {**_operation("Sign in to the console: sets its session cookie (HttpOnly, Secure, "
                              "SameSite=Strict) and gives its CSRF token", secured=False),
                 "requestBody": _object(username={"type": "string"}, password={"type": "string"},
                                        api_key={"type": "string"})},
        "get": _operation("The console session's user, role and CSRF token"),
        "delete": _operation("Sign out of the console (X-CSRF-Token with the cookie)")},
    "/console/live": {"get": _operation("The last hour minute by minute (requests, errors, TTFT "
                                        "and end-to-end p50/p99), workers and queues")},
}
FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
PAGE = [{"name": "limit", "in": "query", "schema": {"type": "integer"}},
        {"name": "after", "in": "query", "schema": {"type": "string"}}]
BATCH_PATHS = {
    "/v1/files": {
        "get": {**_operation("Your files (OpenAI's cursor pagination)"), "parameters": PAGE},
        "post": {**_operation("Upload a JSONL file for a batch (multipart: purpose, file)"),
                 "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                     "type": "object", "required": ["purpose", "file"], "properties": {
                         "purpose": {"type": "string"},
                         "file": {"type": "string", "format": "binary"}}}}}}}},
    "/v1/files/{file_id}": {"get": {**_operation("One file"), "parameters": [FILE_ID]},
                            "delete": {**_operation("Delete a file"), "parameters": [FILE_ID]}},
    "/v1/files/{file_id}/content": {"get": {**_operation("A file's bytes"),
                                            "parameters": [FILE_ID]}},
    "/v1/batches": {
        "get": {**_operation("Your batches, newest first"), "parameters": PAGE},
        "post": {**_operation("Create a batch from an uploaded file"),
                 "requestBody": _object(input_file_id={"type": "string"},
                                        endpoint={"enum": ["/v1/chat/completions",
                                                           "/v1/completions", "/v1/embeddings"]},
                                        completion_window={"enum": ["24h"]},
                                        metadata={"type": "object"})}},
    "/v1/batches/{batch_id}": {"get": {**_operation("One batch"), "parameters": [BATCH_ID]}},
    "/v1/batches/{batch_id}/cancel": {"post": {**_operation("Cancel a batch"),
                                               "parameters": [BATCH_ID]}},
}


def openapi() -> dict:
    """The OpenAPI 3.1 document: the request models' JSON schemas under components."""
    models = (ChatRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest)
    _, schemas = models_json_schema([(model, "validation") for model in models],
                                    ref_template="#/components/schemas/{model}")
    components = {**schemas["$defs"], "Error": ERROR}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cohort", "version": "1",
                 "description": "An OpenAI-compatible gateway in front of your own engines. Unknown "
                                "fields are refused (400) unless COHORT_DROP_PARAMS is set."},
        "paths": {
            "/v1/chat/completions": {"post": _operation("Chat completion (SSE with stream)",
                                                        "ChatRequest")},
            "/v1/completions": {"post": _operation("Text completion (SSE with stream)",
                                                   "CompletionRequest")},
            "/v1/embeddings": {"post": _operation("Embeddings (a worker with COHORT_RUNNER=pooling, "
                                                  "or the mock)", "EmbeddingRequest")},
            "/tokenize": {"post": _operation("vLLM's: a prompt or chat as the model's token ids",
                                             "TokenizeRequest")},
            "/detokenize": {"post": _operation("vLLM's: token ids back to text",
                                               "DetokenizeRequest")},
            "/v1/models": {"get": _operation("Served models, with context length, routes and "
                                             "features")},
            "/v1/models/{model_id}": {"get": {**_operation("One served model (404 model_not_found "
                                                           "if it is not served to you)"),
                                              "parameters": [
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
            "/tasks": {"get": {**_operation("Your async tasks, newest first"), "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                {"name": "offset", "in": "query", "schema": {"type": "integer"}}]}},
            "/v1/usage": {"get": {**_operation("Your requests and tokens over a period, in total "
                                               "and per model, key or day"), "parameters": [
                {"name": "start", "in": "query", "schema": {"type": "string"}},
                {"name": "end", "in": "query", "schema": {"type": "string"}},
                {"name": "group_by", "in": "query",
                 "schema": {"type": "string", "enum": ["model", "route", "key", "day", "user"]}},
                FORMAT]}},
            **ADMIN_PATHS,
            **CONSOLE_PATHS,
            **BATCH_PATHS,
            "/tasks/{task_id}": {"get": {**_operation("One task"), "parameters": [
                {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
            "/inference/async": {"post": _operation("Store a chat or completion as a durable task",
                                                    "ChatRequest")},
            "/inference/batch": {"post": {
                **_operation("Several completions in one call: `prompts` with shared fields, or "
                             "`requests` (whole bodies); `wait: false` stores them as tasks"),
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "model": {"type": "string"},
                        "prompts": {"type": "array", "items": {"type": "string"},
                                    "minItems": 1, "maxItems": 1024},
                        "requests": {"type": "array", "items": {"type": "object"},
                                     "minItems": 1, "maxItems": 1024},
                        "max_tokens": {"type": "integer", "minimum": 1},
                        "wait": {"type": "boolean"}}}}}}}},
            "/token": {"post": {**_operation("A bearer token for a user's password", secured=False),
                                "requestBody": {"required": True, "content": {"application/json": {
                                    "schema": {"type": "object", "properties": {
                                        "username": {"type": "string"},
                                        "password": {"type": "string"}}}}}}}},
            "/health": {"get": _operation("Liveness and workers", secured=False)},
            "/ready": {"get": _operation("Readiness: some worker is ready", secured=False)},
        },
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key (python -m server.users key NAME) or a /token token"}}},
    }


@blueprint.get("/openapi.json")
async def openapi_json():
    return openapi()


@blueprint.get("/docs")
async def docs():
    """The request fields as a page a person reads, without any script from elsewhere."""
    document = openapi()
    sections = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            rows = ""
            ref = operation.get("requestBody", {}).get("content", {}).get(
                "application/json", {}).get("schema", {}).get("$ref", "")
            schema = document["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
            for name, field in schema.get("properties", {}).items():
                kind = field.get("type") or " | ".join(
                    part.get("type") or part.get("$ref", "").rsplit("/", 1)[-1]
                    for part in field.get("anyOf", [])) or "object"
                required = "yes" if name in schema.get("required", []) else ""
                rows += (f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(str(kind))}"
                         f"</td><td>{required}</td><td>{html.escape(str(field.get('default', '')))}</td></tr>")
            table = (f"<table><tr><th>field</th><th>type</th><th>required</th><th>default</th></tr>"
                     f"{rows}</table>") if rows else ""
            sections.append(f"<h2>{method.upper()} {html.escape(path)}</h2>"
                            f"<p>{html.escape(operation['summary'])}</p>{table}")
    page = ("<!doctype html><meta charset=utf-8><title>Cohort API</title><h1>Cohort API</h1>"
            "<p>The machine-readable contract is <a href=/openapi.json>/openapi.json</a>.</p>"
            + "".join(sections))
    return Response(page, content_type="text/html; charset=utf-8")
