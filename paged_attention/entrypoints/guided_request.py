"""An OpenAI / vLLM request's structured-output fields -> GuidedDecodingParams.

Accepted spellings, at most one per request:
  * OpenAI's `response_format`: {"type": "text"} (no constraint),
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}};
  * vLLM's `guided_json` (schema object or its text), `guided_regex`,
    `guided_choice`, `guided_grammar` (EBNF), with `guided_decoding_backend`
    and `guided_whitespace_pattern` accepted when they ask for what this server does;
  * newer vLLM's `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}.
Problems are 400s naming the field."""

from __future__ import annotations

from typing import Any, Protocol

from paged_attention.entrypoints.openai_protocol import RequestError
from paged_attention.guided import GuidedDecodingParams

# What guided_decoding_backend may name: this server has one backend.
BACKENDS = (None, "auto", "xgrammar")
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")


class GuidedFields(Protocol):
    response_format: dict[str, Any] | None
    guided_json: str | dict[str, Any] | None
    guided_regex: str | None
    guided_choice: list[str] | None
    guided_grammar: str | None
    guided_decoding_backend: str | None
    guided_whitespace_pattern: str | None
    structured_outputs: dict[str, Any] | None


def _from_response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(
                "response_format json_schema needs a 'json_schema' object with a 'schema'",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            # OpenAI allows a schema-less json_schema: any JSON object then.
            return {"json_object": True}
        return {"json": schema}
    raise RequestError(
        f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
        param="response_format.type",
    )


def guided_decoding_params(req: GuidedFields) -> GuidedDecodingParams | None:
    """The request's constraint, or None; RequestError (400) for a bad or ambiguous one."""
    specs: list[tuple[str, dict[str, Any]]] = []
    if req.response_format is not None:
        spec = _from_response_format(req.response_format)
        if spec is not None:
            specs.append(("response_format", spec))
    for field, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, field)
        if value is not None:
            specs.append((field, {key: value}))
    if req.structured_outputs is not None:
        unknown = sorted(set(req.structured_outputs) - set(_STRUCTURED_KEYS))
        if unknown:
            raise RequestError(
                f"structured_outputs.{unknown[0]} is not supported (one of {', '.join(_STRUCTURED_KEYS)})",
                param=f"structured_outputs.{unknown[0]}",
            )
        specs.append(("structured_outputs", dict(req.structured_outputs)))
    if req.guided_decoding_backend not in BACKENDS:
        raise RequestError(
            f"guided_decoding_backend {req.guided_decoding_backend!r} is not available; this server uses xgrammar",
            param="guided_decoding_backend",
        )
    if req.guided_whitespace_pattern is not None:
        raise RequestError(
            "guided_whitespace_pattern is not supported: JSON is written compact",
            param="guided_whitespace_pattern",
        )
    if not specs:
        return None
    if len(specs) > 1:
        names = ", ".join(name for name, _ in specs)
        raise RequestError(f"give one structured-output constraint, got {names}", param=specs[1][0])
    field, spec = specs[0]
    try:
        return GuidedDecodingParams(**spec)
    except (TypeError, ValueError) as err:
        raise RequestError(f"{field}: {err}", param=field) from None
