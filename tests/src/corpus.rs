//! The malformed-input corpus of `tests/corpus/`: every file is made here, never edited by hand.
//!
//! Each [`Case`] is one bad file for one reader (IDX, CIFAR-10 batch or archive, checkpoint,
//! dataset split, Parquet table, pipeline.toml), with the words its error must contain. The test
//! `tests/tests/corpus.rs` checks that the committed files equal what [`cases`] makes (run it
//! with `LAYERLAB_BLESS_CORPUS=1` to rewrite them) and feeds each file to the binary that reads it.
//! `tests/corpus/fuzz-regressions/` is apart: crashing inputs found by `cargo xtask fuzz`, kept as
//! they were found.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use layerlab::data::{cifar, idx};
use layerlab::model::Architecture;
use layerlab::pipeline::ModelConfig;
use layerlab::safetensors_io::safetensors_bytes;

/// Which reader a case is for, and where the test puts the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// One of the four MNIST IDX files (by index into `IDX_FILES`), beside three good ones; read by
    /// `fetch-data mnist --from DIR`.
    Idx(usize),
    /// One CIFAR-10 batch (by name), beside five good ones; `fetch-data cifar10 --from DIR`.
    CifarBatch(&'static str),
    /// The CIFAR-10 archive itself; `fetch-data cifar10 --from FILE`.
    CifarArchive,
    /// `epoch-0001.safetensors` of a finished run; read by `snapshot`.
    Checkpoint,
    /// The dataset's `test.safetensors`; read by `snapshot` (it builds the network from its shape).
    DatasetSplit,
    /// A seed's `reset/results.parquet`; read by `aggregate`.
    ResultsTable,
    /// A seed's `snapshot/movement.parquet`; read by `aggregate`.
    MovementTable,
    /// The pipeline file given to `train --config`.
    Pipeline,
    /// `epoch-0001.safetensors` of a folder imported by `train.import` (epochs 0 and 2 good);
    /// read by `train`.
    Import,
    /// `test.npz` of a `[[dataset]]` (10 classes), beside a good `train.npz` of 1×28×28 images;
    /// read by `fetch-data NAME --config FILE`.
    OwnDataset,
}

/// One malformed file.
#[derive(Debug, Clone)]
pub struct Case {
    /// Path under `tests/corpus/`.
    pub path: String,
    pub bytes: Vec<u8>,
    pub reader: Reader,
    /// Words the error message must contain (besides the file's name), naming the fault.
    pub fault: Vec<String>,
}

fn case(path: &str, bytes: Vec<u8>, reader: Reader, fault: &[&str]) -> Case {
    Case { path: path.to_string(), bytes, reader, fault: fault.iter().map(|s| s.to_string()).collect() }
}

/// A small deterministic byte pattern (an LCG), so that files differ from all-zeros.
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// Labels 0..9 repeating.
fn labels(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 10) as u8).collect()
}

/// Four good, small MNIST-shaped IDX files (12 train and 4 test images of 28×28), in the order of
/// `IDX_FILES`. They fail only the pinned checksum, after every structural check.
pub fn good_idx_files() -> [Vec<u8>; 4] {
    [
        idx::encode_images(12, 28, 28, &pattern(12 * 784, 1)),
        idx::encode_labels(&labels(12)),
        idx::encode_images(4, 28, 28, &pattern(4 * 784, 2)),
        idx::encode_labels(&labels(4)),
    ]
}

/// A good CIFAR-10 batch of `n` records.
pub fn good_cifar_batch(n: usize, seed: u32) -> Vec<u8> {
    let pixels = pattern(n * cifar::IMAGE_BYTES, seed);
    let mut out = Vec::new();
    for (r, chunk) in pixels.chunks_exact(cifar::IMAGE_BYTES).enumerate() {
        out.extend(cifar::encode_record((r % 10) as u8, chunk.try_into().expect("one image")));
    }
    out
}

/// A `.tar.gz` of `entries` (path, bytes), made deterministically (fixed mode and times).
pub fn tar_gz(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        tar.append_data(&mut header, path, &bytes[..]).expect("in memory");
    }
    tar.into_inner().expect("in memory").finish().expect("in memory")
}

/// The model of the corpus test's run: an FCN with one hidden layer of 8 on MNIST.
pub fn fixture_model(width: u32) -> Architecture {
    let cfg = ModelConfig {
        arch: layerlab::pipeline::Arch::Fcn,
        depth: 1,
        width,
        width_mult: 1.0,
        batch_norm: true,
        pad_to: 0,
        init: layerlab::pipeline::WeightInit::Pytorch,
    };
    Architecture::build(&cfg, [1, 28, 28], 10).expect("a valid model")
}

type Entry = (String, &'static str, Vec<usize>, Vec<u8>);

/// The tensors of a checkpoint of `arch` (deterministic small values), as `safetensors_bytes` takes them.
fn checkpoint_tensors(arch: &Architecture) -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, (_, spec)) in arch.tensor_specs().enumerate() {
        let n: usize = spec.shape.iter().product();
        let data: Vec<u8> =
            pattern(n, 100 + i as u32).into_iter().flat_map(|b| ((b as f32 - 128.0) / 1024.0).to_le_bytes()).collect();
        out.push((spec.name.clone(), "F32", spec.shape.clone(), data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The metadata of epoch 1 of seed 0 of experiment `tiny`.
fn checkpoint_meta(arch: &str) -> BTreeMap<String, String> {
    [
        ("format", "layerlab-checkpoint-1"),
        ("experiment", "tiny"),
        ("seed", "0"),
        ("epoch", "1"),
        ("step", "10"),
        ("architecture", arch),
        ("config_hash", "0000000000000000"),
        ("layerlab_version", "corpus"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A safetensors file whose header is the given JSON text, followed by `data`.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut head = header.as_bytes().to_vec();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend(head);
    out.extend_from_slice(data);
    out
}

fn idx_cases() -> Vec<Case> {
    let good = good_idx_files();
    let mut cases = Vec::new();
    let mut truncated = good[0].clone();
    truncated.truncate(truncated.len() - 100);
    cases.push(case("idx/images-truncated", truncated, Reader::Idx(0), &["9408 data bytes", "holds 9308: truncated"]));
    cases.push(case("idx/images-short-header", good[0][..10].to_vec(), Reader::Idx(0), &["shorter than the 16-byte"]));
    cases.push(case("idx/images-empty", Vec::new(), Reader::Idx(2), &["0 bytes"]));
    let mut lying = good[0].clone();
    lying[4..8].copy_from_slice(&60_000u32.to_be_bytes());
    cases.push(case("idx/images-count-lies", lying, Reader::Idx(0), &["60000 images", "truncated"]));
    let mut huge = good[2].clone();
    for at in [4, 8, 12] {
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    }
    cases.push(case("idx/images-huge-dims", huge, Reader::Idx(2), &["4294967295 images", "truncated"]));
    let mut trailing = good[1].clone();
    trailing.extend_from_slice(b"extra");
    cases.push(case("idx/labels-trailing-bytes", trailing, Reader::Idx(1), &["5 bytes too many"]));
    cases.push(case("idx/labels-given-images", good[2].clone(), Reader::Idx(3), &["magic number is 0x00000803"]));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&good[0]).expect("in memory");
    let mut gz_bytes = gz.finish().expect("in memory");
    gz_bytes[4..8].copy_from_slice(&[0; 4]);
    cases.push(case("idx/images-gzip-not-named-gz", gz_bytes, Reader::Idx(0), &["magic number is 0x1f8b"]));
    let mut bad_label = good[3].clone();
    *bad_label.last_mut().expect("labels") = 42;
    cases.push(case("idx/labels-out-of-range", bad_label, Reader::Idx(3), &["label 42 at index 3"]));
    cases.push(case(
        "idx/labels-count-mismatch",
        idx::encode_labels(&labels(11)),
        Reader::Idx(1),
        &["12 images", "11 labels"],
    ));
    cases
}

fn cifar_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut partial = good_cifar_batch(2, 20);
    partial.truncate(partial.len() - 7);
    cases.push(case(
        "cifar/batch-partial-record",
        partial,
        Reader::CifarBatch("data_batch_3.bin"),
        &["not a multiple of the 3073-byte record"],
    ));
    cases.push(case("cifar/batch-empty", Vec::new(), Reader::CifarBatch("test_batch.bin"), &["holds no records"]));
    let mut label = good_cifar_batch(3, 21);
    label[cifar::RECORD_BYTES * 2] = 200;
    cases.push(case(
        "cifar/batch-bad-label",
        label,
        Reader::CifarBatch("data_batch_1.bin"),
        &["record 2 has label 200"],
    ));
    let entries = |skip: &str| -> Vec<(String, Vec<u8>)> {
        crate::cifar_batches(2)
            .into_iter()
            .filter(|(n, _)| n != skip)
            .map(|(n, b)| (format!("{}/{n}", cifar::ARCHIVE_DIR), b))
            .collect()
    };
    cases.push(case(
        "cifar/archive-missing-batch.tar.gz",
        tar_gz(&entries("data_batch_4.bin")),
        Reader::CifarArchive,
        &["lacks cifar-10-batches-bin/data_batch_4.bin"],
    ));
    let whole = tar_gz(&entries(""));
    cases.push(case(
        "cifar/archive-truncated.tar.gz",
        whole[..whole.len() / 2].to_vec(),
        Reader::CifarArchive,
        &["cannot read"],
    ));
    cases.push(case(
        "cifar/archive-not-gzip.tar.gz",
        b"PK\x03\x04 a zip file, not a tar.gz".to_vec(),
        Reader::CifarArchive,
        &["not a gzip-compressed tar archive"],
    ));
    let mut bad = entries("");
    bad[5].1.push(0);
    cases.push(case(
        "cifar/archive-bad-test-batch.tar.gz",
        tar_gz(&bad),
        Reader::CifarArchive,
        &["test_batch.bin", "not a multiple of the 3073-byte record"],
    ));
    cases
}

fn checkpoint_cases() -> Vec<Case> {
    let arch = fixture_model(8);
    let good = checkpoint_tensors(&arch);
    let meta = checkpoint_meta(&arch.name);
    let bytes = |t: &[Entry], m: &BTreeMap<String, String>| safetensors_bytes(t, m);
    let whole = bytes(&good, &meta);
    let mut cases = Vec::new();
    cases.push(case(
        "checkpoint/truncated.safetensors",
        whole[..whole.len() - 1000].to_vec(),
        Reader::Checkpoint,
        &["truncated"],
    ));
    cases.push(case("checkpoint/empty.safetensors", Vec::new(), Reader::Checkpoint, &["truncated"]));
    let mut head_lies = whole.clone();
    head_lies[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(case("checkpoint/header-length-lies.safetensors", head_lies, Reader::Checkpoint, &["header"]));
    // A tensor whose shape needs more bytes than its offsets give it.
    let header = format!(
        r#"{{"__metadata__":{},"fc1.bias":{{"dtype":"F32","shape":[800],"data_offsets":[0,32]}}}}"#,
        serde_json::to_string(&meta).expect("strings")
    );
    cases.push(case(
        "checkpoint/shape-lies.safetensors",
        raw_safetensors(&header, &[0; 32]),
        Reader::Checkpoint,
        &["fc1.bias"],
    ));
    let mut wrong = good.clone();
    wrong[0].1 = "F64";
    let doubled = wrong[0].3.repeat(2);
    wrong[0].3 = doubled;
    cases.push(case(
        "checkpoint/wrong-dtype.safetensors",
        bytes(&wrong, &meta),
        Reader::Checkpoint,
        &["fc1.bias", "F64, expected F32"],
    ));
    let missing: Vec<Entry> = good.iter().filter(|t| t.0 != "fc2.weight").cloned().collect();
    cases.push(case(
        "checkpoint/missing-tensor.safetensors",
        bytes(&missing, &meta),
        Reader::Checkpoint,
        &["tensor 'fc2.weight' is missing"],
    ));
    let mut extra = good.clone();
    extra.push(("fc9.weight".into(), "F32", vec![2], vec![0; 8]));
    cases.push(case(
        "checkpoint/extra-tensor.safetensors",
        bytes(&extra, &meta),
        Reader::Checkpoint,
        &["tensor 'fc9.weight' does not belong to fcn-1x8"],
    ));
    let other = fixture_model(16);
    cases.push(case(
        "checkpoint/other-architecture.safetensors",
        bytes(&checkpoint_tensors(&other), &checkpoint_meta(&other.name)),
        Reader::Checkpoint,
        &["holds a fcn-1x16 network, expected fcn-1x8"],
    ));
    cases.push(case(
        "checkpoint/other-shapes-same-tag.safetensors",
        bytes(&checkpoint_tensors(&other), &meta),
        Reader::Checkpoint,
        &["has shape [16, 784], expected [8, 784]"],
    ));
    let mut no_meta = meta.clone();
    no_meta.remove("architecture");
    cases.push(case(
        "checkpoint/no-metadata.safetensors",
        bytes(&good, &no_meta),
        Reader::Checkpoint,
        &["not a layerlab checkpoint", "metadata lacks 'architecture'"],
    ));
    let mut epoch2 = meta.clone();
    epoch2.insert("epoch".into(), "2".into());
    cases.push(case(
        "checkpoint/wrong-epoch.safetensors",
        bytes(&good, &epoch2),
        Reader::Checkpoint,
        &["says epoch 2 seed 0, expected epoch 1 seed 0"],
    ));
    let mut other_settings = meta.clone();
    other_settings.insert("config_hash".into(), "feedfacefeedface".into());
    cases.push(case(
        "checkpoint/other-settings.safetensors",
        bytes(&good, &other_settings),
        Reader::Checkpoint,
        &["was trained with other settings", "config hash feedfacefeedface"],
    ));
    cases.push(case(
        "checkpoint/header-not-json.safetensors",
        raw_safetensors("{\"fc1.bias\": [", &[]),
        Reader::Checkpoint,
        &["header"],
    ));
    // The dataset split read to build the network.
    let labels_only = safetensors_bytes(&[("labels".into(), "U8", vec![4], vec![1, 2, 3, 4])], &BTreeMap::new());
    cases.push(case("dataset/no-images.safetensors", labels_only, Reader::DatasetSplit, &["no tensor 'images'"]));
    let flat = safetensors_bytes(
        &[("images".into(), "U8", vec![2, 784], vec![0; 1568]), ("labels".into(), "U8", vec![2], vec![1, 2])],
        &BTreeMap::new(),
    );
    cases.push(case(
        "dataset/images-2d.safetensors",
        flat,
        Reader::DatasetSplit,
        &["'images' must be u8 [N, C, H, W]"],
    ));
    cases
}

/// Checkpoints trained elsewhere (`train.import`): tensors under our names or torchvision's, no
/// layerlab metadata needed, every fault of a file in one message.
fn import_cases() -> Vec<Case> {
    let arch = fixture_model(8);
    let good = checkpoint_tensors(&arch);
    let epoch1: BTreeMap<String, String> = [("epoch".to_string(), "1".to_string())].into();
    let bytes = |t: &[Entry], m: &BTreeMap<String, String>| safetensors_bytes(t, m);
    let whole = bytes(&good, &epoch1);
    let mut cases = vec![case(
        "import/truncated.safetensors",
        whole[..whole.len() - 1000].to_vec(),
        Reader::Import,
        &["not a valid safetensors file", "truncated"],
    )];
    cases.push(case(
        "import/not-safetensors.safetensors",
        b"PK\x03\x04 a zip file".to_vec(),
        Reader::Import,
        &["not a valid safetensors file"],
    ));
    // A missing tensor, an unexpected one and a wrong shape, all named at once.
    let mut mismatched: Vec<Entry> = good.iter().filter(|t| t.0 != "fc1.bias").cloned().collect();
    mismatched.push(("fc9.weight".into(), "F32", vec![2], vec![0; 8]));
    let at = mismatched.iter().position(|t| t.0 == "fc2.weight").expect("fc2.weight");
    mismatched[at].2 = vec![10, 4];
    mismatched[at].3.truncate(40 * 4);
    mismatched.sort_by(|a, b| a.0.cmp(&b.0));
    cases.push(case(
        "import/mismatched.safetensors",
        bytes(&mismatched, &epoch1),
        Reader::Import,
        &[
            "does not fit fcn-1x8",
            "tensor 'fc1.bias' [8] is missing",
            "unexpected tensor 'fc9.weight'",
            "tensor 'fc2.weight' has shape [10, 4], expected [10, 8]",
        ],
    ));
    let mut half: Vec<Entry> = good.clone();
    half[0].1 = "F16";
    let n = half[0].3.len() / 2;
    half[0].3.truncate(n);
    cases.push(case(
        "import/half-precision.safetensors",
        bytes(&half, &epoch1),
        Reader::Import,
        &["tensor 'fc1.bias' is F16, expected F32"],
    ));
    let epoch7: BTreeMap<String, String> = [("epoch".to_string(), "7".to_string())].into();
    cases.push(case(
        "import/epoch-disagrees.safetensors",
        bytes(&good, &epoch7),
        Reader::Import,
        &["its metadata says epoch 7 but its name says 1"],
    ));
    cases
}

/// A dataset of the user's own (`[[dataset]]`): `.npz` files as numpy writes them, checked before
/// anything is stored.
fn own_dataset_cases() -> Vec<Case> {
    use crate::npz::{npz_bytes, split_npz, Array};
    let n = 6;
    let pixels = pattern(n * 784, 5);
    let good = split_npz(&pixels, [n, 1, 28, 28], &labels(n));
    let i64_labels = |values: &[i64]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let mut cases = vec![case(
        "own-dataset/truncated.npz",
        good[..good.len() - 200].to_vec(),
        Reader::OwnDataset,
        &["is not a readable .npz archive"],
    )];
    cases.push(case(
        "own-dataset/no-labels.npz",
        npz_bytes(&[Array { name: "images", descr: "|u1", shape: &[n, 1, 28, 28], data: &pixels }]),
        Reader::OwnDataset,
        &["no array labels (it holds images)"],
    ));
    // The six good images with int64 labels as given.
    let with_labels = |values: &[i64]| {
        npz_bytes(&[
            Array { name: "images", descr: "|u1", shape: &[n, 1, 28, 28], data: &pixels },
            Array { name: "labels", descr: "<i8", shape: &[values.len()], data: &i64_labels(values) },
        ])
    };
    let floats: Vec<u8> = pixels.iter().flat_map(|&p| f32::from(p).to_le_bytes()).collect();
    cases.push(case(
        "own-dataset/float-images.npz",
        npz_bytes(&[
            Array { name: "images", descr: "<f4", shape: &[n, 1, 28, 28], data: &floats },
            Array { name: "labels", descr: "<i8", shape: &[n], data: &i64_labels(&[0, 1, 2, 3, 4, 5]) },
        ]),
        Reader::OwnDataset,
        &["'images' must be uint8 [N, C, H, W] or [N, H, W]"],
    ));
    cases.push(case(
        "own-dataset/labels-short.npz",
        with_labels(&[0, 1, 2, 3, 4]),
        Reader::OwnDataset,
        &["6 images but 'labels' of shape [5]"],
    ));
    cases.push(case(
        "own-dataset/label-not-a-class.npz",
        with_labels(&[0, 1, 2, 10, 4, 5]),
        Reader::OwnDataset,
        &["label 10 at index 3 is not a class (0 ..= 9)", "classes = 10"],
    ));
    cases.push(case(
        "own-dataset/negative-label.npz",
        with_labels(&[0, -1, 2, 3, 4, 5]),
        Reader::OwnDataset,
        &["label -1 at index 1 is not a class"],
    ));
    cases.push(case(
        "own-dataset/other-image-shape.npz",
        split_npz(&pattern(n * 256, 6), [n, 1, 16, 16], &labels(n)),
        Reader::OwnDataset,
        &["the train images", "are [1, 28, 28] but the test images", "are [1, 16, 16]"],
    ));
    cases
}

/// The good `train.npz` beside each own-dataset case.
pub fn own_dataset_train_npz() -> Vec<u8> {
    crate::npz::split_npz(&pattern(12 * 784, 7), [12, 1, 28, 28], &labels(12))
}

/// A Parquet file written by arrow directly (no layerlab metadata), as another tool would.
fn foreign_parquet(columns: Vec<(&str, ArrayRef)>) -> Vec<u8> {
    let fields: Vec<Field> = columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns.into_iter().map(|(_, a)| a).collect())
        .expect("columns of one length");
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).expect("in memory");
    writer.write(&batch).expect("in memory");
    writer.close().expect("in memory");
    out
}

fn table_cases() -> Vec<Case> {
    let text = |v: &[&str]| -> ArrayRef { Arc::new(StringArray::from(v.to_vec())) };
    let ints = |v: &[i64]| -> ArrayRef { Arc::new(Int64Array::from(v.to_vec())) };
    let floats = |v: &[f64]| -> ArrayRef { Arc::new(Float64Array::from(v.to_vec())) };
    let mut cases = Vec::new();
    cases.push(case(
        "parquet/results-missing-columns.parquet",
        foreign_parquet(vec![("seed", ints(&[0, 0])), ("mode", text(&["baseline", "reinit"]))]),
        Reader::ResultsTable,
        &["no column 'unit'"],
    ));
    let i32s: ArrayRef = Arc::new(Int32Array::from(vec![0, 0]));
    cases.push(case(
        "parquet/results-seed-int32.parquet",
        foreign_parquet(vec![("seed", i32s), ("mode", text(&["baseline", "reinit"]))]),
        Reader::ResultsTable,
        &["column 'seed' is Int32, expected Int64"],
    ));
    cases.push(case(
        "parquet/results-error-as-text.parquet",
        foreign_parquet(vec![
            ("seed", ints(&[0])),
            ("mode", text(&["baseline"])),
            ("unit", text(&["fc1"])),
            ("unit_index", ints(&[0])),
            ("units", text(&["fc1"])),
            ("source_epoch", ints(&[0])),
            ("draw", ints(&[0])),
            ("bn_stats", text(&["none"])),
            ("test_error", text(&["0.1"])),
        ]),
        Reader::ResultsTable,
        &["column 'test_error' is Utf8, expected Float64"],
    ));
    cases.push(case(
        "parquet/movement-epoch-float.parquet",
        foreign_parquet(vec![
            ("unit_index", ints(&[0])),
            ("unit", text(&["fc1"])),
            ("epoch", floats(&[1.0])),
            ("l2_to_init_rel", floats(&[0.5])),
        ]),
        Reader::MovementTable,
        &["column 'epoch' is Float64, expected Int64"],
    ));
    let whole = foreign_parquet(vec![("seed", ints(&[0; 64]))]);
    cases.push(case(
        "parquet/results-truncated.parquet",
        whole[..whole.len() - 20].to_vec(),
        Reader::ResultsTable,
        &["is not a Parquet file"],
    ));
    cases.push(case(
        "parquet/results-csv.parquet",
        b"seed,mode\n0,baseline\n".to_vec(),
        Reader::ResultsTable,
        &["is not a Parquet file"],
    ));
    cases
}

/// A pipeline file with every key set, one per line, so that each can be given a wrong type.
pub const PIPELINE_BASE: &str = r#"data_dir = "data"
datasets_dir = "data/datasets"
default_experiments = ["tiny"]

[defaults]
seeds = [0]

[defaults.model]
width_mult = 1.0
batch_norm = true

[[experiment]]
name = "tiny"
dataset = "mnist"
description = "corpus"
seeds = [0]

[experiment.model]
arch = "fcn"
depth = 1
width = 8
pad_to = 0
init = "pytorch"

[experiment.train]
epochs = 2
batch_size = 50
lr = 0.05
schedule = "constant"
lr_milestones = [1]
lr_gamma = 0.1
warmup_epochs = 0
momentum = 0.9
nesterov = false
weight_decay = 0.0
augment = false
checkpoints = [0, 1]
train_examples = 500
test_examples = 200
eval_batch_size = 200

[experiment.reset]
modes = ["reinit", "rerandomize", "joint"]
draws = 1
bn_stats = ["with-layer"]
recalibrate_batches = 2
train_subset = 100
joint_suffixes = true
prefix_reuse = true

[experiment.reset.joint_sets]
first = ["fc1"]

[experiment.aggregate]
tolerance = 0.05
"#;

/// The 1-based line on which `needle` starts in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).unwrap_or_else(|| panic!("{needle:?} is not in the text"));
    text[..at].matches('\n').count() + 1 + usize::from(needle.starts_with('\n'))
}

/// A value of another type than `value` has.
fn wrong_type(value: &str) -> &'static str {
    if value.starts_with('"') {
        "7"
    } else if value.starts_with('[') {
        "\"a list\""
    } else if value == "true" || value == "false" {
        "\"yes\""
    } else {
        "\"seven\""
    }
}

fn pipeline_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let lines: Vec<&str> = PIPELINE_BASE.lines().collect();
    let mut section = String::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').replace("experiment.", "").replace("experiment", "");
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else { continue };
        let replaced = format!("{key} = {}", wrong_type(value));
        let mut text = lines.clone();
        text[i] = &replaced;
        let name = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
        let path = format!("pipeline-toml/wrong-type-{}.toml", name.replace(['.', '_'], "-"));
        let line_no = format!("line {}", i + 1);
        cases.push(case(
            &path,
            (text.join("\n") + "\n").into_bytes(),
            Reader::Pipeline,
            &[&line_no, key, "invalid type"],
        ));
    }
    let joint = PIPELINE_BASE.replace("[experiment.reset.joint_sets]\nfirst = [\"fc1\"]", "joint_sets_placeholder");
    let joint = joint
        .replace("joint_sets_placeholder", "")
        .replace("prefix_reuse = true", "prefix_reuse = true\njoint_sets = 3");
    cases.push(case(
        "pipeline-toml/wrong-type-reset-joint-sets.toml",
        joint.into_bytes(),
        Reader::Pipeline,
        &["joint_sets", "invalid type"],
    ));
    let unknown = |path: &str, after: &str, key: &str| {
        let text = PIPELINE_BASE.replacen(after, &format!("{after}\n{key} = 1"), 1);
        let line = line_of(&text, &format!("\n{key} = 1"));
        case(path, text.into_bytes(), Reader::Pipeline, &[&format!("line {line}"), &format!("unknown field `{key}`")])
    };
    cases.push(unknown("pipeline-toml/unknown-top-level.toml", "data_dir = \"data\"", "colour"));
    cases.push(unknown("pipeline-toml/unknown-defaults.toml", "seeds = [0]\n", "learning_rate"));
    cases.push(unknown("pipeline-toml/unknown-experiment.toml", "description = \"corpus\"", "comment"));
    cases.push(unknown("pipeline-toml/unknown-model.toml", "arch = \"fcn\"", "layers"));
    cases.push(unknown("pipeline-toml/unknown-train.toml", "lr = 0.05", "learning_rate"));
    cases.push(unknown("pipeline-toml/unknown-reset.toml", "draws = 1", "drawz"));
    cases.push(unknown("pipeline-toml/unknown-aggregate.toml", "tolerance = 0.05", "tol"));
    let sweep = |path: &str, axes: &str, words: &[&str]| {
        let text = format!("{PIPELINE_BASE}\n[[sweep]]\nname = \"s\"\nbase = \"tiny\"\naxes = {{ {axes} }}\n");
        case(path, text.into_bytes(), Reader::Pipeline, words)
    };
    cases.push(sweep(
        "pipeline-toml/sweep-unknown-axis.toml",
        "\"model.layers\" = [1, 2]",
        &["sweep 's'", "axis 'model.layers'", "unknown field `layers`"],
    ));
    cases.push(sweep("pipeline-toml/sweep-seeds-axis.toml", "\"seeds\" = [[0], [1]]", &["sweep 's'", "axis 'seeds'"]));
    cases.push(sweep(
        "pipeline-toml/sweep-bad-point.toml",
        "\"train.epochs\" = [2, 0]",
        &["sweep 's'", "s.epochs-0", "train.epochs"],
    ));
    cases.push(case("pipeline-toml/empty.toml", Vec::new(), Reader::Pipeline, &["no [[experiment]] defined"]));
    cases.push(case(
        "pipeline-toml/comments-only.toml",
        b"# nothing here\n\n".to_vec(),
        Reader::Pipeline,
        &["no [[experiment]] defined"],
    ));
    #[allow(non_snake_case)]
    let L = |needle: &str| format!("line {}", line_of(PIPELINE_BASE, needle));
    let sub = |path: &str, from: &str, to: &str, fault: &[&str]| {
        assert!(PIPELINE_BASE.contains(from), "{from}");
        case(path, PIPELINE_BASE.replacen(from, to, 1).into_bytes(), Reader::Pipeline, fault)
    };
    cases.push(sub(
        "pipeline-toml/negative-epochs.toml",
        "epochs = 2",
        "epochs = -3",
        &[&L("epochs = 2"), "epochs", "-3"],
    ));
    cases.push(sub(
        "pipeline-toml/zero-epochs.toml",
        "epochs = 2",
        "epochs = 0",
        &["train.epochs = 0 is out of range"],
    ));
    cases.push(sub(
        "pipeline-toml/huge-epochs.toml",
        "epochs = 2",
        "epochs = 99999999999",
        &[&L("epochs = 2"), "epochs", "99999999999"],
    ));
    cases.push(sub(
        "pipeline-toml/epochs-beyond-i64.toml",
        "epochs = 2",
        "epochs = 99999999999999999999",
        &[&L("epochs = 2")],
    ));
    cases.push(sub(
        "pipeline-toml/negative-seed.toml",
        "seeds = [0]\n\n[experiment.model]",
        "seeds = [-1]\n\n[experiment.model]",
        &[&L("seeds = [0]\n\n[experiment.model]"), "seeds", "-1"],
    ));
    cases.push(sub("pipeline-toml/huge-width.toml", "width = 8", "width = 4294967296", &[&L("width = 8"), "width"]));
    cases.push(sub(
        "pipeline-toml/huge-network.toml",
        "depth = 1\nwidth = 8",
        "depth = 1000\nwidth = 65536",
        &["too large", "parameters"],
    ));
    cases.push(sub(
        "pipeline-toml/resnet50-with-depth.toml",
        "arch = \"fcn\"",
        "arch = \"resnet50\"",
        &["experiment 'tiny'", "model.depth, model.width: not a setting of model.arch = \"resnet50\""],
    ));
    cases.push(sub(
        "pipeline-toml/infinite-lr.toml",
        "lr = 0.05",
        "lr = inf",
        &["train.lr = inf must be a positive number"],
    ));
    cases.push(sub(
        "pipeline-toml/nan-tolerance.toml",
        "tolerance = 0.05",
        "tolerance = nan",
        &["aggregate.tolerance = NaN"],
    ));
    cases.push(sub(
        "pipeline-toml/huge-draws.toml",
        "draws = 1",
        "draws = 1000000",
        &["reset.draws = 1000000 is too many"],
    ));
    cases.push(sub(
        "pipeline-toml/negative-lr.toml",
        "lr = 0.05",
        "lr = -0.1",
        &["train.lr = -0.1 must be a positive number"],
    ));
    cases.push(sub(
        "pipeline-toml/checkpoint-after-end.toml",
        "checkpoints = [0, 1]",
        "checkpoints = [0, 9]",
        &["names epoch 9, after the last epoch"],
    ));
    cases.push(sub(
        "pipeline-toml/unknown-arch.toml",
        "arch = \"fcn\"",
        "arch = \"alexnet\"",
        &["unknown variant `alexnet`", "resnet34"],
    ));
    cases.push(sub(
        "pipeline-toml/duplicate-key.toml",
        "lr = 0.05",
        "lr = 0.05\nlr = 0.1",
        &[&format!("line {}", line_of(PIPELINE_BASE, "lr = 0.05") + 1), "duplicate key"],
    ));
    cases.push(sub(
        "pipeline-toml/unterminated-string.toml",
        "arch = \"fcn\"",
        "arch = \"fcn",
        &[&L("arch = \"fcn\"")],
    ));
    cases.push(sub("pipeline-toml/no-name.toml", "name = \"tiny\"\n", "", &["missing field `name`"]));
    let mut latin1 = PIPELINE_BASE.replacen("corpus", "caf", 1).into_bytes();
    let at = latin1.windows(3).position(|w| w == b"caf").expect("caf") + 3;
    latin1.insert(at, 0xe9);
    cases.push(case("pipeline-toml/not-utf8.toml", latin1, Reader::Pipeline, &["UTF-8"]));
    cases
}

/// Every case, in a fixed order.
pub fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    all.extend(idx_cases());
    all.extend(cifar_cases());
    all.extend(checkpoint_cases());
    all.extend(import_cases());
    all.extend(own_dataset_cases());
    all.extend(table_cases());
    all.extend(pipeline_cases());
    all
}

/// `tests/corpus/README.md`: what each file is, made with the files.
pub fn readme(cases: &[Case]) -> String {
    let mut out = String::from(
        "# Malformed-input corpus\n\nMade by `tests/src/corpus.rs`; do not edit by hand. Regenerate with\n\
         `LAYERLAB_BLESS_CORPUS=1 cargo test -p layerlab-tests --test corpus`. The test feeds every file\n\
         to the binary that reads it and expects an exit code other than 0, a message that names the file\n\
         and the fault (the words below), no panic, and no change on disk.\n\n\
         `fuzz-regressions/<target>/` holds what the fuzz replay test feeds each reader: an empty file, and \
         crashing inputs found by `cargo xtask fuzz`, kept as they were found.\n\n\
         | file | reader | the message must say |\n| --- | --- | --- |\n",
    );
    for c in cases {
        let fault: Vec<String> = c.fault.iter().map(|f| format!("`{}`", f.replace('|', "\\|"))).collect();
        out.push_str(&format!("| {} | {:?} | {} |\n", c.path, c.reader, fault.join(", ")));
    }
    out
}
