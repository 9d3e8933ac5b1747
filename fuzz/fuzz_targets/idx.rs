//! The IDX reader (MNIST, Fashion-MNIST) on arbitrary bytes: images, labels, and a pair of files
//! split from one input. Any input must give a value or an error, never a panic.

#![no_main]

use layerlab::data::idx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(images) = idx::parse_images(data) {
        assert_eq!(images.pixels.len(), images.n * images.rows * images.cols);
    }
    if let Ok(labels) = idx::parse_labels(data) {
        assert_eq!(labels.len() + 8, data.len());
    }
    // The first byte chooses where the input is cut into an images file and a labels file.
    if let Some((&cut, rest)) = data.split_first() {
        let at = (cut as usize * rest.len()) / 255;
        let (images, labels) = rest.split_at(at.min(rest.len()));
        let _ = idx::parse_split("images", images, "labels", labels, 10);
    }
});
