//! PyTorch's zip+pickle checkpoint format (`torch.save`, torch >= 1.6).
//!
//! Layout: `<dir>/data.pkl` (the pickled object, tensors as persistent ids), `<dir>/data/<key>`
//! (raw storages), `<dir>/byteorder`, `<dir>/version`, `<dir>/.format_version`,
//! `<dir>/.storage_alignment` and `<dir>/.data/serialization_id`.

use std::collections::HashMap;
use std::io::{Cursor, Read, Seek, Write};
use std::rc::Rc;

use anyhow::Result;
use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use super::error::{corrupt, ensure_intact, ReadError};
use super::open::FileBytes;
use super::pickle::{self, TensorEntry, TensorRef, Value};
use super::zip_writer::ZipWriter;
use super::{DType, RawTensor, StoredBytes, StoredTensor};

/// Name of the top-level folder the writer uses.
const ARCHIVE_DIR: &str = "archive";

/// Largest tensor materialized from an overlapping (e.g. expanded, stride-0) view.
const MAX_EXPANDED_BYTES: u64 = 1 << 30;

/// Deflate cannot expand data by more than ~1032:1; an entry claiming more is corrupt.
const MAX_DEFLATE_RATIO: u64 = 1032;

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

/// A `zip` crate error while opening or reading `what`: the archive is read from memory (the mapped
/// file), so only an operating-system error is an I/O problem; everything else is about the bytes.
fn zip_error(what: &str, e: ZipError) -> ReadError {
    match e {
        ZipError::Io(e) if e.raw_os_error().is_some() => ReadError::Io(e),
        e => corrupt!("{what}: {e}"),
    }
}

/// An error while reading entry `name`'s bytes: an operating-system error (EIO, ...) is an I/O problem;
/// everything else the zip crate or the decompressor reports is about the bytes.
fn entry_read_error(name: &str, e: std::io::Error) -> ReadError {
    if e.raw_os_error().is_some() {
        ReadError::Io(e)
    } else if e.to_string().contains("checksum") {
        corrupt!("entry '{name}' is corrupt: CRC-32 mismatch")
    } else {
        corrupt!("cannot read entry '{name}': {e}")
    }
}

/// Reads one whole entry through the `zip` crate (stored or deflated), checking its CRC-32 and size;
/// fails if it is larger than `limit` bytes.
///
/// A CRC-32 of 0 on non-empty data means torch saved without checksums (`compute_crc32=False`), so that
/// entry is read without the check.
fn read_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    index: usize,
    limit: u64,
) -> Result<Vec<u8>, ReadError> {
    let (name, size, method, unchecked) = {
        let f = zip
            .by_index_raw(index)
            .map_err(|e| zip_error(&format!("zip entry {index}"), e))?;
        let name = f.name().to_string();
        let (size, compressed) = (f.size(), f.compressed_size());
        match f.compression() {
            CompressionMethod::Stored => ensure_intact!(
                size == compressed,
                "stored entry '{name}' has inconsistent sizes"
            ),
            CompressionMethod::Deflated => ensure_intact!(
                size <= compressed
                    .saturating_mul(MAX_DEFLATE_RATIO)
                    .saturating_add(1024),
                "entry '{name}' claims an impossible size"
            ),
            m => {
                return Err(corrupt!(
                    "entry '{name}' uses unsupported compression method {m}"
                ))
            }
        }
        ensure_intact!(
            size <= limit,
            "entry '{name}' is unexpectedly large ({size} bytes)"
        );
        (name, size, f.compression(), f.crc32() == 0 && size > 0)
    };
    // Grows with the data actually read, so a lying size cannot allocate more than the file holds.
    let mut out = Vec::with_capacity(usize::try_from(size.min(1 << 20)).unwrap_or(0));
    let read = if unchecked {
        log::debug!("entry '{name}' has no CRC-32; not verified");
        let raw = zip
            .by_index_raw(index)
            .map_err(|e| zip_error(&format!("entry '{name}'"), e))?;
        if method == CompressionMethod::Deflated {
            flate2::read::DeflateDecoder::new(raw)
                .take(size + 1)
                .read_to_end(&mut out)
        } else {
            raw.take(size + 1).read_to_end(&mut out)
        }
    } else {
        // The zip crate decompresses and checks the CRC-32 when the entry's end is reached, which
        // reading up to one byte past the declared size guarantees.
        let file = zip
            .by_index(index)
            .map_err(|e| zip_error(&format!("entry '{name}'"), e))?;
        file.take(size + 1).read_to_end(&mut out)
    };
    read.map_err(|e| entry_read_error(&name, e))?;
    ensure_intact!(
        out.len() as u64 == size,
        "entry '{name}' has {} bytes, expected {size} (truncated or corrupt)",
        out.len()
    );
    Ok(out)
}

/// Reads a stored entry through the `zip` crate for its CRC-32 check only (the bytes are used from the
/// file directly); fails unless the entry has exactly `size` bytes.
fn verify_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    index: usize,
    size: u64,
) -> Result<(), ReadError> {
    let file = zip
        .by_index(index)
        .map_err(|e| zip_error(&format!("zip entry {index}"), e))?;
    let name = file.name().to_string();
    if file.crc32() == 0 && size > 0 {
        log::debug!("entry '{name}' has no CRC-32; not verified");
        return Ok(());
    }
    let mut reader = file.take(size + 1);
    let mut buf = vec![0u8; (1 << 20).min(size as usize + 1)];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(entry_read_error(&name, e)),
        }
    }
    ensure_intact!(
        total == size,
        "entry '{name}' has {total} bytes, expected {size} (truncated or corrupt)"
    );
    Ok(())
}

/// Reads the tensors of a whole torch zip checkpoint (`file`, usually memory-mapped), in state-dict order.
///
/// Tensors that are their stored record's bytes as they are (stored, little-endian, contiguous views) stay
/// in the file as byte ranges; the others are materialized. Every record used is CRC-checked by the `zip`
/// crate as it is read (stored records are read once for the check and their pages released).
pub(crate) fn read(file: &FileBytes) -> Result<Vec<StoredTensor>, ReadError> {
    let bytes = file.bytes();
    let len = bytes.len() as u64;
    let mut zip = ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| zip_error("truncated or corrupt zip archive", e))?;
    let names: Vec<String> = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .collect();
    let (pkl_name, prefix) = find_data_pkl(&names)?;
    let torchscript = zip
        .index_for_name(&format!("{prefix}constants.pkl"))
        .is_some()
        || names
            .iter()
            .any(|n| n.starts_with(&format!("{prefix}code/")));

    let big_endian = match zip.index_for_name(&format!("{prefix}byteorder")) {
        None => false,
        Some(i) => {
            let order = read_entry(&mut zip, i, 16)
                .map_err(|e| e.context("cannot read the byteorder record"))?;
            match order.as_slice() {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(corrupt!(
                        "unknown byte order '{}' in the archive",
                        String::from_utf8_lossy(other)
                    ))
                }
            }
        }
    };

    let pkl_index = zip
        .index_for_name(&pkl_name)
        .ok_or_else(|| corrupt!("internal error: '{pkl_name}' vanished"))?;
    let pkl = read_entry(&mut zip, pkl_index, len)
        .map_err(|e| e.context(format!("cannot read '{pkl_name}'")))?;
    let root = pickle::unpickle(&pkl).map_err(|e| {
        let detail = format!("cannot parse '{pkl_name}': {e:#}");
        if torchscript {
            ReadError::NotACheckpoint(format!(
                "this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; \
                 save the weights with torch.save(model.state_dict()) instead: {detail}"
            ))
        } else {
            ReadError::UnsupportedPickle(detail)
        }
    })?;
    drop(pkl);

    let tensors = select_state_dict(&root)?;
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (_, t) in &tensors {
        *uses.entry(t.storage.key.clone()).or_default() += 1;
    }
    let mut storages = Storages {
        zip: &mut zip,
        file,
        prefix: &prefix,
        big_endian,
        uses,
        records: HashMap::new(),
    };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let stored = storages
            .materialize(&name, &t)
            .map_err(|e| e.context(format!("cannot load tensor '{name}'")))?;
        out.push(StoredTensor {
            name,
            dtype: t.storage.dtype,
            shape: stored.0,
            bytes: stored.1,
        });
    }
    Ok(out)
}

/// Finds `<dir>/data.pkl`; returns its name and the `<dir>/` prefix.
fn find_data_pkl(names: &[String]) -> Result<(String, String), ReadError> {
    let candidates: Vec<&String> = names
        .iter()
        .filter(|n| match n.strip_suffix("data.pkl") {
            Some(dir) => dir.is_empty() || (dir.ends_with('/') && dir.matches('/').count() == 1),
            None => false,
        })
        .collect();
    match candidates.as_slice() {
        [name] => {
            let prefix = name[..name.len() - "data.pkl".len()].to_string();
            Ok(((*name).clone(), prefix))
        }
        [] => {
            let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
            Err(ReadError::NotACheckpoint(format!(
                "zip archive has no data.pkl entry, so it is not a torch.save checkpoint \
                 (entries: {}{})",
                shown.join(", "),
                if names.len() > 8 { ", ..." } else { "" }
            )))
        }
        _ => Err(corrupt!("zip archive has several data.pkl entries")),
    }
}

/// Picks the state dict: the top-level dict, or the dict under "model"/"state_dict" when the
/// checkpoint wraps it (MONAI's CheckpointSaver writes `{"model": state_dict, ...}`).
fn select_state_dict(root: &Value) -> Result<Vec<(String, Rc<TensorRef>)>, ReadError> {
    let Value::Dict(top) = root else {
        return Err(ReadError::NotACheckpoint(format!(
            "the checkpoint holds a {} at the top level, expected a dict of tensors (a state_dict)",
            root.type_name()
        )));
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
        return Err(ReadError::NotACheckpoint(format!(
            "no tensors found in the checkpoint (top-level keys: {})",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        )));
    }
    Ok(tensors)
}

/// A storage record, checked.
enum Record {
    /// Stored (uncompressed): the record's bytes start at this offset of the file.
    InFile { start: usize, dtype: DType },
    /// Deflated: the decompressed bytes (kept until the last tensor using them is read).
    Decompressed { bytes: Vec<u8>, dtype: DType },
}

/// Storage records read so far, with the number of tensors still to be read from each.
struct Storages<'a, R> {
    zip: &'a mut ZipArchive<R>,
    file: &'a FileBytes,
    prefix: &'a str,
    big_endian: bool,
    /// Tensors not yet materialized per storage key: the last one may take decompressed bytes.
    uses: HashMap<String, usize>,
    records: HashMap<String, Record>,
}

/// A record's bytes for one tensor.
enum RecordBytes<'b> {
    /// In the file, from this offset.
    InFile(usize),
    /// Decompressed, shared with later tensors.
    Shared(&'b [u8]),
    /// Decompressed, owned by the last tensor that uses them.
    Owned(Vec<u8>),
}

impl<R: Read + Seek> Storages<'_, R> {
    /// Checks and reads the record of `t`'s storage (once); returns its size and bytes.
    fn record(&mut self, name: &str, t: &TensorRef) -> Result<(u64, RecordBytes<'_>), ReadError> {
        let s = &t.storage;
        let record = format!("{}data/{}", self.prefix, s.key);
        let nbytes = s
            .numel
            .checked_mul(s.dtype.size_bytes() as u64)
            .ok_or_else(|| corrupt!("storage '{record}' is too large"))?;
        if !self.records.contains_key(&s.key) {
            let entry = self
                .zip
                .index_for_name(&record)
                .ok_or_else(|| corrupt!("storage '{record}' is missing from the archive"))?;
            let (size, method, start) = {
                let f = self
                    .zip
                    .by_index_raw(entry)
                    .map_err(|e| zip_error(&format!("entry '{record}'"), e))?;
                (f.size(), f.compression(), f.data_start())
            };
            ensure_intact!(
                size == nbytes,
                "storage '{record}' has {size} bytes but is declared as {} {} elements",
                s.numel,
                s.dtype.name()
            );
            if !s.location.starts_with("cpu") {
                log::debug!("storage '{record}' was saved from '{}'", s.location);
            }
            let checked = if method == CompressionMethod::Stored {
                verify_entry(self.zip, entry, size)?;
                let end = start
                    .checked_add(size)
                    .filter(|&e| e <= self.file.bytes().len() as u64);
                ensure_intact!(
                    end.is_some(),
                    "entry '{record}' extends past the end of the file"
                );
                // Read for the CRC check; the tensors read these pages again when they are copied.
                self.file.release(start as usize..(start + size) as usize);
                Record::InFile {
                    start: start as usize,
                    dtype: s.dtype,
                }
            } else {
                Record::Decompressed {
                    bytes: read_entry(self.zip, entry, size)?,
                    dtype: s.dtype,
                }
            };
            self.records.insert(s.key.clone(), checked);
        }
        let left = self.uses.get_mut(&s.key).map_or(0, |n| {
            *n = n.saturating_sub(1);
            *n
        });
        let dtype = match self.records.get(&s.key) {
            Some(Record::InFile { dtype, .. } | Record::Decompressed { dtype, .. }) => *dtype,
            None => return Err(corrupt!("internal error: storage bookkeeping")),
        };
        ensure_intact!(
            dtype == s.dtype,
            "storage '{record}' is used as both {} and {} (tensor '{name}')",
            dtype.name(),
            s.dtype.name()
        );
        if let Some(&Record::InFile { start, .. }) = self.records.get(&s.key) {
            return Ok((nbytes, RecordBytes::InFile(start)));
        }
        let bookkeeping = || corrupt!("internal error: storage bookkeeping");
        if left == 0 {
            return match self.records.remove(&s.key) {
                Some(Record::Decompressed { bytes, .. }) => Ok((nbytes, RecordBytes::Owned(bytes))),
                _ => Err(bookkeeping()),
            };
        }
        match self.records.get(&s.key) {
            Some(Record::Decompressed { bytes, .. }) => Ok((nbytes, RecordBytes::Shared(bytes))),
            _ => Err(bookkeeping()),
        }
    }

    /// Reads a tensor view: its shape, and its bytes as a range of the file when they are contiguous
    /// little-endian bytes of a stored record, else as contiguous row-major bytes in memory.
    fn materialize(
        &mut self,
        name: &str,
        t: &TensorRef,
    ) -> Result<(Vec<usize>, StoredBytes), ReadError> {
        let dtype = t.storage.dtype;
        let es = dtype.size_bytes() as u64;
        let record = format!("{}data/{}", self.prefix, t.storage.key);
        let big_endian = self.big_endian;
        let file = self.file;

        let shape: Vec<usize> = t
            .size
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| corrupt!("tensor dimension too large")))
            .collect::<Result<_, _>>()?;
        let overflow = || corrupt!("tensor size {:?} overflows", t.size);
        let numel = t
            .size
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)?;
        let out_bytes = numel.checked_mul(es).ok_or_else(overflow)?;
        let (nbytes, bytes) = self.record(name, t)?;
        if numel == 0 {
            return Ok((shape, StoredBytes::Owned(Vec::new())));
        }
        // Highest element touched, relative to the storage start.
        let mut last = t.offset;
        for (&d, &s) in t.size.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(|| corrupt!("tensor strides {:?} overflow", t.stride))?;
        }
        let needed = last
            .checked_add(1)
            .and_then(|x| x.checked_mul(es))
            .ok_or_else(|| corrupt!("tensor layout overflows"))?;
        ensure_intact!(
            needed <= nbytes,
            "storage '{record}' has {nbytes} bytes but tensor '{name}' needs {needed}"
        );
        let span_start = t.offset * es;
        let span_len = needed - span_start;
        ensure_intact!(
            out_bytes <= span_len || out_bytes <= MAX_EXPANDED_BYTES,
            "tensor '{name}' is an expanded view of {out_bytes} bytes over {span_len} bytes of \
             storage; refusing to materialize it"
        );
        let (s, e) = (span_start as usize, needed as usize);
        let contiguous = is_contiguous(&t.size, &t.stride);
        let swap = big_endian && es > 1;
        let mut data = match bytes {
            // The common case: the tensor's bytes are in the file as they are.
            RecordBytes::InFile(start) if contiguous && !swap => {
                return Ok((shape, StoredBytes::InFile(start + s..start + e)));
            }
            RecordBytes::InFile(start) => view(
                &file.bytes()[start + s..start + e],
                es,
                t,
                contiguous,
                out_bytes,
            )?,
            RecordBytes::Owned(b) if contiguous && s == 0 && e == b.len() => b,
            RecordBytes::Owned(b) => view(&b[s..e], es, t, contiguous, out_bytes)?,
            RecordBytes::Shared(b) => view(&b[s..e], es, t, contiguous, out_bytes)?,
        };
        if swap {
            for el in data.chunks_exact_mut(es as usize) {
                el.reverse();
            }
        }
        Ok((shape, StoredBytes::Owned(data)))
    }
}

/// The elements of a view whose bytes start at `span`'s start, as contiguous row-major data.
fn view(
    span: &[u8],
    es: u64,
    t: &TensorRef,
    contiguous: bool,
    out_bytes: u64,
) -> Result<Vec<u8>, ReadError> {
    if contiguous {
        ensure_intact!(span.len() as u64 == out_bytes, "internal error: span size");
        Ok(span.to_vec())
    } else {
        gather(span, es as usize, &t.size, &t.stride, out_bytes)
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
fn gather(
    span: &[u8],
    es: usize,
    size: &[u64],
    stride: &[u64],
    out_bytes: u64,
) -> Result<Vec<u8>, ReadError> {
    let too_large = |_| corrupt!("tensor too large for this machine");
    let mut out = Vec::with_capacity(usize::try_from(out_bytes).map_err(too_large)?);
    let oob = || corrupt!("internal error: view outside its storage");
    let nd = size.len();
    if nd == 0 {
        out.extend_from_slice(span.get(..es).ok_or_else(oob)?);
        return Ok(out);
    }
    let (inner_n, inner_s) = (size[nd - 1] as usize, stride[nd - 1] as usize * es);
    let mut idx = vec![0u64; nd - 1];
    loop {
        let base: u64 = idx.iter().zip(stride).map(|(&i, &s)| i * s).sum::<u64>() * es as u64;
        let base = usize::try_from(base).map_err(too_large)?;
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

    /// Reads a whole archive's bytes into owned tensors.
    fn read_bytes(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, ReadError> {
        let file = FileBytes::InMemory(bytes.to_vec());
        let tensors = read(&file)?;
        Ok(super::super::open::into_raw_tensors(&file, tensors))
    }

    fn round_trip(opts: &WriteOptions<'_>) -> Vec<u8> {
        let tensors = sample();
        let bytes = write(Vec::new(), &tensors, opts).unwrap();
        let file = FileBytes::InMemory(bytes.clone());
        let stored = read(&file).unwrap();
        // Little-endian contiguous tensors stay in the file; byte-swapped ones are copied.
        let in_file = stored
            .iter()
            .filter(|t| matches!(t.bytes, StoredBytes::InFile(_)))
            .count();
        let expected_in_file = if opts.big_endian { 0 } else { 4 };
        assert_eq!(in_file, expected_in_file);
        assert_eq!(super::super::open::into_raw_tensors(&file, stored), tensors);
        bytes
    }

    #[test]
    fn truncated_and_corrupt_archives_fail_or_read_the_same() {
        let tensors = sample();
        let bytes = write(Vec::new(), &tensors, &WriteOptions::default()).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                read_bytes(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes parsed"
            );
        }
        // Flip every byte: never a panic, and never different tensors.
        let mut rejected = 0;
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            match read_bytes(&b) {
                Ok(back) => assert_eq!(back, tensors, "flip at {i} changed the tensors"),
                Err(_) => rejected += 1,
            }
        }
        assert!(
            rejected > bytes.len() / 4,
            "only {rejected} flips were detected"
        );
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
