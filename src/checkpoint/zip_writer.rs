//! The zip writer of PyTorch archives.
//!
//! Reading goes through the `zip` crate (see `torch_zip`); writing keeps its own few lines because
//! `torch.save`'s layout is not what the `zip` crate writes: torch's `PyTorchStreamWriter` (miniz) stores
//! every record with a data descriptor and pads its local header with an `FB` extra field so that the record
//! data starts at a multiple of 64 bytes (`.storage_alignment`, so that tensors mapped from the file by
//! `torch.load(mmap=True)` are aligned), and it always ends with zip64 end-of-central-directory records. The
//! `zip` crate's writer has no data descriptors for stored entries and pads with another extra field, so its
//! files would differ; writing torch's layout keeps our `.pt` files byte-identical to `torch.save`'s
//! (tests/checkpoint_io.rs compares them). CRC-32s come from `crc32fast`.

use std::io::{self, Write};

use anyhow::{ensure, Result};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const U32_MAX: u64 = 0xffff_ffff;

/// Alignment of record data, as written by torch (`.storage_alignment`).
pub(crate) const ALIGNMENT: u64 = 64;

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
        let crc = crc32fast::hash(data);
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
    use std::io::{Cursor, Read};

    #[test]
    fn records_are_aligned_and_readable_by_the_zip_crate() {
        let mut w = ZipWriter::new(Vec::new());
        w.add("archive/data.pkl", b"pickle bytes").unwrap();
        w.add("archive/data/0", &[]).unwrap();
        let long: Vec<u8> = (0u8..200).collect();
        w.add("archive/data/1", &long).unwrap();
        assert_eq!(
            w.records[2],
            ("archive/data/1".to_string(), crc32fast::hash(&long), 200)
        );
        let bytes = w.finish().unwrap();
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        assert_eq!(zip.len(), 3);
        let want: [&[u8]; 3] = [b"pickle bytes", b"", &long];
        for (i, want) in want.iter().enumerate() {
            let mut f = zip.by_index(i).unwrap();
            assert_eq!(f.compression(), zip::CompressionMethod::Stored);
            assert_eq!(f.data_start() % ALIGNMENT, 0, "{}", f.name());
            assert_eq!(f.crc32(), crc32fast::hash(want));
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            assert_eq!(&data, want);
        }
    }
}
