"""The other two callback points from Python: ``callback_on_step_begin`` (before the UNet; its
changes apply to that step) and ``callback_after_guidance`` (the guided noise prediction, its
halves and the scheduler's x0, before the scheduler step). Recordings: the golden cases and
tests/make_phase_fixtures.py."""

import numpy as np

from conftest import FIXTURES, load_safetensors, rel_diff
from stepstream import RemotePipeline

TOL = 1e-5


def test_a_latents_edit_at_step_begin_equals_diffusers_edit_at_the_previous_step_end(target, case):
    c = case("ddim-10-latents-edit")  # diffusers halves the latents at the end of step 3
    seen = []

    def begin(pipe, i, t, kw):
        seen.append(i)
        if i == 4:
            kw["latents"] = kw["latents"] * 0.5
        return kw

    out = RemotePipeline(target, tensor_format="numpy")(
        **c.call_args(), callback_on_step_begin=begin, return_latents=True)
    assert seen == list(range(10))
    assert rel_diff(np.asarray(out.latents), c.tensor("final.latents")) <= TOL


def test_after_guidance_sees_diffusers_noise_prediction_and_x0_and_may_replace_it(target, case):
    c = case("ddim-10")
    x0 = load_safetensors(FIXTURES / "cases" / "phases" / "x0-tiny-sd15-ddim.safetensors")
    edit = load_safetensors(FIXTURES / "cases" / "phases" / "noise-pred-edit.safetensors")
    names = ["noise_pred", "noise_pred_uncond", "noise_pred_text", "pred_original_sample"]
    checked = []

    def after_guidance(pipe, i, t, kw):
        if i <= 3:  # the unedited golden run, up to the edit
            out = c.tensors[c.step(i)["unet"]["out"]]
            guided = c.tensors[c.step(i)["scheduler_step"]["model_output"]]
            assert rel_diff(kw["noise_pred"], guided) <= TOL
            assert rel_diff(kw["noise_pred_uncond"], out[:1]) <= TOL
            assert rel_diff(kw["noise_pred_text"], out[1:]) <= TOL
            assert rel_diff(kw["pred_original_sample"], x0[f"step{i}_x0"]) <= TOL
        checked.append(i)
        if i == 3:
            kw["noise_pred"] = kw["noise_pred"] * 0.5
        return kw

    latents = []

    def end(pipe, i, t, kw):
        latents.append(np.asarray(kw["latents"]))
        return kw

    RemotePipeline(target, tensor_format="numpy")(
        **c.call_args(), callback_after_guidance=after_guidance,
        callback_after_guidance_tensor_inputs=names, callback_on_step_end=end)
    assert checked == list(range(10))
    for k, got in enumerate(latents):
        assert rel_diff(got, edit[f"step{k}_latents"]) <= TOL, k
