"""Errors answered as OpenAI-style error objects."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request the server refuses, answered as an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def http_error_handler(request, error) -> JSONResponse:
    """Starlette's own errors (no such route: 404, wrong method: 405) in OpenAI's error shape."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    response = error_response(error.status_code, message.get(error.status_code, str(error.detail)))
    for name, value in (getattr(error, "headers", None) or {}).items():
        response.headers[name] = value
    return response


def validation_error_handler(request, error) -> JSONResponse:  # noqa: ARG001 - Starlette's handler signature
    """FastAPI's own checks of query and path parameters (e.g. "?overwrite=2") as a 400 in OpenAI's shape."""
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None  # ("query", "overwrite") -> "overwrite"
    value = first.get("input")
    return error_response(400, f"{where or 'request'}: {first.get('msg', 'invalid value')}, got {value!r}"[:300], where)
