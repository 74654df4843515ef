"""Makes the LoRA fixtures under tests/fixtures/loras/ and their diffusers recordings under
tests/fixtures/cases/tiny-sd15-lora/ (not run by CI).

    python tests/make_lora_fixtures.py --diffusers-scripts /path/to/diffusers/scripts

Needs torch, diffusers 0.42.1, transformers and peft. Two random LoRAs for the tiny SD 1.5
fixture, made with PEFT on its UNet (attention, feed-forward, and the 1x1-convolution
`proj_in`/`proj_out`) and text encoder (attention and MLP), with lora_alpha != r so that alpha
matters:

- `a.safetensors`: diffusers' own format (`save_lora_weights`, PEFT keys, alpha in the metadata);
- `a-kohya.safetensors`: the same LoRA in the kohya / A1111 format (diffusers'
  `convert_state_dict_to_kohya`, with A1111's SD 1.x `lora_te_text_model_` prefix and the alphas);
- `b-kohya.safetensors`: a second LoRA, kohya format.

Recordings (diffusers loading the files with `load_lora_weights`): `a-mid-run` (scale 0.8, set to
0.3 by a callback calling `set_adapters` at the end of step 3) and `ab` (a at 0.8 with b at 0.5).
The script checks that the kohya copy of `a` gives the diffusers copy's numbers.

For the tiny SDXL fixture: `xl-kohya.safetensors`, a LoRA on its UNet and both text encoders in
the kohya format SDXL trainers write, with the UNet modules in the original layout's names
(`lora_unet_input_blocks_4_1_...`, mapped by diffusers' `convert_diffusers_to_original_sdxl.py`,
whose folder `--diffusers-scripts` names), recorded as `cases/tiny-sdxl-lora/xl-mid-run`
(scale 0.7, set to 0.2 at the end of step 4).
"""
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
FIX = HERE / "fixtures"
MODEL = FIX / "models" / "tiny-sd15"
XL_MODEL = FIX / "models" / "tiny-sdxl"
PROMPT = "a photo of an astronaut riding a horse on mars"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make_lora(name, seed):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL))
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False)
    text_cfg = LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(unet_cfg, adapter_name=name)
    from peft import inject_adapter_in_model

    # transformers 5.24 asks for a PEFT newer than any published; PEFT injects the layers itself.
    inject_adapter_in_model(text_cfg, pipe.text_encoder, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for n, p in module.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    unet_sd = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    text_sd = get_peft_model_state_dict(pipe.text_encoder, adapter_name=name)
    return pipe, unet_sd, text_sd, unet_cfg, text_cfg


def save_diffusers(path, unet_sd, text_sd, unet_cfg, text_cfg):
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd,
            unet_lora_adapter_metadata=unet_cfg.to_dict(),
            text_encoder_lora_adapter_metadata=text_cfg.to_dict(),
            weight_name="lora.safetensors",
        )
        Path(tmp, "lora.safetensors").replace(path)


def save_kohya(path, unet_sd, text_sd, unet_cfg, text_cfg):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    # transformers 5 names a bare CLIPTextModel's modules without `text_model.`; published kohya
    # files carry it (`lora_te_text_model_encoder_layers_0_...`).
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_sd.items()}
    sd = {"unet." + k: v for k, v in unet_sd.items()}
    sd.update({"text_encoder." + k: v for k, v in text_sd.items()})
    kohya = convert_state_dict_to_kohya(sd)
    out = {}
    for k, v in kohya.items():
        k = k.replace("lora_te1_", "lora_te_")  # A1111's SD 1.x prefix
        if k.endswith(".alpha"):
            # The converter writes alpha = rank; keep the LoRA's own alpha.
            alpha = text_cfg.lora_alpha if k.startswith("lora_te_") else unet_cfg.lora_alpha
            v = torch.tensor(float(alpha))
        out[k] = v.contiguous()
    save_file(out, str(path))


def run(pipe, init, change_at=None):
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        if change_at is not None and i == change_at[0]:
            p.set_adapters(*change_at[1])
        return kw

    out = pipe(PROMPT, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
               latents=init.clone(), callback_on_step_end=on_step_end)
    return steps, out.images[0]


def reference(files):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL))
    for name, path in files:
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


def record(case, init, steps, image, about):
    d = FIX / "cases" / "tiny-sd15-lora"
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"init_latents": init.contiguous()}
    tensors.update({f"step{k}_latents": s.contiguous() for k, s in enumerate(steps)})
    save_file(tensors, str(d / f"{case}.safetensors"))
    image.save(d / f"{case}.png")
    import diffusers

    (d / f"{case}.json").write_text(json.dumps(dict(
        about, made_by="tests/make_lora_fixtures.py", diffusers=diffusers.__version__,
        model="tiny-sd15", prompt=PROMPT, negative_prompt=None, num_inference_steps=10,
        guidance_scale=7.5, width=64, height=64, scheduler="ddim",
        tensors="init_latents; stepK_latents = latents after step K (callback_on_step_end)",
    ), indent=1) + "\n")


def make_xl_lora(scripts):
    """The SDXL LoRA, kohya format with original-layout UNet names."""
    import importlib.util
    import sys

    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    spec = importlib.util.spec_from_file_location("conv_sdxl", scripts / "convert_diffusers_to_original_sdxl.py")
    conv = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, ["x"]
    spec.loader.exec_module(conv)
    sys.argv = argv

    pipe = StableDiffusionXLPipeline.from_pretrained(str(XL_MODEL))
    unet_cfg = LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False)
    text_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(unet_cfg, adapter_name="x")
    inject_adapter_in_model(text_cfg, pipe.text_encoder, adapter_name="x")
    inject_adapter_in_model(text_cfg, pipe.text_encoder_2, adapter_name="x")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for n, p in module.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = {}
    unet_sd = get_peft_model_state_dict(pipe.unet, adapter_name="x")
    # diffusers' own diffusers->original mapping, applied to the adapted modules' weight names.
    fresh = StableDiffusionXLPipeline.from_pretrained(str(XL_MODEL)).unet.state_dict()
    ldm = conv.convert_unet_state_dict({k: k for k in fresh})
    to_ldm = {m[: -len(".weight")]: k[: -len(".weight")] for k, m in ldm.items() if m.endswith(".weight")}
    for k, v in unet_sd.items():
        module, part = k.rsplit(".lora_", 1)
        kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
        base = "lora_unet_" + to_ldm[module].replace(".", "_")
        out[f"{base}.{kind}"] = v.contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(unet_cfg.lora_alpha))
    for prefix, enc in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for k, v in get_peft_model_state_dict(enc, adapter_name="x").items():
            module, part = k.rsplit(".lora_", 1)
            if not module.startswith("text_model."):
                module = "text_model." + module
            kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
            base = prefix + module.replace(".", "_")
            out[f"{base}.{kind}"] = v.contiguous()
            out[f"{base}.alpha"] = torch.tensor(float(text_cfg.lora_alpha))
    return out


def record_xl(path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(XL_MODEL))
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        if i == 4:
            p.set_adapters(["x"], [0.2])
        return kw

    out = pipe(PROMPT, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
               latents=init.clone(), callback_on_step_end=on_step_end)
    base = StableDiffusionXLPipeline.from_pretrained(str(XL_MODEL))
    plain = []
    base(PROMPT, num_inference_steps=10, guidance_scale=7.5, height=64, width=64, latents=init.clone(),
         callback_on_step_end=lambda p, i, t, kw: (plain.append(kw["latents"].clone()), kw)[1])
    moved = max((x - y).abs().max().item() for x, y in zip(steps, plain))
    assert moved > 1e-2, f"the SDXL LoRA barely changes the latents ({moved})"
    text = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj
    assert hasattr(text, "lora_A"), "diffusers did not load the text_encoder_2 part"
    print(f"xl: moves the latents by up to {moved:.3f}")
    d = FIX / "cases" / "tiny-sdxl-lora"
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"init_latents": init.contiguous()}
    tensors.update({f"step{k}_latents": s.contiguous() for k, s in enumerate(steps)})
    save_file(tensors, str(d / "xl-mid-run.safetensors"))
    out.images[0].save(d / "xl-mid-run.png")
    import diffusers

    (d / "xl-mid-run.json").write_text(json.dumps(dict(
        made_by="tests/make_lora_fixtures.py", diffusers=diffusers.__version__, model="tiny-sdxl",
        prompt=PROMPT, negative_prompt=None, num_inference_steps=10, guidance_scale=7.5,
        width=64, height=64, scheduler="euler", loras={"x": 0.7}, change={"after_step": 4, "loras": {"x": 0.2}},
        how="load_lora_weights(xl-kohya.safetensors); set_adapters(['x'], [0.7]); a callback calls "
            "set_adapters(['x'], [0.2]) at the end of step 4",
        tensors="init_latents; stepK_latents = latents after step K (callback_on_step_end)",
    ), indent=1) + "\n")


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers-scripts", required=True, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = FIX / "loras"
    out.mkdir(exist_ok=True)
    _, ua, ta, uc, tc = make_lora("a", 1)
    save_diffusers(out / "a.safetensors", ua, ta, uc, tc)
    save_kohya(out / "a-kohya.safetensors", ua, ta, uc, tc)
    _, ub, tb, ucb, tcb = make_lora("b", 2)
    save_kohya(out / "b-kohya.safetensors", ub, tb, ucb, tcb)

    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    pipe = reference([("a", out / "a.safetensors")])
    pipe.set_adapters(["a"], [0.8])
    steps, image = run(pipe, init, change_at=(3, (["a"], [0.3])))
    kohya = reference([("a", out / "a-kohya.safetensors")])
    kohya.set_adapters(["a"], [0.8])
    steps_k, _ = run(kohya, init, change_at=(3, (["a"], [0.3])))
    worst = max(((x - y).abs().max() / max(1.0, x.abs().max().item())).item() for x, y in zip(steps, steps_k))
    assert worst <= 1e-5, f"kohya copy of a differs by {worst}"
    base = reference([])
    steps_0, _ = run(base, init)
    moved = max((x - y).abs().max().item() for x, y in zip(steps, steps_0))
    assert moved > 1e-2, f"the LoRA barely changes the latents ({moved})"
    print(f"a: kohya == diffusers format within {worst:.2e}; moves the latents by up to {moved:.3f}")
    record("a-mid-run", init, steps, image, dict(
        loras={"a": 0.8}, change={"after_step": 3, "loras": {"a": 0.3}},
        how="load_lora_weights(a.safetensors); set_adapters(['a'], [0.8]); a callback calls "
            "set_adapters(['a'], [0.3]) at the end of step 3"))

    pipe = reference([("a", out / "a.safetensors"), ("b", out / "b-kohya.safetensors")])
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    steps, image = run(pipe, init)
    record("ab", init, steps, image, dict(
        loras={"a": 0.8, "b": 0.5},
        how="load_lora_weights of a.safetensors and b-kohya.safetensors; set_adapters(['a', 'b'], [0.8, 0.5])"))
    xl = out / "xl-kohya.safetensors"
    save_file(make_xl_lora(args.diffusers_scripts), str(xl))
    record_xl(xl)
    for f in sorted(out.iterdir()):
        print(f.name, f.stat().st_size, "bytes,", len(load_file(str(f))), "tensors")


if __name__ == "__main__":
    main()
