"""Every failure the server answers, in OpenAI's shape: `{"error": {"message", "type", "code", "param"}}`.

The HTTP status says who is at fault (4xx the client, 5xx the server) and `param` names the request field at
fault, so a client library can show one clear line. FastAPI's own answers are reshaped too: its request
validation (422 by default) becomes 400 with the field named, its unknown routes 404.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}

log = logging.getLogger("slmforge.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def field_path(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def validation_error(exc: RequestValidationError) -> APIError:
    """The first thing wrong with a request body, as one line naming its field."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    loc = loc[1:] if loc[:1] == ("body",) else loc
    if error["type"] == "json_invalid":
        cause = (error.get("ctx") or {}).get("error", "cannot be parsed")
        return APIError(400, f"the request body is not valid JSON: {cause} (at character {loc[0] if loc else 0})",
                        code="invalid_json")
    if not loc:
        return APIError(400, "the request body must be a JSON object, sent with Content-Type: application/json",
                        code="invalid_json")
    param = field_path(loc)
    message = error["msg"].removeprefix("Value error, ")
    field = str(loc[-1])  # our own messages start with the field's name; pydantic's do not name it
    message = param + message[len(field):] if message.startswith(field + " ") else f"{param}: {message}"
    return APIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's body parser met bytes that are not UTF-8
            return APIError(400, f"the request body is not valid UTF-8: {exc.__cause__.reason} at byte "
                            f"{exc.__cause__.start}", code="invalid_json").response()
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()
