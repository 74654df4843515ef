//! STUB (replaced by the unet branch).
#![allow(missing_docs, unused)]
use super::{ModelSource, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
#[derive(Clone, Debug)]
pub struct UNetConfig { pub in_channels: usize, pub sample_size: usize, pub cross_attention_dim: usize, pub time_cond_proj_dim: Option<usize>, pub addition_embed_type: Option<String> }
impl UNetConfig { pub fn load(s: &ModelSource, sub: &str) -> Result<Self> { unimplemented!() } }
pub struct AddedConditions { pub text_embeds: Tensor, pub time_ids: Tensor }
pub struct UNet2DConditionModel;
impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> { unimplemented!() }
    pub fn config(&self) -> &UNetConfig { unimplemented!() }
    pub fn forward(&self, s: &Tensor, t: f64, e: &Tensor, a: Option<&AddedConditions>) -> Result<Tensor> { unimplemented!() }
}
