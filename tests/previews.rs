//! Step previews (`CallbackOptions.preview`): every batch item's latents or x0 as a small image
//! on the STEP_END events, blocking or observe-only, from the per-family linear map or from a
//! TAESD decoder that equals diffusers' `AutoencoderTiny` decode.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::session::{reply_to, Session};
use common::unwire;
use stepstream::models::pipeline_model::Family;
use stepstream::models::taesd::TinyDecoder;
use stepstream::pipeline::preview;
use stepstream::proto::{self, CallbackPhase};
use tonic::Code;

/// The golden README's tolerance (max |a - r| / max(1, max |r|)).
const TOL: f32 = 1e-5;

fn taesd_dir() -> std::path::PathBuf {
    common::model_dir("tiny-taesd")
}

/// Both tiny models; tiny-sd15 with the tiny TAESD as its preview decoder.
async fn server() -> common::server::TestServer {
    common::server::start(common::server::Options {
        models: common::server::both_models(),
        preview_decoders: vec![("tiny-sd15".into(), taesd_dir())],
        ..Default::default()
    })
    .await
}

/// Two images of 64×64 (8×8 latents), 4 steps, `tensor_inputs` and `preview` at every step.
fn request(
    model: &str,
    tensor_inputs: &[&str],
    preview: proto::PreviewOptions,
) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.into(),
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: 4,
        width: Some(64),
        height: Some(64),
        seed: Some(7),
        num_images_per_prompt: 2,
        callback: Some(proto::CallbackOptions {
            tensor_inputs: tensor_inputs.iter().map(|s| s.to_string()).collect(),
            preview: Some(preview),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Every event of a run (replying with no change where asked), and Completed.
async fn run(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
) -> (Vec<proto::StepEnd>, proto::Completed) {
    common::session::run(client, req, reply_to)
        .await
        .expect("runs")
}

/// A preview's RGB bytes and size.
fn pixels(p: &proto::Preview) -> (Vec<u8>, u32, u32) {
    let image = p.image.as_ref().expect("an image");
    let rgb = image::load_from_memory(&image.data)
        .expect("decodes")
        .to_rgb8();
    assert_eq!(rgb.dimensions(), (image.width, image.height), "stated size");
    let (w, h) = rgb.dimensions();
    (rgb.into_raw(), w, h)
}

/// What the linear map makes of `latents` for every item.
fn linear(family: Family, latents: &Tensor) -> Vec<(usize, Vec<u8>, u32, u32)> {
    preview::linear_rgb(family, latents, &[]).expect("linear preview")
}

#[tokio::test]
async fn linear_previews_of_every_item_are_the_latents_sent_with_them() {
    let server = server().await;
    let mut client = server.client().await;
    for (model, family, observe_only) in [
        ("tiny-sd15", Family::Sd1, false),
        ("tiny-sdxl", Family::Sdxl, true),
    ] {
        let mut req = request(
            model,
            &["latents"],
            proto::PreviewOptions {
                source: proto::PreviewSource::Latents as i32,
                ..Default::default()
            },
        );
        req.callback.as_mut().unwrap().observe_only = observe_only;
        let (events, _) = run(&mut client, req).await;
        assert_eq!(events.len(), 4, "{model}");
        for e in &events {
            assert_eq!(e.reply_required, !observe_only);
            let want = linear(family, &unwire(&e.tensors["latents"]));
            let items: Vec<u32> = e.previews.iter().map(|p| p.item).collect();
            assert_eq!(items, [0, 1], "{model} step {}: every item", e.step_index);
            for (p, (item, rgb, w, h)) in e.previews.iter().zip(want) {
                assert_eq!(p.item as usize, item);
                assert_eq!(p.image.as_ref().unwrap().mime_type, "image/png");
                assert_eq!(
                    pixels(p),
                    (rgb, w, h),
                    "{model} step {} item {item}",
                    e.step_index
                );
                assert_eq!((w, h), (8, 8), "one pixel per latent");
            }
        }
    }
}

#[tokio::test]
async fn an_x0_preview_is_the_x0_after_guidance_of_the_same_step() {
    let server = server().await;
    let mut client = server.client().await;
    let mut req = request(
        "tiny-sd15",
        &["pred_original_sample"],
        proto::PreviewOptions::default(),
    );
    req.scheduler = "euler".into();
    let cb = req.callback.as_mut().unwrap();
    cb.phases = vec![
        CallbackPhase::AfterGuidance as i32,
        CallbackPhase::StepEnd as i32,
    ];
    cb.observe_only = true;
    let (events, _) = run(&mut client, req).await;
    let mut x0 = HashMap::new();
    for e in &events {
        match CallbackPhase::try_from(e.phase).unwrap() {
            CallbackPhase::AfterGuidance => {
                assert!(e.previews.is_empty(), "previews ride on STEP_END only");
                x0.insert(e.step_index, unwire(&e.tensors["pred_original_sample"]));
            }
            CallbackPhase::StepEnd => {
                let want = linear(Family::Sd1, &x0[&e.step_index]);
                assert_eq!(e.previews.len(), 2);
                for (p, (_, rgb, w, h)) in e.previews.iter().zip(want) {
                    assert_eq!(pixels(p), (rgb, w, h), "step {}", e.step_index);
                }
            }
            other => panic!("unexpected phase {other:?}"),
        }
    }
    assert_eq!(x0.len(), 4);
}

#[tokio::test]
async fn chosen_items_sides_formats_and_steps() {
    let server = server().await;
    let mut client = server.client().await;
    let req = request(
        "tiny-sd15",
        &[],
        proto::PreviewOptions {
            items: vec![1],
            max_side: 4,
            format: proto::PreviewFormat::Jpeg as i32,
            every: 2,
            jpeg_quality: 90,
            ..Default::default()
        },
    );
    let (events, _) = run(&mut client, req).await;
    let with: Vec<u32> = events
        .iter()
        .filter(|e| !e.previews.is_empty())
        .map(|e| e.step_index)
        .collect();
    assert_eq!(with, [0, 2], "every 2nd step");
    for e in events.iter().filter(|e| !e.previews.is_empty()) {
        assert_eq!(e.previews.len(), 1);
        let p = &e.previews[0];
        assert_eq!(p.item, 1);
        let image = p.image.as_ref().unwrap();
        assert_eq!(image.mime_type, "image/jpeg");
        assert_eq!(&image.data[..2], [0xff, 0xd8], "a JPEG");
        assert_eq!(
            pixels(p).1.max(pixels(p).2),
            4,
            "scaled down to the largest side"
        );
    }
}

#[test]
fn the_tiny_decoder_equals_diffusers_autoencoder_tiny() {
    let rec: HashMap<String, Tensor> = candle_core::safetensors::load(
        common::fixtures().join("cases/previews/taesd-decode.safetensors"),
        &Device::Cpu,
    )
    .expect("recording (tests/make_preview_fixtures.py)")
    .into_iter()
    .collect();
    let tiny = TinyDecoder::load(&taesd_dir(), &Device::Cpu, DType::F32).expect("loads");
    assert_eq!(tiny.scale(), 8);
    let image = tiny.decode_unit(&rec["latents"]).expect("decodes");
    assert_eq!(image.dims(), rec["image"].dims());
    let err = common::rel_diff(&image, &rec["image"]);
    assert!(err <= TOL, "TAESD decode vs diffusers: {err:e}");
}

#[tokio::test]
async fn taesd_previews_are_the_tiny_decoders_images_of_the_latents() {
    let server = server().await;
    let mut client = server.client().await;
    let models = client
        .list_models(proto::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let decoders = |id: &str| {
        models
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.preview_decoders.clone())
            .unwrap()
    };
    assert_eq!(decoders("tiny-sd15"), ["linear", "taesd"]);
    assert_eq!(decoders("tiny-sdxl"), ["linear"]);
    let tiny = TinyDecoder::load(&taesd_dir(), &Device::Cpu, DType::F32).unwrap();
    let req = request(
        "tiny-sd15",
        &["latents"],
        proto::PreviewOptions {
            source: proto::PreviewSource::Latents as i32,
            decoder: proto::PreviewDecoder::Taesd as i32,
            ..Default::default()
        },
    );
    let (events, _) = run(&mut client, req).await;
    for e in &events {
        let want = preview::tiny_rgb(&tiny, &unwire(&e.tensors["latents"]), &[]).unwrap();
        assert_eq!(e.previews.len(), 2);
        for (p, (item, rgb, w, h)) in e.previews.iter().zip(want) {
            assert_eq!((w, h), (64, 64), "the VAE's resolution");
            assert_eq!(pixels(p), (rgb, w, h), "step {} item {item}", e.step_index);
        }
    }
}

#[tokio::test]
async fn bad_preview_options_are_refused_naming_the_field() {
    let server = server().await;
    let mut client = server.client().await;
    let cases: Vec<(&str, &str, proto::GenerateRequest)> = vec![
        ("callback.preview.items", "out of range", {
            request(
                "tiny-sd15",
                &[],
                proto::PreviewOptions {
                    items: vec![2],
                    ..Default::default()
                },
            )
        }),
        ("callback.preview.decoder", "no TAESD decoder", {
            request(
                "tiny-sdxl",
                &[],
                proto::PreviewOptions {
                    decoder: proto::PreviewDecoder::Taesd as i32,
                    ..Default::default()
                },
            )
        }),
        ("callback.preview.jpeg_quality", "1..=100", {
            request(
                "tiny-sd15",
                &[],
                proto::PreviewOptions {
                    format: proto::PreviewFormat::Jpeg as i32,
                    jpeg_quality: 101,
                    ..Default::default()
                },
            )
        }),
        ("callback.preview.max_side", "max side", {
            request(
                "tiny-sd15",
                &[],
                proto::PreviewOptions {
                    max_side: 1 << 20,
                    ..Default::default()
                },
            )
        }),
        ("callback.preview.source", "unknown value", {
            request(
                "tiny-sd15",
                &[],
                proto::PreviewOptions {
                    source: 9,
                    ..Default::default()
                },
            )
        }),
        ("callback.preview", "STEP_END", {
            let mut r = request("tiny-sd15", &[], proto::PreviewOptions::default());
            r.callback.as_mut().unwrap().phases = vec![CallbackPhase::StepBegin as i32];
            r
        }),
    ];
    for (field, reason, req) in cases {
        let status = match Session::start(&mut client, req).await {
            Err(s) => s,
            Ok(mut s) => s.next().await.expect_err("refused"),
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field) && status.message().contains(reason),
            "{field}: {}",
            status.message()
        );
    }
}

#[test]
fn a_folder_that_is_not_an_autoencoder_tiny_is_refused() {
    let err = stepstream::models::taesd::TinyDecoder::load(
        &common::model_dir("tiny-sd15").join("unet"),
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .expect("a UNet folder is not an AutoencoderTiny");
    assert!(err.to_string().contains("AutoencoderTiny"), "{err}");
}
