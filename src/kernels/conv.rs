//! 2-D convolution with two GPU paths: pointwise (1x1, stride 1, no padding) kernels as one matrix
//! product, and large "same" convolutions in row bands so the im2col buffer stays bounded.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A convolution layer (`weight: (cout, cin, k, k)`, `bias: (cout,)`). Pointwise ones run as one
/// matrix product `W · x` on the `(b, cin, h·w)` view of the input, which is already the
/// output's layout: no im2col buffer and no transpose back, unlike candle's CUDA convolution,
/// and no element-by-element copies around the product, unlike candle's CPU one. On the CPU in
/// f32, 3×3 stride-1 "same" ones take [`super::cpu_conv`] (Winograd or one direct product).
///
/// candle's CUDA convolution also materialises the whole im2col matrix, `h·w·cin·k²` elements: at
/// the VAE decoder's 512×512 level with 256 channels that is 1.2 GB in f16, more than the rest of
/// the decode together. A stride-1 "same" convolution whose matrix would pass
/// [`MAX_IM2COL_BYTES`] therefore runs in bands of output rows (each band reads its rows plus the
/// halo from the padded input), which bounds that buffer at the cost of one padded copy of the
/// input and one concatenation of the output.
#[derive(Clone, Debug)]
pub struct Conv2d {
    conv: candle_nn::Conv2d,
    /// `(cout, cin)` view of the weight when the kernel is pointwise.
    pointwise: Option<Tensor>,
    /// `(kernel, padding)` when the convolution is stride-1 "same" with a kernel above 1.
    same: Option<(usize, usize)>,
}

/// Largest im2col matrix (bytes) a GPU convolution builds at once; larger ones go in row bands.
pub const MAX_IM2COL_BYTES: usize = 256 << 20;

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
        let conv = candle_nn::conv2d(cin, cout, kernel, Self::config(stride, padding), vb)?;
        Self::from_candle(conv, kernel, stride, padding)
    }

    /// Loads `weight` alone from `vb` (a convolution without bias).
    pub fn load_no_bias(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Self::config(stride, padding);
        let conv = candle_nn::conv2d_no_bias(cin, cout, kernel, cfg, vb)?;
        Self::from_candle(conv, kernel, stride, padding)
    }

    fn config(stride: usize, padding: usize) -> Conv2dConfig {
        Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        }
    }

    /// The fast-path views of a loaded candle convolution.
    fn from_candle(
        conv: candle_nn::Conv2d,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let pointwise = if kernel == 1 && stride == 1 && padding == 0 {
            let (cout, cin) = (conv.weight().dim(0)?, conv.weight().dim(1)?);
            Some(conv.weight().reshape((cout, cin))?)
        } else {
            None
        };
        let same =
            (kernel > 1 && stride == 1 && 2 * padding == kernel - 1).then_some((kernel, padding));
        Ok(Self {
            conv,
            pointwise,
            same,
        })
    }

    /// The weight, `(cout, cin, k, k)`.
    pub fn weight(&self) -> &Tensor {
        self.conv.weight()
    }

    /// Convolves `x: (b, cin, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused() && x.device().is_cpu() {
            if super::cpu_conv::applies(x) {
                if self.same == Some((3, 1)) {
                    return super::cpu_conv::conv3x3(x, self.conv.weight(), self.conv.bias());
                }
                // candle's CPU pointwise convolution copies the input and the output element
                // by element around its product: 3.6× the product's time at the VAE's 256²
                // level.
                if self.pointwise.is_some() {
                    return self.pointwise_product(x);
                }
            }
        } else if super::fused() {
            if self.pointwise.is_some() {
                return self.pointwise_product(x);
            }
            if self.same.is_some() {
                return self.banded(x, MAX_IM2COL_BYTES);
            }
        }
        self.conv.forward(x)
    }

    /// A stride-1 "same" convolution in bands of output rows whose im2col matrices stay under
    /// `max_bytes` (one band, i.e. the plain convolution, when the whole matrix fits).
    fn banded(&self, x: &Tensor, max_bytes: usize) -> Result<Tensor> {
        let Some((kernel, pad)) = self.same else {
            candle_core::bail!("not a stride-1 same convolution");
        };
        let (b, cin, h, w) = x.dims4()?;
        let row_bytes = b * w * cin * kernel * kernel * x.dtype().size_in_bytes();
        let rows = (max_bytes / row_bytes.max(1)).max(1);
        if rows >= h {
            return self.conv.forward(x);
        }
        let padded = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
        let mut bands = Vec::with_capacity(h.div_ceil(rows));
        let mut r0 = 0;
        while r0 < h {
            let n = rows.min(h - r0);
            let band = padded.narrow(2, r0, n + 2 * pad)?.contiguous()?;
            bands.push(band.conv2d(self.conv.weight(), 0, 1, 1, 1)?);
            r0 += n;
        }
        let out = Tensor::cat(&bands, 2)?;
        match self.conv.bias() {
            Some(bias) => out.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?),
            None => Ok(out),
        }
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

    #[test]
    fn banded_same_convolutions_match_the_whole_one() {
        let dev = Device::Cpu;
        for (kernel, pad) in [(3, 1), (5, 2)] {
            let weights = HashMap::from([
                (
                    "weight".to_string(),
                    Tensor::randn(0f32, 1.0, (4, 3, kernel, kernel), &dev).unwrap(),
                ),
                (
                    "bias".to_string(),
                    Tensor::randn(0f32, 1.0, 4, &dev).unwrap(),
                ),
            ]);
            let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
            let conv = Conv2d::load(vb, 3, 4, kernel, 1, pad).unwrap();
            assert_eq!(conv.same, Some((kernel, pad)));
            let x = Tensor::randn(0f32, 1.0, (2, 3, 11, 9), &dev).unwrap();
            let whole = conv.conv.forward(&x).unwrap();
            let row_bytes = 2 * 9 * 3 * kernel * kernel * 4;
            // Bands of 1, 3 and 4 rows (the last one short), and one band for everything.
            for rows in [1, 3, 4, 11] {
                let banded = conv.banded(&x, rows * row_bytes).unwrap();
                assert_eq!(banded.dims(), whole.dims());
                let diff = (banded - &whole).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    diff.to_scalar::<f32>().unwrap() < 1e-5,
                    "{kernel}x{kernel}, {rows} rows"
                );
            }
        }
    }
}
