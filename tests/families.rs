//! SD 2.x-architecture and Turbo-style models, made by the tests (random weights, diffusers
//! layout): the family is recognised, defaults come from the model's own configs, and
//! generation runs through the server with the settings those configs imply.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::server::{self, Options};
use common::session::Session;
use stepstream::models::clip::{ClipTextConfig, ClipTextModel};
use stepstream::models::unet::{UNet2DConditionModel, UNetConfig};
use stepstream::models::ModelSource;
use stepstream::proto::{self, server_message::Kind};

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Fills every variable the constructor asked for with small random values and saves them.
fn save_random(varmap: &VarMap, path: &Path, seed: u64) {
    let mut gen = stepstream::rng::NoiseGenerator::new(seed);
    for var in varmap.all_vars() {
        let n = var.elem_count();
        let values: Vec<f32> = gen.randn_vec(n).into_iter().map(|x| x * 0.05).collect();
        let t = Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap();
        var.set(&t).unwrap();
    }
    varmap.save(path).unwrap();
}

/// A tiny SD 2.x-architecture model: OpenCLIP-style exact-GELU text encoder, `!` padding,
/// linear transformer projections, per-block head counts, v-prediction.
fn make_sd2(dir: &Path) {
    common::copy_dir(&common::model_dir("tiny-sd15"), dir);
    edit_json(&dir.join("text_encoder/config.json"), |v| {
        v["hidden_act"] = "gelu".into();
    });
    for f in [
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
    ] {
        edit_json(&dir.join(f), |v| v["pad_token"] = "!".into());
    }
    edit_json(&dir.join("unet/config.json"), |v| {
        v["use_linear_projection"] = true.into();
        v["attention_head_dim"] = serde_json::json!([2, 4]);
    });
    edit_json(&dir.join("scheduler/scheduler_config.json"), |v| {
        v["prediction_type"] = "v_prediction".into();
    });
    let src = ModelSource::Dir(dir.to_path_buf());
    let vm = VarMap::new();
    let cfg = ClipTextConfig::load(&src, "text_encoder").unwrap();
    ClipTextModel::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    save_random(&vm, &dir.join("text_encoder/model.safetensors"), 1);
    let vm = VarMap::new();
    let cfg = UNetConfig::load(&src, "unet").unwrap();
    UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg)
        .unwrap();
    save_random(
        &vm,
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        2,
    );
}

/// A Turbo-style model: the tiny SD 1.5 weights with a distilled model's scheduler config
/// (Euler-ancestral, trailing spacing, as SDXL-Turbo ships it).
fn make_turbo(dir: &Path) {
    common::copy_dir(&common::model_dir("tiny-sd15"), dir);
    edit_json(&dir.join("scheduler/scheduler_config.json"), |v| {
        v["_class_name"] = "EulerAncestralDiscreteScheduler".into();
        v["timestep_spacing"] = "trailing".into();
    });
}

fn info<'a>(list: &'a proto::ListModelsResponse, id: &str) -> &'a proto::ModelInfo {
    list.models.iter().find(|m| m.id == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd2_and_turbo_style_models_take_their_defaults_from_their_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd2, turbo) = (tmp.path().join("tiny-sd2"), tmp.path().join("tiny-turbo"));
    make_sd2(&sd2);
    make_turbo(&turbo);
    let srv = server::start(Options {
        models: vec![
            ("tiny-sd2".into(), ModelSource::Dir(sd2)),
            ("tiny-turbo".into(), ModelSource::Dir(turbo)),
        ],
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let list = c
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let m = info(&list, "tiny-sd2");
    assert_eq!(m.family, "sd2");
    assert_eq!(m.prediction_type, "v_prediction");
    assert_eq!((m.default_steps, m.default_guidance_scale), (50, 7.5));
    let t = info(&list, "tiny-turbo");
    assert_eq!(t.family, "sd1");
    assert_eq!((t.default_steps, t.default_guidance_scale), (4, 0.0));
    assert_eq!(t.default_scheduler, "euler_a");

    // SD 2.x: v-prediction through both schedulers, CFG on, finite results.
    for scheduler in ["ddim", "euler"] {
        let done = c
            .generate_once(proto::GenerateRequest {
                model: "tiny-sd2".into(),
                prompt: "a red cube!".into(),
                num_inference_steps: 3,
                scheduler: scheduler.into(),
                seed: Some(1),
                output: Some(proto::OutputOptions {
                    format: proto::ImageFormat::Png as i32,
                    return_latents: true,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let l = common::unwire(done.latents.as_ref().unwrap());
        let v: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{scheduler}");
        assert_eq!(done.images.len(), 1);
    }

    // Turbo-style: a request with no steps and no guidance runs 4 trailing steps without CFG.
    let mut s = Session::start(
        &mut c,
        proto::GenerateRequest {
            model: "tiny-turbo".into(),
            prompt: "a cat".into(),
            callback: Some(proto::CallbackOptions {
                tensor_inputs: vec!["prompt_embeds".into()],
                observe_only: true,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let Kind::Accepted(acc) = s.expect().await else {
        panic!()
    };
    assert_eq!(acc.timesteps, vec![999.0, 749.0, 499.0, 249.0]);
    assert_eq!(acc.guidance_scale, 0.0);
    loop {
        match s.expect().await {
            Kind::StepEnd(e) => {
                assert!(!e.do_classifier_free_guidance);
                assert_eq!(e.tensors["prompt_embeds"].shape[0], 1);
            }
            Kind::Completed(_) => break,
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn sdxl_loads_as_sdxl_with_its_callback_tensors() {
    let m = stepstream::models::pipeline_model::StableDiffusionModel::load(
        "tiny-sdxl".into(),
        &ModelSource::Dir(common::model_dir("tiny-sdxl")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(m.family.as_str(), "sdxl");
    assert_eq!(
        m.callback_tensor_inputs(),
        &[
            "latents",
            "prompt_embeds",
            "add_text_embeds",
            "add_time_ids"
        ]
    );
    assert_eq!(m.text_encoder_hidden_size(), 80);
    assert!(m.force_zeros_for_empty_prompt);
    assert_eq!(m.vae_config.scaling_factor, 0.13025);
}

/// SDXL: turning CFG off must halve prompt_embeds, add_text_embeds and add_time_ids together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_cfg_off_needs_every_conditioning_tensor_halved() {
    let srv = server::start(Options {
        models: vec![(
            "tiny-sdxl".into(),
            ModelSource::Dir(common::model_dir("tiny-sdxl")),
        )],
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let names = ["prompt_embeds", "add_text_embeds", "add_time_ids"];
    let mut s = Session::start(
        &mut c,
        proto::GenerateRequest {
            prompt: "a cat".into(),
            num_inference_steps: 3,
            callback: Some(proto::CallbackOptions {
                tensor_inputs: names.iter().map(|s| s.to_string()).collect(),
                step_indices: vec![0],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let Kind::Accepted(acc) = s.expect().await else {
        panic!()
    };
    assert_eq!((acc.width, acc.height), (64, 64));
    let Kind::StepEnd(step) = s.expect().await else {
        panic!()
    };
    assert_eq!(step.tensors["add_time_ids"].shape, vec![2, 6]);
    assert_eq!(step.tensors["add_text_embeds"].shape, vec![2, 40]);
    let half = |n: &str| stepstream::client::conditional_half(&step.tensors[n]).unwrap();
    let only_embeds = proto::StepReply {
        step_index: 0,
        guidance_scale: Some(0.0),
        tensors: [("prompt_embeds".to_string(), half("prompt_embeds"))].into(),
        ..Default::default()
    };
    s.reply(only_embeds).await;
    let Kind::ReplyRejected(r) = s.expect().await else {
        panic!("expected a rejection")
    };
    assert_eq!(r.field, "guidance_scale");
    assert!(r.reason.contains("add_text_embeds"), "{}", r.reason);
    let all = proto::StepReply {
        step_index: 0,
        guidance_scale: Some(0.0),
        tensors: names.iter().map(|n| (n.to_string(), half(n))).collect(),
        ..Default::default()
    };
    s.reply(all).await;
    let done = s.until_completed().await;
    assert_eq!(done.images.len(), 1);
}
