"""``RemotePipeline``: a diffusers-style pipeline object whose denoising loop runs on a stepstream
server, with ``callback_on_step_end`` run here, in this process, at the end of each step."""

from __future__ import annotations

import io
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Union

import grpc
import numpy as np

from . import errors, tensors
from .v1 import stepstream_pb2 as pb
from .v1 import stepstream_pb2_grpc as rpc

__all__ = ["RemotePipeline", "StepSession", "PipelineOutput", "Generator"]

#: Largest message either side may send (images and tensors of big models exceed gRPC's 4 MiB).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# diffusers scheduler classes → the server's scheduler names.
_SCHEDULER_NAMES = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "PNDMScheduler": "pndm",
    "LCMScheduler": "lcm",
    "UniPCMultistepScheduler": "unipc",
}

# diffusers arguments with no remote equivalent: refused rather than silently ignored.
_UNSUPPORTED = (
    "timesteps",
    "sigmas",
    "ip_adapter_image",
    "ip_adapter_image_embeds",
    "cross_attention_kwargs",
    "clip_skip",
    "callback",
    "callback_steps",
)


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
    final latents when ``return_latents=True`` (or ``output_type="latent"``)."""

    images: Any
    nsfw_content_detected: Optional[List[bool]] = None
    latents: Any = None
    seed: int = 0
    interrupted: bool = False
    request_id: str = ""
    timings: Dict[str, float] = field(default_factory=dict)

    def __getitem__(self, i):
        return (self.images, self.nsfw_content_detected)[i]

    def to_tuple(self):
        return (self.images, self.nsfw_content_detected)


class StepSession:
    """The ``pipe`` a callback receives: one generation, with diffusers' attribute names.

    Readable: ``num_timesteps``, ``timesteps``, ``guidance_scale``, ``do_classifier_free_guidance``,
    ``interrupt``, ``seed``, ``request_id``, ``model``, ``width``, ``height``, ``step_index``,
    ``timestep``, ``rejected`` (the :class:`~stepstream.errors.ReplyRejectedError` of the previous
    try at this step, when ``reply_retries`` let the callback run again), ``pipeline`` (the
    :class:`RemotePipeline`). Settable: ``_guidance_scale`` (and ``guidance_scale``),
    ``_interrupt`` (and ``interrupt``). Anything else (``pipe.unet``, ``pipe.scheduler``) lives on
    the server and is not reachable."""

    def __init__(self, pipeline: "RemotePipeline", accepted: pb.Accepted):
        self.pipeline = pipeline
        self.accepted = accepted
        self.num_timesteps = len(accepted.timesteps)
        self.timesteps = list(accepted.timesteps)
        self.seed = accepted.seed
        self.request_id = accepted.request_id
        self.model = accepted.model
        self.width = accepted.width
        self.height = accepted.height
        self._callback_tensor_inputs = list(accepted.callback_tensor_inputs)
        self._guidance_scale = float(accepted.guidance_scale)
        self._interrupt = False
        self._cfg: Optional[bool] = None
        self._step_guidance = self._guidance_scale
        self.step_index: Optional[int] = None
        self.timestep: Optional[float] = None
        self.rejected: Optional[errors.ReplyRejectedError] = None
        self._tries = 0
        self._last_step: Optional[pb.StepEnd] = None

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

    def _begin_step(self, step: pb.StepEnd) -> None:
        self.step_index = step.step_index
        self.timestep = step.timestep
        self._guidance_scale = float(step.guidance_scale)
        self._step_guidance = self._guidance_scale
        self._cfg = step.do_classifier_free_guidance
        self._interrupt = False

    def __getattr__(self, name: str):
        raise AttributeError(
            f"the remote pipeline's callback session has no attribute `{name}`: the models and the "
            "scheduler run on the server; a callback sees num_timesteps, timesteps, guidance_scale, "
            "do_classifier_free_guidance, interrupt and its callback_kwargs tensors"
        )


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
    ``"numpy"``."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        model: Optional[str] = None,
        *,
        token: Optional[str] = None,
        tls=None,
        tensor_format: str = "auto",
        channel_options: Sequence = (),
    ):
        self.target = target
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
        *,
        seed: Optional[int] = None,
        scheduler=None,
        callback_on_step_end_steps: Union[Iterable[int], Callable[[int], Iterable[int]], None] = None,
        observe_only: bool = False,
        return_latents: bool = False,
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
        diffusers scheduler instance/class; ``None``: the model's own.
        ``callback_on_step_end_steps``: the steps at which the callback may change something
        (indices, or a function of ``num_timesteps``). Only those steps make the server wait. A
        :class:`~stepstream.callbacks.PipelineCallback` says it itself; a plain function runs at
        every step unless this is given.
        ``observe_only``: the callback only watches: the server never waits, and a callback that
        changes anything raises.
        ``return_latents``: also return the final latents (``output.latents``).
        ``reply_timeout_ms`` / ``on_timeout`` (``"abort"``, ``"continue"``): the reply deadline.
        ``wire_dtype``: ``"f32"`` (default), ``"f16"`` or ``"bf16"`` for tensors on the wire.
        ``reply_retries``: how often a rejected reply may be retried: the callback runs again for
        the same step with ``pipe.rejected`` set; past that, the call raises
        :class:`~stepstream.errors.ReplyRejectedError`.
        ``tensor_format``: overrides the pipeline's for this call.
        ``timeout``: seconds for the whole call (gRPC deadline).
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
        req.output.format = pb.IMAGE_FORMAT_NONE if output_type == "latent" else pb.IMAGE_FORMAT_PNG
        req.output.return_latents = bool(return_latents)

        run = _Run(self, req, fmt, output_type, timeout)
        if callback_on_step_end is None:
            if observe_only:
                raise ValueError("observe_only needs a callback_on_step_end to call")
            if self._progress_bar_wanted():
                return run.finish(run.stream(None, _Plan(tensor_inputs=[], steps=None, observe_only=True)), return_dict)
            return run.finish(run.once(), return_dict)

        names = list(callback_on_step_end_tensor_inputs or [])
        own = getattr(callback_on_step_end, "tensor_inputs", None)
        if isinstance(own, (list, tuple)):
            # diffusers: a PipelineCallback / MultiPipelineCallbacks brings its own tensor_inputs
            # (here added to any given explicitly).
            names = list(own) + names
        elif callback_on_step_end_tensor_inputs is None:
            names = ["latents"]  # diffusers' default
        plan = _Plan(
            tensor_inputs=list(dict.fromkeys(names)),
            steps=callback_on_step_end_steps if callback_on_step_end_steps is not None else getattr(callback_on_step_end, "step_indices", None),
            observe_only=observe_only,
            reply_timeout_ms=reply_timeout_ms,
            on_timeout=on_timeout,
            wire_dtype=tensors.wire_dtype(wire_dtype),
            reply_retries=int(reply_retries),
        )
        return run.finish(run.stream(callback_on_step_end, plan), return_dict)

    # ----- helpers ---------------------------------------------------------------------------

    def _progress_bar_wanted(self) -> bool:
        if self._progress.get("disable"):
            return False
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return False
        return True

    @staticmethod
    def _scheduler_name(s) -> str:
        if isinstance(s, str):
            return s
        cls = s if isinstance(s, type) else type(s)
        try:
            return _SCHEDULER_NAMES[cls.__name__]
        except KeyError:
            raise ValueError(f"no server scheduler for {cls.__name__}; pass a name from list_models()") from None

    def _predict_num_timesteps(self, req: pb.GenerateRequest):
        """(cache key, predicted num_timesteps) for a request: its steps, unless a previous
        answer for the same model, scheduler and steps said otherwise (e.g. PNDM: steps + 1)."""
        steps = req.num_inference_steps or self.model_info.default_steps
        key = (req.model, req.scheduler, steps)
        return key, self._num_timesteps_cache.get(key, steps)


@dataclass
class _Plan:
    tensor_inputs: List[str]
    steps: Any  # None, an iterable of indices, or a function of num_timesteps
    observe_only: bool = False
    reply_timeout_ms: Optional[int] = None
    on_timeout: str = "abort"
    wire_dtype: int = pb.DTYPE_F32
    reply_retries: int = 0


class _Resubscribe(Exception):
    def __init__(self, num_timesteps: int, seed: int):
        self.num_timesteps = num_timesteps
        self.seed = seed


class _Run:
    """One call: the request, then GenerateOnce or a Generate stream."""

    def __init__(self, pipe: RemotePipeline, req: pb.GenerateRequest, fmt: str, output_type: str, timeout):
        self.pipe = pipe
        self.req = req
        self.fmt = fmt
        self.output_type = output_type
        self.timeout = timeout

    def once(self) -> pb.Completed:
        try:
            return self.pipe._stub.GenerateOnce(self.req, metadata=self.pipe._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def stream(self, callback, plan: _Plan) -> pb.Completed:
        steps_of = plan.steps
        predicted = key = None
        if callable(steps_of):
            key, predicted = self.pipe._predict_num_timesteps(self.req)
        for _attempt in range(2):
            req = pb.GenerateRequest()
            req.CopyFrom(self.req)
            cb = req.callback
            cb.tensor_inputs.extend(plan.tensor_inputs)
            cb.observe_only = plan.observe_only
            cb.wire_dtype = plan.wire_dtype
            if plan.reply_timeout_ms:
                cb.reply_timeout_ms = int(plan.reply_timeout_ms)
            cb.on_timeout = {"abort": pb.TIMEOUT_ACTION_ABORT, "continue": pb.TIMEOUT_ACTION_CONTINUE}[plan.on_timeout]
            if steps_of is not None:
                wanted = steps_of(predicted) if callable(steps_of) else steps_of
                if wanted is not None:
                    wanted = sorted({int(i) for i in wanted if int(i) >= 0})
                    if predicted is not None:
                        wanted = [i for i in wanted if i < predicted]
                    if not wanted:
                        # The callback never acts: nothing needs to block.
                        if self.pipe._progress_bar_wanted():
                            return self.stream(None, _Plan(tensor_inputs=[], steps=None, observe_only=True))
                        return self.once()
                    cb.step_indices.extend(wanted)
            try:
                return self._session(req, callback, plan, predicted)
            except _Resubscribe as r:
                # Timesteps differ from steps for this scheduler: ask again, same seed.
                self.pipe._num_timesteps_cache[key] = r.num_timesteps
                predicted = r.num_timesteps
                self.req.seed = r.seed
        raise errors.ProtocolError("the server's timestep count changed between two identical requests")

    def _session(self, req: pb.GenerateRequest, callback, plan: _Plan, predicted: Optional[int]) -> pb.Completed:
        outbox: "queue.Queue[Optional[pb.ClientMessage]]" = queue.Queue()
        outbox.put(pb.ClientMessage(start=req))

        def requests():
            # The request stream stays open until Completed: closing it cancels the generation.
            while True:
                msg = outbox.get()
                if msg is None:
                    return
                yield msg

        call = self.pipe._stub.Generate(requests(), metadata=self.pipe._metadata, timeout=self.timeout)
        session: Optional[StepSession] = None
        completed: Optional[pb.Completed] = None
        bar = None
        try:
            for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "accepted":
                    acc = msg.accepted
                    if predicted is not None and len(acc.timesteps) != predicted:
                        raise _Resubscribe(len(acc.timesteps), acc.seed)
                    session = StepSession(self.pipe, acc)
                    bar = self._bar(len(acc.timesteps))
                elif kind == "step_end":
                    if session is None:
                        raise errors.ProtocolError("StepEnd before Accepted")
                    step = msg.step_end
                    if bar is not None:
                        bar.update(step.step_index + 1 - bar.n)
                        bar.set_postfix_str(f"{step.step_ms:.1f} ms/step", refresh=False)
                    reply = self._answer(session, step, callback, plan, rejected=None)
                    if step.reply_required:
                        outbox.put(pb.ClientMessage(reply=reply))
                elif kind == "reply_rejected":
                    r = msg.reply_rejected
                    err = errors.ReplyRejectedError(r.step_index, r.field, r.reason)
                    if session is None or session._last_step is None or session._tries >= plan.reply_retries:
                        raise err
                    session._tries += 1
                    reply = self._answer(session, session._last_step, callback, plan, rejected=err)
                    outbox.put(pb.ClientMessage(reply=reply))
                elif kind == "completed":
                    completed = msg.completed
                    outbox.put(None)  # half-close; the server then ends the stream with OK
                    if bar is not None and not completed.interrupted:
                        bar.update(bar.total - bar.n)  # steps that sent no event ran too
            if completed is None:
                raise errors.ProtocolError("the stream ended without Completed")
            return completed
        except grpc.RpcError as e:
            if completed is not None:
                return completed
            raise errors.from_rpc_error(e) from None
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

    def _answer(self, session: StepSession, step: pb.StepEnd, callback, plan: _Plan, rejected) -> pb.StepReply:
        """Runs the callback on one StepEnd and turns what it changed into a StepReply."""
        reply = pb.StepReply(step_index=step.step_index)
        if callback is None:
            return reply
        if rejected is None:
            session._tries = 0
        session._last_step = step
        session.rejected = rejected
        session._begin_step(step)
        received = dict(step.tensors)
        kwargs = {name: tensors.decode(received[name], self.fmt) for name in plan.tensor_inputs if name in received}
        # diffusers passes None for a subscribed tensor the pipeline does not have at this step
        # (negative_prompt_embeds without CFG).
        for name in plan.tensor_inputs:
            kwargs.setdefault(name, None)
        out = callback(session, step.step_index, step.timestep, kwargs)
        if out is None:
            out = kwargs
        if not isinstance(out, dict):
            raise TypeError(f"callback_on_step_end must return a dict (callback_kwargs), not {type(out).__name__}")
        known = set(session._callback_tensor_inputs) | set(plan.tensor_inputs)
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
            timings={
                "queue_ms": t.queue_ms,
                "encode_ms": t.encode_ms,
                "denoise_ms": t.denoise_ms,
                "callback_wait_ms": t.callback_wait_ms,
                "decode_ms": t.decode_ms,
            },
        )
        return out if return_dict else out.to_tuple()


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
