//! The pipeline.toml loader on arbitrary text: it must give a pipeline or an error naming the
//! file, never a panic.

#![no_main]

use std::path::Path;

use layerlab_pipeline::Pipeline;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Pipeline::parse(text, Path::new("fuzz.toml"), Path::new("/base")) {
        Ok(p) => {
            assert!(!p.experiments.is_empty());
            for e in &p.experiments {
                let _ = e.checkpoint_epochs();
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("fuzz.toml"), "the error does not name the file: {msg}");
        }
    }
});
