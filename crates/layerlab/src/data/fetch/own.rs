//! The user's own datasets (`[[dataset]]` in the pipeline file): a train and a test file, each
//! holding `images` u8 [N, C, H, W] (or [N, H, W], one channel) and `labels` [N] as `.npz` arrays
//! or in layerlab's canonical safetensors form. Both are read and checked before anything is
//! written; then they are stored as a fetched dataset is (staging folder, manifest, stamp), so
//! every stage after fetch-data reads them the same way.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::npy::NpzTensors;
use candle_core::DType;
use tracing::info;

use layerlab_pipeline::cache::{self, own_dataset_key, Freshness};
use layerlab_pipeline::OwnDataset;

use super::install::{install, remove_stale_staging, TempDir};
use super::manifest::RawFileRecord;
use super::verify::Verified;
use super::{check_present, Attempt, CheckKind, FetchReport};
use crate::data::{read_split, Split};

/// Reads one split of an own dataset and checks it: `images` u8 with 3 or 4 dimensions, `labels`
/// of an integer type with one per image, every label a class. Errors name the file.
pub fn read_own_split(path: &Path, classes: usize) -> Result<Split> {
    let file = path.display();
    if let Err(e) = fs::metadata(path) {
        bail!("cannot read dataset file {file}: {e}");
    }
    let split = match path.extension().and_then(|x| x.to_str()) {
        Some("npz") => read_npz(path)?,
        Some("safetensors") => read_split(path)?,
        _ => bail!("{file}: a dataset file must be .npz or .safetensors"),
    };
    if split.is_empty() {
        bail!("{file}: holds no examples");
    }
    split.check(classes).with_context(|| format!("{file} (classes = {classes})"))?;
    Ok(split)
}

fn read_npz(path: &Path) -> Result<Split> {
    let file = path.display();
    let npz = NpzTensors::new(path).map_err(|e| anyhow!("{file} is not a readable .npz archive: {e}"))?;
    let mut names: Vec<&str> = npz.names().into_iter().map(String::as_str).collect();
    names.sort_unstable();
    let missing: Vec<&str> = ["images", "labels"].into_iter().filter(|n| !names.contains(n)).collect();
    if !missing.is_empty() {
        bail!(
            "{file}: no array {} (it holds {}); a dataset file holds `images` u8 [N, C, H, W] and `labels` [N]",
            missing.join(" or "),
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        );
    }
    let read = |name: &str| {
        npz.get(name)
            .map_err(|e| anyhow!("{file}: cannot read array '{name}': {e}"))?
            .ok_or_else(|| anyhow!("{file}: no array '{name}'"))
    };
    let (image_shape, image_dtype) =
        npz.get_shape_and_dtype("images").map_err(|e| anyhow!("{file}: cannot read array 'images': {e}"))?;
    let dims = image_shape.dims().to_vec();
    let (n, channels, height, width) = match (image_dtype, dims.as_slice()) {
        (DType::U8, &[n, c, h, w]) => (n, c, h, w),
        (DType::U8, &[n, h, w]) => (n, 1, h, w),
        _ => bail!("{file}: 'images' must be uint8 [N, C, H, W] or [N, H, W], found {image_dtype:?} {dims:?}"),
    };
    if channels == 0 || height == 0 || width == 0 {
        bail!("{file}: 'images' of shape {dims:?} has empty images");
    }
    let (label_shape, label_dtype) =
        npz.get_shape_and_dtype("labels").map_err(|e| anyhow!("{file}: cannot read array 'labels': {e}"))?;
    if label_shape.dims() != [n] {
        bail!("{file}: {n} images but 'labels' of shape {:?} (one label per image)", label_shape.dims());
    }
    let labels = read("labels")?;
    let values: Vec<i64> = match label_dtype {
        DType::U8 => labels.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::U32 => labels.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I16 => labels.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
        DType::I32 => labels.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => labels.to_vec1::<i64>()?,
        other => bail!("{file}: 'labels' must be integers (uint8, int16, int32, int64 or uint32), found {other:?}"),
    };
    let labels = values
        .iter()
        .enumerate()
        .map(|(i, &v)| u8::try_from(v).map_err(|_| anyhow!("{file}: label {v} at index {i} is not a class")))
        .collect::<Result<Vec<u8>>>()?;
    let images = read("images")?.flatten_all()?.to_vec1::<u8>()?;
    Ok(Split { images, labels, channels, height, width })
}

/// Stores an own dataset in `dir` (`<datasets_dir>/<name>`) unless the copy there was made from
/// the same files (its stamp holds their sha256). Nothing is written unless both files pass.
pub fn import_own(own: &Arc<OwnDataset>, dir: &Path, force: bool) -> Result<FetchReport> {
    let started = Instant::now();
    let name = own.name.as_str();
    // Hashed once: for the key, which the stamp keeps, and for the manifest's file records.
    let digests = [cache::file_sha256(&own.train), cache::file_sha256(&own.test)];
    let key = own_dataset_key(own, &digests);
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    remove_stale_staging(&parent, name);
    if !force && cache::freshness(dir, &key) == Freshness::Fresh {
        if let Ok(manifest) = check_present(name, dir) {
            info!("{name}: already present in {} from the same files", dir.display());
            return Ok(FetchReport::already_present(name, dir, manifest, started));
        }
    }

    let train = read_own_split(&own.train, own.classes)?;
    let test = read_own_split(&own.test, own.classes)?;
    let shape = |s: &Split| [s.channels, s.height, s.width];
    if shape(&train) != shape(&test) {
        bail!(
            "dataset '{name}': the train images ({}) are {:?} but the test images ({}) are {:?}",
            own.train.display(),
            shape(&train),
            own.test.display(),
            shape(&test)
        );
    }
    let files = [&own.train, &own.test]
        .into_iter()
        .zip(digests)
        .map(|(path, sha256)| {
            let bytes =
                fs::metadata(path).with_context(|| format!("cannot read dataset file {}", path.display()))?.len();
            Ok(RawFileRecord { name: path.display().to_string(), sha256, bytes })
        })
        .collect::<Result<Vec<_>>>()?;
    let source = "own files".to_string();
    let verified =
        Verified { source: source.clone(), check: CheckKind::StructureOnly, files, archive: None, train, test };
    let manifest = verified.manifest(name, own.classes, started.elapsed().as_secs_f64());
    if dir.exists() && !dir.is_dir() {
        bail!("dataset folder {} exists and is not a folder", dir.display());
    }
    fs::create_dir_all(&parent).with_context(|| format!("cannot create the datasets folder {}", parent.display()))?;
    let staging = TempDir::create(parent.join(format!(".{name}.fetch-{}", std::process::id())))
        .with_context(|| format!("cannot write to the datasets folder {}", parent.display()))?;
    install(dir, &key, staging.path(), &verified, &manifest)?;
    drop(staging);
    info!(
        "{name}: stored {} + {} examples from {} and {}",
        manifest.train.samples,
        manifest.test.samples,
        own.train.display(),
        own.test.display()
    );
    Ok(FetchReport {
        dataset: name.to_string(),
        dir: dir.to_path_buf(),
        source: source.clone(),
        already_present: false,
        check: CheckKind::StructureOnly,
        train: manifest.train.samples,
        test: manifest.test.samples,
        seconds: started.elapsed().as_secs_f64(),
        attempts: vec![Attempt { source, failure: None }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn npz(path: &Path, arrays: &[(&str, Tensor)]) {
        let refs: Vec<(&str, &Tensor)> = arrays.iter().map(|(n, t)| (*n, t)).collect();
        Tensor::write_npz(&refs, path).unwrap();
    }
    fn images(n: usize, shape: &[usize]) -> Tensor {
        let len: usize = shape.iter().product();
        Tensor::from_vec((0..len).map(|i| (i * 7 % 256) as u8).collect::<Vec<u8>>(), shape, &Device::Cpu)
            .unwrap()
            .narrow(0, 0, n)
            .unwrap()
    }
    fn labels(values: &[i64]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    /// [N, H, W] images are one channel; int64 labels (numpy's default) become bytes; pixels stay.
    #[test]
    fn npz_splits_read_with_their_shape_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.npz");
        npz(&path, &[("images", images(3, &[3, 2, 2])), ("labels", labels(&[0, 9, 4]))]);
        let split = read_own_split(&path, 10).unwrap();
        assert_eq!((split.channels, split.height, split.width), (1, 2, 2));
        assert_eq!(split.labels, [0, 9, 4]);
        assert_eq!(split.images, (0..12).map(|i| (i * 7 % 256) as u8).collect::<Vec<_>>());
    }

    #[test]
    fn faulty_npz_files_are_named_with_their_fault() {
        let dir = tempfile::tempdir().unwrap();
        let err = |arrays: &[(&str, Tensor)], classes: usize| {
            let path = dir.path().join("bad.npz");
            npz(&path, arrays);
            format!("{:#}", read_own_split(&path, classes).unwrap_err())
        };
        let e = err(&[("images", images(3, &[3, 1, 2, 2])), ("labels", labels(&[0, 12, 4]))], 10);
        assert!(e.contains("bad.npz") && e.contains("label 12 at index 1 is not a class"), "{e}");
        let e = err(&[("images", images(3, &[3, 1, 2, 2]))], 10);
        assert!(e.contains("bad.npz: no array labels (it holds images)"), "{e}");
        let floats = images(3, &[3, 1, 2, 2]).to_dtype(DType::F32).unwrap();
        let e = err(&[("images", floats), ("labels", labels(&[0, 1, 2]))], 10);
        assert!(e.contains("'images' must be uint8") && e.contains("F32"), "{e}");
        let e = err(&[("images", images(3, &[3, 1, 2, 2])), ("labels", labels(&[0, 1]))], 10);
        assert!(e.contains("3 images but 'labels' of shape [2]"), "{e}");
        let e = err(&[("images", images(3, &[3, 1, 2, 2])), ("labels", labels(&[0, -1, 2]))], 10);
        assert!(e.contains("label -1 at index 1"), "{e}");

        let path = dir.path().join("cut.npz");
        npz(&path, &[("images", images(3, &[3, 1, 2, 2])), ("labels", labels(&[0, 1, 2]))]);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", read_own_split(&path, 10).unwrap_err());
        assert!(e.contains("cut.npz is not a readable .npz archive"), "{e}");
        let e = format!("{:#}", read_own_split(&dir.path().join("absent.npz"), 10).unwrap_err());
        assert!(e.contains("cannot read dataset file") && e.contains("absent.npz"), "{e}");
    }

    /// Both files are checked before anything is written: a bad test file leaves no dataset
    /// folder; good files are stored, and found present from the same files afterwards.
    #[test]
    fn an_own_dataset_is_stored_only_when_both_files_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (train, test) = (dir.path().join("train.npz"), dir.path().join("test.npz"));
        npz(&train, &[("images", images(4, &[4, 1, 2, 2])), ("labels", labels(&[0, 1, 2, 1]))]);
        npz(&test, &[("images", images(2, &[2, 1, 3, 3])), ("labels", labels(&[0, 1]))]);
        let own = Arc::new(OwnDataset { name: "mine".into(), classes: 3, train, test: test.clone() });
        let target = dir.path().join("datasets/mine");
        let e = format!("{:#}", import_own(&own, &target, false).unwrap_err());
        assert!(e.contains("test images") && e.contains("[1, 3, 3]"), "{e}");
        assert!(!target.exists());
        npz(&test, &[("images", images(2, &[2, 1, 2, 2])), ("labels", labels(&[2, 0]))]);
        let report = import_own(&own, &target, false).unwrap();
        assert!(!report.already_present && (report.train, report.test) == (4, 2));
        let (stored_train, stored_test) = crate::data::load(&target).unwrap();
        assert_eq!((stored_train.labels, stored_test.labels), (vec![0, 1, 2, 1], vec![2, 0]));
        assert!(import_own(&own, &target, false).unwrap().already_present);
    }
}
