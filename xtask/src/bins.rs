//! The stage binaries that the runners start: which ones (profile, CUDA, or built elsewhere), and
//! building them.

use std::path::PathBuf;

use anyhow::{bail, Result};
use xshell::{cmd, Shell};

/// Which stage binaries to build: dev or release profile, with or without CUDA.
#[derive(Debug, Clone, Default)]
pub struct Build {
    pub dev: bool,
    pub cuda: bool,
    /// Binaries built elsewhere (`--bin-dir`): nothing is built.
    pub prebuilt: Option<PathBuf>,
}

/// Builds the stage binaries once and returns the folder that holds them.
pub fn build(sh: &Shell, build: &Build) -> Result<PathBuf> {
    if let Some(dir) = &build.prebuilt {
        let dir = sh.current_dir().join(dir);
        for stage in ["fetch-data", "train", "snapshot", "reset-eval", "aggregate"] {
            if !dir.join(stage).is_file() {
                bail!("--bin-dir {}: there is no `{stage}` binary in it", dir.display());
            }
        }
        return Ok(dir);
    }
    let dev = build.dev;
    let profile: &[&str] = if dev { &[] } else { &["--release"] };
    let features: &[&str] = if build.cuda { &["--features", "train/cuda,snapshot/cuda,reset-eval/cuda"] } else { &[] };
    cmd!(
        sh,
        "cargo build --quiet {profile...} {features...} -p fetch-data -p train -p snapshot -p reset-eval -p aggregate"
    )
    .run()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| sh.current_dir().join("target"));
    Ok(target.join(if dev { "debug" } else { "release" }))
}
