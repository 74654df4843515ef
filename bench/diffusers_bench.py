"""diffusers' side of `stepstream bench --components --random-weights sd15`: the same SD 1.5
shapes with random weights, timed the same way (warm-up, then the median of synchronised runs).

    python bench/diffusers_bench.py --dtype f16 --size 512 --steps 30 --runs 10

Needs torch with CUDA and diffusers (0.42.1 was used); prints a Markdown table and a JSON line.
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="f16", choices=["f16", "f32", "bf16"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tokenizer", default="tests/fixtures/models/tiny-sd15/tokenizer")
    args = ap.parse_args()
    dtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dev = "cuda"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).to(dev, dtype).eval()
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512,
    ).to(dev, dtype).eval()
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
    )).to(dev, dtype).eval()
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    h = args.size // 8
    rows = {}
    with torch.inference_mode():
        sample = torch.randn(2, 4, h, h, device=dev, dtype=dtype)
        emb = torch.randn(2, 77, 768, device=dev, dtype=dtype)
        t = torch.tensor(500, device=dev)
        rows[f"UNet forward, batch 2, {args.size}x{args.size}"] = timed(
            lambda: unet(sample, t, encoder_hidden_states=emb), 3, args.runs)
        lat = torch.randn(1, 4, h, h, device=dev, dtype=dtype)
        rows[f"VAE decode, 1x4x{h}x{h}"] = timed(lambda: vae.decode(lat), 2, args.runs)
        ids = torch.zeros(1, 77, dtype=torch.long, device=dev)
        rows["text encoder, batch 1"] = timed(lambda: text(ids), 3, args.runs)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        torch.cuda.reset_peak_memory_stats()
        rows[f"whole generation, {args.steps} DDIM steps with CFG, decode + PNG"] = timed(
            lambda: pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=args.steps,
                         guidance_scale=7.5, height=args.size, width=args.size,
                         output_type="pil").images[0].save("/tmp/diffusers-bench.png"),
            1, max(2, -(-args.runs // 5)))
        peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"diffusers, SD 1.5 shapes, random weights, cuda {args.dtype}, {args.size}x{args.size}, medians:")
    print("| component | ms |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| peak GPU memory during the pipeline | {peak:.2f} GiB |")
    print(json.dumps({"diffusers_components": rows, "peak_gib": peak}))


if __name__ == "__main__":
    main()
