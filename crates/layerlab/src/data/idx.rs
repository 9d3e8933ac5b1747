//! The IDX format of MNIST and Fashion-MNIST: a big-endian header, then u8 data, row-major.
//!
//! Images start with magic 0x00000803 and the counts n, rows, cols (u32 each); labels with magic
//! 0x00000801 and n. Every header is checked against the byte length before any data is read, so a
//! truncated or padded file is refused with the fault named, never a panic.

use thiserror::Error;

use super::Split;

/// Magic number of an IDX file of u8 images (three dimensions).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of u8 labels (one dimension).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// What is wrong with an IDX file. The caller adds the file name as context.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdxError {
    #[error("file is {len} bytes, shorter than the {need}-byte IDX header")]
    ShortHeader { len: usize, need: usize },
    #[error("magic number is {found:#010x}, expected {expected:#010x} ({what})")]
    WrongMagic { found: u32, expected: u32, what: &'static str },
    #[error(
        "header claims {items} {what} of {item_bytes} bytes ({need} data bytes) but the file holds {have}: truncated"
    )]
    Truncated { what: &'static str, items: u64, item_bytes: u64, need: u128, have: u64 },
    #[error("header claims {items} {what} of {item_bytes} bytes ({need} data bytes) but the file holds {have}: {extra} bytes too many")]
    TrailingBytes { what: &'static str, items: u64, item_bytes: u64, need: u128, have: u64, extra: u128 },
    #[error("header claims images of {rows}x{cols} pixels: a dimension is zero")]
    EmptyImage { rows: u32, cols: u32 },
}

/// The content of an IDX images file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
    /// `n * rows * cols` bytes, row-major.
    pub pixels: Vec<u8>,
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    // Callers check the header length first, so these four bytes exist.
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn check_header(bytes: &[u8], expected: u32, what: &'static str, header: usize) -> Result<(), IdxError> {
    if bytes.len() < header {
        return Err(IdxError::ShortHeader { len: bytes.len(), need: header });
    }
    let found = be_u32(bytes, 0);
    if found != expected {
        return Err(IdxError::WrongMagic { found, expected, what });
    }
    Ok(())
}

/// Checks that the data after the header holds exactly `items * item_bytes` bytes.
fn check_length(what: &'static str, items: u64, item_bytes: u64, have: usize) -> Result<(), IdxError> {
    // The factors come from u32 fields (the item size from two), so the product fits in a u128.
    let need = items as u128 * item_bytes as u128;
    let have = have as u64;
    if (have as u128) < need {
        return Err(IdxError::Truncated { what, items, item_bytes, need, have });
    }
    if have as u128 > need {
        return Err(IdxError::TrailingBytes { what, items, item_bytes, need, have, extra: have as u128 - need });
    }
    Ok(())
}

/// Parses an IDX images file (magic 0x00000803).
pub fn parse_images(bytes: &[u8]) -> Result<IdxImages, IdxError> {
    const HEADER: usize = 16;
    check_header(bytes, IMAGES_MAGIC, "images, u8, 3 dimensions", HEADER)?;
    let (n, rows, cols) = (be_u32(bytes, 4), be_u32(bytes, 8), be_u32(bytes, 12));
    if rows == 0 || cols == 0 {
        return Err(IdxError::EmptyImage { rows, cols });
    }
    check_length("images", n as u64, rows as u64 * cols as u64, bytes.len() - HEADER)?;
    Ok(IdxImages { n: n as usize, rows: rows as usize, cols: cols as usize, pixels: bytes[HEADER..].to_vec() })
}

/// Parses an IDX labels file (magic 0x00000801).
pub fn parse_labels(bytes: &[u8]) -> Result<Vec<u8>, IdxError> {
    const HEADER: usize = 8;
    check_header(bytes, LABELS_MAGIC, "labels, u8, 1 dimension", HEADER)?;
    let n = be_u32(bytes, 4);
    check_length("labels", n as u64, 1, bytes.len() - HEADER)?;
    Ok(bytes[HEADER..].to_vec())
}

/// Parses a pair of images and labels files into a one-channel split, checking that the counts
/// agree and that every label is one of `classes`. Errors name the file at fault.
pub fn parse_split(
    images_name: &str,
    images: &[u8],
    labels_name: &str,
    labels: &[u8],
    classes: usize,
) -> anyhow::Result<Split> {
    use anyhow::Context;
    let images = parse_images(images).with_context(|| images_name.to_string())?;
    let labels = parse_labels(labels).with_context(|| labels_name.to_string())?;
    if images.n != labels.len() {
        anyhow::bail!("{images_name} holds {} images but {labels_name} holds {} labels", images.n, labels.len());
    }
    let split = Split { images: images.pixels, labels, channels: 1, height: images.rows, width: images.cols };
    split.check(classes).with_context(|| labels_name.to_string())?;
    Ok(split)
}

/// Encodes images as an IDX file; the inverse of [`parse_images`], for tests and tools.
pub fn encode_images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + pixels.len());
    for v in [IMAGES_MAGIC, n, rows, cols] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// Encodes labels as an IDX file; the inverse of [`parse_labels`].
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: u32) -> Vec<u8> {
        let pixels: Vec<u8> = (0..n * 6).map(|i| i as u8).collect();
        encode_images(n, 2, 3, &pixels)
    }

    #[test]
    fn good_files_parse() {
        let parsed = parse_images(&images(4)).unwrap();
        assert_eq!((parsed.n, parsed.rows, parsed.cols), (4, 2, 3));
        assert_eq!(parsed.pixels, (0..24).collect::<Vec<u8>>());
        assert_eq!(parse_labels(&encode_labels(&[1, 2, 9])).unwrap(), vec![1, 2, 9]);
        let split = parse_split("i", &images(3), "l", &encode_labels(&[0, 5, 9]), 10).unwrap();
        assert_eq!((split.len(), split.channels, split.height, split.width), (3, 1, 2, 3));
    }

    #[test]
    fn empty_sets_are_valid() {
        assert_eq!(parse_images(&images(0)).unwrap().n, 0);
        assert!(parse_labels(&encode_labels(&[])).unwrap().is_empty());
    }

    #[test]
    fn short_header_is_refused() {
        for len in [0, 3, 15] {
            let bytes = &images(1)[..len];
            assert_eq!(parse_images(bytes), Err(IdxError::ShortHeader { len, need: 16 }));
        }
        assert!(matches!(parse_labels(&[0, 0, 8]), Err(IdxError::ShortHeader { len: 3, need: 8 })));
    }

    #[test]
    fn wrong_magic_is_refused() {
        let err = parse_images(&encode_labels(&[1; 16])).unwrap_err();
        assert!(matches!(err, IdxError::WrongMagic { found: LABELS_MAGIC, expected: IMAGES_MAGIC, .. }), "{err}");
        assert!(err.to_string().contains("0x00000801"), "{err}");
        let err = parse_labels(&images(2)).unwrap_err();
        assert!(matches!(err, IdxError::WrongMagic { found: IMAGES_MAGIC, .. }), "{err}");
        let mut gz = images(1);
        gz[..4].copy_from_slice(&[0x1f, 0x8b, 8, 0]);
        assert!(matches!(parse_images(&gz), Err(IdxError::WrongMagic { .. })));
    }

    #[test]
    fn truncated_data_is_refused() {
        let mut bytes = images(4);
        bytes.truncate(bytes.len() - 1);
        let err = parse_images(&bytes).unwrap_err();
        assert_eq!(err, IdxError::Truncated { what: "images", items: 4, item_bytes: 6, need: 24, have: 23 });
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut labels = encode_labels(&[1, 2, 3]);
        labels.pop();
        assert!(matches!(parse_labels(&labels), Err(IdxError::Truncated { items: 3, have: 2, .. })));
    }

    #[test]
    fn header_claiming_more_items_than_present_is_refused() {
        let mut bytes = images(2);
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        bytes[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        bytes[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_images(&bytes), Err(IdxError::Truncated { items: 4_294_967_295, .. })));
        let mut labels = encode_labels(&[1, 2]);
        labels[4..8].copy_from_slice(&60_000u32.to_be_bytes());
        assert!(matches!(parse_labels(&labels), Err(IdxError::Truncated { items: 60_000, have: 2, .. })));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = images(2);
        bytes.push(0);
        assert!(matches!(parse_images(&bytes), Err(IdxError::TrailingBytes { extra: 1, .. })));
        let mut labels = encode_labels(&[1]);
        labels.extend_from_slice(&[0, 0]);
        assert!(matches!(parse_labels(&labels), Err(IdxError::TrailingBytes { extra: 2, .. })));
    }

    #[test]
    fn zero_sized_images_are_refused() {
        assert!(matches!(parse_images(&encode_images(3, 0, 28, &[])), Err(IdxError::EmptyImage { .. })));
    }

    #[test]
    fn split_faults_are_named() {
        let split = |images: &[u8], labels: &[u8]| {
            format!("{:#}", parse_split("imgs", images, "labs", labels, 10).unwrap_err())
        };
        let err = split(&images(3), &encode_labels(&[0, 1]));
        assert_eq!(err, "imgs holds 3 images but labs holds 2 labels");
        let err = split(&images(2), &encode_labels(&[0, 10]));
        assert!(err.starts_with("labs: label 10 at index 1"), "{err}");
        let err = split(&encode_labels(&[0; 16]), &encode_labels(&[0]));
        assert!(err.starts_with("imgs: magic number"), "{err}");
        let err = split(&images(1), &images(1));
        assert!(err.starts_with("labs: magic number"), "{err}");
    }
}
