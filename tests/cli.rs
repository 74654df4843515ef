//! The README's commands, run as a user would: `stepstream serve` on the embedded model, then
//! `stepstream generate` with a remote CFG cutoff writing a PNG.

mod common;

use std::process::{Command, Stdio};

use common::process::spawn_serve;

#[test]
fn serve_then_generate_with_a_cfg_cutoff_writes_a_png() {
    let server = spawn_serve(Vec::<&str>::new());
    let addr = server.addr.clone();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let status = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(["generate", "--addr", &addr])
        .args(["--prompt", "a photo of an astronaut riding a horse on mars"])
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

#[test]
fn serve_loads_a_diffusers_folder_and_refuses_a_bad_one() {
    let folder = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/tiny-sd15"
    );
    let server = spawn_serve(["--model", folder]);
    assert!(server.addr.starts_with("127.0.0.1:"));

    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(["serve", "--addr", "127.0.0.1:0", "--model"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a folder without a model must fail at start"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model_index.json"), "{err}");
}
