"""Every error the server returns has OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Code anywhere in the server raises `APIError`; the app's exception handlers turn it (and anything unexpected)
into a response with `error_response`, so the shape lives in this one place.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

# OpenAI's error types by HTTP status; anything else 4xx is an invalid request, 5xx a server error.
_TYPES = {
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error for the client, with the HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.headers = headers or {}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.status, error.message, param=error.param, code=error.code, type=error.type)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def sse_error(error: APIError) -> str:
    """The same error as one server-sent event, for failures after a stream has started."""
    body = error_body(error.status, error.message, param=error.param, code=error.code, type=error.type)
    return f"data: {json.dumps(body)}\n\n"


def model_not_found(name: str, detail: str | None = None) -> APIError:
    message = f"The model '{name}' does not exist" + (f": {detail}" if detail else "")
    return APIError(404, message, param="model", code="model_not_found")


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)
