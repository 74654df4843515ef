//! STUB (replaced by the clipvae branch).
#![allow(missing_docs, unused)]
use super::{ModelSource, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
#[derive(Clone, Debug)]
pub struct VaeConfig { pub block_out_channels: Vec<usize>, pub latent_channels: usize, pub scaling_factor: f64, pub shift_factor: Option<f64>, pub force_upcast: bool }
impl VaeConfig { pub fn load(s: &ModelSource, sub: &str) -> Result<Self> { unimplemented!() } }
pub struct AutoencoderKl;
impl AutoencoderKl {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> { unimplemented!() }
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> { unimplemented!() }
}
