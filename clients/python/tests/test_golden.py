"""The seed example from diffusers' docs, verbatim, against the server: it must give the images and
latents diffusers recorded for the same run (case ddim-10-cfg-cutoff of the tiny SD 1.5 model).

Tolerances (shared/golden/README.md): latents 1e-5 relative to max(1, max|ref|); PNG within 1/255.
"""

import numpy as np
import pytest

from conftest import png_diff, rel_diff
from stepstream import MultiPipelineCallbacks, RemotePipeline, SDCFGCutoffCallback

LATENTS_TOL = 1e-5
EMBEDS_TOL = 1e-5


# ---- verbatim from diffusers' documentation (the issue's seed) --------------------------------
def callback_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
    # adjust the batch_size of prompt_embeds according to guidance_scale
    if step_index == int(pipe.num_timesteps * 0.4):
        prompt_embeds = callback_kwargs["prompt_embeds"]
        prompt_embeds = prompt_embeds.chunk(2)[-1]
        # update guidance_scale and prompt_embeds
        pipe._guidance_scale = 0.0
        callback_kwargs["prompt_embeds"] = prompt_embeds
    return callback_kwargs
# -----------------------------------------------------------------------------------------------


class Recorder:
    """Records what a callback sees at each step (runs before the callback under test)."""

    def __init__(self):
        self.steps = []

    def __call__(self, pipe, step_index, timestep, callback_kwargs):
        self.steps.append(
            dict(
                step_index=step_index,
                timestep=timestep,
                num_timesteps=pipe.num_timesteps,
                cfg=pipe.do_classifier_free_guidance,
                guidance=pipe.guidance_scale,
                latents=np.array(callback_kwargs["latents"].numpy(), dtype=np.float32),
                prompt_embeds=np.array(callback_kwargs["prompt_embeds"].numpy(), dtype=np.float32),
            )
        )
        return callback_kwargs


def check_final(out, c, label):
    d_final = rel_diff(out.latents, c.tensor("final.latents"))
    d_png = png_diff(out.images[0], c)
    print(f"\n{label}: final latents rel {d_final:.2e}, png max diff {d_png}")
    assert d_final <= LATENTS_TOL, f"{label}: final latents rel diff {d_final}"
    assert d_png <= 1, f"{label}: PNG max diff {d_png}"


@pytest.mark.parametrize("fmt", ["numpy", "torch"])
def test_seed_callback_verbatim_reproduces_the_golden_case(target, case, fmt):
    if fmt == "torch":
        pytest.importorskip("torch")
    c = case("ddim-10-cfg-cutoff")
    pipe = RemotePipeline(target, tensor_format=fmt)
    out = pipe(
        **c.call_args(),
        callback_on_step_end=callback_dynamic_cfg,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        return_latents=True,
    )
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    assert not out.interrupted
    check_final(out, c, f"verbatim seed callback ({fmt})")


@pytest.mark.parametrize("fmt", ["numpy", "torch"])
def test_every_step_matches_the_golden_case(target, case, fmt):
    """The same run with a recorder in front: every step's latents, prompt_embeds and CFG decision
    as diffusers' callback saw them."""
    if fmt == "torch":
        torch = pytest.importorskip("torch")
    c = case("ddim-10-cfg-cutoff")
    rec = Recorder()
    seen_types = []

    def types(pipe, i, t, kw):
        seen_types.append(type(kw["prompt_embeds"]))
        return kw

    pipe = RemotePipeline(target, tensor_format=fmt)
    out = pipe(
        **c.call_args(),
        callback_on_step_end=MultiPipelineCallbacks([types, rec, callback_dynamic_cfg]),
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        return_latents=True,
    )
    assert [s["step_index"] for s in rec.steps] == c.json["executed_step_indices"]
    worst = 0.0
    for k, s in enumerate(rec.steps):
        st = c.step(k)
        assert s["timestep"] == st["timestep"]
        assert s["num_timesteps"] == c.json["num_timesteps"]
        assert s["cfg"] == st["cfg_applied"], f"step {k}: CFG decision"
        assert s["guidance"] == pytest.approx(st["guidance_scale_used"])
        d = rel_diff(s["latents"], c.callback_in(k, "latents"))
        worst = max(worst, d)
        assert d <= LATENTS_TOL, f"step {k}: latents rel diff {d}"
        d = float(np.abs(s["prompt_embeds"] - c.callback_in(k, "prompt_embeds")).max())
        assert d <= EMBEDS_TOL, f"step {k}: prompt_embeds diff {d}"
    print(f"\nper-step latents ({fmt}): worst rel {worst:.2e} over {len(rec.steps)} steps")
    if fmt == "torch":
        assert all(t is torch.Tensor for t in seen_types)
    else:
        assert all(issubclass(t, np.ndarray) for t in seen_types)
    check_final(out, c, f"recorded run ({fmt})")


def test_cfg_cutoff_helper_blocks_only_at_its_step_and_matches(target, case):
    c = case("ddim-10-cfg-cutoff")
    calls = []

    class Counting(SDCFGCutoffCallback):
        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            calls.append(step_index)
            return super().callback_fn(pipeline, step_index, timestep, callback_kwargs)

    pipe = RemotePipeline(target, tensor_format="numpy")
    out = pipe(**c.call_args(), callback_on_step_end=Counting(cutoff_step_ratio=0.4), return_latents=True)
    assert calls == [4], "only the cutoff step reaches the client (and blocks the server)"
    check_final(out, c, "SDCFGCutoffCallback(0.4)")


def test_steps_that_depend_on_num_timesteps_are_chosen_from_the_real_count(target, case, monkeypatch):
    """A callback whose steps are a function of num_timesteps gets the count the server reports
    in Accepted (the server waits for the selection before step 0): a wrong local prediction of
    it changes nothing, and the function runs once."""
    c = case("ddim-10-cfg-cutoff")
    pipe = RemotePipeline(target, tensor_format="numpy")
    calls = []

    def steps(n):
        calls.append(n)
        return [int(n * 0.4)]

    real = pipe._predict_num_timesteps
    monkeypatch.setattr(pipe, "_predict_num_timesteps", lambda req: (real(req)[0], 7))
    out = pipe(
        **c.call_args(),
        callback_on_step_end=callback_dynamic_cfg,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        callback_on_step_end_steps=steps,
        return_latents=True,
    )
    assert calls == [10]
    check_final(out, c, "steps chosen after Accepted")
