//! The model's components timed directly on their device (no server), once per kernel mode, and
//! the peak memory of a whole generation.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::{median, BenchError};
use crate::devmem::{self, PeakSource};
use crate::kernels::{self, KernelMode};
use crate::models::pipeline_model::StableDiffusionModel;
use crate::pipeline::{sd, NoCallback};

/// Which kernel implementations `--kernels` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// The fused CUDA kernels only.
    Fused,
    /// The reference candle ops only.
    Reference,
    /// Both, one after the other in the same run.
    Both,
}

impl std::str::FromStr for KernelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fused" => Ok(KernelChoice::Fused),
            "reference" => Ok(KernelChoice::Reference),
            "both" => Ok(KernelChoice::Both),
            _ => Err(format!(
                "unknown kernels `{s}`: use fused, reference or both"
            )),
        }
    }
}

/// One kernel mode to run, with its label in the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRun {
    /// The label of its rows: `fused` or `reference`.
    pub label: String,
    /// The mode set with [`kernels::set_mode`] while it runs.
    pub mode: KernelMode,
}

/// The kernel modes to run for `choice` (both devices have fast paths: fused CUDA
/// kernels on GPUs; the CPU's own convolution, GroupNorm and attention on the CPU).
pub fn kernel_runs(choice: KernelChoice) -> Vec<KernelRun> {
    let run = |mode: KernelMode| KernelRun {
        label: mode.name().to_string(),
        mode,
    };
    match choice {
        KernelChoice::Fused => vec![run(KernelMode::Fused)],
        KernelChoice::Reference => vec![run(KernelMode::Reference)],
        KernelChoice::Both => vec![run(KernelMode::Fused), run(KernelMode::Reference)],
    }
}

/// One component's median time under one kernel mode.
#[derive(Clone, Debug, Serialize)]
pub struct ComponentRow {
    /// The kernel mode's label.
    pub kernels: String,
    /// What was timed, e.g. `UNet forward, batch 2, 512x512`.
    pub component: String,
    /// Median milliseconds.
    pub ms: f64,
}

/// The peak memory of the whole-generation and the UNet timings under one kernel mode.
#[derive(Clone, Debug)]
pub struct PeakRow {
    /// The kernel mode's label.
    pub kernels: String,
    /// Whole generation: peak bytes and where the figure comes from; `None` where unreadable.
    pub peak: Option<(u64, PeakSource)>,
    /// The same around the UNet forward at batch 2 (diffusers' `unet_peak_gib`).
    pub unet_peak: Option<(u64, PeakSource)>,
}

/// One kernel mode's component timings (name, median ms) and its whole-generation peak.
#[derive(Clone, Debug)]
pub struct ComponentTimes {
    /// `(component, median ms)`, in the order timed.
    pub rows: Vec<(String, f64)>,
    /// Peak memory around the whole-generation timing (see [`devmem::peak_bytes`]).
    pub peak: Option<(u64, PeakSource)>,
    /// Peak memory around the UNet timing.
    pub unet_peak: Option<(u64, PeakSource)>,
}

/// Times the components once per kernel run, setting each run's mode first; rows and peaks are
/// labelled with the run's label.
pub fn components_per_kernels(
    model: &StableDiffusionModel,
    runs_of_kernels: &[KernelRun],
    size: usize,
    steps: usize,
    runs: usize,
) -> Result<(Vec<ComponentRow>, Vec<PeakRow>), BenchError> {
    let (mut rows, mut peaks) = (Vec::new(), Vec::new());
    for k in runs_of_kernels {
        kernels::set_mode(k.mode);
        let times = components(model, size, steps, runs)?;
        rows.extend(times.rows.into_iter().map(|(component, ms)| ComponentRow {
            kernels: k.label.clone(),
            component,
            ms,
        }));
        peaks.push(PeakRow {
            kernels: k.label.clone(),
            peak: times.peak,
            unet_peak: times.unet_peak,
        });
    }
    Ok((rows, peaks))
}

/// Component timings of a loaded model on its device under the current kernel mode (medians,
/// ms): one UNet forward at batch 2 (CFG), one VAE decode, one text-encoder pass, and a whole
/// `steps`-step generation with decode, with the peak memory around the last.
pub fn components(
    model: &StableDiffusionModel,
    size: usize,
    steps: usize,
    runs: usize,
) -> Result<ComponentTimes, BenchError> {
    let vsf = model.vae_scale_factor();
    let (h, w, c) = (size / vsf, size / vsf, model.unet_in_channels());
    let mut rows = Vec::new();
    devmem::reset_peak(&model.device);
    let unet = time_unet(model, (c, h, w), runs)?;
    let unet_peak = devmem::peak_bytes(&model.device);
    tracing::info!(ms = unet, "UNet forward timed");
    rows.push((format!("UNet forward, batch 2, {size}x{size}"), unet));
    let vae = time_vae(model, (c, h, w), runs)?;
    tracing::info!(ms = vae, "VAE decode timed");
    rows.push((format!("VAE decode, 1x{c}x{h}x{w}"), vae));
    rows.push(("text encoder, batch 1".into(), time_text(model, runs)?));
    let (whole, peak) = time_whole(model, size, steps, runs)?;
    rows.push((
        format!("whole generation, {steps} DDIM steps with CFG, decode + PNG"),
        whole,
    ));
    Ok(ComponentTimes {
        rows,
        peak,
        unet_peak,
    })
}

/// A standard-normal tensor of `shape` on the model's device, in `dtype`.
fn randn(
    model: &StableDiffusionModel,
    shape: &[usize],
    dtype: candle_core::DType,
) -> Result<Tensor, BenchError> {
    Ok(Tensor::randn(0f32, 1.0, shape, &model.device)?.to_dtype(dtype)?)
}

/// One UNet forward at batch 2 on latents of `(c, h, w)`.
fn time_unet(
    model: &StableDiffusionModel,
    (c, h, w): (usize, usize, usize),
    runs: usize,
) -> Result<f64, BenchError> {
    let sample = randn(model, &[2, c, h, w], model.dtype)?;
    let width = model.text_encoder_hidden_size();
    let embeds = randn(model, &[2, 77, width], model.dtype)?;
    time_ms(&model.device, 3, runs, || {
        model.unet.forward(&sample, 500.0, &embeds, None)?;
        Ok(())
    })
}

/// One VAE decode of latents `(1, c, h, w)` in the VAE's dtype.
fn time_vae(
    model: &StableDiffusionModel,
    (c, h, w): (usize, usize, usize),
    runs: usize,
) -> Result<f64, BenchError> {
    let latents = randn(model, &[1, c, h, w], model.vae_dtype)?;
    time_ms(&model.device, 2, runs, || {
        model.vae.decode(&latents)?;
        Ok(())
    })
}

/// One text-encoder pass over 77 tokens.
fn time_text(model: &StableDiffusionModel, runs: usize) -> Result<f64, BenchError> {
    let ids = Tensor::from_vec(vec![0u32; 77], (1, 77), &model.device)?;
    time_ms(&model.device, 3, runs, || {
        model.text_encoder.forward(&ids)?;
        Ok(())
    })
}

/// A whole DDIM generation with CFG and decode (a fifth of `runs`, at least 2), with the peak
/// memory from a reset just before it.
fn time_whole(
    model: &StableDiffusionModel,
    size: usize,
    steps: usize,
    runs: usize,
) -> Result<(f64, Option<(u64, PeakSource)>), BenchError> {
    let params = sd::GenerateParams {
        seed: 1,
        scheduler: "ddim".into(),
        ..sd::GenerateParams::text(super::PROMPT, steps, size, size)
    };
    devmem::reset_peak(&model.device);
    let ms = time_ms(&model.device, 1, runs.div_ceil(5).max(2), || {
        sd::prepare(model, &params)?.run(&mut NoCallback)?;
        Ok(())
    })?;
    Ok((ms, devmem::peak_bytes(&model.device)))
}

/// Median time of `f` over `runs` runs after `warmup` runs, synchronising `device` around each.
fn time_ms(
    device: &Device,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_choice_runs_its_modes_on_the_cpu_too() {
        let labels = |choice: &str| -> Vec<String> {
            kernel_runs(choice.parse().unwrap())
                .into_iter()
                .map(|k| k.label)
                .collect()
        };
        assert_eq!(labels("fused"), ["fused"]);
        assert_eq!(labels("reference"), ["reference"]);
        assert_eq!(labels("both"), ["fused", "reference"]);
        assert!("fast".parse::<KernelChoice>().is_err());
    }
}
