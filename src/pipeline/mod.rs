//! One text-to-image generation: prompt encoding, the CFG denoising loop with diffusers'
//! `callback_on_step_end` semantics, and VAE decode. Knows nothing of gRPC: the loop calls a
//! [`StepCallback`] at every step end and applies the [`StepControl`] it returns.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::models::ModelError;
use crate::schedulers::SchedulerError;

pub mod preview;
pub mod sd;
pub mod session;

pub use session::{decode_batch, step_batch, BatchKey, Session};

/// Errors that end a generation.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request is inconsistent with the model (field named, reason given).
    #[error("invalid `{field}`: {reason}")]
    InvalidRequest {
        /// The request field at fault.
        field: String,
        /// Why.
        reason: String,
    },
    /// The callback ended the generation (client gone, reply deadline passed, ...).
    #[error(transparent)]
    Callback(#[from] CallbackError),
    /// The scheduler failed.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// A model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Encoding the output image failed.
    #[error("image encoding failed: {0}")]
    Image(String),
}

/// Why an in-process [`StepCallback`] stopped the loop. (The server's sessions do not run
/// through this trait: the engine steps them itself and reports its own errors.)
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CallbackError {
    /// The callback's owner went away or asked to stop.
    #[error("the client ended the session")]
    Cancelled,
    /// The callback broke its contract in a way that cannot be answered with a rejection.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The tensors a callback sees and may replace, by diffusers' names.
pub type CallbackTensors = BTreeMap<String, Tensor>;

/// The loop's state at a callback point, as diffusers' callback sees it: the end of a step
/// (the default), its beginning, or after its guidance.
pub struct StepState<'a> {
    /// The step just finished, or about to run or held (0-based).
    pub step_index: usize,
    /// Its timestep.
    pub timestep: f64,
    /// `len(scheduler.timesteps)`.
    pub num_timesteps: usize,
    /// The guidance scale in force (diffusers' `pipe.guidance_scale`).
    pub guidance_scale: f64,
    /// Whether this step ran classifier-free guidance.
    pub do_classifier_free_guidance: bool,
    /// All callback tensors as the loop holds them after this step (post-step latents).
    pub tensors: &'a CallbackTensors,
    /// Server time spent on the step, in milliseconds.
    pub step_ms: f64,
    /// Number of images in the batch (latents' batch size).
    pub batch: usize,
}

/// What a callback asks the loop to change from the next step on.
#[derive(Debug, Default)]
pub struct StepControl {
    /// diffusers' `pipe._guidance_scale = x`.
    pub guidance_scale: Option<f64>,
    /// Replacement tensors by name; names left out stay as they were.
    pub tensors: Vec<(String, Tensor)>,
    /// diffusers' `pipe._interrupt = True`.
    pub interrupt: bool,
    /// New UNet scales by adapter index (diffusers: `pipe.set_adapters`), replacing the
    /// request's scale and schedule for that LoRA.
    pub lora_scales: Vec<(usize, f64)>,
}

/// The largest LoRA scale magnitude a request or reply may set (diffusers has no bound; past
/// this a LoRA's contribution swamps the base model and the numbers are noise).
pub const MAX_LORA_SCALE: f32 = 100.0;

/// Checks one LoRA scale: finite and within ±[`MAX_LORA_SCALE`].
pub fn check_lora_scale(scale: f32) -> Result<(), String> {
    if scale.is_finite() && scale.abs() <= MAX_LORA_SCALE {
        Ok(())
    } else {
        Err(format!(
            "{scale} must be finite and within ±{MAX_LORA_SCALE}"
        ))
    }
}

/// A reply that cannot be applied: the field at fault and why (sent as ReplyRejected).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Rejection {
    /// E.g. `tensors[prompt_embeds]`.
    pub field: String,
    /// Human-readable reason.
    pub reason: String,
}

impl Rejection {
    /// A rejection of `field` for `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The per-step hook: the pipeline's side of diffusers' `callback_on_step_end`.
pub trait StepCallback {
    /// Why the generation must stop now, if it must (checked at every step boundary).
    fn interruption(&self) -> Option<CallbackError> {
        None
    }
    /// Called after every step (subscribed or not) with the step's time, for metrics.
    fn step_finished(&mut self, _step_ms: f64) {}
    /// Whether step `step_index` is reported to the callback at all.
    fn wants(&self, step_index: usize) -> bool;
    /// Called after step `state.step_index`; what it returns is applied before the next step.
    /// Implementations validate candidate replies with [`validate_control`] and retry on rejection.
    fn on_step_end(&mut self, state: &StepState<'_>) -> Result<StepControl, CallbackError>;
}

/// A callback that observes nothing and changes nothing.
pub struct NoCallback;

impl StepCallback for NoCallback {
    fn wants(&self, _: usize) -> bool {
        false
    }
    fn on_step_end(&mut self, _: &StepState<'_>) -> Result<StepControl, CallbackError> {
        Ok(StepControl::default())
    }
}

/// Checks a candidate [`StepControl`] against the loop state: only allowed names, each tensor the
/// shape the loop needs, and `prompt_embeds` consistent with the batch the new guidance implies.
/// Nothing is applied when this fails.
pub fn validate_control(
    state: &StepState<'_>,
    allowed: &[String],
    control: &StepControl,
) -> Result<(), Rejection> {
    if let Some(g) = control.guidance_scale {
        if !g.is_finite() {
            return Err(Rejection::new("guidance_scale", "must be finite"));
        }
    }
    let new_guidance = control.guidance_scale.unwrap_or(state.guidance_scale);
    let new_cfg = new_guidance > 1.0;
    let mut seen = std::collections::BTreeSet::new();
    for (name, t) in &control.tensors {
        let field = format!("tensors[{name}]");
        if !allowed.iter().any(|a| a == name) {
            return Err(Rejection::new(
                field,
                format!(
                    "not a subscribed tensor (this request's tensor_inputs: [{}])",
                    allowed.join(", ")
                ),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(Rejection::new(field, "given twice"));
        }
        let current = state.tensors.get(name);
        match name.as_str() {
            // The noise prediction (held after guidance) has the latents' shape.
            "latents" | "noise_pred" => {
                let cur = current.ok_or_else(|| Rejection::new(&field, "not available"))?;
                if t.dims() != cur.dims() {
                    return Err(Rejection::new(
                        field,
                        format!(
                            "shape {:?} must equal the latents' shape {:?}",
                            t.dims(),
                            cur.dims()
                        ),
                    ));
                }
            }
            name if CFG_BATCHED.contains(&name) => {
                let cur = current.ok_or_else(|| Rejection::new(&field, "not available"))?;
                // A guidance change decides the batch; otherwise the tensor keeps its own (a
                // server-side schedule may run a step without CFG on still-doubled embeddings).
                let want_batch = match control.guidance_scale {
                    None => cur.dims().first().copied().unwrap_or(0),
                    Some(_) if new_cfg => 2 * state.batch,
                    Some(_) => state.batch,
                };
                let (cd, td) = (cur.dims(), t.dims());
                if td.is_empty() || td.len() != cd.len() || td.get(1..) != cd.get(1..) {
                    let mut want = vec!["batch".to_string()];
                    want.extend(cd.iter().skip(1).map(|d| d.to_string()));
                    return Err(Rejection::new(
                        field,
                        format!("shape {td:?} must be [{}]", want.join(", ")),
                    ));
                }
                if td[0] != want_batch {
                    return Err(Rejection::new(
                        field,
                        batch_reason(name, new_guidance, new_cfg, state.batch, td[0]),
                    ));
                }
            }
            "negative_prompt_embeds" => {
                let pe = state
                    .tensors
                    .get("prompt_embeds")
                    .ok_or_else(|| Rejection::new(&field, "not available"))?;
                let pd = pe.dims();
                let (seq, width) = (
                    pd.get(1).copied().unwrap_or(0),
                    pd.get(2).copied().unwrap_or(0),
                );
                let td = t.dims();
                if td != [state.batch, seq, width] {
                    return Err(Rejection::new(
                        field,
                        format!("shape {td:?} must be [{}, {}, {}]", state.batch, seq, width),
                    ));
                }
            }
            _ => {
                return Err(Rejection::new(field, "this pipeline cannot replace it"));
            }
        }
    }
    // A guidance change that flips CFG must come with every CFG-batched tensor at the new batch.
    if control.guidance_scale.is_none() {
        return Ok(());
    }
    let want_batch = if new_cfg {
        2 * state.batch
    } else {
        state.batch
    };
    for name in CFG_BATCHED {
        if control.tensors.iter().any(|(n, _)| n == name) {
            continue;
        }
        if let Some(cur) = state.tensors.get(*name) {
            let have = cur.dims().first().copied().unwrap_or(0);
            if have != want_batch {
                let field = if allowed.iter().any(|a| a == name) {
                    "guidance_scale".to_string()
                } else {
                    format!("guidance_scale (subscribe to {name} to change it)")
                };
                return Err(Rejection::new(
                    field,
                    batch_reason(name, new_guidance, new_cfg, state.batch, have),
                ));
            }
        }
    }
    Ok(())
}

/// Tensors whose batch is doubled (`[negative; positive]`) while classifier-free guidance runs.
pub const CFG_BATCHED: &[&str] = &["prompt_embeds", "add_text_embeds", "add_time_ids"];

fn batch_reason(name: &str, guidance: f64, cfg: bool, batch: usize, have: usize) -> String {
    if cfg {
        format!(
            "guidance_scale {guidance} runs classifier-free guidance, so {name} must be \
             [negative; positive] with batch {} (got {have})",
            2 * batch
        )
    } else {
        format!(
            "guidance_scale {guidance} (<= 1) turns classifier-free guidance off, so {name} \
             must hold only the conditional half with batch {batch} (got {have}); send \
             {name}[{batch}:] with this reply"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    fn state(tensors: &CallbackTensors, guidance: f64) -> StepState<'_> {
        StepState {
            step_index: 2,
            timestep: 501.0,
            num_timesteps: 10,
            guidance_scale: guidance,
            do_classifier_free_guidance: guidance > 1.0,
            tensors,
            step_ms: 1.0,
            batch: 2,
        }
    }

    fn all() -> Vec<String> {
        ["latents", "prompt_embeds", "negative_prompt_embeds"]
            .map(String::from)
            .to_vec()
    }

    fn control(g: Option<f64>, tensors: Vec<(&str, Tensor)>) -> StepControl {
        StepControl {
            guidance_scale: g,
            tensors: tensors.into_iter().map(|(n, t)| (n.into(), t)).collect(),
            interrupt: false,
            lora_scales: Vec::new(),
        }
    }

    #[test]
    fn guidance_changes_must_bring_embeddings_of_the_implied_batch() {
        // CFG on at batch 2: prompt_embeds is [neg x2; pos x2].
        let mut t = CallbackTensors::new();
        t.insert("latents".into(), zeros(&[2, 4, 8, 8]));
        t.insert("prompt_embeds".into(), zeros(&[4, 77, 32]));
        let s = state(&t, 7.5);
        assert!(validate_control(&s, &all(), &control(Some(3.0), vec![])).is_ok());
        let off = control(Some(1.0), vec![]);
        assert_eq!(
            validate_control(&s, &all(), &off).unwrap_err().field,
            "guidance_scale"
        );
        let halved = control(Some(0.0), vec![("prompt_embeds", zeros(&[2, 77, 32]))]);
        assert!(validate_control(&s, &all(), &halved).is_ok());
        // Only prompt_embeds unsubscribed: the reason says how to fix it.
        let e = validate_control(&s, &["latents".into()], &off).unwrap_err();
        assert!(e.field.contains("subscribe to prompt_embeds"), "{e}");

        // CFG off (batch 2 embeds): turning it back on needs [neg; pos].
        let mut t = CallbackTensors::new();
        t.insert("latents".into(), zeros(&[2, 4, 8, 8]));
        t.insert("prompt_embeds".into(), zeros(&[2, 77, 32]));
        let s = state(&t, 0.0);
        let on = control(Some(7.5), vec![]);
        let e = validate_control(&s, &all(), &on).unwrap_err();
        assert!(e.reason.contains("batch 4"), "{e}");
        let on = control(Some(7.5), vec![("prompt_embeds", zeros(&[4, 77, 32]))]);
        assert!(validate_control(&s, &all(), &on).is_ok());
    }

    #[test]
    fn replacement_shapes_are_checked_by_name() {
        let mut t = CallbackTensors::new();
        t.insert("latents".into(), zeros(&[2, 4, 8, 8]));
        t.insert("prompt_embeds".into(), zeros(&[4, 77, 32]));
        t.insert("negative_prompt_embeds".into(), zeros(&[2, 77, 32]));
        let s = state(&t, 7.5);
        let bad = [
            ("latents", zeros(&[1, 4, 8, 8])),
            ("prompt_embeds", zeros(&[4, 77, 16])),
            ("prompt_embeds", zeros(&[4, 77])),
            ("negative_prompt_embeds", zeros(&[1, 77, 32])),
        ];
        for (name, tensor) in bad {
            let e = validate_control(&s, &all(), &control(None, vec![(name, tensor)])).unwrap_err();
            assert_eq!(e.field, format!("tensors[{name}]"));
        }
        let twice = control(
            None,
            vec![
                ("latents", zeros(&[2, 4, 8, 8])),
                ("latents", zeros(&[2, 4, 8, 8])),
            ],
        );
        assert!(validate_control(&s, &all(), &twice)
            .unwrap_err()
            .reason
            .contains("twice"));
        let nan_guidance = control(Some(f64::NAN), vec![]);
        assert!(validate_control(&s, &all(), &nan_guidance).is_err());
    }
}
