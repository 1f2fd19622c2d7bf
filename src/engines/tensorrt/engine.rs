//! [`TrtEngine`]: the class path of a window (encoder + class head) on TensorRT engines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context as _, Result};
use tch::{Device, Kind, Tensor};

use super::cache::{
    candidates, chunk_ranges, select_engine, EngineKey, EnginePaths, EngineProfile, OnnxStat, Part,
    Precision, Sidecar, KEY_SCHEMA,
};
use super::cuda::CudaDevice;
use super::ffi;
use super::library::{Context, IoTensor, Runtime, TrtLibrary};
use super::manifest::OnnxManifest;
use crate::engines::{Method, WindowEngine};

/// The expected key of `part` for a run: the identity fields are what matters (the build choices are read
/// from the engine's sidecar, see [`select_engine`]).
pub fn run_key(
    part: Part,
    precision: Precision,
    tensorrt_version: &str,
    compute_capability: &str,
    manifest: &OnnxManifest,
    onnx_sha256: &str,
    window: [i64; 3],
) -> Result<EngineKey> {
    Ok(EngineKey {
        schema: KEY_SCHEMA,
        part,
        precision,
        tensorrt_version: tensorrt_version.to_string(),
        compute_capability: compute_capability.to_string(),
        profile: EngineProfile::new(part, window, 1, 1)?,
        builder_optimization_level: 0,
        weights_fingerprint: manifest.weights_fingerprint.clone(),
        embed_dim: manifest.embed_dim,
        onnx_sha256: onnx_sha256.to_string(),
    })
}

/// The ONNX file of `part` with its sha256 (reusing the hash recorded by engines of `engines_dir` when the file
/// is unchanged).
pub fn onnx_stat(
    manifest: &OnnxManifest,
    part: Part,
    precision: Precision,
    engines_dir: &Path,
) -> Result<OnnxStat> {
    let path = manifest.existing_onnx_for(part, precision)?.path;
    let known: Vec<OnnxStat> = candidates(engines_dir, part, precision)
        .into_iter()
        .map(|(_, s)| s.onnx)
        .collect();
    OnnxStat::of(&path, &known)
}

/// The libtorch kind of a TensorRT data type.
fn kind_of(dtype: i32) -> Result<Kind> {
    Ok(match dtype {
        ffi::TRT_SHIM_DTYPE_FLOAT => Kind::Float,
        ffi::TRT_SHIM_DTYPE_HALF => Kind::Half,
        ffi::TRT_SHIM_DTYPE_INT32 => Kind::Int,
        ffi::TRT_SHIM_DTYPE_INT64 => Kind::Int64,
        other => bail!("unsupported TensorRT data type {other}"),
    })
}

/// Checks an engine's inputs and outputs against what `part` must have and the profile its sidecar records;
/// returns the libtorch kinds of the inputs (in [`Part::input_names`] order) and of the output.
pub fn check_io(
    part: Part,
    io: &[IoTensor],
    profile_dims: &dyn Fn(&str) -> Result<[Vec<i64>; 3]>,
    profile: &EngineProfile,
    embed_dim: i64,
) -> Result<(Vec<Kind>, Kind)> {
    let mut kinds = Vec::new();
    let expected = profile.input_dims(part, embed_dim);
    for (name, dims) in &expected {
        let t = io
            .iter()
            .find(|t| t.name == *name && t.is_input)
            .with_context(|| {
                format!(
                    "the {} engine has no input '{name}' (it has {:?})",
                    part.name(),
                    io.iter().map(|t| &t.name).collect::<Vec<_>>()
                )
            })?;
        let actual = profile_dims(name)?;
        ensure!(
            actual == *dims,
            "the {} engine's profile for '{name}' is {actual:?}, its sidecar says {dims:?}",
            part.name()
        );
        kinds.push(kind_of(t.dtype)?);
    }
    let inputs = io.iter().filter(|t| t.is_input).count();
    ensure!(
        inputs == expected.len(),
        "the {} engine has {inputs} inputs, expected {}",
        part.name(),
        expected.len()
    );
    let out = io
        .iter()
        .find(|t| t.name == part.output_name() && !t.is_input)
        .with_context(|| {
            format!(
                "the {} engine has no output '{}'",
                part.name(),
                part.output_name()
            )
        })?;
    let out_kind = kind_of(out.dtype)?;
    ensure!(
        matches!(out_kind, Kind::Float | Kind::Half),
        "the {} engine's output '{}' is not floating point",
        part.name(),
        part.output_name()
    );
    Ok((kinds, out_kind))
}

/// Checks image windows `[b, 1, H, W, D]` against the engine's window.
pub fn check_image(image: &Tensor, window: [i64; 3]) -> Result<()> {
    let s = image.size();
    ensure!(
        s.len() == 5 && s[0] >= 1 && s[1] == 1 && s[2..] == window,
        "TensorRT encoder: expected image windows [b, 1, {}, {}, {}], got {s:?}",
        window[0],
        window[1],
        window[2]
    );
    Ok(())
}

/// Checks features `[b, E, H, W, D]` and class ids `[B, 1]`.
pub fn check_class_inputs(
    features: &Tensor,
    class_ids: &Tensor,
    embed_dim: i64,
    window: [i64; 3],
) -> Result<()> {
    let f = features.size();
    ensure!(
        f.len() == 5 && f[0] >= 1 && f[1] == embed_dim && f[2..] == window,
        "TensorRT class head: expected features [b, {embed_dim}, {}, {}, {}], got {f:?}",
        window[0],
        window[1],
        window[2]
    );
    let c = class_ids.size();
    ensure!(
        c.len() == 2 && c[0] >= 1 && c[1] == 1,
        "TensorRT class head: expected class ids [B, 1], got {c:?}"
    );
    ensure!(
        !class_ids.is_floating_point(),
        "TensorRT class head: class ids must be integers, got {:?}",
        class_ids.kind()
    );
    Ok(())
}

/// Runs `run` on windows `0..b` of `image` in chunks of at most `max_windows` and concatenates the results
/// along dim 0.
pub fn encode_chunked(
    image: &Tensor,
    max_windows: usize,
    mut run: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let b = image.size().first().copied().unwrap_or(0).max(0) as usize;
    let mut outs = Vec::new();
    for r in chunk_ranges(b, max_windows) {
        let chunk = image.f_narrow(0, r.start as i64, r.len() as i64)?;
        let out = run(&chunk)?;
        ensure!(
            out.size().first() == Some(&(r.len() as i64)),
            "the encoder returned {:?} for {} windows",
            out.size(),
            r.len()
        );
        outs.push(out);
    }
    ensure!(!outs.is_empty(), "no image windows to encode");
    Ok(Tensor::f_cat(&outs, 0)?)
}

/// Runs `run(features, class_ids)` on chunks of at most `max_windows` windows and `max_prompts` prompts, and
/// assembles the logits `[B, b, ...]`: prompt chunks concatenated along dim 0, window chunks along dim 1.
pub fn classify_chunked(
    features: &Tensor,
    class_ids: &Tensor,
    max_windows: usize,
    max_prompts: usize,
    mut run: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let b = features.size().first().copied().unwrap_or(0).max(0) as usize;
    let prompts = class_ids.size().first().copied().unwrap_or(0).max(0) as usize;
    let mut per_window = Vec::new();
    for w in chunk_ranges(b, max_windows) {
        let f = features.f_narrow(0, w.start as i64, w.len() as i64)?;
        let mut per_prompt = Vec::new();
        for p in chunk_ranges(prompts, max_prompts) {
            let ids = class_ids.f_narrow(0, p.start as i64, p.len() as i64)?;
            let out = run(&f, &ids)?;
            ensure!(
                out.size().get(..2) == Some(&[p.len() as i64, w.len() as i64][..]),
                "the class head returned {:?} for {} prompts x {} windows",
                out.size(),
                p.len(),
                w.len()
            );
            per_prompt.push(out);
        }
        ensure!(!per_prompt.is_empty(), "no class prompts");
        per_window.push(Tensor::f_cat(&per_prompt, 0)?);
    }
    ensure!(!per_window.is_empty(), "no feature windows");
    Ok(Tensor::f_cat(&per_window, 1)?)
}

/// One deserialized engine with its execution context.
struct PartEngine {
    part: Part,
    // Dropped before anything else of the part (it keeps its engine, which keeps the runtime, alive).
    context: Context,
    input_kinds: Vec<Kind>,
    output_kind: Kind,
    sidecar: Sidecar,
    plan: PathBuf,
}

impl PartEngine {
    /// Reads, verifies (size and sha256 against the sidecar) and deserializes a plan, and checks its I/O.
    fn load(
        runtime: &Arc<Runtime>,
        part: Part,
        paths: &EnginePaths,
        sidecar: Sidecar,
        embed_dim: i64,
    ) -> Result<Self> {
        let plan = std::fs::read(&paths.plan)
            .with_context(|| format!("cannot read {}", paths.plan.display()))?;
        sidecar.verify_plan(&plan)?;
        let engine = Arc::new(
            runtime
                .deserialize(&plan)
                .with_context(|| format!("cannot load {}", paths.plan.display()))?,
        );
        let io = engine.io_tensors()?;
        let (input_kinds, output_kind) = check_io(
            part,
            &io,
            &|name| engine.profile_dims(name),
            &sidecar.key.profile,
            embed_dim,
        )
        .with_context(|| format!("{}", paths.plan.display()))?;
        let context = engine
            .context()
            .with_context(|| format!("{}", paths.plan.display()))?;
        Ok(Self {
            part,
            context,
            input_kinds,
            output_kind,
            sidecar,
            plan: paths.plan.clone(),
        })
    }

    /// Runs the engine on `inputs` (in [`Part::input_names`] order, on `device`); returns the f32 output.
    fn run(&mut self, device: &CudaDevice, inputs: &[&Tensor]) -> Result<Tensor> {
        device.bind()?;
        let cuda = Device::Cuda(device.ordinal());
        let names = self.part.input_names();
        let mut staged = Vec::with_capacity(inputs.len());
        for ((name, t), kind) in names.iter().zip(inputs).zip(&self.input_kinds) {
            let t = t.f_to_device(cuda)?.f_to_kind(*kind)?.f_contiguous()?;
            self.context.set_input_shape(name, &t.size())?;
            staged.push(t);
        }
        let out_name = self.part.output_name();
        let shape = self.context.tensor_shape(out_name)?;
        let out = Tensor::f_empty(shape.as_slice(), (self.output_kind, cuda))?;
        // SAFETY: every address is a contiguous CUDA tensor of the engine's device with the shape and type the
        // context expects (set above); `staged` and `out` live until the stream is synchronised below.
        unsafe {
            for (name, t) in names.iter().zip(&staged) {
                self.context.set_tensor_address(name, t.data_ptr())?;
            }
            self.context.set_tensor_address(out_name, out.data_ptr())?;
            device.synchronize_device()?;
            self.context.enqueue(device.raw_stream())?;
        }
        device.synchronize_stream()?;
        Ok(if self.output_kind == Kind::Float {
            out
        } else {
            out.f_to_kind(Kind::Float)?
        })
    }

    fn max_windows(&self) -> usize {
        self.sidecar.key.profile.window_batch.max.max(1) as usize
    }
}

/// The class path of a window on TensorRT: an encoder engine and a class-head engine of one precision.
///
/// Windows beyond the engines' window batch and prompts beyond their prompt batch (`max_prompt_size`) run in
/// chunks; results are concatenated. Every failure is an error (the caller falls back to libtorch).
pub struct TrtEngine {
    precision: Precision,
    window: [i64; 3],
    embed_dim: i64,
    encoder: PartEngine,
    class_head: PartEngine,
    // Dropped after the engines.
    device: CudaDevice,
    tensorrt_version: String,
}

impl std::fmt::Debug for TrtEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl TrtEngine {
    /// Loads the up-to-date engines of `precision` for the models of `manifest` from `engines_dir`, on GPU
    /// `device`, for windows of size `patch`. Errors (no TensorRT library, no GPU, no up-to-date engine, a plan
    /// that does not match its sidecar) say what is missing; the caller then falls back to libtorch.
    pub fn load(
        engines_dir: &Path,
        manifest: &OnnxManifest,
        precision: Precision,
        patch: [i64; 3],
        device: usize,
    ) -> Result<Self> {
        let library = TrtLibrary::load()?;
        let gpu = CudaDevice::open(device)?;
        let tensorrt_version = library.version().to_string();
        let cc = gpu.compute_capability();
        let mut selected = Vec::new();
        for part in Part::ALL {
            let onnx = onnx_stat(manifest, part, precision, engines_dir)?;
            let want = run_key(
                part,
                precision,
                &tensorrt_version,
                &cc,
                manifest,
                &onnx.sha256,
                patch,
            )?;
            selected.push(select_engine(engines_dir, &want)?);
        }
        let runtime = Arc::new(library.runtime()?);
        let mut parts = Vec::new();
        for (part, (paths, sidecar)) in Part::ALL.into_iter().zip(selected) {
            parts.push(PartEngine::load(
                &runtime,
                part,
                &paths,
                sidecar,
                manifest.embed_dim,
            )?);
        }
        let class_head = parts.pop().context("class head engine")?;
        let encoder = parts.pop().context("encoder engine")?;
        let engine = Self {
            precision,
            window: patch,
            embed_dim: manifest.embed_dim,
            encoder,
            class_head,
            device: gpu,
            tensorrt_version,
        };
        log::info!("{}", engine.describe());
        Ok(engine)
    }

    /// The most prompts one class-head call takes (more run in chunks).
    pub fn max_prompts(&self) -> usize {
        self.class_head
            .sidecar
            .key
            .profile
            .prompt_batch
            .map(|p| p.max.max(1) as usize)
            .unwrap_or(1)
    }

    /// One line for logs and records.
    pub fn describe(&self) -> String {
        format!(
            "TensorRT {} {} on {} (GPU {}, sm {}): encoder {}, class head {} (up to {} prompts, {} windows per call)",
            self.tensorrt_version,
            self.precision,
            self.device.name(),
            self.device.ordinal(),
            self.device.compute_capability(),
            self.encoder.plan.display(),
            self.class_head.plan.display(),
            self.max_prompts(),
            self.encoder.max_windows()
        )
    }
}

impl WindowEngine for TrtEngine {
    fn method(&self) -> Method {
        self.precision.method()
    }

    fn encode(&mut self, image: &Tensor) -> Result<Tensor> {
        check_image(image, self.window)?;
        let max_windows = self.encoder.max_windows();
        let (encoder, device) = (&mut self.encoder, &self.device);
        let out = encode_chunked(image, max_windows, |chunk| encoder.run(device, &[chunk]))?;
        Ok(out.f_to_device(image.device())?)
    }

    fn classify(&mut self, features: &Tensor, class_ids: &Tensor) -> Result<Tensor> {
        check_class_inputs(features, class_ids, self.embed_dim, self.window)?;
        let (max_windows, max_prompts) = (self.class_head.max_windows(), self.max_prompts());
        let (head, device) = (&mut self.class_head, &self.device);
        let out = classify_chunked(features, class_ids, max_windows, max_prompts, |f, ids| {
            head.run(device, &[f, ids])
        })?;
        Ok(out.f_to_device(features.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in class head: logits[p, w] = class_id[p] * (w-th window's mean feature) + p-independent bias.
    fn fake_head(f: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let b = f.size()[0];
        let spatial = &f.size()[2..];
        let mean = f.mean_dim(&[1i64][..], true, Kind::Float); // [b,1,H,W,D]
        let ids = ids.to_kind(Kind::Float).view([-1, 1, 1, 1, 1]); // [B,1,1,1,1]
        let logits = ids * mean.view([1, b, spatial[0], spatial[1], spatial[2]]);
        Ok(logits)
    }

    #[test]
    fn classify_in_chunks_equals_one_call() {
        let features = Tensor::randn([3, 4, 2, 3, 2], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 5, 7, 2, 9, 11, 3]).view([7, 1]);
        let whole = fake_head(&features, &ids).unwrap();
        for (mw, mp) in [(1, 1), (2, 3), (3, 7), (1, 4), (5, 10)] {
            let mut calls = 0;
            let chunked = classify_chunked(&features, &ids, mw, mp, |f, i| {
                calls += 1;
                assert!(f.size()[0] as usize <= mw && i.size()[0] as usize <= mp);
                fake_head(f, i)
            })
            .unwrap();
            assert_eq!(chunked.size(), vec![7, 3, 2, 3, 2]);
            assert!(chunked.allclose(&whole, 0.0, 0.0, false), "{mw} {mp}");
            assert_eq!(calls, 3usize.div_ceil(mw) * 7usize.div_ceil(mp));
        }
    }

    #[test]
    fn encode_in_chunks_equals_one_call() {
        let image = Tensor::randn([5, 1, 2, 2, 2], (Kind::Float, Device::Cpu));
        let run = |x: &Tensor| Ok(x.repeat([1, 3, 1, 1, 1]) * 2.0);
        let whole = run(&image).unwrap();
        for max in [1, 2, 5, 8] {
            let out = encode_chunked(&image, max, run).unwrap();
            assert!(out.allclose(&whole, 0.0, 0.0, false), "{max}");
        }
    }

    #[test]
    fn a_failing_engine_is_an_error_not_a_panic() {
        let features = Tensor::zeros([2, 4, 2, 2, 2], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 2, 3]).view([3, 1]);
        let mut calls = 0;
        let err = classify_chunked(&features, &ids, 1, 2, |f, i| {
            calls += 1;
            if calls == 2 {
                bail!("enqueueV3 failed: simulated")
            }
            fake_head(f, i)
        })
        .unwrap_err();
        assert!(err.to_string().contains("simulated"));
        // An engine returning the wrong shape is caught too.
        let err =
            classify_chunked(&features, &ids, 2, 3, |f, _| Ok(f.shallow_clone())).unwrap_err();
        assert!(err.to_string().contains("returned"), "{err}");
        let image = Tensor::zeros([2, 1, 2, 2, 2], (Kind::Float, Device::Cpu));
        let err = encode_chunked(&image, 1, |_| bail!("out of GPU memory")).unwrap_err();
        assert!(err.to_string().contains("out of GPU memory"));
        let err = encode_chunked(&image, 2, |x| Ok(x.narrow(0, 0, 1))).unwrap_err();
        assert!(err.to_string().contains("returned"), "{err}");
    }

    #[test]
    fn input_shapes_are_checked() {
        let w = [4, 4, 2];
        assert!(check_image(
            &Tensor::zeros([2, 1, 4, 4, 2], (Kind::Float, Device::Cpu)),
            w
        )
        .is_ok());
        let err = check_image(
            &Tensor::zeros([2, 1, 4, 4, 4], (Kind::Float, Device::Cpu)),
            w,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[b, 1, 4, 4, 2]"), "{err}");
        assert!(check_image(
            &Tensor::zeros([1, 2, 4, 4, 2], (Kind::Float, Device::Cpu)),
            w
        )
        .is_err());
        let f = Tensor::zeros([2, 8, 4, 4, 2], (Kind::Float, Device::Cpu));
        let ids = Tensor::zeros([3, 1], (Kind::Int64, Device::Cpu));
        assert!(check_class_inputs(&f, &ids, 8, w).is_ok());
        assert!(check_class_inputs(&f, &ids, 16, w).is_err());
        assert!(check_class_inputs(&f, &ids.view([3]), 8, w).is_err());
        assert!(check_class_inputs(&f, &ids.to_kind(Kind::Float), 8, w).is_err());
    }

    #[test]
    fn engine_io_is_checked_against_the_sidecar_profile() {
        let profile = EngineProfile::new(Part::ClassHead, [4, 4, 2], 1, 4).unwrap();
        let dims = profile.input_dims(Part::ClassHead, 8);
        let good = |name: &str| -> Result<[Vec<i64>; 3]> {
            Ok(dims.iter().find(|(n, _)| *n == name).unwrap().1.clone())
        };
        let io = vec![
            IoTensor {
                name: "features".into(),
                is_input: true,
                dtype: ffi::TRT_SHIM_DTYPE_FLOAT,
                dims: vec![-1, 8, 4, 4, 2],
            },
            IoTensor {
                name: "class_ids".into(),
                is_input: true,
                dtype: ffi::TRT_SHIM_DTYPE_INT64,
                dims: vec![-1, 1],
            },
            IoTensor {
                name: "logits".into(),
                is_input: false,
                dtype: ffi::TRT_SHIM_DTYPE_FLOAT,
                dims: vec![-1, -1, 4, 4, 2],
            },
        ];
        let (kinds, out) = check_io(Part::ClassHead, &io, &good, &profile, 8).unwrap();
        assert_eq!(kinds, vec![Kind::Float, Kind::Int64]);
        assert_eq!(out, Kind::Float);
        // A profile that differs from the sidecar's.
        let other = |name: &str| -> Result<[Vec<i64>; 3]> {
            let mut d = good(name)?;
            d[2][0] += 1;
            Ok(d)
        };
        let err = check_io(Part::ClassHead, &io, &other, &profile, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sidecar says"), "{err}");
        // Missing input, wrong output.
        let err = check_io(Part::ClassHead, &io[1..], &good, &profile, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no input 'features'"), "{err}");
        let mut bad = io.clone();
        bad[2].name = "out".into();
        let err = check_io(Part::ClassHead, &bad, &good, &profile, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no output 'logits'"), "{err}");
    }

    #[test]
    fn load_without_tensorrt_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = OnnxManifest::parse(
            dir.path(),
            r#"{"weights_fingerprint": "0123456789abcdef", "embed_dim": 8, "opset": 17}"#,
        )
        .unwrap();
        let err = TrtEngine::load(dir.path(), &manifest, Precision::Fp16, [128, 128, 128], 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("TensorRT unavailable"), "{err}");
    }
}
