"""diffusers' dynamic-CFG callback, verbatim, run against a stepstream server.

    pip install ./clients/python
    cargo run --release -- serve                  # in another terminal
    python examples/dynamic_cfg.py                # writes out_custom_cfg.png

`callback_dynamic_cfg` below is copied unchanged from diffusers' documentation ("Pipeline
callbacks"): at 40% of the steps it keeps the conditional half of prompt_embeds and turns
classifier-free guidance off. Here `pipe` is a `stepstream.RemotePipeline`: the denoising loop runs
on the server, and the callback runs in this process at the end of each step.
"""

import argparse

from stepstream import RemotePipeline

try:
    import torch

    Generator = torch.Generator
except ImportError:  # the callback then gets numpy arrays (with torch's .chunk)
    from stepstream import Generator


def callback_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
    # adjust the batch_size of prompt_embeds according to guidance_scale
    if step_index == int(pipe.num_timesteps * 0.4):
        prompt_embeds = callback_kwargs["prompt_embeds"]
        prompt_embeds = prompt_embeds.chunk(2)[-1]
        # update guidance_scale and prompt_embeds
        pipe._guidance_scale = 0.0
        callback_kwargs["prompt_embeds"] = prompt_embeds
    return callback_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="127.0.0.1:50051", help="the server's host:port")
    ap.add_argument("--model", default=None, help="a served model id (default: the server's)")
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out_custom_cfg.png")
    args = ap.parse_args()

    pipe = RemotePipeline(args.target, args.model)
    prompt = args.prompt
    generator = Generator(device="cpu").manual_seed(args.seed)

    out = pipe(prompt, generator=generator, callback_on_step_end=callback_dynamic_cfg,
               callback_on_step_end_tensor_inputs=["prompt_embeds"], num_inference_steps=args.steps)
    out.images[0].save(args.out)
    print(f"wrote {args.out} (seed {out.seed}, denoise {out.timings['denoise_ms']:.0f} ms)")


if __name__ == "__main__":
    main()
