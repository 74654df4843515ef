//! The model's hot operations with two implementations each: our fast paths and the reference
//! composition of candle ops that they are checked against. On CUDA the fast paths are fused
//! kernels (attention without a materialised score matrix; GroupNorm with an optional SiLU in
//! one pass); on the CPU in f32, 3×3 convolutions by Winograd or one direct product
//! (`cpu_conv`), Linears in fixed chunks on a transposed weight, one-pass GroupNorm(+SiLU),
//! LayerNorm, quick_gelu and GEGLU, and attention (causal too) that reads and writes the heads
//! in place. The golden tests run the default (fast) mode.
//!
//! Which one runs is a process-wide switch ([`set_mode`]), so a bench can time both in one run;
//! the fused path only ever applies where a kernel exists (device, dtype and shape) and falls
//! back to the reference everywhere else.

mod activation;
mod attention;
mod check;
mod conv;
mod cpu;
mod cpu_conv;
#[cfg(feature = "cuda")]
mod cuda;
mod group_norm;
mod layer_norm;
mod linear;

use std::sync::atomic::{AtomicU8, Ordering};

pub use activation::{geglu, quick_gelu};
pub use attention::{attention, causal_attention};
pub use check::{check, verify, KernelCheck};
pub use conv::Conv2d;
pub use group_norm::GroupNorm;
pub use layer_norm::LayerNorm;
pub use linear::Linear;

/// Which implementation of the hot operations runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelMode {
    /// Our fast paths where they apply (the default): fused CUDA kernels and pointwise
    /// convolutions as one matrix product on the GPU; on the CPU in f32, 3×3 convolutions by
    /// Winograd F(2×2, 3×3) or one direct product, chunked Linears, one-pass norms and
    /// activations, and attention without head copies.
    Fused,
    /// Plain candle ops everywhere (the reference).
    Reference,
}

impl KernelMode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KernelMode::Fused => "fused",
            KernelMode::Reference => "reference",
        }
    }
}

impl std::str::FromStr for KernelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fused" => Ok(KernelMode::Fused),
            "reference" => Ok(KernelMode::Reference),
            _ => Err(format!("unknown kernel mode `{s}`: use fused or reference")),
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Chooses the implementation for every later call, process-wide.
pub fn set_mode(mode: KernelMode) {
    MODE.store(
        match mode {
            KernelMode::Fused => 0,
            KernelMode::Reference => 1,
        },
        Ordering::Relaxed,
    );
}

/// The implementation in use.
pub fn mode() -> KernelMode {
    match MODE.load(Ordering::Relaxed) {
        0 => KernelMode::Fused,
        _ => KernelMode::Reference,
    }
}

/// Whether the fused kernels are wanted (they still apply only on CUDA).
fn fused() -> bool {
    mode() == KernelMode::Fused
}

/// A fused kernel, for checks and switching off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedKernel {
    /// Flash-style attention.
    Attention,
    /// GroupNorm with optional SiLU.
    GroupNorm,
}

impl FusedKernel {
    /// Short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            FusedKernel::Attention => "attention",
            FusedKernel::GroupNorm => "group_norm",
        }
    }
}
