"""RemotePipeline against the server: interrupt, observe-only, GenerateOnce, rejected replies,
batches, errors, wire dtypes, and the example script."""

import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import REPO, png_diff, rel_diff
from stepstream import (
    InvalidRequestError,
    ModelNotFoundError,
    RemotePipeline,
    ReplyRejectedError,
    SDCFGCutoffCallback,
    StepstreamError,
    TensorArray,
)

TOL = 1e-5


@pytest.fixture
def pipe(target):
    with RemotePipeline(target, tensor_format="numpy") as p:
        yield p


def test_interrupt_matches_the_golden_case(pipe, case):
    c = case("ddim-10-interrupt")
    seen = []

    def stop_at_5(p, i, t, kw):
        seen.append(i)
        if i == 5:
            p._interrupt = True
        return kw

    out = pipe(**c.call_args(), callback_on_step_end=stop_at_5, return_latents=True)
    assert seen == c.json["executed_step_indices"]
    assert out.interrupted
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert png_diff(out.images[0], c) <= 1


def test_interrupt_property_is_settable_too(pipe, case):
    c = case("ddim-10-interrupt")

    def stop(p, i, t, kw):
        p.interrupt = i == 5
        return kw

    out = pipe(**c.call_args(), callback_on_step_end=stop, callback_on_step_end_steps=[5], return_latents=True)
    assert out.interrupted
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL


def test_observe_only_sees_every_step_and_never_blocks(pipe, case):
    c = case("ddim-10")
    seen = []

    def watch(p, i, t, kw):
        seen.append((i, np.array(kw["latents"])))
        if i == 0:
            time.sleep(0.3)  # a slow observer does not hold the server up
        return kw

    out = pipe(**c.call_args(), callback_on_step_end=watch, observe_only=True, return_latents=True)
    assert [i for i, _ in seen] == list(range(10))
    for k, (_, lat) in enumerate(seen):
        assert rel_diff(lat, c.callback_in(k, "latents")) <= TOL, f"step {k}"
    assert out.timings["callback_wait_ms"] < 100.0, out.timings
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert png_diff(out.images[0], c) <= 1


def test_observe_only_refuses_a_callback_that_changes_things(pipe, case):
    c = case("ddim-10")

    def meddle(p, i, t, kw):
        p._guidance_scale = 1.0
        return kw

    with pytest.raises(StepstreamError, match="observe-only"):
        pipe(**c.call_args(), callback_on_step_end=meddle, observe_only=True)


def test_no_callback_runs_generate_once(pipe, case):
    c = case("ddim-10")
    out = pipe(**c.call_args(), return_latents=True)
    assert png_diff(out.images[0], c) <= 1
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    arr = pipe(**c.call_args(), output_type="np").images
    assert arr.shape == (1, 64, 64, 3) and arr.dtype == np.float32
    assert float(np.abs(arr[0] * 255 - c.tensor("image_u8")[0]).max()) <= 1.0 + 1e-3
    lat = pipe(**c.call_args(), output_type="latent").images
    assert rel_diff(lat, c.tensor("final.latents")) <= TOL
    images, nsfw = pipe(**c.call_args(), return_dict=False)
    assert len(images) == 1 and nsfw is None


def test_a_wrong_shape_surfaces_the_rejection(pipe, case):
    c = case("ddim-10-cfg-cutoff")

    def bad(p, i, t, kw):
        if i == 2:
            kw["prompt_embeds"] = kw["prompt_embeds"][:, :76]
        return kw

    with pytest.raises(ReplyRejectedError) as e:
        pipe(**c.call_args(), callback_on_step_end=bad, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert e.value.step_index == 2
    assert e.value.field == "tensors[prompt_embeds]"
    assert "76" in e.value.reason and "77" in e.value.reason, e.value.reason


def test_guidance_off_without_the_conditional_half_is_rejected(pipe, case):
    c = case("ddim-10-cfg-cutoff")

    def half_done(p, i, t, kw):
        if i == 4:
            p._guidance_scale = 0.0
        return kw

    with pytest.raises(ReplyRejectedError) as e:
        pipe(**c.call_args(), callback_on_step_end=half_done, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert e.value.field == "guidance_scale"
    assert "conditional half" in e.value.reason


def test_a_rejected_reply_can_be_fixed_inside_the_callback(pipe, case):
    c = case("ddim-10-cfg-cutoff")
    rejections = []

    def fix_on_retry(p, i, t, kw):
        if i == 4:
            p._guidance_scale = 0.0
            if p.rejected is None:
                kw["prompt_embeds"] = kw["prompt_embeds"][:, :5]  # wrong
            else:
                rejections.append((p.rejected.field, p.rejected.step_index))
                kw["prompt_embeds"] = kw["prompt_embeds"].chunk(2)[-1]
        return kw

    out = pipe(
        **c.call_args(),
        callback_on_step_end=fix_on_retry,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        reply_retries=1,
        return_latents=True,
    )
    assert rejections == [("tensors[prompt_embeds]", 4)]
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert png_diff(out.images[0], c) <= 1


def test_cfg_cutoff_at_batch_two_keeps_the_conditional_half(pipe):
    out = pipe(
        "a photo of an astronaut riding a horse on mars",
        num_inference_steps=6,
        num_images_per_prompt=2,
        seed=3,
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5),
    )
    assert len(out.images) == 2

    def diffusers_style(p, i, t, kw):  # diffusers' SDCFGCutoffCallback: prompt_embeds[-1:]
        if i == 3:
            kw["prompt_embeds"] = kw["prompt_embeds"][-1:]
            p._guidance_scale = 0.0
        return kw

    with pytest.raises(ReplyRejectedError) as e:
        pipe(
            "a photo of an astronaut riding a horse on mars",
            num_inference_steps=6,
            num_images_per_prompt=2,
            seed=3,
            callback_on_step_end=diffusers_style,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )
    assert "batch 2" in e.value.reason


def test_changing_latents_in_place_is_sent_and_untouched_tensors_are_not(pipe, case, monkeypatch):
    c = case("ddim-10-latents-edit")
    sent = []
    from stepstream import pipeline as mod

    real = mod._Run._answer

    def spy(self, *a, **k):
        reply = real(self, *a, **k)
        sent.append(sorted(reply.tensors.keys()))
        return reply

    monkeypatch.setattr(mod._Run, "_answer", spy)

    def halve(p, i, t, kw):
        if i == 3:
            kw["latents"] *= 0.5  # in place, same object returned
        return kw

    out = pipe(
        **c.call_args(),
        callback_on_step_end=halve,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"],
        return_latents=True,
    )
    assert sent == [[], [], [], ["latents"], [], [], [], [], [], []]
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert png_diff(out.images[0], c) <= 1


def test_torch_mode_in_place_edits_bf16_and_pt_output(target, case):
    torch = pytest.importorskip("torch")
    c = case("ddim-10-latents-edit")
    pipe = RemotePipeline(target, tensor_format="torch")

    def halve(p, i, t, kw):
        assert isinstance(kw["latents"], torch.Tensor)
        if i == 3:
            kw["latents"].mul_(0.5)
        return kw

    out = pipe(**c.call_args(), callback_on_step_end=halve, return_latents=True, output_type="pt")
    assert isinstance(out.latents, torch.Tensor)
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert out.images.shape == (1, 3, 64, 64) and out.images.dtype == torch.float32
    want = torch.from_numpy(c.tensor("image_u8")[0].astype(np.float32) / 255).permute(2, 0, 1)
    assert float((out.images[0] - want).abs().max()) <= 1 / 255 + 1e-6

    dtypes = set()

    def bf16(p, i, t, kw):
        dtypes.add(kw["prompt_embeds"].dtype)
        return SDCFGCutoffCallback(cutoff_step_ratio=0.4)(p, i, t, kw)

    c = case("ddim-10-cfg-cutoff")
    out = pipe(**c.call_args(), callback_on_step_end=bf16, callback_on_step_end_tensor_inputs=["prompt_embeds"],
               wire_dtype="bf16", return_latents=True)
    assert dtypes == {torch.bfloat16}
    assert rel_diff(out.latents, c.tensor("final.latents")) < 5e-2


def test_numpy_mode_gives_arrays_with_torch_style_chunk(pipe, case):
    c = case("ddim-10")
    seen = {}

    def look(p, i, t, kw):
        seen.update(kw)
        return kw

    pipe(**c.call_args(), callback_on_step_end=look, callback_on_step_end_steps=[0],
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    pe = seen["prompt_embeds"]
    assert isinstance(pe, np.ndarray) and isinstance(pe, TensorArray)
    assert pe.dtype == np.float32 and pe.shape == (2, 77, 32)
    neg, pos = pe.chunk(2)
    assert neg.shape == pos.shape == (1, 77, 32)
    np.testing.assert_array_equal(neg, seen["negative_prompt_embeds"])
    assert seen["latents"].shape == (1, 4, 8, 8)


def test_f16_on_the_wire(pipe, case):
    c = case("ddim-10-cfg-cutoff")
    dtypes = set()

    def cb(p, i, t, kw):
        dtypes.add(kw["prompt_embeds"].dtype)
        return SDCFGCutoffCallback(cutoff_step_ratio=0.4)(p, i, t, kw)

    out = pipe(**c.call_args(), callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["prompt_embeds"],
               wire_dtype="f16", return_latents=True)
    assert dtypes == {np.dtype(np.float16)}
    # f16 prompt_embeds change the result a little; it stays near the f32 run.
    assert rel_diff(out.latents, c.tensor("final.latents")) < 1e-2


def test_status_errors_are_typed(target, case):
    c = case("ddim-10")
    with pytest.raises(ModelNotFoundError) as e:
        RemotePipeline(target, model="no-such-model")(**c.call_args())
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    pipe = RemotePipeline(target, tensor_format="numpy")
    with pytest.raises(InvalidRequestError) as e:
        pipe("x", width=65, num_inference_steps=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.field == "start.width"
    with pytest.raises(InvalidRequestError) as e:
        pipe("x", num_inference_steps=2, callback_on_step_end=lambda p, i, t, kw: kw,
             callback_on_step_end_tensor_inputs=["add_time_ids"])
    assert e.value.field == "start.callback.tensor_inputs"
    # Only the LoRA scale of cross_attention_kwargs has a remote meaning.
    with pytest.raises(TypeError, match="cross_attention_kwargs"):
        pipe("x", cross_attention_kwargs={"attention_mask": 1})
    with pytest.raises(TypeError, match="ip_adapter_image"):
        pipe("x", ip_adapter_image=object())


def test_list_models_and_seeds(pipe):
    models = pipe.list_models()
    assert models.default_model == "tiny-sd15"
    assert "prompt_embeds" in pipe.model_info.callback_tensor_inputs
    a = pipe("a cat", num_inference_steps=3, seed=11, output_type="np")
    b = pipe("a cat", num_inference_steps=3, generator=__import__("stepstream").Generator().manual_seed(11), output_type="np")
    assert a.seed == b.seed == 11
    np.testing.assert_array_equal(a.images, b.images)


def test_the_example_script_writes_an_image(target, tmp_path):
    script = REPO / "examples" / "dynamic_cfg.py"
    out = tmp_path / "out_custom_cfg.png"
    r = subprocess.run(
        [sys.executable, str(script), "--target", target, "--steps", "10", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_an_exception_in_the_callback_propagates_and_cancels(pipe, case):
    c = case("ddim-10")

    def boom(p, i, t, kw):
        if i == 2:
            raise RuntimeError("my callback gave up")
        return kw

    with pytest.raises(RuntimeError, match="gave up"):
        pipe(**c.call_args(), callback_on_step_end=boom)
    # The abandoned generation freed the server: the next call runs.
    out = pipe(**c.call_args())
    assert png_diff(out.images[0], c) <= 1
