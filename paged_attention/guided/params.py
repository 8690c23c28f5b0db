"""What a request's output must match, in vLLM's `GuidedDecodingParams` shape.

Exactly one of `json` (a JSON schema, as a dict or its JSON text), `regex`,
`choice` (one of these strings), `grammar` (EBNF in llama.cpp's GBNF dialect,
as xgrammar reads it; root rule `root`) or `json_object` (any JSON object).
Validated at construction; compiling happens in the engine (`grammar.py`), so
this module imports nothing heavy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# A guard against requests that ask for unbounded compile work.
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1_000_000


@dataclass(frozen=True)
class GuidedDecodingParams:
    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's flag, with the opposite default: small models (the default 135M
    # one) left free to emit whitespace inside JSON loop on newlines until
    # max_tokens. True: JSON comes out compact (", " and ": " separators).
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError(
                "guided decoding takes exactly one of json, regex, choice, grammar or json_object, "
                f"got {given or 'none'}"
            )
        if self.json is not None:
            self._check_json(self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"guided {name} must be a non-empty string, got {value!r}")
            if isinstance(value, str) and len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"guided {name} has {len(value)} characters; the limit is {MAX_SPEC_CHARS}")
        if self.choice is not None:
            self._check_choice(self.choice)
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"disable_any_whitespace must be a bool, got {self.disable_any_whitespace!r}")

    @staticmethod
    def _check_json(schema: object) -> None:
        if isinstance(schema, str):
            if len(schema) > MAX_SPEC_CHARS:
                raise ValueError(f"guided json has {len(schema)} characters; the limit is {MAX_SPEC_CHARS}")
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ValueError(f"guided json is not valid JSON: {err}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"guided json must be a JSON schema object, got {type(schema).__name__}")

    @staticmethod
    def _check_choice(choice: object) -> None:
        if not isinstance(choice, (list, tuple)) or not choice:
            raise ValueError(f"guided choice must be a non-empty list of strings, got {choice!r}")
        if len(choice) > MAX_CHOICES:
            raise ValueError(f"guided choice has {len(choice)} options; the limit is {MAX_CHOICES}")
        for option in choice:
            # An empty option would let the request end before producing anything.
            if not isinstance(option, str) or not option:
                raise ValueError(f"guided choice options must be non-empty strings, got {option!r}")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, regex, choice, grammar or json_object."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def schema_text(self) -> str | None:
        """The JSON schema as text, or None. Keys keep their order: the order of
        `properties` is the order the output writes them in."""
        if self.json is None:
            return None
        if isinstance(self.json, str):
            return self.json
        return json.dumps(self.json)

    def cache_key(self) -> tuple[str, str, bool]:
        """Equal keys compile to the same grammar."""
        spec: str
        if self.json is not None:
            spec = self.schema_text() or ""
        elif self.choice is not None:
            spec = json.dumps(list(self.choice))
        else:
            spec = self.regex or self.grammar or ""
        return (self.kind, spec, self.disable_any_whitespace)
