"""``RemotePipeline``: a diffusers-style pipeline object whose denoising loop runs on a stepstream
server, with ``callback_on_step_end`` run here, in this process, at the end of each step."""

from __future__ import annotations

import io
import json
import os
import math
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from . import errors, tensors
from . import retry as _retry
from .retry import DEFAULT_RETRY, RetryPolicy
from .v1 import stepstream_pb2 as pb
from .v1 import stepstream_pb2_grpc as rpc

__all__ = ["RemotePipeline", "StepSession", "CallState", "PipelineOutput", "Generator", "map_scheduler", "scheduler_settings"]

#: Largest message either side may send (images and tensors of big models exceed gRPC's 4 MiB).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# diffusers arguments with no remote equivalent: refused rather than silently ignored.
_UNSUPPORTED = (
    "timesteps",
    "sigmas",
    "ip_adapter_image",
    "ip_adapter_image_embeds",
    "clip_skip",
    "callback",
    "callback_steps",
)


def _adapter_weights(adapter_names, adapter_weights) -> Dict[str, float]:
    """diffusers' ``set_adapters`` arguments as ``{name: weight}``: one name or a list; weights
    None (1.0 each), one number for all, or one per name."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if adapter_weights is None:
        weights = [1.0] * len(names)
    elif isinstance(adapter_weights, (int, float)):
        weights = [float(adapter_weights)] * len(names)
    else:
        weights = [float(w) for w in adapter_weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
    for n, w in zip(names, weights):
        if isinstance(w, dict):
            raise ValueError(f"per-block weights for `{n}` are not supported remotely; give one number")
    return dict(zip(names, weights))


class Generator:
    """A stand-in for ``torch.Generator`` where torch is not installed: it only carries a seed.

    The server draws its own noise (ChaCha8, see the server's README), so a seed reproduces a
    stepstream image, not a torch one; ``latents=`` passes exact initial noise."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._seed: Optional[int] = None

    def manual_seed(self, seed: int) -> "Generator":
        self._seed = int(seed)
        return self

    def initial_seed(self) -> int:
        if self._seed is None:
            raise ValueError("call manual_seed(seed) first")
        return self._seed


@dataclass
class PipelineOutput:
    """What a call returns, shaped like diffusers' ``StableDiffusionPipelineOutput``.

    ``images``: PIL images (``output_type="pil"``), a float32 NHWC array in [0, 1] (``"np"``), a
    float NCHW torch tensor (``"pt"``) or the final latents (``"latent"``). ``latents`` holds the
    final latents when ``return_latents=True`` (or ``output_type="latent"``). ``replay`` holds the
    run's replay record (a ``ReplayRecord`` message) when ``return_replay=True``: see
    :meth:`RemotePipeline.replay`, :func:`save_replay` and :func:`load_replay`."""

    images: Any
    nsfw_content_detected: Optional[List[bool]] = None
    latents: Any = None
    seed: int = 0
    interrupted: bool = False
    request_id: str = ""
    timings: Dict[str, float] = field(default_factory=dict)
    replay: Any = None

    def __getitem__(self, i):
        return (self.images, self.nsfw_content_detected)[i]

    def to_tuple(self):
        return (self.images, self.nsfw_content_detected)


class CallState:
    """What a diffusers pipeline keeps on itself for one call, under diffusers' names.

    ``guidance_scale`` / ``_guidance_scale`` and ``interrupt`` / ``_interrupt`` are settable;
    ``do_classifier_free_guidance`` and ``num_timesteps`` are read-only."""

    def __init__(self, guidance_scale: float, num_timesteps: int):
        self._guidance_scale = float(guidance_scale)
        self._step_guidance = self._guidance_scale
        self._cfg: Optional[bool] = None
        self._interrupt = False
        self.num_timesteps = int(num_timesteps)

    # diffusers: `guidance_scale` and `do_classifier_free_guidance` are properties over
    # `_guidance_scale`, so a callback that lowers it sees CFG off at once.
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self._guidance_scale = float(value)

    @property
    def do_classifier_free_guidance(self) -> bool:
        if self._cfg is not None and self._guidance_scale == self._step_guidance:
            return self._cfg  # the server's own decision for this step
        return self._guidance_scale > 1

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)


class StepSession(CallState):
    """The ``pipe`` a callback receives: one generation, with diffusers' attribute names.

    Readable: ``num_timesteps``, ``timesteps``, ``guidance_scale``, ``do_classifier_free_guidance``,
    ``interrupt``, ``seed``, ``request_id``, ``model``, ``width``, ``height``, ``step_index``,
    ``timestep``, ``_callback_tensor_inputs``, ``accepted`` (the server's ``Accepted``), ``rejected``
    (the :class:`~stepstream.errors.ReplyRejectedError` of the previous try at this step, when
    ``reply_retries`` let the callback run again), ``pipeline`` (the :class:`RemotePipeline`).
    Settable: ``_guidance_scale`` (and ``guidance_scale``), ``_interrupt`` (and ``interrupt``).
    ``set_adapters(names, weights)`` rescales the call's LoRAs from the next step on.
    Anything else (``pipe.unet``, ``pipe.scheduler``) lives on the server and is not reachable."""

    def __init__(self, pipeline: "RemotePipeline", accepted: pb.Accepted):
        super().__init__(accepted.guidance_scale, len(accepted.timesteps))
        self.pipeline = pipeline
        self.accepted = accepted
        self.timesteps = list(accepted.timesteps)
        self.seed = accepted.seed
        self.request_id = accepted.request_id
        self.model = accepted.model
        self.width = accepted.width
        self.height = accepted.height
        self._callback_tensor_inputs = list(accepted.callback_tensor_inputs)
        self.step_index: Optional[int] = None
        self.timestep: Optional[float] = None
        self.rejected: Optional[errors.ReplyRejectedError] = None
        self._tries = 0
        self._last_step: Optional[pb.StepEnd] = None
        # The call's LoRAs and their scales now; `set_adapters` in a callback changes them
        # from the next step on (sent as StepReply.lora_scales).
        self._loras: Dict[str, float] = {}
        self._lora_changes: Dict[str, float] = {}

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """diffusers' ``pipe.set_adapters`` in a callback: new scales for this call's LoRAs,
        from the next step on. A LoRA the call did not start with cannot join it."""
        for name, w in _adapter_weights(adapter_names, adapter_weights).items():
            if name not in self._loras:
                raise ValueError(
                    f"LoRA `{name}` is not applied by this call (it applies: "
                    f"{', '.join(self._loras) or 'none'}); set it before the call, with weight 0 to start it off"
                )
            if w != self._loras[name]:
                self._lora_changes[name] = w
            self._loras[name] = w

    def get_active_adapters(self) -> List[str]:
        """diffusers' ``pipe.get_active_adapters``: this call's LoRAs."""
        return list(self._loras)

    def _begin_step(self, step: pb.StepEnd) -> None:
        self.step_index = step.step_index
        self.timestep = step.timestep
        self._guidance_scale = float(step.guidance_scale)
        self._step_guidance = self._guidance_scale
        self._cfg = step.do_classifier_free_guidance
        self._interrupt = False
        self._lora_changes = {}

    def __getattr__(self, name: str):
        raise AttributeError(
            f"the remote pipeline's callback session has no attribute `{name}`: the models and the "
            "scheduler run on the server; a callback sees num_timesteps, timesteps, guidance_scale, "
            "do_classifier_free_guidance, interrupt and its callback_kwargs tensors"
        )


# ----- diffusers scheduler objects → server scheduler names ------------------------------------


def scheduler_settings(scheduler) -> Dict[str, Any]:
    """The settings a diffusers scheduler object *sets*: its ``config`` without the keys it holds
    only as class defaults (diffusers lists those in ``config["_use_default_values"]``) and
    without private keys. A class, or an object without a config, sets nothing."""
    if isinstance(scheduler, type):
        return {}
    config = getattr(scheduler, "config", None)
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        config = dict(config)
    defaults = set(config.get("_use_default_values") or ())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in defaults}


def _plain(x):
    """numpy / torch values as Python ones."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    return x


def _agrees(mine, theirs) -> bool:
    """Whether a setting's value equals the server's effective one (numbers up to rounding)."""
    mine = _plain(mine)
    if isinstance(mine, bool) or isinstance(theirs, bool):
        return type(mine) is bool and type(theirs) is bool and mine == theirs
    if isinstance(theirs, str) and theirs in ("inf", "-inf", "nan") and isinstance(mine, (int, float)):
        theirs = float(theirs)  # JSON has no infinity: the server writes these as strings
    if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)):
        if math.isnan(mine) or math.isnan(theirs):
            return math.isnan(mine) and math.isnan(theirs)
        return mine == theirs or math.isclose(mine, theirs, rel_tol=1e-6, abs_tol=0.0)
    if isinstance(mine, list) and isinstance(theirs, list):
        return len(mine) == len(theirs) and all(_agrees(a, b) for a, b in zip(mine, theirs))
    return mine == theirs


def map_scheduler(scheduler, scheduler_info: Sequence, model: str = "") -> str:
    """The server scheduler name for a diffusers scheduler object (or class).

    ``scheduler_info``: the model's ``ModelInfo.scheduler_info`` (``ListModels``). Candidates are
    the entries of the object's class (``type(scheduler).__name__``); the first whose effective
    config agrees with every setting the object sets (see :func:`scheduler_settings`) on the
    keys that entry lists wins. Keys an entry does not list are not compared (they are not read
    by that class, or only act under a listed setting). When no candidate agrees, ``ValueError``
    names the first setting no candidate honours, with its value and what the server offers."""
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    name = cls.__name__
    on = f" on model `{model}`" if model else ""
    candidates: List[Tuple[str, Dict[str, Any]]] = [
        (e.name, json.loads(e.config_json or "{}")) for e in scheduler_info if e.diffusers_class == name
    ]
    if not candidates:
        classes = sorted({e.diffusers_class for e in scheduler_info})
        offered = ", ".join(classes) if classes else "no scheduler classes (an older server: pass a name)"
        raise ValueError(
            f"the server has no scheduler for {name}{on}; it offers {offered}, or pass a name "
            "from list_models()"
        )
    settings = scheduler_settings(scheduler)
    for server_name, config in candidates:
        if all(_agrees(v, config[k]) for k, v in settings.items() if k in config):
            return server_name
    compared = [k for k in settings if any(k in c for _, c in candidates)]

    def offers(key: str) -> str:
        return "; ".join(f"`{n}` has {key}={c[key]!r}" for n, c in candidates if key in c)

    for key in compared:
        if not any(key in c and _agrees(settings[key], c[key]) for _, c in candidates):
            raise ValueError(
                f"{name}({key}={settings[key]!r}) cannot be honoured by the server{on}: {offers(key)}"
            )
    # Each setting alone is offered, but no one name has them all.
    together = ", ".join(f"{k}={settings[k]!r}" for k in compared)
    per_name = "; ".join(
        f"`{n}` differs in " + ", ".join(f"{k}={c[k]!r}" for k in compared if k in c and not _agrees(settings[k], c[k]))
        for n, c in candidates
    )
    raise ValueError(f"{name}({together}) cannot be honoured by the server{on}: no name has these settings together ({per_name})")


def _target_and_credentials(target: str, tls):
    secure = False
    for scheme in ("http://", "grpc://"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
    for scheme in ("https://", "grpcs://"):
        if target.startswith(scheme):
            target, secure = target[len(scheme) :], True
    target = target.rstrip("/")
    if tls is None or tls is False:
        creds = grpc.ssl_channel_credentials() if secure else None
    elif tls is True:
        creds = grpc.ssl_channel_credentials()
    elif isinstance(tls, grpc.ChannelCredentials):
        creds = tls
    elif isinstance(tls, (bytes, str)):
        creds = grpc.ssl_channel_credentials(root_certificates=_pem(tls))
    elif isinstance(tls, dict):
        creds = grpc.ssl_channel_credentials(
            root_certificates=_pem(tls.get("root_certificates")),
            private_key=_pem(tls.get("private_key")),
            certificate_chain=_pem(tls.get("certificate_chain")),
        )
    else:
        raise TypeError(
            "tls must be None, True, grpc.ChannelCredentials, PEM root certificates (bytes or a "
            "path) or a dict of root_certificates / private_key / certificate_chain"
        )
    return target, creds


def _pem(x) -> Optional[bytes]:
    if x is None or isinstance(x, bytes):
        return x
    with open(x, "rb") as f:  # a path
        return f.read()


def _seed_of(generator, seed) -> Optional[int]:
    if generator is not None and seed is not None:
        raise ValueError("give generator or seed, not both")
    if seed is not None:
        return int(seed)
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise ValueError(
                "the server draws one seeded noise for the whole batch: pass one generator (or seed)"
            )
        generator = generator[0]
    if isinstance(generator, int):
        return generator
    if hasattr(generator, "initial_seed"):
        return int(generator.initial_seed())
    raise TypeError(f"generator must be a torch.Generator, stepstream.Generator or int, not {type(generator)}")


def _single(name: str, x):
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise ValueError(f"{name}: the server takes one {name} per call (use num_images_per_prompt)")
        return x[0]
    return x


class RemotePipeline:
    """A Stable Diffusion pipeline on a stepstream server, called like diffusers' pipelines.

    ``target``: ``host:port`` (or ``http://host:port``; ``https://`` implies TLS).
    ``model``: a served model id (``None``: the server's default).
    ``token``: sent as ``authorization: Bearer <token>`` on every call.
    ``tls``: ``True`` (system roots), a :class:`grpc.ChannelCredentials`, PEM root certificates
    (bytes or a path), or a dict with ``root_certificates`` / ``private_key`` /
    ``certificate_chain``.
    ``tensor_format``: what callbacks receive: ``"auto"`` (torch when importable), ``"torch"``,
    ``"numpy"``.
    ``retry``: a :class:`~stepstream.RetryPolicy` for generations the server refuses before
    admitting them (``UNAVAILABLE`` from a draining replica, ``RESOURCE_EXHAUSTED`` from a full
    queue, before ``Accepted``): they are made again, after the server's
    ``grpc-retry-pushback-ms`` or an exponential backoff, within the call's ``timeout``. The
    default makes 5 attempts, waiting 50 ms doubling up to 2 s. ``None`` (or
    ``RetryPolicy(max_attempts=1)``) turns retrying off. A failure after ``Accepted`` is never
    retried: it is raised with ``steps_completed`` set.

    Like a diffusers pipeline, the object carries the state of its call: ``guidance_scale``,
    ``_guidance_scale`` (settable), ``do_classifier_free_guidance``, ``num_timesteps``,
    ``interrupt`` and ``_interrupt`` (settable). During a call (in its callback) they are that
    call's, so a callback may use the pipeline object itself instead of its ``pipe`` argument;
    after it they are the last call's. ``_callback_tensor_inputs`` is the model's list, from
    ``ListModels``.

    Threads: one object may run calls from several threads at once. The in-call view is per
    thread (each thread's callback sees and steers its own call); outside a call, the attributes
    are those of the call that finished last, on any thread. Before any call they raise
    ``AttributeError``, as in diffusers."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        model: Optional[str] = None,
        *,
        token: Optional[str] = None,
        tls=None,
        tensor_format: str = "auto",
        channel_options: Sequence = (),
        retry: Optional[RetryPolicy] = DEFAULT_RETRY,
    ):
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a stepstream.RetryPolicy or None, not {type(retry).__name__}")
        self.target = target
        #: The :class:`~stepstream.RetryPolicy` for refused generations (``None``: no retry).
        self.retry: Optional[RetryPolicy] = retry
        self.model = model
        self.tensor_format = tensor_format
        tensors.resolve_format(tensor_format)  # fail early on a bad name
        address, creds = _target_and_credentials(target, tls)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *channel_options,
        ]
        if creds is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._stub = rpc.DiffusionStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._models: Optional[pb.ListModelsResponse] = None
        self._num_timesteps_cache: Dict[tuple, int] = {}
        self._progress: Dict[str, Any] = {}
        # Per thread: the calls running on it, innermost last (a callback may call again).
        self._local = threading.local()
        # The state the last finished call left; replaced whole (one assignment), never edited
        # by a running call, so readers on other threads need no lock.
        self._last: Optional[CallState] = None
        # The LoRAs calls apply ({name: weight}, diffusers' set_adapters), and whether they are on.
        self._adapters: Dict[str, float] = {}
        self._lora_enabled = True

    # ----- LoRAs (loaded by the server: ``stepstream serve --lora NAME=PATH``) ---------------

    def load_lora_weights(self, *args, **kwargs):
        """Not remote: the server loads LoRAs at start (``stepstream serve --lora NAME=PATH``);
        ``list_models()`` lists them, and ``set_adapters`` applies them."""
        raise NotImplementedError(
            "LoRAs are loaded by the server: start it with `stepstream serve --lora NAME=PATH`, "
            "then call pipe.set_adapters([NAME], [weight])"
        )

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """diffusers' ``get_list_adapters``: the LoRAs the server serves for this model, by the
        networks they adapt."""
        out: Dict[str, List[str]] = {}
        for lora in self.model_info.loras:
            for comp in sorted({m.split(".", 1)[0] for m in lora.modules}):
                out.setdefault(comp, []).append(lora.name)
        return out

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """diffusers' ``pipe.set_adapters``. Outside a call: the LoRAs (and weights) later calls
        apply; the names must be ones the server serves for this model. Inside a callback: new
        weights for this call's LoRAs from the next step on (the server applies them unmerged,
        so a change costs nothing)."""
        calls = getattr(self._local, "calls", None)
        if calls and isinstance(calls[-1].state, StepSession):
            calls[-1].state.set_adapters(adapter_names, adapter_weights)
            return
        weights = _adapter_weights(adapter_names, adapter_weights)
        served = [l.name for l in self.model_info.loras]
        for name in weights:
            if name not in served:
                raise ValueError(
                    f"model `{self.model_info.id}` serves no LoRA `{name}` (it serves: "
                    f"{', '.join(served) or 'none; start the server with --lora NAME=PATH'})"
                )
        self._adapters = weights

    def get_active_adapters(self) -> List[str]:
        """diffusers' ``get_active_adapters``: this thread's call's LoRAs, else those set."""
        calls = getattr(self._local, "calls", None)
        if calls and isinstance(calls[-1].state, StepSession):
            return calls[-1].state.get_active_adapters()
        return list(self._adapters) if self._lora_enabled else []

    def disable_lora(self) -> None:
        """diffusers' ``disable_lora``: later calls apply no LoRA (``enable_lora`` restores them)."""
        self._lora_enabled = False

    def enable_lora(self) -> None:
        """diffusers' ``enable_lora``."""
        self._lora_enabled = True

    # ----- diffusers-style conveniences -------------------------------------------------

    def set_progress_bar_config(self, **kwargs) -> None:
        """As in diffusers: ``disable=True`` turns the progress bar off. The bar needs tqdm; without
        it (or disabled) a call without a callback uses ``GenerateOnce``."""
        self._progress = dict(kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- plain RPCs ------------------------------------------------------------------

    def list_models(self, timeout: Optional[float] = None) -> pb.ListModelsResponse:
        """The server's ``ListModels`` answer (ids, defaults, schedulers, callback tensors)."""
        try:
            self._models = self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        return self._models

    @property
    def model_info(self) -> pb.ModelInfo:
        """The ``ModelInfo`` of this pipeline's model."""
        models = self._models or self.list_models()
        want = self.model or models.default_model
        for m in models.models:
            if m.id == want:
                return m
        raise errors.ModelNotFoundError(grpc.StatusCode.NOT_FOUND, f"the server does not serve `{want}`")

    @property
    def _callback_tensor_inputs(self) -> List[str]:
        """diffusers' ``pipe._callback_tensor_inputs``: the tensors this model lets a callback read
        and replace (``ModelInfo.callback_tensor_inputs``)."""
        return list(self.model_info.callback_tensor_inputs)

    # ----- diffusers' call state: this thread's running call, else the last finished one ------

    def _state(self) -> CallState:
        calls = getattr(self._local, "calls", None)
        if calls:
            call = calls[-1]
            if call.state is not None:
                return call.state
        if self._last is not None:
            return self._last
        raise AttributeError(
            "no call has run on this pipeline yet: guidance_scale, num_timesteps, interrupt and "
            "do_classifier_free_guidance are set by a call, as in diffusers"
        )

    @property
    def guidance_scale(self) -> float:
        """diffusers' ``pipe.guidance_scale``: this thread's call's, else the last call's."""
        return self._state().guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self._state().guidance_scale = value

    @property
    def _guidance_scale(self) -> float:
        """diffusers' ``pipe._guidance_scale``; set it in a callback to change this call's guidance."""
        return self._state()._guidance_scale

    @_guidance_scale.setter
    def _guidance_scale(self, value: float) -> None:
        self._state()._guidance_scale = float(value)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers' ``pipe.do_classifier_free_guidance``."""
        return self._state().do_classifier_free_guidance

    @property
    def num_timesteps(self) -> int:
        """diffusers' ``pipe.num_timesteps``: the number of the call's timesteps."""
        return self._state().num_timesteps

    @property
    def interrupt(self) -> bool:
        """diffusers' ``pipe.interrupt``."""
        return self._state().interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._state().interrupt = value

    @property
    def _interrupt(self) -> bool:
        """diffusers' ``pipe._interrupt``; set it in a callback to stop this call after the step."""
        return self._state()._interrupt

    @_interrupt.setter
    def _interrupt(self, value: bool) -> None:
        self._state()._interrupt = bool(value)

    # ----- the call ----------------------------------------------------------------------

    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: Optional[int] = None,
        eta: Optional[float] = None,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: Optional[float] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        *,
        lora_schedules: Optional[Dict[str, Sequence[float]]] = None,
        guidance_schedule: Optional[Sequence[float]] = None,
        seed: Optional[int] = None,
        scheduler=None,
        callback_on_step_end_steps: Union[Iterable[int], Callable[[int], Iterable[int]], None] = None,
        callback_on_step_begin: Optional[Callable] = None,
        callback_on_step_begin_tensor_inputs: Optional[List[str]] = None,
        callback_after_guidance: Optional[Callable] = None,
        callback_after_guidance_tensor_inputs: Optional[List[str]] = None,
        callback_on_preview: Optional[Callable] = None,
        preview_options: Optional[Dict[str, Any]] = None,
        observe_only: bool = False,
        return_latents: bool = False,
        return_replay: bool = False,
        reply_timeout_ms: Optional[int] = None,
        on_timeout: str = "abort",
        wire_dtype: Optional[str] = None,
        reply_retries: int = 0,
        tensor_format: Optional[str] = None,
        timeout: Optional[float] = None,
        **kwargs,
    ):
        """Runs one generation. diffusers' arguments keep their names and meanings; the extra
        keyword-only ones are:

        ``seed``: the server's noise seed (``generator`` gives it too, via ``initial_seed()``).
        ``scheduler``: a server scheduler name (``"ddim"``, ``"euler"``; see ``list_models``) or a
        diffusers scheduler instance (or class), mapped through ``ListModels``: the name of the
        same class whose effective config agrees with every setting the instance sets; a
        setting no name honours raises ``ValueError`` naming it. ``None``: the model's own.
        ``callback_on_step_end_steps``: the steps at which the callback may change something
        (indices, or a function of ``num_timesteps``, called with the run's real count once the
        server has accepted it). Only those steps make the server wait. A
        :class:`~stepstream.callbacks.PipelineCallback` says it itself; a plain function runs at
        every step unless this is given. The same steps apply to the two callbacks below.
        ``callback_on_step_begin``: called as ``callback_on_step_end`` is, but before the UNet of
        the step; what it returns (latents, embeddings, ``pipe._guidance_scale``,
        ``pipe._interrupt``) applies to that step itself. Its tensors:
        ``callback_on_step_begin_tensor_inputs`` (default ``["latents"]``).
        ``callback_after_guidance``: called after classifier-free guidance, before the
        scheduler step, with ``noise_pred`` (guided and rescaled), ``noise_pred_uncond``,
        ``noise_pred_text`` (``None`` without CFG), ``pred_original_sample`` (the scheduler's
        x0) and ``latents``, as listed in ``callback_after_guidance_tensor_inputs`` (default
        ``["noise_pred"]``); a returned ``noise_pred`` is what the scheduler step takes.
        ``callback_on_preview``: called as ``callback_on_preview(pipe, step_index, timestep,
        previews)`` at each step that has previews, ``previews`` being ``{batch item: PIL
        image}``; it only watches (what it returns is ignored). ``preview_options``: a dict of
        ``source`` (``"x0"``, the default, or ``"latents"``), ``items`` (batch items; default
        all), ``max_side`` (pixels; 0: the decoder's own size), ``format`` (``"png"``, ``"jpeg"``),
        ``jpeg_quality``, ``every`` (every N-th step) and ``decoder`` (``"linear"``, the default,
        or ``"taesd"`` where ``list_models`` lists it in ``preview_decoders``).
        ``observe_only``: the callback only watches: the server never waits, and a callback that
        changes anything raises.
        ``return_latents``: also return the final latents (``output.latents``).
        ``return_replay``: also return the run's replay record (``output.replay``): the request as
        the server resolved it and every change the callbacks made, to run again with
        :meth:`replay`.
        ``reply_timeout_ms`` / ``on_timeout`` (``"abort"``, ``"continue"``): the reply deadline.
        ``wire_dtype``: ``"f32"`` (default), ``"f16"`` or ``"bf16"`` for tensors on the wire.
        ``reply_retries``: how often a rejected reply may be retried: the callback runs again for
        the same step with ``pipe.rejected`` set; past that, the call raises
        :class:`~stepstream.errors.ReplyRejectedError`.
        ``tensor_format``: overrides the pipeline's for this call.
        ``timeout``: seconds for the whole call (gRPC deadline), retries of a refused start
        (see the pipeline's ``retry``) included.
        ``guidance_schedule``: one guidance scale per timestep, applied by the server with no
        round trip (what a callback setting ``pipe._guidance_scale`` at every step does); it
        replaces ``guidance_scale``.
        ``lora_schedules``: ``{name: [one weight per step]}`` for LoRAs set with ``set_adapters``:
        the server changes their UNet weight at every step, with no round trip.

        LoRAs: those set with ``set_adapters`` apply, times ``cross_attention_kwargs["scale"]``
        (diffusers' LoRA scale; no other key is supported remotely).
        """
        for name in _UNSUPPORTED:
            if kwargs.pop(name, None) is not None:
                raise TypeError(f"`{name}` is not supported by the remote pipeline")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        fmt = tensors.resolve_format(tensor_format or self.tensor_format)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")

        req = pb.GenerateRequest(model=self.model or "")
        prompt = _single("prompt", prompt)
        if prompt is not None:
            req.prompt = prompt
        negative_prompt = _single("negative_prompt", negative_prompt)
        if negative_prompt is not None:
            req.negative_prompt = negative_prompt
        if num_inference_steps is not None:
            req.num_inference_steps = int(num_inference_steps)
        if guidance_scale is not None:
            req.guidance_scale = float(guidance_scale)
        if width is not None:
            req.width = int(width)
        if height is not None:
            req.height = int(height)
        s = _seed_of(generator, seed)
        if s is not None:
            req.seed = s
        if scheduler is not None:
            req.scheduler = self._scheduler_name(scheduler)
        if num_images_per_prompt is not None:
            req.num_images_per_prompt = int(num_images_per_prompt)
        if eta is not None:
            req.eta = float(eta)
        if guidance_rescale is not None:
            req.guidance_rescale = float(guidance_rescale)
        for name, t in (("latents", latents), ("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if t is not None:
                getattr(req, name).CopyFrom(tensors.encode(t))
        self._add_loras(req, cross_attention_kwargs, lora_schedules)
        if guidance_schedule is not None:
            req.guidance_plan.schedule.extend(float(g) for g in guidance_schedule)
        req.output.format = pb.IMAGE_FORMAT_NONE if output_type == "latent" else pb.IMAGE_FORMAT_PNG
        req.output.return_latents = bool(return_latents)
        req.output.return_replay = bool(return_replay)

        plan: Optional[_Plan] = None
        callbacks: Dict[int, Callable] = {}
        inputs: Dict[int, List[str]] = {}
        for phase, fn, given, default in (
            (pb.CALLBACK_PHASE_STEP_BEGIN, callback_on_step_begin, callback_on_step_begin_tensor_inputs, ["latents"]),
            (pb.CALLBACK_PHASE_AFTER_GUIDANCE, callback_after_guidance, callback_after_guidance_tensor_inputs,
             ["noise_pred"]),
            (pb.CALLBACK_PHASE_STEP_END, callback_on_step_end, callback_on_step_end_tensor_inputs, ["latents"]),
        ):
            if fn is None:
                continue
            names = list(given or [])
            own = getattr(fn, "tensor_inputs", None)
            if isinstance(own, (list, tuple)):
                # diffusers: a PipelineCallback / MultiPipelineCallbacks brings its own tensor_inputs
                # (here added to any given explicitly).
                names = list(own) + names
            elif given is None:
                names = default  # diffusers' default for callback_on_step_end
            callbacks[phase] = fn
            inputs[phase] = list(dict.fromkeys(names))
        preview = _preview_options(preview_options) if callback_on_preview is not None else None
        if preview_options is not None and preview is None:
            raise ValueError("preview_options needs callback_on_preview")
        if preview is not None and not callbacks:
            # Previews alone: every step's STEP_END observed, the server never waits.
            observe_only = True
        if not callbacks and preview is None:
            if observe_only:
                raise ValueError("observe_only needs a callback to call")
        else:
            steps = callback_on_step_end_steps
            if steps is None:
                own_steps = [getattr(fn, "step_indices", None) for fn in callbacks.values()]
                steps = own_steps[0] if len(own_steps) == 1 else None
            plan = _Plan(
                tensor_inputs=list(dict.fromkeys(n for names in inputs.values() for n in names)),
                callbacks=callbacks,
                inputs=inputs,
                preview=preview,
                on_preview=callback_on_preview,
                steps=steps,
                observe_only=observe_only,
                reply_timeout_ms=reply_timeout_ms,
                on_timeout=on_timeout,
                wire_dtype=tensors.wire_dtype(wire_dtype),
                reply_retries=int(reply_retries),
            )

        # This thread's running calls: the pipeline's attributes show the innermost one.
        call = _Call()
        calls = self._local.__dict__.setdefault("calls", [])
        calls.append(call)
        try:
            run = _Run(self, req, fmt, output_type, timeout, call)
            if plan is not None:
                return run.finish(run.stream(plan), return_dict)
            if self._progress_bar_wanted():
                return run.finish(run.stream(_Plan.watching()), return_dict)
            return run.finish(run.once(), return_dict)
        finally:
            calls.pop()
            self._finish_call(call, req)

    def replay(
        self,
        record,
        *,
        output_type: str = "pil",
        return_dict: bool = True,
        return_latents: bool = False,
        return_replay: bool = False,
        tensor_format: Optional[str] = None,
        timeout: Optional[float] = None,
    ):
        """Runs a replay record (``output.replay`` of a call with ``return_replay=True``, its
        bytes, or a path :func:`save_replay` wrote) again, with no callback: the server applies
        the recorded changes itself and makes the same image, bit for bit, on the same device
        and dtype. A record that no longer fits the server's model raises
        :class:`~stepstream.errors.InvalidRequestError` naming it."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")
        req = pb.GenerateRequest()
        req.replay.CopyFrom(_as_record(record))
        req.output.format = pb.IMAGE_FORMAT_NONE if output_type == "latent" else pb.IMAGE_FORMAT_PNG
        req.output.return_latents = bool(return_latents)
        req.output.return_replay = bool(return_replay)
        fmt = tensors.resolve_format(tensor_format or self.tensor_format)
        run = _Run(self, req, fmt, output_type, timeout)
        return run.finish(run.once(), return_dict)

    # ----- helpers ---------------------------------------------------------------------------

    def _add_loras(self, req: pb.GenerateRequest, cross_attention_kwargs, lora_schedules) -> None:
        """The request's LoRAs: those set, scaled by ``cross_attention_kwargs["scale"]``."""
        extra = set(cross_attention_kwargs or {}) - {"scale"}
        if extra:
            raise TypeError(f"cross_attention_kwargs {sorted(extra)} are not supported by the remote pipeline")
        scale = float((cross_attention_kwargs or {}).get("scale", 1.0))
        active = self._adapters if self._lora_enabled else {}
        schedules = dict(lora_schedules or {})
        for name in schedules:
            if name not in active:
                raise ValueError(f"lora_schedules names `{name}`, which set_adapters did not set")
        for name, weight in active.items():
            lora = req.loras.add(name=name, scale=weight * scale)
            if name in schedules:
                lora.schedule.extend(float(w) * scale for w in schedules[name])

    def _progress_bar_wanted(self) -> bool:
        if self._progress.get("disable"):
            return False
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return False
        return True

    def _finish_call(self, call: "_Call", req: pb.GenerateRequest) -> None:
        """Leaves the call's state on the pipeline, as diffusers leaves its attributes set."""
        state = call.state
        if state is None:
            if call.completed is None:
                return  # refused before it started: diffusers too keeps the previous values
            # GenerateOnce reports no timesteps: the count this pipeline expects for the request.
            try:
                guidance = req.guidance_scale if req.HasField("guidance_scale") else self.model_info.default_guidance_scale
                state = CallState(guidance, self._predict_num_timesteps(req)[1])
            except errors.StepstreamError:
                return  # ListModels failed just now: keep the previous values, keep the result
        if call.completed is not None and call.completed.interrupted:
            state._interrupt = True
        self._last = state

    def _scheduler_name(self, s) -> str:
        """The server's name for scheduler ``s``: a name as is, a diffusers scheduler object (or
        class) mapped through the model's ``ListModels`` ``scheduler_info``."""
        if isinstance(s, str):
            return s
        info = self.model_info
        return map_scheduler(s, info.scheduler_info, info.id)

    def _predict_num_timesteps(self, req: pb.GenerateRequest):
        """(cache key, predicted num_timesteps) for a request: its steps, unless a previous
        answer for the same model, scheduler and steps said otherwise (e.g. PNDM: steps + 1)."""
        steps = req.num_inference_steps or self.model_info.default_steps
        key = (req.model, req.scheduler, steps)
        return key, self._num_timesteps_cache.get(key, steps)


class _Call:
    """One call on one thread: its state once the server accepted it, and its result."""

    def __init__(self):
        self.state: Optional[CallState] = None
        self.completed: Optional[pb.Completed] = None


@dataclass
class _Plan:
    tensor_inputs: List[str]  # the request's: every phase's names
    steps: Any  # None, an iterable of indices, or a function of num_timesteps
    callbacks: Dict[int, Callable] = field(default_factory=dict)  # by CallbackPhase
    inputs: Dict[int, List[str]] = field(default_factory=dict)  # each callback's own names
    preview: Optional[pb.PreviewOptions] = None
    on_preview: Optional[Callable] = None
    observe_only: bool = False
    reply_timeout_ms: Optional[int] = None
    on_timeout: str = "abort"
    wire_dtype: int = pb.DTYPE_F32
    reply_retries: int = 0

    @staticmethod
    def watching() -> "_Plan":
        """Every step observed, no callback (a progress bar)."""
        return _Plan(tensor_inputs=[], steps=None, observe_only=True)


class _Run:
    """One call: the request, then GenerateOnce or a Generate stream."""

    def __init__(self, pipe: RemotePipeline, req: pb.GenerateRequest, fmt: str, output_type: str, timeout,
                 call: Optional["_Call"] = None):
        self.pipe = pipe
        self.call = call if call is not None else _Call()
        self.req = req
        self.fmt = fmt
        self.output_type = output_type
        self.timeout = timeout
        # The whole call's end (time.monotonic), which bounds every attempt and every retry wait.
        self.deadline: Optional[float] = None if timeout is None else time.monotonic() + float(timeout)

    def once(self) -> pb.Completed:
        def attempt(timeout: Optional[float]) -> pb.Completed:
            try:
                return self.pipe._stub.GenerateOnce(self.req, metadata=self.pipe._metadata, timeout=timeout)
            except grpc.RpcError as e:
                err = errors.from_rpc_error(e)
                # A unary call has no Accepted: the server sends UNAVAILABLE and
                # RESOURCE_EXHAUSTED only before admitting a generation, so they are taken as
                # refusals (see the README: a connection lost mid-call looks the same).
                err._before_admission = True
                raise err from None

        done = _retry.call(self.pipe.retry, attempt, self.deadline, "GenerateOnce")
        self.call.completed = done
        return done

    def stream(self, plan: _Plan) -> pb.Completed:
        req = pb.GenerateRequest()
        req.CopyFrom(self.req)
        cb = req.callback
        cb.tensor_inputs.extend(plan.tensor_inputs)
        cb.observe_only = plan.observe_only
        cb.wire_dtype = plan.wire_dtype
        phases = set(plan.callbacks)
        if plan.preview is not None:
            # Previews ride on STEP_END events; without a step-end callback those are answered
            # at once with no change.
            phases.add(pb.CALLBACK_PHASE_STEP_END)
            cb.preview.CopyFrom(plan.preview)
        cb.phases.extend(sorted(phases) or [pb.CALLBACK_PHASE_STEP_END])
        if plan.reply_timeout_ms:
            cb.reply_timeout_ms = int(plan.reply_timeout_ms)
        cb.on_timeout = {"abort": pb.TIMEOUT_ACTION_ABORT, "continue": pb.TIMEOUT_ACTION_CONTINUE}[plan.on_timeout]
        steps_of = plan.steps
        if callable(steps_of):
            # The steps depend on num_timesteps: the server tells it in Accepted, then waits
            # for the selection before step 0 (no guess from num_inference_steps).
            cb.await_steps = True
        elif steps_of is not None:
            wanted = sorted({int(i) for i in steps_of if int(i) >= 0})
            if not wanted:
                # The callback never acts: nothing needs to block.
                return self.stream(_Plan.watching()) if self.pipe._progress_bar_wanted() else self.once()
            cb.step_indices.extend(wanted)
        return _retry.call(
            self.pipe.retry,
            lambda timeout: self._session(req, plan, timeout),
            self.deadline,
            "Generate",
        )

    @staticmethod
    def _selection(steps_of, num_timesteps: int) -> pb.StepSelection:
        """The steps a callback acts at, for a run of ``num_timesteps`` timesteps."""
        wanted = steps_of(num_timesteps)
        if wanted is None:
            return pb.StepSelection()  # every step
        wanted = sorted({int(i) for i in wanted if 0 <= int(i) < num_timesteps})
        return pb.StepSelection(step_indices=wanted) if wanted else pb.StepSelection(no_steps=True)

    def _session(self, req: pb.GenerateRequest, plan: _Plan, timeout: Optional[float]) -> pb.Completed:
        """One Generate stream. A status before ``Accepted`` is raised marked as a refusal (which
        :mod:`stepstream.retry` may retry); one after it says how many steps had run."""
        outbox: "queue.Queue[Optional[pb.ClientMessage]]" = queue.Queue()
        outbox.put(pb.ClientMessage(start=req))

        def requests():
            # The request stream stays open until Completed: closing it cancels the generation.
            while True:
                msg = outbox.get()
                if msg is None:
                    return
                yield msg

        call = self.pipe._stub.Generate(requests(), metadata=self.pipe._metadata, timeout=timeout)
        session: Optional[StepSession] = None
        completed: Optional[pb.Completed] = None
        steps_done = 0  # the last StepEnd's step_index + 1: steps known to have run
        bar = None
        try:
            for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "accepted":
                    acc = msg.accepted
                    if req.callback.await_steps:
                        outbox.put(pb.ClientMessage(steps=self._selection(plan.steps, len(acc.timesteps))))
                    # What a later GenerateOnce of the same request reports as num_timesteps.
                    key, _ = self.pipe._predict_num_timesteps(req)
                    self.pipe._num_timesteps_cache[key] = len(acc.timesteps)
                    session = StepSession(self.pipe, acc)
                    session._loras = {l.name: l.scale for l in req.loras}
                    self.call.state = session  # what the pipeline object shows on this thread
                    bar = self._bar(len(acc.timesteps))
                elif kind == "step_end":
                    if session is None:
                        raise errors.ProtocolError("StepEnd before Accepted")
                    step = msg.step_end
                    steps_done = max(steps_done, step.step_index + 1)
                    if bar is not None:
                        bar.update(step.step_index + 1 - bar.n)
                        bar.set_postfix_str(f"{step.step_ms:.1f} ms/step", refresh=False)
                    if step.previews and plan.on_preview is not None:
                        plan.on_preview(session, step.step_index, step.timestep, _previews(step.previews))
                    reply = self._answer(session, step, plan, rejected=None)
                    if step.reply_required:
                        outbox.put(pb.ClientMessage(reply=reply))
                elif kind == "reply_rejected":
                    r = msg.reply_rejected
                    err = errors.ReplyRejectedError(r.step_index, r.field, r.reason)
                    if (session is None or session._last_step is None or session._tries >= plan.reply_retries
                            or r.field.startswith("steps")):
                        raise err
                    session._tries += 1
                    reply = self._answer(session, session._last_step, plan, rejected=err)
                    outbox.put(pb.ClientMessage(reply=reply))
                elif kind == "completed":
                    completed = msg.completed
                    self.call.completed = completed
                    outbox.put(None)  # half-close; the server then ends the stream with OK
                    if bar is not None and not completed.interrupted:
                        bar.update(bar.total - bar.n)  # steps that sent no event ran too
            if completed is None:
                raise errors.ProtocolError("the stream ended without Completed")
            return completed
        except grpc.RpcError as e:
            if completed is not None:
                return completed
            err = errors.from_rpc_error(e)
            if session is None:
                err.steps_completed = 0
                err._before_admission = True  # nothing ran (a Queued event admits nothing yet)
            else:
                errors.annotate(err, steps_completed=steps_done, num_steps=len(session.timesteps))
            raise err from None
        finally:
            if bar is not None:
                bar.close()
            outbox.put(None)
            call.cancel()  # no-op after Completed; otherwise frees the server's slot at once

    def _bar(self, total: int):
        if not self.pipe._progress_bar_wanted():
            return None
        from tqdm.auto import tqdm

        cfg = {k: v for k, v in self.pipe._progress.items() if k != "disable"}
        return tqdm(total=total, **cfg)

    def _answer(self, session: StepSession, step: pb.StepEnd, plan: _Plan, rejected) -> pb.StepReply:
        """Runs the callback of the event's phase and turns what it changed into a StepReply."""
        phase = step.phase or pb.CALLBACK_PHASE_STEP_END
        reply = pb.StepReply(step_index=step.step_index, phase=phase)
        callback = plan.callbacks.get(phase)
        if callback is None:
            return reply
        names = plan.inputs[phase]
        if rejected is None:
            session._tries = 0
        session._last_step = step
        session.rejected = rejected
        session._begin_step(step)
        received = dict(step.tensors)
        kwargs = {name: tensors.decode(received[name], self.fmt) for name in names if name in received}
        # diffusers passes None for a subscribed tensor the pipeline does not have at this step
        # (negative_prompt_embeds without CFG; the CFG halves of noise_pred).
        for name in names:
            kwargs.setdefault(name, None)
        out = callback(session, step.step_index, step.timestep, kwargs)
        if out is None:
            out = kwargs
        if not isinstance(out, dict):
            raise TypeError(f"{_CALLBACK_NAMES[phase]} must return a dict (callback_kwargs), not {type(out).__name__}")
        known = set(names) if phase == pb.CALLBACK_PHASE_AFTER_GUIDANCE else set(session._callback_tensor_inputs) | set(names)
        changed: List[str] = []
        for name, value in out.items():
            if name not in known or value is None:
                continue  # diffusers ignores other keys
            if not tensors.is_tensor(value):
                raise TypeError(f"callback_kwargs[{name!r}] must be a tensor, not {type(value).__name__}")
            orig = received.get(name)
            wire = tensors.encode(value, orig.dtype if orig is not None else plan.wire_dtype)
            if orig is not None and tensors.same(wire, orig):
                continue  # unchanged: not sent back
            reply.tensors[name].CopyFrom(wire)
            changed.append(name)
        if session._guidance_scale != session._step_guidance:
            reply.guidance_scale = float(session._guidance_scale)
            changed.append("guidance_scale")
        if session._interrupt:
            reply.interrupt = True
            changed.append("interrupt")
        for name, weight in session._lora_changes.items():
            reply.lora_scales[name] = float(weight)
            changed.append(f"lora {name}")
        if not step.reply_required and changed:
            raise errors.StepstreamError(
                f"observe-only run, but the callback changed {', '.join(changed)} at step "
                f"{step.step_index}: nothing can be applied; run without observe_only"
            )
        return reply

    def finish(self, done: pb.Completed, return_dict: bool):
        latents = tensors.decode(done.latents, self.fmt) if done.HasField("latents") else None
        if self.output_type == "latent":
            images = latents
        else:
            images = _images(done.images, self.output_type)
        t = done.timings
        out = PipelineOutput(
            images=images,
            latents=latents,
            seed=done.seed,
            interrupted=done.interrupted,
            request_id=done.request_id,
            replay=done.replay if done.HasField("replay") else None,
            timings={
                "queue_ms": t.queue_ms,
                "encode_ms": t.encode_ms,
                "denoise_ms": t.denoise_ms,
                "callback_wait_ms": t.callback_wait_ms,
                "decode_ms": t.decode_ms,
            },
        )
        return out if return_dict else out.to_tuple()


def save_replay(record, path) -> None:
    """Writes a replay record (``output.replay``) to ``path`` as its protobuf bytes."""
    with open(path, "wb") as f:
        f.write(_as_record(record).SerializeToString())


def load_replay(path) -> pb.ReplayRecord:
    """Reads a replay record :func:`save_replay` (or ``stepstream generate --save-replay``)
    wrote."""
    with open(path, "rb") as f:
        return _as_record(f.read())


def _as_record(record) -> pb.ReplayRecord:
    """A ReplayRecord from a record, its bytes, or a path to them."""
    if isinstance(record, pb.ReplayRecord):
        return record
    if isinstance(record, (bytes, bytearray, memoryview)):
        out = pb.ReplayRecord()
        out.ParseFromString(bytes(record))
        return out
    if isinstance(record, (str, os.PathLike)):
        return load_replay(record)
    raise TypeError(f"a replay record must be a ReplayRecord, bytes or a path, not {type(record).__name__}")


def _preview_options(options: Optional[Dict[str, Any]]) -> pb.PreviewOptions:
    """``preview_options`` as the wire's PreviewOptions; an unknown key or value raises."""
    options = dict(options or {})
    choices = {
        "source": {"x0": pb.PREVIEW_SOURCE_X0, "latents": pb.PREVIEW_SOURCE_LATENTS},
        "format": {"png": pb.PREVIEW_FORMAT_PNG, "jpeg": pb.PREVIEW_FORMAT_JPEG},
        "decoder": {"linear": pb.PREVIEW_DECODER_LINEAR, "taesd": pb.PREVIEW_DECODER_TAESD},
    }
    out = pb.PreviewOptions()
    for key, values in choices.items():
        if key in options:
            value = options.pop(key)
            if value not in values:
                raise ValueError(f"preview_options[{key!r}] must be one of {sorted(values)}, not {value!r}")
            setattr(out, key, values[value])
    if "items" in options:
        out.items.extend(int(i) for i in options.pop("items"))
    for key in ("max_side", "every", "jpeg_quality"):
        if key in options:
            setattr(out, key, int(options.pop(key)))
    if options:
        raise ValueError(f"unknown preview_options: {', '.join(sorted(options))}")
    return out


def _previews(previews) -> Dict[int, Any]:
    """A StepEnd's previews as ``{batch item: PIL image}``."""
    from PIL import Image

    out = {}
    for p in previews:
        img = Image.open(io.BytesIO(p.image.data))
        img.load()
        out[p.item] = img
    return out


_CALLBACK_NAMES = {
    pb.CALLBACK_PHASE_STEP_BEGIN: "callback_on_step_begin",
    pb.CALLBACK_PHASE_AFTER_GUIDANCE: "callback_after_guidance",
    pb.CALLBACK_PHASE_STEP_END: "callback_on_step_end",
}


def _images(images: Sequence[pb.Image], output_type: str):
    from PIL import Image

    pil = []
    for im in images:
        img = Image.open(io.BytesIO(im.data))
        img.load()
        pil.append(img.convert("RGB"))
    if output_type == "pil":
        return pil
    arr = np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pil]) if pil else np.zeros((0,), np.float32)
    if output_type == "np":
        return arr
    import torch  # output_type="pt"

    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
