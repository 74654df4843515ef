"""Makes the tiny TAESD fixture (a diffusers `AutoencoderTiny` with 8-channel levels and random
weights) and records diffusers' own decode of a few latents with it, for the TAESD previews
(tests/previews.rs). Not run by CI.

    python tests/make_preview_fixtures.py

Writes `tests/fixtures/models/tiny-taesd/` (config.json, diffusion_pytorch_model.safetensors)
and `tests/fixtures/cases/previews/taesd-decode.safetensors`: `latents` [2, 4, 8, 8] as the
denoising loop holds them, and `image`, what a pipeline with this VAE returns for them:
`vae.decode(latents / scaling_factor)` mapped by the image processor to [0, 1].
"""
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIX = HERE / "fixtures"

torch.manual_seed(0)
vae = AutoencoderTiny(
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(3, 3, 3, 1),
)
# Default init leaves most pixels at one clamp or the other; smaller, centred weights keep the
# decode inside (0, 1) so the comparison sees every value.
with torch.no_grad():
    for name, p in vae.named_parameters():
        if name.endswith("bias"):
            p.uniform_(-0.05, 0.05)
        else:
            p.normal_(0.0, 0.12)
    last = vae.decoder.layers[-1]
    last.bias.fill_(0.5)
vae.eval()
vae.save_pretrained(FIX / "models" / "tiny-taesd")

g = torch.Generator().manual_seed(1)
latents = torch.randn(2, 4, 8, 8, generator=g) * 2.0
with torch.no_grad():
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
image = VaeImageProcessor().postprocess(decoded, output_type="pt")
inside = ((image > 0) & (image < 1)).float().mean().item()
print(f"image {tuple(image.shape)}, {inside:.0%} of values inside (0, 1)")
out = FIX / "cases" / "previews"
out.mkdir(parents=True, exist_ok=True)
save_file({"latents": latents.contiguous(), "image": image.contiguous()},
          out / "taesd-decode.safetensors")
