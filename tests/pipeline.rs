//! The pipeline on its own, driven by callbacks written in Rust (no gRPC): diffusers' image,
//! batch-correct CFG pairing, and callback semantics.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, model_dir, rel_diff, Case};
use stepstream::models::pipeline_model::StableDiffusionModel;
use stepstream::models::ModelSource;
use stepstream::pipeline::sd::{self, GenerateParams};
use stepstream::pipeline::{
    validate_control, CallbackError, NoCallback, StepCallback, StepControl, StepState,
};

fn model() -> StableDiffusionModel {
    StableDiffusionModel::load(
        "tiny-sd15".into(),
        &ModelSource::Dir(model_dir("tiny-sd15")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn params(case: &Case) -> GenerateParams {
    let j = &case.json;
    GenerateParams {
        prompt: j["prompt"].as_str().unwrap().into(),
        negative_prompt: j["negative_prompt"].as_str().map(String::from),
        prompt_embeds: None,
        negative_prompt_embeds: None,
        num_inference_steps: j["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: j["guidance_scale"].as_f64().unwrap(),
        guidance_rescale: 0.0,
        width: 64,
        height: 64,
        seed: 0,
        scheduler: "ddim".into(),
        num_images_per_prompt: 1,
        latents: Some(case.tensor("init_latents")),
        eta: 0.0,
        decode: false,
        loras: Vec::new(),
        guidance_plan: Default::default(),
    }
}

#[test]
fn decoded_image_matches_diffusers_float_output() {
    let m = model();
    let case = Case::load("tiny-sd15", "ddim-10");
    let out = sd::prepare(&m, &params(&case))
        .unwrap()
        .run(&mut NoCallback)
        .unwrap();
    assert!(rel_diff(&out.latents, &case.tensor("final.latents")) <= 1e-5);
    let image = sd::decode_to_unit(&m, &out.latents)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    let d = max_abs_diff(&image, &case.tensor("image"));
    println!("ddim-10 decoded image max abs diff {d:.2e}");
    assert!(d <= 1e-5, "image diff {d}");
}

/// Two images per prompt run as [uncond x2; cond x2] against latents [l1, l2]: each image must
/// equal the single-image run from its own latents (the pairing candle's example gets wrong).
#[test]
fn several_images_pair_each_latent_with_its_own_embeddings() {
    let m = model();
    let case = Case::load("tiny-sd15", "ddim-10");
    let l1 = case.tensor("init_latents");
    let l2 = (l1.neg().unwrap() * 0.5).unwrap();
    let mut p = params(&case);
    p.num_inference_steps = 4;
    let single = |l: &Tensor| {
        let mut p = p.clone();
        p.latents = Some(l.clone());
        sd::prepare(&m, &p)
            .unwrap()
            .run(&mut NoCallback)
            .unwrap()
            .latents
    };
    let (a, b) = (single(&l1), single(&l2));
    let mut both = p.clone();
    both.num_images_per_prompt = 2;
    both.latents = Some(Tensor::cat(&[&l1, &l2], 0).unwrap());
    let prepared = sd::prepare(&m, &both).unwrap();
    assert_eq!(
        prepared.callback_tensors()["prompt_embeds"].dims(),
        &[4, 77, 32]
    );
    let out = prepared.run(&mut NoCallback).unwrap().latents;
    assert!(max_abs_diff(&out.get(0).unwrap(), &a.get(0).unwrap()) < 1e-5);
    assert!(max_abs_diff(&out.get(1).unwrap(), &b.get(0).unwrap()) < 1e-5);
}

/// A Rust callback that cuts CFG at a step, keeping the conditional half at batch 2.
struct Cutoff {
    at: usize,
    seen: Vec<(usize, bool, usize)>,
}

impl StepCallback for Cutoff {
    fn wants(&self, _: usize) -> bool {
        true
    }
    fn on_step_end(&mut self, s: &StepState<'_>) -> Result<StepControl, CallbackError> {
        let pe = &s.tensors["prompt_embeds"];
        self.seen.push((
            s.step_index,
            s.do_classifier_free_guidance,
            pe.dim(0).unwrap(),
        ));
        if s.step_index != self.at {
            return Ok(StepControl::default());
        }
        // Setting guidance to 0 without halving is refused, with a reason.
        let bad = StepControl {
            guidance_scale: Some(0.0),
            ..Default::default()
        };
        let allowed = vec!["prompt_embeds".to_string()];
        let err = validate_control(s, &allowed, &bad).unwrap_err();
        assert_eq!(err.field, "guidance_scale");
        let half = pe.narrow(0, s.batch, s.batch).unwrap();
        let good = StepControl {
            guidance_scale: Some(0.0),
            tensors: vec![("prompt_embeds".into(), half)],
            ..Default::default()
        };
        validate_control(s, &allowed, &good).unwrap();
        Ok(good)
    }
}

#[test]
fn cfg_cutoff_halves_the_unet_batch_from_the_next_step_at_any_batch() {
    let m = model();
    let case = Case::load("tiny-sd15", "ddim-10");
    let mut p = params(&case);
    p.num_inference_steps = 5;
    p.num_images_per_prompt = 2;
    p.latents = None;
    let mut cb = Cutoff {
        at: 2,
        seen: Vec::new(),
    };
    sd::prepare(&m, &p).unwrap().run(&mut cb).unwrap();
    assert_eq!(
        cb.seen,
        vec![
            (0, true, 4),
            (1, true, 4),
            (2, true, 4),
            (3, false, 2),
            (4, false, 2)
        ]
    );
}

#[test]
fn prompt_embeds_can_replace_the_prompt() {
    let m = model();
    let case = Case::load("tiny-sd15", "ddim-10");
    let embeds = case.step_tensor(0, &["callback_in", "prompt_embeds"]);
    let mut p = params(&case);
    p.prompt = String::new();
    p.prompt_embeds = Some(embeds.narrow(0, 1, 1).unwrap());
    p.negative_prompt_embeds = Some(embeds.narrow(0, 0, 1).unwrap());
    p.num_inference_steps = 10;
    let out = sd::prepare(&m, &p).unwrap().run(&mut NoCallback).unwrap();
    assert!(rel_diff(&out.latents, &case.tensor("final.latents")) <= 1e-5);
}
