//! The README's commands, run as a user would: `stepstream serve` on the embedded model, then
//! `stepstream generate` with a remote CFG cutoff writing a PNG; and `stepstream bench`'s report.

mod common;

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use common::process::spawn_serve;

/// A path under `tests/fixtures/`.
fn fixture(p: &str) -> String {
    format!("{}/tests/fixtures/{p}", env!("CARGO_MANIFEST_DIR"))
}

/// `stepstream generate --addr ADDR --prompt PROMPT`, for the caller's other flags.
fn generate(addr: &str, prompt: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepstream"));
    cmd.args(["generate", "--addr", addr, "--prompt", prompt]);
    cmd
}

/// Runs `stepstream` with `args`, which must fail; its stderr.
fn refused<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure: {err}");
    err
}

#[test]
fn serve_then_generate_with_a_cfg_cutoff_writes_a_png() {
    let server = spawn_serve(Vec::<&str>::new());
    let addr = server.addr.clone();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let status = generate(&addr, "a photo of an astronaut riding a horse on mars")
        .args(["--steps", "10", "--cfg-cutoff", "0.4", "--seed", "3"])
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

/// `serve --preview-decoder`, then `generate --preview-dir`: observed, and with a CFG cutoff.
#[test]
fn generate_writes_the_previews_it_asks_for() {
    let server = spawn_serve([
        "--model".to_string(),
        fixture("models/tiny-sd15"),
        "--preview-decoder".into(),
        fixture("models/tiny-taesd"),
    ]);
    for (extra, decoder, side, want) in [
        (
            vec![],
            "linear",
            8,
            ["step-000-item-0.png", "step-005-item-0.png"],
        ),
        (
            vec!["--cfg-cutoff", "0.4"],
            "taesd",
            64,
            ["step-000-item-0.png", "step-005-item-0.png"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let previews = dir.path().join("previews");
        let status = generate(&server.addr, "an astronaut")
            .args(["--steps", "10", "--seed", "3", "--preview-every", "5"])
            .args(["--preview-decoder", decoder])
            .args(&extra)
            .arg("--preview-dir")
            .arg(&previews)
            .arg("--out")
            .arg(dir.path().join("out.png"))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{extra:?}");
        let mut names: Vec<String> = std::fs::read_dir(&previews)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, want, "{extra:?}");
        let img = image::open(previews.join(want[1])).unwrap();
        assert_eq!((img.width(), img.height()), (side, side), "{decoder}");
    }
}

/// `generate --cfg-cutoff --save-replay FILE`, then `replay FILE`: the same PNG, byte for byte.
#[test]
fn a_saved_replay_makes_the_same_png_again() {
    let server = spawn_serve(Vec::<&str>::new());
    let dir = tempfile::tempdir().unwrap();
    let (first, again, record) = (
        dir.path().join("first.png"),
        dir.path().join("again.png"),
        dir.path().join("run.replay"),
    );
    let status = generate(&server.addr, "an astronaut")
        .args(["--steps", "10", "--cfg-cutoff", "0.4"])
        .arg("--save-replay")
        .arg(&record)
        .arg("--out")
        .arg(&first)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(["replay", "--addr", &server.addr])
        .arg(&record)
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("replaying 1 edits"),
        "the cutoff is the one edit: {err}"
    );
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&first).unwrap()
    );

    // Not a record: refused with the file named.
    std::fs::write(&record, b"\xff\xff not protobuf").unwrap();
    let err = refused([
        OsStr::new("replay"),
        "--addr".as_ref(),
        server.addr.as_ref(),
        record.as_os_str(),
    ]);
    assert!(err.contains("is not a replay record"), "{err}");
}

/// A preview decoder for a model not served, or a folder that is no `AutoencoderTiny`, stops
/// `serve` at start with the reason.
#[test]
fn serve_refuses_a_preview_decoder_it_cannot_use() {
    for (decoder, reason) in [
        (
            format!("nope={}", fixture("models/tiny-taesd")),
            "a preview decoder for model `nope`, which is not served",
        ),
        (fixture("models/tiny-sd15/unet"), "only \"AutoencoderTiny\""),
    ] {
        let err = refused([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--model",
            &fixture("models/tiny-sd15"),
            "--preview-decoder",
            &decoder,
        ]);
        assert!(err.contains(reason), "{decoder}: {err}");
    }
}

#[test]
fn serve_loads_a_diffusers_folder_and_refuses_a_bad_one() {
    let server = spawn_serve(["--model".to_string(), fixture("models/tiny-sd15")]);
    assert!(server.addr.starts_with("127.0.0.1:"));

    let empty = tempfile::tempdir().unwrap();
    // A folder without a model fails at start.
    let err = refused([
        OsStr::new("serve"),
        "--addr".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--model".as_ref(),
        empty.path().as_os_str(),
    ]);
    assert!(err.contains("model_index.json"), "{err}");
}

/// The README's "downloaded checkpoint with two LoRAs", on the fixtures: a single-file model
/// with two LoRAs, then `generate --lora` with a scale and with a per-step schedule.
#[test]
fn serve_a_checkpoint_with_two_loras_then_generate_with_them() {
    let server = spawn_serve([
        "--model".to_string(),
        fixture("checkpoints/tiny-sd15.safetensors"),
        "--model-config".into(),
        fixture("models/tiny-sd15"),
        "--lora".into(),
        format!("detail={}", fixture("loras/a.safetensors")),
        "--lora".into(),
        format!("style={}", fixture("loras/b-kohya.safetensors")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let run = |loras: &[&str]| {
        let mut cmd = generate(&server.addr, "a lighthouse at dusk");
        cmd.args(["--steps", "4", "--seed", "1"])
            .arg("--out")
            .arg(dir.path().join("out.png"));
        for l in loras {
            cmd.args(["--lora", l]);
        }
        cmd.output().unwrap()
    };
    let out = run(&["detail=0.8", "style=1:1:0.5:0.2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(image::open(dir.path().join("out.png")).is_ok());
    // A name the server does not serve, and a schedule of the wrong length, are refused by field.
    for (bad, says) in [
        ("nope", "start.loras[0].name"),
        ("style=1:1", "start.loras[0].schedule"),
    ] {
        let out = run(&[bad]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{bad}: {err}");
    }
    // A bad --lora at start: the server does not start, and says why.
    let err = refused(["serve", "--addr", "127.0.0.1:0", "--lora", "no-equals-sign"]);
    assert!(err.contains("[MODEL:]NAME=PATH"), "{err}");
}

#[test]
fn serve_takes_a_kernel_mode_and_refuses_an_unknown_one() {
    let server = spawn_serve(["--kernels", "reference"]);
    assert!(server.addr.starts_with("127.0.0.1:"));

    let err = refused(["serve", "--addr", "127.0.0.1:0", "--kernels", "fast"]);
    assert!(err.contains("use fused or reference"), "{err}");
}

/// Runs `stepstream bench` on the embedded model with `args`; returns its stdout and the parsed
/// JSON of its last line.
fn bench(args: &[&str]) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    let json = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    (stdout, json)
}

#[test]
fn bench_prints_every_section_then_one_json_line_with_every_key() {
    // A small G3 size keeps this fast on the CPU; the default (512) gives 1x4x64x64 latents.
    let (stdout, v) = bench(&[
        "--runs",
        "1",
        "--steps",
        "2",
        "--g3-steps",
        "2",
        "--g3-size",
        "64",
        "--sessions",
        "1,2",
        "--concurrency-rounds",
        "1",
        "--thinkers",
        "2",
        "--think-ms",
        "5",
    ]);
    for heading in [
        "## Components",
        "## Peak memory",
        "## G2: ",
        "## G3: ",
        "## Concurrency",
    ] {
        assert!(stdout.contains(heading), "no `{heading}` in:\n{stdout}");
    }
    assert_eq!(stdout.lines().filter(|l| l.starts_with('{')).count(), 1);
    assert_eq!(v["model"], "tiny-sd15");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["kernels"], serde_json::json!(["fused", "reference"]));
    assert_eq!(v["size"], 64);
    assert!(
        v["kernel_checks"].is_null(),
        "no fused kernels to check on the CPU"
    );

    let g3 = &v["g3"];
    assert_eq!(g3["latents_shape"], serde_json::json!([1, 4, 8, 8]));
    assert_eq!(g3["waits_per_run"], 2);
    assert_eq!(g3["target_ratio"], 2.0);
    let rows = g3["rows"].as_array().unwrap();
    let wires: Vec<_> = rows
        .iter()
        .map(|r| (r["wire"].clone(), r["bytes"].clone()))
        .collect();
    assert_eq!(
        wires,
        [
            (serde_json::json!("f32"), serde_json::json!(4 * 64 * 4)),
            (serde_json::json!("f16"), serde_json::json!(4 * 64 * 2))
        ]
    );
    for r in rows {
        for key in ["round_trip_ms", "tcp_echo_ms", "ratio"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
        }
        assert!(r["meets_target"].is_boolean());
    }

    let g2 = v["g2"].as_array().unwrap();
    assert_eq!(g2.len(), 5);
    assert_eq!(g2[0]["mode"], "no callback");
    assert_eq!(g2[0]["overhead_denoise_pct"], 0.0);
    for r in g2 {
        for key in [
            "wall_ms",
            "denoise_ms",
            "callback_wait_ms",
            "overhead_denoise_pct",
            "overhead_wall_pct",
            "target_pct",
            "meets_target",
        ] {
            assert!(r.get(key).is_some(), "{key} missing: {r}");
        }
    }
    assert_eq!(g2[3]["target_pct"], 2.0);
    assert_eq!(g2[4]["target_pct"], 4.0);

    let conc = &v["concurrency"];
    let scaling = conc["scaling"].as_array().unwrap();
    let shape: Vec<_> = scaling
        .iter()
        .map(|r| (r["sessions"].as_u64().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        shape,
        [
            (1, "observe-only"),
            (1, "blocking"),
            (2, "observe-only"),
            (2, "blocking")
        ]
    );
    for r in scaling {
        assert_eq!(r["identical"], true, "a shared run changed an image: {r}");
        for key in [
            "images_per_s",
            "one_at_a_time_images_per_s",
            "speedup",
            "step_p50_ms",
        ] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
        }
    }
    let think = &conc["think"];
    assert_eq!(
        (think["thinkers"].as_u64(), think["think_ms"].as_u64()),
        (Some(2), Some(5))
    );
    assert!(think["ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(think["target_ratio"], 1.5);

    // Four components under each kernel mode (`both` is the default, on the CPU too).
    let components = v["components"].as_array().unwrap();
    assert_eq!(components.len(), 8);
    for mode in ["fused", "reference"] {
        assert_eq!(
            components.iter().filter(|c| c["kernels"] == mode).count(),
            4
        );
    }
    assert!(components.iter().all(|c| c["ms"].as_f64().unwrap() > 0.0));
    let peak = &v["peak_memory"];
    assert_eq!(peak["source"], "process_rss");
    assert!(peak["rows"][0]["bytes"].as_u64().unwrap() > 1 << 20);
}

#[test]
fn bench_components_alone_leaves_the_grpc_sections_null() {
    let (stdout, v) = bench(&["--components", "--runs", "1", "--steps", "1"]);
    assert!(
        !stdout.contains("## G2") && !stdout.contains("## G3"),
        "{stdout}"
    );
    assert!(v["g2"].is_null() && v["g3"].is_null() && v["concurrency"].is_null());
    assert_eq!(
        v["components"].as_array().unwrap().len(),
        8,
        "4 per kernel mode"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(["bench", "--components", "--skip-components"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nothing to measure must fail");
}
