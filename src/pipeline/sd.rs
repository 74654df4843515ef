//! diffusers' StableDiffusionPipeline (SD 1.x / 2.x), step for step.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};

use super::session::{Session, SessionParts};
use super::PipelineError;
use crate::models::lora::Scale;
use crate::models::pipeline_model::StableDiffusionModel;
use crate::rng::NoiseGenerator;
use crate::schedulers::{self, SchedulerOptions};

/// A validated generation request, in pipeline terms.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// The prompt (ignored when `prompt_embeds` is given).
    pub prompt: String,
    /// The negative prompt; `None` is diffusers' `None` (for SD 1.x/2.x the same as "").
    pub negative_prompt: Option<String>,
    /// Precomputed prompt embeddings `[B, S, D]` instead of the prompt.
    pub prompt_embeds: Option<Tensor>,
    /// Precomputed negative embeddings, same shape as `prompt_embeds`.
    pub negative_prompt_embeds: Option<Tensor>,
    /// Denoising steps.
    pub num_inference_steps: usize,
    /// Initial guidance scale (CFG when > 1).
    pub guidance_scale: f64,
    /// diffusers' guidance_rescale (0: off).
    pub guidance_rescale: f64,
    /// Output width in pixels.
    pub width: usize,
    /// Output height in pixels.
    pub height: usize,
    /// Seed of the documented generator (initial noise, then sampler noise).
    pub seed: u64,
    /// Scheduler name ("" = the model's own).
    pub scheduler: String,
    /// Images per prompt.
    pub num_images_per_prompt: usize,
    /// Initial latents `[B*N, C, H/8, W/8]` instead of seeded noise (unscaled, like diffusers' `latents=`).
    pub latents: Option<Tensor>,
    /// DDIM eta.
    pub eta: f64,
    /// Whether to VAE-decode to PNG (false: latents only).
    pub decode: bool,
    /// The model's LoRAs this generation applies.
    pub loras: Vec<LoraUse>,
    /// Guidance the loop changes by itself.
    pub guidance_plan: GuidancePlan,
}

/// Where a server-side CFG cutoff falls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cutoff {
    /// At step `int(num_timesteps * ratio)`, as diffusers' `SDCFGCutoffCallback`.
    Ratio(f64),
    /// At this step index.
    Index(usize),
}

impl Cutoff {
    /// The step index, for a run of `num_timesteps` steps.
    pub fn step(self, num_timesteps: usize) -> usize {
        match self {
            // diffusers: `int(pipeline.num_timesteps * cutoff_step_ratio)`.
            Cutoff::Ratio(r) => (num_timesteps as f64 * r) as usize,
            Cutoff::Index(i) => i,
        }
    }
}

/// Server-side guidance: a CFG cutoff and a per-step guidance schedule, applied by the loop.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuidancePlan {
    /// Turn CFG off after this step, keeping the conditional half of the embeddings.
    pub cfg_cutoff: Option<Cutoff>,
    /// One guidance scale per timestep (replaces the request's guidance scale).
    pub schedule: Option<Vec<f64>>,
    /// CFG only at steps whose sigma lies in `[lo, hi]` (open where `None`).
    pub interval: Option<(Option<f64>, Option<f64>)>,
}

/// A LoRA a generation applies: its adapter index in the model and its UNet scale per step.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraUse {
    /// Index into the model's `loras`.
    pub adapter: usize,
    /// The scale at steps `schedule` does not cover.
    pub scale: f64,
    /// One scale per step, when given.
    pub schedule: Option<Vec<f64>>,
}

impl LoraUse {
    /// The UNet scale at `step`.
    pub fn at(&self, step: usize) -> f64 {
        self.schedule
            .as_ref()
            .and_then(|s| s.get(step).copied())
            .unwrap_or(self.scale)
    }
}

/// The text encoders' adapter scales for a generation: each LoRA's step-0 scale (the prompt is
/// encoded once, before the loop, as in diffusers).
fn text_lora_scales(model: &StableDiffusionModel, loras: &[LoraUse]) -> Vec<Option<Scale>> {
    let mut scales = vec![None; model.loras.len()];
    for l in loras {
        if let Some(slot) = scales.get_mut(l.adapter) {
            *slot = Some(Scale::Uniform(l.at(0)));
        }
    }
    scales
}

impl GenerateParams {
    /// A text-to-image request with diffusers' defaults for everything but the prompt, steps and
    /// size: guidance 7.5, the model's scheduler, one image, seed 0, decoded to PNG.
    pub fn text(prompt: &str, num_inference_steps: usize, width: usize, height: usize) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            num_inference_steps,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            width,
            height,
            seed: 0,
            scheduler: String::new(),
            num_images_per_prompt: 1,
            latents: None,
            eta: 0.0,
            decode: true,
            loras: Vec::new(),
            guidance_plan: GuidancePlan::default(),
        }
    }
}

/// Timings of one generation, in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Prompt encoding.
    pub encode_ms: f64,
    /// The whole denoising loop, callback waits included.
    pub denoise_ms: f64,
    /// Time inside the callback (waiting for replies), part of `denoise_ms`.
    pub callback_wait_ms: f64,
    /// VAE decode and image encoding.
    pub decode_ms: f64,
}

/// One encoded output image.
#[derive(Clone, Debug)]
pub struct EncodedImage {
    /// PNG bytes.
    pub png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// What a finished generation produced.
#[derive(Debug)]
pub struct GenerationOutput {
    /// PNG images (empty when decoding was not asked for).
    pub images: Vec<EncodedImage>,
    /// The final latents, before VAE scaling (diffusers' output_type="latent").
    pub latents: Tensor,
    /// Whether a callback interrupted the loop.
    pub interrupted: bool,
    /// Where the time went.
    pub timings: Timings,
}

fn invalid(field: &str, reason: impl Into<String>) -> PipelineError {
    PipelineError::InvalidRequest {
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn run_encoder(
    tokenizer: &crate::models::tokenizer::ClipTokenizer,
    encoder: &crate::models::clip::ClipTextModel,
    device: &Device,
    text: &str,
) -> Result<crate::models::clip::ClipTextOutput, PipelineError> {
    let ids = tokenizer.encode(text)?;
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), device)?;
    Ok(encoder.forward(&ids)?)
}

/// Encodes `text` like diffusers' `encode_prompt`: `([1, 77, D], pooled)` in f32. SD 1.x/2.x use
/// the text encoder's last hidden state and have no pooled output; SDXL concatenates both
/// encoders' penultimate hidden states and pools with `text_encoder_2`'s projection.
fn encode_text(
    model: &StableDiffusionModel,
    text: &str,
) -> Result<(Tensor, Option<Tensor>), PipelineError> {
    let first = run_encoder(&model.tokenizer, &model.text_encoder, &model.device, text)?;
    match &model.encoder_2 {
        None => Ok((first.last_hidden_state.to_dtype(DType::F32)?, None)),
        Some(e2) => {
            let second = run_encoder(&e2.tokenizer, &e2.text_encoder, &model.device, text)?;
            let embeds = Tensor::cat(
                &[
                    &first.penultimate_hidden_state,
                    &second.penultimate_hidden_state,
                ],
                D::Minus1,
            )?
            .to_dtype(DType::F32)?;
            let pooled = second
                .text_embeds
                .ok_or_else(|| PipelineError::InvalidRequest {
                    field: "model".into(),
                    reason: "text_encoder_2 has no projection".into(),
                })?;
            Ok((embeds, Some(pooled.to_dtype(DType::F32)?)))
        }
    }
}

/// `[B, P]` -> `[B*N, P]` with each prompt's row repeated N times in a row.
fn repeat_rows_per_prompt(t: &Tensor, n: usize) -> Result<Tensor, PipelineError> {
    if n == 1 {
        return Ok(t.clone());
    }
    let (b, p) = t.dims2()?;
    Ok(t.unsqueeze(1)?
        .broadcast_as((b, n, p))?
        .contiguous()?
        .reshape((b * n, p))?)
}

/// `[B, S, D]` -> `[B*N, S, D]` with each prompt's rows repeated N times in a row (diffusers' order).
fn repeat_per_prompt(t: &Tensor, n: usize) -> Result<Tensor, PipelineError> {
    if n == 1 {
        return Ok(t.clone());
    }
    let (b, s, d) = t.dims3()?;
    Ok(t.unsqueeze(1)?
        .broadcast_as((b, n, s, d))?
        .contiguous()?
        .reshape((b * n, s, d))?)
}

/// diffusers' `rescale_noise_cfg`: rescales the guided prediction to the conditional one's std.
pub(super) fn rescale_noise_cfg(
    cfg: &Tensor,
    text: &Tensor,
    rescale: f64,
) -> Result<Tensor, PipelineError> {
    let std = |t: &Tensor| -> candle_core::Result<Tensor> {
        // torch.std over all dims but the batch, unbiased.
        let b = t.dim(0)?;
        let flat = t.reshape((b, ()))?;
        let n = flat.dim(1)? as f64;
        let mean = flat.mean_keepdim(1)?;
        let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n - 1.0))?;
        var.sqrt()
    };
    let rank = cfg.rank();
    let shape_b: Vec<usize> = std::iter::once(cfg.dim(0)?)
        .chain(std::iter::repeat_n(1, rank - 1))
        .collect();
    let std_text = std(text)?.reshape(shape_b.as_slice())?;
    let std_cfg = std(cfg)?.reshape(shape_b.as_slice())?;
    let rescaled = cfg.broadcast_mul(&std_text.broadcast_div(&std_cfg)?)?;
    Ok(((rescaled * rescale)? + (cfg * (1.0 - rescale))?)?)
}

/// Prepares a generation: checks the request against the model, encodes the prompt, builds the
/// scheduler and the initial latents.
pub fn prepare<'m>(
    model: &'m StableDiffusionModel,
    params: &GenerateParams,
) -> Result<Session<'m>, PipelineError> {
    let device = &model.device;
    let vsf = model.vae_scale_factor();
    if params.width == 0
        || params.height == 0
        || params.width % vsf != 0
        || params.height % vsf != 0
    {
        return Err(invalid(
            "width/height",
            format!(
                "{}x{} must be positive multiples of {vsf}",
                params.width, params.height
            ),
        ));
    }
    let n_img = params.num_images_per_prompt.max(1);
    // An unknown name fails in `build` with the list of valid names.
    let scheduler_name = if params.scheduler.is_empty() {
        model.defaults.scheduler
    } else {
        params.scheduler.as_str()
    };
    let scheduler = schedulers::build(
        scheduler_name,
        &model.scheduler_config,
        params.num_inference_steps,
        &SchedulerOptions { eta: params.eta },
    )
    .map_err(|e| invalid("scheduler", e.to_string()))?;

    if let Some(l) = params.loras.iter().find(|l| l.adapter >= model.loras.len()) {
        return Err(invalid(
            "loras",
            format!(
                "adapter {} of a model with {}",
                l.adapter,
                model.loras.len()
            ),
        ));
    }
    let text_scales = text_lora_scales(model, &params.loras);

    // Prompt embeddings, diffusers' encode_prompt.
    let t0 = Instant::now();
    // A schedule may turn CFG on at any step: then the negative conditioning is needed too.
    let initial_guidance = params
        .guidance_plan
        .schedule
        .as_ref()
        .and_then(|s| s.first().copied())
        .unwrap_or(params.guidance_scale);
    let cfg = initial_guidance > 1.0
        || params
            .guidance_plan
            .schedule
            .as_ref()
            .is_some_and(|s| s.iter().any(|&g| g > 1.0));
    let hidden = model.text_encoder_hidden_size();
    let check_embeds = |field: &str, t: &Tensor| -> Result<(), PipelineError> {
        match t.dims() {
            [b, s, d] if *b >= 1 && *s >= 1 && *d == hidden => Ok(()),
            dims => Err(invalid(
                field,
                format!("shape {dims:?} must be [batch, seq, {hidden}]"),
            )),
        }
    };
    let sdxl = model.encoder_2.is_some();
    if sdxl && params.prompt_embeds.is_some() {
        return Err(invalid(
            "prompt_embeds",
            "SDXL also needs pooled prompt embeddings, which requests cannot carry yet; send a prompt",
        ));
    }
    let (positive, pooled) = match &params.prompt_embeds {
        Some(pe) => {
            check_embeds("prompt_embeds", pe)?;
            (pe.to_dtype(DType::F32)?.to_device(device)?, None)
        }
        None => model
            .lora_scales
            .during(text_scales.clone(), || encode_text(model, &params.prompt))?,
    };
    let b = positive.dim(0)?;
    let negative: Option<(Tensor, Option<Tensor>)> = if !cfg {
        None
    } else if let Some(ne) = &params.negative_prompt_embeds {
        check_embeds("negative_prompt_embeds", ne)?;
        if ne.dims() != positive.dims() {
            return Err(invalid(
                "negative_prompt_embeds",
                format!(
                    "shape {:?} must equal prompt_embeds' shape {:?}",
                    ne.dims(),
                    positive.dims()
                ),
            ));
        }
        Some((ne.to_dtype(DType::F32)?.to_device(device)?, None))
    } else if sdxl && params.negative_prompt.is_none() && model.force_zeros_for_empty_prompt {
        // diffusers' force_zeros_for_empty_prompt: no negative prompt means zero conditioning.
        Some((
            positive.zeros_like()?,
            pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
        ))
    } else {
        let text = params.negative_prompt.as_deref().unwrap_or("");
        let (one, one_pooled) = model
            .lora_scales
            .during(text_scales.clone(), || encode_text(model, text))?;
        if one.dim(1)? != positive.dim(1)? {
            return Err(invalid(
                "prompt_embeds",
                format!(
                    "sequence length {} differs from the tokenizer's {}; pass negative_prompt_embeds too",
                    positive.dim(1)?,
                    one.dim(1)?
                ),
            ));
        }
        let one = if b == 1 {
            one
        } else {
            repeat_per_prompt(&one, b)?
        };
        Some((one, one_pooled))
    };
    let positive = repeat_per_prompt(&positive, n_img)?;
    let pooled = pooled
        .map(|p| repeat_rows_per_prompt(&p, n_img))
        .transpose()?;
    let (negative, negative_pooled) = match negative {
        Some((n, np)) => (
            Some(repeat_per_prompt(&n, n_img)?),
            np.map(|p| repeat_rows_per_prompt(&p, n_img)).transpose()?,
        ),
        None => (None, None),
    };
    let prompt_embeds = match &negative {
        Some(neg) => Tensor::cat(&[neg, &positive], 0)?,
        None => positive,
    };
    // SDXL micro-conditioning: pooled text embeds and (original size, crop, target size).
    let (add_text_embeds, add_time_ids) = match pooled {
        Some(pooled) => {
            let (h, w) = (params.height as f32, params.width as f32);
            let ids = Tensor::new(&[[h, w, 0.0, 0.0, h, w]], device)?;
            model
                .check_added_conditions(pooled.dim(1)?, 6)
                .map_err(|reason| invalid("model", reason))?;
            let text = match &negative_pooled {
                Some(np) => Tensor::cat(&[np, &pooled], 0)?,
                None => pooled,
            };
            // diffusers: cat([negative, positive]).repeat(batch, 1): rows alternate under CFG.
            let rows = if negative.is_some() {
                Tensor::cat(&[&ids, &ids], 0)?
            } else {
                ids
            };
            let times = rows.repeat((b * n_img, 1))?;
            (Some(text), Some(times))
        }
        None => (None, None),
    };
    let negative = if sdxl { None } else { negative };
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Initial latents.
    let batch = b * n_img;
    let shape = (
        batch,
        model.unet_in_channels(),
        params.height / vsf,
        params.width / vsf,
    );
    let mut noise = NoiseGenerator::new(params.seed);
    let latents = match &params.latents {
        Some(l) => {
            let want = [shape.0, shape.1, shape.2, shape.3];
            if l.dims() != want {
                return Err(invalid(
                    "latents",
                    format!("shape {:?} must be {want:?} for this request", l.dims()),
                ));
            }
            l.to_dtype(DType::F32)?.to_device(device)?
        }
        None => {
            let v = noise.randn_vec(shape.0 * shape.1 * shape.2 * shape.3);
            Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?
        }
    };
    let latents = (latents * scheduler.init_noise_sigma())?;
    let sigmas = schedulers::step_sigmas(
        scheduler.as_ref(),
        &schedulers::config_for_name(scheduler_name, &model.scheduler_config),
    )
    .map_err(|e| invalid("scheduler", e.to_string()))?;
    Ok(Session::new(SessionParts {
        model,
        scheduler,
        noise: Box::new(noise),
        latents,
        prompt_embeds,
        negative_prompt_embeds: negative,
        add_text_embeds,
        add_time_ids,
        guidance_scale: initial_guidance,
        guidance_rescale: params.guidance_rescale,
        batch,
        decode: params.decode,
        encode_ms,
        loras: params.loras.clone(),
        guidance_plan: params.guidance_plan.clone(),
        sigmas,
    }))
}

/// VAE-decodes latents and encodes each image as PNG, the way diffusers' `output_type="pil"` does:
/// `(vae.decode(latents / scaling_factor) / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)` (ties to even).
pub fn decode_images(
    model: &StableDiffusionModel,
    latents: &Tensor,
) -> Result<Vec<super::sd::EncodedImage>, PipelineError> {
    let image = decode_to_unit(model, latents)?;
    let (b, c, h, w) = image.dims4()?;
    let hwc = (image.permute((0, 2, 3, 1))? * 255.0)?.contiguous()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let vals = hwc.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = vals.iter().map(|v| v.round_ties_even() as u8).collect();
        let color = match c {
            3 => image::ExtendedColorType::Rgb8,
            1 => image::ExtendedColorType::L8,
            4 => image::ExtendedColorType::Rgba8,
            _ => {
                return Err(PipelineError::Image(format!(
                    "cannot encode an image with {c} channels"
                )))
            }
        };
        let mut png = Vec::new();
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut png),
            &bytes,
            w as u32,
            h as u32,
            color,
        )
        .map_err(|e| PipelineError::Image(e.to_string()))?;
        out.push(EncodedImage {
            png,
            width: w as u32,
            height: h as u32,
        });
    }
    Ok(out)
}

/// The decoded image batch as f32 NCHW in [0, 1] (diffusers' `output_type="pt"` values).
pub fn decode_to_unit(
    model: &StableDiffusionModel,
    latents: &Tensor,
) -> Result<Tensor, PipelineError> {
    let vae_dtype = model.vae_dtype;
    let mut z = (latents / model.vae_config.scaling_factor)?;
    if let Some(shift) = model.vae_config.shift_factor {
        z = (z + shift)?;
    }
    let x = model
        .vae
        .decode(&z.to_dtype(vae_dtype)?)?
        .to_dtype(DType::F32)?;
    Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_unbiased(t: &Tensor) -> f64 {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    }

    #[test]
    fn guidance_rescale_matches_diffusers_formula() {
        let dev = Device::Cpu;
        let text = Tensor::new(&[[1.0f32, 2.0, 4.0, 7.0]], &dev).unwrap();
        let cfg = Tensor::new(&[[3.0f32, -1.0, 8.0, 0.5]], &dev).unwrap();
        // Full rescale: the result has the conditional prediction's std.
        let full = rescale_noise_cfg(&cfg, &text, 1.0).unwrap();
        assert!((std_unbiased(&full) - std_unbiased(&text)).abs() < 1e-5);
        // Partial: phi * rescaled + (1 - phi) * cfg, element by element.
        let phi = 0.7;
        let ratio = std_unbiased(&text) / std_unbiased(&cfg);
        let got: Vec<f32> = rescale_noise_cfg(&cfg, &text, phi)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, c) in got.iter().zip([3.0f64, -1.0, 8.0, 0.5]) {
            let want = phi * c * ratio + (1.0 - phi) * c;
            assert!((*g as f64 - want).abs() < 1e-5, "{g} vs {want}");
        }
    }

    #[test]
    fn repeat_per_prompt_keeps_each_prompts_copies_together() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[[1f32]], [[2f32]]], &dev).unwrap();
        let r: Vec<f32> = repeat_per_prompt(&t, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r, vec![1., 1., 1., 2., 2., 2.]);
    }
}
