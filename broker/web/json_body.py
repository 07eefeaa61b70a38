"""Reading an API request body: one strict check at the boundary, so that nothing a client sends
reaches the use cases in a shape that fails later (a lone surrogate cannot be encoded for SQLite
or the audit JSON; deep nesting overflows the parser's stack) and turns into a 500.

The rules: a JSON object (RFC 8259), sent as `application/json`, in UTF-8, no key given twice,
no NaN/Infinity, at most `MAX_DEPTH` levels deep, and every key and string valid Unicode text
without NUL."""

from __future__ import annotations

import json
import re

from flask import request

from ..errors import InvalidRequest

MAX_DEPTH = 8  # the API's bodies are flat objects; more is not a request anyone means
# A lone surrogate (what "\ud800" decodes to) is not a character: it cannot be written as UTF-8.
# NUL ends strings in C, terminals and PostgreSQL; no field of the API has a use for it.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def json_object(expected: str, required: bool = True) -> dict:
    """The request's body as a dict, or InvalidRequest (400) saying what was expected."""
    data = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: werkzeug's 413...
    request.stream.read(1)  # ...which a chunked body only meets here: get_data stops at the limit
    if not data and not required:
        return {}
    if not request.is_json:
        raise InvalidRequest(f"send Content-Type: application/json and {expected}")
    body = _parse(data, expected)
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object with {expected}")
    _check_values(body)
    return body


def _parse(data: bytes, expected: str) -> object:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the body must be UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_no_repeated_keys, parse_constant=_no_constant)
    except InvalidRequest:
        raise
    except RecursionError:
        raise InvalidRequest(f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:  # JSONDecodeError, and an integer of more digits than Python converts
        raise InvalidRequest(f"the body must be a JSON object with {expected}") from None


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """Parsers disagree on which of two equal keys wins; refuse rather than pick one."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise InvalidRequest(f"the body gives {_shown(key)} more than once")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> object:
    raise InvalidRequest(f"{name} is not a JSON number")


def _check_values(body: dict) -> None:
    """Walk the parsed body (without recursion) for depth and for text that is not text."""
    stack: list[tuple[object, str, int]] = [(body, "the body", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"the body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, "a key")
                stack.append((item, _shown(key) if depth == 1 else where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, where, depth + 1) for item in value)


def _check_text(text: str, where: str) -> None:
    found = _NOT_TEXT.search(text)
    if found is not None:
        what = "a NUL character" if found.group() == "\x00" else "a lone surrogate (not Unicode)"
        raise InvalidRequest(f"{where} contains {what}")


def _shown(key: str) -> str:
    """A key for a message: printable and short, whatever the client sent."""
    return repr(_NOT_TEXT.sub("?", key[:40]))
