//! Datasets in their canonical form: `images` u8 [N, C, H, W] and `labels` u8 [N] in safetensors,
//! plus the readers of the raw formats (IDX, CIFAR binary) and the sources they come from.

pub mod cifar;
pub mod fetch;
pub mod http;
pub mod idx;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use layerlab_pipeline::fsutil;

/// One split of a dataset, in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Row-major u8 pixels, [n, channels, height, width].
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }
    /// How many examples a limit such as `train.train_examples` takes from this split: the
    /// first `limit`, or all of them.
    pub fn limited_len(&self, limit: Option<u32>) -> usize {
        limit.map_or(self.len(), |n| (n as usize).min(self.len()))
    }
    /// The [n, c, h, w] shape of a batch of `n` images.
    pub fn batch_dims(&self, n: usize) -> [usize; 4] {
        [n, self.channels, self.height, self.width]
    }
    /// Checks that the buffers agree with the shape and every label is a class.
    pub fn check(&self, classes: usize) -> Result<()> {
        if self.images.len() != self.len() * self.image_size() {
            bail!("{} image bytes for {} labels of {} bytes each", self.images.len(), self.len(), self.image_size());
        }
        if let Some((i, l)) = self.labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            bail!("label {l} at index {i} is not a class (0 ..= {})", classes - 1);
        }
        Ok(())
    }
    /// Replaces a seeded fraction of the labels by uniform random classes (`train.label_noise`;
    /// at 1, the random-label setting of Zhang et al.): each example, independently, with
    /// probability `fraction`, gets a class drawn uniformly from all `classes` (so about one in
    /// `classes` of them keeps its own). Both draws are made for every example whatever the
    /// fraction, so the examples picked at a fraction are among those picked at any larger one,
    /// with the same new classes. Returns how many labels changed.
    pub fn with_label_noise(&mut self, fraction: f64, classes: usize, rng: &mut impl rand_core::RngCore) -> usize {
        let mut changed = 0;
        for label in &mut self.labels {
            let picked = crate::random::unit_f64(rng) < fraction;
            let class = (rng.next_u64() % classes as u64) as u8;
            if picked && class != *label {
                *label = class;
                changed += 1;
            }
        }
        changed
    }

    /// Examples per class.
    pub fn class_counts(&self, classes: usize) -> Vec<u64> {
        let mut counts = vec![0u64; classes];
        for &l in &self.labels {
            if (l as usize) < classes {
                counts[l as usize] += 1;
            }
        }
        counts
    }
}

/// The paths of a stored dataset.
pub fn split_path(dataset_dir: &Path, split: &str) -> PathBuf {
    dataset_dir.join(format!("{split}.safetensors"))
}
pub fn manifest_path(dataset_dir: &Path) -> PathBuf {
    dataset_dir.join("manifest.json")
}

/// Writes a split atomically as safetensors with the dataset name and source in the metadata, in
/// a fixed order (the `safetensors` crate's own writer orders metadata by a `HashMap`, so two
/// fetches of the same data would differ byte for byte).
pub fn write_split(path: &Path, split: &Split, dataset: &str, source: &str) -> Result<()> {
    let n = split.len();
    if split.images.len() != n * split.image_size() {
        bail!(
            "cannot write {}: {} image bytes for {n} images of {} bytes",
            path.display(),
            split.images.len(),
            split.image_size()
        );
    }
    let tensors = [
        ("images".to_string(), "U8", vec![n, split.channels, split.height, split.width], split.images.clone()),
        ("labels".to_string(), "U8", vec![n], split.labels.clone()),
    ];
    let metadata = BTreeMap::from([
        ("dataset".to_string(), dataset.to_string()),
        ("source".to_string(), source.to_string()),
        ("format".to_string(), "layerlab-dataset-1".to_string()),
    ]);
    fsutil::write_atomic(path, &crate::safetensors_io::safetensors_bytes(&tensors, &metadata))
}

/// Reads a split written by [`write_split`], checking names, dtypes and shapes.
pub fn read_split(path: &Path) -> Result<Split> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read dataset file {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        let why = crate::safetensors_io::safetensors_fault(&bytes, e);
        anyhow::anyhow!("{} is not a valid safetensors file: {why}", path.display())
    })?;
    let images = st.tensor("images").with_context(|| format!("{}: no tensor 'images'", path.display()))?;
    let labels = st.tensor("labels").with_context(|| format!("{}: no tensor 'labels'", path.display()))?;
    if images.dtype() != Dtype::U8 || images.shape().len() != 4 {
        bail!("{}: 'images' must be u8 [N, C, H, W], found {:?} {:?}", path.display(), images.dtype(), images.shape());
    }
    let labels_u8: Vec<u8> = match labels.dtype() {
        Dtype::U8 => labels.data().to_vec(),
        Dtype::I64 => labels
            .data()
            .chunks_exact(8)
            .map(|c| {
                let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                u8::try_from(v).with_context(|| format!("{}: label {v} out of range", path.display()))
            })
            .collect::<Result<_>>()?,
        other => bail!("{}: 'labels' must be u8 or i64, found {other:?}", path.display()),
    };
    let s = images.shape();
    if labels.shape() != [s[0]] {
        bail!("{}: {} images but labels of shape {:?}", path.display(), s[0], labels.shape());
    }
    let split = Split { images: images.data().to_vec(), labels: labels_u8, channels: s[1], height: s[2], width: s[3] };
    split.check(256).with_context(|| format!("{}", path.display()))?;
    Ok(split)
}

/// Loads `train` and `test` of a fetched dataset, refusing a folder without a manifest.
pub fn load(dataset_dir: &Path) -> Result<(Split, Split)> {
    if !manifest_path(dataset_dir).exists() {
        bail!("dataset folder {} has no manifest.json: run fetch-data first", dataset_dir.display());
    }
    let train = read_split(&split_path(dataset_dir, "train"))?;
    let test = read_split(&split_path(dataset_dir, "test"))?;
    if (train.channels, train.height, train.width) != (test.channels, test.height, test.width) {
        bail!("{}: train and test images differ in shape", dataset_dir.display());
    }
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label noise: none at 0; at 1 about nine in ten labels change and the new classes are
    /// near uniform; a smaller fraction changes a subset of a larger one's examples, to the same
    /// classes; the same seed gives the same labels, another seed others; images are untouched.
    #[test]
    fn label_noise_replaces_a_seeded_nested_fraction_by_uniform_classes() {
        let n = 20_000;
        let clean = Split {
            images: vec![7; n],
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            channels: 1,
            height: 1,
            width: 1,
        };
        let noisy = |fraction: f64, seed: u64| {
            let mut s = clean.clone();
            let changed = s.with_label_noise(fraction, 10, &mut crate::random::label_noise_rng(seed));
            (s, changed)
        };
        let (none, changed) = noisy(0.0, 1);
        assert_eq!((none.labels == clean.labels, changed), (true, 0));
        let (all, changed) = noisy(1.0, 1);
        assert!((0.88..0.92).contains(&(changed as f64 / n as f64)), "{changed} of {n} changed at 1");
        for count in all.class_counts(10) {
            assert!((1800..2200).contains(&count), "{:?}", all.class_counts(10));
        }
        let (some, changed_some) = noisy(0.3, 1);
        assert!((0.25..0.29).contains(&(changed_some as f64 / n as f64)), "{changed_some} of {n} changed at 0.3");
        for i in 0..n {
            if some.labels[i] != clean.labels[i] {
                assert_eq!(some.labels[i], all.labels[i], "example {i}: another class at 0.3 than at 1");
            }
        }
        assert_eq!(noisy(0.3, 1).0, some);
        assert_ne!(noisy(0.3, 2).0.labels, some.labels);
        assert_eq!(some.images, clean.images);
    }

    #[test]
    fn split_round_trips_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let split = Split { images: (0..24).collect(), labels: vec![3, 9], channels: 3, height: 2, width: 2 };
        let path = dir.path().join("train.safetensors");
        write_split(&path, &split, "toy", "test").unwrap();
        assert_eq!(read_split(&path).unwrap(), split);
        std::fs::write(&path, b"garbage").unwrap();
        let err = format!("{:#}", read_split(&path).unwrap_err());
        assert!(err.contains("train.safetensors"), "{err}");
    }
}
