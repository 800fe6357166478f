"""GBNF grammars for OpenAI ``response_format`` (JSON mode and JSON schema)."""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

# The converter's string rule admits raw control characters, which JSON forbids and
# which a small model will happily emit (a bare newline inside a string); tighten it.
_LOOSE_CHAR = re.compile(r'^char ::= \[\^"\\\\\]', re.MULTILINE)
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F]'


class GrammarError(ValueError):
    """The JSON schema uses something the grammar converter cannot express."""


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """Grammar forcing any JSON object (``schema=None``) or one matching ``schema``."""
    if schema is None:
        return JSON_GBNF
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare exceptions on unsupported schemas
        raise GrammarError(str(exc)) from exc
    return _LOOSE_CHAR.sub(lambda _m: _STRICT_CHAR, gbnf)
