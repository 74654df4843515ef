//! STUB (replaced by the clipvae branch).
#![allow(missing_docs, unused)]
use super::{ModelSource, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
#[derive(Clone, Debug)]
pub struct ClipTextConfig { pub hidden_size: usize }
impl ClipTextConfig { pub fn load(s: &ModelSource, sub: &str) -> Result<Self> { unimplemented!() } }
pub struct ClipTextModel;
pub struct ClipTextOutput { pub last_hidden_state: Tensor, pub penultimate_hidden_state: Tensor, pub pooled: Tensor, pub text_embeds: Option<Tensor> }
impl ClipTextModel {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> { unimplemented!() }
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> { unimplemented!() }
}
