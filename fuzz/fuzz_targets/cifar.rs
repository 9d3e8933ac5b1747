//! The CIFAR-10 reader on arbitrary bytes: one binary batch, and the `.tar.gz` archive (tried
//! both raw and after gzip-compressing the input, so that the tar reader sees varied archives).
//! Any input must give a value or an error, never a panic.

#![no_main]

use std::io::Write;

use layerlab::data::cifar;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(split) = cifar::parse_batch(data) {
        assert_eq!(split.images.len(), split.len() * cifar::IMAGE_BYTES);
    }
    let _ = cifar::read_archive(data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if gz.write_all(data).is_ok() {
        if let Ok(bytes) = gz.finish() {
            let _ = cifar::read_archive(&bytes[..]);
        }
    }
});
