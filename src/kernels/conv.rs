//! 2-D convolution with a fast path for pointwise (1x1, stride 1, no padding) kernels.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A convolution layer (`weight: (cout, cin, k, k)`, `bias: (cout,)`). On a GPU, pointwise ones
/// run as one matrix product `W · x` on the `(b, cin, h·w)` view of the input, which is already
/// the output's layout: no im2col buffer and no transpose back, unlike candle's CUDA convolution.
/// (candle's CPU convolution already special-cases pointwise kernels this way.)
#[derive(Clone, Debug)]
pub struct Conv2d {
    conv: candle_nn::Conv2d,
    /// `(cout, cin)` view of the weight when the kernel is pointwise.
    pointwise: Option<Tensor>,
}

impl Conv2d {
    /// Loads `weight` and `bias` from `vb`.
    pub fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(cin, cout, kernel, cfg, vb)?;
        let pointwise = if kernel == 1 && stride == 1 && padding == 0 {
            Some(conv.weight().reshape((cout, cin))?)
        } else {
            None
        };
        Ok(Self { conv, pointwise })
    }

    /// The weight, `(cout, cin, k, k)`.
    pub fn weight(&self) -> &Tensor {
        self.conv.weight()
    }

    /// Convolves `x: (b, cin, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pointwise.is_some() && super::fused() && !x.device().is_cpu() {
            return self.pointwise_product(x);
        }
        self.conv.forward(x)
    }

    /// The pointwise kernel as `W · x` per batch item (only for pointwise layers).
    fn pointwise_product(&self, x: &Tensor) -> Result<Tensor> {
        let Some(w) = &self.pointwise else {
            candle_core::bail!("not a pointwise convolution");
        };
        let (b, c, h, wd) = x.dims4()?;
        let cout = w.dim(0)?;
        let out = w.broadcast_left(b)?.matmul(&x.reshape((b, c, h * wd))?)?;
        let out = match self.conv.bias() {
            Some(bias) => out.broadcast_add(&bias.reshape((1, cout, 1))?)?,
            None => out,
        };
        out.reshape((b, cout, h, wd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    #[test]
    fn the_pointwise_path_matches_the_general_convolution() {
        let dev = Device::Cpu;
        let weights = HashMap::from([
            (
                "weight".to_string(),
                Tensor::randn(0f32, 1.0, (5, 6, 1, 1), &dev).unwrap(),
            ),
            (
                "bias".to_string(),
                Tensor::randn(0f32, 1.0, 5, &dev).unwrap(),
            ),
        ]);
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        let conv = Conv2d::load(vb, 6, 5, 1, 1, 0).unwrap();
        assert!(conv.pointwise.is_some());
        let x = Tensor::randn(0f32, 1.0, (3, 6, 4, 7), &dev).unwrap();
        let fast = conv.pointwise_product(&x).unwrap();
        let general = conv.conv.forward(&x).unwrap();
        let diff = (fast - general).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
