"""Exact replay from Python: a run steered at three phases returns its record
(``return_replay=True``); saved, loaded and replayed with no callback, it gives the same image
and the same latents, bit for bit."""

import numpy as np
import pytest

from stepstream import RemotePipeline, load_replay, save_replay
from stepstream.errors import InvalidRequestError

ARGS = dict(prompt="a photo of an astronaut riding a horse on mars", num_inference_steps=10,
            height=64, width=64, scheduler="ddim")


def begin(pipe, i, t, kw):
    if i == 2:
        kw["latents"] = kw["latents"] * 0.9
    return kw


def after_guidance(pipe, i, t, kw):
    if i == 4:
        kw["noise_pred"] = kw["noise_pred"] * 0.8
    return kw


def end(pipe, i, t, kw):
    if i == 5:
        pipe._guidance_scale = 5.0
    if i == 6:  # a CFG cutoff: the conditional half of the embeddings, guidance 0
        kw["prompt_embeds"] = kw["prompt_embeds"][kw["prompt_embeds"].shape[0] // 2:]
        pipe._guidance_scale = 0.0
    return kw


def test_a_steered_run_replays_to_the_same_image_and_latents(target, tmp_path):
    pipe = RemotePipeline(target, tensor_format="numpy")
    out = pipe(**ARGS, callback_on_step_begin=begin, callback_after_guidance=after_guidance,
               callback_on_step_end=end, callback_on_step_end_tensor_inputs=["prompt_embeds"],
               return_latents=True, return_replay=True)
    record = out.replay
    assert [(e.step_index, e.phase) for e in record.edits] == [(2, 2), (4, 3), (5, 1), (6, 1)]
    assert record.request.seed == out.seed
    path = tmp_path / "run.replay"
    save_replay(record, path)
    again = pipe.replay(load_replay(path), return_latents=True)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(out.images[0]))
    assert np.array_equal(np.asarray(again.latents), np.asarray(out.latents))
    assert again.seed == out.seed
    # From the bytes or the path, too.
    assert np.array_equal(np.asarray(pipe.replay(str(path), output_type="latent").images), np.asarray(out.latents))


def test_a_record_that_no_longer_fits_is_refused(target):
    pipe = RemotePipeline(target, tensor_format="numpy")
    record = pipe(**ARGS, callback_on_step_begin=begin, return_replay=True).replay
    record.request.width = 128
    with pytest.raises(InvalidRequestError, match="replay.edits"):
        pipe.replay(record)
    with pytest.raises(TypeError, match="a replay record"):
        pipe.replay(3)
