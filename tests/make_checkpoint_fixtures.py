"""Makes the single-file checkpoint fixtures under tests/fixtures/checkpoints/ (not run by CI).

    python tests/make_checkpoint_fixtures.py --diffusers-scripts /path/to/diffusers/scripts

Needs torch, diffusers 0.42.1 and transformers. `--diffusers-scripts` is the `scripts/` folder of
a diffusers checkout: its `convert_diffusers_to_original_stable_diffusion.py` and
`convert_diffusers_to_original_sdxl.py` do the conversion, so the key layout is diffusers' own.

For each tiny model it writes `<model>.safetensors` in the original (LDM) layout:
- tiny-sd15 and tiny-sdxl: the golden fixture folders (tests/fixtures/models/), converted;
- tiny-sd2: a tiny SD 2.x pipeline made here (OpenCLIP-style GELU text encoder, linear attention
  projections, v-prediction DDIM, the tokenizer padding with `!`), seed 0; its configs and
  tokenizer (no weights) go to `checkpoints/tiny-sd2-config/` and diffusers' run of the folder to
  `cases/tiny-sd2/ddim-10.*`.

Then it checks, with diffusers' own loader, that `from_single_file(file, config=folder)` gives
every weight of the folder bit for bit and the same latents, and fails otherwise.

It also writes `checkpoints/real-shapes/{sd15,sd21,sdxl}.json`: for the real SD 1.5, SD 2.1 and
SDXL base architectures (built on torch's meta device: no weights), the diffusers config of each
component, every diffusers weight's shape, and every key and shape of the original-layout file the
same scripts make (SD 2.x with OpenCLIP's 24 layers, of which diffusers keeps 23), so the tests
can check config inference and the key mapping at real sizes.
"""
import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
FIX = HERE / "fixtures"
PROMPT = "a photo of an astronaut riding a horse on mars"


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [str(path)]
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def component(folder, name, file):
    return load_file(str(folder / name / file))


def text_component(folder, name):
    """A text encoder's weights with the `text_model.` prefix that published checkpoints carry.

    transformers 5 saves a `CLIPTextModel` flattened (`embeddings.*`, `encoder.*`); the conversion
    scripts pass keys through, and diffusers' single-file loader only recognises the prefixed form.
    """
    sd = component(folder, name, "model.safetensors")
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def to_sd1_or_sd2(folder, conv, sd2):
    unet = conv.convert_unet_state_dict(component(folder, "unet", "diffusion_pytorch_model.safetensors"))
    vae = conv.convert_vae_state_dict(component(folder, "vae", "diffusion_pytorch_model.safetensors"))
    text = text_component(folder, "text_encoder")
    out = {"model.diffusion_model." + k: v for k, v in unet.items()}
    out.update({"first_stage_model." + k: v for k, v in vae.items()})
    if sd2:
        # The script's own SD 2.x path (it detects SD 2.x by depth, which a tiny model lacks).
        text = conv.convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in text.items()})
        out.update({"cond_stage_model.model." + k: v for k, v in text.items()})
    else:
        text = conv.convert_text_enc_state_dict(text)
        out.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    return out


def to_sdxl(folder, conv):
    unet = conv.convert_unet_state_dict(component(folder, "unet", "diffusion_pytorch_model.safetensors"))
    vae = conv.convert_vae_state_dict(component(folder, "vae", "diffusion_pytorch_model.safetensors"))
    t1 = conv.convert_openai_text_enc_state_dict(text_component(folder, "text_encoder"))
    t2 = conv.convert_openclip_text_enc_state_dict(text_component(folder, "text_encoder_2"))
    out = {"model.diffusion_model." + k: v for k, v in unet.items()}
    out.update({"first_stage_model." + k: v for k, v in vae.items()})
    out.update({"conditioner.embedders.0.transformer." + k: v for k, v in t1.items()})
    t2 = {"conditioner.embedders.1.model." + k: v for k, v in t2.items()}
    # As the script's main does: OpenCLIP stores the projection as a [hidden, proj] matrix.
    t2["conditioner.embedders.1.model.text_projection"] = t2.pop(
        "conditioner.embedders.1.model.text_projection.weight"
    ).T.contiguous()
    out.update(t2)
    return out


def make_tiny_sd2(folder):
    """A tiny SD 2.x pipeline: tiny-sd15's shapes with SD 2.x's structural choices."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    base = FIX / "models" / "tiny-sd15"
    ucfg = json.loads((base / "unet" / "config.json").read_text())
    ucfg.update(use_linear_projection=True, attention_head_dim=[2, 4])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in ucfg.items() if not k.startswith("_")})
    vae = AutoencoderKL.from_config(json.loads((base / "vae" / "config.json").read_text()))
    tcfg = json.loads((base / "text_encoder" / "config.json").read_text())
    tcfg.update(hidden_act="gelu")
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in tcfg.items() if k not in ("architectures", "dtype", "transformers_version")}))
    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"), pad_token="!")
    scfg = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    scfg.update(prediction_type="v_prediction")
    scheduler = DDIMScheduler.from_config(scfg)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def state_dicts(pipe):
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    return {n: getattr(pipe, n).state_dict() for n in names if getattr(pipe, n, None) is not None}


def run(pipe, init, record):
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return kw

    out = pipe(
        PROMPT, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
        latents=init.clone(), output_type="latent" if not record else "pil",
        callback_on_step_end=on_step_end,
    )
    return steps, out


def check_and_record(kind, folder, ckpt, case_dir=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    ref = cls.from_pretrained(str(folder))
    single = cls.from_single_file(str(ckpt), config=str(folder))
    a, b = state_dicts(ref), state_dicts(single)
    for comp, sd in a.items():
        for k, v in sd.items():
            w = b[comp][k]
            assert torch.equal(v, w), f"{kind}: {comp}.{k} differs after from_single_file"
    g = torch.Generator().manual_seed(0)
    init = torch.randn((1, 4, 8, 8), generator=g)
    steps_a, out_a = run(ref, init, record=case_dir is not None)
    steps_b, _ = run(single, init, record=False)
    # The weights are bit-identical (above); torch's CPU GEMM may still round a few ulps apart
    # between the two copies (seen on SDXL's pooled projection), so the run is held to the golden
    # tolerance: 1e-5 relative to max(1, max|ref|).
    worst = max(((x - y).abs().max() / max(1.0, x.abs().max().item())).item() for x, y in zip(steps_a, steps_b))
    assert worst <= 1e-5, f"{kind}: latents differ between folder and single file by {worst}"
    print(f"{kind}: from_single_file weights == folder ({sum(len(s) for s in a.values())} tensors); "
          f"10 steps, worst relative latents difference {worst:.2e}")
    if case_dir is not None:
        case_dir.mkdir(parents=True, exist_ok=True)
        tensors = {"init_latents": init.contiguous()}
        for k, s in enumerate(steps_a):
            tensors[f"step{k}_latents"] = s.contiguous()
        save_file(tensors, str(case_dir / "ddim-10.safetensors"))
        out_a.images[0].save(case_dir / "ddim-10.png")
        ref.scheduler.set_timesteps(10)
        import diffusers

        (case_dir / "ddim-10.json").write_text(json.dumps({
            "made_by": "tests/make_checkpoint_fixtures.py",
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "model": "tiny-sd2 (tests/fixtures/checkpoints/tiny-sd2-config)",
            "prompt": PROMPT, "negative_prompt": None, "num_inference_steps": 10,
            "guidance_scale": 7.5, "width": 64, "height": 64, "scheduler": "ddim",
            "prediction_type": "v_prediction",
            "timesteps": [int(t) for t in ref.scheduler.timesteps],
            "tensors": "init_latents; stepK_latents = latents after step K (callback_on_step_end)",
        }, indent=1) + "\n")


# The reference repositories' configs (stable-diffusion-v1-5, stable-diffusion-2-1,
# stable-diffusion-xl-base-1.0), the fields that give their shapes and behaviour.
REAL = {
    "sd15": dict(
        unet=dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
    ),
    "sd21": dict(
        unet=dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
                  attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=96),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512),
    ),
    "sdxl": dict(
        unet=dict(block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                  transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, sample_size=128),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    hidden_act="gelu", projection_dim=1280),
    ),
}
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def real_shapes(sd, xl, out):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_model(cfg, layers=None, projection=False):
        c = dict(cfg, vocab_size=49408, max_position_embeddings=77)
        if layers:
            c["num_hidden_layers"] = layers
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        with torch.device("meta"):
            m = cls(CLIPTextConfig(**c))
        sd_ = m.state_dict()
        return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd_.items()}

    def shapes(d):
        return {k: list(v.shape) for k, v in sorted(d.items())}

    out.mkdir(parents=True, exist_ok=True)
    for name, real in REAL.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**real["unet"])
            vae = AutoencoderKL(**VAE)
        u, v = unet.state_dict(), vae.state_dict()
        t = text_model(real["text"])
        diffusers_shapes = {"unet": shapes(u), "vae": shapes(v), "text_encoder": shapes(t)}
        ldm = {"model.diffusion_model." + k: x for k, x in xl.convert_unet_state_dict(dict(u)).items()} if name == "sdxl" else \
              {"model.diffusion_model." + k: x for k, x in sd.convert_unet_state_dict(dict(u)).items()}
        conv = xl if name == "sdxl" else sd
        ldm.update({"first_stage_model." + k: x for k, x in conv.convert_vae_state_dict(dict(v)).items()})
        if name == "sd15":
            ldm.update({"cond_stage_model.transformer." + k: x for k, x in t.items()})
        elif name == "sd21":
            # The published file keeps OpenCLIP's 24th layer, which SD 2.x never runs.
            t24 = text_model(real["text"], layers=24)
            t24 = sd.convert_text_enc_state_dict_v20({"transformer." + k: x for k, x in t24.items()})
            ldm.update({"cond_stage_model.model." + k: x for k, x in t24.items()})
        else:
            ldm.update({"conditioner.embedders.0.transformer." + k: x for k, x in t.items()})
            t2 = text_model(real["text_2"], projection=True)
            diffusers_shapes["text_encoder_2"] = shapes(t2)
            t2 = {"conditioner.embedders.1.model." + k: x for k, x in xl.convert_openclip_text_enc_state_dict(t2).items()}
            t2["conditioner.embedders.1.model.text_projection"] = t2.pop(
                "conditioner.embedders.1.model.text_projection.weight").T.contiguous()
            ldm.update(t2)
        configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": real["text"]}
        if name == "sdxl":
            configs["text_encoder_2"] = real["text_2"]
        doc = {"made_by": "tests/make_checkpoint_fixtures.py", "configs": configs,
               "diffusers_shapes": diffusers_shapes, "checkpoint_shapes": shapes(ldm)}
        (out / f"{name}.json").write_text(json.dumps(doc, separators=(",", ":"), default=str) + "\n")
        print(f"{name}: {len(ldm)} checkpoint keys, {sum(len(x) for x in diffusers_shapes.values())} diffusers weights")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers-scripts", required=True, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sd = load_module(args.diffusers_scripts / "convert_diffusers_to_original_stable_diffusion.py", "conv_sd")
    xl = load_module(args.diffusers_scripts / "convert_diffusers_to_original_sdxl.py", "conv_sdxl")
    out = FIX / "checkpoints"
    out.mkdir(exist_ok=True)
    real_shapes(sd, xl, out / "real-shapes")

    sd15 = FIX / "models" / "tiny-sd15"
    save_file(to_sd1_or_sd2(sd15, sd, sd2=False), str(out / "tiny-sd15.safetensors"))
    check_and_record("sd15", sd15, out / "tiny-sd15.safetensors")

    sdxl = FIX / "models" / "tiny-sdxl"
    save_file(to_sdxl(sdxl, xl), str(out / "tiny-sdxl.safetensors"))
    check_and_record("sdxl", sdxl, out / "tiny-sdxl.safetensors")

    with tempfile.TemporaryDirectory() as tmp:
        sd2 = Path(tmp) / "tiny-sd2"
        make_tiny_sd2(sd2)
        save_file(to_sd1_or_sd2(sd2, sd, sd2=True), str(out / "tiny-sd2.safetensors"))
        check_and_record("sd2", sd2, out / "tiny-sd2.safetensors", FIX / "cases" / "tiny-sd2")
        cfg = out / "tiny-sd2-config"
        shutil.rmtree(cfg, ignore_errors=True)
        shutil.copytree(sd2, cfg, ignore=shutil.ignore_patterns("*.safetensors"))


if __name__ == "__main__":
    main()
