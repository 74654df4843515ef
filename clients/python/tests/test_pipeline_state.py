"""The pipeline object mirrors its call's state, as a diffusers pipeline does: during a call (on the
calling thread) the call's, after it the last call's; one object may run calls from two threads."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import MODELS, SD15, SDXL, png_diff, rel_diff
from stepstream import RemotePipeline
from stepstream.callbacks import conditional_half

TOL = 1e-5


def test_before_any_call_only_the_model_list_exists(target):
    pipe = RemotePipeline(target, model=SDXL, tensor_format="numpy")
    for name in ("guidance_scale", "_guidance_scale", "num_timesteps", "interrupt", "_interrupt",
                 "do_classifier_free_guidance"):
        assert not hasattr(pipe, name), name  # diffusers sets them in __call__
    assert pipe._callback_tensor_inputs == list(pipe.model_info.callback_tensor_inputs)
    assert "add_time_ids" in pipe._callback_tensor_inputs


@pytest.mark.parametrize("model", MODELS)
def test_during_the_call_the_pipeline_is_the_call(target, model):
    pipeline = RemotePipeline(target, model=model, tensor_format="numpy")
    seen = []

    def cb(pipe, i, t, kw):
        # Both the argument and the object itself show this call.
        seen.append((pipeline.num_timesteps, pipe.num_timesteps, pipeline.guidance_scale, pipe.guidance_scale,
                     pipeline.do_classifier_free_guidance, pipe.do_classifier_free_guidance))
        if i == 1:
            pipeline._guidance_scale = 1.0  # through the object: CFG off from the next step
            assert pipe._guidance_scale == 1.0 and not pipe.do_classifier_free_guidance
            for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):  # the CFG-batched ones
                if name in kw:
                    kw[name] = conditional_half(kw[name])
        return kw

    pipeline("a cat", num_inference_steps=4, guidance_scale=3.5, callback_on_step_end=cb,
             callback_on_step_end_tensor_inputs=pipeline._callback_tensor_inputs)
    assert seen == [(4, 4, 3.5, 3.5, True, True)] * 2 + [(4, 4, 1.0, 1.0, False, False)] * 2
    assert (pipeline.guidance_scale, pipeline.num_timesteps, pipeline.interrupt) == (1.0, 4, False)


def test_after_a_call_without_callback_it_shows_that_call(target):
    pipe = RemotePipeline(target, model=SD15, tensor_format="numpy")
    pipe("a cat", num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    assert (pipe.guidance_scale, pipe.num_timesteps, pipe.do_classifier_free_guidance, pipe.interrupt) == (
        4.0, 3, True, False)
    pipe("a cat", num_inference_steps=2, output_type="latent")  # the model's default guidance
    assert pipe.guidance_scale == pipe.model_info.default_guidance_scale and pipe.num_timesteps == 2


def test_a_refused_call_leaves_the_previous_state(target):
    pipe = RemotePipeline(target, model=SD15, tensor_format="numpy")
    pipe("a cat", num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    with pytest.raises(Exception):
        pipe("a cat", num_inference_steps=2, guidance_scale=9.0, width=65)
    assert pipe.guidance_scale == 3.0


def test_two_threads_each_see_their_own_call_at_the_same_time(target):
    """Observe-only calls do not hold the server, so both callbacks run at once: each thread's
    view of the shared object is its own call, and a third thread sees the last finished call."""
    pipeline = RemotePipeline(target, model=SD15, tensor_format="numpy")
    pipeline("warm", num_inference_steps=3, guidance_scale=9.0, output_type="latent")  # the "last call"
    both_inside = threading.Barrier(3, timeout=60)
    done = threading.Barrier(3, timeout=60)
    seen = {}

    def call(guidance, steps):
        def cb(pipe, i, t, kw):
            if i == 0:
                both_inside.wait()  # both calls are inside their callbacks now
                seen[guidance] = (pipeline.guidance_scale, pipeline.num_timesteps, pipe.guidance_scale)
                done.wait()
            return kw

        pipeline("a cat", num_inference_steps=steps, guidance_scale=guidance, callback_on_step_end=cb,
                 callback_on_step_end_tensor_inputs=[], observe_only=True, output_type="latent")

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(call, 3.0, 4), pool.submit(call, 5.0, 6)]
        both_inside.wait()
        outside = (pipeline.guidance_scale, pipeline.num_timesteps)
        done.wait()
        for f in futures:
            f.result()
    assert outside == (9.0, 3)  # this thread runs no call: the last finished one
    assert seen == {3.0: (3.0, 4, 3.0), 5.0: (5.0, 6, 5.0)}
    assert (pipeline.guidance_scale, pipeline.num_timesteps) in {(3.0, 4), (5.0, 6)}


def test_two_threads_steering_through_the_shared_object_match_diffusers(target, case):
    """Two threads steer through the module-level style `pipeline._guidance_scale = 0.0` on one
    object; neither leaks into the other (the server runs them one after the other)."""
    pipeline = RemotePipeline(target, model=SD15, tensor_format="numpy")
    cutoff, plain = case("ddim-10-cfg-cutoff"), case("ddim-10")

    def dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
        if step_index == int(pipeline.num_timesteps * 0.4):
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            pipeline._guidance_scale = 0.0
        return callback_kwargs

    def untouched(pipe, step_index, timestep, callback_kwargs):
        assert pipeline.guidance_scale == 7.5 and pipeline.do_classifier_free_guidance
        return callback_kwargs

    def run(c, cb):
        return pipeline(**c.call_args(), callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                        return_latents=True)

    with ThreadPoolExecutor(2) as pool:
        jobs = [(c, pool.submit(run, c, cb)) for c, cb in [(cutoff, dynamic_cfg), (plain, untouched)] * 2]
        for c, f in jobs:
            out = f.result()
            assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL, c.name
            assert png_diff(out.images[0], c) <= 1, c.name


def test_setting_outside_a_call_changes_only_what_is_shown(target):
    pipe = RemotePipeline(target, model=SD15, tensor_format="numpy")
    pipe("a cat", num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    pipe._guidance_scale = 5.0  # as on a diffusers pipeline: the next call sets its own
    assert pipe.guidance_scale == 5.0
    seen = []
    pipe("a cat", num_inference_steps=2, guidance_scale=2.0, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(p.guidance_scale) or kw)
    assert seen == [2.0, 2.0]
    assert pipe.guidance_scale == 2.0
