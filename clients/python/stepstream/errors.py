"""Typed errors. Every failure of a remote call is a :class:`StepstreamError`.

* :class:`StatusError` and its subclasses: the server (or the channel) ended the call with a gRPC
  status; ``code`` is the :class:`grpc.StatusCode`, ``details`` the server's message,
  ``steps_completed`` how many denoising steps had run when a generation failed (``0`` when it
  was refused before ``Accepted``; the message then starts "failed after 3 of 10 steps: ..."),
  ``attempts`` how many times the call was made (see :class:`~stepstream.RetryPolicy`).
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
    "annotate",
]


class StepstreamError(Exception):
    """Base class of every error this package raises for a remote call."""


class StatusError(StepstreamError):
    """The call ended with a gRPC status other than OK.

    ``code``: the :class:`grpc.StatusCode`; ``details``: the server's message;
    ``trailing_metadata``: the status's trailing metadata (e.g. ``grpc-retry-pushback-ms``).
    For a generation: ``steps_completed``, the denoising steps that had run (a lower bound when
    the call subscribed to only some steps: the last ``StepEnd`` seen; ``0`` before ``Accepted``;
    ``None`` when unknown, as for ``GenerateOnce``), ``num_steps``, the generation's timestep
    count once ``Accepted`` said it, and ``attempts``, how many times the call was made."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code = code
        self.details = details
        self.trailing_metadata: tuple = ()
        self.steps_completed: Optional[int] = None
        self.num_steps: Optional[int] = None
        self.attempts: int = 1
        self._notes: list = []
        super().__init__(f"{code.name}: {details}")

    def _message(self) -> str:
        msg = f"{self.code.name}: {self.details}"
        if self.num_steps is not None and self.steps_completed is not None:
            msg = f"failed after {self.steps_completed} of {self.num_steps} steps: {msg}"
        if self._notes:
            msg += f" ({'; '.join(self._notes)})"
        return msg


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
    try:
        err.trailing_metadata = tuple(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else ()
    except Exception:  # pragma: no cover - a call object without its status
        err.trailing_metadata = ()
    err.__cause__ = None
    return err


def annotate(
    err: StatusError,
    *,
    steps_completed: Optional[int] = None,
    num_steps: Optional[int] = None,
    note: Optional[str] = None,
) -> StatusError:
    """Records on ``err`` how far its generation got and why it was (not) retried, and rewrites
    its message to say so ("failed after 3 of 10 steps: UNAVAILABLE: ... (note)")."""
    if steps_completed is not None:
        err.steps_completed = int(steps_completed)
    if num_steps is not None:
        err.num_steps = int(num_steps)
    if note:
        err._notes.append(note)
    err.args = (err._message(),)
    return err
