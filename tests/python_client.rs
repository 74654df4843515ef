//! The Python client (`clients/python`), tested as its users run it: `pip install
//! ./clients/python` into a virtual environment, then its pytest suite against `stepstream serve`
//! on 127.0.0.1:0 serving the tiny SD 1.5 and SDXL fixture models (the golden CFG-cutoff case from
//! the seed callback verbatim, rejected replies, interrupt, observe-only, numpy and — where torch
//! is installed — torch tensors, the example, diffusers' own callback tests and docs examples on
//! both models, the pipeline object's call state from two threads, scheduler-object mapping).
//!
//! Needs `python3` (3.9+) with `venv` and pip, and PyPI for the first run. The venv lives under
//! cargo's target dir and is reused; the package is reinstalled whenever its sources or the proto
//! change. A missing Python fails this test: it never passes without running the suite.

mod common;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::process::spawn_serve;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The interpreter that makes the venv: `$STEPSTREAM_PYTHON`, else `python3`, else `python`.
fn system_python() -> String {
    let candidates: Vec<String> = match std::env::var("STEPSTREAM_PYTHON") {
        Ok(p) => vec![p],
        Err(_) => vec!["python3".into(), "python".into()],
    };
    for c in &candidates {
        let ok = Command::new(c)
            .args(["-c", "import sys; assert sys.version_info >= (3, 9)"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return c.clone();
        }
    }
    panic!(
        "the Python client tests need Python >= 3.9 with venv and pip (tried {candidates:?}; \
         set STEPSTREAM_PYTHON to choose one)"
    );
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(status.success(), "{what} failed ({status})");
}

/// Every file the installed package is built from: its sources and the proto.
fn package_fingerprint() -> String {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if !matches!(name.as_str(), "__pycache__" | "build" | "dist" | "tests")
                    && !name.ends_with(".egg-info")
                {
                    walk(&p, out);
                }
            } else if !name.contains("_pb2") && !name.ends_with(".pyc") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo().join("clients/python"), &mut files);
    walk(&repo().join("proto"), &mut files);
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// A venv under the target dir with the package (as just built from this tree) and pytest.
fn venv_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-client-venv");
    let python = if cfg!(windows) {
        venv.join("Scripts/python.exe")
    } else {
        venv.join("bin/python")
    };
    if !python.is_file() {
        let _ = std::fs::remove_dir_all(&venv);
        run(
            Command::new(system_python())
                .args(["-m", "venv"])
                .arg(&venv),
            "python -m venv (Debian: apt-get install python3-venv)",
        );
    }
    let marker = venv.join("stepstream-fingerprint");
    let want = package_fingerprint();
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(want.as_str()) {
        let pip = |args: &[&str], what: &str| {
            run(
                Command::new(&python)
                    .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                    .args(args)
                    .current_dir(repo()),
                what,
            )
        };
        // pip always rebuilds a local directory, so this also refreshes the package (stubs
        // included) when its sources changed under the same version number.
        pip(
            &["./clients/python", "pytest"],
            "pip install ./clients/python pytest",
        );
        std::fs::write(&marker, &want).unwrap();
    }
    python
}

#[test]
fn python_client_suite_passes_against_the_server() {
    let python = venv_python();
    // Both fixture models from one server (tiny-sd15 first: the default); the suite picks one
    // by id.
    let sd15 = repo().join("tests/fixtures/models/tiny-sd15");
    let sdxl = repo().join("tests/fixtures/models/tiny-sdxl");
    // The LoRA fixtures for tiny-sd15 (the default model), as `a` and `b`.
    let lora_a = format!(
        "a={}",
        repo().join("tests/fixtures/loras/a.safetensors").display()
    );
    let lora_b = format!(
        "b={}",
        repo()
            .join("tests/fixtures/loras/b-kohya.safetensors")
            .display()
    );
    // The tiny TAESD as the default model's preview decoder.
    let taesd = repo().join("tests/fixtures/models/tiny-taesd");
    let server = spawn_serve([
        std::ffi::OsStr::new("--preview-decoder"),
        taesd.as_os_str(),
        std::ffi::OsStr::new("--model"),
        sd15.as_os_str(),
        std::ffi::OsStr::new("--model"),
        sdxl.as_os_str(),
        std::ffi::OsStr::new("--lora"),
        std::ffi::OsStr::new(&lora_a),
        std::ffi::OsStr::new("--lora"),
        std::ffi::OsStr::new(&lora_b),
    ]);
    let addr = server.addr.clone();
    let out = Command::new(&python)
        .args(["-m", "pytest", "clients/python/tests", "-q", "-rs", "-s"])
        .args(["-p", "no:cacheprovider"])
        .current_dir(repo())
        .env("STEPSTREAM_TARGET", &addr)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "pytest failed ({}); output above",
        out.status
    );
    assert!(
        stdout.contains(" passed"),
        "pytest ran no test; output above"
    );
}
