"""Server-side guidance from Python: ``guidance_schedule=`` gives what diffusers gives with a
callback setting ``pipe._guidance_scale`` at every step (recording: tests/make_guidance_fixtures.py)."""

import json

import numpy as np

from conftest import FIXTURES, load_safetensors, rel_diff
from stepstream import RemotePipeline


def test_a_guidance_schedule_matches_diffusers_callback(target):
    base = FIXTURES / "cases" / "tiny-sd15-guidance" / "schedule"
    meta = json.loads(base.with_suffix(".json").read_text())
    rec = load_safetensors(base.with_suffix(".safetensors"))
    seen = []

    def watch(pipe, i, t, kw):
        seen.append(np.asarray(kw["latents"]))
        return kw

    RemotePipeline(target)(
        meta["prompt"], num_inference_steps=10, height=64, width=64, scheduler="ddim",
        latents=rec["init_latents"], output_type="latent", guidance_schedule=meta["schedule"],
        callback_on_step_end=watch, observe_only=True,
    )
    assert len(seen) == 10
    for k, got in enumerate(seen):
        assert rel_diff(got, rec[f"step{k}_latents"]) <= 1e-5, k
