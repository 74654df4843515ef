//! Single-file checkpoints (the original LDM layout that A1111, ComfyUI and model sites use):
//! each tiny fixture, converted by diffusers' own scripts (tests/make_checkpoint_fixtures.py),
//! gives its diffusers folder's numbers through the real server; what weights cannot tell is
//! asked for by name; files that are not checkpoints are refused saying what they are.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::session::{ok_reply, Session};
use common::{rel_diff, unwire, Case};
use stepstream::models::checkpoint::{Checkpoint, CheckpointOptions};
use stepstream::models::{hub, ModelError, ModelSource};
use stepstream::proto::{self, server_message::Kind};

/// The golden README's tolerance for latents.
const LATENTS_TOL: f32 = 1e-5;

fn checkpoint_file(name: &str) -> PathBuf {
    common::fixtures()
        .join("checkpoints")
        .join(format!("{name}.safetensors"))
}

fn open(name: &str, config: Option<&Path>) -> ModelSource {
    let options = CheckpointOptions {
        config_dir: config.map(Path::to_path_buf),
        prediction_type: None,
    };
    ModelSource::Checkpoint(Arc::new(
        Checkpoint::open(&checkpoint_file(name), &options).expect("checkpoint opens"),
    ))
}

/// One run's per-step latents, final latents and PNG.
struct Run {
    steps: Vec<Tensor>,
    latents: Tensor,
    png: Vec<u8>,
}

struct Params<'a> {
    model: &'a str,
    negative_prompt: Option<String>,
    scheduler: &'a str,
    init: Tensor,
}

async fn run(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    p: &Params<'_>,
) -> Run {
    let request = proto::GenerateRequest {
        negative_prompt: p.negative_prompt.clone(),
        ..common::preset_request(p.model, p.scheduler, &p.init, &["latents"])
    };
    let mut session = Session::start(client, request).await.expect("accepted");
    let mut steps = Vec::new();
    loop {
        match session.expect().await {
            Kind::StepEnd(step) => {
                steps.push(unwire(&step.tensors["latents"]));
                session.reply(ok_reply(step.step_index)).await;
            }
            Kind::Completed(c) => {
                return Run {
                    steps,
                    latents: unwire(c.latents.as_ref().expect("latents returned")),
                    png: c.images[0].data.clone(),
                }
            }
            Kind::Accepted(_) | Kind::Queued(_) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Serves the folder and its single-file conversion side by side and runs a golden case on
/// both: the same numbers bit for bit, and the golden recording's within its tolerance.
async fn file_matches_folder(model: &str, case_name: &str, scheduler: &str) {
    let folder = common::model_dir(model);
    let file_id = format!("{model}-file");
    let server = common::server::start(common::server::Options {
        models: vec![
            (model.to_string(), ModelSource::Dir(folder.clone())),
            (file_id.clone(), open(model, Some(&folder))),
        ],
        ..Default::default()
    })
    .await;
    let mut client = server.client().await;
    let case = Case::load(model, case_name);
    let negative_prompt = case.json["negative_prompt"].as_str().map(String::from);
    let init = case.tensor("init_latents");
    let from_folder = run(
        &mut client,
        &Params {
            model,
            negative_prompt: negative_prompt.clone(),
            scheduler,
            init: init.clone(),
        },
    )
    .await;
    let from_file = run(
        &mut client,
        &Params {
            model: &file_id,
            negative_prompt,
            scheduler,
            init,
        },
    )
    .await;
    assert_eq!(from_file.steps.len(), 10);
    for (k, (a, b)) in from_folder.steps.iter().zip(&from_file.steps).enumerate() {
        assert!(bits(a) == bits(b), "{model}: step {k} latents differ");
    }
    assert!(bits(&from_folder.latents) == bits(&from_file.latents));
    assert!(from_folder.png == from_file.png, "{model}: PNG differs");
    let d = rel_diff(&from_file.latents, &case.tensor("final.latents"));
    assert!(
        d <= LATENTS_TOL,
        "{model}: final latents {d:.2e} from diffusers'"
    );
}

#[tokio::test]
async fn an_sd15_checkpoint_gives_its_folders_numbers() {
    file_matches_folder("tiny-sd15", "ddim-10", "ddim").await;
}

#[tokio::test]
async fn an_sdxl_checkpoint_gives_its_folders_numbers() {
    file_matches_folder("tiny-sdxl", "euler-10", "euler").await;
}

/// SD 2.x: OpenCLIP's fused attention and linear projections, v-prediction. The reference is
/// diffusers' run of the folder the file was converted from (`cases/tiny-sd2`).
#[tokio::test]
async fn an_sd2_checkpoint_gives_diffusers_numbers_for_its_folder() {
    let config = common::fixtures()
        .join("checkpoints")
        .join("tiny-sd2-config");
    let server = common::server::start(common::server::Options {
        models: vec![("tiny-sd2".into(), open("tiny-sd2", Some(&config)))],
        ..Default::default()
    })
    .await;
    let mut client = server.client().await;
    let case_dir = common::fixtures().join("cases").join("tiny-sd2");
    let recorded =
        candle_core::safetensors::load(case_dir.join("ddim-10.safetensors"), &Device::Cpu).unwrap();
    let got = run(
        &mut client,
        &Params {
            model: "tiny-sd2",
            negative_prompt: None,
            scheduler: "ddim",
            init: recorded["init_latents"].to_dtype(DType::F32).unwrap(),
        },
    )
    .await;
    assert_eq!(got.steps.len(), 10);
    for (k, step) in got.steps.iter().enumerate() {
        let d = rel_diff(step, &recorded[&format!("step{k}_latents")]);
        assert!(
            d <= LATENTS_TOL,
            "tiny-sd2 step {k}: {d:.2e} from diffusers'"
        );
    }
    let worst = common::png_max_diff(&got.png, &case_dir.join("ddim-10.png"));
    assert!(worst <= 1, "PNG differs by {worst} of 255");
}

/// SD 2.x: OpenCLIP's depth minus one (SD 2.x conditions on the penultimate layer), GELU,
/// v-prediction unless told otherwise, and the tokenizer padding with `!`.
#[test]
fn sd2_configs_follow_diffusers_conventions_and_the_prediction_type_can_be_set() {
    let file = checkpoint_file("tiny-sd2");
    // The tiny encoder is 32 wide: no whole number of 64-channel heads, so the error asks for
    // the folder that describes it.
    let err = Checkpoint::open(&file, &CheckpointOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{msg}");
    assert!(
        msg.contains("--model-config") && msg.contains("64"),
        "{msg}"
    );

    let config = common::fixtures()
        .join("checkpoints")
        .join("tiny-sd2-config");
    let options = CheckpointOptions {
        config_dir: Some(config),
        prediction_type: Some("epsilon".into()),
    };
    let c = Checkpoint::open(&file, &options).unwrap();
    assert_eq!(c.family().as_str(), "sd2");
    let scheduler: serde_json::Value =
        serde_json::from_slice(c.file("scheduler/scheduler_config.json").unwrap()).unwrap();
    assert_eq!(
        scheduler["prediction_type"], "epsilon",
        "the flag overrides the folder's"
    );
}

#[test]
fn sdxl_without_a_config_says_which_flag_describes_it() {
    // 16 UNet channels cannot be SDXL's 64-channel heads: inference refuses rather than guess.
    let err = Checkpoint::open(&checkpoint_file("tiny-sdxl"), &CheckpointOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--model-config"), "{err}");
    // A config folder of the other family is refused by name.
    let options = CheckpointOptions {
        config_dir: Some(common::model_dir("tiny-sd15")),
        prediction_type: None,
    };
    let err = Checkpoint::open(&checkpoint_file("tiny-sdxl"), &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("StableDiffusionPipeline") && err.contains("SDXL"),
        "{err}"
    );
}

/// Checkpoint keys and their shapes.
type Keys<'a> = &'a [(&'a str, &'a [usize])];

/// A safetensors file holding the given keys (tiny zero tensors).
fn write_keys(path: &Path, keys: Keys) {
    let tensors: Vec<(String, Tensor)> = keys
        .iter()
        .map(|(k, s)| {
            (
                k.to_string(),
                Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&tensors.into_iter().collect(), path).unwrap();
}

#[test]
fn files_that_are_not_text_to_image_checkpoints_are_refused_saying_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, Keys, &str)] = &[
        (
            "lora",
            &[(
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                &[4, 16],
            )],
            "a LoRA",
        ),
        (
            "component",
            &[("down_blocks.0.resnets.0.conv1.weight", &[4, 4, 3, 3])],
            "one diffusers component",
        ),
        (
            "unet-only",
            &[("model.diffusion_model.out.2.weight", &[4, 4, 3, 3])],
            "no VAE",
        ),
        (
            "refiner",
            &[
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    &[8, 4, 3, 3],
                ),
                ("first_stage_model.decoder.conv_in.weight", &[8, 4, 3, 3]),
                (
                    "conditioner.embedders.0.model.token_embedding.weight",
                    &[10, 8],
                ),
            ],
            "refiner",
        ),
        (
            "inpainting",
            &[
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    &[8, 9, 3, 3],
                ),
                ("first_stage_model.decoder.conv_in.weight", &[8, 4, 3, 3]),
                (
                    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                    &[10, 8],
                ),
            ],
            "9 input channels",
        ),
    ];
    for (name, keys, says) in cases {
        let path = tmp.path().join(format!("{name}.safetensors"));
        write_keys(&path, keys);
        let err = hub::resolve(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{name}: {err}");
    }
    // Not a safetensors file at all.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a tensor file").unwrap();
    let err = hub::resolve(junk.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a readable safetensors file"), "{err}");
}

#[test]
fn a_checkpoint_path_resolves_to_its_file_stem() {
    let file = checkpoint_file("tiny-sd15");
    let options = CheckpointOptions {
        config_dir: Some(common::model_dir("tiny-sd15")),
        prediction_type: None,
    };
    let options = hub::ResolveOptions {
        checkpoint: options,
        ..Default::default()
    };
    let (id, source) = hub::resolve_with(file.to_str().unwrap(), &options).unwrap();
    assert_eq!(id, "tiny-sd15");
    assert!(matches!(source, ModelSource::Checkpoint(_)));
    assert!(source.exists("unet/diffusion_pytorch_model.safetensors"));
    assert!(
        !source.exists("text_encoder_2/model.safetensors"),
        "SD 1.x has one encoder"
    );
}

/// A safetensors file with these keys and shapes whose data is a hole: the header is real, the
/// tensors read as zeros and take no disk, so real-sized layouts cost nothing to test.
fn write_sparse(path: &Path, shapes: &serde_json::Map<String, serde_json::Value>) {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (key, shape) in shapes {
        let numel: u64 = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product();
        let end = offset + 2 * numel;
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::Value::Object(header).to_string().into_bytes();
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(bytes.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&bytes).unwrap();
    f.set_len(8 + bytes.len() as u64 + offset).unwrap();
}

/// Real SD 1.5, SD 2.1 and SDXL base layouts (`checkpoints/real-shapes/`, dumped by the fixture
/// script from diffusers' models on torch's meta device and its conversion scripts): the
/// configs inferred from the keys are the reference repositories' configs, they parse, and every
/// weight diffusers has is found in the file with its shape.
#[test]
fn real_sized_layouts_infer_the_reference_configs_and_map_every_weight() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, family) in [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")] {
        let doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                common::fixtures()
                    .join("checkpoints/real-shapes")
                    .join(format!("{name}.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let path = tmp.path().join(format!("{name}.safetensors"));
        write_sparse(&path, doc["checkpoint_shapes"].as_object().unwrap());
        let c = Arc::new(Checkpoint::open(&path, &CheckpointOptions::default()).unwrap());
        assert_eq!(c.family().as_str(), family);
        let inferred = |rel: &str| -> serde_json::Value {
            serde_json::from_slice(c.file(rel).unwrap()).unwrap()
        };
        let check = |component: &str, rel: &str, fields: &[&str]| {
            let (ours, theirs) = (inferred(rel), &doc["configs"][component]);
            for f in fields {
                if theirs.get(*f).is_some() {
                    assert_eq!(&ours[*f], &theirs[*f], "{name} {component}.{f}");
                }
            }
        };
        check(
            "unet",
            "unet/config.json",
            &[
                "block_out_channels",
                "down_block_types",
                "up_block_types",
                "layers_per_block",
                "transformer_layers_per_block",
                "attention_head_dim",
                "cross_attention_dim",
                "use_linear_projection",
                "upcast_attention",
                "in_channels",
                "out_channels",
                "sample_size",
                "norm_num_groups",
                "addition_embed_type",
                "addition_time_embed_dim",
                "projection_class_embeddings_input_dim",
            ],
        );
        check(
            "vae",
            "vae/config.json",
            &[
                "block_out_channels",
                "layers_per_block",
                "latent_channels",
                "norm_num_groups",
            ],
        );
        let text = [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "hidden_act",
        ];
        check("text_encoder", "text_encoder/config.json", &text);
        if family == "sdxl" {
            check("text_encoder_2", "text_encoder_2/config.json", &text);
            check(
                "text_encoder_2",
                "text_encoder_2/config.json",
                &["projection_dim"],
            );
        }
        // The inferred files are what the loaders take.
        let source = ModelSource::Checkpoint(c.clone());
        stepstream::models::unet::UNetConfig::load(&source, "unet").unwrap();
        stepstream::models::vae::VaeConfig::load(&source, "vae").unwrap();
        stepstream::models::clip::ClipTextConfig::load(&source, "text_encoder").unwrap();
        let tokenizer =
            stepstream::models::tokenizer::ClipTokenizer::load(&source, "tokenizer").unwrap();
        let ids = tokenizer.encode("a photo").unwrap();
        assert_eq!(ids.len(), 77);
        // Every diffusers weight is in the file, with its shape up to unit dimensions
        // (the VAE's attention is stored as 1×1 convolutions).
        let squeeze = |s: &[usize]| -> Vec<usize> {
            let mut s = s.to_vec();
            while s.len() > 1 && s.last() == Some(&1) {
                s.pop();
            }
            s
        };
        let mut mapped = 0;
        for (component, weights) in doc["diffusers_shapes"].as_object().unwrap() {
            for (weight, shape) in weights.as_object().unwrap() {
                let want: Vec<usize> = shape
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                let (key, got) = c
                    .locate(component, weight)
                    .unwrap_or_else(|| panic!("{name}: {component}.{weight} not found"));
                assert_eq!(
                    squeeze(&got),
                    squeeze(&want),
                    "{name}: {component}.{weight} at {key}"
                );
                mapped += 1;
            }
        }
        assert!(mapped > 1000, "{name}: {mapped} weights");
    }
}
