//! `.npz` archives written by hand, as numpy's `np.savez` writes them (a zip of stored `.npy`
//! files, format 1.0), so that the tests of `[[dataset]]` need no numpy.

use std::io::Write as _;

/// One array: its name, numpy's dtype string (`|u1`, `<i8`, `<f4`), shape and raw little-endian bytes.
pub struct Array<'a> {
    pub name: &'a str,
    pub descr: &'a str,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// The `.npy` bytes of one array: magic, version 1.0, a header dict padded with spaces to a
/// multiple of 64 bytes and ending in a newline, then the data.
pub fn npy_bytes(array: &Array) -> Vec<u8> {
    let shape = match array.shape {
        [one] => format!("({one},)"),
        dims => format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", array.descr);
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(array.data);
    out
}

/// The `.npz` bytes of `arrays` (each stored uncompressed as `<name>.npy`).
pub fn npz_bytes(arrays: &[Array]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for array in arrays {
        zip.start_file(format!("{}.npy", array.name), options).expect("in memory");
        zip.write_all(&npy_bytes(array)).expect("in memory");
    }
    zip.finish().expect("in memory").into_inner()
}

/// A dataset split as numpy would hold it: `images` uint8 [N, C, H, W], `labels` int64 [N]
/// (numpy's default integer).
pub fn split_npz(images: &[u8], shape: [usize; 4], labels: &[u8]) -> Vec<u8> {
    let labels: Vec<u8> = labels.iter().flat_map(|&l| i64::from(l).to_le_bytes()).collect();
    npz_bytes(&[
        Array { name: "images", descr: "|u1", shape: &shape, data: images },
        Array { name: "labels", descr: "<i8", shape: &[shape[0]], data: &labels },
    ])
}
