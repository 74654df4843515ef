"""LoRAs from Python with diffusers' own calls: ``set_adapters`` before the call, and in a
callback to change the weight mid-run (diffusers#11599), give diffusers' numbers (recordings of
diffusers with ``load_lora_weights`` on the tiny SD 1.5 model, tests/make_lora_fixtures.py)."""

import json

import numpy as np
import pytest

from conftest import FIXTURES, load_safetensors, rel_diff
from stepstream import RemotePipeline

LATENTS_TOL = 1e-5


class Recording:
    def __init__(self, name):
        base = FIXTURES / "cases" / "tiny-sd15-lora" / name
        self.json = json.loads(base.with_suffix(".json").read_text())
        self.tensors = load_safetensors(base.with_suffix(".safetensors"))
        self.steps = [self.tensors[f"step{k}_latents"] for k in range(10)]


def run(pipe, rec, callback, **kwargs):
    seen = []

    def on_step_end(p, i, t, kw):
        seen.append(np.asarray(kw["latents"]))
        return callback(p, i, t, kw) if callback else kw

    pipe(rec.json["prompt"], num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
         latents=rec.tensors["init_latents"], scheduler="ddim", output_type="latent",
         callback_on_step_end=on_step_end, **kwargs)
    return seen


def assert_close(seen, rec):
    assert len(seen) == len(rec.steps)
    for k, (a, b) in enumerate(zip(seen, rec.steps)):
        assert rel_diff(a, b) <= LATENTS_TOL, f"step {k}: {rel_diff(a, b):.2e}"


def test_set_adapters_in_a_callback_changes_the_weight_from_the_next_step(target):
    rec = Recording("a-mid-run")
    pipe = RemotePipeline(target)
    pipe.set_adapters(["a"], [0.8])
    assert pipe.get_active_adapters() == ["a"]

    # The callback diffusers users write (diffusers#11599), unchanged.
    def lower(pipe, step_index, timestep, callback_kwargs):
        if step_index == 3:
            pipe.set_adapters(["a"], [0.3])
        return callback_kwargs

    assert_close(run(pipe, rec, lower), rec)


def test_a_weight_schedule_runs_on_the_server(target):
    rec = Recording("a-mid-run")
    pipe = RemotePipeline(target)
    pipe.set_adapters("a", 0.8)
    assert_close(run(pipe, rec, None, lora_schedules={"a": [0.8] * 4 + [0.3] * 6}), rec)


def test_two_adapters_and_their_listing(target):
    rec = Recording("ab")
    pipe = RemotePipeline(target)
    assert pipe.get_list_adapters() == {"text_encoder": ["a", "b"], "unet": ["a", "b"]}
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    assert_close(run(pipe, rec, None), rec)
    # cross_attention_kwargs["scale"] scales every adapter, as in diffusers: 0 is no LoRA.
    plain = run(pipe, rec, None, cross_attention_kwargs={"scale": 0.0})
    pipe.disable_lora()
    assert pipe.get_active_adapters() == []
    off = run(pipe, rec, None)
    assert all(np.array_equal(a, b) for a, b in zip(plain, off))


def test_what_cannot_be_done_remotely_says_so(target):
    pipe = RemotePipeline(target)
    with pytest.raises(NotImplementedError, match="--lora"):
        pipe.load_lora_weights("some/lora")
    with pytest.raises(ValueError, match="serves no LoRA `nope`"):
        pipe.set_adapters("nope")
    pipe.set_adapters("a", 0.8)

    def join_b(pipe, step_index, timestep, callback_kwargs):
        pipe.set_adapters(["b"], [1.0])
        return callback_kwargs

    with pytest.raises(ValueError, match="not applied by this call"):
        run(pipe, Recording("ab"), join_b)
