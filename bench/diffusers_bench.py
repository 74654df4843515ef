"""diffusers' side of `stepstream bench --random-weights sd15`: the same SD 1.5 shapes with random
weights, timed the same way (warm-up, then the median of synchronised runs).

    python bench/diffusers_bench.py --dtype f16 --size 512 --steps 30 --runs 10            # GPU
    python bench/diffusers_bench.py --device cpu --dtype f32 --size 256 --steps 10 --runs 3

Needs torch and diffusers (0.42.1 was used); prints a Markdown table and a JSON line
(`bench/compare.py` puts it beside ours). `--compile` also times the UNet under torch.compile.
"""
import argparse
import json
import resource
import statistics
import time

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="f16", choices=["f16", "f32", "bf16"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--compile", action="store_true", help="also time the UNet under torch.compile")
    ap.add_argument("--tokenizer", default="tests/fixtures/models/tiny-sd15/tokenizer")
    args = ap.parse_args()
    dtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dev = args.device
    cuda = dev == "cuda"
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
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows[f"UNet forward, batch 2, {args.size}x{args.size}"] = timed(
            lambda: unet(sample, t, encoder_hidden_states=emb), 3, args.runs)
        unet_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
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
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows[f"whole generation, {args.steps} DDIM steps with CFG, decode + PNG"] = timed(
            lambda: pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=args.steps,
                         guidance_scale=7.5, height=args.size, width=args.size,
                         output_type="pil").images[0].save("/tmp/diffusers-bench.png"),
            1, max(2, -(-args.runs // 5)))
        if cuda:
            peak, peak_source = torch.cuda.max_memory_allocated() / 2**30, "torch max_memory_allocated"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            peak_source = "process peak RSS"
        if args.compile:
            compiled = torch.compile(unet)
            rows[f"UNet forward, batch 2, {args.size}x{args.size}, torch.compile"] = timed(
                lambda: compiled(sample, t, encoder_hidden_states=emb), 3, args.runs)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, SD 1.5 shapes, random weights, "
          f"{name} {args.dtype}, {args.size}x{args.size}, medians:")
    print("| component | ms |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| peak memory during the pipeline ({peak_source}) | {peak:.2f} GiB |")
    if unet_peak is not None:
        print(f"| peak GPU memory, UNet forward batch 2 | {unet_peak:.2f} GiB |")
    print(json.dumps({"diffusers_components": rows, "peak_gib": peak, "peak_source": peak_source,
                      "unet_peak_gib": unet_peak, "device": name, "dtype": args.dtype,
                      "size": args.size, "steps": args.steps}))


if __name__ == "__main__":
    main()
