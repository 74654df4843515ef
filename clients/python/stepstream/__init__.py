"""stepstream: diffusers' ``callback_on_step_end``, run unchanged against a remote stepstream
server.

>>> from stepstream import RemotePipeline
>>> pipe = RemotePipeline("127.0.0.1:50051")
>>> out = pipe("a photo of an astronaut riding a horse on mars",
...            callback_on_step_end=callback_dynamic_cfg,
...            callback_on_step_end_tensor_inputs=["prompt_embeds"])
>>> out.images[0].save("out.png")
"""

try:
    from .v1 import stepstream_pb2 as _pb  # noqa: F401
except ImportError as e:  # pragma: no cover - only from an unbuilt source tree
    raise ImportError(
        "stepstream's gRPC stubs are missing: they are generated from the repository's proto/ "
        "when the package is built. Install it with `pip install ./clients/python` (from the "
        f"repository root). ({e})"
    ) from e

from . import errors
from .callbacks import (
    MultiPipelineCallbacks,
    PipelineCallback,
    SDCFGCutoffCallback,
    SDXLCFGCutoffCallback,
)
from .errors import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ProtocolError,
    QueueFullError,
    ReplyRejectedError,
    ServerUnavailableError,
    StatusError,
    StepstreamError,
)
from .pipeline import Generator, PipelineOutput, RemotePipeline, StepSession, load_replay, save_replay
from .retry import RetryPolicy
from .tensors import TensorArray

__version__ = "0.1.0"

__all__ = [
    "RemotePipeline",
    "RetryPolicy",
    "StepSession",
    "PipelineOutput",
    "save_replay",
    "load_replay",
    "Generator",
    "TensorArray",
    "PipelineCallback",
    "SDCFGCutoffCallback",
    "SDXLCFGCutoffCallback",
    "MultiPipelineCallbacks",
    "errors",
    "StepstreamError",
    "StatusError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "QueueFullError",
    "DeadlineExceededError",
    "ServerUnavailableError",
    "AuthenticationError",
    "ReplyRejectedError",
    "ProtocolError",
]
