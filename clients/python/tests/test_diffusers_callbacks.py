"""diffusers' own callback tests and its callback docs' examples, run against the server for the
tiny SD 1.5 and SDXL models.

The tests are our versions of ``test_callback_inputs`` and ``test_callback_cfg`` (diffusers'
tests/pipelines/test_pipelines_common.py) and ``test_pipeline_interrupt`` (its SD and SDXL
pipeline tests), with their assertions; the callbacks are diffusers' own. ``torch.Generator`` is
``stepstream.Generator`` and tensors are numpy arrays (the suite runs without torch), so
``torch.zeros_like`` is ``np.zeros_like`` and ``torch.allclose`` is ``np.allclose``. The docs'
examples (docs/source/en/using-diffusers/callback.md) run on the recorded golden cases where a
recording exists, and are compared with diffusers' numbers there.
"""

import numpy as np
import pytest
from PIL import Image

from conftest import MODELS, SD15, SDXL, png_diff, rel_diff
from stepstream import Generator, MultiPipelineCallbacks, RemotePipeline, SDXLCFGCutoffCallback
from test_schedulers import DPMSolverMultistepScheduler, model_scheduler_config

TOL = 1e-5


def dummy_inputs(model: str) -> dict:
    """diffusers' ``get_dummy_inputs`` for its SD / SDXL pipeline tests."""
    return {
        "prompt": "A painting of a squirrel eating a burger",
        "generator": Generator().manual_seed(0),
        "num_inference_steps": 2,
        "guidance_scale": 6.0 if model == SD15 else 5.0,
        "output_type": "np",
    }


@pytest.fixture(params=MODELS)
def model(request):
    return request.param


# ---- diffusers' tests ----------------------------------------------------------------------------


def test_callback_inputs(target, model):
    pipe = RemotePipeline(target, model=model, tensor_format="numpy")
    pipe.set_progress_bar_config(disable=None)
    assert hasattr(pipe, "_callback_tensor_inputs"), (
        f" {model} should have `_callback_tensor_inputs` that defines a list of tensor variables its callback "
        "function can use as inputs"
    )
    # diffusers 0.42's lists for the two pipelines.
    assert pipe._callback_tensor_inputs == (
        ["latents", "prompt_embeds", "negative_prompt_embeds"]
        if model == SD15
        else ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    )
    calls = []

    def callback_inputs_subset(pipe, i, t, callback_kwargs):
        calls.append("subset")
        # iterate over callback args
        for tensor_name, tensor_value in callback_kwargs.items():
            # check that we're only passing in allowed tensor inputs
            assert tensor_name in pipe._callback_tensor_inputs

        return callback_kwargs

    def callback_inputs_all(pipe, i, t, callback_kwargs):
        calls.append("all")
        for tensor_name in pipe._callback_tensor_inputs:
            assert tensor_name in callback_kwargs

        # iterate over callback args
        for tensor_name, tensor_value in callback_kwargs.items():
            # check that we're only passing in allowed tensor inputs
            assert tensor_name in pipe._callback_tensor_inputs

        return callback_kwargs

    inputs = dummy_inputs(model)

    # Test passing in a subset
    inputs["callback_on_step_end"] = callback_inputs_subset
    inputs["callback_on_step_end_tensor_inputs"] = ["latents"]
    inputs["output_type"] = "latent"
    output = pipe(**inputs)[0]

    # Test passing in a everything
    inputs["callback_on_step_end"] = callback_inputs_all
    inputs["callback_on_step_end_tensor_inputs"] = pipe._callback_tensor_inputs
    inputs["output_type"] = "latent"
    output = pipe(**inputs)[0]

    def callback_inputs_change_tensor(pipe, i, t, callback_kwargs):
        is_last = i == (pipe.num_timesteps - 1)
        if is_last:
            callback_kwargs["latents"] = np.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    inputs["callback_on_step_end"] = callback_inputs_change_tensor
    inputs["callback_on_step_end_tensor_inputs"] = pipe._callback_tensor_inputs
    inputs["output_type"] = "latent"
    output = pipe(**inputs)[0]
    assert np.abs(output).sum() == 0
    # (Not in diffusers:) the callbacks ran at every step, so their assertions were checked.
    assert calls == ["subset"] * 2 + ["all"] * 2


def test_callback_cfg(target, model):
    pipe = RemotePipeline(target, model=model, tensor_format="numpy")
    pipe.set_progress_bar_config(disable=None)
    assert hasattr(pipe, "_callback_tensor_inputs")

    def callback_increase_guidance(pipe, i, t, callback_kwargs):
        pipe._guidance_scale += 1.0

        return callback_kwargs

    inputs = dummy_inputs(model)

    # use cfg guidance because some pipelines modify the shape of the latents
    # outside of the denoising loop
    inputs["guidance_scale"] = 2.0
    inputs["callback_on_step_end"] = callback_increase_guidance
    inputs["callback_on_step_end_tensor_inputs"] = pipe._callback_tensor_inputs
    _ = pipe(**inputs)[0]

    # we increase the guidance scale by 1.0 at every step
    # check that the guidance scale is increased by the number of scheduler timesteps
    # accounts for models that modify the number of inference steps based on strength
    assert pipe.guidance_scale == (inputs["guidance_scale"] + pipe.num_timesteps)


def test_pipeline_interrupt(target, model):
    sd_pipe = RemotePipeline(target, model=model, tensor_format="numpy")
    sd_pipe.set_progress_bar_config(disable=None)

    prompt = "hey"
    num_inference_steps = 3

    # store intermediate latents from the generation process
    class PipelineState:
        def __init__(self):
            self.state = []

        def apply(self, pipe, i, t, callback_kwargs):
            self.state.append(callback_kwargs["latents"])
            return callback_kwargs

    pipe_state = PipelineState()
    sd_pipe(
        prompt,
        num_inference_steps=num_inference_steps,
        output_type="np",
        generator=Generator("cpu").manual_seed(0),
        callback_on_step_end=pipe_state.apply,
    ).images

    # interrupt generation at step index
    interrupt_step_idx = 1

    def callback_on_step_end(pipe, i, t, callback_kwargs):
        if i == interrupt_step_idx:
            pipe._interrupt = True

        return callback_kwargs

    output_interrupted = sd_pipe(
        prompt,
        num_inference_steps=num_inference_steps,
        output_type="latent",
        generator=Generator("cpu").manual_seed(0),
        callback_on_step_end=callback_on_step_end,
    ).images

    # fetch intermediate latents at the interrupted step
    # from the completed generation process
    intermediate_latent = pipe_state.state[interrupt_step_idx]

    # compare the intermediate latent to the output of the interrupted process
    # they should be the same
    assert np.allclose(intermediate_latent, output_interrupted, atol=1e-4)
    # (Not in diffusers:) the pipeline object, like diffusers', still says it was interrupted.
    assert sd_pipe.interrupt is True and sd_pipe._interrupt is True
    assert len(pipe_state.state) == num_inference_steps


# ---- the docs' examples ---------------------------------------------------------------------------


def test_docs_official_sdxl_cfg_cutoff_callback_matches_diffusers(target, case):
    """"Official callbacks": SDXLCFGCutoffCallback(cutoff_step_ratio=0.4), on the recorded SDXL
    run of it (diffusers' Euler, the model's own scheduler)."""
    c = case("euler-10-cfg-cutoff", SDXL)
    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)
    # can also be used with cutoff_step_index
    # callback = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=10)
    pipeline = RemotePipeline(target, model=SDXL, tensor_format="numpy")
    out = pipeline(**c.call_args(), callback_on_step_end=callback, return_latents=True)
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert png_diff(out.images[0], c) <= 1
    assert pipeline.guidance_scale == 0.0 and not pipeline.do_classifier_free_guidance


def test_docs_official_sdxl_callback_with_dpm_karras(target):
    """The same example as written: DPM-Solver++ with Karras sigmas from the model's config,
    guidance 6.5, 25 steps (no recording: the CFG decisions and the scheduler are checked)."""
    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)
    pipeline = RemotePipeline(target, model=SDXL, tensor_format="numpy")
    scheduler = DPMSolverMultistepScheduler.from_config(model_scheduler_config(SDXL), use_karras_sigmas=True)
    seen = []

    def watch(pipe, i, t, kw):
        seen.append((i, pipe.do_classifier_free_guidance, pipe.accepted.scheduler))
        return kw

    prompt = "a sports car at the road, best quality, high quality, high detail, 8k resolution"
    generator = Generator(device="cpu").manual_seed(2628670641)
    out = pipeline(
        prompt=prompt,
        negative_prompt="",
        guidance_scale=6.5,
        num_inference_steps=25,
        generator=generator,
        callback_on_step_end=MultiPipelineCallbacks([watch, callback]),
        scheduler=scheduler,
    )
    assert out.images[0].size == (64, 64)
    assert [i for i, _, _ in seen] == list(range(25))
    assert {s for _, _, s in seen} == {"dpmpp_2m_karras"}
    # int(25 * 0.4) = 10: CFG up to and including step 10, off after the callback there.
    assert [cfg for _, cfg, _ in seen] == [True] * 11 + [False] * 14


# "Dynamic classifier-free guidance", verbatim from diffusers' docs (up to 0.33): the callback uses
# the module-level `pipeline`, not its `pipe` argument.
pipeline = None


def callback_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
        # adjust the batch_size of prompt_embeds according to guidance_scale
        if step_index == int(pipeline.num_timesteps * 0.4):
                prompt_embeds = callback_kwargs["prompt_embeds"]
                prompt_embeds = prompt_embeds.chunk(2)[-1]
                # update guidance_scale and prompt_embeds
                pipeline._guidance_scale = 0.0
                callback_kwargs["prompt_embeds"] = prompt_embeds
        return callback_kwargs


def test_docs_dynamic_cfg_through_the_module_level_pipeline_matches_diffusers(target, case):
    global pipeline
    c = case("ddim-10-cfg-cutoff")
    pipeline = RemotePipeline(target, model=SD15, tensor_format="numpy")
    out = pipeline(
        **c.call_args(),
        callback_on_step_end=callback_dynamic_cfg,
        callback_on_step_end_tensor_inputs=['prompt_embeds'],
        return_latents=True,
    )
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert png_diff(out.images[0], c) <= 1
    # After the call, the pipeline shows the state the call left, as diffusers' does.
    assert pipeline.num_timesteps == c.json["num_timesteps"]
    assert pipeline.guidance_scale == 0.0 and pipeline._guidance_scale == 0.0
    assert pipeline.do_classifier_free_guidance is False
    assert pipeline.interrupt is False


# "Interrupt the diffusion process", verbatim.
def interrupt_callback(pipeline, i, t, callback_kwargs):
    stop_idx = 10
    if i == stop_idx:
        pipeline._interrupt = True

    return callback_kwargs


def test_docs_interrupt_callback_stops_after_step_10(target, model):
    pipeline = RemotePipeline(target, model=model, tensor_format="numpy")
    num_inference_steps = 50
    seen = []

    def record(pipe, i, t, kw):
        seen.append((i, np.array(kw["latents"])))
        return kw

    out = pipeline(
        "A photo of a cat",
        num_inference_steps=num_inference_steps,
        callback_on_step_end=MultiPipelineCallbacks([record, interrupt_callback]),
        callback_on_step_end_tensor_inputs=["latents"],
        return_latents=True,
    )
    assert [i for i, _ in seen] == list(range(11))
    assert out.interrupted and pipeline.interrupt
    assert pipeline.num_timesteps == num_inference_steps
    # Interrupted, it decodes the latents it had after step 10.
    assert rel_diff(out.latents, seen[-1][1]) == 0.0
    assert out.images[0].size == (64, 64)


# "Display image after each generation step": `latents_to_rgb` ported to numpy (the docs' torch
# version needs torch), `decode_tensors` verbatim.
def latents_to_rgb(latents):
    weights = (
        (60, -60, 25, -70),
        (60,  -5, 15, -50),
        (60,  10, -5, -35),
    )

    weights_tensor = np.array(weights, dtype=latents.dtype).T
    biases_tensor = np.array((150, 140, 130), dtype=latents.dtype)
    rgb_tensor = np.einsum("...lxy,lr -> ...rxy", latents, weights_tensor) + biases_tensor[:, None, None]
    image_array = rgb_tensor.clip(0, 255).astype(np.uint8).transpose(1, 2, 0)

    return Image.fromarray(image_array)


def decode_tensors(pipe, step, timestep, callback_kwargs):
    latents = callback_kwargs["latents"]

    image = latents_to_rgb(latents[0])
    image.save(f"{step}.png")

    return callback_kwargs


@pytest.mark.parametrize("model, name", [(SDXL, "euler-10"), (SD15, "ddim-10")])
def test_docs_intermediate_images_match_diffusers_latents(target, case, tmp_path, monkeypatch, model, name):
    c = case(name, model)
    monkeypatch.chdir(tmp_path)
    pipeline = RemotePipeline(target, model=model, tensor_format="numpy")
    image = pipeline(
        **c.call_args(),
        callback_on_step_end=decode_tensors,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images[0]
    assert png_diff(image, c) <= 1
    n = c.json["num_timesteps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.png" for k in range(n))
    for k in range(n):
        got = np.asarray(Image.open(tmp_path / f"{k}.png"), dtype=np.int16)
        want = np.asarray(latents_to_rgb(c.callback_in(k, "latents")[0]), dtype=np.int16)
        assert got.shape == (8, 8, 3)
        # Truncation to bytes may flip a level where diffusers' latents sit on a boundary.
        assert np.abs(got - want).max() <= 1, f"step {k}"


def test_docs_latents_to_rgb_with_torch_matches_the_numpy_port(target, case, tmp_path):
    torch = pytest.importorskip("torch")

    def latents_to_rgb_torch(latents):  # the docs' function, verbatim
        weights = (
            (60, -60, 25, -70),
            (60,  -5, 15, -50),
            (60,  10, -5, -35),
        )

        weights_tensor = torch.t(torch.tensor(weights, dtype=latents.dtype).to(latents.device))
        biases_tensor = torch.tensor((150, 140, 130), dtype=latents.dtype).to(latents.device)
        rgb_tensor = torch.einsum("...lxy,lr -> ...rxy", latents, weights_tensor) + biases_tensor.unsqueeze(-1).unsqueeze(-1)
        image_array = rgb_tensor.clamp(0, 255).byte().cpu().numpy().transpose(1, 2, 0)

        return Image.fromarray(image_array)

    lat = case("euler-10", SDXL).callback_in(3, "latents")[0]
    a = np.asarray(latents_to_rgb_torch(torch.from_numpy(np.array(lat))), dtype=np.int16)
    b = np.asarray(latents_to_rgb(np.array(lat)), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
