// Integration tests for `vista3d::checkpoint`.
//
// Fixtures are produced at test time by real PyTorch through $VISTA3D_PYTHON (set by
// scripts/test.sh / scripts/env.sh); nothing is committed. The tests fail, rather than skip,
// when that interpreter is not configured.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value as Json;
use vista3d::checkpoint::{
    read_all_tensors, read_checkpoint, write_safetensors, write_torch_state_dict, CheckpointError,
    CheckpointFormat, DType, RawTensor, StateDict, WeightsError, TRAINING_STATE_KEY,
};

// ----------------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------------

fn python() -> PathBuf {
    match std::env::var_os("VISTA3D_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "VISTA3D_PYTHON is not set. These tests generate their fixtures with PyTorch: run \
             them through scripts/test.sh (or `. scripts/env.sh test` first), which points \
             VISTA3D_PYTHON at the project's Python environment"
        ),
    }
}

/// Runs an inline Python script with the given arguments; panics with its output on failure.
fn run_python(script: &str, args: &[&Path]) -> String {
    let py = python();
    let out = Command::new(&py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ($VISTA3D_PYTHON): {e}", py.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A fresh, empty directory under cargo's per-target temporary directory.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("checkpoint_io")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Formats an error with its whole chain (as the CLI prints it).
fn err_text(r: Result<StateDict, CheckpointError>) -> String {
    match r {
        Ok(sd) => panic!("expected an error, got {} tensors", sd.len()),
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
    }
}

/// The error of a read that must fail.
fn read_err(path: &Path) -> CheckpointError {
    match read_checkpoint(path) {
        Ok(sd) => panic!(
            "{}: expected an error, got {} tensors",
            path.display(),
            sd.len()
        ),
        Err(e) => e,
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

// ----------------------------------------------------------------------------------------------
// Fixtures written by torch
// ----------------------------------------------------------------------------------------------

const FIXTURE_SCRIPT: &str = r#"
import collections, json, os, sys, zipfile
import numpy as np
import torch
from safetensors.torch import save_file

out = sys.argv[1]
P = lambda name: os.path.join(out, name)

def describe(sd):
    return [[k, str(v.dtype).replace("torch.", ""), list(v.shape),
             v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex(),
             v.detach().float().reshape(-1).tolist()] for k, v in sd.items()]

def rewrite(src, dst, fn=lambda name, data: data, compression=zipfile.ZIP_STORED):
    zin = zipfile.ZipFile(src)
    with zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = fn(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)

g = torch.Generator().manual_seed(1234)
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
sd = collections.OrderedDict()
sd["f32"] = torch.randn(3, 4, generator=g)
sd["f16"] = torch.randn(5, generator=g).half()
sd["bf16"] = torch.randn(2, 3, generator=g).bfloat16()
sd["f64"] = torch.randn(4, generator=g, dtype=torch.float64)
sd["i64"] = torch.tensor([-(2**40), -1, 0, 1, 2**62])
sd["i32"] = torch.arange(-3, 3, dtype=torch.int32)
sd["i16"] = torch.tensor([-32768, 0, 32767], dtype=torch.int16)
sd["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
sd["u8"] = torch.arange(250, 256, dtype=torch.uint8)
sd["bool"] = torch.tensor([True, False, True, True])
sd["shared.base"] = base
sd["shared.transposed"] = base.t()
sd["shared.slice"] = base[1:3, 2:5]
sd["shared.step"] = base[:, ::2]
sd["shared.flat_offset"] = base.view(-1)[5:11]
sd["permuted4d"] = torch.randn(2, 3, 4, 5, generator=g).permute(3, 1, 0, 2)
sd["expanded"] = torch.tensor([1.0, 2.0, 3.0]).expand(2, 3)
sd["partial"] = torch.arange(1000, dtype=torch.float32)[10:20]
sd["scalar"] = torch.tensor(2.5)
sd["scalar_i64"] = torch.tensor(7)
sd["empty"] = torch.zeros(0, 3)
sd["param"] = torch.nn.Parameter(torch.full((2, 2), 0.5))
sd["large"] = torch.randn(256, 1024, generator=g)
assert sd["shared.transposed"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
torch.save(sd, P("plain.pt"))
json.dump(describe(sd), open(P("plain.json"), "w"))

torch.save({"model": sd, "epoch": 7, "best_metric": 0.83, "note": b"raw bytes", "tags": {"a", "b"},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999),
                                                         "params": [0, 1], "foreach": None}]}},
           P("wrapped_model.pt"))
torch.save({"state_dict": sd, "global_step": 3}, P("wrapped_state_dict.pt"))

net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.Linear(4, 3))
with torch.no_grad():
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
net.eval()
torch.save(net.state_dict(), P("module.pt"))
json.dump(describe(net.state_dict()), open(P("module.json"), "w"))

many = collections.OrderedDict((f"t{i}", torch.full((2,), float(i))) for i in range(1500))
torch.save(many, P("many.pt"))

save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, P("plain.safetensors"),
          metadata={"format": "pt"})

# For the byte-for-byte writer comparison: the archive folder is the file stem ("archive").
ref = collections.OrderedDict()
for i in range(60):
    dt = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool][i % 10]
    shape = [(3, 4), (5,), (), (2, 0, 3), (1, 2, 3, 4, 5), (7, 1)][i % 6]
    ref[f"block{i}.weight"] = (torch.randn(shape, generator=g) * 50).to(dt)
ref["big.u8"] = torch.arange(70000, dtype=torch.int64).to(torch.uint8)
ref["mid.i16"] = torch.arange(300, dtype=torch.int16)
torch.save(ref, P("archive.pt"))

# Big-endian archive: same tensors, byteorder "big", storages byte-swapped.
be = collections.OrderedDict(a=torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5,
                             b=torch.tensor([1, -2, 2**40]),
                             c=torch.tensor([0.5, -1.0], dtype=torch.float16),
                             d=torch.tensor([True, False]))
torch.save(be, P("be_src.pt"))
swap = {"0": np.float32, "1": np.int64, "2": np.float16, "3": np.bool_}
def to_big(name, data):
    if name.endswith("/byteorder"):
        return b"big"
    key = name.rsplit("/", 1)[-1]
    if "/data/" in name and key in swap:
        return np.frombuffer(data, dtype=swap[key]).byteswap().tobytes()
    return data
rewrite(P("be_src.pt"), P("big_endian.pt"), to_big)
back = torch.load(P("big_endian.pt"), weights_only=True)
assert all(torch.equal(back[k], be[k]) for k in be), "fixture: torch reads big_endian.pt differently"

# Re-zipped with deflate (torch itself can read this).
rewrite(P("plain.pt"), P("deflated.pt"), compression=zipfile.ZIP_DEFLATED)

# Files that must be rejected.
torch.save(collections.OrderedDict(x=torch.ones(3)), P("legacy.pt"), _use_new_zipfile_serialization=False)
torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), P("scripted.pt"))
torch.save([torch.ones(2)], P("list.pt"))
torch.save(torch.ones(2), P("tensor.pt"))
class Foo:
    pass
torch.save({"x": Foo()}, P("object.pt"))
torch.save(torch.nn.Linear(2, 2), P("module_object.pt"))
torch.save({"epoch": 1, "lr": 0.1}, P("no_tensors.pt"))
with zipfile.ZipFile(P("no_pickle.pt"), "w") as z:
    z.writestr("archive/version", "3\n")
    z.writestr("archive/data/0", b"\0" * 16)
torch.save({"x": torch.ones(1024)}, P("short_src.pt"))
# Storage shrunk to 256 floats (declared consistently) while the tensor still needs 1024.
def shrink(name, data):
    if name.endswith("data.pkl"):
        assert data.count(b"M\x00\x04t") == 1
        return data.replace(b"M\x00\x04t", b"M\x00\x01t")
    if name.endswith("/data/0"):
        return data[:1024]
    return data
rewrite(P("short_src.pt"), P("short_storage.pt"), shrink)
rewrite(P("short_src.pt"), P("numel_mismatch.pt"),
        lambda name, data: data[:100] if name.endswith("/data/0") else data)
print("fixtures ok")
"#;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("fixtures");
        run_python(FIXTURE_SCRIPT, &[&dir]);
        dir
    })
}

/// (name, dtype, shape, bytes, values as f32) as described by the fixture script.
type Expected = Vec<(String, DType, Vec<usize>, Vec<u8>, Vec<f32>)>;

fn expected(json_name: &str) -> Expected {
    let text = fs::read_to_string(fixtures().join(json_name)).expect("read expected json");
    let rows: Vec<Json> = serde_json::from_str(&text).expect("parse expected json");
    rows.iter()
        .map(|r| {
            let name = r[0].as_str().expect("name").to_string();
            let dtype = DType::from_name(r[1].as_str().expect("dtype")).expect("known dtype");
            let shape = r[2]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            let bytes = unhex(r[3].as_str().expect("hex"));
            let values = r[4]
                .as_array()
                .expect("values")
                .iter()
                .map(|v| v.as_f64().expect("value") as f32)
                .collect();
            (name, dtype, shape, bytes, values)
        })
        .collect()
}

fn assert_matches_expected(sd: &StateDict, exp: &Expected, check_order: bool) {
    assert_eq!(sd.len(), exp.len(), "tensor count");
    if check_order {
        let names: Vec<&str> = sd.names().collect();
        let want: Vec<&str> = exp.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, want, "tensor order");
    }
    for (name, dtype, shape, bytes, values) in exp {
        let t = sd
            .get(name)
            .unwrap_or_else(|| panic!("tensor '{name}' missing"));
        assert_eq!(t.dtype, *dtype, "{name}: dtype");
        assert_eq!(&t.shape, shape, "{name}: shape");
        assert_eq!(t.data.len(), t.numel() * dtype.size_bytes(), "{name}: size");
        assert!(&t.data == bytes, "{name}: bytes differ");
        let f = t.to_f32_vec().expect("to_f32_vec");
        assert_eq!(f.len(), values.len(), "{name}: value count");
        for (i, (a, b)) in f.iter().zip(values).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{name}[{i}]: {a} != {b}");
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Reading torch.save and safetensors files
// ----------------------------------------------------------------------------------------------

#[test]
fn reads_torch_save_archive_exactly() {
    let sd = read_checkpoint(&fixtures().join("plain.pt")).expect("read plain.pt");
    assert_eq!(sd.format, CheckpointFormat::TorchZip);
    assert_eq!(sd.format.to_string(), "PyTorch zip+pickle (torch.save)");
    assert_matches_expected(&sd, &expected("plain.json"), true);
    // Spot checks that do not depend on the fixture's own description.
    let t = sd.get("shared.transposed").expect("transposed");
    assert_eq!(t.shape, [6, 4]);
    assert_eq!(t.to_f32_vec().unwrap()[..5], [0.0, 6.0, 12.0, 18.0, 1.0]);
    let s = sd.get("shared.slice").expect("slice");
    assert_eq!(s.to_f32_vec().unwrap(), [8.0, 9.0, 10.0, 14.0, 15.0, 16.0]);
    let p = sd.get("partial").expect("partial");
    assert_eq!(
        p.to_f32_vec().unwrap(),
        (10..20).map(|i| i as f32).collect::<Vec<_>>()
    );
    let e = sd.get("empty").expect("empty");
    assert_eq!((e.shape.as_slice(), e.data.len()), (&[0usize, 3][..], 0));
    assert!(sd.get("scalar").expect("scalar").shape.is_empty());
}

#[test]
fn reads_wrapped_checkpoints() {
    let plain = read_checkpoint(&fixtures().join("plain.pt")).expect("plain");
    for name in ["wrapped_model.pt", "wrapped_state_dict.pt"] {
        let sd = read_checkpoint(&fixtures().join(name)).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(sd.tensors, plain.tensors, "{name}");
    }
}

#[test]
fn reads_module_state_dict_with_metadata() {
    let sd = read_checkpoint(&fixtures().join("module.pt")).expect("module.pt");
    assert_matches_expected(&sd, &expected("module.json"), true);
    let n = sd
        .get("1.num_batches_tracked")
        .expect("num_batches_tracked");
    assert_eq!((n.dtype, n.shape.len()), (DType::I64, 0));
}

#[test]
fn reads_large_dicts_in_order() {
    let sd = read_checkpoint(&fixtures().join("many.pt")).expect("many.pt");
    assert_eq!(sd.len(), 1500);
    for (i, (name, t)) in sd.iter().enumerate() {
        assert_eq!(name, format!("t{i}"));
        assert_eq!(t.to_f32_vec().unwrap(), [i as f32, i as f32]);
    }
}

#[test]
fn reads_safetensors_exactly() {
    let sd = read_checkpoint(&fixtures().join("plain.safetensors")).expect("safetensors");
    assert_eq!(sd.format, CheckpointFormat::Safetensors);
    assert_eq!(sd.format.to_string(), "safetensors");
    assert_matches_expected(&sd, &expected("plain.json"), false);
}

#[test]
fn reads_big_endian_and_deflated_archives() {
    let be = read_checkpoint(&fixtures().join("big_endian.pt")).expect("big endian");
    let src = read_checkpoint(&fixtures().join("be_src.pt")).expect("be_src");
    assert_eq!(be.tensors, src.tensors);
    assert_eq!(
        be.get("a").unwrap().to_f32_vec().unwrap(),
        [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    );
    let deflated = read_checkpoint(&fixtures().join("deflated.pt")).expect("deflated");
    let plain = read_checkpoint(&fixtures().join("plain.pt")).expect("plain");
    assert_eq!(deflated.tensors, plain.tensors);
}

// ----------------------------------------------------------------------------------------------
// Clear errors
// ----------------------------------------------------------------------------------------------

#[test]
fn rejects_unsupported_files_with_clear_errors() {
    let dir = fixtures();
    let cases: &[(&str, &[&str])] = &[
        ("legacy.pt", &["legacy (pre-1.6, non-zip)", "torch >= 1.6"]),
        ("scripted.pt", &["TorchScript"]),
        ("list.pt", &["list", "expected a dict"]),
        ("tensor.pt", &["tensor", "expected a dict"]),
        ("object.pt", &["__main__.Foo"]),
        ("module_object.pt", &["torch.nn.modules.linear.Linear"]),
        ("no_tensors.pt", &["no tensors", "'epoch'"]),
        ("no_pickle.pt", &["data.pkl"]),
        (
            "short_storage.pt",
            &["has 1024 bytes but tensor 'x' needs 4096"],
        ),
        ("numel_mismatch.pt", &["has 100 bytes", "1024 float32"]),
    ];
    for (file, needles) in cases {
        let msg = err_text(read_checkpoint(&dir.join(file)));
        assert!(
            msg.contains(file),
            "{file}: message does not name the file: {msg}"
        );
        for n in *needles {
            assert!(msg.contains(n), "{file}: expected '{n}' in: {msg}");
        }
        // The error says what kind of problem it is, and which file.
        let err = read_err(&dir.join(file));
        assert_eq!(err.path(), dir.join(file));
        let kind_ok = match *file {
            "object.pt" | "module_object.pt" => {
                matches!(err, CheckpointError::UnsupportedPickle { .. })
            }
            "short_storage.pt" | "numel_mismatch.pt" => {
                matches!(err, CheckpointError::Corrupt { .. })
            }
            _ => matches!(err, CheckpointError::NotACheckpoint { .. }),
        };
        assert!(kind_ok, "{file}: {err:?}");
    }
}

#[test]
fn rejects_garbage_with_clear_errors() {
    let dir = scratch_dir("garbage");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        fs::write(&p, bytes).expect("write");
        p
    };
    let msg = err_text(read_checkpoint(&write("empty.pt", b"")));
    assert!(
        msg.contains("empty.pt") && msg.contains("empty file"),
        "{msg}"
    );
    let elf = [
        0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0,
    ];
    let msg = err_text(read_checkpoint(&write("model.pt", &elf)));
    assert!(
        msg.contains(
            "model.pt: not a PyTorch checkpoint or safetensors file (starts with bytes 7f 45 4c 46"
        ),
        "{msg}"
    );
    let msg = err_text(read_checkpoint(&dir.join("does_not_exist.pt")));
    assert!(msg.contains("does_not_exist.pt"), "{msg}");
    let err = read_err(&dir.join("does_not_exist.pt"));
    assert!(
        matches!(&err, CheckpointError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(matches!(
        read_err(&dir.join("empty.pt")),
        CheckpointError::NotACheckpoint { .. }
    ));
    assert!(matches!(
        read_err(&dir.join("model.pt")),
        CheckpointError::NotACheckpoint { .. }
    ));
    let msg = err_text(read_checkpoint(&dir));
    assert!(msg.contains("directory"), "{msg}");
    assert!(matches!(
        read_err(&dir),
        CheckpointError::NotACheckpoint { .. }
    ));
    let mut zipish = b"PK\x03\x04".to_vec();
    zipish.extend(pseudo_random(1, 5000));
    let msg = err_text(read_checkpoint(&write("zipish.pt", &zipish)));
    assert!(msg.contains("truncated or corrupt zip archive"), "{msg}");
    assert!(matches!(
        read_err(&dir.join("zipish.pt")),
        CheckpointError::Corrupt { .. }
    ));
    let mut st = 1_000_000u64.to_le_bytes().to_vec();
    st.extend_from_slice(b"{\"x\": 1}");
    let msg = err_text(read_checkpoint(&write("short.safetensors", &st)));
    assert!(msg.contains("truncated safetensors"), "{msg}");
    assert!(matches!(
        read_err(&dir.join("short.safetensors")),
        CheckpointError::Corrupt { .. }
    ));

    for seed in 0..200u64 {
        let n = (seed as usize * 37) % 3000;
        let mut bytes = pseudo_random(seed, n);
        match seed % 4 {
            1 if n >= 4 => bytes[..4].copy_from_slice(b"PK\x03\x04"),
            2 if n >= 9 => {
                bytes[..8].copy_from_slice(&((n as u64 - 8) / 2).to_le_bytes());
                bytes[8] = b'{';
            }
            3 if n >= 2 => bytes[..2].copy_from_slice(&[0x80, 2]),
            _ => {}
        }
        let p = write("random.bin", &bytes);
        let msg = err_text(read_checkpoint(&p));
        assert!(msg.starts_with(&p.display().to_string()), "{msg}");
    }
}

#[test]
fn zip_with_bad_pickles_fails_cleanly() {
    use std::io::Write;
    let dir = scratch_dir("bad_pickles");
    let pickles: Vec<(&str, Vec<u8>)> = vec![
        ("random", pseudo_random(7, 300)),
        ("int", b"\x80\x02K\x05.".to_vec()),
        ("no_stop", b"\x80\x02}q\x00".to_vec()),
        ("unknown_opcode", b"\x80\x02}\x01.".to_vec()),
        ("global", b"\x80\x02cos\nsystem\n.".to_vec()),
        ("bad_pid", b"\x80\x02}X\x01\x00\x00\x00aK\x01Qs.".to_vec()),
    ];
    for (name, pkl) in pickles {
        let path = dir.join(format!("{name}.pt"));
        let file = fs::File::create(&path).unwrap();
        let mut z = zip::ZipWriter::new(file);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file(format!("{name}/data.pkl"), opts).unwrap();
        z.write_all(&pkl).unwrap();
        z.start_file(format!("{name}/byteorder"), opts).unwrap();
        z.write_all(b"little").unwrap();
        z.finish().unwrap();
        let msg = err_text(read_checkpoint(&path));
        assert!(msg.contains(&format!("{name}.pt")), "{msg}");
        match name {
            "int" => assert!(msg.contains("int at the top level"), "{msg}"),
            "unknown_opcode" => assert!(msg.contains("0x01"), "{msg}"),
            "global" => assert!(msg.contains("os.system"), "{msg}"),
            "bad_pid" => assert!(msg.contains("persistent id"), "{msg}"),
            _ => {}
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Corruption: never panic, never return wrong data
// ----------------------------------------------------------------------------------------------

/// Offsets to try: every byte within 600 of either end, plus `samples` evenly spaced ones.
fn offsets(len: usize, samples: usize) -> Vec<usize> {
    let step = (len / samples.max(1)).max(1);
    (0..len)
        .filter(|&i| i < 600 || i + 600 >= len || i % step == 0)
        .collect()
}

#[test]
fn truncated_files_are_rejected() {
    let dir = scratch_dir("truncated");
    for src in ["plain.pt", "module.pt", "plain.safetensors"] {
        let bytes = fs::read(fixtures().join(src)).expect("read fixture");
        let target = dir.join(src);
        for cut in offsets(bytes.len(), 1500) {
            fs::write(&target, &bytes[..cut]).unwrap();
            let msg = err_text(read_checkpoint(&target));
            assert!(msg.contains(src), "{src} cut at {cut}: {msg}");
            let err = read_err(&target);
            assert!(
                matches!(
                    err,
                    CheckpointError::Corrupt { .. } | CheckpointError::NotACheckpoint { .. }
                ),
                "{src} cut at {cut}: {err:?}"
            );
        }
    }
}

#[test]
fn flipped_bytes_in_torch_archives_are_detected() {
    let dir = scratch_dir("flipped");
    for src in ["plain.pt", "module.pt"] {
        let bytes = fs::read(fixtures().join(src)).expect("read fixture");
        let original = read_checkpoint(&fixtures().join(src)).expect("original");
        let target = dir.join(src);
        let mut rejected = 0;
        let tried = offsets(bytes.len(), 1500);
        for &i in &tried {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            fs::write(&target, &b).unwrap();
            match read_checkpoint(&target) {
                Err(e) => {
                    rejected += 1;
                    assert!(format!("{e:#}").contains(src));
                }
                // Flips in bytes nothing depends on (padding, timestamps, unused memo slots)
                // are fine, as long as the result is unchanged.
                Ok(sd) => assert_eq!(
                    sd.tensors, original.tensors,
                    "{src}: flip at {i} changed data"
                ),
            }
        }
        assert!(rejected > 0, "{src}: no flip was rejected");
    }
}

#[test]
fn flipped_bytes_in_safetensors_never_panic() {
    let dir = scratch_dir("flipped_st");
    let bytes = fs::read(fixtures().join("plain.safetensors")).expect("read fixture");
    let target = dir.join("x.safetensors");
    for i in offsets(bytes.len(), 1500) {
        let mut b = bytes.clone();
        b[i] ^= 0xa5;
        fs::write(&target, &b).unwrap();
        // Tensor data has no checksum in safetensors, so only "no panic" can be asserted.
        let _ = read_checkpoint(&target);
    }
}

// ----------------------------------------------------------------------------------------------
// Writers
// ----------------------------------------------------------------------------------------------

fn le<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

fn writer_tensors() -> Vec<(String, RawTensor)> {
    let t = |dtype, shape: Vec<usize>, data| RawTensor::new(dtype, shape, data).expect("tensor");
    let f: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let mut v = vec![
        ("enc.f32".to_string(), RawTensor::from_f32(vec![3, 4], &f)),
        (
            "enc.f64".into(),
            t(
                DType::F64,
                vec![2, 2],
                le(&[1.5f64, -2.0, 1e300, 0.0], f64::to_le_bytes),
            ),
        ),
        (
            "enc.f16".into(),
            t(
                DType::F16,
                vec![3],
                le(&[0.5f32, -1.0, 65504.0], |x| {
                    half::f16::from_f32(x).to_le_bytes()
                }),
            ),
        ),
        (
            "enc.bf16".into(),
            t(
                DType::BF16,
                vec![2],
                le(&[3.0f32, -0.125], |x| half::bf16::from_f32(x).to_le_bytes()),
            ),
        ),
        (
            "enc.i64".into(),
            t(
                DType::I64,
                vec![3],
                le(&[i64::MIN, -1, i64::MAX], i64::to_le_bytes),
            ),
        ),
        (
            "enc.i32".into(),
            t(DType::I32, vec![2], le(&[i32::MIN, 5], i32::to_le_bytes)),
        ),
        (
            "enc.i16".into(),
            t(DType::I16, vec![2], le(&[-300i16, 300], i16::to_le_bytes)),
        ),
        ("enc.i8".into(), t(DType::I8, vec![2], vec![0x80, 0x7f])),
        (
            "enc.u8".into(),
            t(DType::U8, vec![300], (0..300).map(|i| i as u8).collect()),
        ),
        (
            "enc.bool".into(),
            t(DType::Bool, vec![2, 2], vec![1, 0, 0, 1]),
        ),
        ("enc.scalar".into(), RawTensor::from_f32(vec![], &[42.0])),
        ("enc.empty".into(), t(DType::F32, vec![0, 3], vec![])),
        (
            "enc.5d".into(),
            t(DType::I8, vec![1, 2, 3, 2, 1], (0..12).collect()),
        ),
        (
            "enc.long".into(),
            t(
                DType::U8,
                vec![70000],
                (0..70000).map(|i| (i % 251) as u8).collect(),
            ),
        ),
    ];
    // Enough entries for several SETITEMS batches and 4-byte memo indices.
    for i in 0..1100i32 {
        v.push((
            format!("extra.{i}"),
            t(DType::I32, vec![1], i.to_le_bytes().to_vec()),
        ));
    }
    v
}

const VERIFY_SCRIPT: &str = r#"
import collections, json, sys
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pt, st, exp = sys.argv[1:4]
expected = json.load(open(exp))

def check(t, e):
    name, dtype, shape, hx = e
    assert str(t.dtype) == "torch." + dtype, (name, t.dtype)
    assert list(t.shape) == shape, (name, t.shape)
    assert t.is_contiguous(), name
    got = t.reshape(-1).view(torch.uint8).numpy().tobytes().hex()
    assert got == hx, (name, got[:64], hx[:64])

for mmap in (False, True):
    sd = torch.load(pt, weights_only=True, mmap=mmap)
    assert type(sd) is collections.OrderedDict, type(sd)
    assert list(sd.keys()) == [e[0] for e in expected], "key order"
    for e in expected:
        check(sd[e[0]], e)

st_sd = load_file(st)
assert set(st_sd) == {e[0] for e in expected}
for e in expected:
    check(st_sd[e[0]], e)
with safe_open(st, "pt") as f:
    assert f.metadata() == {"producer": "vista3d", "format": "pt"}, f.metadata()
print("verified", len(expected))
"#;

#[test]
fn written_files_load_in_torch_and_round_trip() {
    let dir = scratch_dir("writer");
    let tensors = writer_tensors();
    let pt = dir.join("rust.pt");
    let st = dir.join("rust.safetensors");
    write_torch_state_dict(&pt, &tensors).expect("write .pt");
    let meta = HashMap::from([
        ("producer".to_string(), "vista3d".to_string()),
        ("format".to_string(), "pt".to_string()),
    ]);
    write_safetensors(&st, &tensors, Some(meta)).expect("write .safetensors");

    let exp: Vec<Json> = tensors
        .iter()
        .map(|(n, t)| serde_json::json!([n, t.dtype.name(), t.shape, hex(&t.data)]))
        .collect();
    let exp_path = dir.join("expected.json");
    fs::write(&exp_path, serde_json::to_string(&exp).unwrap()).unwrap();
    let out = run_python(VERIFY_SCRIPT, &[&pt, &st, &exp_path]);
    assert!(
        out.contains(&format!("verified {}", tensors.len())),
        "{out}"
    );

    let back = read_checkpoint(&pt).expect("read .pt back");
    assert_eq!(back.format, CheckpointFormat::TorchZip);
    assert_eq!(back.tensors, tensors);
    let back = read_checkpoint(&st).expect("read .safetensors back");
    assert_eq!(back.format, CheckpointFormat::Safetensors);
    let mut want = back.clone().into_map();
    for (n, t) in &tensors {
        assert_eq!(want.remove(n).as_ref(), Some(t), "{n}");
    }
    assert!(want.is_empty());
    // No temporary files are left behind.
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["expected.json", "rust.pt", "rust.safetensors"]);
}

#[test]
fn writer_matches_torch_save_byte_for_byte() {
    let src = fixtures().join("archive.pt");
    let sd = read_checkpoint(&src).expect("read archive.pt");
    let dir = scratch_dir("identical");
    let ours_path = dir.join("archive.pt");
    write_torch_state_dict(&ours_path, &sd.tensors).expect("write");
    let theirs = fs::read(&src).unwrap();
    let ours = fs::read(&ours_path).unwrap();
    assert_eq!(ours.len(), theirs.len(), "archive sizes differ");

    // Only the serialization id (a hash torch computes from its own bookkeeping) and its CRC
    // may differ.
    let mut za = zip::ZipArchive::new(fs::File::open(&src).unwrap()).unwrap();
    let id = za.by_name("archive/.data/serialization_id").unwrap();
    let (id_start, id_crc) = (id.data_start() as usize, id.crc32());
    drop(id);
    let mut allowed = Vec::new();
    allowed.push(id_start..id_start + 40);
    for i in 0..theirs.len().saturating_sub(3) {
        if theirs[i..i + 4] == id_crc.to_le_bytes() {
            allowed.push(i..i + 4);
        }
    }
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        if a != b {
            assert!(
                allowed.iter().any(|r| r.contains(&i)),
                "byte {i} differs from torch.save output ({a:#04x} vs {b:#04x})"
            );
        }
    }
}

#[test]
fn failed_writes_leave_no_file() {
    let dir = scratch_dir("atomic");
    let good = vec![("w".to_string(), RawTensor::from_f32(vec![2], &[1.0, 2.0]))];
    let pt = dir.join("model.pt");
    let st = dir.join("model.safetensors");
    write_torch_state_dict(&pt, &good).expect("write");
    write_safetensors(&st, &good, None).expect("write");

    let bad_size = vec![(
        "w".to_string(),
        RawTensor {
            dtype: DType::F32,
            shape: vec![3],
            data: vec![0; 8],
        },
    )];
    let dup = vec![good[0].clone(), good[0].clone()];
    for bad in [&bad_size, &dup] {
        let msg = format!("{:#}", write_torch_state_dict(&pt, bad).unwrap_err());
        assert!(msg.contains("model.pt"), "{msg}");
        let msg = format!("{:#}", write_safetensors(&st, bad, None).unwrap_err());
        assert!(msg.contains("model.safetensors"), "{msg}");
    }
    // The earlier files are untouched and no temporary files remain.
    assert_eq!(read_checkpoint(&pt).unwrap().tensors, good);
    assert_eq!(read_checkpoint(&st).unwrap().tensors, good);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);

    // A parent that is a file cannot be created: the write fails and leaves nothing. (Missing parent
    // directories are created: `fsutil::write_atomic_with` does that for every output.)
    let blocked = dir.join("model.pt/sub/model.pt");
    assert!(write_torch_state_dict(&blocked, &good).is_err());
    assert!(write_safetensors(&blocked, &good, None).is_err());
    assert!(!dir.join("model.pt/sub").exists());
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
    let nested = dir.join("new/dir/model.pt");
    write_torch_state_dict(&nested, &good).expect("write into new directories");
    assert_eq!(read_checkpoint(&nested).unwrap().tensors, good);
}

// ----------------------------------------------------------------------------------------------
// Loading into the network: options, typed mismatches, the trainer's resumable state
// ----------------------------------------------------------------------------------------------

mod network {
    use super::*;
    use std::process::Output;
    use tch::{nn, Device, Tensor};
    use vista3d::training::optim::{AdamW, AdamWSettings};
    use vista3d::training::trainer::{save_last, state_dict, LossScaler, TrainState};
    use vista3d::{load_model, LoadOptions, Vista3d, Vista3dConfig};

    /// A width-8 network with seeded weights.
    fn tiny_network() -> (nn::VarStore, Vista3d) {
        tch::manual_seed(11);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).expect("network");
        (vs, net)
    }

    fn vista3d_cli(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vista3d"))
            .args(args)
            .output()
            .expect("run vista3d")
    }

    /// Writes a training state with the trainer's own writer after one AdamW step (so the optimizer
    /// state is there too); returns the network tensors it holds and the number of trainable ones.
    fn write_training_state(path: &Path) -> (Vec<(String, RawTensor)>, usize) {
        let (vs, _net) = tiny_network();
        let trainable: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let loss = trainable
            .iter()
            .map(|(_, t)| t.square().sum(tch::Kind::Float))
            .fold(Tensor::from(0.0f32), |a, b| a + b);
        loss.backward();
        let mut opt = AdamW::new(AdamWSettings::default());
        opt.step(&trainable);
        let state = TrainState {
            epochs_done: 1,
            global_step: 1,
            best_metric: None,
            best_epoch: None,
            seed: 0,
            encoder_embed_dim: 8,
            scaler: LossScaler::default(),
            stale_validations: 0,
            history: Vec::new(),
            step_losses: vec![(1, 0.5)],
            with_grad: Vec::new(),
        };
        save_last(path, &vs, &opt, &state).expect("save_last");
        (state_dict(&vs).expect("state dict"), trainable.len())
    }

    #[test]
    fn training_state_is_a_checkpoint_of_its_network() {
        let dir = scratch_dir("training_state");
        let last = dir.join("last.safetensors");
        let (network, trainable) = write_training_state(&last);

        // read_checkpoint: the network part, names without the prefix, bytes as saved.
        let sd = read_checkpoint(&last).expect("read the training state");
        assert_eq!(sd.format, CheckpointFormat::TrainingState);
        assert!(
            sd.format.to_string().contains("training state"),
            "{}",
            sd.format
        );
        let mut got = sd.tensors.clone();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want = network.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got.len(), 259);
        assert_eq!(got, want);

        // read_all_tensors: everything as stored, for resuming.
        let all = read_all_tensors(&last).expect("read every tensor");
        assert_eq!(all.format, CheckpointFormat::TrainingState);
        assert_eq!(all.names().filter(|n| n.starts_with("model.")).count(), 259);
        // exp_avg, exp_avg_sq and step per trainable parameter.
        let optimizer = all.names().filter(|n| n.starts_with("optimizer.")).count();
        assert!(trainable > 200, "{trainable} trainable parameters");
        assert_eq!((optimizer, all.len()), (3 * trainable, 259 + 3 * trainable));

        // load_model: strict, same weights as the network that was saved.
        let loaded = load_model(&last, Device::Cpu, &LoadOptions::default()).expect("load");
        assert_eq!(loaded.format, CheckpointFormat::TrainingState);
        assert_eq!((loaded.report.loaded, loaded.tensors), (259, 259));
        assert_eq!(loaded.net.config.embed_dim, 8);
        let back = state_dict(&loaded.vs).expect("state dict");
        assert_eq!(back.len(), want.len());
        for ((n, a), (m, b)) in back.iter().zip(&network) {
            assert_eq!((n, &a.data), (m, &b.data), "{n}");
        }

        // The CLI accepts it wherever a checkpoint goes.
        let o = vista3d_cli(&["info", "--checkpoint", last.to_str().unwrap(), "--json"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        let info: Json = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(info["encoder_embed_dim"], 8);
        assert_eq!(info["loaded"], 259);
        assert_eq!(info["tensors"], 259);
        assert!(
            info["format"].as_str().unwrap().contains("training state"),
            "{info}"
        );
    }

    #[test]
    fn training_state_without_weights_names_the_file_to_use() {
        let dir = scratch_dir("training_state_no_weights");
        let full = dir.join("full.safetensors");
        let _ = write_training_state(&full);
        let optimizer_only: Vec<(String, RawTensor)> = read_all_tensors(&full)
            .expect("read")
            .tensors
            .into_iter()
            .filter(|(n, _)| !n.starts_with("model."))
            .collect();
        fs::remove_file(&full).unwrap();
        let last = dir.join("last.safetensors");
        let meta = HashMap::from([(TRAINING_STATE_KEY.to_string(), "{}".to_string())]);
        write_safetensors(&last, &optimizer_only, Some(meta.clone())).expect("write");

        // Nothing beside it: the message describes the file `vista3d train` writes.
        let err = read_err(&last);
        assert!(
            matches!(err, CheckpointError::TrainingStateWithoutWeights { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("last.safetensors") && msg.contains("key_metric_filename"),
            "{msg}"
        );

        // With the best model beside it: that file is named, and the CLI exits 1 with the message.
        let best = dir.join("model_finetune.pt");
        write_torch_state_dict(&best, &[("w".into(), RawTensor::from_f32(vec![1], &[1.0]))])
            .expect("write");
        let msg = err_text(read_checkpoint(&last));
        assert!(
            msg.contains(&format!("use {} instead", best.display())),
            "{msg}"
        );
        let o = vista3d_cli(&["info", "--checkpoint", last.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("model_finetune.pt"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");

        // The same tensors without the training-state marker are a plain (non-VISTA3D) safetensors file.
        let plain = dir.join("plain.safetensors");
        write_safetensors(&plain, &optimizer_only, None).expect("write");
        assert_eq!(
            read_checkpoint(&plain).expect("plain").format,
            CheckpointFormat::Safetensors
        );
    }

    #[test]
    fn load_options_strict_partial_and_width() {
        let dir = scratch_dir("load_options");
        let (vs, _net) = tiny_network();
        let mut tensors = state_dict(&vs).expect("state dict");
        let removed = tensors.remove(3).0;
        tensors.push((
            "extra.weight".into(),
            RawTensor::from_f32(vec![2], &[1.0, 2.0]),
        ));
        let shaped = tensors
            .iter()
            .position(|(n, _)| n == "class_head.class_embeddings.weight")
            .expect("class embeddings");
        let (name, t) = &tensors[shaped];
        let wrong = RawTensor::from_f32(vec![t.shape[0], 2], &vec![0.0; t.shape[0] * 2]);
        let mis_shaped = name.clone();
        tensors[shaped].1 = wrong;
        for file in ["partial.safetensors", "partial.pt"] {
            let path = dir.join(file);
            if file.ends_with(".pt") {
                write_torch_state_dict(&path, &tensors).expect("write");
            } else {
                write_safetensors(&path, &tensors, None).expect("write");
            }

            // Strict (the default): one typed error listing every problem.
            let err = load_model(&path, Device::Cpu, &LoadOptions::default())
                .err()
                .expect("strict load must fail");
            match &err {
                CheckpointError::Weights {
                    path: p,
                    problem:
                        WeightsError::Mismatch {
                            missing,
                            unexpected,
                            mismatched,
                        },
                } => {
                    assert_eq!(p, &path);
                    assert_eq!(missing, &vec![removed.clone()]);
                    assert_eq!(unexpected, &vec!["extra.weight".to_string()]);
                    assert_eq!(mismatched.len(), 1);
                    assert_eq!(mismatched[0].0, mis_shaped);
                }
                other => panic!("{file}: {other:?}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains(file) && msg.contains("strict loading"),
                "{msg}"
            );
            assert!(
                msg.contains(&removed) && msg.contains("extra.weight"),
                "{msg}"
            );

            // Partial: what matches is loaded, the rest reported.
            let loaded = load_model(
                &path,
                Device::Cpu,
                &LoadOptions::default().allow_partial(true),
            )
            .expect("partial load");
            assert_eq!(loaded.report.loaded, 257);
            assert_eq!(loaded.report.missing, vec![removed.clone()]);
            assert_eq!(loaded.report.unexpected, vec!["extra.weight".to_string()]);
            assert!(!loaded.report.is_exact());

            // Another width than asked for: refused before anything is built.
            let err = load_model(&path, Device::Cpu, &LoadOptions::default().expect_width(48))
                .err()
                .expect("width 48 must be refused");
            assert!(
                matches!(
                    err,
                    CheckpointError::Weights {
                        problem: WeightsError::WrongWidth {
                            found: 8,
                            expected: 48
                        },
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("encoder_embed_dim is 8, but 48"),
                "{err}"
            );
        }
    }

    #[test]
    fn non_vista3d_checkpoints_are_refused_by_type() {
        let err = load_model(
            &fixtures().join("module.pt"),
            Device::Cpu,
            &LoadOptions::default(),
        )
        .err()
        .expect("not VISTA3D");
        assert!(
            matches!(
                err,
                CheckpointError::Weights {
                    problem: WeightsError::NotVista3d { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("module.pt: not a VISTA3D checkpoint"),
            "{err}"
        );
    }
}
