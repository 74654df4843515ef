//! A generation as a resumable state machine: prepared (prompt encoded, latents drawn), then
//! stepped one denoising step at a time, alone or batched with other sessions of the same model
//! in one UNet call, then decoded. Between steps the caller may read the callback tensors and
//! apply a [`StepControl`]; nothing here waits for anyone.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::sd::{
    decode_images, rescale_noise_cfg, GenerationOutput, GuidancePlan, LoraUse, Timings,
};
use super::{CallbackTensors, PipelineError, StepCallback, StepControl, StepState};
use crate::models::lora::Scale;
use crate::models::pipeline_model::StableDiffusionModel;
use crate::models::unet::AddedConditions;
use crate::rng::NoiseSource;
use crate::schedulers::Scheduler;

/// Everything `prepare` computed, handed to [`Session::new`].
pub(super) struct SessionParts<'m> {
    pub(super) model: &'m StableDiffusionModel,
    pub(super) scheduler: Box<dyn Scheduler>,
    pub(super) noise: Box<dyn NoiseSource + Send>,
    pub(super) latents: Tensor,
    pub(super) prompt_embeds: Tensor,
    pub(super) negative_prompt_embeds: Option<Tensor>,
    pub(super) add_text_embeds: Option<Tensor>,
    pub(super) add_time_ids: Option<Tensor>,
    pub(super) guidance_scale: f64,
    pub(super) guidance_rescale: f64,
    pub(super) batch: usize,
    pub(super) decode: bool,
    pub(super) encode_ms: f64,
    pub(super) loras: Vec<LoraUse>,
    pub(super) guidance_plan: GuidancePlan,
    pub(super) sigmas: Vec<f64>,
}

/// What sessions must share to run in one UNet call: the model (and so its dtype), the latents'
/// `[C, H, W]`, the conditioning's `[tokens, width]`, and whether SDXL's added conditions exist.
/// Everything else (scheduler, timestep, guidance, CFG, images per prompt) may differ.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchKey {
    model: usize,
    latent: Vec<usize>,
    context: Vec<usize>,
    added: bool,
}

/// The last step a session ran, as its callback reports it.
#[derive(Clone, Copy, Debug)]
struct LastStep {
    index: usize,
    timestep: f64,
    cfg: bool,
    ms: f64,
}

/// A step held between guidance and its scheduler step (the AFTER_GUIDANCE phase).
struct Guided {
    /// The guided (and rescaled) noise prediction the scheduler step takes.
    noise_pred: Tensor,
    /// The UNet's unconditional and conditional halves, under CFG.
    halves: Option<(Tensor, Tensor)>,
    /// The scheduler's x0 estimate from `noise_pred`.
    x0: Tensor,
    cfg: bool,
    ms: f64,
}

/// One generation between `prepare` and decode; see the module docs.
pub struct Session<'m> {
    model: &'m StableDiffusionModel,
    scheduler: Box<dyn Scheduler>,
    noise: Box<dyn NoiseSource + Send>,
    latents: Tensor,
    prompt_embeds: Tensor,
    negative_prompt_embeds: Option<Tensor>,
    add_text_embeds: Option<Tensor>,
    add_time_ids: Option<Tensor>,
    guidance_scale: f64,
    guidance_rescale: f64,
    batch: usize,
    decode: bool,
    timesteps: Vec<f64>,
    /// The next step to run.
    next: usize,
    interrupted: bool,
    /// The UNet's conditioning in the compute dtype; `None` after a reply replaced embeddings.
    conditions: Option<(Tensor, Option<AddedConditions>)>,
    last: Option<LastStep>,
    encode_ms: f64,
    first_step_at: Option<Instant>,
    last_step_done_at: Option<Instant>,
    callback_wait_ms: f64,
    /// The LoRAs applied and their scales per step.
    loras: Vec<LoraUse>,
    /// The step after which CFG is cut off, until a reply changes guidance.
    cfg_cutoff: Option<usize>,
    /// Guidance per timestep, until a reply changes guidance.
    guidance_schedule: Option<Vec<f64>>,
    /// CFG only while sigma is in this interval, until a reply changes guidance.
    guidance_interval: Option<(Option<f64>, Option<f64>)>,
    /// Each step's sigma.
    sigmas: Vec<f64>,
    /// Whether the next step stops after guidance (see [`Session::hold_after_guidance`]).
    hold_guidance: bool,
    /// The step in progress, held after guidance.
    guided: Option<Guided>,
    /// Whether the next step keeps its x0 (see [`Session::keep_x0`]).
    keep_x0: bool,
    /// The x0 estimate of the last step, when it was kept.
    last_x0: Option<Tensor>,
}

impl<'m> Session<'m> {
    pub(super) fn new(p: SessionParts<'m>) -> Self {
        let timesteps = p.scheduler.timesteps().to_vec();
        let timesteps_len = timesteps.len();
        Self {
            model: p.model,
            scheduler: p.scheduler,
            noise: p.noise,
            latents: p.latents,
            prompt_embeds: p.prompt_embeds,
            negative_prompt_embeds: p.negative_prompt_embeds,
            add_text_embeds: p.add_text_embeds,
            add_time_ids: p.add_time_ids,
            guidance_scale: p.guidance_scale,
            guidance_rescale: p.guidance_rescale,
            batch: p.batch,
            decode: p.decode,
            timesteps,
            next: 0,
            interrupted: false,
            conditions: None,
            last: None,
            encode_ms: p.encode_ms,
            first_step_at: None,
            last_step_done_at: None,
            callback_wait_ms: 0.0,
            loras: p.loras,
            cfg_cutoff: p.guidance_plan.cfg_cutoff.map(|c| c.step(timesteps_len)),
            guidance_schedule: p.guidance_plan.schedule,
            guidance_interval: p.guidance_plan.interval,
            sigmas: p.sigmas,
            hold_guidance: false,
            guided: None,
            keep_x0: false,
            last_x0: None,
        }
    }

    /// Whether the next step keeps the sampler's x0 estimate (for a preview of it), readable
    /// after the step as [`Session::last_x0`].
    pub fn keep_x0(&mut self, keep: bool) {
        self.keep_x0 = keep;
        if !keep {
            self.last_x0 = None;
        }
    }

    /// The last step's x0 estimate, when [`Session::keep_x0`] asked for it.
    pub fn last_x0(&self) -> Option<&Tensor> {
        self.last_x0.as_ref()
    }

    /// The latents `[B, C, h, w]` as the loop holds them (after the last step).
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// Whether the next [`step_batch`] stops this session after guidance, before its scheduler
    /// step, so that the guided noise prediction can be read and replaced
    /// ([`Session::guided_tensors`], then [`Session::finish_guided`]).
    pub fn hold_after_guidance(&mut self, hold: bool) {
        self.hold_guidance = hold;
    }

    /// Whether a step is held after guidance.
    pub fn is_guided(&self) -> bool {
        self.guided.is_some()
    }

    /// The tensors of the held step: the callback tensors (latents are x_t, the scheduler step's
    /// input), `noise_pred`, `pred_original_sample` and, under CFG, `noise_pred_uncond` and
    /// `noise_pred_text`. Empty when no step is held.
    pub fn guided_tensors(&self) -> CallbackTensors {
        let Some(g) = &self.guided else {
            return CallbackTensors::new();
        };
        let mut m = self.callback_tensors();
        m.insert("noise_pred".into(), g.noise_pred.clone());
        m.insert("pred_original_sample".into(), g.x0.clone());
        if let Some((uncond, text)) = &g.halves {
            m.insert("noise_pred_uncond".into(), uncond.clone());
            m.insert("noise_pred_text".into(), text.clone());
        }
        m
    }

    /// The state of the held step over `tensors` (from [`Session::guided_tensors`]).
    pub fn guided_state<'a>(&self, tensors: &'a CallbackTensors) -> Option<StepState<'a>> {
        let g = self.guided.as_ref()?;
        Some(StepState {
            step_index: self.next,
            timestep: self.timesteps[self.next],
            num_timesteps: self.timesteps.len(),
            guidance_scale: self.guidance_scale,
            do_classifier_free_guidance: g.cfg,
            tensors,
            step_ms: g.ms,
            batch: self.batch,
        })
    }

    /// The state before the next step's UNet (the STEP_BEGIN phase) over `tensors` (from
    /// [`Session::callback_tensors`]): the guidance and CFG that step will use. `None` when the
    /// loop is over.
    pub fn begin_state<'a>(&self, tensors: &'a CallbackTensors) -> Option<StepState<'a>> {
        if self.is_done() {
            return None;
        }
        Some(StepState {
            step_index: self.next,
            timestep: self.timesteps[self.next],
            num_timesteps: self.timesteps.len(),
            guidance_scale: self.guidance_scale,
            do_classifier_free_guidance: self.cfg(),
            tensors,
            step_ms: 0.0,
            batch: self.batch,
        })
    }

    /// Ends the held step: its scheduler step on `noise_pred` (a replacement, else the guided
    /// prediction), then the step's bookkeeping and the server's plan.
    pub fn finish_guided(&mut self, noise_pred: Option<Tensor>) -> Result<(), PipelineError> {
        let Some(g) = self.guided.take() else {
            return Err(PipelineError::InvalidRequest {
                field: "noise_pred".into(),
                reason: "no step is held after guidance".into(),
            });
        };
        let (eps, x0) = match noise_pred {
            Some(t) => (t.to_dtype(DType::F32)?.to_device(&self.model.device)?, None),
            None => (g.noise_pred, Some(g.x0)),
        };
        if self.keep_x0 {
            self.last_x0 = Some(match x0 {
                Some(x0) => x0,
                None => self
                    .scheduler
                    .pred_original_sample(&eps, self.next, &self.latents)?,
            });
        }
        self.advance(&eps)?;
        self.end_step(g.cfg, g.ms, Instant::now())
    }

    /// The LoRAs this session applies, with their current scales.
    pub fn loras(&self) -> &[LoraUse] {
        &self.loras
    }

    /// The model this session runs on.
    pub fn model(&self) -> &'m StableDiffusionModel {
        self.model
    }

    /// The scheduler's timesteps, in loop order.
    pub fn timesteps(&self) -> Vec<f64> {
        self.timesteps.clone()
    }

    /// `len(scheduler.timesteps)`.
    pub fn num_timesteps(&self) -> usize {
        self.timesteps.len()
    }

    /// Replaces the sampler noise source (by default the request seed's generator, continuing
    /// after the initial latents); tests use it to replay noise recorded from diffusers.
    pub fn set_noise_source(&mut self, noise: Box<dyn NoiseSource + Send>) {
        self.noise = noise;
    }

    /// The name of the scheduler in use.
    pub fn scheduler_name(&self) -> &'static str {
        self.scheduler.name()
    }

    /// The step the next [`step_batch`] runs.
    pub fn next_step(&self) -> usize {
        self.next
    }

    /// Whether the loop is over: every step ran, or a reply interrupted it.
    pub fn is_done(&self) -> bool {
        self.interrupted || self.next >= self.timesteps.len()
    }

    /// Whether a reply interrupted the loop.
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Whether the next step runs classifier-free guidance (decided anew at every step): guidance
    /// above 1, and the step's sigma inside the plan's guidance interval if there is one.
    fn cfg(&self) -> bool {
        let in_interval = match (self.guidance_interval, self.sigmas.get(self.next)) {
            (Some((lo, hi)), Some(&s)) => {
                lo.is_none_or(|lo| s >= lo) && hi.is_none_or(|hi| s <= hi)
            }
            _ => true,
        };
        self.guidance_scale > 1.0
            && in_interval
            && self.model.unet_config.time_cond_proj_dim.is_none()
    }

    /// Each step's noise level sigma, as the sampler computes it.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The guidance scale the next step uses.
    pub fn guidance_scale(&self) -> f64 {
        self.guidance_scale
    }

    /// UNet rows the next step takes: `2 × batch` under CFG (`[uncond; cond]`), else `batch`.
    pub fn rows(&self) -> usize {
        if self.cfg() {
            2 * self.batch
        } else {
            self.batch
        }
    }

    /// Which sessions this one can share a UNet call with (see [`BatchKey`]).
    pub fn batch_key(&self) -> BatchKey {
        BatchKey {
            model: self.model as *const StableDiffusionModel as usize,
            latent: self.latents.dims().get(1..).unwrap_or_default().to_vec(),
            context: self
                .prompt_embeds
                .dims()
                .get(1..)
                .unwrap_or_default()
                .to_vec(),
            added: self.add_time_ids.is_some(),
        }
    }

    /// The latents' `[C, H, W]`: sessions of one model with the same shape decode together.
    pub fn latent_shape(&self) -> Vec<usize> {
        self.latents.dims().get(1..).unwrap_or_default().to_vec()
    }

    /// The callback tensors as the loop holds them now (before step 0: the initial ones).
    pub fn callback_tensors(&self) -> CallbackTensors {
        let mut m = CallbackTensors::new();
        m.insert("latents".into(), self.latents.clone());
        m.insert("prompt_embeds".into(), self.prompt_embeds.clone());
        if let Some(n) = &self.negative_prompt_embeds {
            m.insert("negative_prompt_embeds".into(), n.clone());
        }
        if let Some(t) = &self.add_text_embeds {
            m.insert("add_text_embeds".into(), t.clone());
        }
        if let Some(t) = &self.add_time_ids {
            m.insert("add_time_ids".into(), t.clone());
        }
        m
    }

    /// The state diffusers' callback sees after the last step, over `tensors` (from
    /// [`Session::callback_tensors`]); `None` before the first step.
    pub fn step_state<'a>(&self, tensors: &'a CallbackTensors) -> Option<StepState<'a>> {
        let last = self.last?;
        Some(StepState {
            step_index: last.index,
            timestep: last.timestep,
            num_timesteps: self.timesteps.len(),
            guidance_scale: self.guidance_scale,
            do_classifier_free_guidance: last.cfg,
            tensors,
            step_ms: last.ms,
            batch: self.batch,
        })
    }

    /// Adds time spent waiting for this session's client (reported in the timings).
    pub fn add_callback_wait(&mut self, ms: f64) {
        self.callback_wait_ms += ms;
    }

    /// Applies a validated control from the next step on (diffusers: the callback's returned
    /// tensors and pipeline attributes).
    pub fn apply(&mut self, control: StepControl) -> Result<(), PipelineError> {
        if let Some(g) = control.guidance_scale {
            // The client's guidance wins over the server's plan, from here on.
            self.guidance_scale = g;
            self.guidance_schedule = None;
            self.guidance_interval = None;
            self.cfg_cutoff = None;
        }
        self.interrupted |= control.interrupt;
        for (adapter, scale) in control.lora_scales {
            match self.loras.iter_mut().find(|l| l.adapter == adapter) {
                Some(l) => {
                    l.scale = scale;
                    l.schedule = None;
                }
                None => {
                    return Err(PipelineError::InvalidRequest {
                        field: "lora_scales".into(),
                        reason: format!("adapter {adapter} is not applied by this generation"),
                    })
                }
            }
        }
        for (name, t) in control.tensors {
            let t = t.to_dtype(DType::F32)?.to_device(&self.model.device)?;
            match name.as_str() {
                "latents" => self.latents = t,
                "prompt_embeds" => {
                    self.prompt_embeds = t;
                    self.conditions = None;
                }
                // Kept for later callbacks to read; like diffusers, the loop itself only uses prompt_embeds.
                "negative_prompt_embeds" => self.negative_prompt_embeds = Some(t),
                "add_text_embeds" => {
                    self.add_text_embeds = Some(t);
                    self.conditions = None;
                }
                "add_time_ids" => {
                    self.add_time_ids = Some(t);
                    self.conditions = None;
                }
                other => {
                    return Err(PipelineError::InvalidRequest {
                        field: format!("tensors[{other}]"),
                        reason: "not a callback tensor of this pipeline".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The server's plan after a step: the schedule's guidance for the next step, or the CFG
    /// cutoff (diffusers' `SDCFGCutoffCallback`, for any batch size: the conditional half of
    /// every CFG-batched tensor is kept).
    fn after_step_plan(&mut self) -> Result<(), PipelineError> {
        let done = self.next - 1;
        if self.cfg_cutoff == Some(done) {
            self.cfg_cutoff = None;
            self.guidance_schedule = None;
            self.guidance_interval = None;
            self.guidance_scale = 0.0;
            let b = self.batch;
            self.prompt_embeds = conditional_half(&self.prompt_embeds, b)?;
            if let Some(t) = &self.add_text_embeds {
                self.add_text_embeds = Some(conditional_half(t, b)?);
            }
            if let Some(t) = &self.add_time_ids {
                self.add_time_ids = Some(conditional_half(t, b)?);
            }
            self.conditions = None;
        } else if let Some(g) = self
            .guidance_schedule
            .as_ref()
            .and_then(|s| s.get(self.next).copied())
        {
            self.guidance_scale = g;
        }
        Ok(())
    }

    /// The UNet's conditioning for this step, in the compute dtype: prompt embeddings and SDXL's
    /// added conditions. A step without CFG while the embeddings are still CFG-batched (a
    /// schedule's guidance <= 1) takes their conditional half.
    fn conditions(
        &mut self,
        cfg: bool,
    ) -> Result<(Tensor, Option<AddedConditions>), PipelineError> {
        let (context, added) = self.all_conditions()?;
        if cfg {
            return Ok((context, added));
        }
        let b = self.batch;
        Ok((
            conditional_half(&context, b)?,
            added
                .map(|a| -> Result<AddedConditions, PipelineError> {
                    Ok(AddedConditions {
                        text_embeds: conditional_half(&a.text_embeds, b)?,
                        time_ids: conditional_half(&a.time_ids, b)?,
                    })
                })
                .transpose()?,
        ))
    }

    /// The conditioning as held (cached until a reply or the plan replaces it).
    fn all_conditions(&mut self) -> Result<(Tensor, Option<AddedConditions>), PipelineError> {
        if let Some(c) = &self.conditions {
            return Ok(c.clone());
        }
        let dtype = self.model.dtype;
        let added = match (&self.add_text_embeds, &self.add_time_ids) {
            (Some(text), Some(time)) => Some(AddedConditions {
                text_embeds: text.to_dtype(dtype)?,
                time_ids: time.to_dtype(dtype)?,
            }),
            _ => None,
        };
        let c = (self.prompt_embeds.to_dtype(dtype)?, added);
        self.conditions = Some(c.clone());
        Ok(c)
    }

    /// This step's UNet input rows (scaled by its own scheduler, in the compute dtype).
    fn input(&self, cfg: bool) -> Result<Tensor, PipelineError> {
        let x = if cfg {
            Tensor::cat(&[&self.latents, &self.latents], 0)?
        } else {
            self.latents.clone()
        };
        let x = self.scheduler.scale_model_input(&x, self.next)?;
        Ok(x.to_dtype(self.model.dtype)?)
    }

    /// Guidance (and rescale) on this session's slice of the UNet output: the noise prediction
    /// and, under CFG, the two halves it came from.
    fn guide(
        &self,
        eps: &Tensor,
        cfg: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>), PipelineError> {
        if !cfg {
            return Ok((eps.clone(), None));
        }
        let b = self.batch;
        let uncond = eps.narrow(0, 0, b)?;
        let text = eps.narrow(0, b, b)?;
        let guided = (&uncond + ((&text - &uncond)? * self.guidance_scale)?)?;
        let guided = if self.guidance_rescale > 0.0 {
            rescale_noise_cfg(&guided, &text, self.guidance_rescale)?
        } else {
            guided
        };
        Ok((guided, Some((uncond, text))))
    }

    /// The scheduler step of the step in progress on the noise prediction `eps`.
    fn advance(&mut self, eps: &Tensor) -> Result<(), PipelineError> {
        self.latents = self
            .scheduler
            .step(eps, self.next, &self.latents, self.noise.as_mut())?;
        Ok(())
    }

    /// The step in progress is over: record it, move on, and run the server's plan.
    fn end_step(&mut self, cfg: bool, ms: f64, done_at: Instant) -> Result<(), PipelineError> {
        self.last = Some(LastStep {
            index: self.next,
            timestep: self.timesteps[self.next],
            cfg,
            ms,
        });
        self.next += 1;
        self.last_step_done_at = Some(done_at);
        self.after_step_plan()
    }

    /// Decodes (when the request asked for images) and reports the run.
    pub fn finish(self) -> Result<GenerationOutput, PipelineError> {
        let model = self.model;
        let mut outputs = decode_batch(model, vec![self])?;
        Ok(outputs.remove(0))
    }

    fn timings(&self, decode_ms: f64) -> Timings {
        let denoise_ms = match (self.first_step_at, self.last_step_done_at) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e3,
            _ => 0.0,
        };
        Timings {
            encode_ms: self.encode_ms,
            denoise_ms,
            callback_wait_ms: self.callback_wait_ms,
            decode_ms,
        }
    }

    /// Runs the whole loop alone, calling `callback` after each step, then decodes: diffusers'
    /// `__call__` with `callback_on_step_end`, step for step.
    pub fn run(
        mut self,
        callback: &mut dyn StepCallback,
    ) -> Result<GenerationOutput, PipelineError> {
        while !self.is_done() {
            if let Some(stop) = callback.interruption() {
                return Err(stop.into());
            }
            let wanted = callback.wants(self.next);
            let ms = step_batch(&mut [&mut self], wanted)?;
            callback.step_finished(ms);
            if wanted {
                let tensors = self.callback_tensors();
                let Some(state) = self.step_state(&tensors) else {
                    continue;
                };
                let wait_start = Instant::now();
                let control = callback.on_step_end(&state)?;
                self.add_callback_wait(wait_start.elapsed().as_secs_f64() * 1e3);
                self.apply(control)?;
            }
        }
        self.finish()
    }
}

/// Runs one denoising step of every session in `sessions` in a single UNet call: rows packed per
/// session (`[uncond; cond]` under CFG, `cond` otherwise), each row with its own session's
/// timestep and conditioning; then, per session, its own guidance and scheduler step.
///
/// All sessions must share a [`BatchKey`] and none may be done. `sync` waits for the device
/// after the step (when a callback will read the tensors, so the step time is the device's).
/// Returns the call's time in milliseconds.
pub fn step_batch(sessions: &mut [&mut Session<'_>], sync: bool) -> Result<f64, PipelineError> {
    let Some(first) = sessions.first() else {
        return Ok(0.0);
    };
    let model = first.model;
    let key = first.batch_key();
    if let Some(s) = sessions
        .iter()
        .find(|s| s.batch_key() != key || s.is_done() || s.is_guided())
    {
        return Err(PipelineError::InvalidRequest {
            field: "batch".into(),
            reason: format!(
                "a session at step {} cannot join this batch (done: {})",
                s.next,
                s.is_done()
            ),
        });
    }
    let start = Instant::now();
    let cfgs: Vec<bool> = sessions.iter().map(|s| s.cfg()).collect();
    let mut inputs = Vec::with_capacity(sessions.len());
    let mut timesteps = Vec::new();
    let mut contexts = Vec::with_capacity(sessions.len());
    let mut texts = Vec::new();
    let mut times = Vec::new();
    for (s, &cfg) in sessions.iter_mut().zip(&cfgs) {
        s.first_step_at.get_or_insert(start);
        let x = s.input(cfg)?;
        timesteps.extend(std::iter::repeat_n(s.timesteps[s.next], x.dim(0)?));
        inputs.push(x);
        let (context, added) = s.conditions(cfg)?;
        contexts.push(context);
        if let Some(a) = added {
            texts.push(a.text_embeds);
            times.push(a.time_ids);
        }
    }
    // One session: no packing copies, so a session alone runs exactly as it always did.
    let pack = |parts: &[Tensor]| -> Result<Tensor, PipelineError> {
        Ok(match parts {
            [one] => one.clone(),
            many => Tensor::cat(many, 0)?,
        })
    };
    let x = pack(&inputs)?;
    let context = pack(&contexts)?;
    let added = if texts.is_empty() {
        None
    } else {
        Some(AddedConditions {
            text_embeds: pack(&texts)?,
            time_ids: pack(&times)?,
        })
    };
    let scales = unet_lora_scales(model, sessions, &inputs)?;
    let eps = model
        .lora_scales
        .during(scales, || {
            model
                .unet
                .forward_rows(&x, &timesteps, &context, added.as_ref())
        })?
        .to_dtype(DType::F32)?;
    let mut row = 0;
    for ((s, &cfg), input) in sessions.iter_mut().zip(&cfgs).zip(&inputs) {
        let n = input.dim(0)?;
        let slice = if n == eps.dim(0)? {
            eps.clone()
        } else {
            eps.narrow(0, row, n)?
        };
        row += n;
        let (noise_pred, halves) = s.guide(&slice, cfg)?;
        if s.hold_guidance {
            // Held for the AFTER_GUIDANCE phase: x0 now, while the scheduler state is the
            // step's own; the scheduler step waits for finish_guided.
            let x0 = s
                .scheduler
                .pred_original_sample(&noise_pred, s.next, &s.latents)?;
            s.guided = Some(Guided {
                noise_pred,
                halves,
                x0,
                cfg,
                ms: 0.0,
            });
        } else {
            if s.keep_x0 {
                s.last_x0 = Some(s.scheduler.pred_original_sample(
                    &noise_pred,
                    s.next,
                    &s.latents,
                )?);
            }
            s.advance(&noise_pred)?;
        }
    }
    if sync && !model.device.is_cpu() {
        // The one device synchronisation of a step that a callback reads: the kernels finish
        // here, so the step time is the device's and the callback time is the callback's.
        // Steps without a callback stay asynchronous.
        model.device.synchronize()?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let done_at = Instant::now();
    for (s, &cfg) in sessions.iter_mut().zip(&cfgs) {
        match &mut s.guided {
            Some(g) => g.ms = ms,
            None => s.end_step(cfg, ms, done_at)?,
        }
    }
    Ok(ms)
}

/// The conditional half (`[negative; positive]` → positive) of a CFG-batched tensor of `batch`
/// images; a tensor that is not doubled is already conditional-only.
fn conditional_half(t: &Tensor, batch: usize) -> Result<Tensor, PipelineError> {
    Ok(if t.dim(0)? == 2 * batch {
        t.narrow(0, batch, batch)?
    } else {
        t.clone()
    })
}

/// Each adapter's UNet scale for every row of this call (`None`: no row uses it), in the rows'
/// order: a session's rows (both CFG halves) take its scale at its own next step.
fn unet_lora_scales(
    model: &StableDiffusionModel,
    sessions: &[&mut Session<'_>],
    inputs: &[Tensor],
) -> Result<Vec<Option<Scale>>, PipelineError> {
    let n = model.loras.len();
    if n == 0 || sessions.iter().all(|s| s.loras.is_empty()) {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(n);
    for adapter in 0..n {
        let mut rows = Vec::new();
        for (s, input) in sessions.iter().zip(inputs) {
            let scale = s
                .loras
                .iter()
                .find(|l| l.adapter == adapter)
                .map(|l| l.at(s.next))
                .unwrap_or(0.0);
            rows.extend(std::iter::repeat_n(scale as f32, input.dim(0)?));
        }
        out.push(if rows.iter().all(|&r| r == 0.0) {
            None
        } else {
            let len = rows.len();
            Some(Scale::Rows(
                Tensor::from_vec(rows, (len, 1, 1), &model.device)?.to_dtype(model.dtype)?,
            ))
        });
    }
    Ok(out)
}

/// Decodes finished sessions of one model together: latents of equal shape go through the VAE
/// in one call, and each session gets its own images back. Returns the outputs in input order.
pub fn decode_batch<'m>(
    model: &'m StableDiffusionModel,
    sessions: Vec<Session<'m>>,
) -> Result<Vec<GenerationOutput>, PipelineError> {
    let start = Instant::now();
    let wanted: Vec<&Tensor> = sessions
        .iter()
        .filter(|s| s.decode)
        .map(|s| &s.latents)
        .collect();
    let same_shape = wanted
        .windows(2)
        .all(|w| w[0].dims().get(1..) == w[1].dims().get(1..));
    let mut images: Vec<Vec<super::sd::EncodedImage>> = Vec::new();
    if !wanted.is_empty() && same_shape {
        let all = match wanted.as_slice() {
            [one] => decode_images(model, one)?,
            many => decode_images(model, &Tensor::cat(many, 0)?)?,
        };
        let mut all = all.into_iter();
        for s in sessions.iter().filter(|s| s.decode) {
            images.push(all.by_ref().take(s.batch).collect());
        }
    } else {
        for l in wanted {
            images.push(decode_images(model, l)?);
        }
    }
    let decode_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut images = images.into_iter();
    Ok(sessions
        .into_iter()
        .map(|s| {
            let timings = s.timings(if s.decode { decode_ms } else { 0.0 });
            GenerationOutput {
                images: if s.decode {
                    images.next().unwrap_or_default()
                } else {
                    Vec::new()
                },
                interrupted: s.interrupted,
                latents: s.latents,
                timings,
            }
        })
        .collect())
}
