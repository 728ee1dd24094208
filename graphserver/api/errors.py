"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the matching HTTP status."""

from __future__ import annotations

from typing import Any

from client.rpc import RemoteError, RPCError, RPCTimeout, ServerDead
from graphserver.api.schemas import ErrorBody, ErrorResponse

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
UNAVAILABLE = "service_unavailable"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, INVALID_REQUEST, param, code)


def from_engine(exc: RPCError) -> ApiError:
    """An engine failure as the HTTP error a client should see."""
    if isinstance(exc, RemoteError):
        if exc.type == "ReloadInProgress":
            return ApiError(409, exc.message, INVALID_REQUEST, code="reload_in_progress")
        if exc.type == "BadRequest":
            return ApiError(400, exc.message, INVALID_REQUEST)
        if exc.type in ("Overloaded", "KVExhausted"):
            return ApiError(429, f"the server is overloaded, retry later ({exc.message})", RATE_LIMIT,
                            code="overloaded")
        if exc.type == "ShuttingDown":
            return ApiError(503, f"the engine is shutting down ({exc.message})", UNAVAILABLE, code="shutting_down")
        return ApiError(500, f"engine error {exc.type}: {exc.message}", SERVER_ERROR)
    if isinstance(exc, RPCTimeout):
        return ApiError(504, f"the engine did not answer in time ({exc})", UNAVAILABLE, code="engine_timeout")
    if isinstance(exc, ServerDead):
        return ApiError(503, f"the engine is gone ({exc})", UNAVAILABLE, code="engine_unavailable")
    return ApiError(503, f"engine call failed: {exc}", UNAVAILABLE, code="engine_unavailable")
