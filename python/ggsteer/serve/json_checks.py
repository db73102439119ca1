"""Checks on a parsed JSON body before any field is read: nesting depth and encodable strings.

Python's json module accepts a lone UTF-16 surrogate ("\\ud800") as a string, which no tokenizer
or file system can encode, and it recurses once per nesting level, so a body of 5,000 nested
arrays fails deep inside the parser. Both are the client's 400, found here in one walk.
"""

from __future__ import annotations

from ggsteer.serve.errors import ApiError

MAX_JSON_DEPTH = 64  # far deeper than any OpenAI request or JSON schema a client sends


def check_json_value(data) -> None:
    """ApiError(400) naming the first place nested deeper than MAX_JSON_DEPTH or holding a string
    (or object key) that cannot be encoded as UTF-8."""
    pending = [(data, "body", 0)]
    while pending:  # iterative: the walk itself must not recurse as deep as the body nests
        value, where, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep (at {where})")
        if isinstance(value, str):
            check_encodable(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                check_encodable(key, f"{where} key")
                pending.append((item, f"{where}.{key}", depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{where}.{i}", depth + 1) for i, item in enumerate(value))


def check_encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        place = where.removeprefix("body.")
        raise ApiError(400, f"{place}: the string holds a character that is not valid Unicode "
                            f"({text[error.start]!r} at {error.start}, a lone surrogate)", place) from None
