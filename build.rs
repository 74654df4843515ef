//! Compiles `proto/` with protox (pure Rust, no system protoc) into tonic/prost code and writes the
//! encoded descriptor set that server reflection serves. With the `cuda` feature it also compiles
//! `kernels/fused.cu` to PTX with nvcc (the one `../shared/gpu/cuda-env.sh` puts on PATH).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The contract, and the xDS ORCA load-report service that balancers read.
    let protos = [
        "proto/stepstream/v1/stepstream.proto",
        "proto/xds/data/orca/v3/orca_load_report.proto",
        "proto/xds/service/orca/v3/orca.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("stepstream_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels(&out_dir)?;
    }
    Ok(())
}

/// `kernels/fused.cu` -> `$OUT_DIR/fused.ptx` (sm_80 PTX: tensor-core WMMA for f16 and bf16; the
/// driver JIT-compiles it for newer cards such as sm_90).
fn compile_kernels(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let source = "kernels/fused.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=NVCC");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let ptx = out_dir.join("fused.ptx");
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-arch=sm_80", "-O3", "-std=c++17", "-o"])
        .arg(&ptx)
        .arg(source)
        .status()
        .map_err(|e| {
            format!("cannot run `{nvcc}` ({e}): source ../shared/gpu/cuda-env.sh first")
        })?;
    if !status.success() {
        return Err(format!("`{nvcc}` failed on {source} ({status})").into());
    }
    Ok(())
}
