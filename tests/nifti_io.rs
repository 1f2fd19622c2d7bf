//! NIfTI reading and writing checked against nibabel 5.4 (what MONAI's `LoadImage` uses).
//!
//! The reference values are made at test time: `$VISTA3D_PYTHON` (with nibabel and numpy) runs the script
//! below, which generates NIfTI files with a variety of headers next to the real test data (TotalSegmentator CTs,
//! nibabel's test files) and writes, for every file, what nibabel loads (`np.asanyarray(img.dataobj)` as float32
//! in C order, `img.affine`, the raw header fields) into `CARGO_TARGET_TMPDIR`. Files we write are loaded back
//! by nibabel the same way. Run `bash scripts/test.sh` to set everything up.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use ndarray::Array3;
use serde_json::Value;
use vista3d::io::{read_nifti, write_nifti, NiftiHeader, NiftiImage, NiftiVersion, OutputDtype};

const ORACLE_PY: &str = r##"import gzip, io, json, os, struct, sys
import numpy as np
import nibabel as nib
from nibabel.nifti1 import Nifti1Extension

def fbits(v):
    return struct.unpack('<Q', struct.pack('<d', float(v)))[0]

def raw_header(path):
    with open(path, 'rb') as f:
        gz = f.read(2) == b'\x1f\x8b'
    with (gzip.open if gz else open)(path, 'rb') as f:
        blob = f.read()
    sz = struct.unpack('<i', blob[:4])[0]
    v2 = sz in (540, struct.unpack('>i', struct.pack('<i', 540))[0])
    klass = nib.Nifti2Header if v2 else nib.Nifti1Header
    hdr = klass(blob[:klass.sizeof_hdr], check=False)
    fields = {}
    sa = hdr.structarr
    for name in sa.dtype.names:
        arr = np.asarray(sa[name])
        k = arr.dtype.kind
        if k in 'SV':
            fields[name] = {'b': list(arr.tobytes())}
        elif k == 'f':
            fields[name] = {'f': [fbits(x) for x in arr.ravel()]}
        else:
            fields[name] = {'i': [int(x) for x in arr.ravel()]}
    off = int(sa['vox_offset'])
    hs = klass.sizeof_hdr
    return {'version': 2 if v2 else 1, 'endianness': 'big' if hdr.endianness == '>' else 'little',
            'fields': fields, 'extender': list(blob[hs:hs + 4]), 'extension_bytes': list(blob[hs + 4:off])}

def describe(path, out_prefix):
    """Loads path with nibabel as MONAI does; writes <out_prefix>.json (+ .f32 data when 3-D-compatible)."""
    rec = {}
    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as e:
        rec['error'] = f'{type(e).__name__}: {e}'
        json.dump(rec, open(out_prefix + '.json', 'w'))
        return rec
    rec['shape'] = list(arr.shape)
    rec['scaled_dtype'] = str(arr.dtype)
    rec['affine'] = [[fbits(x) for x in row] for row in np.asarray(img.affine, dtype=np.float64)]
    rec['header'] = raw_header(path)
    rec['zooms'] = [fbits(z) for z in img.header.get_zooms()]
    rec['sform_code'] = int(img.header['sform_code'])
    rec['qform_code'] = int(img.header['qform_code'])
    rec['xyzt_units'] = int(img.header['xyzt_units'])
    rec['qform'] = [[fbits(x) for x in row] for row in img.header.get_qform()] if rec['qform_code'] else None
    rec['sform'] = [[fbits(x) for x in row] for row in img.header.get_sform()]
    rec['on_disk_dtype'] = str(img.get_data_dtype().newbyteorder('='))
    if arr.ndim <= 3 or all(s == 1 for s in arr.shape[3:]):
        f32 = np.ascontiguousarray(arr.astype(np.float32)).astype('<f4')
        f32.tofile(out_prefix + '.f32')
        rec['data'] = True
    json.dump(rec, open(out_prefix + '.json', 'w'))
    return rec

def affine_from(rot_axis, angle, zooms, flip_z, offset):
    ax = np.asarray(rot_axis, float); ax /= np.linalg.norm(ax)
    K = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    R = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K
    S = np.diag([zooms[0], zooms[1], -zooms[2] if flip_z else zooms[2]])
    A = np.eye(4); A[:3, :3] = R @ S; A[:3, 3] = offset
    return A

def make(path, data, *, v=1, endian='<', sform=None, scode=0, qform=None, qcode=0, zooms=None, fields=None,
         exts=(), gz=False, vox_offset=None):
    H = nib.Nifti1Header if v == 1 else nib.Nifti2Header
    hdr = H(endianness=endian)
    hdr.set_data_dtype(data.dtype.newbyteorder('='))
    hdr.set_data_shape(data.shape)
    if zooms is not None:
        hdr.set_zooms(zooms)
    if qform is not None:
        hdr.set_qform(qform, code=qcode if 0 < qcode <= 5 else 1)
    if sform is not None:
        hdr.set_sform(sform, code=scode if 0 < scode <= 5 else 1)
    hdr['qform_code'] = qcode
    hdr['sform_code'] = scode
    hdr['xyzt_units'] = 10
    hdr['descrip'] = b'vista3d test ' + os.path.basename(path).encode()
    for code, content in exts:
        hdr.extensions.append(Nifti1Extension(code, content))
    hdr['vox_offset'] = 0
    buf = io.BytesIO()
    hdr.write_to(buf)
    if vox_offset is not None:
        hdr['vox_offset'] = vox_offset
    for k, val in (fields or {}).items():
        hdr[k] = val
    blob = bytearray(buf.getvalue())
    blob[:H.sizeof_hdr] = hdr.binaryblock
    off = int(hdr['vox_offset'])
    blob += b'\0' * (off - len(blob))
    blob += np.asarray(data).astype(data.dtype.newbyteorder(endian)).tobytes(order='F')
    blob = bytes(blob)
    if gz:
        blob = gzip.compress(blob, compresslevel=6)
    with open(path, 'wb') as f:
        f.write(blob)

def slice3d(src, dst, k):
    img = nib.load(src)
    raw = np.asanyarray(img.dataobj.get_unscaled())[..., k]
    slope, inter = img.dataobj.slope, img.dataobj.inter
    hdr = img.header.copy()
    hdr.set_data_shape(raw.shape)
    hdr['scl_slope'] = slope
    hdr['scl_inter'] = inter
    hdr['vox_offset'] = 0
    buf = io.BytesIO(); hdr.write_to(buf)
    blob = buf.getvalue() + raw.astype(raw.dtype.newbyteorder(hdr.endianness)).tobytes(order='F')
    if dst.endswith('.gz'):
        blob = gzip.compress(blob)
    open(dst, 'wb').write(blob)

def generate(gen, data_dir):
    rng = np.random.default_rng(1234)
    os.makedirs(gen, exist_ok=True)
    P = lambda n: os.path.join(gen, n)
    i16 = lambda shape: rng.integers(-1024, 3000, size=shape).astype(np.int16)
    A1 = affine_from([1, 2, 3], 0.7, [0.9, 1.1, 2.5], True, [-10.5, 20.25, 3.125])
    A2 = affine_from([0.3, -0.5, 0.8], np.deg2rad(179.99), [0.75, 0.75, 1.5], False, [1, 2, 3])
    A3 = affine_from([0, 0, 1], np.pi, [1.0, 2.0, 3.0], True, [0, 0, 0])
    make(P('qform_only_qfac_neg.nii'), i16((7, 9, 5)), qform=A1, qcode=1)
    f = rng.normal(size=(6, 5, 4)).astype(np.float32); f[0, 0, 0] = np.nan; f[1, 2, 3] = -0.0; f[2, 2, 2] = np.inf
    make(P('qform_a_near_zero.nii'), f, qform=A2, qcode=2)
    make(P('qform_180_z.nii.gz'), i16((5, 6, 7)), qform=A3, qcode=1, gz=True)
    make(P('qform_w2_slightly_negative.nii'), i16((4, 5, 6)), qform=np.eye(4), qcode=1,
         fields={'quatern_b': np.float32(1.0000001), 'quatern_c': 0, 'quatern_d': 0})
    make(P('qform_odd_pixdim.nii'), i16((4, 5, 6)), qform=A1, qcode=2,
         fields={'pixdim': [0, -2.0, 0.0, 3.0, 1, 1, 1, 1]})
    make(P('qform_invalid_quaternion.nii'), i16((4, 5, 6)), qform=np.eye(4), qcode=1,
         fields={'quatern_b': 0.9, 'quatern_c': 0.9, 'quatern_d': 0})
    make(P('inter_inf.nii'), i16((4, 5, 6)), sform=A1, scode=1, fields={'scl_slope': 2.0, 'scl_inter': np.inf})
    make(P('invalid_sform_code.nii'), i16((4, 5, 6)), qform=A1, qcode=1, sform=np.diag([2, 2, 2, 1.0]), scode=7)
    make(P('fallback.nii.gz'), rng.integers(0, 65535, size=(8, 7, 6)).astype(np.uint16), zooms=(1.5, 0.8, 3.0),
         fields={'scl_slope': 2.0, 'scl_inter': -1024.0}, gz=True)
    make(P('fallback_odd_pixdim.nii'), i16((8, 7, 6)), fields={'pixdim': [0, -2.0, 0.0, 3.5, 1, 1, 1, 1]})
    make(P('scaled_int16.nii'), i16((9, 8, 7)), sform=A1, scode=2, fields={'scl_slope': 0.5, 'scl_inter': -100.25})
    d = rng.normal(scale=1e3, size=(5, 6, 7)); d[0, 1, 2] = np.nan; d[1, 1, 1] = -0.0; d[2, 2, 2] = 1e300
    make(P('scaled_float64_be.nii'), d, endian='>', sform=A2, scode=1,
         fields={'scl_slope': 1.5, 'scl_inter': 0.25})
    f = rng.normal(size=(5, 6, 7)).astype(np.float32); f[0, 0, 0] = -0.0
    make(P('float32_slope_only.nii.gz'), f, sform=A2, scode=1, fields={'scl_slope': 3.0, 'scl_inter': 0.0}, gz=True)
    make(P('int8_inter_only.nii'), rng.integers(-128, 128, size=(5, 6, 7)).astype(np.int8), sform=A1, scode=1,
         fields={'scl_slope': 1.0, 'scl_inter': 10.0})
    make(P('uint32.nii'), rng.integers(0, 2**32, size=(5, 6, 7), dtype=np.uint64).astype(np.uint32), sform=A1, scode=1)
    big = rng.integers(-2**62, 2**62, size=(5, 6, 7), dtype=np.int64); big[0, 0, 0] = 2**53 + 1; big[0, 0, 1] = 16777217
    make(P('int64.nii'), big, sform=A1, scode=1)
    make(P('int64_scaled.nii'), big, sform=A1, scode=1, fields={'scl_slope': np.float32(1.0000001), 'scl_inter': 3.0})
    ub = rng.integers(0, 2**64 - 1, size=(5, 6, 7), dtype=np.uint64); ub[0, 0, 0] = 2**64 - 1
    make(P('uint64.nii.gz'), ub, sform=A1, scode=1, gz=True)
    make(P('int32_be.nii.gz'), rng.integers(-2**31, 2**31, size=(5, 6, 7), dtype=np.int64).astype(np.int32),
         endian='>', sform=A1, scode=2, gz=True)
    make(P('t1_4d.nii.gz'), i16((6, 7, 8, 1)), sform=A1, scode=1, gz=True)
    make(P('t1_5d.nii'), i16((6, 7, 8, 1, 1)), qform=A1, qcode=1)
    make(P('two_d.nii'), i16((9, 11)), qform=A1, qcode=1)
    make(P('two_d_fallback.nii'), i16((9, 11)), zooms=(0.7, 1.3))
    make(P('nifti2_qform_be.nii'), i16((6, 7, 8)), v=2, endian='>', qform=A1, qcode=1)
    make(P('nifti2_qform_near_zero.nii'), i16((6, 7, 8)), v=2, qform=A2, qcode=1)
    make(P('nifti2_scaled_sform.nii.gz'), i16((6, 7, 8)), v=2, sform=A2, scode=4, gz=True,
         fields={'scl_slope': 0.1, 'scl_inter': -7.3})
    make(P('nifti2_t1.nii'), rng.normal(size=(6, 7, 8, 1)).astype(np.float64), v=2, sform=A1, scode=2)
    make(P('extensions.nii'), i16((6, 7, 8)), sform=A1, scode=2,
         exts=[(6, b'hello vista3d'), (4, b'<AFNI_attributes/>' * 3)])
    make(P('extensions_be.nii.gz'), i16((6, 7, 8)), endian='>', sform=A1, scode=2, exts=[(6, b'big endian')], gz=True)
    make(P('vox_offset_1024.nii'), i16((6, 7, 8)), sform=A1, scode=2, vox_offset=1024)
    make(P('slope_nan.nii'), i16((6, 7, 8)), sform=A1, scode=2, fields={'scl_slope': np.nan, 'scl_inter': 5.0})
    make(P('slope_zero.nii'), i16((6, 7, 8)), sform=A1, scode=2, fields={'scl_slope': 0.0, 'scl_inter': 5.0})
    make(P('uint8.nii'), rng.integers(0, 256, size=(6, 7, 8)).astype(np.uint8), sform=A1, scode=2)
    # Same content, misleading names: gzip is told by magic bytes.
    make(P('plain_twin.nii'), i16((6, 7, 8)), sform=A1, scode=2)
    open(P('misnamed_plain.nii.gz'), 'wb').write(open(P('plain_twin.nii'), 'rb').read())
    make(P('gz_twin.nii.gz'), i16((6, 7, 8)), sform=A1, scode=2, gz=True)
    open(P('misnamed_gz.nii'), 'wb').write(open(P('gz_twin.nii.gz'), 'rb').read())
    # Multi-member gzip.
    raw = gzip.decompress(open(P('gz_twin.nii.gz'), 'rb').read())
    open(P('multi_member.nii.gz'), 'wb').write(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    # 3-D slices of the real 4-D files, with their scaling.
    slice3d(os.path.join(data_dir, 'nibabel', 'functional.nii'), P('functional_t3.nii'), 3)
    slice3d(os.path.join(data_dir, 'nibabel', 'example_nifti2.nii.gz'), P('example_nifti2_t1.nii.gz'), 1)
    slice3d(os.path.join(data_dir, 'nibabel', 'example4d.nii.gz'), P('example4d_t0.nii.gz'), 0)

TWINS = {'misnamed_plain.nii.gz': 'plain_twin.nii', 'misnamed_gz.nii': 'gz_twin.nii.gz'}

def main():
    mode = sys.argv[1]
    if mode == 'oracle':
        work, data_dir = sys.argv[2], sys.argv[3]
        gen = os.path.join(work, 'gen')
        generate(gen, data_dir)
        real = ['nibabel/anatomical.nii', 'nibabel/functional.nii', 'nibabel/example4d.nii.gz',
                'nibabel/example_nifti2.nii.gz', 'nibabel/reoriented_anat_moved.nii', 'nibabel/standard.nii.gz',
                'totalsegmentator/example_ct.nii.gz', 'totalsegmentator/example_ct_sm.nii.gz',
                'totalsegmentator/example_seg.nii.gz', 'totalsegmentator/aorta_report/example_ct.nii.gz',
                'totalsegmentator/example_seg_dicom.nii.gz', 'totalsegmentator/example_seg_fast/liver.nii.gz']
        cases = [(r.replace('/', '__'), os.path.join(data_dir, r)) for r in real]
        cases += [(n, os.path.join(gen, n)) for n in sorted(os.listdir(gen))]
        out = os.path.join(work, 'oracle')
        os.makedirs(out, exist_ok=True)
        manifest = []
        for name, path in cases:
            ref = os.path.join(gen, TWINS[name]) if name in TWINS else path
            describe(ref, os.path.join(out, name))
            manifest.append({'name': name, 'path': path})
        json.dump(manifest, open(os.path.join(out, 'manifest.json'), 'w'), indent=1)
    elif mode == 'describe':
        # describe <list.json>: [[path, out_prefix], ...]
        for path, prefix in json.load(open(sys.argv[2])):
            describe(path, prefix)
    else:
        raise SystemExit(f'unknown mode {mode}')

main()
"##;

struct Ctx {
    data: PathBuf,
    python: PathBuf,
    work: PathBuf,
    manifest: Vec<(String, PathBuf)>,
}

fn ctx() -> &'static Ctx {
    static CTX: OnceLock<Ctx> = OnceLock::new();
    CTX.get_or_init(|| {
        let data = std::env::var_os("VISTA3D_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/data"));
        for sub in ["nibabel", "totalsegmentator"] {
            assert!(
                data.join(sub).join(".done").exists(),
                "test data missing: {} has no complete {sub}/ folder; run `bash scripts/test.sh` (it fetches the \
                 data with scripts/fetch_data.sh) or set VISTA3D_DATA",
                data.display()
            );
        }
        let python = std::env::var_os("VISTA3D_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "VISTA3D_PYTHON is not set: the NIfTI tests need nibabel as the reference; run `bash scripts/test.sh` \
                 (or `. scripts/env.sh test` first)"
            )
        });
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        clean_stale_work_dirs(base);
        let work = base.join(format!("nifti_io-{}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).unwrap();
        run_python(&python, &["oracle", work.to_str().unwrap(), data.to_str().unwrap()]);
        let manifest: Value = serde_json::from_slice(&fs::read(work.join("oracle/manifest.json")).unwrap()).unwrap();
        let manifest = manifest
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_string(), PathBuf::from(c["path"].as_str().unwrap())))
            .collect();
        Ctx {
            data,
            python,
            work,
            manifest,
        }
    })
}

/// Removes work folders of earlier test processes that are no longer running.
fn clean_stale_work_dirs(base: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    for e in fs::read_dir(base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("nifti_io-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn run_python(python: &Path, args: &[&str]) {
    let out = Command::new(python)
        .arg("-c")
        .arg(ORACLE_PY)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "the nibabel oracle failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn oracle(name: &str) -> Value {
    let p = ctx().work.join("oracle").join(format!("{name}.json"));
    serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn read_f32(path: &Path) -> Vec<f32> {
    let b = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bits_matrix(v: &Value) -> [[f64; 4]; 4] {
    std::array::from_fn(|i| std::array::from_fn(|j| f64::from_bits(v[i][j].as_u64().unwrap())))
}

fn max_abs_diff(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> f64 {
    let mut m = 0f64;
    for i in 0..4 {
        for j in 0..4 {
            let d = (a[i][j] - b[i][j]).abs();
            m = if d.is_nan() { f64::INFINITY } else { m.max(d) };
        }
    }
    m
}

/// Compares voxel values bit for bit (any NaN equals any NaN); returns a description of the first mismatch.
fn compare_data(ours: &[f32], reference: &[f32]) -> Option<String> {
    if ours.len() != reference.len() {
        return Some(format!(
            "{} voxels, nibabel has {}",
            ours.len(),
            reference.len()
        ));
    }
    let bad: Vec<usize> = (0..ours.len())
        .filter(|&i| {
            !(ours[i].to_bits() == reference[i].to_bits()
                || (ours[i].is_nan() && reference[i].is_nan()))
        })
        .collect();
    bad.first().map(|&i| {
        format!(
            "{} voxels differ, first at flat index {i}: {} vs nibabel {}",
            bad.len(),
            ours[i],
            reference[i]
        )
    })
}

#[derive(Debug, PartialEq)]
enum Field {
    F(Vec<u64>),
    I(Vec<i64>),
    B(Vec<u8>),
}

fn fl(v: &[f64]) -> Field {
    Field::F(v.iter().map(|x| x.to_bits()).collect())
}

/// Our header in the encoding of the oracle's `raw_header` (nibabel's field names and kinds).
fn header_fields(h: &NiftiHeader) -> BTreeMap<&'static str, Field> {
    use Field::*;
    let mut m = BTreeMap::new();
    m.insert("dim_info", I(vec![h.dim_info as i64]));
    m.insert("dim", I(h.dim.to_vec()));
    m.insert("intent_p1", fl(&[h.intent_p1]));
    m.insert("intent_p2", fl(&[h.intent_p2]));
    m.insert("intent_p3", fl(&[h.intent_p3]));
    m.insert("intent_code", I(vec![h.intent_code as i64]));
    m.insert("datatype", I(vec![h.datatype as i64]));
    m.insert("bitpix", I(vec![h.bitpix as i64]));
    m.insert("slice_start", I(vec![h.slice_start]));
    m.insert("pixdim", fl(&h.pixdim));
    m.insert("scl_slope", fl(&[h.scl_slope]));
    m.insert("scl_inter", fl(&[h.scl_inter]));
    m.insert("slice_end", I(vec![h.slice_end]));
    m.insert("slice_code", I(vec![h.slice_code as i64]));
    m.insert("xyzt_units", I(vec![h.xyzt_units as i64]));
    m.insert("cal_max", fl(&[h.cal_max]));
    m.insert("cal_min", fl(&[h.cal_min]));
    m.insert("slice_duration", fl(&[h.slice_duration]));
    m.insert("toffset", fl(&[h.toffset]));
    m.insert("descrip", B(h.descrip.to_vec()));
    m.insert("aux_file", B(h.aux_file.to_vec()));
    m.insert("qform_code", I(vec![h.qform_code as i64]));
    m.insert("sform_code", I(vec![h.sform_code as i64]));
    m.insert("quatern_b", fl(&[h.quatern_b]));
    m.insert("quatern_c", fl(&[h.quatern_c]));
    m.insert("quatern_d", fl(&[h.quatern_d]));
    m.insert("qoffset_x", fl(&[h.qoffset_x]));
    m.insert("qoffset_y", fl(&[h.qoffset_y]));
    m.insert("qoffset_z", fl(&[h.qoffset_z]));
    m.insert("srow_x", fl(&h.srow_x));
    m.insert("srow_y", fl(&h.srow_y));
    m.insert("srow_z", fl(&h.srow_z));
    m.insert("intent_name", B(h.intent_name.to_vec()));
    match h.version {
        NiftiVersion::Nifti1 => {
            m.insert("data_type", B(h.data_type.to_vec()));
            m.insert("db_name", B(h.db_name.to_vec()));
            m.insert("extents", I(vec![h.extents as i64]));
            m.insert("session_error", I(vec![h.session_error as i64]));
            m.insert("regular", B(vec![h.regular]));
            m.insert("vox_offset", fl(&[h.vox_offset]));
            m.insert("glmax", I(vec![h.glmax as i64]));
            m.insert("glmin", I(vec![h.glmin as i64]));
        }
        NiftiVersion::Nifti2 => {
            m.insert(
                "eol_check",
                I(h.eol_check.iter().map(|&b| b as i8 as i64).collect()),
            );
            m.insert("unused_str", B(h.unused_str.to_vec()));
            m.insert("vox_offset", I(vec![h.vox_offset as i64]));
        }
    }
    m
}

fn json_field(v: &Value) -> Field {
    let list = |v: &Value| v.as_array().unwrap().clone();
    if let Some(f) = v.get("f") {
        Field::F(list(f).iter().map(|x| x.as_u64().unwrap()).collect())
    } else if let Some(i) = v.get("i") {
        Field::I(list(i).iter().map(|x| x.as_i64().unwrap()).collect())
    } else {
        Field::B(
            list(&v["b"])
                .iter()
                .map(|x| x.as_u64().unwrap() as u8)
                .collect(),
        )
    }
}

/// Differences between our header and nibabel's raw view of the file's header.
fn compare_header(h: &NiftiHeader, reference: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let version = reference["version"].as_u64().unwrap() as u8;
    if h.version.number() != version {
        errs.push(format!("version {} vs {version}", h.version.number()));
        return errs;
    }
    let endian = format!("{:?}", h.endianness).to_lowercase();
    if endian != reference["endianness"].as_str().unwrap() {
        errs.push(format!(
            "endianness {endian} vs {}",
            reference["endianness"]
        ));
    }
    let ours = header_fields(h);
    for (name, v) in reference["fields"].as_object().unwrap() {
        if name == "sizeof_hdr" || name == "magic" {
            continue;
        }
        match ours.get(name.as_str()) {
            None => errs.push(format!("header field {name} missing")),
            Some(f) if *f != json_field(v) => {
                errs.push(format!("header field {name}: {f:?} vs nibabel {v}"))
            }
            _ => {}
        }
    }
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect()
    };
    if h.extender.to_vec() != bytes(&reference["extender"]) {
        errs.push(format!(
            "extender {:?} vs {}",
            h.extender, reference["extender"]
        ));
    }
    if h.extension_bytes != bytes(&reference["extension_bytes"]) {
        errs.push(format!(
            "extension bytes differ ({} vs {} bytes)",
            h.extension_bytes.len(),
            reference["extension_bytes"].as_array().unwrap().len()
        ));
    }
    errs
}

/// Checks one file against the oracle; returns the problems found.
fn check_read(name: &str, path: &Path) -> Vec<String> {
    let o = oracle(name);
    let result = read_nifti(path);
    if let Some(e) = o.get("error") {
        return match result {
            Ok(_) => vec![format!("nibabel fails ({e}) but we read it")],
            Err(err) => {
                let msg = format!("{err}");
                if msg.contains(&path.display().to_string()) {
                    vec![]
                } else {
                    vec![format!("error message does not name the file: {msg}")]
                }
            }
        };
    }
    let shape: Vec<usize> = o["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    if o.get("data").is_none() {
        let volumes: usize = shape[3..].iter().product();
        return match result {
            Ok(_) => vec![format!("{shape:?} image accepted")],
            Err(e) => {
                let msg = e.to_string();
                let want = format!(
                    "is {}-D with {volumes} volumes; VISTA3D segments 3-D images",
                    shape.len()
                );
                if msg.contains(&want) && msg.contains(&path.display().to_string()) {
                    vec![]
                } else {
                    vec![format!("unclear error for a {shape:?} image: {msg}")]
                }
            }
        };
    }
    let img = match result {
        Ok(img) => img,
        Err(e) => return vec![format!("read failed: {e}")],
    };
    let mut errs = Vec::new();
    let mut dims = [1usize; 3];
    dims[..shape.len().min(3)].copy_from_slice(&shape[..shape.len().min(3)]);
    if img.volume.dims() != dims {
        errs.push(format!("dims {:?} vs nibabel {shape:?}", img.volume.dims()));
        return errs;
    }
    let reference = read_f32(&ctx().work.join("oracle").join(format!("{name}.f32")));
    if let Some(e) = compare_data(img.volume.data.as_slice().unwrap(), &reference) {
        errs.push(format!("data: {e}"));
    }
    let d = max_abs_diff(&img.volume.affine, &bits_matrix(&o["affine"]));
    if d > 1e-9 {
        errs.push(format!(
            "affine differs by {d:e}: {:?} vs nibabel {:?}",
            img.volume.affine,
            bits_matrix(&o["affine"])
        ));
    }
    errs.extend(compare_header(&img.header, &o["header"]));
    errs
}

#[test]
fn reads_match_nibabel() {
    let c = ctx();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, path) in &c.manifest {
        let errs = check_read(name, path);
        checked += 1;
        for e in errs {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(checked >= 50, "only {checked} files checked");
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn four_d_images_are_rejected_with_a_clear_message() {
    let c = ctx();
    for (file, volumes) in [
        ("nibabel/functional.nii", 20),
        ("nibabel/example4d.nii.gz", 2),
        ("nibabel/example_nifti2.nii.gz", 2),
    ] {
        let path = c.data.join(file);
        let msg = read_nifti(&path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!(
                "is 4-D with {volumes} volumes; VISTA3D segments 3-D images"
            )),
            "{msg}"
        );
    }
}

#[test]
fn qform_affines_are_nibabel_exact() {
    // The quaternion cases agree with nibabel (which works in longdouble) to about 1 ulp, not just 1e-9.
    for name in [
        "qform_only_qfac_neg.nii",
        "qform_a_near_zero.nii",
        "qform_180_z.nii.gz",
        "qform_odd_pixdim.nii",
        "qform_w2_slightly_negative.nii",
        "nifti2_qform_be.nii",
        "nifti2_qform_near_zero.nii",
        "nibabel__anatomical.nii",
    ] {
        let path = ctx()
            .manifest
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .clone();
        let img = read_nifti(&path).unwrap();
        let q = img.header.qform().unwrap();
        let o = oracle(name);
        if !o["qform"].is_null() {
            let d = max_abs_diff(&q, &bits_matrix(&o["qform"]));
            assert!(d < 1e-14, "{name}: qform differs by {d:e}");
        }
    }
}

fn label_volume(dims: [usize; 3], dtype: OutputDtype) -> Array3<f32> {
    Array3::from_shape_fn(dims, |(x, y, z)| {
        let v = ((x + 2 * y + 3 * z) % 105) as f32;
        match (dtype, (x + y + z) % 11) {
            (OutputDtype::Uint8, 0) => 255.0,
            (OutputDtype::Int16, 0) => -32768.0,
            (OutputDtype::Int16, 1) => 32767.0,
            (OutputDtype::Float32, 0) => 0.25,
            (OutputDtype::Float32, 1) => f32::NAN,
            _ => v,
        }
    })
}

fn describe_with_nibabel(items: &[(PathBuf, PathBuf)]) {
    let list: Vec<[String; 2]> = items
        .iter()
        .map(|(p, o)| [p.display().to_string(), o.display().to_string()])
        .collect();
    let list_path = items[0].1.with_extension("list.json");
    fs::write(&list_path, serde_json::to_vec(&list).unwrap()).unwrap();
    run_python(&ctx().python, &["describe", list_path.to_str().unwrap()]);
}

#[test]
fn written_files_load_in_nibabel_with_the_reference_geometry() {
    let c = ctx();
    let out_dir = c.work.join("written");
    let refs = [
        "totalsegmentator__example_ct.nii.gz",
        "totalsegmentator__aorta_report__example_ct.nii.gz",
        "nibabel__anatomical.nii",
        "qform_only_qfac_neg.nii",
        "qform_odd_pixdim.nii",
        "fallback_odd_pixdim.nii",
        "invalid_sform_code.nii",
        "nifti2_qform_be.nii",
        "nifti2_scaled_sform.nii.gz",
        "t1_4d.nii.gz",
        "extensions_be.nii.gz",
    ];
    let mut jobs = Vec::new();
    for r in refs {
        let path = c.manifest.iter().find(|(n, _)| n == r).unwrap().1.clone();
        let reference = read_nifti(&path).unwrap();
        for dtype in [OutputDtype::Float32, OutputDtype::Uint8, OutputDtype::Int16] {
            for ext in ["nii", "nii.gz"] {
                let data = label_volume(reference.volume.dims(), dtype);
                // The parent folder does not exist yet: the writer creates it.
                let out = out_dir.join(r).join(format!("label_{dtype}.{ext}"));
                write_nifti(&out, &data, &reference.header, dtype).unwrap();
                // Our own reader gives back the data and the reference's affine.
                let back = read_nifti(&out).unwrap();
                assert_eq!(
                    back.header.version,
                    reference.header.version,
                    "{}",
                    out.display()
                );
                assert!(compare_data(
                    back.volume.data.as_slice().unwrap(),
                    data.as_standard_layout().as_slice().unwrap()
                )
                .is_none());
                assert_eq!(
                    back.volume.affine,
                    reference.volume.affine,
                    "{}",
                    out.display()
                );
                let gz = fs::read(&out).unwrap()[..2] == [0x1f, 0x8b];
                assert_eq!(gz, ext == "nii.gz", "{}", out.display());
                jobs.push((
                    r,
                    dtype,
                    out.clone(),
                    out.with_extension("oracle"),
                    data,
                    reference.clone(),
                ));
            }
        }
    }
    let items: Vec<(PathBuf, PathBuf)> = jobs.iter().map(|j| (j.2.clone(), j.3.clone())).collect();
    describe_with_nibabel(&items);
    let mut failures = Vec::new();
    for (r, dtype, out, prefix, data, reference) in &jobs {
        let w: Value =
            serde_json::from_slice(&fs::read(prefix.with_extension("oracle.json")).unwrap())
                .unwrap();
        let o = oracle(r);
        let tag = out.display();
        if let Some(e) = w.get("error") {
            failures.push(format!("{tag}: nibabel cannot load it: {e}"));
            continue;
        }
        let d = max_abs_diff(&bits_matrix(&w["affine"]), &bits_matrix(&o["affine"]));
        if d > 1e-9 {
            failures.push(format!(
                "{tag}: affine differs from the reference's by {d:e}"
            ));
        }
        for key in ["sform_code", "qform_code", "xyzt_units"] {
            if w[key] != o[key] {
                failures.push(format!("{tag}: {key} {} vs reference {}", w[key], o[key]));
            }
        }
        let zooms = |v: &Value| -> Vec<u64> {
            v.as_array().unwrap()[..3]
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        };
        if zooms(&w["zooms"]) != zooms(&o["zooms"]) {
            failures.push(format!(
                "{tag}: zooms {} vs reference {}",
                w["zooms"], o["zooms"]
            ));
        }
        if !o["qform"].is_null()
            && max_abs_diff(&bits_matrix(&w["qform"]), &bits_matrix(&o["qform"])) > 1e-9
        {
            failures.push(format!("{tag}: qform differs"));
        }
        if w["sform"] != o["sform"] {
            failures.push(format!("{tag}: sform differs"));
        }
        if w["on_disk_dtype"].as_str() != Some(dtype.name()) {
            failures.push(format!(
                "{tag}: stored as {} instead of {dtype}",
                w["on_disk_dtype"]
            ));
        }
        if w["header"]["version"].as_u64() != Some(reference.header.version.number() as u64) {
            failures.push(format!("{tag}: NIfTI version changed"));
        }
        if w["header"]["endianness"] != "little" {
            failures.push(format!("{tag}: not little-endian"));
        }
        let descrip = &w["header"]["fields"]["descrip"];
        if json_field(descrip) != Field::B(reference.header.descrip.to_vec()) {
            failures.push(format!("{tag}: descrip not kept"));
        }
        let shape: Vec<usize> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        if shape != data.shape() {
            failures.push(format!("{tag}: nibabel shape {shape:?}"));
        }
        let theirs = read_f32(&prefix.with_extension("oracle.f32"));
        if let Some(e) = compare_data(data.as_standard_layout().as_slice().unwrap(), &theirs) {
            failures.push(format!("{tag}: data as nibabel loads it: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn small_reference() -> NiftiImage {
    let path = ctx()
        .manifest
        .iter()
        .find(|(n, _)| n == "qform_only_qfac_neg.nii")
        .unwrap()
        .1
        .clone();
    read_nifti(&path).unwrap()
}

#[test]
fn invalid_label_values_are_errors_and_leave_nothing_behind() {
    let reference = small_reference();
    let dir = ctx().work.join("invalid_values");
    fs::create_dir_all(&dir).unwrap();
    let dims = reference.volume.dims();
    for (dtype, bad) in [
        (OutputDtype::Uint8, 256.0),
        (OutputDtype::Uint8, -1.0),
        (OutputDtype::Uint8, 0.5),
        (OutputDtype::Uint8, f32::NAN),
        (OutputDtype::Uint8, f32::INFINITY),
        (OutputDtype::Int16, 40000.0),
        (OutputDtype::Int16, -32769.0),
        (OutputDtype::Int16, 1.5),
    ] {
        let mut data = label_volume(dims, dtype);
        data[[2, 3, 4]] = bad;
        for name in ["out.nii", "out.nii.gz", "new_dir/deeper/out.nii.gz"] {
            let path = dir.join(name);
            let msg = write_nifti(&path, &data, &reference.header, dtype)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains("[2, 3, 4]"),
                "{msg}"
            );
            assert!(
                list_dir(&dir).is_empty(),
                "left behind: {:?}",
                list_dir(&dir)
            );
        }
    }
    // Float32 takes anything, NaN included.
    let mut data = label_volume(dims, OutputDtype::Float32);
    data[[0, 0, 0]] = f32::NAN;
    data[[1, 0, 0]] = 1e30;
    let path = dir.join("float.nii");
    write_nifti(&path, &data, &reference.header, OutputDtype::Float32).unwrap();
    let back = read_nifti(&path).unwrap();
    assert!(back.volume.data[[0, 0, 0]].is_nan() && back.volume.data[[1, 0, 0]] == 1e30);
    assert_eq!(list_dir(&dir), vec!["float.nii".to_string()]);
}

#[test]
fn write_paths_are_created_and_failures_are_clean() {
    let reference = small_reference();
    let dir = ctx().work.join("paths");
    fs::create_dir_all(&dir).unwrap();
    let data = label_volume(reference.volume.dims(), OutputDtype::Uint8);
    // Missing parents are created.
    let nested = dir.join("a/b/c/out.nii.gz");
    write_nifti(&nested, &data, &reference.header, OutputDtype::Uint8).unwrap();
    assert_eq!(list_dir(&dir.join("a/b/c")), vec!["out.nii.gz".to_string()]);
    // Overwriting an existing file replaces it.
    let mut data2 = data.clone();
    data2[[0, 0, 0]] = 7.0;
    write_nifti(&nested, &data2, &reference.header, OutputDtype::Uint8).unwrap();
    assert_eq!(read_nifti(&nested).unwrap().volume.data[[0, 0, 0]], 7.0);
    assert_eq!(list_dir(&dir.join("a/b/c")), vec!["out.nii.gz".to_string()]);
    // A parent that is a file.
    fs::write(dir.join("plain_file"), b"x").unwrap();
    let bad = dir.join("plain_file/sub/out.nii");
    let msg = write_nifti(&bad, &data, &reference.header, OutputDtype::Uint8)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&bad.display().to_string()), "{msg}");
    // The destination is a directory: the rename fails, the temporary file is removed.
    fs::create_dir_all(dir.join("is_a_dir.nii")).unwrap();
    let msg = write_nifti(
        &dir.join("is_a_dir.nii"),
        &data,
        &reference.header,
        OutputDtype::Uint8,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("is_a_dir.nii"), "{msg}");
    assert_eq!(
        list_dir(&dir),
        vec![
            "a".to_string(),
            "is_a_dir.nii".to_string(),
            "plain_file".to_string()
        ]
    );
    // A read-only directory (not enforced for root, who can write anyway).
    let ro = dir.join("read_only");
    fs::create_dir_all(&ro).unwrap();
    let mut perms = fs::metadata(&ro).unwrap().permissions();
    perms.set_readonly(true);
    fs::set_permissions(&ro, perms.clone()).unwrap();
    let enforced = fs::write(ro.join("probe"), b"x").is_err();
    let _ = fs::remove_file(ro.join("probe"));
    let result = write_nifti(
        &ro.join("out.nii"),
        &data,
        &reference.header,
        OutputDtype::Uint8,
    );
    if enforced {
        let msg = result.unwrap_err().to_string();
        assert!(msg.contains("read_only"), "{msg}");
        assert!(list_dir(&ro).is_empty());
        // And a missing parent inside it cannot be created.
        assert!(write_nifti(
            &ro.join("x/out.nii"),
            &data,
            &reference.header,
            OutputDtype::Uint8
        )
        .is_err());
    } else {
        eprintln!("note: running with permission to write into read-only folders (root); read-only check skipped");
        let _ = fs::remove_file(ro.join("out.nii"));
    }
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&ro, perms).unwrap();
    // An empty volume is an error too.
    let empty = Array3::<f32>::zeros((0, 3, 3));
    assert!(write_nifti(
        &dir.join("empty.nii"),
        &empty,
        &reference.header,
        OutputDtype::Uint8
    )
    .is_err());
    assert!(!dir.join("empty.nii").exists());
}

#[test]
fn header_from_affine_writes_a_file_nibabel_reads() {
    let affine = [
        [-0.8, 0.0, 0.1, 10.0],
        [0.0, 0.8, 0.0, -20.0],
        [0.0, 0.05, 2.5, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let header = NiftiHeader::from_affine(&affine);
    let dir = ctx().work.join("from_affine");
    let data = label_volume([7, 8, 9], OutputDtype::Int16);
    let path = dir.join("labels.nii.gz");
    write_nifti(&path, &data, &header, OutputDtype::Int16).unwrap();
    let prefix = dir.join("labels.oracle");
    describe_with_nibabel(&[(path.clone(), prefix.clone())]);
    let w: Value =
        serde_json::from_slice(&fs::read(dir.join("labels.oracle.json")).unwrap()).unwrap();
    let d = max_abs_diff(
        &bits_matrix(&w["affine"]),
        &affine.map(|r| r.map(|v| v as f32 as f64)),
    );
    assert!(d == 0.0, "affine differs by {d:e}");
    assert_eq!(w["sform_code"], 2);
    assert!(compare_data(
        data.as_slice().unwrap(),
        &read_f32(&dir.join("labels.oracle.f32"))
    )
    .is_none());
}

/// Writes `bytes` to a file in the corruption folder and reads it; the read must fail and name the file.
fn expect_error(name: &str, bytes: &[u8]) -> String {
    let dir = ctx().work.join("corrupt");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    match read_nifti(&path) {
        Ok(img) => panic!("{name}: corrupt file read as {:?}", img.volume.dims()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{name}: {msg}");
            msg
        }
    }
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn corrupt_files_are_errors_not_panics() {
    let c = ctx();
    let gz = fs::read(c.data.join("totalsegmentator/example_ct.nii.gz")).unwrap();
    let n = gz.len();
    for cut in [
        0,
        1,
        2,
        10,
        100,
        1000,
        n / 3,
        n / 2,
        n - 9,
        n - 8,
        n - 5,
        n - 4,
        n - 1,
    ] {
        expect_error(&format!("cut_{cut}.nii.gz"), &gz[..cut]);
    }
    let plain = fs::read(c.data.join("nibabel/anatomical.nii")).unwrap();
    let n = plain.len();
    for cut in [0, 1, 3, 4, 100, 347, 348, 351, 352, 1000, n / 2, n - 1] {
        expect_error(&format!("cut_{cut}.nii"), &plain[..cut]);
    }
    // Corrupt deflate data in the middle.
    let mut bad = gz.clone();
    for b in &mut bad[gz.len() / 2..gz.len() / 2 + 64] {
        *b ^= 0x5a;
    }
    let msg = expect_error("flipped.nii.gz", &bad);
    assert!(
        msg.contains("gzip") || msg.contains("corrupt") || msg.contains("truncated"),
        "{msg}"
    );
    // Random bytes, plain and behind a gzip magic.
    let mut rng = Lcg(42);
    let random: Vec<u8> = (0..5000).map(|_| rng.next() as u8).collect();
    expect_error("random.nii", &random);
    let mut fake_gz = vec![0x1f, 0x8b];
    fake_gz.extend_from_slice(&random);
    expect_error("random_gz.nii.gz", &fake_gz);
    expect_error("random_in_gz.nii.gz", &gzip(&random));

    // Header edits of a valid little-endian NIfTI-1 file (uint8.nii: 6x7x8, vox_offset 352).
    let base = fs::read(c.work.join("gen/uint8.nii")).unwrap();
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        b
    };
    let put_i16 =
        |b: &mut Vec<u8>, off: usize, v: i16| b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 =
        |b: &mut Vec<u8>, off: usize, v: f32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "magic.nii",
            edit(&|b| b[344..348].copy_from_slice(b"xyz\0")),
            "magic",
        ),
        (
            "pair.nii",
            edit(&|b| b[344..348].copy_from_slice(b"ni1\0")),
            "pair",
        ),
        (
            "sizeof_hdr.nii",
            edit(&|b| b[0..4].copy_from_slice(&349i32.to_le_bytes())),
            "sizeof_hdr",
        ),
        (
            "huge_dims.nii",
            edit(&|b| (1..4).for_each(|i| put_i16(b, 40 + 2 * i, 32767))),
            "truncated",
        ),
        ("negative_dim.nii", edit(&|b| put_i16(b, 42, -5)), "dim[1]"),
        ("zero_dim.nii", edit(&|b| put_i16(b, 44, 0)), "dim[2]"),
        ("ndim0.nii", edit(&|b| put_i16(b, 40, 0)), "dim[0]"),
        ("ndim9.nii", edit(&|b| put_i16(b, 40, 9)), "dim[0]"),
        ("complex.nii", edit(&|b| put_i16(b, 70, 32)), "complex"),
        ("rgb.nii", edit(&|b| put_i16(b, 70, 128)), "RGB"),
        ("binary.nii", edit(&|b| put_i16(b, 70, 1)), "datatype"),
        ("float128.nii", edit(&|b| put_i16(b, 70, 1536)), "float128"),
        (
            "unknown_type.nii",
            edit(&|b| put_i16(b, 70, 9999)),
            "datatype",
        ),
        (
            "offset_negative.nii",
            edit(&|b| put_f32(b, 108, -4.0)),
            "vox_offset",
        ),
        (
            "offset_nan.nii",
            edit(&|b| put_f32(b, 108, f32::NAN)),
            "vox_offset",
        ),
        (
            "offset_in_header.nii",
            edit(&|b| put_f32(b, 108, 100.0)),
            "vox_offset",
        ),
        (
            "offset_zero.nii",
            edit(&|b| put_f32(b, 108, 0.0)),
            "vox_offset",
        ),
        (
            "offset_huge.nii",
            edit(&|b| put_f32(b, 108, 1e12)),
            "truncated",
        ),
        (
            "inter_inf.nii",
            edit(&|b| {
                put_f32(b, 112, 2.0);
                put_f32(b, 116, f32::INFINITY)
            }),
            "scl_inter",
        ),
        (
            "four_d.nii",
            edit(&|b| {
                put_i16(b, 40, 4);
                put_i16(b, 48, 3)
            }),
            "4-D with 3 volumes",
        ),
        (
            "bad_quaternion.nii",
            edit(&|b| {
                put_i16(b, 254, 0);
                put_i16(b, 252, 1);
                put_f32(b, 256, 0.9);
                put_f32(b, 260, 0.9)
            }),
            "quaternion",
        ),
    ];
    for (name, bytes, needle) in &cases {
        let msg = expect_error(name, bytes);
        assert!(
            msg.contains(needle),
            "{name}: expected {needle:?} in: {msg}"
        );
        expect_error(&format!("{name}.gz"), &gzip(bytes));
    }
    // Absurd dims in a small gzip file are refused before any large allocation.
    let msg = expect_error("huge_dims_gz.nii.gz", &gzip(&cases[3].1));
    assert!(msg.contains("gzip"), "{msg}");
    // NIfTI-2 dims whose product overflows.
    let mut v2 =
        gzip::decompress(&fs::read(c.work.join("gen/nifti2_scaled_sform.nii.gz")).unwrap());
    assert_eq!(v2.len(), 544 + 6 * 7 * 8 * 2);
    for i in 1..4 {
        v2[16 + 8 * i..24 + 8 * i].copy_from_slice(&(1i64 << 40).to_le_bytes());
    }
    expect_error("nifti2_overflow.nii", &v2);
    v2[344..348].copy_from_slice(b"n+2\0");
    v2[8..12].copy_from_slice(b"\r\r\r\r");
    expect_error("nifti2_eol.nii", &v2);

    // Paths that are not files.
    for p in [c.work.join("corrupt"), c.work.join("does_not_exist.nii")] {
        let msg = read_nifti(&p).unwrap_err().to_string();
        assert!(msg.contains(&p.display().to_string()), "{msg}");
    }

    // Random header mutations never panic (they may or may not be errors).
    let mut rng = Lcg(7);
    for i in 0..2000 {
        let mut b = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            let pos = (rng.next() as usize) % 352;
            b[pos] = rng.next() as u8;
        }
        let path = c.work.join("corrupt").join("mutated.nii");
        fs::write(&path, &b).unwrap();
        let r = std::panic::catch_unwind(|| read_nifti(&path).map(|img| img.volume.dims()));
        assert!(r.is_ok(), "mutation {i} panicked");
    }
}

mod gzip {
    pub fn decompress(b: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }
}

#[test]
fn read_time_of_the_example_ct() {
    let path = ctx().data.join("totalsegmentator/example_ct.nii.gz");
    let _ = read_nifti(&path).unwrap();
    let t = Instant::now();
    let runs = 5;
    for _ in 0..runs {
        let img = read_nifti(&path).unwrap();
        assert_eq!(img.volume.dims(), [122, 101, 112]);
    }
    eprintln!(
        "read {}: {:.1} ms per read",
        path.display(),
        t.elapsed().as_secs_f64() * 1e3 / runs as f64
    );
}

/// A full-size CT (512 x 512 x 600 int16, gzip): write and read times. Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn big_volume_timing() {
    let dims = [512, 512, 600];
    let data = Array3::from_shape_fn(dims, |(x, y, z)| {
        let r2 = (x as f32 - 256.0).powi(2) + (y as f32 - 256.0).powi(2);
        if r2 > 200.0 * 200.0 {
            -1024.0
        } else {
            ((x * 7 + y * 3 + z) % 200) as f32 - 50.0 + ((x * y + z) % 13) as f32
        }
    });
    let reference = small_reference();
    let dir = ctx().work.join("big");
    for name in ["ct.nii", "ct.nii.gz"] {
        let path = dir.join(name);
        let t = Instant::now();
        write_nifti(&path, &data, &reference.header, OutputDtype::Int16).unwrap();
        let tw = t.elapsed();
        let t = Instant::now();
        let img = read_nifti(&path).unwrap();
        let tr = t.elapsed();
        assert!(img.volume.data == data);
        eprintln!(
            "{name}: {} MB on disk, write {:.2} s, read {:.2} s",
            fs::metadata(&path).unwrap().len() / 1_000_000,
            tw.as_secs_f64(),
            tr.as_secs_f64()
        );
        fs::remove_file(&path).unwrap();
    }
}
