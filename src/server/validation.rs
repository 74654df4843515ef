//! Request validation: a wire `GenerateRequest` becomes pipeline parameters and a callback
//! subscription, or an error naming the field. Nothing heavy is allocated before the checks pass.

use std::time::Duration;

use crate::engine::{
    sorted, steps_in_range, EngineError, Hook, RequestTensors, Subscription, GUIDANCE_TENSORS,
};
use crate::pipeline::check_lora_scale;
use crate::pipeline::preview::PreviewSpec;
use crate::pipeline::sd::{Cutoff, GenerateParams, GuidancePlan, LoraUse};
use crate::proto;

/// Limits requests are checked against.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most denoising steps.
    pub max_steps: u32,
    /// Largest width or height in pixels.
    pub max_side: u32,
    /// Largest width × height in pixels.
    pub max_pixels: u64,
    /// Most images per request.
    pub max_images: u32,
    /// Longest prompt in bytes.
    pub max_prompt_bytes: usize,
    /// Largest tensor a client may send, in bytes.
    pub max_tensor_bytes: usize,
    /// Reply deadline when the request sets none.
    pub default_reply_timeout: Duration,
    /// Longest reply deadline a request may ask for.
    pub max_reply_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            max_side: 2048,
            max_pixels: 2048 * 2048,
            max_images: 16,
            max_prompt_bytes: 16 * 1024,
            max_tensor_bytes: 64 * 1024 * 1024,
            default_reply_timeout: Duration::from_secs(30),
            max_reply_timeout: Duration::from_secs(600),
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest {
        field: format!("start.{field}"),
        reason: reason.into(),
    }
}

/// An enum field set to a value this server does not know.
fn unknown(field: &str, value: i32) -> EngineError {
    invalid(field, format!("unknown value {value}"))
}

/// `value` (in `unit`) must not exceed `limit`.
fn at_most(field: &str, value: u64, limit: u64, unit: &str) -> Result<(), EngineError> {
    if value > limit {
        return Err(invalid(
            field,
            format!("{value}{unit} exceeds the limit of {limit}"),
        ));
    }
    Ok(())
}

/// A random u64 from the OS-seeded hasher keys (for unset seeds and request ids).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// The validated parts of a request.
#[derive(Debug)]
pub struct Validated {
    /// Pipeline parameters (request tensors not yet decoded).
    pub params: GenerateParams,
    /// The request's tensors, header-checked, decoded by the worker.
    pub tensors: RequestTensors,
    /// The callback subscription, when the request set `callback`.
    pub subscription: Option<Subscription>,
    /// Whether to send the final latents.
    pub return_latents: bool,
    /// The request as resolved, for `Completed.replay` (when `output.return_replay`).
    pub record: Option<proto::GenerateRequest>,
}

/// Checks `req` against the model card and limits.
pub fn validate(
    req: &proto::GenerateRequest,
    model: &proto::ModelInfo,
    limits: &Limits,
) -> Result<Validated, EngineError> {
    let prompt_bytes = limits.max_prompt_bytes as u64;
    at_most("prompt", req.prompt.len() as u64, prompt_bytes, " bytes")?;
    if let Some(n) = &req.negative_prompt {
        at_most("negative_prompt", n.len() as u64, prompt_bytes, " bytes")?;
    }
    // Headers only here (cheap, no allocation); the worker decodes the data.
    for (field, t) in [
        ("latents", &req.latents),
        ("prompt_embeds", &req.prompt_embeds),
        ("negative_prompt_embeds", &req.negative_prompt_embeds),
    ] {
        if let Some(t) = t {
            crate::tensor::check_header(t, limits.max_tensor_bytes)
                .map_err(|e| invalid(field, e.to_string()))?;
        }
    }
    if req.prompt_embeds.is_some() && !req.prompt.is_empty() {
        return Err(invalid(
            "prompt_embeds",
            "give either prompt or prompt_embeds, not both",
        ));
    }
    if req.negative_prompt_embeds.is_some() && req.negative_prompt.is_some() {
        return Err(invalid(
            "negative_prompt_embeds",
            "give either negative_prompt or negative_prompt_embeds, not both",
        ));
    }
    if req.negative_prompt_embeds.is_some() && req.prompt_embeds.is_none() {
        return Err(invalid(
            "negative_prompt_embeds",
            "only allowed together with prompt_embeds",
        ));
    }
    let steps = if req.num_inference_steps == 0 {
        model.default_steps
    } else {
        req.num_inference_steps
    };
    at_most(
        "num_inference_steps",
        steps.into(),
        limits.max_steps.into(),
        "",
    )?;
    let guidance = req.guidance_scale.unwrap_or(model.default_guidance_scale);
    if !guidance.is_finite() {
        return Err(invalid("guidance_scale", "must be finite"));
    }
    let guidance_rescale = req.guidance_rescale.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&guidance_rescale) {
        return Err(invalid("guidance_rescale", "must be in [0, 1]"));
    }
    let eta = req.eta.unwrap_or(0.0);
    if !eta.is_finite() || eta < 0.0 {
        return Err(invalid("eta", "must be finite and >= 0"));
    }
    let width = req.width.unwrap_or(model.default_width);
    let height = req.height.unwrap_or(model.default_height);
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 || v % 8 != 0 {
            return Err(invalid(
                name,
                format!("{v} must be a positive multiple of 8"),
            ));
        }
        at_most(name, v.into(), limits.max_side.into(), "")?;
    }
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(invalid(
            "width",
            format!(
                "{width}x{height} = {} pixels exceeds the limit of {}",
                width as u64 * height as u64,
                limits.max_pixels
            ),
        ));
    }
    let images = req.num_images_per_prompt.max(1);
    at_most(
        "num_images_per_prompt",
        images.into(),
        limits.max_images.into(),
        "",
    )?;
    if !req.scheduler.is_empty() && !model.schedulers.contains(&req.scheduler) {
        return Err(invalid(
            "scheduler",
            format!(
                "unknown scheduler `{}`; valid names: {}",
                req.scheduler,
                model.schedulers.join(", ")
            ),
        ));
    }
    let output = req.output.unwrap_or_default();
    let format = proto::ImageFormat::try_from(output.format)
        .map_err(|_| unknown("output.format", output.format))?;
    let decode = format != proto::ImageFormat::None;
    let subscription = req
        .callback
        .as_ref()
        .map(|c| validate_callback(c, model, limits, images as usize))
        .transpose()?;
    let loras = validate_loras(&req.loras, model)?;
    let guidance_plan = validate_guidance_plan(req.guidance_plan.as_ref())?;
    let params = GenerateParams {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        prompt_embeds: None,
        negative_prompt_embeds: None,
        num_inference_steps: steps as usize,
        guidance_scale: guidance as f64,
        guidance_rescale: guidance_rescale as f64,
        width: width as usize,
        height: height as usize,
        seed: req.seed.unwrap_or_else(random_u64),
        scheduler: req.scheduler.clone(),
        num_images_per_prompt: images as usize,
        latents: None,
        eta: eta as f64,
        decode,
        loras,
        guidance_plan,
    };
    let record = output.return_replay.then(|| resolved(req, model, &params));
    Ok(Validated {
        params,
        tensors: RequestTensors {
            latents: req.latents.clone(),
            prompt_embeds: req.prompt_embeds.clone(),
            negative_prompt_embeds: req.negative_prompt_embeds.clone(),
        },
        subscription,
        return_latents: output.return_latents || !decode,
        record,
    })
}

/// `req` with every default filled in from `params` (what validation resolved it to), for a
/// replay record: model id, seed, size, steps, guidance, images, eta, guidance_rescale, LoRA
/// scales. `scheduler` stays as given: "" is the model's own config, fixed by the model.
fn resolved(
    req: &proto::GenerateRequest,
    model: &proto::ModelInfo,
    params: &GenerateParams,
) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.id.clone(),
        num_inference_steps: params.num_inference_steps as u32,
        guidance_scale: Some(params.guidance_scale as f32),
        width: Some(params.width as u32),
        height: Some(params.height as u32),
        seed: Some(params.seed),
        num_images_per_prompt: params.num_images_per_prompt as u32,
        eta: Some(params.eta as f32),
        guidance_rescale: Some(params.guidance_rescale as f32),
        loras: req
            .loras
            .iter()
            .map(|l| proto::LoraRequest {
                scale: Some(l.scale.unwrap_or(1.0)),
                ..l.clone()
            })
            .collect(),
        callback: None,
        output: None,
        replay: None,
        ..req.clone()
    }
}

/// A replay request's generation: the record's request with the caller's `output`, and the
/// record's edits. The caller sets nothing else (the record is the whole request).
pub fn unwrap_replay(
    mut req: proto::GenerateRequest,
) -> Result<(proto::GenerateRequest, Option<Vec<proto::StepReply>>), EngineError> {
    let Some(record) = req.replay.take() else {
        return Ok((req, None));
    };
    let output = req.output.take();
    if req != proto::GenerateRequest::default() {
        return Err(invalid(
            "replay",
            "a replay request sets only `replay` and `output`: the record holds the rest",
        ));
    }
    if record.version != 1 {
        return Err(invalid(
            "replay.version",
            format!(
                "version {} is not known to this server (it reads 1)",
                record.version
            ),
        ));
    }
    let mut inner = *record
        .request
        .ok_or_else(|| invalid("replay.request", "the record has no request"))?;
    if inner.replay.is_some() || inner.callback.is_some() {
        return Err(invalid(
            "replay.request",
            "a recorded request has no callback and no replay of its own",
        ));
    }
    let mut last: Option<(u32, Hook)> = None;
    for (k, e) in record.edits.iter().enumerate() {
        let hook = Hook::from_wire(e.phase)
            .ok_or_else(|| unknown(&format!("replay.edits[{k}].phase"), e.phase))?;
        if last.is_some_and(|l| l >= (e.step_index, hook)) {
            return Err(invalid(
                &format!("replay.edits[{k}]"),
                "edits must come in loop order, one per step and phase",
            ));
        }
        last = Some((e.step_index, hook));
    }
    inner.output = output;
    Ok((inner, Some(record.edits)))
}

/// The subscription a replay runs under: the server waits (on itself) at every step and phase
/// an edit names, with the tensors the edits replace. Errors name the record.
pub fn replay_subscription(
    edits: &[proto::StepReply],
    model: &proto::ModelInfo,
    limits: &Limits,
    images: usize,
) -> Result<Option<Subscription>, EngineError> {
    if edits.is_empty() {
        return Ok(None);
    }
    let mut tensor_inputs: Vec<String> = Vec::new();
    for e in edits {
        for name in e.tensors.keys() {
            if !tensor_inputs.contains(name) {
                tensor_inputs.push(name.clone());
            }
        }
    }
    tensor_inputs.sort();
    let mut phases: Vec<i32> = edits
        .iter()
        .map(|e| Hook::from_wire(e.phase).unwrap_or(Hook::End).proto() as i32)
        .collect();
    phases.sort_unstable();
    phases.dedup();
    let c = proto::CallbackOptions {
        tensor_inputs,
        step_indices: sorted(&edits.iter().map(|e| e.step_index).collect::<Vec<_>>()),
        phases,
        ..Default::default()
    };
    validate_callback(&c, model, limits, images)
        .map(Some)
        .map_err(misfit)
}

/// An error of a replay's own subscription, said of the record.
pub fn misfit(e: EngineError) -> EngineError {
    match e {
        EngineError::InvalidRequest { field, reason } => EngineError::InvalidRequest {
            field: "start.replay.edits".into(),
            reason: format!(
                "the record does not fit this model: {}: {reason}",
                field.trim_start_matches("start.")
            ),
        },
        other => other,
    }
}

/// A request's LoRAs: names the model serves, each once, with finite bounded scales and a
/// schedule of one scale per step.
fn validate_loras(
    loras: &[proto::LoraRequest],
    model: &proto::ModelInfo,
) -> Result<Vec<LoraUse>, EngineError> {
    let mut out: Vec<LoraUse> = Vec::with_capacity(loras.len());
    for (i, l) in loras.iter().enumerate() {
        let field = |f: &str| format!("loras[{i}].{f}");
        let adapter = model
            .loras
            .iter()
            .position(|m| m.name == l.name)
            .ok_or_else(|| {
                let known: Vec<&str> = model.loras.iter().map(|m| m.name.as_str()).collect();
                invalid(
                    &field("name"),
                    format!(
                        "model `{}` has no LoRA `{}`; it serves: {}",
                        model.id,
                        l.name,
                        if known.is_empty() {
                            "none (serve --lora NAME=PATH)".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })?;
        if out.iter().any(|u| u.adapter == adapter) {
            return Err(invalid(
                &field("name"),
                format!("`{}` is listed twice", l.name),
            ));
        }
        let scale = l.scale.unwrap_or(1.0);
        check_lora_scale(scale).map_err(|why| invalid(&field("scale"), why))?;
        // Its length is checked against the timestep count with the step indices
        // (`check_schedules`), which needs the scheduler.
        let schedule = if l.schedule.is_empty() {
            None
        } else {
            for (k, s) in l.schedule.iter().enumerate() {
                check_lora_scale(*s)
                    .map_err(|why| invalid(&format!("loras[{i}].schedule[{k}]"), why))?;
            }
            Some(l.schedule.iter().map(|&s| s as f64).collect())
        };
        out.push(LoraUse {
            adapter,
            scale: scale as f64,
            schedule,
        });
    }
    Ok(out)
}

/// The server-side guidance plan: a cutoff ratio in [0, 1] or an index, finite guidance values
/// (the index and the schedule's length are checked against the timestep count later).
fn validate_guidance_plan(plan: Option<&proto::GuidancePlan>) -> Result<GuidancePlan, EngineError> {
    let Some(plan) = plan else {
        return Ok(GuidancePlan::default());
    };
    use proto::guidance_plan::CfgCutoff;
    let cfg_cutoff = match plan.cfg_cutoff {
        None => None,
        Some(CfgCutoff::CutoffStepRatio(r)) => {
            if !(0.0..=1.0).contains(&r) {
                return Err(invalid(
                    "guidance_plan.cutoff_step_ratio",
                    format!("{r} must be in [0, 1]"),
                ));
            }
            Some(Cutoff::Ratio(r as f64))
        }
        Some(CfgCutoff::CutoffStepIndex(i)) => Some(Cutoff::Index(i as usize)),
    };
    let schedule = if plan.schedule.is_empty() {
        None
    } else {
        if let Some(k) = plan.schedule.iter().position(|g| !g.is_finite()) {
            return Err(invalid(
                &format!("guidance_plan.schedule[{k}]"),
                "must be finite",
            ));
        }
        Some(plan.schedule.iter().map(|&g| g as f64).collect())
    };
    let (lo, hi) = (plan.interval_sigma_lo, plan.interval_sigma_hi);
    for (name, v) in [("interval_sigma_lo", lo), ("interval_sigma_hi", hi)] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(invalid(
                &format!("guidance_plan.{name}"),
                "must be finite and >= 0",
            ));
        }
    }
    if let (Some(l), Some(h)) = (lo, hi) {
        if l > h {
            return Err(invalid(
                "guidance_plan.interval_sigma_lo",
                format!("{l} is above interval_sigma_hi {h}"),
            ));
        }
    }
    let interval = (lo.is_some() || hi.is_some()).then_some((lo, hi));
    Ok(GuidancePlan {
        cfg_cutoff,
        schedule,
        interval,
    })
}

/// Per-step lists against the run's timestep count `n`: the guidance schedule and each LoRA
/// schedule hold `n` values, and a cutoff index is a step of the run.
pub fn check_schedules(params: &GenerateParams, n: usize) -> Result<(), EngineError> {
    let one_per_step = |field: &str, s: &Option<Vec<f64>>| match s {
        Some(s) if s.len() != n => Err(invalid(
            field,
            format!("{} values for {n} timesteps (one per step)", s.len()),
        )),
        _ => Ok(()),
    };
    one_per_step("guidance_plan.schedule", &params.guidance_plan.schedule)?;
    if let Some(Cutoff::Index(i)) = params.guidance_plan.cfg_cutoff {
        if i >= n {
            return Err(invalid(
                "guidance_plan.cutoff_step_index",
                format!("step {i} of a run of {n} timesteps"),
            ));
        }
    }
    for (i, l) in params.loras.iter().enumerate() {
        one_per_step(&format!("loras[{i}].schedule"), &l.schedule)?;
    }
    Ok(())
}

/// The preview subscription: items within the batch, a decoder the model has, STEP_END among
/// the phases (previews ride on its events), a JPEG quality in 1..=100.
fn validate_preview(
    p: &proto::PreviewOptions,
    model: &proto::ModelInfo,
    hooks: &[Hook],
    images: usize,
    limits: &Limits,
) -> Result<PreviewSpec, EngineError> {
    use crate::pipeline::preview::{Decoder, Format, Source};
    if !hooks.contains(&Hook::End) {
        return Err(invalid(
            "callback.preview",
            "previews travel on STEP_END events: add CALLBACK_PHASE_STEP_END to callback.phases",
        ));
    }
    let source = match proto::PreviewSource::try_from(p.source) {
        Ok(proto::PreviewSource::Latents) => Source::Latents,
        Ok(proto::PreviewSource::X0 | proto::PreviewSource::Unspecified) => Source::X0,
        Err(_) => return Err(unknown("callback.preview.source", p.source)),
    };
    let decoder = match proto::PreviewDecoder::try_from(p.decoder) {
        Ok(proto::PreviewDecoder::Taesd) => {
            if !model.preview_decoders.iter().any(|d| d == "taesd") {
                return Err(invalid(
                    "callback.preview.decoder",
                    format!(
                        "model `{}` has no TAESD decoder (serve --preview-decoder); it has: {}",
                        model.id,
                        model.preview_decoders.join(", ")
                    ),
                ));
            }
            Decoder::Tiny
        }
        Ok(proto::PreviewDecoder::Linear | proto::PreviewDecoder::Unspecified) => Decoder::Linear,
        Err(_) => return Err(unknown("callback.preview.decoder", p.decoder)),
    };
    let format = match proto::PreviewFormat::try_from(p.format) {
        Ok(proto::PreviewFormat::Jpeg) => match p.jpeg_quality {
            0 => Format::Jpeg(80),
            q @ 1..=100 => Format::Jpeg(q as u8),
            q => {
                return Err(invalid(
                    "callback.preview.jpeg_quality",
                    format!("{q} is not in 1..=100"),
                ))
            }
        },
        Ok(proto::PreviewFormat::Png | proto::PreviewFormat::Unspecified) => Format::Png,
        Err(_) => return Err(unknown("callback.preview.format", p.format)),
    };
    if p.max_side > limits.max_side {
        return Err(invalid(
            "callback.preview.max_side",
            format!(
                "{} exceeds the server's max side of {}",
                p.max_side, limits.max_side
            ),
        ));
    }
    let items: Vec<usize> = sorted(&p.items).into_iter().map(|i| i as usize).collect();
    if let Some(&bad) = items.iter().find(|&&i| i >= images) {
        return Err(invalid(
            "callback.preview.items",
            format!("item {bad} is out of range: this request makes {images} images"),
        ));
    }
    Ok(PreviewSpec {
        source,
        items,
        max_side: p.max_side,
        format,
        every: p.every,
        decoder,
    })
}

fn validate_callback(
    c: &proto::CallbackOptions,
    model: &proto::ModelInfo,
    limits: &Limits,
    images: usize,
) -> Result<Subscription, EngineError> {
    let mut hooks = Vec::with_capacity(c.phases.len());
    for (i, &p) in c.phases.iter().enumerate() {
        let hook =
            Hook::from_wire(p).ok_or_else(|| unknown(&format!("callback.phases[{i}]"), p))?;
        hooks.push(hook);
    }
    if hooks.is_empty() {
        hooks.push(Hook::End);
    }
    hooks.sort_unstable();
    hooks.dedup();
    let guidance = hooks.contains(&Hook::Guidance);
    let mut names: Vec<String> = Vec::new();
    for n in &c.tensor_inputs {
        let of_phase = GUIDANCE_TENSORS.contains(&n.as_str());
        if of_phase && !guidance {
            return Err(invalid(
                "callback.tensor_inputs",
                format!("`{n}` exists only at the AFTER_GUIDANCE phase; add it to callback.phases"),
            ));
        }
        if !of_phase && !model.callback_tensor_inputs.iter().any(|a| a == n) {
            let mut allowed = model.callback_tensor_inputs.join(", ");
            if guidance {
                allowed = format!("{allowed}, {}", GUIDANCE_TENSORS.join(", "));
            }
            return Err(invalid(
                "callback.tensor_inputs",
                format!(
                    "`{n}` is not a callback tensor of model `{}`; allowed: {allowed}",
                    model.id,
                ),
            ));
        }
        if names.contains(n) {
            return Err(invalid(
                "callback.tensor_inputs",
                format!("`{n}` listed twice"),
            ));
        }
        names.push(n.clone());
    }
    let steps = sorted(&c.step_indices);
    if c.await_steps {
        for (field, set) in [
            ("callback.step_indices", !c.step_indices.is_empty()),
            ("callback.every", c.every > 1),
            (
                "callback.reply_step_indices",
                !c.reply_step_indices.is_empty(),
            ),
        ] {
            if set {
                return Err(invalid(
                    field,
                    "with await_steps the steps come in ClientMessage.steps after Accepted; \
                     leave this unset",
                ));
            }
        }
    }
    let reply_timeout = if c.reply_timeout_ms == 0 {
        limits.default_reply_timeout
    } else {
        Duration::from_millis(c.reply_timeout_ms as u64)
    };
    if reply_timeout > limits.max_reply_timeout {
        return Err(invalid(
            "callback.reply_timeout_ms",
            format!(
                "{} ms exceeds the server's maximum of {} ms",
                reply_timeout.as_millis(),
                limits.max_reply_timeout.as_millis()
            ),
        ));
    }
    let on_timeout = proto::TimeoutAction::try_from(c.on_timeout)
        .map_err(|_| unknown("callback.on_timeout", c.on_timeout))?;
    let wire_dtype = match proto::DType::try_from(c.wire_dtype) {
        Ok(proto::DType::DtypeUnspecified) => proto::DType::DtypeF32,
        Ok(d) => d,
        Err(_) => return Err(unknown("callback.wire_dtype", c.wire_dtype)),
    };
    let reply_steps = sorted(&c.reply_step_indices);
    if c.observe_only && !reply_steps.is_empty() {
        return Err(invalid(
            "callback.reply_step_indices",
            "observe_only never waits; give one or the other",
        ));
    }
    Ok(Subscription {
        tensor_inputs: names,
        step_indices: steps,
        every: c.every,
        observe_only: c.observe_only,
        reply_steps,
        reply_timeout,
        on_timeout,
        wire_dtype,
        await_steps: c.await_steps,
        preview: c
            .preview
            .as_ref()
            .map(|p| validate_preview(p, model, &hooks, images, limits))
            .transpose()?,
        hooks,
        no_steps: false,
    })
}

/// Every subscribed step index must be one of the request's `timesteps` steps.
pub fn check_step_indices(sub: &Subscription, timesteps: usize) -> Result<(), EngineError> {
    for (field, steps) in [
        ("callback.step_indices", &sub.step_indices),
        ("callback.reply_step_indices", &sub.reply_steps),
    ] {
        check_steps_in(field, steps, timesteps)?;
    }
    Ok(())
}

fn check_steps_in(field: &str, steps: &[u32], timesteps: usize) -> Result<(), EngineError> {
    steps_in_range(steps, timesteps).map_err(|why| invalid(field, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> proto::ModelInfo {
        proto::ModelInfo {
            id: "m".into(),
            family: "sd1".into(),
            default_width: 512,
            default_height: 512,
            default_steps: 50,
            default_guidance_scale: 7.5,
            default_scheduler: "ddim".into(),
            schedulers: vec!["ddim".into(), "euler".into()],
            callback_tensor_inputs: vec!["latents".into(), "prompt_embeds".into()],
            ..Default::default()
        }
    }

    fn t(shape: Vec<i64>) -> proto::Tensor {
        let n: i64 = shape.iter().product();
        proto::Tensor {
            dtype: proto::DType::DtypeF32 as i32,
            shape,
            data: vec![0; n as usize * 4],
        }
    }

    fn field_of(req: proto::GenerateRequest) -> String {
        match validate(&req, &card(), &Limits::default()) {
            Err(EngineError::InvalidRequest { field, .. }) => field,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn defaults_come_from_the_model() {
        let v = validate(&Default::default(), &card(), &Limits::default()).unwrap();
        let p = v.params;
        assert_eq!((p.width, p.height, p.num_inference_steps), (512, 512, 50));
        assert_eq!((p.guidance_scale, p.num_images_per_prompt), (7.5, 1));
        assert!(p.decode && !v.return_latents && v.subscription.is_none());
    }

    #[test]
    fn each_rule_names_its_field() {
        let cb = |c: proto::CallbackOptions| proto::GenerateRequest {
            callback: Some(c),
            ..Default::default()
        };
        let cases: Vec<(proto::GenerateRequest, &str)> = vec![
            (
                proto::GenerateRequest {
                    prompt: "x".repeat(20_000),
                    ..Default::default()
                },
                "start.prompt",
            ),
            (
                proto::GenerateRequest {
                    prompt: "a".into(),
                    prompt_embeds: Some(t(vec![1, 77, 8])),
                    ..Default::default()
                },
                "start.prompt_embeds",
            ),
            (
                proto::GenerateRequest {
                    negative_prompt_embeds: Some(t(vec![1, 77, 8])),
                    ..Default::default()
                },
                "start.negative_prompt_embeds",
            ),
            (
                proto::GenerateRequest {
                    num_inference_steps: 1001,
                    ..Default::default()
                },
                "start.num_inference_steps",
            ),
            (
                proto::GenerateRequest {
                    guidance_scale: Some(f32::NAN),
                    ..Default::default()
                },
                "start.guidance_scale",
            ),
            (
                proto::GenerateRequest {
                    guidance_rescale: Some(1.5),
                    ..Default::default()
                },
                "start.guidance_rescale",
            ),
            (
                proto::GenerateRequest {
                    eta: Some(-1.0),
                    ..Default::default()
                },
                "start.eta",
            ),
            (
                proto::GenerateRequest {
                    width: Some(0),
                    ..Default::default()
                },
                "start.width",
            ),
            (
                proto::GenerateRequest {
                    height: Some(100),
                    ..Default::default()
                },
                "start.height",
            ),
            (
                proto::GenerateRequest {
                    width: Some(4096),
                    ..Default::default()
                },
                "start.width",
            ),
            (
                proto::GenerateRequest {
                    num_images_per_prompt: 17,
                    ..Default::default()
                },
                "start.num_images_per_prompt",
            ),
            (
                proto::GenerateRequest {
                    scheduler: "nope".into(),
                    ..Default::default()
                },
                "start.scheduler",
            ),
            (
                proto::GenerateRequest {
                    output: Some(proto::OutputOptions {
                        format: 9,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "start.output.format",
            ),
            (
                proto::GenerateRequest {
                    latents: Some(proto::Tensor {
                        data: vec![0; 3],
                        ..t(vec![1, 4, 64, 64])
                    }),
                    ..Default::default()
                },
                "start.latents",
            ),
            (
                cb(proto::CallbackOptions {
                    tensor_inputs: vec!["latents".into(), "latents".into()],
                    ..Default::default()
                }),
                "start.callback.tensor_inputs",
            ),
            (
                cb(proto::CallbackOptions {
                    tensor_inputs: vec!["add_time_ids".into()],
                    ..Default::default()
                }),
                "start.callback.tensor_inputs",
            ),
            (
                cb(proto::CallbackOptions {
                    reply_timeout_ms: 3_600_000,
                    ..Default::default()
                }),
                "start.callback.reply_timeout_ms",
            ),
            (
                cb(proto::CallbackOptions {
                    on_timeout: 7,
                    ..Default::default()
                }),
                "start.callback.on_timeout",
            ),
            (
                cb(proto::CallbackOptions {
                    wire_dtype: 7,
                    ..Default::default()
                }),
                "start.callback.wire_dtype",
            ),
        ];
        for (req, want) in cases {
            assert_eq!(field_of(req), want);
        }
    }

    #[test]
    fn callback_options_become_a_subscription() {
        let req = proto::GenerateRequest {
            callback: Some(proto::CallbackOptions {
                tensor_inputs: vec!["latents".into()],
                step_indices: vec![5, 1, 5],
                wire_dtype: proto::DType::DtypeF16 as i32,
                ..Default::default()
            }),
            output: Some(proto::OutputOptions {
                format: proto::ImageFormat::None as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = validate(&req, &card(), &Limits::default()).unwrap();
        let s = v.subscription.unwrap();
        assert_eq!(s.step_indices, vec![1, 5]);
        assert!(s.wants(1) && s.wants(5) && !s.wants(2));
        assert_eq!(s.wire_dtype, proto::DType::DtypeF16);
        assert_eq!(s.reply_timeout, Limits::default().default_reply_timeout);
        assert!(!v.params.decode && v.return_latents);
        let every = Subscription {
            step_indices: vec![],
            every: 4,
            ..s
        };
        assert!(every.wants(0) && every.wants(8) && !every.wants(3));
    }
}
