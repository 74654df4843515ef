//! diffusers `scheduler_config.json`, parsed with diffusers' defaults.
// STUB: to be written (helper task "schedulers").

/// A diffusers scheduler config.
#[derive(Clone, Debug, Default)]
pub struct SchedulerConfig {
    /// `_class_name`, e.g. `DDIMScheduler`.
    pub class_name: String,
}
