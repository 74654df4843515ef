//! The report: one Markdown table per section, and everything as one JSON object.

use serde::Serialize;
use serde_json::{json, Value};

use super::components::{ComponentRow, PeakRow};
use super::concurrency::ConcurrencyReport;
use super::grpc::{G2Row, G3Report};
use crate::devmem::PeakSource;

/// Bytes per GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// Everything one `stepstream bench` measured; a skipped section is `None`.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The model's id.
    pub model: String,
    /// The device, as given (`cpu`, `cuda:0`).
    pub device: String,
    /// The compute dtype, as given (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Labels of the kernel modes run, in order; G2 and G3 ran under the first.
    pub kernels: Vec<String>,
    /// Timed runs per measurement.
    pub runs: usize,
    /// Denoising steps of the G2 and whole-generation runs (G3 has its own).
    pub steps: u32,
    /// Image side of G2 and the components, pixels (the model's native size unless `--size`).
    pub size: u32,
    /// G3: the callback round trip against a raw TCP echo.
    pub g3: Option<G3Report>,
    /// G2: the callback modes and their overheads.
    pub g2: Option<Vec<G2Row>>,
    /// Component timings, per kernel mode.
    pub components: Option<Vec<ComponentRow>>,
    /// Peak memory of the whole-generation timing, per kernel mode.
    pub peak_memory: Option<Vec<PeakRow>>,
    /// The fused kernels against the f32 reference on fresh random inputs (none on the CPU).
    pub kernel_checks: Option<Vec<KernelCheckRow>>,
    /// Sessions sharing the device.
    pub concurrency: Option<super::ConcurrencyReport>,
}

/// One fused-kernel check, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct KernelCheckRow {
    /// `attention` or `group_norm`.
    pub kernel: &'static str,
    /// The case's shapes.
    pub case: String,
    /// Whether the fused kernel ran for this case.
    pub applied: bool,
    /// Relative L2 error against the f32 reference.
    pub rel_l2: f64,
    /// Largest absolute error over the largest reference magnitude.
    pub rel_max: f64,
    /// The bound on `rel_l2`.
    pub tolerance: f64,
    /// Within the bound (or not applied).
    pub passed: bool,
}

impl From<&crate::kernels::KernelCheck> for KernelCheckRow {
    fn from(c: &crate::kernels::KernelCheck) -> Self {
        Self {
            kernel: c.kernel.name(),
            case: c.case.clone(),
            applied: c.applied,
            rel_l2: c.rel_l2,
            rel_max: c.rel_max,
            tolerance: c.tolerance,
            passed: c.passed(),
        }
    }
}

/// The kernel checks as a Markdown section.
pub fn kernel_check_table(rows: &[KernelCheckRow]) -> String {
    let mut out = String::from(
        "## Fused kernels against the f32 reference (fresh random inputs)\n\n\
         | kernel | case | ran | relative L2 error | max error / max value | bound | passed |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        if r.applied {
            out.push_str(&format!(
                "| {} | {} | yes | {:.2e} | {:.2e} | {:.0e} | {} |\n",
                r.kernel,
                r.case,
                r.rel_l2,
                r.rel_max,
                r.tolerance,
                yes_no(r.passed)
            ));
        } else {
            out.push_str(&format!(
                "| {} | {} | no (reference ops) | – | – | – | – |\n",
                r.kernel, r.case
            ));
        }
    }
    out.push('\n');
    out
}

impl Report {
    /// The line that opens the printed report.
    pub fn header(&self) -> String {
        format!(
            "# stepstream bench: model {}, {} {}, kernels {}, {} runs (medians)\n\n",
            self.model,
            self.device,
            self.dtype,
            self.kernels.join(" + "),
            self.runs
        )
    }

    /// Everything as one JSON object; every key is present, a skipped section is `null`.
    pub fn json(&self) -> Value {
        let mut v = json!({
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "kernels": self.kernels,
            "runs": self.runs,
            "steps": self.steps,
            "size": self.size,
            "g3": self.g3,
            "g2": self.g2,
            "concurrency": self.concurrency,
            "components": self.components,
            "peak_memory": self.peak_memory.as_deref().map(peak_json),
        });
        round_floats(&mut v);
        // Errors are small numbers: added after the rounding, at full precision.
        v["kernel_checks"] = json!(self.kernel_checks);
        v
    }
}

/// Peak memory as JSON: where the figure comes from, and bytes per kernel mode.
fn peak_json(rows: &[PeakRow]) -> Value {
    let source = rows.iter().find_map(|r| r.peak.map(|(_, s)| s));
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let bytes = r.peak.map(|(b, _)| b);
            let unet = r.unet_peak.map(|(b, _)| b);
            json!({
                "kernels": r.kernels,
                "bytes": bytes,
                "gib": bytes.map(|b| b as f64 / GIB),
                "unet_bytes": unet,
                "unet_gib": unet.map(|b| b as f64 / GIB),
            })
        })
        .collect();
    json!({
        "source": source.map(source_key),
        "label": source.map(source_label),
        "rows": rows,
    })
}

/// Rounds every float in `v` to 4 decimals, so the JSON line stays readable.
fn round_floats(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or_default();
            *v = json!((x * 1e4).round() / 1e4);
        }
        Value::Array(items) => items.iter_mut().for_each(round_floats),
        Value::Object(map) => map.values_mut().for_each(round_floats),
        _ => {}
    }
}

/// The JSON name of a peak-memory source.
fn source_key(s: PeakSource) -> &'static str {
    match s {
        PeakSource::CudaPool => "cuda_pool",
        PeakSource::ProcessRss => "process_rss",
    }
}

/// What a peak-memory figure means.
fn source_label(s: PeakSource) -> &'static str {
    match s {
        PeakSource::CudaPool => {
            "CUDA memory-pool high-water mark of live tensors (weights included), reset just before the whole-generation timing"
        }
        PeakSource::ProcessRss => {
            "CPU: process peak RSS (VmHWM) since the process started, model loading included (it cannot be reset)"
        }
    }
}

/// G3 as a Markdown section.
pub fn g3_table(g3: &G3Report) -> String {
    let shape: Vec<String> = g3.latents_shape.iter().map(|d| d.to_string()).collect();
    let mut out = format!(
        "## G3: one callback round trip vs a raw TCP echo of the same bytes (loopback)\n\n\
         Latents {} echoed back at each of {} waiting steps ({} steps at {size}x{size}, no CFG, \
         no decode); 1-step warm-up; round trip = callback wait / waiting steps, median of {} runs. TCP echo: median of \
         {} round trips in the same process, TCP_NODELAY. Goal: ratio ≤ {:.1}.\n\n\
         | wire | bytes | callback round trip ms | TCP echo ms | ratio | within goal |\n\
         |---|---|---|---|---|---|\n",
        shape.join("x"),
        g3.waits_per_run,
        g3.steps,
        g3.runs,
        g3.echo_round_trips,
        g3.target_ratio,
        size = g3.size,
    );
    for r in &g3.rows {
        out.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.2} | {} |\n",
            r.wire,
            r.bytes,
            r.round_trip_ms,
            r.tcp_echo_ms,
            r.ratio,
            yes_no(r.meets_target)
        ));
    }
    out.push('\n');
    out
}

/// G2 as a Markdown section.
pub fn g2_table(rows: &[G2Row], steps: u32, size: u32, runs: usize) -> String {
    let mut out = format!(
        "## G2: what a callback adds to the denoising loop\n\n\
         {steps} steps at {size}x{size}, medians of {runs} rounds (each mode once per round). \
         Overheads against \"no callback\"; the goals apply to the denoise overhead.\n\n\
         | mode | client wall ms | server denoise ms | callback wait ms | denoise overhead | \
         wall overhead | goal |\n|---|---|---|---|---|---|---|\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let (denoise, wall) = if i == 0 {
            ("baseline".to_string(), "baseline".to_string())
        } else {
            (
                format!("{:+.1}%", r.overhead_denoise_pct),
                format!("{:+.1}%", r.overhead_wall_pct),
            )
        };
        let goal = match (r.target_pct, r.meets_target) {
            (Some(t), Some(ok)) => format!("≤ {t:.0}%: {}", yes_no(ok)),
            _ => "–".into(),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} | {denoise} | {wall} | {goal} |\n",
            r.mode, r.wall_ms, r.denoise_ms, r.callback_wait_ms
        ));
    }
    out.push('\n');
    out
}

/// The component timings as a Markdown section: one column per kernel mode, and with two
/// modes the same-run ratio of the second to the first.
pub fn components_table(rows: &[ComponentRow], size: u32, runs: usize) -> String {
    let labels = unique(rows.iter().map(|r| r.kernels.as_str()));
    let names = unique(rows.iter().map(|r| r.component.as_str()));
    let mut out = format!(
        "## Components ({size}x{size}, medians of {runs} runs; whole generation: of {} runs)\n\n\
         | component |",
        runs.div_ceil(5).max(2)
    );
    for l in &labels {
        out.push_str(&format!(" {l} ms |"));
    }
    if let [a, b] = labels.as_slice() {
        out.push_str(&format!(" {b} / {a} |"));
    }
    out.push_str(&format!("\n|---|{}\n", "---|".repeat(ratio_cols(&labels))));
    for name in &names {
        let ms: Vec<Option<f64>> = labels
            .iter()
            .map(|l| {
                rows.iter()
                    .find(|r| &r.component == name && &r.kernels == l)
                    .map(|r| r.ms)
            })
            .collect();
        out.push_str(&format!("| {name} |"));
        for m in &ms {
            out.push_str(&m.map_or(" – |".into(), |m| format!(" {m:.2} |")));
        }
        if let [Some(a), Some(b)] = ms.as_slice() {
            out.push_str(&format!(" {:.2}× |", b / a));
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Data columns of the components table: one per label, plus the ratio with two.
fn ratio_cols(labels: &[&str]) -> usize {
    labels.len() + usize::from(labels.len() == 2)
}

/// Peak memory as a Markdown section.
pub fn peak_table(rows: &[PeakRow]) -> String {
    let mut out = String::from(
        "## Peak memory (around the whole-generation and the UNet timings)\n\n\
         | kernels | whole generation GiB | UNet forward, batch 2 GiB | what it is |\n\
         |---|---|---|---|\n",
    );
    let gib = |p: Option<(u64, PeakSource)>| match p {
        Some((bytes, _)) => format!("{:.3}", bytes as f64 / GIB),
        None => "–".into(),
    };
    for r in rows {
        let what = match r.peak.or(r.unet_peak) {
            Some((_, source)) => source_label(source),
            None => "not readable here",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {what} |\n",
            r.kernels,
            gib(r.peak),
            gib(r.unet_peak)
        ));
    }
    out.push('\n');
    out
}

/// `yes` or `no`.
/// The concurrency section as Markdown.
pub fn concurrency_table(r: &ConcurrencyReport) -> String {
    let mut out = format!(
        "## Concurrency: sessions sharing the device\n\n\
         {} steps at {}x{}, medians of {} rounds; a quarter of the sessions without CFG. \
         \"Step\" is the time between a client's consecutive events.\n\n\
         | sessions | mode | images/s | one at a time | speedup | step p50 ms | step p99 ms | \
         step p50 alone ms | rows/UNet call | identical |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        r.steps, r.size, r.size, r.rounds
    );
    for row in &r.scaling {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2}× | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            row.sessions,
            row.mode,
            row.images_per_s,
            row.one_at_a_time_images_per_s,
            row.speedup,
            row.step_p50_ms,
            row.step_p99_ms,
            row.one_at_a_time_step_p50_ms,
            row.rows_per_call,
            yes_no(row.identical),
        ));
    }
    let t = &r.think;
    out.push_str(&format!(
        "\n**Think time:** {} clients each think {} ms before every reply; one observer starts \
         just after them.\n\n\
         | observer alone ms | observer with thinkers ms | ratio | goal | device busy |\n\
         |---|---|---|---|---|\n\
         | {:.1} | {:.1} | {:.2}× | ≤ {:.1}× {} | {:.0}% |\n\n",
        t.thinkers,
        t.think_ms,
        t.observer_alone_ms,
        t.observer_shared_ms,
        t.ratio,
        t.target_ratio,
        if t.meets_target { "met" } else { "not met" },
        t.busy_pct,
    ));
    out
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The distinct items, in first-seen order.
fn unique<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kernels: &str, component: &str, ms: f64) -> ComponentRow {
        ComponentRow {
            kernels: kernels.into(),
            component: component.into(),
            ms,
        }
    }

    #[test]
    fn two_kernel_modes_give_a_same_run_ratio_column() {
        let rows = [
            row("fused", "UNet", 10.0),
            row("fused", "VAE", 4.0),
            row("reference", "UNet", 15.0),
            row("reference", "VAE", 8.0),
        ];
        let t = components_table(&rows, 512, 5);
        assert!(t.contains("| component | fused ms | reference ms | reference / fused |"));
        assert!(t.contains("|---|---|---|---|\n"), "{t}");
        assert!(t.contains("| UNet | 10.00 | 15.00 | 1.50× |"), "{t}");
        assert!(t.contains("| VAE | 4.00 | 8.00 | 2.00× |"), "{t}");
    }

    #[test]
    fn the_json_has_every_key_and_rounded_floats() {
        let report = Report {
            model: "m".into(),
            components: Some(vec![row("reference", "UNet", 1.234_567_89)]),
            peak_memory: Some(vec![PeakRow {
                kernels: "reference".into(),
                peak: Some((1 << 30, PeakSource::ProcessRss)),
                unet_peak: Some((1 << 29, PeakSource::ProcessRss)),
            }]),
            ..Default::default()
        };
        let v = report.json();
        for key in [
            "model",
            "device",
            "dtype",
            "kernels",
            "runs",
            "steps",
            "size",
            "g3",
            "g2",
            "components",
            "peak_memory",
        ] {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        assert!(v["g3"].is_null());
        assert_eq!(v["components"][0]["ms"], json!(1.2346));
        assert_eq!(v["peak_memory"]["source"], "process_rss");
        assert_eq!(v["peak_memory"]["rows"][0]["gib"], json!(1.0));
        assert_eq!(v["peak_memory"]["rows"][0]["bytes"], json!(1u64 << 30));
        assert_eq!(v["peak_memory"]["rows"][0]["unet_gib"], json!(0.5));
    }
}
