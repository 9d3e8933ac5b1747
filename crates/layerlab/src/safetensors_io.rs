//! safetensors files written byte for byte the same for the same content, and read with errors
//! that say what is wrong with the file. Shared by checkpoints and stored datasets.

use std::collections::BTreeMap;

use safetensors::tensor::SafeTensorError;

/// The bytes of a safetensors file whose header is written in a fixed order (sorted names and
/// metadata keys), so that equal content gives byte-identical files. The `safetensors` crate
/// serializes metadata from a `HashMap`, whose order changes from run to run.
pub fn safetensors_bytes(
    tensors: &[(String, &'static str, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
    }
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()] }),
        );
        offset += data.len();
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    // The format pads the header with spaces to a multiple of 8 bytes.
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

/// Says what is wrong with a safetensors file that the `safetensors` crate refused, in terms of
/// the file: truncated, a header length or a tensor's byte range that does not fit, and which tensor.
pub fn safetensors_fault(bytes: &[u8], err: SafeTensorError) -> String {
    let len = bytes.len();
    let header_len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match (&err, header_len) {
        (SafeTensorError::HeaderTooSmall, _) => {
            format!("truncated: the file is {len} bytes, shorter than the 8-byte header length")
        }
        (SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge, Some(n)) => format!(
            "the header length field says {n} bytes but the file holds {len} bytes in all: \
             truncated, or not a safetensors file"
        ),
        (SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::TensorInvalidInfo, Some(n)) => {
            let start = 8 + n as usize;
            let have = len.saturating_sub(start);
            let header = bytes.get(8..start).and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok());
            let mut end = 0u64;
            let mut lying = None;
            if let Some(serde_json::Value::Object(map)) = &header {
                for (name, info) in map.iter().filter(|(k, _)| *k != "__metadata__") {
                    let offsets: Vec<u64> = info["data_offsets"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                        .unwrap_or_default();
                    let shape: Vec<u64> = info["shape"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                        .unwrap_or_default();
                    let size = match info["dtype"].as_str() {
                        Some("F64" | "I64" | "U64") => 8,
                        Some("F32" | "I32" | "U32") => 4,
                        Some("F16" | "BF16" | "I16" | "U16") => 2,
                        _ => 1,
                    };
                    if let [a, b] = offsets[..] {
                        end = end.max(b);
                        let need = shape.iter().try_fold(size, |acc: u64, d| acc.checked_mul(*d));
                        if lying.is_none() && need != b.checked_sub(a) {
                            lying = Some(format!(
                                "tensor '{name}' of shape {shape:?} needs {} bytes but the header gives it bytes {a}..{b}",
                                need.map_or("too many".to_string(), |n| n.to_string())
                            ));
                        }
                    }
                }
            }
            match lying {
                Some(why) => format!("the header lies about a size: {why}"),
                None if (have as u64) < end => {
                    format!("truncated: the header describes {end} data bytes but the file holds {have}")
                }
                None if (have as u64) > end => {
                    format!("the header describes {end} data bytes but the file holds {have}: trailing bytes")
                }
                None => err.to_string(),
            }
        }
        _ => err.to_string(),
    }
}
