//! safetensors reading and writing.
//!
//! The reader works on the whole (memory-mapped) file: the header is parsed and validated with the
//! `safetensors` crate and tensors are byte ranges of the file, so loading a network copies each tensor
//! once, from the page cache into the network's parameter. The writer produces the same layout as
//! `safetensors.torch.save_file` (tensors sorted by dtype alignment, then name).

use std::collections::HashMap;
use std::io::Write;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use super::error::{corrupt, ensure_intact, ReadError};
use super::{DType, RawTensor, StoredBytes, StoredTensor};

/// Largest header the safetensors crate accepts.
const MAX_HEADER: u64 = 100_000_000;

fn to_st(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

fn from_st(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Whether the first bytes look like a safetensors header (`u64` length, then `{`).
pub(crate) fn looks_like_safetensors(head: &[u8]) -> bool {
    if head.len() < 9 || head[8] != b'{' {
        return false;
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&head[..8]);
    (2..=MAX_HEADER).contains(&u64::from_le_bytes(n))
}

/// Reads the header of a whole safetensors file (`file`, usually memory-mapped), validates it against the
/// file size, and returns the tensors (as byte ranges of `file`) in file order, with the `__metadata__`.
pub(crate) fn read(file: &[u8]) -> Result<(Vec<StoredTensor>, HashMap<String, String>), ReadError> {
    let len = file.len() as u64;
    ensure_intact!(len >= 8, "truncated safetensors file ({len} bytes)");
    let mut n = [0u8; 8];
    n.copy_from_slice(&file[..8]);
    let n = u64::from_le_bytes(n);
    ensure_intact!(
        n <= MAX_HEADER,
        "safetensors header length {n} is too large"
    );
    ensure_intact!(
        8 + n <= len,
        "truncated safetensors file: the header needs {n} bytes but the file has {len}"
    );
    let data_start = 8 + n as usize;
    let meta: Metadata = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| corrupt!("invalid safetensors header: {e}"))?;
    let data_len = meta.data_len() as u64;
    ensure_intact!(
        8 + n + data_len == len,
        "safetensors file has {} data bytes but its header describes {data_len} (truncated or \
         corrupt)",
        len - 8 - n
    );
    let mut tensors = Vec::new();
    for name in meta.offset_keys() {
        let info = meta
            .info(&name)
            .ok_or_else(|| corrupt!("internal error: tensor '{name}' vanished"))?;
        let dtype = from_st(info.dtype).ok_or_else(|| {
            ReadError::NotACheckpoint(format!(
                "tensor '{name}' has unsupported dtype {:?}",
                info.dtype
            ))
        })?;
        // In bounds: the header's offsets were validated against the file size above.
        let (start, end) = info.data_offsets;
        tensors.push(StoredTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            bytes: StoredBytes::InFile(data_start + start..data_start + end),
        });
    }
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// Writes a safetensors file into `out` (the caller handles files).
pub(crate) fn write<W: Write>(
    out: &mut W,
    tensors: &[(String, RawTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut order: Vec<&(String, RawTensor)> = tensors.iter().collect();
    order.sort_by(|(ln, lt), (rn, rt)| {
        to_st(rt.dtype)
            .cmp(&to_st(lt.dtype))
            .then_with(|| ln.cmp(rn))
    });
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for (name, t) in &order {
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: to_st(t.dtype),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.data.len()),
            },
        ));
        offset += t.data.len();
    }
    let meta = Metadata::new(metadata, infos).context("invalid safetensors metadata")?;
    let mut header = serde_json::to_vec(&meta)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() as u64 > MAX_HEADER {
        bail!(
            "safetensors header would be {} bytes (too large)",
            header.len()
        );
    }
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (_, t) in order {
        out.write_all(&t.data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a whole file's bytes into owned tensors.
    fn read_bytes(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, ReadError> {
        let (tensors, _) = read(bytes)?;
        Ok(tensors
            .into_iter()
            .map(|t| {
                let StoredBytes::InFile(range) = t.bytes else {
                    panic!("safetensors tensors are byte ranges of the file")
                };
                let data = bytes[range].to_vec();
                (t.name, RawTensor::new(t.dtype, t.shape, data).unwrap())
            })
            .collect())
    }

    #[test]
    fn round_trip_and_crate_compatibility() {
        let tensors = vec![
            ("z".to_string(), RawTensor::from_f32(vec![2], &[1.0, -2.0])),
            (
                "a".to_string(),
                RawTensor {
                    dtype: DType::U8,
                    shape: vec![3],
                    data: vec![1, 2, 3],
                },
            ),
            (
                "s".to_string(),
                RawTensor {
                    dtype: DType::I64,
                    shape: vec![],
                    data: 7i64.to_le_bytes().to_vec(),
                },
            ),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut buf = Vec::new();
        write(&mut buf, &tensors, Some(meta)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        assert_eq!(st.tensor("z").unwrap().data(), tensors[0].1.data.as_slice());
        let back = read_bytes(&buf).unwrap();
        // File order: descending alignment, then name.
        let names: Vec<&str> = back.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["s", "z", "a"]);
        for (n, t) in &tensors {
            assert_eq!(back.iter().find(|(m, _)| m == n).map(|(_, t)| t), Some(t));
        }
        for cut in 0..buf.len() {
            assert!(read_bytes(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }
}
