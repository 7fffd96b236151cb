"""JSON request bodies of the local API, parsed at the edge into a plain object or refused.

A body must be one JSON object; integers beyond 64 bits, ``NaN``/``Infinity`` and nesting too
deep for the parser are a ``RequestError`` (400), never a 500. This module reads and parses
only; what the fields mean is each handler's business.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cached.errors import RequestError

MAX_INT = 2**63 - 1  # the largest integer a body may carry (JSON numbers beyond are refused)


async def read_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise RequestError("request body must be a JSON object")
    try:
        body = json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def _bounded_int(text: str) -> int:
    # Before int(): a 5,000-digit number is refused without the quadratic conversion.
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) > MAX_INT:
        raise RequestError(f"integer out of range in request body (at most {MAX_INT})")
    return value


def _no_constant(name: str) -> Any:
    raise RequestError(f"{name} is not a number this API accepts")
