//! LoRAs, served unmerged: the two file formats give diffusers' `load_lora_weights` numbers,
//! the scale changes mid-run from a reply or a server-side schedule exactly as a diffusers
//! callback calling `set_adapters` does (recordings: tests/make_lora_fixtures.py), sessions with
//! different LoRAs share UNet calls without changing each other's numbers, and what does not
//! fit is refused by name.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::session::{ok_reply, Session};
use common::{rel_diff, unwire};
use stepstream::models::lora::{LoraError, LoraFile};
use stepstream::models::pipeline_model::StableDiffusionModel;
use stepstream::models::ModelSource;
use stepstream::proto::{self, server_message::Kind};
use tonic::Code;

/// The golden README's tolerance for latents.
const LATENTS_TOL: f32 = 1e-5;

fn lora_path(file: &str) -> PathBuf {
    common::fixtures().join("loras").join(file)
}

fn lora(name: &str, file: &str) -> Arc<LoraFile> {
    Arc::new(LoraFile::read(name, &lora_path(file)).expect("LoRA reads"))
}

/// tiny-sd15 with `a` (diffusers format), `a_kohya` (the same LoRA, kohya format) and `b` (kohya).
async fn server() -> common::server::TestServer {
    common::server::start(common::server::Options {
        loras: vec![
            ("tiny-sd15".into(), lora("a", "a.safetensors")),
            ("tiny-sd15".into(), lora("a_kohya", "a-kohya.safetensors")),
            ("tiny-sd15".into(), lora("b", "b-kohya.safetensors")),
        ],
        max_sessions: 16,
        max_batch: 64,
        ..Default::default()
    })
    .await
}

/// A recording of diffusers with LoRAs (`cases/tiny-sd15-lora/<name>`).
struct Recording {
    init: Tensor,
    steps: Vec<Tensor>,
    png: PathBuf,
}

fn recording(name: &str) -> Recording {
    recording_of("tiny-sd15-lora", name)
}

fn recording_of(folder: &str, name: &str) -> Recording {
    let dir = common::fixtures().join("cases").join(folder);
    let t = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
        .unwrap();
    Recording {
        init: t["init_latents"].to_dtype(DType::F32).unwrap(),
        steps: (0..10)
            .map(|k| t[&format!("step{k}_latents")].to_dtype(DType::F32).unwrap())
            .collect(),
        png: dir.join(format!("{name}.png")),
    }
}

fn request(init: &Tensor, loras: Vec<proto::LoraRequest>) -> proto::GenerateRequest {
    proto::GenerateRequest {
        loras,
        ..common::preset_request("tiny-sd15", "ddim", init, &["latents"])
    }
}

fn use_lora(name: &str, scale: f32) -> proto::LoraRequest {
    proto::LoraRequest {
        name: name.into(),
        scale: Some(scale),
        schedule: Vec::new(),
    }
}

/// What one run produced, byte for byte.
#[derive(PartialEq)]
struct Run {
    steps: Vec<Vec<u8>>,
    latents: Vec<u8>,
    png: Vec<u8>,
}

/// Runs `req`, answering step `k` with `reply_at(k)` (default: no change).
async fn run(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
    reply_at: impl Fn(u32) -> proto::StepReply,
) -> Run {
    let mut session = Session::start(client, req).await.expect("accepted");
    let mut steps = Vec::new();
    loop {
        match session.expect().await {
            Kind::StepEnd(step) => {
                steps.push(step.tensors["latents"].data.clone());
                session.reply(reply_at(step.step_index)).await;
            }
            Kind::Completed(c) => {
                return Run {
                    steps,
                    latents: c.latents.expect("latents").data,
                    png: c.images[0].data.clone(),
                }
            }
            Kind::Accepted(_) | Kind::Queued(_) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}

/// Every step within the golden tolerance of the recording, and the PNG within 1 of 255.
fn assert_matches(what: &str, got: &Run, rec: &Recording) {
    assert_eq!(got.steps.len(), rec.steps.len(), "{what}: steps");
    let shape = rec.init.dims().to_vec();
    for (k, (bytes, want)) in got.steps.iter().zip(&rec.steps).enumerate() {
        let ours = unwire(&proto::Tensor {
            shape: shape.iter().map(|&d| d as i64).collect(),
            dtype: proto::DType::DtypeF32 as i32,
            data: bytes.clone(),
        });
        let d = rel_diff(&ours, want);
        assert!(
            d <= LATENTS_TOL,
            "{what}: step {k} is {d:.2e} from diffusers'"
        );
    }
    let worst = common::png_max_diff(&got.png, &rec.png);
    assert!(worst <= 1, "{what}: PNG differs by {worst} of 255");
}

fn set_scale_after(step: u32, name: &'static str, scale: f32) -> impl Fn(u32) -> proto::StepReply {
    move |k| {
        let mut r = ok_reply(k);
        if k == step {
            r.lora_scales = HashMap::from([(name.to_string(), scale)]);
        }
        r
    }
}

#[tokio::test]
async fn a_scale_changed_by_a_reply_matches_diffusers_set_adapters_in_both_formats() {
    let server = server().await;
    let mut client = server.client().await;
    let rec = recording("a-mid-run");
    for name in ["a", "a_kohya"] {
        let got = run(
            &mut client,
            request(&rec.init, vec![use_lora(name, 0.8)]),
            set_scale_after(3, name, 0.3),
        )
        .await;
        assert_matches(name, &got, &rec);
    }
}

#[tokio::test]
async fn a_server_side_schedule_gives_the_same_numbers_with_no_round_trip() {
    let server = server().await;
    let mut client = server.client().await;
    let rec = recording("a-mid-run");
    // A reply at the end of step 3 applies from step 4: the schedule says so per step.
    let schedule = [[0.8f32; 4].as_slice(), [0.3f32; 6].as_slice()].concat();
    let req = request(
        &rec.init,
        vec![proto::LoraRequest {
            name: "a".into(),
            scale: None,
            schedule,
        }],
    );
    let got = run(&mut client, req, ok_reply).await;
    assert_matches("schedule", &got, &rec);
}

#[tokio::test]
async fn two_loras_of_both_formats_at_once_match_diffusers() {
    let server = server().await;
    let mut client = server.client().await;
    let rec = recording("ab");
    let got = run(
        &mut client,
        request(&rec.init, vec![use_lora("a", 0.8), use_lora("b", 0.5)]),
        ok_reply,
    )
    .await;
    assert_matches("a + b", &got, &rec);
}

/// A reply that rescales a LoRA: after step, name, scale.
type Change = (u32, &'static str, f32);

#[tokio::test]
async fn sessions_with_different_loras_share_unet_calls_and_keep_their_solo_numbers() {
    let server = server().await;
    let mut client = server.client().await;
    let init = recording("ab").init;
    let plans: Vec<(Vec<proto::LoraRequest>, Option<Change>)> = vec![
        (vec![use_lora("a", 0.8)], Some((3, "a", 0.3))),
        (vec![], None),
        (vec![use_lora("b", 0.5)], None),
        (
            vec![use_lora("a", 0.8), use_lora("b", -0.4)],
            Some((5, "b", 1.2)),
        ),
        (vec![use_lora("a_kohya", 0.0)], Some((2, "a_kohya", 0.7))),
    ];
    let reply = |change: Option<Change>| {
        move |k: u32| match change {
            Some((step, name, scale)) => set_scale_after(step, name, scale)(k),
            None => ok_reply(k),
        }
    };
    let mut solo = Vec::new();
    for (loras, change) in &plans {
        solo.push(run(&mut client, request(&init, loras.clone()), reply(*change)).await);
    }
    let calls_before = server.metrics.unet_rows.count();
    let rows_before = server.metrics.unet_rows.sum();
    let mut tasks = Vec::new();
    for (loras, change) in plans.clone() {
        let mut c = server.client().await;
        let req = request(&init, loras);
        tasks.push(tokio::spawn(async move {
            run(&mut c, req, reply(change)).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let together = t.await.expect("session task");
        assert!(
            together == solo[i],
            "plan {i}: numbers differ from its solo run"
        );
    }
    let calls = server.metrics.unet_rows.count() - calls_before;
    let rows = server.metrics.unet_rows.sum() - rows_before;
    // Each session alone has 2 rows per call (CFG); sharing gives more.
    assert!(
        rows / calls as f64 > 2.0,
        "{rows} rows in {calls} calls: no call was shared"
    );
    // And the LoRA really acts: a and no LoRA differ.
    assert!(solo[0] != solo[1]);
}

#[tokio::test]
async fn list_models_names_each_lora_its_format_and_its_modules() {
    let server = server().await;
    let mut client = server.client().await;
    let list = client
        .list_models(proto::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let loras = &list.models[0].loras;
    let names: Vec<&str> = loras.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["a", "a_kohya", "b"]);
    assert_eq!(loras[0].format, "diffusers");
    assert_eq!(loras[1].format, "kohya");
    assert_eq!(loras[0].rank, 4);
    // Both formats of `a` adapt the same layers, named the diffusers way.
    assert_eq!(loras[0].modules, loras[1].modules);
    assert!(loras[0]
        .modules
        .contains(&"unet.down_blocks.0.attentions.0.proj_in".to_string()));
    assert!(loras[0]
        .modules
        .iter()
        .any(|m| m.starts_with("text_encoder.") && m.ends_with("self_attn.q_proj")));
}

#[tokio::test]
async fn requests_and_replies_that_name_loras_wrongly_are_refused_by_field() {
    let server = server().await;
    let mut client = server.client().await;
    let init = recording("ab").init;
    let refused = |req: proto::GenerateRequest| {
        let mut c = client.clone();
        async move {
            match Session::start(&mut c, req).await {
                Err(s) => s,
                Ok(mut s) => s.next().await.expect_err("refused"),
            }
        }
    };
    let cases: Vec<(Vec<proto::LoraRequest>, &str)> = vec![
        (vec![use_lora("nope", 1.0)], "loras[0].name"),
        (vec![use_lora("a", 1.0), use_lora("a", 0.5)], "listed twice"),
        (vec![use_lora("a", f32::NAN)], "loras[0].scale"),
        (
            vec![proto::LoraRequest {
                name: "a".into(),
                scale: None,
                schedule: vec![1.0; 3],
            }],
            "3 values for 10 timesteps",
        ),
    ];
    for (loras, says) in cases {
        let status = refused(request(&init, loras)).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{says}: {status:?}");
        assert!(
            status.message().contains(says),
            "{says}: {}",
            status.message()
        );
    }
    // A reply may only rescale a LoRA its request applies.
    let mut s = Session::start(&mut client, request(&init, vec![use_lora("a", 0.8)]))
        .await
        .unwrap();
    let rejected = loop {
        match s.expect().await {
            Kind::StepEnd(step) => {
                let mut r = ok_reply(step.step_index);
                r.lora_scales = HashMap::from([("b".to_string(), 1.0)]);
                s.reply(r).await;
            }
            Kind::ReplyRejected(r) => break r,
            Kind::Accepted(_) | Kind::Queued(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(rejected.field, "lora_scales[b]");
    assert!(rejected.reason.contains("not a LoRA of this request"));
}

fn load(model: &str) -> StableDiffusionModel {
    StableDiffusionModel::load(
        model.into(),
        &ModelSource::Dir(common::model_dir(model)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn a_lora_that_does_not_fit_the_model_is_refused_at_load_naming_the_module() {
    // tiny-sd15's LoRA on tiny-sdxl: the layers exist by name but are other widths.
    let mut xl = load("tiny-sdxl");
    let err = xl.add_lora(&lora("a", "a.safetensors")).unwrap_err();
    let LoraError::DoesNotFit { module, reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(!module.is_empty(), "{err}");
    assert!(
        reason.contains("->") || reason.contains("not an adaptable"),
        "{err}"
    );
    assert!(xl.loras.is_empty(), "nothing attached");

    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: Vec<(&str, Tensor)>| {
        let path = tmp.path().join(name);
        let map: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| (k.to_string(), t))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    };
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let mut sd15 = load("tiny-sd15");
    // A layer stepstream does not adapt (LoCon on a ResNet's 3x3 convolution).
    let locon = write(
        "locon.safetensors",
        vec![
            (
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
                z(&[4, 16, 3, 3]),
            ),
            (
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight",
                z(&[16, 4, 1, 1]),
            ),
        ],
    );
    let err = sd15
        .add_lora(&LoraFile::read("locon", &locon).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("down_blocks_0_resnets_0_conv1") && err.contains("not an adaptable"),
        "{err}"
    );
    // Wrong widths on a layer that exists.
    let wide = write(
        "wide.safetensors",
        vec![
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                z(&[4, 99]),
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
                z(&[16, 4]),
            ),
        ],
    );
    let err = sd15
        .add_lora(&LoraFile::read("wide", &wide).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("attn1.to_q") && err.contains("99"), "{err}");
    // Files that are not LoRAs, or kinds that are not supported, say what they are.
    let not_lora = write("model.safetensors", vec![("conv_in.weight", z(&[4, 4]))]);
    let err = LoraFile::read("m", &not_lora).unwrap_err().to_string();
    assert!(err.contains("no LoRA keys"), "{err}");
    let loha = write(
        "loha.safetensors",
        vec![("lora_unet_x.hada_w1_a", z(&[2, 2]))],
    );
    let err = LoraFile::read("h", &loha).unwrap_err().to_string();
    assert!(err.contains("LoHa"), "{err}");
    // A name is attached once per model.
    sd15.add_lora(&lora("a", "a.safetensors")).unwrap();
    let err = sd15
        .add_lora(&lora("a", "a-kohya.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already has a LoRA of this name"), "{err}");
}

/// SDXL: a kohya file as SDXL trainers write it (UNet modules in the original layout's names,
/// `lora_te1_`/`lora_te2_` for both encoders), rescaled mid-run, gives diffusers' numbers.
#[tokio::test]
async fn an_sdxl_kohya_lora_with_original_layout_names_matches_diffusers() {
    let server = common::server::start(common::server::Options {
        models: vec![(
            "tiny-sdxl".into(),
            ModelSource::Dir(common::model_dir("tiny-sdxl")),
        )],
        loras: vec![("tiny-sdxl".into(), lora("x", "xl-kohya.safetensors"))],
        ..Default::default()
    })
    .await;
    let mut client = server.client().await;
    let rec = recording_of("tiny-sdxl-lora", "xl-mid-run");
    let mut req = request(&rec.init, vec![use_lora("x", 0.7)]);
    req.model = "tiny-sdxl".into();
    req.scheduler = "euler".into();
    let got = run(&mut client, req, set_scale_after(4, "x", 0.2)).await;
    assert_matches("sdxl", &got, &rec);
    let list = client
        .list_models(proto::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let modules = &list.models[0].loras[0].modules;
    for net in ["unet.", "text_encoder.", "text_encoder_2."] {
        assert!(
            modules.iter().any(|m| m.starts_with(net)),
            "{net} in {modules:?}"
        );
    }
}
