//! Load and LoRA figures at SD 1.5 size, with random weights (nothing is downloaded):
//!
//!     cargo run --release --example model_figures -- load [--dtype f16] [--device cpu]
//!     cargo run --release --example model_figures -- lora [--rank 16] [--size 256] [--runs 5]
//!     cargo run --release --example model_figures -- preview [--runs 200] [--taesd-runs 3]
//!
//! `load` writes an SD 1.5-sized single-file checkpoint in f16 (the real layout, from
//! `tests/fixtures/checkpoints/real-shapes/sd15.json`), then loads it in a fresh process and
//! prints the load time and the peak memory (CPU: the process's VmHWM, which includes the
//! memory-mapped file pages it touched; CUDA: the pool's high-water mark).
//! `lora` times the UNet step (batch 2, CFG-sized) of the random-weight SD 1.5 architecture
//! without a LoRA, then with a random LoRA of `--rank` on every adaptable layer, and prints
//! the cost per step.
//! `preview` times one step's previews of every item at 64×64 latents (SD 1.5 at 512×512),
//! batch 1 and 4: the linear map alone, then with PNG and JPEG encoding; and TAESD's decode in
//! its released shape (64 channels, 3/3/3/1 blocks) with random weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use stepstream::models::checkpoint::{Checkpoint, CheckpointOptions};
use stepstream::models::lora::{LoraFile, LoraFormat, Pair, Scale};
use stepstream::models::pipeline_model::StableDiffusionModel;
use stepstream::models::ModelSource;

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn device(args: &[String]) -> Result<Device> {
    match flag(args, "--device").as_deref().unwrap_or("cpu") {
        "cpu" => Ok(Device::Cpu),
        d => match d.strip_prefix("cuda:") {
            Some(n) => Ok(Device::new_cuda(n.parse()?)?),
            None => bail!("--device cpu or cuda:N"),
        },
    }
}

fn dtype(args: &[String], default: &str) -> Result<DType> {
    Ok(match flag(args, "--dtype").as_deref().unwrap_or(default) {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype f32, f16 or bf16, not {other}"),
    })
}

/// Writes the SD 1.5 layout with random f16 values (N(0, 0.02)).
fn write_checkpoint(path: &Path) -> Result<u64> {
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/checkpoints/real-shapes/sd15.json"),
    )?)?;
    let mut tensors = HashMap::new();
    for (key, shape) in doc["checkpoint_shapes"].as_object().context("shapes")? {
        let shape: Vec<usize> = shape
            .as_array()
            .context("shape")?
            .iter()
            .map(|d| d.as_u64().unwrap_or(1) as usize)
            .collect();
        let t = Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?.to_dtype(DType::F16)?;
        tensors.insert(key.clone(), t);
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(std::fs::metadata(path)?.len())
}

fn peak(device: &Device) -> String {
    match stepstream::devmem::peak_bytes(device) {
        Some((b, src)) => format!("{:.2} GiB ({src:?})", b as f64 / (1u64 << 30) as f64),
        None => "unknown".into(),
    }
}

fn load(args: &[String]) -> Result<()> {
    let Some(path) = flag(args, "--file") else {
        // The parent: write the file, then load it in a fresh process so its peak is the load's.
        let dir = tempfile_dir()?;
        let path = dir.join("sd15-random-f16.safetensors");
        let t0 = Instant::now();
        let bytes = write_checkpoint(&path)?;
        eprintln!(
            "wrote {} ({:.2} GiB) in {:.1} s",
            path.display(),
            bytes as f64 / (1u64 << 30) as f64,
            t0.elapsed().as_secs_f64()
        );
        let status = std::process::Command::new(std::env::current_exe()?)
            .arg("load")
            .args(args)
            .args(["--file", path.to_str().context("path")?])
            .status()?;
        std::fs::remove_file(&path)?;
        if !status.success() {
            bail!("the load process failed");
        }
        return Ok(());
    };
    let device = device(args)?;
    let dtype = dtype(args, "f16")?;
    let t0 = Instant::now();
    let c = Checkpoint::open(Path::new(&path), &CheckpointOptions::default())?;
    let source = ModelSource::Checkpoint(std::sync::Arc::new(c));
    let m = StableDiffusionModel::load("sd15".into(), &source, &device, dtype)?;
    device.synchronize()?;
    println!(
        "load: SD 1.5 single-file f16 -> {dtype:?} on {device:?}: {:.2} s, peak {}, family {}",
        t0.elapsed().as_secs_f64(),
        peak(&device),
        m.family.as_str()
    );
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("stepstream-figures-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn lora(args: &[String]) -> Result<()> {
    let device = device(args)?;
    let dtype = dtype(args, "f32")?;
    let rank: usize = flag(args, "--rank").unwrap_or("16".into()).parse()?;
    let size: usize = flag(args, "--size").unwrap_or("256".into()).parse()?;
    let runs: usize = flag(args, "--runs").unwrap_or("5".into()).parse()?;
    let source = stepstream::models::synthetic::source("sd15")?;
    let mut m = StableDiffusionModel::load("sd15".into(), &source, &device, dtype)?;
    let layers = m.adaptable_layers();
    let pairs = layers
        .iter()
        .map(|(target, module, i, o)| -> Result<Pair> {
            Ok(Pair {
                target: *target,
                module: module.clone(),
                down: Tensor::randn(0f32, 0.02, (rank, *i), &Device::Cpu)?,
                up: Tensor::randn(0f32, 0.02, (*o, rank), &Device::Cpu)?,
                factor: 1.0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let file = LoraFile {
        name: "random".into(),
        path: PathBuf::from("(random)"),
        format: LoraFormat::Diffusers,
        pairs,
    };
    let info = m.add_lora(&file)?;
    let unet_layers = info
        .modules
        .iter()
        .filter(|n| n.starts_with("unet."))
        .count();
    let latent = size / 8;
    let x = Tensor::randn(0f32, 1.0, (2, 4, latent, latent), &device)?.to_dtype(dtype)?;
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, 768), &device)?.to_dtype(dtype)?;
    let step = |scales: Vec<Option<Scale>>| -> Result<f64> {
        let t0 = Instant::now();
        m.lora_scales.during(scales, || {
            m.unet.forward_rows(&x, &[500.0, 500.0], &ctx, None)
        })?;
        device.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let rows = Tensor::ones((2, 1, 1), dtype, &device)?;
    let mut base = Vec::new();
    let mut with = Vec::new();
    step(Vec::new())?; // warm-up
    step(vec![Some(Scale::Rows(rows.clone()))])?;
    // Interleaved, so drift on a shared machine hits both alike.
    for _ in 0..runs {
        base.push(step(Vec::new())?);
        with.push(step(vec![Some(Scale::Rows(rows.clone()))])?);
    }
    let (b, w) = (median(base), median(with));
    println!(
        "lora: SD 1.5 UNet, batch 2, {size}x{size}, {dtype:?} on {device:?}: no LoRA {b:.1} ms, \
         rank-{rank} LoRA on {unet_layers} UNet layers {w:.1} ms: +{:.1} ms (+{:.1}%) per step \
         (median of {runs})",
        w - b,
        100.0 * (w - b) / b
    );
    Ok(())
}

/// The median of `runs` timings of `f`, in milliseconds.
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[runs / 2])
}

fn preview(args: &[String]) -> Result<()> {
    use stepstream::models::pipeline_model::Family;
    use stepstream::models::taesd::{TinyConfig, TinyDecoder};
    use stepstream::pipeline::preview::{encode, linear_rgb, Format};
    let runs: usize = flag(args, "--runs").map_or(Ok(200), |r| r.parse())?;
    let device = device(args)?;
    for batch in [1usize, 4] {
        let latents = Tensor::randn(0f32, 1.0, (batch, 4, 64, 64), &device)?;
        let map = median_ms(runs, || {
            linear_rgb(Family::Sd1, &latents, &[])?;
            Ok(())
        })?;
        let with = |format: Format| {
            median_ms(runs, || {
                for (item, rgb, w, h) in linear_rgb(Family::Sd1, &latents, &[])? {
                    encode(item, rgb, w, h, 0, format)?;
                }
                Ok(())
            })
        };
        let (png, jpeg) = (with(Format::Png)?, with(Format::Jpeg(80))?);
        println!(
            "linear, batch {batch}, 64x64 latents: map {map:.3} ms, +PNG {png:.3} ms, +JPEG {jpeg:.3} ms per step"
        );
    }
    let config: TinyConfig = serde_json::from_str("{}")?;
    let vars = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &device);
    let tiny = TinyDecoder::new(config, vb, DType::F32, "released shape")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let taesd_runs: usize = flag(args, "--taesd-runs").map_or(Ok(3), |r| r.parse())?;
    if taesd_runs == 0 {
        return Ok(());
    }
    for batch in [1usize, 4] {
        let latents = Tensor::randn(0f32, 1.0, (batch, 4, 64, 64), &device)?;
        let ms = median_ms(taesd_runs, || {
            stepstream::pipeline::preview::tiny_rgb(&tiny, &latents, &[])?;
            Ok(())
        })?;
        println!("TAESD (64 channels, random weights), batch {batch}, 64x64 latents -> 512x512: {ms:.1} ms per step");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("load") => load(&args[1..]),
        Some("lora") => lora(&args[1..]),
        Some("preview") => preview(&args[1..]),
        _ => bail!("usage: model_figures load|lora|preview [flags] (see the file's doc comment)"),
    }
}
