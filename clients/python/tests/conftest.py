"""Fixtures: a stepstream server on 127.0.0.1 and the golden cases recorded with diffusers.

The server is `$STEPSTREAM_TARGET` when set (the Rust test `tests/python_client.rs` starts one and
sets it); otherwise `$STEPSTREAM_BIN` (default: the release build under target/) is started here.
Either way it serves both fixture models, the tiny SD 1.5 one (`tiny-sd15`, the default) and the
tiny SDXL one (`tiny-sdxl`); tests pick one with `RemotePipeline(target, model=...)`. The tiny
SD 1.5 model has the LoRA fixtures `a` (diffusers format) and `b` (kohya format), and the tiny
TAESD (`tiny-taesd`) as its preview decoder.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(os.environ.get("STEPSTREAM_FIXTURES", REPO / "tests" / "fixtures"))

SD15 = "tiny-sd15"
SDXL = "tiny-sdxl"
#: Both served models, for tests that run on each.
MODELS = (SD15, SDXL)


@pytest.fixture(scope="session")
def target():
    addr = os.environ.get("STEPSTREAM_TARGET")
    if addr:
        yield addr
        return
    binary = os.environ.get("STEPSTREAM_BIN", str(REPO / "target" / "release" / "stepstream"))
    if not Path(binary).is_file():
        pytest.fail(f"no server: set STEPSTREAM_TARGET, or build {binary} (cargo build --release)")
    proc = subprocess.Popen(
        [binary, "serve", "--addr", "127.0.0.1:0",
         "--model", str(FIXTURES / "models" / SD15), "--model", str(FIXTURES / "models" / SDXL),
         "--lora", f"a={FIXTURES / 'loras' / 'a.safetensors'}",
         "--lora", f"b={FIXTURES / 'loras' / 'b-kohya.safetensors'}",
         "--preview-decoder", str(FIXTURES / "models" / "tiny-taesd")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline().strip()
    prefix = "stepstream listening on "
    if not line.startswith(prefix):
        proc.kill()
        pytest.fail(f"the server's first line was {line!r}")
    try:
        yield line[len(prefix) :]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def load_safetensors(path: Path) -> dict:
    """A safetensors file as numpy arrays (the format: u64 header length, JSON header, bytes)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1"}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + b : base + e], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


class Case:
    """One recorded diffusers run of a fixture model (see shared/golden/README.md)."""

    def __init__(self, name: str, model: str = SD15):
        base = FIXTURES / "cases" / model / name
        self.name = name
        self.model = model
        self.json = json.loads(base.with_suffix(".json").read_text())
        self.tensors = load_safetensors(base.with_suffix(".safetensors"))

    def tensor(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def step(self, k: int) -> dict:
        return self.json["steps"][k]

    def callback_in(self, k: int, name: str) -> np.ndarray:
        return self.tensors[self.step(k)["callback_in"][name]]

    def call_args(self) -> dict:
        """The case's pipeline arguments, as a RemotePipeline call takes them."""
        j = self.json
        return dict(
            prompt=j["prompt"],
            negative_prompt=j["negative_prompt"],
            num_inference_steps=j["num_inference_steps"],
            guidance_scale=j["guidance_scale"],
            height=j["height"],
            width=j["width"],
            latents=self.tensor("init_latents"),
        )


@pytest.fixture(scope="session")
def case():
    cache = {}

    def get(name: str, model: str = SD15) -> Case:
        if (model, name) not in cache:
            cache[(model, name)] = Case(name, model)
        return cache[(model, name)]

    return get


def rel_diff(a, ref) -> float:
    """max |a - ref| / max(1, max |ref|): the golden README's measure for latents."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / max(1.0, np.abs(ref).max()))


def png_diff(image, case: Case) -> int:
    """Largest difference, in 1/255 steps, between a PIL image and the case's PNG."""
    got = np.asarray(image.convert("RGB"), dtype=np.int16)
    want = case.tensor("image_u8")[0].astype(np.int16)
    assert got.shape == want.shape, (got.shape, want.shape)
    return int(np.abs(got - want).max())
