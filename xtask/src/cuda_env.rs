//! `cargo xtask cuda-env`: the CUDA 13.0 toolkit pieces that a `--features cuda` build needs, on a
//! machine with no GPU and no system CUDA (this project's build machines, and CI).
//!
//! - nvcc, the runtime, cuBLAS, cuRAND, NVRTC and cuDNN come from NVIDIA's PyPI wheels, pinned, in
//!   a virtual environment under `--dir`; unversioned `.so` links are added for the linker.
//! - candle links the CUDA driver library (`libcuda.so.1`), which only a GPU driver installs. A
//!   stub exporting every driver function that cudarc declares stands in for it at link time. The
//!   stub never ships: on a GPU machine the binary loads the real driver.
//! - `env.sh` sets what the build reads: nvcc on `PATH`, `CUDA_HOME`, the CUDA version (so that
//!   nothing probes a GPU), the compute capability, and the library search path.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::flags;

/// The wheels, pinned to CUDA 13.0 (cudarc's `cuda-13000`) and cuDNN 9.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-curand==10.4.0.35",
    "nvidia-cublas==13.0.0.19",
    "nvidia-cudnn-cu13==9.13.0.50",
];

impl flags::CudaEnv {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let dir = sh.current_dir().join(&self.dir);
        let venv = dir.join("venv");
        let python = venv.join("bin/python");
        let ready = venv.join(".wheels-installed");
        if fs::read_to_string(&ready).ok().as_deref() != Some(&WHEELS.join("\n")) {
            eprintln!("cuda-env: installing the CUDA 13.0 wheels into {} (about 1.5 GB)", venv.display());
            cmd!(sh, "python3 -m venv {venv}")
                .run()
                .context("cannot create the virtual environment (python3 -m venv)")?;
            cmd!(sh, "{python} -m pip install --quiet --disable-pip-version-check --no-cache-dir {WHEELS...}")
                .run()
                .context("cannot install the CUDA wheels")?;
            fs::write(&ready, WHEELS.join("\n"))?;
        }
        let site = cmd!(sh, "{python} -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))'")
            .read()
            .context("the wheels' nvidia package is not importable")?;
        let nvidia = Path::new(site.trim()).join("nvidia");
        let cuda_home = nvidia.join("cu13");
        let libs = [cuda_home.join("lib"), nvidia.join("cudnn/lib")];
        for lib in &libs {
            link_unversioned(lib)?;
        }
        let stub = dir.join("stub");
        write_driver_stub(sh, &stub)?;

        let mut env =
            String::from("# Written by `cargo xtask cuda-env`: source it before `cargo build --features cuda`.\n");
        let search = libs.iter().chain([&stub]).map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
        let _ = writeln!(env, "export CUDA_HOME={}", cuda_home.display());
        let _ = writeln!(env, "export PATH={}:$PATH", cuda_home.join("bin").display());
        let _ = writeln!(env, "export CUDARC_CUDA_VERSION=13000");
        let _ = writeln!(env, "export CUDA_COMPUTE_CAP={}", self.compute_cap);
        let _ = writeln!(env, "export LIBRARY_PATH={search}${{LIBRARY_PATH:+:$LIBRARY_PATH}}");
        let env_file = dir.join("env.sh");
        fs::write(&env_file, env)?;
        println!("cuda-env: ready. Build for a GPU with:");
        println!("  source {} && cargo build --release --features train/cuda,snapshot/cuda,reset-eval/cuda -p train -p snapshot -p reset-eval", env_file.display());
        println!("or run the pipeline there with `cargo xtask run-all --cuda --device cuda` after sourcing it.");
        Ok(())
    }
}

/// `libfoo.so` → `libfoo.so.N` for every library the linker looks for by its plain name.
fn link_unversioned(lib: &Path) -> Result<()> {
    let entries = fs::read_dir(lib).with_context(|| format!("cannot list {}", lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((stem, _version)) = name.split_once(".so.") else { continue };
        if stem.contains("builtins") || stem.ends_with(".alt") || name.matches('.').count() > 2 {
            continue;
        }
        let plain = lib.join(format!("{stem}.so"));
        if !plain.exists() {
            std::os::unix::fs::symlink(&name, &plain).with_context(|| format!("cannot link {}", plain.display()))?;
        }
    }
    Ok(())
}

/// A `libcuda.so` (soname `libcuda.so.1`) with an empty function for every driver entry point
/// cudarc declares, built from the cudarc source that Cargo.lock pins.
fn write_driver_stub(sh: &Shell, stub: &Path) -> Result<()> {
    cmd!(sh, "cargo fetch --quiet").run().context("cannot fetch the crates (cargo fetch)")?;
    let sys = cudarc_source(sh)?.join("src/driver/sys/mod.rs");
    let text = fs::read_to_string(&sys).with_context(|| format!("cannot read {}", sys.display()))?;
    let mut names: Vec<&str> = text
        .split("load::<_F>(\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name))
        .filter(|name| name.starts_with("cu"))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.len() < 100 {
        bail!("found only {} driver functions in {}: has cudarc's layout changed?", names.len(), sys.display());
    }
    fs::create_dir_all(stub)?;
    let source: String = names.iter().map(|n| format!("void {n}(void) {{}}\n")).collect();
    let c_file = stub.join("libcuda-stub.c");
    fs::write(&c_file, source)?;
    let so = stub.join("libcuda.so");
    cmd!(sh, "cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o {so} {c_file}")
        .run()
        .context("cannot build the link stub (cc)")?;
    Ok(())
}

/// The folder of the cudarc crate that Cargo.lock pins, in Cargo's registry.
fn cudarc_source(sh: &Shell) -> Result<PathBuf> {
    let metadata = cmd!(sh, "cargo metadata --format-version 1 --all-features --quiet").read()?;
    let metadata: serde_json::Value = serde_json::from_str(&metadata).context("cargo metadata gave no JSON")?;
    let packages = metadata["packages"].as_array().context("cargo metadata lists no packages")?;
    let manifest = packages
        .iter()
        .find(|p| p["name"] == "cudarc")
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in the dependency graph (is candle's cuda feature gone?)")?;
    Ok(Path::new(manifest).parent().context("cudarc's manifest has no folder")?.to_path_buf())
}
