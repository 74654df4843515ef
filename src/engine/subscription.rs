//! What a session subscribed to: which steps and phases send events, which of them wait for a
//! reply, and what travels with them. Validated once (the server before the queue, the loop
//! for a selection sent after Accepted); the device loop only reads it.

use std::time::Duration;

use crate::pipeline::preview::PreviewSpec;
use crate::proto;

/// Where in a step an event is sent (`proto::CallbackPhase`), in loop order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// Before the UNet: changes apply to this step.
    Begin,
    /// After guidance, before the scheduler step: `noise_pred` may be replaced.
    Guidance,
    /// After the scheduler step (diffusers' `callback_on_step_end`): changes apply from the
    /// next step.
    End,
}

impl Hook {
    /// The wire phase.
    pub fn proto(self) -> proto::CallbackPhase {
        match self {
            Hook::Begin => proto::CallbackPhase::StepBegin,
            Hook::Guidance => proto::CallbackPhase::AfterGuidance,
            Hook::End => proto::CallbackPhase::StepEnd,
        }
    }

    /// The hook of a wire phase (unspecified: STEP_END); `None` for an unknown value.
    pub fn from_wire(phase: i32) -> Option<Hook> {
        match proto::CallbackPhase::try_from(phase).ok()? {
            proto::CallbackPhase::Unspecified | proto::CallbackPhase::StepEnd => Some(Hook::End),
            proto::CallbackPhase::StepBegin => Some(Hook::Begin),
            proto::CallbackPhase::AfterGuidance => Some(Hook::Guidance),
        }
    }

    /// The wire name, for messages.
    pub fn name(self) -> &'static str {
        self.proto().as_str_name()
    }
}

/// Tensors only the AFTER_GUIDANCE phase has; of them only `noise_pred` may be replaced.
pub const GUIDANCE_TENSORS: &[&str] = &[
    "noise_pred",
    "noise_pred_uncond",
    "noise_pred_text",
    "pred_original_sample",
];

/// What a session subscribed to (the validated `CallbackOptions`).
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Tensors sent with each event (those its phase has) and replaceable in replies.
    pub tensor_inputs: Vec<String>,
    /// Explicit steps (sorted, unique); empty means every `every`-th step.
    pub step_indices: Vec<u32>,
    /// Report every `every`-th step when `step_indices` is empty (0 and 1: every step).
    pub every: u32,
    /// Events only; never wait for replies.
    pub observe_only: bool,
    /// The steps that wait for a reply (sorted, unique); empty: every subscribed step.
    pub reply_steps: Vec<u32>,
    /// Deadline of each reply wait.
    pub reply_timeout: Duration,
    /// What to do when the deadline passes.
    pub on_timeout: proto::TimeoutAction,
    /// Dtype of tensors sent to the client.
    pub wire_dtype: proto::DType,
    /// The steps come in a `StepSelection` after Accepted, before step 0.
    pub await_steps: bool,
    /// The phases that send events (sorted, unique, never empty).
    pub hooks: Vec<Hook>,
    /// No step sends an event (a selection said `no_steps`).
    pub no_steps: bool,
    /// Previews on STEP_END events.
    pub preview: Option<PreviewSpec>,
}

impl Subscription {
    /// Whether step `i` produces events.
    pub fn wants(&self, i: usize) -> bool {
        if self.no_steps {
            return false;
        }
        if self.reply_steps.binary_search(&(i as u32)).is_ok() {
            return true;
        }
        if !self.step_indices.is_empty() {
            return self.step_indices.binary_search(&(i as u32)).is_ok();
        }
        self.every <= 1 || i % self.every as usize == 0
    }

    /// Whether step `i` sends an event at `hook`.
    pub fn sends(&self, hook: Hook, i: usize) -> bool {
        self.hooks.contains(&hook) && self.wants(i)
    }

    /// The previews step `i`'s STEP_END event carries, if any.
    pub fn preview_at(&self, i: usize) -> Option<&PreviewSpec> {
        self.preview
            .as_ref()
            .filter(|p| p.at(i) && self.sends(Hook::End, i))
    }

    /// Whether step `i`'s events wait for a reply.
    pub fn waits(&self, i: usize) -> bool {
        !self.observe_only
            && (self.reply_steps.is_empty() || self.reply_steps.binary_search(&(i as u32)).is_ok())
    }

    /// Takes the steps of a `StepSelection` for a run of `num_timesteps` timesteps, or says
    /// which field is wrong and why (nothing changes then).
    pub fn select(
        &mut self,
        sel: &proto::StepSelection,
        num_timesteps: usize,
    ) -> Result<(), (String, String)> {
        let step_indices = sorted(&sel.step_indices);
        let reply_steps = sorted(&sel.reply_step_indices);
        for (field, steps) in [
            ("steps.step_indices", &step_indices),
            ("steps.reply_step_indices", &reply_steps),
        ] {
            steps_in_range(steps, num_timesteps).map_err(|why| (field.to_string(), why))?;
        }
        if self.observe_only && !reply_steps.is_empty() {
            return Err((
                "steps.reply_step_indices".into(),
                "this subscription is observe_only: it never waits".into(),
            ));
        }
        if sel.no_steps && (!step_indices.is_empty() || !reply_steps.is_empty() || sel.every > 1) {
            return Err((
                "steps.no_steps".into(),
                "no_steps selects nothing; leave the other fields empty".into(),
            ));
        }
        self.step_indices = step_indices;
        self.reply_steps = reply_steps;
        self.every = sel.every;
        self.no_steps = sel.no_steps;
        Ok(())
    }
}

/// Sorted, without repeats.
pub fn sorted(steps: &[u32]) -> Vec<u32> {
    let mut s = steps.to_vec();
    s.sort_unstable();
    s.dedup();
    s
}

/// Every step index must be one of a run's `num_timesteps` steps.
pub fn steps_in_range(steps: &[u32], num_timesteps: usize) -> Result<(), String> {
    match steps.iter().find(|&&i| i as usize >= num_timesteps) {
        Some(&bad) => Err(format!(
            "step index {bad} is out of range: this request has {num_timesteps} timesteps \
             (0..{num_timesteps})"
        )),
        None => Ok(()),
    }
}
