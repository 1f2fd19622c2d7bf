//! PyTorch's zip+pickle checkpoint format (`torch.save`, torch >= 1.6).
//!
//! Layout: `<dir>/data.pkl` (the pickled object, tensors as persistent ids), `<dir>/data/<key>`
//! (raw storages), `<dir>/byteorder`, `<dir>/version`, `<dir>/.format_version`,
//! `<dir>/.storage_alignment` and `<dir>/.data/serialization_id`.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::rc::Rc;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::pickle::{self, TensorEntry, TensorRef, Value};
use super::zip_archive::{check_crc, crc32, ZipReader, ZipWriter};
use super::{DType, RawTensor};

/// Name of the top-level folder the writer uses.
const ARCHIVE_DIR: &str = "archive";

/// Largest tensor materialized from an overlapping (e.g. expanded, stride-0) view.
const MAX_EXPANDED_BYTES: u64 = 1 << 30;

/// Options of the writer; the defaults match `torch.save` on a little-endian CPU.
pub(crate) struct WriteOptions<'a> {
    /// Location tag stored in every persistent id (`cpu`, `cuda:0`, ...).
    pub location: &'a str,
    /// Write big-endian storages and a `byteorder` of `big` (used to test the reader).
    pub big_endian: bool,
}

impl Default for WriteOptions<'_> {
    fn default() -> Self {
        WriteOptions {
            location: "cpu",
            big_endian: false,
        }
    }
}

/// Reads the tensors of a torch zip checkpoint, in state-dict order.
pub(crate) fn read<R: Read + Seek>(reader: R, len: u64) -> Result<Vec<(String, RawTensor)>> {
    let mut zip = ZipReader::new(reader, len).context("truncated or corrupt zip archive")?;
    let (pkl_idx, prefix) = find_data_pkl(&zip)?;
    let torchscript = zip.find(&format!("{prefix}constants.pkl")).is_some()
        || zip
            .entries()
            .iter()
            .any(|e| e.name.starts_with(&format!("{prefix}code/")));

    let big_endian = match zip.find(&format!("{prefix}byteorder")) {
        None => false,
        Some(i) => {
            let order = zip
                .read_all(i, 16)
                .context("cannot read the byteorder record")?;
            match order.as_slice() {
                b"little" => false,
                b"big" => true,
                other => bail!(
                    "unknown byte order '{}' in the archive",
                    String::from_utf8_lossy(other)
                ),
            }
        }
    };

    let pkl_name = zip.entry(pkl_idx).name.clone();
    let pkl = zip
        .read_all(pkl_idx, len)
        .with_context(|| format!("cannot read '{pkl_name}'"))?;
    let root = pickle::unpickle(&pkl).map_err(|e| {
        let e = e.context(format!("cannot parse '{pkl_name}'"));
        if torchscript {
            e.context(
                "this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; \
                 save the weights with torch.save(model.state_dict()) instead",
            )
        } else {
            e
        }
    })?;
    drop(pkl);

    let tensors = select_state_dict(&root)?;
    let mut storages = Storages {
        zip: &mut zip,
        prefix: &prefix,
        big_endian,
        info: HashMap::new(),
    };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let raw = storages
            .materialize(&name, &t)
            .with_context(|| format!("cannot load tensor '{name}'"))?;
        out.push((name, raw));
    }
    storages.verify_remaining()?;
    Ok(out)
}

/// Finds `<dir>/data.pkl`; returns its index and the `<dir>/` prefix.
fn find_data_pkl<R: Read + Seek>(zip: &ZipReader<R>) -> Result<(usize, String)> {
    let candidates: Vec<usize> = zip
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, e)| match e.name.strip_suffix("data.pkl") {
            Some(dir) => dir.is_empty() || (dir.ends_with('/') && dir.matches('/').count() == 1),
            None => false,
        })
        .map(|(i, _)| i)
        .collect();
    match candidates.as_slice() {
        [i] => {
            let name = &zip.entry(*i).name;
            let prefix = name[..name.len() - "data.pkl".len()].to_string();
            Ok((*i, prefix))
        }
        [] => {
            let names: Vec<&str> = zip
                .entries()
                .iter()
                .take(8)
                .map(|e| e.name.as_str())
                .collect();
            bail!(
                "zip archive has no data.pkl entry, so it is not a torch.save checkpoint \
                 (entries: {}{})",
                names.join(", "),
                if zip.entries().len() > 8 { ", ..." } else { "" }
            )
        }
        _ => bail!("zip archive has several data.pkl entries"),
    }
}

/// Picks the state dict: the top-level dict, or the dict under "model"/"state_dict" when the
/// checkpoint wraps it (MONAI's CheckpointSaver writes `{"model": state_dict, ...}`).
fn select_state_dict(root: &Value) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let Value::Dict(top) = root else {
        bail!(
            "the checkpoint holds a {} at the top level, expected a dict of tensors (a state_dict)",
            root.type_name()
        );
    };
    let has_tensor = |d: &pickle::Dict| {
        d.entries()
            .iter()
            .any(|(_, v)| matches!(v, Value::Tensor(_)))
    };
    let mut dict_rc = top.clone();
    for key in ["model", "state_dict"] {
        if let Some(Value::Dict(inner)) = top.borrow().get_str(key) {
            if has_tensor(&inner.borrow()) {
                log::info!("using the state dict stored under the top-level key '{key}'");
                dict_rc = inner.clone();
                break;
            }
        }
    }
    let dict = dict_rc.borrow();
    let mut tensors = Vec::new();
    for (k, v) in dict.entries() {
        let name = match k {
            Value::Str(s) => s.to_string(),
            other => {
                log::warn!("skipping state dict entry with a {} key", other.type_name());
                continue;
            }
        };
        match v {
            Value::Tensor(t) => tensors.push((name, t.clone())),
            other => log::warn!(
                "skipping non-tensor state dict entry '{name}' ({})",
                other.type_name()
            ),
        }
    }
    if tensors.is_empty() {
        let keys: Vec<String> = dict
            .entries()
            .iter()
            .take(10)
            .map(|(k, _)| match k {
                Value::Str(s) => format!("'{s}'"),
                other => other.type_name().to_string(),
            })
            .collect();
        bail!(
            "no tensors found in the checkpoint (top-level keys: {})",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        );
    }
    Ok(tensors)
}

/// Per-storage bookkeeping while tensors are materialized.
struct StorageInfo {
    entry: usize,
    dtype: DType,
    nbytes: u64,
    crc_checked: bool,
    /// Whole contents of a compressed record (stored records are read in ranges).
    cached: Option<Rc<Vec<u8>>>,
}

struct Storages<'a, R> {
    zip: &'a mut ZipReader<R>,
    prefix: &'a str,
    big_endian: bool,
    info: HashMap<String, StorageInfo>,
}

impl<R: Read + Seek> Storages<'_, R> {
    fn storage(&mut self, name: &str, t: &TensorRef) -> Result<&mut StorageInfo> {
        let s = &t.storage;
        let record = format!("{}data/{}", self.prefix, s.key);
        if !self.info.contains_key(&s.key) {
            let entry = self
                .zip
                .find(&record)
                .ok_or_else(|| anyhow!("storage '{record}' is missing from the archive"))?;
            let nbytes = self.zip.entry(entry).size;
            let declared = s.numel.checked_mul(s.dtype.size_bytes() as u64);
            ensure!(
                declared == Some(nbytes),
                "storage '{record}' has {nbytes} bytes but is declared as {} {} elements",
                s.numel,
                s.dtype.name()
            );
            if !s.location.starts_with("cpu") {
                log::debug!("storage '{record}' was saved from '{}'", s.location);
            }
            self.info.insert(
                s.key.clone(),
                StorageInfo {
                    entry,
                    dtype: s.dtype,
                    nbytes,
                    crc_checked: false,
                    cached: None,
                },
            );
        }
        let info = self
            .info
            .get_mut(&s.key)
            .ok_or_else(|| anyhow!("internal error: storage bookkeeping"))?;
        ensure!(
            info.dtype == s.dtype,
            "storage '{record}' is used as both {} and {} (tensor '{name}')",
            info.dtype.name(),
            s.dtype.name()
        );
        Ok(info)
    }

    /// Reads a tensor view and returns it as contiguous row-major data.
    fn materialize(&mut self, name: &str, t: &TensorRef) -> Result<RawTensor> {
        let dtype = t.storage.dtype;
        let es = dtype.size_bytes() as u64;
        let record = format!("{}data/{}", self.prefix, t.storage.key);
        let big_endian = self.big_endian;
        let info = self.storage(name, t)?;
        let (entry, nbytes) = (info.entry, info.nbytes);

        let shape: Vec<usize> = t
            .size
            .iter()
            .map(|&d| usize::try_from(d).context("tensor dimension too large"))
            .collect::<Result<_>>()?;
        let numel = t
            .size
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| anyhow!("tensor size {:?} overflows", t.size))?;
        let out_bytes = numel
            .checked_mul(es)
            .ok_or_else(|| anyhow!("tensor size {:?} overflows", t.size))?;
        if numel == 0 {
            return Ok(RawTensor {
                dtype,
                shape,
                data: Vec::new(),
            });
        }
        // Highest element touched, relative to the storage start.
        let mut last = t.offset;
        for (&d, &s) in t.size.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(|| anyhow!("tensor strides {:?} overflow", t.stride))?;
        }
        let needed = last
            .checked_add(1)
            .and_then(|x| x.checked_mul(es))
            .ok_or_else(|| anyhow!("tensor layout overflows"))?;
        ensure!(
            needed <= nbytes,
            "storage '{record}' has {nbytes} bytes but tensor '{name}' needs {needed}"
        );
        let span_start = t.offset * es;
        let span_len = needed - span_start;
        ensure!(
            out_bytes <= span_len || out_bytes <= MAX_EXPANDED_BYTES,
            "tensor '{name}' is an expanded view of {out_bytes} bytes over {span_len} bytes of \
             storage; refusing to materialize it"
        );

        let span = self.read_span(&t.storage.key, entry, nbytes, span_start, span_len)?;
        let strides: Vec<u64> = t.stride.clone();
        let mut data = if is_contiguous(&t.size, &strides) {
            ensure!(span.len() as u64 == out_bytes, "internal error: span size");
            span
        } else {
            gather(&span, es as usize, &t.size, &strides, out_bytes)?
        };
        if big_endian && es > 1 {
            for el in data.chunks_exact_mut(es as usize) {
                el.reverse();
            }
        }
        Ok(RawTensor { dtype, shape, data })
    }

    /// Reads `len` bytes at `start` of a storage record (CRC-checked when it is the whole record).
    fn read_span(
        &mut self,
        key: &str,
        entry: usize,
        nbytes: u64,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let compressed = self.zip.entry(entry).method != 0;
        if compressed {
            let cached = match self.info.get(key).and_then(|i| i.cached.clone()) {
                Some(c) => c,
                None => {
                    let all = Rc::new(self.zip.read_all(entry, nbytes)?);
                    if let Some(i) = self.info.get_mut(key) {
                        i.cached = Some(all.clone());
                        i.crc_checked = true;
                    }
                    all
                }
            };
            let s = usize::try_from(start)?;
            let e = usize::try_from(start + len)?;
            return cached
                .get(s..e)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| anyhow!("internal error: span outside storage"));
        }
        let mut buf = vec![0u8; usize::try_from(len)?];
        self.zip.read_range(entry, start, &mut buf)?;
        if start == 0 && len == nbytes {
            let e = self.zip.entry(entry).clone();
            check_crc(&e, crc32(&buf))?;
            if let Some(i) = self.info.get_mut(key) {
                i.crc_checked = true;
            }
        }
        Ok(buf)
    }

    /// CRC-checks storages that were only read partially.
    fn verify_remaining(&mut self) -> Result<()> {
        let mut pending: Vec<usize> = self
            .info
            .values()
            .filter(|i| !i.crc_checked)
            .map(|i| i.entry)
            .collect();
        pending.sort_unstable();
        for entry in pending {
            self.zip.verify_crc(entry)?;
        }
        Ok(())
    }
}

/// Whether a view is row-major contiguous (strides of size-1 dimensions do not matter).
fn is_contiguous(size: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies a strided view out of `span` (which starts at the view's first element).
fn gather(span: &[u8], es: usize, size: &[u64], stride: &[u64], out_bytes: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(out_bytes)?);
    let oob = || anyhow!("internal error: view outside its storage");
    let nd = size.len();
    if nd == 0 {
        out.extend_from_slice(span.get(..es).ok_or_else(oob)?);
        return Ok(out);
    }
    let (inner_n, inner_s) = (size[nd - 1] as usize, stride[nd - 1] as usize * es);
    let mut idx = vec![0u64; nd - 1];
    loop {
        let base: u64 = idx.iter().zip(stride).map(|(&i, &s)| i * s).sum::<u64>() * es as u64;
        let base = usize::try_from(base)?;
        for j in 0..inner_n {
            let p = base + j * inner_s;
            out.extend_from_slice(span.get(p..p + es).ok_or_else(oob)?);
        }
        // Advance the odometer over the outer dimensions.
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Writes `tensors` as a torch.save archive into `out` (the caller handles files).
pub(crate) fn write<W: Write>(
    out: W,
    tensors: &[(String, RawTensor)],
    opts: &WriteOptions<'_>,
) -> Result<W> {
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .enumerate()
        .map(|(i, (name, t))| TensorEntry {
            name,
            dtype: t.dtype,
            shape: &t.shape,
            key: i.to_string(),
        })
        .collect();
    let pkl = pickle::write_state_dict(&entries, opts.location);

    let mut zip = ZipWriter::new(out);
    let dir = ARCHIVE_DIR;
    zip.add(&format!("{dir}/data.pkl"), &pkl)?;
    zip.add(&format!("{dir}/.format_version"), b"1")?;
    zip.add(&format!("{dir}/.storage_alignment"), b"64")?;
    let order: &[u8] = if opts.big_endian { b"big" } else { b"little" };
    zip.add(&format!("{dir}/byteorder"), order)?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let name = format!("{dir}/data/{i}");
        let es = t.dtype.size_bytes();
        if opts.big_endian && es > 1 {
            let mut swapped = t.data.clone();
            for el in swapped.chunks_exact_mut(es) {
                el.reverse();
            }
            zip.add(&name, &swapped)?;
        } else {
            zip.add(&name, &t.data)?;
        }
    }
    zip.add(&format!("{dir}/version"), b"3\n")?;
    let id = serialization_id(&zip.records);
    zip.add(&format!("{dir}/.data/serialization_id"), id.as_bytes())?;
    zip.finish()
}

/// A 40-digit id in torch's format: a hash of the record names and a hash of their CRCs.
fn serialization_id(records: &[(String, u32, u64)]) -> String {
    fn combine(seed: u64, v: u64) -> u64 {
        seed ^ v
            .wrapping_add(0x9e37_79b9)
            .wrapping_add(seed << 6)
            .wrapping_add(seed >> 2)
    }
    fn fnv1a(s: &str) -> u64 {
        s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
    let names = records.iter().fold(0, |h, (n, _, _)| combine(h, fnv1a(n)));
    let crcs = records
        .iter()
        .fold(0, |h, (_, c, s)| combine(combine(h, u64::from(*c)), *s));
    format!("{names:020}{crcs:020}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample() -> Vec<(String, RawTensor)> {
        let f: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        vec![
            ("a.weight".into(), RawTensor::from_f32(vec![2, 3, 4], &f)),
            (
                "b.long".into(),
                RawTensor {
                    dtype: DType::I64,
                    shape: vec![3],
                    data: [-1i64, 0, 1 << 40]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                },
            ),
            (
                "c.half".into(),
                RawTensor {
                    dtype: DType::F16,
                    shape: vec![2],
                    data: vec![0x00, 0x3c, 0x00, 0xc0],
                },
            ),
            (
                "d.scalar".into(),
                RawTensor {
                    dtype: DType::F64,
                    shape: vec![],
                    data: 2.5f64.to_le_bytes().to_vec(),
                },
            ),
            (
                "e.empty".into(),
                RawTensor {
                    dtype: DType::Bool,
                    shape: vec![0, 5],
                    data: vec![],
                },
            ),
        ]
    }

    fn round_trip(opts: &WriteOptions<'_>) -> Vec<u8> {
        let tensors = sample();
        let bytes = write(Vec::new(), &tensors, opts).unwrap();
        let back = read(Cursor::new(bytes.clone()), bytes.len() as u64).unwrap();
        assert_eq!(back, tensors);
        bytes
    }

    #[test]
    fn round_trip_little_endian() {
        round_trip(&WriteOptions::default());
    }

    #[test]
    fn big_endian_and_cuda_locations_load() {
        let bytes = round_trip(&WriteOptions {
            location: "cuda:1",
            big_endian: true,
        });
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("cuda:1") && text.contains("big"));
    }

    #[test]
    fn strided_views_are_gathered() {
        // 2x3 row-major [0..6], read transposed (3x2 with strides (1, 3)).
        let span: Vec<u8> = (0u8..6).collect();
        let out = gather(&span, 1, &[3, 2], &[1, 3], 6).unwrap();
        assert_eq!(out, [0, 3, 1, 4, 2, 5]);
        // Expanded: stride 0.
        let out = gather(&span[..2], 2, &[3], &[0], 6).unwrap();
        assert_eq!(out, [0, 1, 0, 1, 0, 1]);
        assert!(is_contiguous(&[2, 1, 3], &[3, 99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
    }

    #[test]
    fn serialization_id_has_torch_format() {
        let id = serialization_id(&[("archive/data.pkl".into(), 5, 10)]);
        assert_eq!(id.len(), 40);
        assert!(id.bytes().all(|b| b.is_ascii_digit()));
    }
}
