//! Shared helpers for the golden-data tests: read a recorded diffusers case and compare tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// The project's test fixtures folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A diffusers model folder shipped in the fixtures (e.g. `tiny-sd15`).
pub fn model_dir(model: &str) -> PathBuf {
    fixtures().join("models").join(model)
}

/// Copies a folder tree (for tests that lay out or modify a model folder).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// One recorded diffusers run: its JSON description and all its tensors.
pub struct Case {
    /// The case's JSON (see the golden README, "How to read a case").
    pub json: Value,
    tensors: HashMap<String, Tensor>,
}

impl Case {
    /// Loads `tests/fixtures/cases/<model>/<name>.{json,safetensors}`.
    pub fn load(model: &str, name: &str) -> Case {
        let base = fixtures().join("cases").join(model).join(name);
        let json: Value =
            serde_json::from_slice(&std::fs::read(base.with_extension("json")).expect("case json"))
                .expect("case json parses");
        let tensors =
            candle_core::safetensors::load(base.with_extension("safetensors"), &Device::Cpu)
                .expect("case safetensors");
        Case { json, tensors }
    }

    /// A stored tensor by its stored name, as f32 (image_u8 stays u8).
    pub fn tensor(&self, name: &str) -> Tensor {
        let t = self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor `{name}` in case"))
            .clone();
        if t.dtype() == DType::U8 {
            t
        } else {
            t.to_dtype(DType::F32).unwrap()
        }
    }

    /// The JSON of executed step `k` (index into `steps`, which lists executed steps only).
    pub fn step(&self, k: usize) -> &Value {
        &self.json["steps"][k]
    }

    /// The tensor a step's JSON names at `path`, e.g. `["unet", "sample"]` or `["callback_in", "latents"]`.
    pub fn step_tensor(&self, k: usize, path: &[&str]) -> Tensor {
        let mut v = self.step(k);
        for p in path {
            v = &v[*p];
        }
        let name = v
            .as_str()
            .unwrap_or_else(|| panic!("step {k} has no tensor at {path:?}"));
        self.tensor(name)
    }

    /// Number of executed steps recorded.
    pub fn num_steps(&self) -> usize {
        self.json["steps"].as_array().map(|a| a.len()).unwrap_or(0)
    }
}

/// max |a - b| over all elements (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - r| / max(1, max |r|): the golden README's measure for latents that grow large.
pub fn rel_diff(a: &Tensor, reference: &Tensor) -> f32 {
    let scale = reference
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    max_abs_diff(a, reference) / scale
}

pub mod pki;
pub mod process;
pub mod server;
pub mod session;
pub mod venv;

/// A request for the golden preset (the recorded prompt, 10 steps, guidance 7.5, 64×64, PNG and
/// latents back) from initial latents `init`, answering a StepEnd with `tensor_inputs` at every
/// step.
pub fn preset_request(
    model: &str,
    scheduler: &str,
    init: &Tensor,
    tensor_inputs: &[&str],
) -> stepstream::proto::GenerateRequest {
    use stepstream::proto;
    proto::GenerateRequest {
        model: model.into(),
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: 10,
        guidance_scale: Some(7.5),
        width: Some(64),
        height: Some(64),
        scheduler: scheduler.into(),
        latents: Some(wire(init)),
        callback: Some(proto::CallbackOptions {
            tensor_inputs: tensor_inputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::Png as i32,
            return_latents: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The largest difference, in 1/255 steps, between a PNG's RGB values and a reference PNG file's.
pub fn png_max_diff(png: &[u8], reference: &std::path::Path) -> u8 {
    let ours = image::load_from_memory(png).expect("a PNG").to_rgb8();
    let theirs = image::open(reference).expect("the reference PNG").to_rgb8();
    assert_eq!(ours.dimensions(), theirs.dimensions(), "image sizes");
    ours.as_raw()
        .iter()
        .zip(theirs.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
}

/// A candle tensor as a wire tensor (f32).
pub fn wire(t: &Tensor) -> stepstream::proto::Tensor {
    stepstream::tensor::encode(t, stepstream::proto::DType::DtypeF32).unwrap()
}

/// A wire tensor as a candle tensor.
pub fn unwire(t: &stepstream::proto::Tensor) -> Tensor {
    stepstream::tensor::decode(t, usize::MAX).unwrap()
}
