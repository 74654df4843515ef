"""Typed errors. Every failure of a remote call is a :class:`StepstreamError`.

* :class:`StatusError` and its subclasses: the server (or the channel) ended the call with a gRPC
  status; ``code`` is the :class:`grpc.StatusCode`, ``details`` the server's message.
* :class:`ReplyRejectedError`: the server refused a reply the callback produced (``step_index``,
  ``field``, ``reason``). The server itself keeps waiting for a corrected reply; the pipeline
  raises this unless ``reply_retries`` lets the callback try again (see ``pipe.rejected``).
* :class:`ProtocolError`: the server's stream broke the protocol (a client or server bug).
"""

from __future__ import annotations

import re
from typing import Optional

import grpc

__all__ = [
    "StepstreamError",
    "StatusError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "QueueFullError",
    "DeadlineExceededError",
    "CancelledError",
    "ServerUnavailableError",
    "AuthenticationError",
    "ReplyRejectedError",
    "ProtocolError",
    "from_rpc_error",
]


class StepstreamError(Exception):
    """Base class of every error this package raises for a remote call."""


class StatusError(StepstreamError):
    """The call ended with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")


class InvalidRequestError(StatusError):
    """INVALID_ARGUMENT: a request field (``field``, e.g. ``start.width``) or a protocol rule."""

    _FIELD = re.compile(r"invalid `([^`]+)`: (.*)", re.S)

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        m = self._FIELD.match(details or "")
        self.field: Optional[str] = m.group(1) if m else None
        self.reason: str = m.group(2) if m else details


class ModelNotFoundError(StatusError):
    """NOT_FOUND: the server does not serve the model the request named."""


class QueueFullError(StatusError):
    """RESOURCE_EXHAUSTED: the server's queue is full (or a message exceeded a size limit)."""


class DeadlineExceededError(StatusError):
    """DEADLINE_EXCEEDED: no valid reply within the reply deadline, or the call's own timeout."""


class CancelledError(StatusError):
    """CANCELLED: the call was cancelled."""


class ServerUnavailableError(StatusError):
    """UNAVAILABLE: the server cannot be reached, or is shutting down."""


class AuthenticationError(StatusError):
    """UNAUTHENTICATED or PERMISSION_DENIED: the token is missing, wrong, or not allowed."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFullError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}


class ReplyRejectedError(StepstreamError):
    """The server refused the reply to step ``step_index``: ``field`` is what was wrong (e.g.
    ``tensors[prompt_embeds]``), ``reason`` why."""

    def __init__(self, step_index: int, field: str, reason: str):
        self.step_index = step_index
        self.field = field
        self.reason = reason
        super().__init__(f"reply to step {step_index} rejected: {field}: {reason}")


class ProtocolError(StepstreamError):
    """The server's stream did something the protocol does not allow."""


def from_rpc_error(e: grpc.RpcError) -> StatusError:
    """The typed error for a :class:`grpc.RpcError` raised by a call."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    cls = _BY_CODE.get(code, StatusError)
    err = cls(code, details or "")
    err.__cause__ = None
    return err
