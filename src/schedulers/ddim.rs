//! DDIM (diffusers' DDIMScheduler).
// STUB: to be written (helper task "schedulers").
use super::{Result, SchedulerConfig, SchedulerOptions};

/// diffusers' DDIMScheduler.
pub struct DdimScheduler {}

impl DdimScheduler {
    /// Set up for `num_inference_steps`.
    pub fn new(_c: &SchedulerConfig, _n: usize, _o: &SchedulerOptions) -> Result<Self> {
        unimplemented!()
    }
}
impl super::Scheduler for DdimScheduler {
    fn name(&self) -> &'static str { "ddim" }
    fn timesteps(&self) -> &[f64] { unimplemented!() }
    fn init_noise_sigma(&self) -> f64 { unimplemented!() }
    fn scale_model_input(&self, _s: &candle_core::Tensor, _i: usize) -> Result<candle_core::Tensor> { unimplemented!() }
    fn step(&mut self, _m: &candle_core::Tensor, _i: usize, _s: &candle_core::Tensor, _n: &mut dyn crate::rng::NoiseSource) -> Result<candle_core::Tensor> { unimplemented!() }
}
