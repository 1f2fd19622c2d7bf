//! One request's network: the class path through an engine when one is open, libtorch otherwise, and a
//! fallback to libtorch (with one warning) the moment an engine fails, so a request never fails because of an
//! engine. Every step down is reported with its kind ([`Fallback`]).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ops::Range;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::{EngineChoice, EngineError, Fallback, Method, WindowEngine};
use crate::inference::network::{
    class_path_in_slabs, class_slabs, even_pieces, whole, SlabSink, WindowSlab,
};
use crate::inference::WindowNetwork;
use crate::model::{winograd, ForwardArgs, Vista3d};
use crate::runtime::torch_switches;

/// What a request asked for and what actually ran.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MethodReport {
    /// `--precision` as given.
    pub requested: Option<Method>,
    /// Every method that computed at least one window, in order of first use.
    pub used: Vec<Method>,
    /// Why the requested method did not (fully) run, with the kind of each step down (each serialized as
    /// its one line, `<method> <kind>: <reason>`).
    pub fallbacks: Vec<Fallback>,
    /// Whether libtorch fp32 windows ran with Winograd's 3x3x3 convolutions (`auto` on a CPU).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub winograd: bool,
}

impl MethodReport {
    fn mark_used(&mut self, m: Method) {
        if !self.used.contains(&m) {
            self.used.push(m);
        }
    }
}

/// The network of one request with its method.
pub struct WindowRunner<'a> {
    /// The TF32 mode of this request, held until the runner ends (CUDA only).
    _tf32: Option<torch_switches::Lease<'static>>,
    net: &'a Vista3d,
    device: Device,
    torch_method: Method,
    engine: RefCell<Option<Box<dyn WindowEngine>>>,
    report: RefCell<MethodReport>,
    /// libtorch fp32 on the CPU with Winograd's convolutions (see [`EngineChoice::winograd`]).
    winograd: bool,
}

impl<'a> WindowRunner<'a> {
    /// A runner for `requested`, served as `choice` says (see [`super::choose`]): its engine (if any) runs the
    /// class path, its libtorch method the rest; its fallbacks start the report.
    pub fn new(net: &'a Vista3d, device: Device, requested: Method, choice: EngineChoice) -> Self {
        let cuda = device.is_cuda();
        let torch_method = if cuda || choice.torch == Method::Bf16 {
            choice.torch
        } else {
            Method::Fp32
        };
        // The global TF32 switches follow the libtorch method (strict fp32 turns cuDNN's default TF32 off), held
        // for the request so that workers on other devices cannot flip them meanwhile.
        let tf32 = cuda.then(|| match torch_method {
            Method::Fp32 => torch_switches::lease_tf32(false, false),
            Method::Tf32 => torch_switches::lease_tf32(true, true),
            _ => torch_switches::lease_tf32(true, false),
        });
        let winograd = choice.winograd && !cuda && torch_method == Method::Fp32;
        Self {
            _tf32: tf32,
            net,
            device,
            torch_method,
            engine: RefCell::new(choice.engine),
            report: RefCell::new(MethodReport {
                requested: Some(requested),
                used: Vec::new(),
                fallbacks: choice.fallbacks,
                winograd: false,
            }),
            winograd,
        }
    }

    /// Plain libtorch fp32 (what tests and parity checks use).
    pub fn torch(net: &'a Vista3d, device: Device) -> Self {
        Self::new(net, device, Method::Fp32, EngineChoice::torch(Method::Fp32))
    }

    /// The libtorch method used for point prompts and as the fallback.
    pub fn torch_method(&self) -> Method {
        self.torch_method
    }

    /// What was asked and what ran so far.
    pub fn report(&self) -> MethodReport {
        self.report.borrow().clone()
    }

    /// Ends the request: what ran, and the choice for the next request of the same method (the engine if it
    /// is still healthy, and every fallback so far, an engine failure included, so later records say why
    /// libtorch runs).
    pub fn into_parts(self) -> (EngineChoice, MethodReport) {
        let report = self.report.into_inner();
        let choice = EngineChoice {
            engine: self.engine.into_inner(),
            torch: self.torch_method,
            fallbacks: report.fallbacks.clone(),
            winograd: self.winograd,
        };
        (choice, report)
    }

    /// Logits `[B, b, H, W, D]` (f32) of an engine's class head for features from its encoder, checked
    /// against the window `[b, 1, H, W, D]` they came from.
    fn engine_logits(
        engine: &mut dyn WindowEngine,
        features: &Tensor,
        class_vector: &Tensor,
        input: &Tensor,
    ) -> Result<Tensor, EngineError> {
        let logits = engine.classify(features, class_vector)?;
        let expected = [class_vector.size()[0], input.size()[0]];
        if !(logits.dim() == 5
            && logits.size()[..2] == expected
            && logits.size()[2..] == input.size()[2..])
        {
            return Err(EngineError::Runtime(format!(
                "returned logits of shape {:?}, expected [{}, {}, {:?}]",
                logits.size(),
                expected[0],
                expected[1],
                &input.size()[2..]
            )));
        }
        Ok(logits.f_to_kind(Kind::Float)?)
    }

    fn engine_forward(
        engine: &mut dyn WindowEngine,
        input: &Tensor,
        class_vector: &Tensor,
        transpose: bool,
    ) -> Result<Tensor, EngineError> {
        let features = engine.encode(input)?;
        let logits = Self::engine_logits(engine, &features, class_vector, input)?;
        Ok(if transpose {
            logits.f_transpose(1, 0)?
        } else {
            logits
        })
    }

    /// Runs `f` as this request's libtorch method computes (autocast for amp on CUDA and for bf16); float32
    /// out.
    fn in_torch_method(&self, f: &dyn Fn() -> Result<Tensor>) -> Result<Tensor> {
        let cuda = self.device.is_cuda();
        match self.torch_method {
            Method::Amp if cuda => Ok(torch_switches::with_cuda_autocast(f)?.to_kind(Kind::Float)),
            Method::Bf16 => Ok(torch_switches::with_bf16_autocast(cuda, f)?.to_kind(Kind::Float)),
            _ => self.with_convolutions(f),
        }
    }

    /// Runs `f` with this request's CPU kernels: Winograd's convolutions and the fused instance norm on this thread
    /// while it runs, if chosen.
    fn with_convolutions<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.winograd {
            self.report.borrow_mut().winograd = true;
        }
        let _convolutions = winograd::enable(self.winograd);
        f()
    }

    fn torch_forward(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
        self.report.borrow_mut().mark_used(self.torch_method);
        self.in_torch_method(&|| self.net.forward(input, args))
    }

    /// The engine's class head for `slabs` of the window's features, one after the other into `sink`; the number
    /// of slabs handed over, and the engine's error if it failed before the last.
    fn engine_slabs(
        &self,
        engine: &mut dyn WindowEngine,
        input: &Tensor,
        class_vector: &Tensor,
        slabs: &[Range<usize>],
        sink: &mut SlabSink<'_>,
    ) -> Result<(usize, Option<EngineError>)> {
        let features = match engine.encode(input) {
            Ok(f) => f,
            Err(e) => return Ok((0, Some(e))),
        };
        for (done, x) in slabs.iter().enumerate() {
            let (start, len) = (x.start as i64, x.len() as i64);
            let logits = features
                .f_narrow(2, start, len)
                .and_then(|f| f.f_contiguous())
                .map_err(EngineError::from)
                .and_then(|part| {
                    Self::engine_logits(engine, &part, class_vector, &input.narrow(2, start, len))
                })
                .and_then(|l| Ok(l.f_transpose(1, 0)?));
            match logits {
                Ok(logits) => {
                    self.report.borrow_mut().mark_used(engine.method());
                    sink(WindowSlab {
                        x: x.clone(),
                        logits,
                    })?;
                }
                Err(e) => return Ok((done, Some(e))),
            }
        }
        Ok((slabs.len(), None))
    }

    /// Records an engine failure and drops the engine: libtorch runs the rest of the request.
    fn engine_failed(&self, method: Method, e: &EngineError) {
        let fallback = Fallback::new(method, e);
        log::warn!(
            "{fallback}; falling back to libtorch {} for the rest of the request",
            self.torch_method
        );
        self.report.borrow_mut().fallbacks.push(fallback);
        *self.engine.borrow_mut() = None;
    }
}

impl WindowNetwork for WindowRunner<'_> {
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
        // Engines cover the class path only: windows with point prompts run in libtorch.
        if let (None, Some(cv)) = (args.point_coords, args.class_vector) {
            let mut slot = self.engine.borrow_mut();
            if let Some(engine) = slot.as_mut() {
                let method = engine.method();
                match Self::engine_forward(engine.as_mut(), input, cv, args.transpose) {
                    Ok(out) => {
                        self.report.borrow_mut().mark_used(method);
                        return Ok(out);
                    }
                    Err(e) => {
                        drop(slot);
                        self.engine_failed(method, &e);
                    }
                }
            }
        }
        self.torch_forward(input, args)
    }

    fn forward_window_in_slabs(
        &self,
        input: &Tensor,
        args: &ForwardArgs,
        slab_x: usize,
        sink: &mut SlabSink<'_>,
    ) -> Result<()> {
        let Some(cv) = class_slabs(args, input, slab_x) else {
            return whole(self.forward_window(input, args)?, sink);
        };
        let slabs = even_pieces(input.size()[2] as usize, slab_x);
        let mut done = 0;
        let engine = self.engine.borrow_mut().take();
        if let Some(mut engine) = engine {
            if !engine.classifies_slabs() {
                // The engine makes the window whole.
                *self.engine.borrow_mut() = Some(engine);
                return whole(self.forward_window(input, args)?, sink);
            }
            let (handed, failure) = self.engine_slabs(engine.as_mut(), input, cv, &slabs, sink)?;
            match failure {
                None => {
                    *self.engine.borrow_mut() = Some(engine);
                    return Ok(());
                }
                // The slabs already handed over stay; libtorch makes the rest.
                Some(e) => {
                    done = handed;
                    self.engine_failed(engine.method(), &e);
                }
            }
        }
        self.report.borrow_mut().mark_used(self.torch_method);
        class_path_in_slabs(
            self.net,
            input,
            cv,
            &slabs[done..],
            &|f| self.in_torch_method(f),
            sink,
        )
    }

    /// libtorch fp32 on the CPU without an engine: the windows may run on several threads at once.
    fn concurrent(&self) -> Option<Box<dyn WindowNetwork + Sync + '_>> {
        if self.device.is_cuda()
            || self.torch_method != Method::Fp32
            || self.engine.borrow().is_some()
        {
            return None;
        }
        let shared = self.net.concurrent()?;
        self.report.borrow_mut().mark_used(self.torch_method);
        if !self.winograd {
            return Some(shared);
        }
        self.report.borrow_mut().winograd = true;
        Some(Box::new(WinogradWindows(shared)))
    }

    fn reduced_precision(&self) -> bool {
        match self.engine.borrow().as_ref() {
            Some(engine) => engine.method().reduced_precision(),
            None => match self.torch_method {
                Method::Amp => self.device.is_cuda(),
                Method::Bf16 => true,
                _ => false,
            },
        }
    }
}

/// A network shared by window workers, each window with Winograd's convolutions on the thread that runs it.
struct WinogradWindows<'a>(Box<dyn WindowNetwork + Sync + 'a>);

impl WindowNetwork for WinogradWindows<'_> {
    fn forward_window(&self, input: &Tensor, args: &ForwardArgs) -> Result<Tensor> {
        let _convolutions = winograd::enable(true);
        self.0.forward_window(input, args)
    }

    fn forward_window_in_slabs(
        &self,
        input: &Tensor,
        args: &ForwardArgs,
        slab_x: usize,
        sink: &mut SlabSink<'_>,
    ) -> Result<()> {
        let _convolutions = winograd::enable(true);
        self.0.forward_window_in_slabs(input, args, slab_x, sink)
    }
}

/// Distinct methods of a report, for display.
pub fn used_names(report: &MethodReport) -> String {
    let set: BTreeSet<&str> = report.used.iter().map(|m| m.name()).collect();
    set.into_iter().collect::<Vec<_>>().join("+")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::EngineErrorKind;
    use crate::Vista3dConfig;
    use tch::nn;

    /// An engine that computes the class path with its own copy of the libtorch modules (so results can be
    /// compared; engines are `Send`, so it owns them), or fails from its `fail_after`-th call on.
    struct FakeEngine {
        net: Vista3d,
        _vs: nn::VarStore,
        calls: usize,
        fail_after: usize,
        /// Whether it takes slabs of a window (as ONNX Runtime does), and from which class-head call on it fails.
        slabs: bool,
        classify_calls: usize,
        classify_fail_after: usize,
    }

    impl WindowEngine for FakeEngine {
        fn method(&self) -> Method {
            Method::TrtFp16
        }
        fn encode(&mut self, image: &Tensor) -> Result<Tensor, EngineError> {
            self.calls += 1;
            if self.calls > self.fail_after {
                return Err(EngineError::Runtime("simulated engine failure".into()));
            }
            crate::engines::split::encode(&self.net, image)
        }
        fn classify(
            &mut self,
            features: &Tensor,
            class_ids: &Tensor,
        ) -> Result<Tensor, EngineError> {
            self.classify_calls += 1;
            if self.classify_calls > self.classify_fail_after {
                return Err(EngineError::Runtime("simulated class head failure".into()));
            }
            Ok(crate::engines::split::classify(
                &self.net, features, class_ids,
            ))
        }
        fn classifies_slabs(&self) -> bool {
            self.slabs
        }
    }

    /// A network for the runner (leaked: the runner borrows it) and a fake engine with the same weights.
    fn net_and_engine(fail_after: usize) -> (&'static Vista3d, FakeEngine) {
        tch::manual_seed(3);
        let vs = Box::leak(Box::new(nn::VarStore::new(Device::Cpu)));
        let net = Box::leak(Box::new(
            Vista3d::new(&vs.root(), Vista3dConfig::with_width(8)).unwrap(),
        ));
        let mut copy_vs = nn::VarStore::new(Device::Cpu);
        let copy = Vista3d::new(&copy_vs.root(), Vista3dConfig::with_width(8)).unwrap();
        copy_vs.copy(vs).unwrap();
        let engine = FakeEngine {
            net: copy,
            _vs: copy_vs,
            calls: 0,
            fail_after,
            slabs: false,
            classify_calls: 0,
            classify_fail_after: usize::MAX,
        };
        (net, engine)
    }

    fn with_engine(engine: FakeEngine, torch: Method, fallbacks: Vec<Fallback>) -> EngineChoice {
        EngineChoice {
            engine: Some(Box::new(engine)),
            torch,
            fallbacks,
            winograd: false,
        }
    }

    #[test]
    fn engines_can_move_to_a_worker_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Box<dyn WindowEngine>>();
        assert_send::<EngineChoice>();
    }

    #[test]
    fn engine_matches_torch_then_falls_back_on_failure() {
        let (net, engine) = net_and_engine(1);
        let input = Tensor::randn([1, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
        let cv = Tensor::from_slice(&[3i64, 1, 14]).view([3, 1]);
        let args = ForwardArgs {
            class_vector: Some(&cv),
            transpose: true,
            ..Default::default()
        };
        let reference = tch::no_grad(|| net.forward(&input, &args)).unwrap();
        let runner = WindowRunner::new(
            net,
            Device::Cpu,
            Method::TrtFp16,
            with_engine(engine, Method::Fp32, Vec::new()),
        );
        // First window through the engine, second: the engine fails and libtorch takes over, same values.
        for _ in 0..2 {
            let out = tch::no_grad(|| runner.forward_window(&input, &args)).unwrap();
            assert_eq!(out.size(), reference.size());
            let diff = (&out - &reference).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "diff {diff}");
        }
        let (next, report) = runner.into_parts();
        assert!(next.engine.is_none(), "a failed engine is dropped");
        assert_eq!(report.used, vec![Method::TrtFp16, Method::Fp32]);
        assert_eq!(report.fallbacks.len(), 1);
        assert!(report.fallbacks[0]
            .to_string()
            .contains("simulated engine failure"));
        assert_eq!(report.fallbacks[0].kind, EngineErrorKind::Runtime);
        assert_eq!(report.fallbacks[0].method, Method::TrtFp16);
        // The next request of the method runs libtorch and its record says why.
        assert_eq!(next.torch, Method::Fp32);
        assert_eq!(next.fallbacks, report.fallbacks);
        let runner = WindowRunner::new(net, Device::Cpu, Method::TrtFp16, next);
        let _ = tch::no_grad(|| runner.forward_window(&input, &args)).unwrap();
        let report = runner.report();
        assert_eq!(report.used, vec![Method::Fp32]);
        assert_eq!(report.fallbacks.len(), 1);
    }

    /// Runs `net` in slabs of at most `max` along x and puts the slabs back together.
    fn in_slabs(net: &dyn WindowNetwork, input: &Tensor, args: &ForwardArgs, max: usize) -> Tensor {
        let mut slabs = Vec::new();
        tch::no_grad(|| {
            net.forward_window_in_slabs(input, args, max, &mut |s| {
                assert_eq!(s.logits.size()[2], s.x.len() as i64);
                slabs.push((s.x.start, s.logits));
                Ok(())
            })
        })
        .unwrap();
        slabs.sort_by_key(|s| s.0);
        Tensor::cat(&slabs.into_iter().map(|s| s.1).collect::<Vec<_>>(), 2)
    }

    #[test]
    fn class_slabs_are_the_whole_window_bit_for_bit() {
        let (net, engine) = net_and_engine(usize::MAX);
        let input = Tensor::randn([1, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
        let cv = Tensor::from_slice(&[3i64, 1, 14, 7, 22, 9]).view([6, 1]);
        let args = ForwardArgs {
            class_vector: Some(&cv),
            transpose: true,
            ..Default::default()
        };
        let whole = tch::no_grad(|| net.forward(&input, &args)).unwrap();
        // The class head's product per slab of voxels gives the whole product's values bit for bit (unlike
        // chunks of classes, whose matrix products may round differently), so float32 "everything" stays
        // MONAI's.
        for max in [1, 5, 16, 31, 32, 100] {
            let slabs = in_slabs(net, &input, &args, max);
            assert!(slabs.equal(&whole), "slabs of {max} differ");
            let runner = WindowRunner::torch(net, Device::Cpu);
            assert!(in_slabs(&runner, &input, &args, max).equal(&whole));
        }
        // A batch of windows.
        let batch = Tensor::randn([3, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
        let whole = tch::no_grad(|| net.forward(&batch, &args)).unwrap();
        let one = Tensor::from_slice(&[3i64]).view([1, 1]);
        let args_one = ForwardArgs {
            class_vector: Some(&one),
            transpose: true,
            ..Default::default()
        };
        let whole1 = tch::no_grad(|| net.forward(&batch, &args_one)).unwrap();
        let slabs1 = in_slabs(net, &batch, &args_one, 1);
        assert!(slabs1.equal(&whole1), "one class in slabs differs");
        for max in [1, 7] {
            let slabs = in_slabs(net, &batch, &args, max);
            assert!(slabs.equal(&whole), "a batch in slabs of {max} differs");
        }
        // An engine built for the window's shape (TensorRT) makes the window whole.
        let runner = WindowRunner::new(
            net,
            Device::Cpu,
            Method::TrtFp16,
            with_engine(engine, Method::Fp32, Vec::new()),
        );
        let mut calls = 0;
        tch::no_grad(|| {
            runner.forward_window_in_slabs(&input, &args, 4, &mut |s| {
                calls += 1;
                assert_eq!(s.x, 0..32);
                Ok(())
            })
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(runner.report().used, vec![Method::TrtFp16]);

        // An engine that takes slabs (ONNX Runtime) makes them; failing on the second, it hands over to libtorch,
        // which makes that slab and the rest.
        let (net, mut engine) = net_and_engine(usize::MAX);
        engine.slabs = true;
        engine.classify_fail_after = 1;
        let runner = WindowRunner::new(
            net,
            Device::Cpu,
            Method::TrtFp16,
            with_engine(engine, Method::Fp32, Vec::new()),
        );
        let whole = tch::no_grad(|| net.forward(&input, &args)).unwrap();
        let slabs = in_slabs(&runner, &input, &args, 8);
        let diff = (&slabs - &whole).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "diff {diff}");
        let (next, report) = runner.into_parts();
        assert!(next.engine.is_none(), "a failed engine is dropped");
        assert_eq!(report.used, vec![Method::TrtFp16, Method::Fp32]);
        assert_eq!(report.fallbacks.len(), 1);
        assert!(report.fallbacks[0]
            .to_string()
            .contains("simulated class head failure"));
    }

    #[test]
    fn choice_fallbacks_start_the_report() {
        let (net, engine) = net_and_engine(usize::MAX);
        let stale = Fallback::new(
            Method::TrtFp16,
            &EngineError::Stale("built for TensorRT 10.12.0".into()),
        );
        let runner = WindowRunner::new(
            net,
            Device::Cpu,
            Method::Auto,
            with_engine(engine, Method::Fp32, vec![stale.clone()]),
        );
        let report = runner.report();
        assert_eq!(report.requested, Some(Method::Auto));
        assert_eq!(report.fallbacks, vec![stale]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["fallbacks"][0],
            "trt_fp16 stale: built for TensorRT 10.12.0"
        );
    }

    #[test]
    fn point_windows_bypass_the_engine() {
        let (net, engine) = net_and_engine(0);
        let input = Tensor::randn([1, 1, 32, 32, 32], (Kind::Float, Device::Cpu));
        let cv = Tensor::from_slice(&[3i64]).view([1, 1]);
        let pc = Tensor::from_slice(&[5.0f32, 6.0, 7.0]).view([1, 1, 3]);
        let pl = Tensor::from_slice(&[1i64]).view([1, 1]);
        let args = ForwardArgs {
            class_vector: Some(&cv),
            point_coords: Some(&pc),
            point_labels: Some(&pl),
            transpose: true,
            ..Default::default()
        };
        let runner = WindowRunner::new(
            net,
            Device::Cpu,
            Method::TrtFp16,
            with_engine(engine, Method::Fp32, Vec::new()),
        );
        let _ = tch::no_grad(|| runner.forward_window(&input, &args)).unwrap();
        let (next, report) = runner.into_parts();
        assert!(
            next.engine.is_some(),
            "the engine was not called, so it is still healthy"
        );
        assert_eq!(report.used, vec![Method::Fp32]);
        assert!(report.fallbacks.is_empty());
    }
}
