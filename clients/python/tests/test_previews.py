"""Step previews from Python: ``callback_on_preview`` gets every batch item's preview as a PIL
image at the steps ``preview_options`` chooses, from the linear map or the server's TAESD."""

import numpy as np
import pytest

from conftest import SDXL
from stepstream import RemotePipeline
from stepstream.errors import StatusError

# ComfyUI's SD15 latent→RGB factors (comfy/latent_formats.py), as the server documents them.
SD15_FACTORS = np.array([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
], dtype=np.float32)

ARGS = dict(prompt="an astronaut", num_inference_steps=3, height=64, width=64, seed=3, num_images_per_prompt=2)


def test_every_item_previews_the_latents_of_its_step(target):
    latents = {}
    previews = {}

    def end(pipe, i, t, kw):
        latents[i] = np.asarray(kw["latents"])
        return kw

    def on_preview(pipe, i, t, images):
        previews[i] = images

    RemotePipeline(target, tensor_format="numpy")(
        **ARGS, callback_on_step_end=end, callback_on_preview=on_preview,
        preview_options={"source": "latents"})
    assert sorted(previews) == [0, 1, 2]
    for i, images in previews.items():
        assert sorted(images) == [0, 1], "every item"
        for item, img in images.items():
            assert img.size == (8, 8), "one pixel per latent"
            unit = np.einsum("chw,ck->hwk", latents[i][item], SD15_FACTORS)
            want = np.clip((unit + 1) / 2, 0, 1) * 255
            assert np.abs(np.asarray(img, dtype=np.float32) - want).max() <= 1.0, f"step {i} item {item}"


def test_previews_alone_only_watch_and_choose_items_steps_and_format(target):
    seen = []
    out = RemotePipeline(target)(
        **ARGS, callback_on_preview=lambda pipe, i, t, images: seen.append((i, images)),
        preview_options={"items": [1], "every": 2, "format": "jpeg", "max_side": 4})
    assert [i for i, _ in seen] == [0, 2]
    for _, images in seen:
        assert list(images) == [1]
        assert images[1].format == "JPEG" and max(images[1].size) == 4
    assert len(out.images) == 2


def test_taesd_previews_come_at_the_vae_resolution(target):
    sizes = []
    RemotePipeline(target)(
        **ARGS, callback_on_preview=lambda pipe, i, t, images: sizes.extend(im.size for im in images.values()),
        preview_options={"decoder": "taesd"})
    assert sizes == [(64, 64)] * 6


def test_bad_preview_options_are_refused(target):
    with pytest.raises(ValueError, match="unknown preview_options: size"):
        RemotePipeline(target)(**ARGS, callback_on_preview=print, preview_options={"size": 3})
    with pytest.raises(ValueError, match="needs callback_on_preview"):
        RemotePipeline(target)(**ARGS, preview_options={})
    with pytest.raises(StatusError, match="no TAESD decoder"):
        RemotePipeline(target, model=SDXL)(
            **ARGS, callback_on_preview=print, preview_options={"decoder": "taesd"})
