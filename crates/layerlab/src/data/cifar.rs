//! The CIFAR-10 binary format: batches of 3,073-byte records (a label, then 1,024 red, 1,024 green
//! and 1,024 blue bytes, each plane row-major 32x32), read from a folder or the `.tar.gz` archive.
//!
//! A record's pixel bytes are already in [C, H, W] order, so a batch maps onto a split by dropping
//! the label bytes. The reader accepts any whole, non-zero number of records per file (the real
//! batches hold 10,000), so tests can run on small generated batches.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use thiserror::Error;

use super::Split;

/// Bytes per record: one label and 3 x 32 x 32 pixels.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Pixel bytes per record.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
/// Number of classes; every label byte must be below it.
pub const CLASSES: usize = 10;
/// The training batches, in order.
pub const TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
/// The test batch.
pub const TEST_FILE: &str = "test_batch.bin";
/// The name of the published archive.
pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
/// The folder inside the archive that holds the batches.
pub const ARCHIVE_DIR: &str = "cifar-10-batches-bin";
/// A batch larger than this is refused before it is read (a real one is 30,730,000 bytes).
const MAX_BATCH_BYTES: u64 = 256 << 20;

/// What is wrong with a batch file. The caller adds the file name as context.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CifarError {
    #[error("length {len} is not a multiple of the {RECORD_BYTES}-byte record ({records} records and {extra} bytes)")]
    PartialRecord { len: usize, records: usize, extra: usize },
    #[error("file holds no records")]
    Empty,
    #[error("record {record} has label {label}, not a class (0 ..= 9)")]
    BadLabel { record: usize, label: u8 },
}

/// Every batch file name: the five training batches, then the test batch.
pub fn batch_files() -> impl Iterator<Item = &'static str> {
    TRAIN_FILES.into_iter().chain([TEST_FILE])
}

/// Parses one batch file into a [3, 32, 32] split.
pub fn parse_batch(bytes: &[u8]) -> Result<Split, CifarError> {
    let (records, extra) = (bytes.len() / RECORD_BYTES, bytes.len() % RECORD_BYTES);
    if extra != 0 {
        return Err(CifarError::PartialRecord { len: bytes.len(), records, extra });
    }
    if records == 0 {
        return Err(CifarError::Empty);
    }
    let mut images = Vec::with_capacity(records * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(records);
    for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = chunk[0];
        if label as usize >= CLASSES {
            return Err(CifarError::BadLabel { record, label });
        }
        labels.push(label);
        images.extend_from_slice(&chunk[1..]);
    }
    Ok(Split { images, labels, channels: 3, height: 32, width: 32 })
}

/// Parses the six batches (by name, in any order) into the train and test splits; an error names
/// the file at fault.
pub fn parse_splits(files: &[(String, Vec<u8>)]) -> Result<(Split, Split)> {
    let get = |name: &str| -> Result<Split> {
        let (_, bytes) = files.iter().find(|(n, _)| n == name).with_context(|| format!("{name} is missing"))?;
        parse_batch(bytes).with_context(|| name.to_string())
    };
    let mut train = get(TRAIN_FILES[0])?;
    for name in &TRAIN_FILES[1..] {
        let batch = get(name)?;
        train.images.extend_from_slice(&batch.images);
        train.labels.extend_from_slice(&batch.labels);
    }
    Ok((train, get(TEST_FILE)?))
}

/// Finds the folder that holds the batches: `dir` itself or `dir/cifar-10-batches-bin`.
pub fn batches_folder(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join(ARCHIVE_DIR)].into_iter().find(|d| d.join(TRAIN_FILES[0]).is_file())
}

/// Reads the six batch files from a folder (or its `cifar-10-batches-bin/`), in canonical order.
pub fn read_folder(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let Some(folder) = batches_folder(dir) else {
        bail!("{} holds no {} (nor {ARCHIVE_DIR}/{})", dir.display(), TRAIN_FILES[0], TRAIN_FILES[0]);
    };
    batch_files()
        .map(|name| {
            let path = folder.join(name);
            let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let bytes =
                read_capped(file, MAX_BATCH_BYTES).with_context(|| format!("cannot read {}", path.display()))?;
            Ok((name.to_string(), bytes))
        })
        .collect()
}

/// Reads the six batch files from the `.tar.gz` archive, streaming it through memory; entries other
/// than `cifar-10-batches-bin/<batch>` are skipped.
pub fn read_archive(reader: impl Read) -> Result<Vec<(String, Vec<u8>)>> {
    let mut reader = std::io::BufReader::new(reader);
    let head = std::io::BufRead::fill_buf(&mut reader).context("cannot read the archive")?;
    if !head.starts_with(&[0x1f, 0x8b]) {
        let shown: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
        bail!(
            "not a gzip-compressed tar archive: it starts with bytes [{}], not the gzip magic 1f 8b",
            shown.join(" ")
        );
    }
    let mut archive = tar::Archive::new(GzDecoder::new(reader));
    let mut found: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in archive.entries().context("not a gzip-compressed tar archive")? {
        let entry = entry.context("corrupt archive entry")?;
        let path = entry.path().context("archive entry with an unreadable name")?.into_owned();
        let mut parts = path.components().filter(|c| !matches!(c, std::path::Component::CurDir));
        let (Some(dir), Some(file), None) = (parts.next(), parts.next(), parts.next()) else { continue };
        let file = file.as_os_str().to_string_lossy().into_owned();
        if dir.as_os_str() != ARCHIVE_DIR || !batch_files().any(|n| n == file) || found.iter().any(|(n, _)| *n == file)
        {
            continue;
        }
        let bytes = read_capped(entry, MAX_BATCH_BYTES)
            .with_context(|| format!("cannot read {ARCHIVE_DIR}/{file} from the archive"))?;
        found.push((file, bytes));
    }
    let missing: Vec<&str> = batch_files().filter(|n| !found.iter().any(|(f, _)| f == n)).collect();
    if !missing.is_empty() {
        bail!(
            "the archive lacks {}",
            missing.iter().map(|m| format!("{ARCHIVE_DIR}/{m}")).collect::<Vec<_>>().join(", ")
        );
    }
    found.sort_by_key(|(n, _)| batch_files().position(|b| b == n));
    Ok(found)
}

/// Reads the archive from a file.
pub fn read_archive_file(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_archive(std::io::BufReader::new(file)).with_context(|| format!("{}", path.display()))
}

/// Reads everything from `reader`, refusing more than `max` bytes.
fn read_capped(reader: impl Read, max: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        bail!("larger than {max} bytes: not a CIFAR-10 batch");
    }
    Ok(bytes)
}

/// Encodes one record; the inverse of [`parse_batch`] for one image, for tests and tools.
pub fn encode_record(label: u8, pixels: &[u8; IMAGE_BYTES]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_BYTES);
    out.push(label);
    out.extend_from_slice(pixels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{cifar_batch as batch, cifar_batches as all_batches};

    fn archive(files: &[(String, Vec<u8>)], prefix: &str) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_size(11);
        header.set_mode(0o644);
        tar.append_data(&mut header, format!("{prefix}{ARCHIVE_DIR}/readme.html"), &b"not a batch"[..]).unwrap();
        for (name, bytes) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, format!("{prefix}{ARCHIVE_DIR}/{name}"), &bytes[..]).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn a_batch_maps_to_chw_images() {
        let bytes = batch(3, 0);
        let split = parse_batch(&bytes).unwrap();
        assert_eq!((split.len(), split.channels, split.height, split.width), (3, 3, 32, 32));
        assert_eq!(split.labels, vec![0, 1, 2]);
        // Record 1's green plane starts right after its red plane.
        assert_eq!(split.images[IMAGE_BYTES + 1024], bytes[RECORD_BYTES + 1 + 1024]);
        assert_eq!(&split.images[2 * IMAGE_BYTES..], &bytes[2 * RECORD_BYTES + 1..]);
    }

    #[test]
    fn partial_records_are_refused() {
        let mut bytes = batch(2, 0);
        bytes.pop();
        assert_eq!(parse_batch(&bytes), Err(CifarError::PartialRecord { len: 6145, records: 1, extra: 3072 }));
        assert_eq!(parse_batch(&[]), Err(CifarError::Empty));
    }

    #[test]
    fn labels_beyond_the_classes_are_refused() {
        let mut bytes = batch(3, 0);
        bytes[2 * RECORD_BYTES] = 10;
        assert_eq!(parse_batch(&bytes), Err(CifarError::BadLabel { record: 2, label: 10 }));
    }

    #[test]
    fn splits_join_the_training_batches_in_order() {
        let files = all_batches(4);
        let (train, test) = parse_splits(&files).unwrap();
        assert_eq!((train.len(), test.len()), (20, 4));
        assert_eq!(train.labels[4..8], [1, 2, 3, 4]);
        let mut bad = files.clone();
        bad[2].1.push(0);
        let err = format!("{:#}", parse_splits(&bad).unwrap_err());
        assert!(err.starts_with("data_batch_3.bin: length 12293 is not a multiple"), "{err}");
        let err = format!("{:#}", parse_splits(&files[..5]).unwrap_err());
        assert!(err.contains("test_batch.bin is missing"), "{err}");
    }

    #[test]
    fn folders_are_found_directly_or_one_level_down() {
        let files = all_batches(2);
        let root = tempfile::tempdir().unwrap();
        let inner = root.path().join(ARCHIVE_DIR);
        std::fs::create_dir(&inner).unwrap();
        for (name, bytes) in &files {
            std::fs::write(inner.join(name), bytes).unwrap();
        }
        assert_eq!(read_folder(root.path()).unwrap(), files);
        assert_eq!(read_folder(&inner).unwrap(), files);
        std::fs::remove_file(inner.join(TEST_FILE)).unwrap();
        let err = format!("{:#}", read_folder(root.path()).unwrap_err());
        assert!(err.contains("test_batch.bin"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(read_folder(empty.path()).is_err());
    }

    #[test]
    fn archives_are_read_in_memory() {
        let files = all_batches(2);
        let mut shuffled = files.clone();
        shuffled.reverse();
        for prefix in ["", "./"] {
            assert_eq!(read_archive(&archive(&shuffled, prefix)[..]).unwrap(), files);
        }
        let err = format!("{:#}", read_archive(&archive(&files[1..], "")[..]).unwrap_err());
        assert!(err.contains("lacks cifar-10-batches-bin/data_batch_1.bin"), "{err}");
        assert!(read_archive(&b"not an archive"[..]).is_err());
        let whole = archive(&files, "");
        assert!(read_archive(&whole[..whole.len() / 2]).is_err());
    }
}
