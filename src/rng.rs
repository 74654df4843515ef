//! The documented noise generator behind every seed: a seed always gives the same numbers, on
//! every device and dtype, because noise is drawn on the host and then moved to the device.
//!
//! Algorithm (stable, part of the API): `rand_chacha::ChaCha8Rng::seed_from_u64(seed)`; each
//! standard-normal pair comes from two `next_u64` draws mapped to `u1 = (a >> 11 + 1) / 2^53`
//! (in (0, 1]) and `u2 = (b >> 11) / 2^53` (in [0, 1)), then Box–Muller in f64:
//! `r = sqrt(-2 ln u1)`, `z0 = r cos(2π u2)`, `z1 = r sin(2π u2)`, each rounded to f32, in that
//! order, row-major over the requested shape.

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Something that produces standard-normal noise tensors for samplers that need it.
pub trait NoiseSource {
    /// A tensor of i.i.d. N(0, 1) f32 values with the given shape, on `device`.
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor>;
}

/// The seeded generator documented in this module.
#[derive(Clone, Debug)]
pub struct NoiseGenerator {
    rng: ChaCha8Rng,
    spare: Option<f32>,
}

impl NoiseGenerator {
    /// A generator whose stream is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    /// The next `n` standard-normal values.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if let Some(z) = self.spare.take() {
                out.push(z);
                continue;
            }
            let (z0, z1) = self.pair();
            out.push(z0);
            self.spare = Some(z1);
        }
        out
    }

    fn pair(&mut self) -> (f32, f32) {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        let u1 = ((self.rng.next_u64() >> 11) + 1) as f64 * SCALE;
        let u2 = (self.rng.next_u64() >> 11) as f64 * SCALE;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        ((r * theta.cos()) as f32, (r * theta.sin()) as f32)
    }
}

impl NoiseSource for NoiseGenerator {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn_vec(n), shape, device)
    }
}

/// A noise source that replays recorded tensors in order (used to reproduce recorded runs).
#[derive(Debug, Default)]
pub struct ReplayNoise {
    queue: std::collections::VecDeque<Tensor>,
}

impl ReplayNoise {
    /// Replays `tensors` one per `randn` call.
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self {
            queue: tensors.into(),
        }
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .queue
            .pop_front()
            .ok_or_else(|| candle_core::Error::Msg("replayed noise exhausted".into()))?;
        if t.dims() != shape {
            candle_core::bail!(
                "replayed noise has shape {:?}, wanted {:?}",
                t.dims(),
                shape
            );
        }
        t.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_roughly_standard_normal() {
        let a = NoiseGenerator::new(42).randn_vec(20_000);
        let b = NoiseGenerator::new(42).randn_vec(20_000);
        assert_eq!(a, b);
        let c = NoiseGenerator::new(43).randn_vec(16);
        assert_ne!(&a[..16], &c[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn split_draws_continue_the_same_stream() {
        let whole = NoiseGenerator::new(7).randn_vec(9);
        let mut g = NoiseGenerator::new(7);
        let mut parts = g.randn_vec(3);
        parts.extend(g.randn_vec(6));
        assert_eq!(whole, parts);
    }
}
