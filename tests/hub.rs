//! `--model` resolution: hub ids through an hf-hub cache laid out on disk (no network), and
//! local folders, both loading the real diffusers layout.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use stepstream::models::hub::{self, HubId};
use stepstream::models::pipeline_model::StableDiffusionModel;
use stepstream::models::ModelSource;

/// Lays out `HF_HOME/hub/models--org--name/{refs/main, snapshots/<commit>/...}` like hf-hub.
fn fake_cache(home: &Path, repo: &str, commit: &str) {
    let folder = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), commit).unwrap();
    common::copy_dir(
        &common::model_dir("tiny-sd15"),
        &folder.join("snapshots").join(commit),
    );
}

#[test]
fn hub_ids_resolve_offline_from_the_cache_and_load() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    fake_cache(home.path(), "org/tiny-sd", commit);
    // SAFETY of the env change: this test binary has this one test.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let (id, source) = hub::resolve("org/tiny-sd").unwrap();
    assert_eq!(id, "org/tiny-sd");
    let dir = source.dir().unwrap().to_path_buf();
    assert!(dir.ends_with(format!("snapshots/{commit}")));
    let m = StableDiffusionModel::load(id, &source, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.defaults.width, 64);

    // A revision given as a commit hash, and as a ref.
    let (_, s) = hub::resolve(&format!("org/tiny-sd@{commit}")).unwrap();
    assert_eq!(s.dir().unwrap(), dir);
    let (_, s) = hub::resolve("org/tiny-sd@main").unwrap();
    assert_eq!(s.dir().unwrap(), dir);

    // Not in the cache: a clear error that says how to fix it.
    let err = hub::resolve("org/absent").unwrap_err().to_string();
    assert!(err.contains("not fully in the cache"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");

    // A snapshot missing a weight file is refused by name.
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = hub::resolve("org/tiny-sd").unwrap_err().to_string();
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors"),
        "{err}"
    );

    // A local folder wins over the hub and is named by its folder.
    let (id, s) = hub::resolve(common::model_dir("tiny-sd15").to_str().unwrap()).unwrap();
    assert_eq!(id, "tiny-sd15");
    assert!(matches!(s, ModelSource::Dir(_)));

    // Neither a folder nor a hub id.
    let err = hub::resolve("not a model").unwrap_err().to_string();
    assert!(err.contains("neither a folder nor a hub id"), "{err}");
    assert_eq!(HubId::parse("org/name@v1").unwrap().revision, "v1");
}

#[test]
fn the_embedded_default_model_loads() {
    let m = StableDiffusionModel::load(
        stepstream::models::embedded::EMBEDDED_MODEL_ID.into(),
        &stepstream::models::embedded::source(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(m.id, "tiny-sd15");
    assert_eq!(m.defaults.scheduler, "ddim");
}

/// Pickles are never opened: a `.ckpt`/`.bin` given as `--model`, or lying in a component folder
/// in place of the safetensors weights, is refused by name with the reason and the way out.
#[test]
fn pickled_weights_are_refused_by_name_and_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["v1-5-pruned.ckpt", "model.BIN", "x.pt", "y.pth"] {
        let f = dir.path().join(name);
        // Not a pickle at all: were it opened, loading would fail differently.
        std::fs::write(&f, b"not read").unwrap();
        let err = hub::resolve(f.to_str().unwrap()).unwrap_err();
        assert!(
            matches!(err, stepstream::models::ModelError::Pickle { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(name) && msg.contains("arbitrary code"),
            "{msg}"
        );
        assert!(msg.contains(".safetensors"), "{msg}");
    }
    // Another file is not a model either, and the error says what --model takes.
    let f = dir.path().join("notes.txt");
    std::fs::write(&f, b"").unwrap();
    let msg = hub::resolve(f.to_str().unwrap()).unwrap_err().to_string();
    assert!(msg.contains("diffusers folder"), "{msg}");

    // A diffusers folder whose UNet ships only a pickle.
    let model = dir.path().join("tiny");
    common::copy_dir(&common::model_dir("tiny-sd15"), &model);
    std::fs::remove_file(model.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(model.join("unet/diffusion_pytorch_model.bin"), b"not read").unwrap();
    let (id, source) = hub::resolve(model.to_str().unwrap()).unwrap();
    let err = match StableDiffusionModel::load(id, &source, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("a pickled UNet loaded"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains("unet/diffusion_pytorch_model.bin"), "{msg}");
    assert!(msg.contains("arbitrary code"), "{msg}");
}

/// Writes every tensor of `from` to `to` converted to f16.
fn to_f16(from: &Path, to: &Path) {
    let tensors = candle_core::safetensors::load(from, &Device::Cpu).unwrap();
    let half: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, to).unwrap();
}

/// `--variant fp16` reads `*.fp16.safetensors` and falls back to the plain file where a
/// component has none; without it, the files that fit the dtype come first (f32: the plain ones,
/// f16: the fp16 ones).
#[test]
fn the_fp16_variant_is_read_when_asked_for_or_when_the_dtype_is_half() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-sd15-fp16");
    common::copy_dir(&common::model_dir("tiny-sd15"), &dir);
    let unet = dir.join("unet");
    to_f16(
        &unet.join("diffusion_pytorch_model.safetensors"),
        &unet.join("diffusion_pytorch_model.fp16.safetensors"),
    );
    // Tell the files apart: the plain UNet's conv_in becomes zeros.
    let mut plain = candle_core::safetensors::load(
        unet.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let w = plain["conv_in.weight"].zeros_like().unwrap();
    plain.insert("conv_in.weight".into(), w);
    candle_core::safetensors::save(&plain, unet.join("diffusion_pytorch_model.safetensors"))
        .unwrap();

    let conv_in_sum = |source: &ModelSource, dtype: DType| -> f32 {
        let vb = source.var_builder("unet", dtype, &Device::Cpu).unwrap();
        vb.get((16, 4, 3, 3), "conv_in.weight")
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let spec = dir.to_str().unwrap();
    let (_, plain_source) = hub::resolve(spec).unwrap();
    assert_eq!(
        conv_in_sum(&plain_source, DType::F32),
        0.0,
        "f32: the plain file"
    );
    assert!(
        conv_in_sum(&plain_source, DType::F16) > 0.0,
        "f16: the fp16 file"
    );
    let options = hub::ResolveOptions {
        variant: Some("fp16".into()),
        ..Default::default()
    };
    let (id, variant) = hub::resolve_with(spec, &options).unwrap();
    assert_eq!(id, "tiny-sd15-fp16");
    assert!(
        conv_in_sum(&variant, DType::F32) > 0.0,
        "--variant fp16 in f32: the fp16 file"
    );
    // The VAE has no fp16 file: the plain one loads, and the whole model runs.
    let m = StableDiffusionModel::load(id, &variant, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.family.as_str(), "sd1");
}
