"""A small JSON value that satisfies a JSON schema: what the mock answers for `response_format`.

Written by hand because no installed library does this small job: hypothesis-jsonschema draws
random values (the mock must be deterministic) and the JSON-schema libraries only validate. It
covers what structured-output requests use: objects with properties and required fields, arrays
with bounds, strings with enums, lengths and formats, numbers with bounds, booleans, null, const,
enum, anyOf/oneOf/allOf and local `$ref`s.
"""

from __future__ import annotations

from typing import Any

FORMATS = {"date": "2024-01-01", "date-time": "2024-01-01T00:00:00Z", "time": "00:00:00",
           "email": "mock@example.com", "uri": "https://example.com", "uuid":
           "00000000-0000-4000-8000-000000000000", "ipv4": "127.0.0.1"}


def sample(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A deterministic value valid under `schema` (an empty object for what it cannot read)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 32:
        return {}
    if "$ref" in schema:
        return sample(_resolve(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return sample(schema[key][0], root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(_resolve(part["$ref"], root) if "$ref" in part else part)
        return sample(merged, root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: sample(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        count = max(1, schema.get("minItems", 1))
        count = min(count, schema.get("maxItems", count))
        return [sample(schema.get("items", {"type": "string"}), root, depth + 1) for _ in range(count)]
    if kind == "string":
        if schema.get("format") in FORMATS:
            return FORMATS[schema["format"]]
        text = "mock"
        low, high = schema.get("minLength", 0), schema.get("maxLength", len(text))
        return (text * (1 + low // len(text)))[:max(low, min(high, len(text)))]
    if kind in ("integer", "number"):
        value = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        value = min(value, schema.get("maximum", value))
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    return None


def _resolve(ref: str, root: Any) -> Any:
    """A local reference (`#/$defs/Name`); anything else reads as an empty schema."""
    if not ref.startswith("#/"):
        return {}
    node = root
    for part in ref[2:].split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node
