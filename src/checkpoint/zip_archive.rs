//! Minimal zip reader and writer for PyTorch archives.
//!
//! The reader parses the central directory (zip64 included), validates every offset and size
//! against the file length before allocating, and verifies CRC-32s. Stored entries can be read
//! in ranges; deflated entries (a re-zipped checkpoint) are decompressed with the `zip` crate.
//!
//! The writer reproduces the layout of PyTorch's `PyTorchStreamWriter` (miniz): stored entries with
//! data descriptors, an `FB` extra field padding every record's data to 64 bytes, and zip64
//! end-of-central-directory records.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use anyhow::{anyhow, bail, ensure, Context, Result};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const U32_MAX: u64 = 0xffff_ffff;

/// Alignment of record data, as written by torch (`.storage_alignment`).
pub(crate) const ALIGNMENT: u64 = 64;

// ---------------------------------------------------------------------------------------------
// CRC-32 (IEEE, slice-by-8)
// ---------------------------------------------------------------------------------------------

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// Incremental CRC-32 as used by zip.
#[derive(Clone, Copy)]
pub(crate) struct Crc32(u32);

impl Crc32 {
    pub fn new() -> Self {
        Crc32(0xffff_ffff)
    }

    pub fn update(&mut self, data: &[u8]) {
        let t = &CRC_TABLES;
        let mut c = self.0;
        let mut chunks = data.chunks_exact(8);
        for ch in &mut chunks {
            let lo = c ^ u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]);
            let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
            c = t[7][(lo & 0xff) as usize]
                ^ t[6][((lo >> 8) & 0xff) as usize]
                ^ t[5][((lo >> 16) & 0xff) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xff) as usize]
                ^ t[2][((hi >> 8) & 0xff) as usize]
                ^ t[1][((hi >> 16) & 0xff) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in chunks.remainder() {
            c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xff) as usize];
        }
        self.0 = c;
    }

    pub fn finish(self) -> u32 {
        !self.0
    }
}

/// CRC-32 of a buffer.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(data);
    c.finish()
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One central-directory entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub name: String,
    name_bytes: Vec<u8>,
    pub method: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub size: u64,
    header_offset: u64,
}

/// A parsed zip archive over a seekable reader.
pub(crate) struct ZipReader<R> {
    inner: R,
    len: u64,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    data_starts: Vec<Option<u64>>,
}

impl<R: Read + Seek> ZipReader<R> {
    /// Parses the central directory of an archive of `len` bytes.
    pub fn new(mut inner: R, len: u64) -> Result<Self> {
        let (count, cd_size, cd_offset, cd_limit) = find_central_directory(&mut inner, len)?;
        let cd_end = cd_offset
            .checked_add(cd_size)
            .filter(|&e| e <= cd_limit)
            .ok_or_else(|| anyhow!("central directory lies outside the file"))?;
        ensure!(
            count <= cd_size / 46,
            "central directory claims {count} entries but is only {cd_size} bytes"
        );
        let mut cd = vec![0u8; cd_size as usize];
        read_exact_at(&mut inner, cd_offset, &mut cd)?;
        let _ = cd_end;

        let mut entries = Vec::new();
        let mut index = HashMap::new();
        let mut p = 0usize;
        for _ in 0..count {
            let h = cd
                .get(p..p + 46)
                .ok_or_else(|| anyhow!("central directory is truncated"))?;
            ensure!(
                le32(h, 0) == CENTRAL_SIG,
                "bad central directory entry signature"
            );
            let flags = le16(h, 8);
            let method = le16(h, 10);
            let crc32 = le32(h, 16);
            let mut compressed_size = u64::from(le32(h, 20));
            let mut size = u64::from(le32(h, 24));
            let name_len = usize::from(le16(h, 28));
            let extra_len = usize::from(le16(h, 30));
            let comment_len = usize::from(le16(h, 32));
            let mut header_offset = u64::from(le32(h, 42));
            let var = cd
                .get(p + 46..p + 46 + name_len + extra_len + comment_len)
                .ok_or_else(|| anyhow!("central directory is truncated"))?;
            let name_bytes = var[..name_len].to_vec();
            let name = String::from_utf8_lossy(&name_bytes).into_owned();
            ensure!(flags & 1 == 0, "entry '{name}' is encrypted");
            // zip64 extended information replaces saturated fields, in this order.
            let mut extra = &var[name_len..name_len + extra_len];
            while extra.len() >= 4 {
                let id = le16(extra, 0);
                let n = usize::from(le16(extra, 2));
                let body = extra
                    .get(4..4 + n)
                    .ok_or_else(|| anyhow!("entry '{name}' has a truncated extra field"))?;
                if id == 1 {
                    let mut at = 0;
                    let mut next = |field: &mut u64| -> Result<()> {
                        if *field == U32_MAX {
                            ensure!(
                                at + 8 <= body.len(),
                                "entry '{name}' has a short zip64 field"
                            );
                            *field = le64(body, at);
                            at += 8;
                        }
                        Ok(())
                    };
                    next(&mut size)?;
                    next(&mut compressed_size)?;
                    next(&mut header_offset)?;
                }
                extra = &extra[4 + n..];
            }
            ensure!(
                header_offset < len && compressed_size <= len,
                "entry '{name}' points outside the file"
            );
            if index.insert(name.clone(), entries.len()).is_some() {
                bail!("duplicate entry '{name}'");
            }
            entries.push(Entry {
                name,
                name_bytes,
                method,
                crc32,
                compressed_size,
                size,
                header_offset,
            });
            p += 46 + name_len + extra_len + comment_len;
        }
        let n = entries.len();
        Ok(ZipReader {
            inner,
            len,
            entries,
            index,
            data_starts: vec![None; n],
        })
    }

    /// All entries, in central-directory order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Index of the entry with this exact name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The entry at `idx` (from [`ZipReader::find`]).
    pub fn entry(&self, idx: usize) -> &Entry {
        &self.entries[idx]
    }

    /// File offset of an entry's data, validated against its local header.
    fn data_start(&mut self, idx: usize) -> Result<u64> {
        if let Some(s) = self.data_starts[idx] {
            return Ok(s);
        }
        let e = &self.entries[idx];
        let mut h = [0u8; 30];
        read_exact_at(&mut self.inner, e.header_offset, &mut h)?;
        ensure!(
            le32(&h, 0) == LOCAL_SIG,
            "entry '{}' has a bad local header",
            e.name
        );
        ensure!(
            le16(&h, 8) == e.method,
            "entry '{}': local and central headers disagree on the compression method",
            e.name
        );
        let name_len = u64::from(le16(&h, 26));
        let extra_len = u64::from(le16(&h, 28));
        let mut name = vec![0u8; name_len as usize];
        read_exact_at(&mut self.inner, e.header_offset + 30, &mut name)?;
        ensure!(
            name == e.name_bytes,
            "entry '{}': local header names a different file",
            e.name
        );
        let start = e.header_offset + 30 + name_len + extra_len;
        ensure!(
            start
                .checked_add(e.compressed_size)
                .is_some_and(|end| end <= self.len),
            "entry '{}' extends past the end of the file",
            e.name
        );
        self.data_starts[idx] = Some(start);
        Ok(start)
    }

    /// Reads `buf.len()` bytes at `offset` within a stored (uncompressed) entry.
    pub fn read_range(&mut self, idx: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let e = &self.entries[idx];
        ensure!(e.method == 0, "entry '{}' is compressed", e.name);
        ensure!(
            offset
                .checked_add(buf.len() as u64)
                .is_some_and(|end| end <= e.size && end <= e.compressed_size),
            "read past the end of entry '{}'",
            e.name
        );
        let start = self.data_start(idx)?;
        read_exact_at(&mut self.inner, start + offset, buf)
    }

    /// Reads and CRC-checks a whole entry; fails if it is larger than `max_size` bytes.
    pub fn read_all(&mut self, idx: usize, max_size: u64) -> Result<Vec<u8>> {
        let e = self.entries[idx].clone();
        ensure!(
            e.size <= max_size,
            "entry '{}' is unexpectedly large ({} bytes)",
            e.name,
            e.size
        );
        let data = match e.method {
            0 => {
                ensure!(
                    e.size == e.compressed_size,
                    "stored entry '{}' has inconsistent sizes",
                    e.name
                );
                let mut buf = vec![0u8; e.size as usize];
                self.read_range(idx, 0, &mut buf)?;
                buf
            }
            8 => self.read_deflated(&e)?,
            m => bail!("entry '{}' uses unsupported compression method {m}", e.name),
        };
        check_crc(&e, crc32(&data))?;
        Ok(data)
    }

    fn read_deflated(&mut self, e: &Entry) -> Result<Vec<u8>> {
        // Deflate cannot expand data by more than ~1032:1; a larger claim is corrupt.
        ensure!(
            e.size <= e.compressed_size.saturating_mul(1032).saturating_add(1024),
            "entry '{}' claims an impossible size",
            e.name
        );
        self.data_start(self.index[&e.name])?;
        self.inner.seek(SeekFrom::Start(0))?;
        let mut archive = zip::ZipArchive::new(&mut self.inner)
            .with_context(|| format!("cannot decompress entry '{}'", e.name))?;
        let file = archive
            .by_name(&e.name)
            .with_context(|| format!("cannot decompress entry '{}'", e.name))?;
        let mut out = Vec::new();
        file.take(e.size + 1)
            .read_to_end(&mut out)
            .with_context(|| format!("cannot decompress entry '{}'", e.name))?;
        ensure!(
            out.len() as u64 == e.size,
            "entry '{}' decompressed to {} bytes, expected {}",
            e.name,
            out.len(),
            e.size
        );
        Ok(out)
    }

    /// Streams a stored entry and compares its CRC-32 with the central directory.
    pub fn verify_crc(&mut self, idx: usize) -> Result<()> {
        let e = self.entries[idx].clone();
        if e.method != 0 {
            // Compressed entries are only ever read whole, which checks the CRC.
            return Ok(());
        }
        let mut crc = Crc32::new();
        let mut buf = vec![0u8; (1 << 20).min(e.size as usize)];
        let mut done = 0u64;
        while done < e.size {
            let n = (e.size - done).min(buf.len() as u64) as usize;
            self.read_range(idx, done, &mut buf[..n])?;
            crc.update(&buf[..n]);
            done += n as u64;
        }
        check_crc(&e, crc.finish())
    }
}

/// Compares a computed CRC with the stored one. A stored CRC of 0 on non-empty data means torch
/// saved without checksums (`compute_crc32=False`), so it is not checked.
pub(crate) fn check_crc(e: &Entry, actual: u32) -> Result<()> {
    if e.crc32 == 0 && e.size > 0 {
        log::debug!("entry '{}' has no CRC-32; not verified", e.name);
        return Ok(());
    }
    ensure!(
        actual == e.crc32,
        "entry '{}' is corrupt: CRC-32 is {actual:08x}, expected {:08x}",
        e.name,
        e.crc32
    );
    Ok(())
}

fn read_exact_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> Result<()> {
    r.seek(SeekFrom::Start(offset))?;
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            anyhow!("unexpected end of file at offset {offset}")
        } else {
            anyhow!(e)
        }
    })
}

/// Locates the central directory: (entry count, size, offset, end limit).
fn find_central_directory<R: Read + Seek>(r: &mut R, len: u64) -> Result<(u64, u64, u64, u64)> {
    ensure!(len >= 22, "file is too short to be a zip archive");
    let tail_len = len.min(22 + 65535);
    let mut tail = vec![0u8; tail_len as usize];
    read_exact_at(r, len - tail_len, &mut tail)?;
    let pos = (0..=tail.len() - 22)
        .rev()
        .find(|&i| {
            le32(&tail, i) == EOCD_SIG && i + 22 + usize::from(le16(&tail, i + 20)) == tail.len()
        })
        .ok_or_else(|| anyhow!("end-of-central-directory record not found"))?;
    let eocd = &tail[pos..pos + 22];
    let eocd_pos = len - tail_len + pos as u64;
    ensure!(
        le16(eocd, 4) == 0 && le16(eocd, 6) == 0,
        "multi-disk zip archives are not supported"
    );
    let mut count = u64::from(le16(eocd, 10));
    let mut cd_size = u64::from(le32(eocd, 12));
    let mut cd_offset = u64::from(le32(eocd, 16));
    let mut limit = eocd_pos;

    let has_locator = pos >= 20 && le32(&tail, pos - 20) == ZIP64_LOCATOR_SIG;
    if has_locator {
        let loc = &tail[pos - 20..pos];
        let z64_pos = le64(loc, 8);
        ensure!(
            z64_pos.checked_add(56).is_some_and(|e| e <= eocd_pos - 20),
            "zip64 end-of-central-directory record lies outside the file"
        );
        let mut z = [0u8; 56];
        read_exact_at(r, z64_pos, &mut z)?;
        ensure!(
            le32(&z, 0) == ZIP64_EOCD_SIG,
            "bad zip64 end-of-central-directory record"
        );
        count = le64(&z, 32);
        cd_size = le64(&z, 40);
        cd_offset = le64(&z, 48);
        limit = z64_pos;
    } else {
        ensure!(
            count != 0xffff && cd_size != U32_MAX && cd_offset != U32_MAX,
            "zip64 end-of-central-directory locator is missing"
        );
    }
    Ok((count, cd_size, cd_offset, limit))
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Writes a zip archive with the exact record layout of torch's `PyTorchStreamWriter`.
pub(crate) struct ZipWriter<W: Write> {
    out: W,
    pos: u64,
    central: Vec<u8>,
    count: u64,
    /// (name, crc32, size) of every record written so far.
    pub records: Vec<(String, u32, u64)>,
}

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

impl<W: Write> ZipWriter<W> {
    pub fn new(out: W) -> Self {
        ZipWriter {
            out,
            pos: 0,
            central: Vec::new(),
            count: 0,
            records: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Appends a stored record whose data starts at a multiple of [`ALIGNMENT`].
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<()> {
        ensure!(name.len() < 0xffff, "record name is too long");
        let crc = crc32(data);
        let size = data.len() as u64;
        let offset = self.pos;
        let zip64 = size >= U32_MAX || offset >= U32_MAX;
        let mut z64 = Vec::new();
        if zip64 {
            let mut body = Vec::new();
            if size >= U32_MAX {
                put64(&mut body, size);
                put64(&mut body, size);
            }
            if offset >= U32_MAX {
                put64(&mut body, offset);
            }
            put16(&mut z64, 1);
            put16(&mut z64, body.len() as u16);
            z64.extend_from_slice(&body);
        }
        // torch's getPadding(): pad with an "FB" extra field so the data is aligned.
        let start = offset + 30 + name.len() as u64 + z64.len() as u64 + 4;
        let pad = (ALIGNMENT - start % ALIGNMENT) % ALIGNMENT;
        let extra_len = z64.len() + 4 + pad as usize;
        let flags: u16 = 0x0800 | if size > 0 { 0x0008 } else { 0 };

        let mut h = Vec::with_capacity(30 + name.len() + extra_len);
        put32(&mut h, LOCAL_SIG);
        put16(&mut h, 0); // version needed
        put16(&mut h, flags);
        put16(&mut h, 0); // stored
        put32(&mut h, 0); // time, date
        put32(&mut h, 0); // crc (in the data descriptor)
        put64(&mut h, 0); // sizes (in the data descriptor)
        put16(&mut h, name.len() as u16);
        put16(&mut h, extra_len as u16);
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&z64);
        h.extend_from_slice(b"FB");
        put16(&mut h, pad as u16);
        h.resize(h.len() + pad as usize, b'Z');
        self.emit(&h)?;
        self.emit(data)?;
        if size > 0 {
            let mut d = Vec::with_capacity(24);
            put32(&mut d, DESCRIPTOR_SIG);
            put32(&mut d, crc);
            if zip64 {
                put64(&mut d, size);
                put64(&mut d, size);
            } else {
                put32(&mut d, size as u32);
                put32(&mut d, size as u32);
            }
            self.emit(&d)?;
        }

        let c = &mut self.central;
        put32(c, CENTRAL_SIG);
        put16(c, 0); // version made by
        put16(c, 0); // version needed
        put16(c, flags);
        put16(c, 0); // stored
        put32(c, 0); // time, date
        put32(c, crc);
        put32(c, size.min(U32_MAX) as u32);
        put32(c, size.min(U32_MAX) as u32);
        put16(c, name.len() as u16);
        put16(c, z64.len() as u16);
        put16(c, 0); // comment
        put16(c, 0); // disk
        put16(c, 0); // internal attributes
        put32(c, 0); // external attributes
        put32(c, offset.min(U32_MAX) as u32);
        c.extend_from_slice(name.as_bytes());
        c.extend_from_slice(&z64);
        self.count += 1;
        self.records.push((name.to_string(), crc, size));
        Ok(())
    }

    /// Writes the central directory and the (zip64) end records; returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        let cd_offset = self.pos;
        let central = std::mem::take(&mut self.central);
        let cd_size = central.len() as u64;
        self.emit(&central)?;
        let z64_pos = self.pos;
        let mut t = Vec::with_capacity(56 + 20 + 22);
        put32(&mut t, ZIP64_EOCD_SIG);
        put64(&mut t, 44);
        put16(&mut t, 0x031e); // version made by (as miniz writes)
        put16(&mut t, 0x002d); // version needed: 4.5
        put32(&mut t, 0);
        put32(&mut t, 0);
        put64(&mut t, self.count);
        put64(&mut t, self.count);
        put64(&mut t, cd_size);
        put64(&mut t, cd_offset);
        put32(&mut t, ZIP64_LOCATOR_SIG);
        put32(&mut t, 0);
        put64(&mut t, z64_pos);
        put32(&mut t, 1);
        put32(&mut t, EOCD_SIG);
        put32(&mut t, 0); // disk numbers
        put16(&mut t, self.count.min(0xffff) as u16);
        put16(&mut t, self.count.min(0xffff) as u16);
        put32(&mut t, cd_size.min(U32_MAX) as u32);
        put32(&mut t, cd_offset.min(U32_MAX) as u32);
        put16(&mut t, 0); // comment length
        self.emit(&t)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample() -> Vec<u8> {
        let mut w = ZipWriter::new(Vec::new());
        w.add("archive/data.pkl", b"pickle bytes").unwrap();
        w.add("archive/data/0", &[]).unwrap();
        w.add("archive/data/1", &(0u8..200).collect::<Vec<_>>())
            .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn crc32_matches_reference() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut c = Crc32::new();
        c.update(&data[..333]);
        c.update(&data[333..]);
        assert_eq!(c.finish(), crc32(&data));
    }

    #[test]
    fn write_then_read() {
        let bytes = sample();
        let len = bytes.len() as u64;
        let mut z = ZipReader::new(Cursor::new(bytes.clone()), len).unwrap();
        assert_eq!(z.entries().len(), 3);
        for (i, e) in z.entries().iter().enumerate() {
            assert_eq!(z.find(&e.name), Some(i));
        }
        let i = z.find("archive/data/1").unwrap();
        let all = z.read_all(i, 1 << 20).unwrap();
        assert_eq!(all, (0u8..200).collect::<Vec<_>>());
        let mut part = [0u8; 5];
        z.read_range(i, 10, &mut part).unwrap();
        assert_eq!(part, [10, 11, 12, 13, 14]);
        z.verify_crc(i).unwrap();
        assert!(z.read_range(i, 199, &mut part).is_err());
        // Every record's data is 64-byte aligned.
        for idx in 0..3 {
            assert_eq!(z.data_start(idx).unwrap() % ALIGNMENT, 0);
        }
        // The zip crate agrees.
        let mut other = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let mut f = other.by_name("archive/data.pkl").unwrap();
        let mut s = Vec::new();
        f.read_to_end(&mut s).unwrap();
        assert_eq!(s, b"pickle bytes");
    }

    #[test]
    fn truncated_and_corrupt_archives_fail() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let b = bytes[..cut].to_vec();
            let ok = ZipReader::new(Cursor::new(b), cut as u64)
                .and_then(|mut z| {
                    let i = z.find("archive/data/1").context("missing")?;
                    z.read_all(i, 1 << 20)
                })
                .is_ok();
            assert!(!ok, "prefix of {cut} bytes parsed");
        }
        // Flip every byte: must never panic; a successful read returns the right data.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            let len = b.len() as u64;
            if let Ok(mut z) = ZipReader::new(Cursor::new(b), len) {
                if let Some(idx) = z.find("archive/data/1") {
                    if let Ok(data) = z.read_all(idx, 1 << 20) {
                        assert_eq!(data, (0u8..200).collect::<Vec<_>>(), "flip at {i}");
                    }
                }
            }
        }
    }
}
