"""Ready-made callbacks in the shape of diffusers' ``diffusers.callbacks``.

They keep diffusers' constructor arguments (``cutoff_step_ratio`` / ``cutoff_step_index``) and
``tensor_inputs``, and add what a remote pipeline can use:

* :meth:`PipelineCallback.step_indices` tells the pipeline which steps the callback acts on, so
  that only those steps make the server wait for a reply (the other steps run at full speed);
* the CFG cutoffs keep the **conditional half** of the CFG batch (``x[x.shape[0] // 2:]``), which
  is right at any batch size; diffusers' ``x[-1:]`` is right only for one image per prompt.
  They do nothing when CFG is already off.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Set

__all__ = [
    "PipelineCallback",
    "SDCFGCutoffCallback",
    "SDXLCFGCutoffCallback",
    "MultiPipelineCallbacks",
    "conditional_half",
    "cutoff_step",
]


def cutoff_step(num_timesteps: int, ratio: float) -> int:
    """diffusers' ``int(pipeline.num_timesteps * cutoff_step_ratio)`` (float64, truncating)."""
    return int(num_timesteps * ratio)


def conditional_half(x):
    """The positive (conditional) half of a ``[negative×N; positive×N]`` CFG batch."""
    n = x.shape[0]
    if n % 2:
        raise ValueError(f"a CFG batch has an even first dimension, not {n}")
    return x[n // 2 :]


class _DefaultRatio(float):
    pass


_DEFAULT_RATIO = _DefaultRatio(1.0)


class PipelineCallback:
    """Base class: diffusers' ``PipelineCallback`` arguments and call convention."""

    tensor_inputs: List[str] = []

    def __init__(self, cutoff_step_ratio: Optional[float] = _DEFAULT_RATIO, cutoff_step_index: Optional[int] = None):
        if cutoff_step_ratio is _DEFAULT_RATIO:
            # diffusers defaults the ratio to 1.0 and then refuses an index unless the ratio is
            # passed as None; here an index alone is enough.
            cutoff_step_ratio = None if cutoff_step_index is not None else 1.0
        if (cutoff_step_ratio is None) == (cutoff_step_index is None):
            raise ValueError("Either cutoff_step_ratio or cutoff_step_index should be provided, not both or none.")
        if cutoff_step_ratio is not None and (
            not isinstance(cutoff_step_ratio, float) or not (0.0 <= cutoff_step_ratio <= 1.0)
        ):
            raise ValueError("cutoff_step_ratio must be a float between 0.0 and 1.0.")
        self.cutoff_step_ratio = cutoff_step_ratio
        self.cutoff_step_index = cutoff_step_index

    @property
    def config(self):
        """diffusers' ``self.config`` (``cutoff_step_ratio``, ``cutoff_step_index``)."""
        return self

    def cutoff_step(self, num_timesteps: int) -> int:
        """The step the callback acts on."""
        if self.cutoff_step_index is not None:
            return self.cutoff_step_index
        return cutoff_step(num_timesteps, self.cutoff_step_ratio)

    def step_indices(self, num_timesteps: int) -> Optional[Set[int]]:
        """The steps at which this callback may change something (``None``: any step)."""
        return {self.cutoff_step(num_timesteps)}

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        raise NotImplementedError

    def __call__(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)


class SDCFGCutoffCallback(PipelineCallback):
    """Turns CFG off at the cutoff step (SD 1.x/2.x): ``prompt_embeds`` keeps its conditional
    half and ``pipe._guidance_scale`` becomes 0."""

    tensor_inputs = ["prompt_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        if step_index == self.cutoff_step(pipeline.num_timesteps) and pipeline.do_classifier_free_guidance:
            callback_kwargs["prompt_embeds"] = conditional_half(callback_kwargs["prompt_embeds"])
            pipeline._guidance_scale = 0.0
        return callback_kwargs


class SDXLCFGCutoffCallback(PipelineCallback):
    """Turns CFG off at the cutoff step (SDXL): ``prompt_embeds``, ``add_text_embeds`` and
    ``add_time_ids`` keep their conditional halves and ``pipe._guidance_scale`` becomes 0."""

    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        if step_index == self.cutoff_step(pipeline.num_timesteps) and pipeline.do_classifier_free_guidance:
            for name in self.tensor_inputs:
                callback_kwargs[name] = conditional_half(callback_kwargs[name])
            pipeline._guidance_scale = 0.0
        return callback_kwargs


def _steps_of(cb, num_timesteps: int) -> Optional[Set[int]]:
    f: Optional[Callable[[int], Optional[Iterable[int]]]] = getattr(cb, "step_indices", None)
    if f is None:
        return None
    steps = f(num_timesteps)
    return None if steps is None else set(steps)


class MultiPipelineCallbacks:
    """Runs several callbacks in order, each getting the previous one's ``callback_kwargs``.

    ``tensor_inputs`` is the union of theirs (plain functions may be mixed in: they need no
    tensors of their own and may act at any step)."""

    def __init__(self, callbacks: Sequence):
        self.callbacks = list(callbacks)

    @property
    def tensor_inputs(self) -> List[str]:
        names: List[str] = []
        for cb in self.callbacks:
            for n in getattr(cb, "tensor_inputs", []):
                if n not in names:
                    names.append(n)
        return names

    def step_indices(self, num_timesteps: int) -> Optional[Set[int]]:
        """The union of the callbacks' steps; ``None`` when any callback may act at any step."""
        out: Set[int] = set()
        for cb in self.callbacks:
            steps = _steps_of(cb, num_timesteps)
            if steps is None:
                return None
            out |= steps
        return out

    def __call__(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        for cb in self.callbacks:
            out = cb(pipeline, step_index, timestep, callback_kwargs)
            if out is not None:
                callback_kwargs = out
        return callback_kwargs
