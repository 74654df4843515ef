"""Records diffusers' x0 (`pred_original_sample`) at every step of every scheduler, and a run
whose guided noise prediction is edited before one scheduler step, on the tiny fixtures, for
the AFTER_GUIDANCE phase (tests/phases.rs). Not run by CI.

    python tests/make_phase_fixtures.py

x0 per scheduler is what the scheduler itself computes at that step:
`step(...).pred_original_sample` (DDIM, DDPM, Euler, Euler ancestral), LCM's `denoised`, the
output of `convert_model_output` (DPM-Solver++, UniPC: their x0 prediction), and, for PNDM,
which computes none, `(sample - sqrt(1 - alphabar_t) * eps) / sqrt(alphabar_t)` at the step's
timestep. Each step also records the scheduler's inputs, so the x0 can be checked teacher-forced.

Writes `tests/fixtures/cases/phases/{x0-<model>-<scheduler>,noise-pred-edit}.{json,safetensors}`
(and the edit's `.png`).
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIX = HERE / "fixtures"
OUT = FIX / "cases" / "phases"
PROMPT = "a photo of an astronaut riding a horse on mars"

# (our name, diffusers class, overrides, steps), as the golden cases name them.
SD15 = [
    ("ddim", "DDIMScheduler", {}, 10),
    ("ddpm", "DDPMScheduler", {}, 10),
    ("euler", "EulerDiscreteScheduler", {}, 10),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}, 10),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, 10),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, 10),
    ("pndm", "PNDMScheduler", {"skip_prk_steps": True}, 10),
    ("lcm", "LCMScheduler", {}, 4),
    ("unipc", "UniPCMultistepScheduler", {}, 10),
]
SDXL = [("euler", "EulerDiscreteScheduler", {}, 10)]
# The noise-prediction edit: at this step the guided noise_pred is scaled before scheduler.step.
EDIT_STEP, EDIT_FACTOR = 3, 0.5


def pipeline(model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if model == "tiny-sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(str(FIX / "models" / model))


def init_latents():
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))


def run(pipe, steps, negative, on_step=None):
    return pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
                height=64, width=64, latents=init_latents(), generator=torch.Generator().manual_seed(1),
                output_type="pil", callback_on_step_end=on_step)


def record_x0(model, name, cls_name, overrides, steps):
    import diffusers

    pipe = pipeline(model)
    cls = getattr(diffusers, cls_name)
    sched = cls.from_config(pipe.scheduler.config, **overrides)
    pipe.scheduler = sched
    rows = []
    converted = []
    if hasattr(sched, "convert_model_output"):
        inner = sched.convert_model_output

        def convert(*a, **k):
            out = inner(*a, **k)
            converted.append(out.clone())
            return out

        sched.convert_model_output = convert
    step = sched.step

    def hooked(model_output, timestep, sample, *a, **k):
        i = len(rows)
        n_conv = len(converted)
        wants_dict = k.pop("return_dict", True)
        out = step(model_output, timestep, sample, *a, return_dict=True, **k)
        if cls_name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
            x0 = converted[n_conv]
        elif cls_name == "LCMScheduler":
            x0 = out.denoised
        elif cls_name == "PNDMScheduler":
            a_t = sched.alphas_cumprod[int(timestep)]
            x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t ** 0.5
        else:
            x0 = out.pred_original_sample
        rows.append(dict(model_output=model_output.clone(), sample=sample.clone(), x0=x0.clone(),
                         timestep=float(timestep)))
        return out if wants_dict else out.to_tuple()

    sched.step = hooked
    negative = "" if model == "tiny-sd15" else None
    with torch.no_grad():
        run(pipe, steps, negative)
    tensors = {}
    for k, r in enumerate(rows):
        for what in ("model_output", "sample", "x0"):
            tensors[f"step{k}_{what}"] = r[what].contiguous()
    base = OUT / f"x0-{model}-{name}"
    save_file(tensors, str(base) + ".safetensors")
    base.with_suffix(".json").write_text(json.dumps(dict(
        made_by="tests/make_phase_fixtures.py", diffusers=diffusers.__version__, model=model,
        scheduler=name, diffusers_class=cls_name, overrides=overrides, num_inference_steps=steps,
        timesteps=[r["timestep"] for r in rows],
        tensors="stepK_model_output (guided noise prediction), stepK_sample (scheduler input), "
                "stepK_x0 (the scheduler's x0 at step K; see the script's docstring)",
    ), indent=1) + "\n")
    print(base.name, len(rows), "steps")


def record_edit():
    import diffusers

    pipe = pipeline("tiny-sd15")
    sched = pipe.scheduler
    step = sched.step
    count = [0]
    latents = []

    def hooked(model_output, timestep, sample, *a, **k):
        if count[0] == EDIT_STEP:
            model_output = model_output * EDIT_FACTOR
        count[0] += 1
        return step(model_output, timestep, sample, *a, **k)

    sched.step = hooked

    def on_step(p, i, t, kw):
        latents.append(kw["latents"].clone())
        return kw

    with torch.no_grad():
        out = run(pipe, 10, "", on_step)
    tensors = {f"step{k}_latents": l.contiguous() for k, l in enumerate(latents)}
    base = OUT / "noise-pred-edit"
    save_file(tensors, str(base) + ".safetensors")
    out.images[0].save(str(base) + ".png")
    base.with_suffix(".json").write_text(json.dumps(dict(
        made_by="tests/make_phase_fixtures.py", diffusers=diffusers.__version__, model="tiny-sd15",
        scheduler="ddim", num_inference_steps=10, edit_step=EDIT_STEP, edit_factor=EDIT_FACTOR,
        how="scheduler.step is wrapped so that at step edit_step its model_output (the guided noise "
            "prediction) is multiplied by edit_factor",
        tensors="stepK_latents = latents after step K",
    ), indent=1) + "\n")
    print(base.name)


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for spec in SD15:
        record_x0("tiny-sd15", *spec)
    for spec in SDXL:
        record_x0("tiny-sdxl", *spec)
    record_edit()


if __name__ == "__main__":
    main()
