"""Records diffusers with a per-step guidance schedule on the tiny SD 1.5 fixture, for the
server-side `guidance_plan.schedule` (tests/guidance_plan.rs). Not run by CI.

    python tests/make_guidance_fixtures.py

The reference is what diffusers users write today: a callback that sets `pipe._guidance_scale` at
the end of every step for the next one (the call's `guidance_scale` is the schedule's first
value). Writes `tests/fixtures/cases/tiny-sd15-guidance/schedule.{json,safetensors,png}`.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIX = HERE / "fixtures"
PROMPT = "a photo of an astronaut riding a horse on mars"
# Falling guidance, every value > 1 so diffusers keeps CFG (a value <= 1 would make it drop the
# unconditional batch half and fail on the still-doubled embeddings).
SCHEDULE = [9.0, 8.0, 7.0, 6.5, 6.0, 5.0, 4.0, 3.0, 2.0, 1.5]


def main():
    import diffusers
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(FIX / "models" / "tiny-sd15"))
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        if i + 1 < len(SCHEDULE):
            p._guidance_scale = SCHEDULE[i + 1]
        return kw

    out = pipe(PROMPT, num_inference_steps=10, guidance_scale=SCHEDULE[0], height=64, width=64,
               latents=init.clone(), callback_on_step_end=on_step_end)
    d = FIX / "cases" / "tiny-sd15-guidance"
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"init_latents": init.contiguous()}
    tensors.update({f"step{k}_latents": s.contiguous() for k, s in enumerate(steps)})
    save_file(tensors, str(d / "schedule.safetensors"))
    out.images[0].save(d / "schedule.png")
    (d / "schedule.json").write_text(json.dumps(dict(
        made_by="tests/make_guidance_fixtures.py", diffusers=diffusers.__version__, model="tiny-sd15",
        prompt=PROMPT, negative_prompt=None, num_inference_steps=10, scheduler="ddim", width=64, height=64,
        schedule=SCHEDULE,
        how="guidance_scale=schedule[0]; a callback sets pipe._guidance_scale = schedule[i + 1] at the end of step i",
        tensors="init_latents; stepK_latents = latents after step K (callback_on_step_end)",
    ), indent=1) + "\n")
    print("recorded", len(steps), "steps")


if __name__ == "__main__":
    main()
