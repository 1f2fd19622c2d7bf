"""Does libtorch's channels_last_3d memory format speed VISTA3D up on a CPU? (issue 13's CPU speed, fp32)

    $VISTA3D_PYTHON benches/channels_last_cpu.py [WIDTH=24] [THREADS=1]

Times single 3x3x3 convolutions and instance norms in both formats, then the whole MONAI network (seeded random
weights of WIDTH, one 64^3 window, 4 class prompts), and the largest relative logit difference between formats;
last, the whole network in channels_last_3d with an instance norm of its own that keeps that format.
"""
import sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
import monai_reference as mr  # noqa: E402

width = int(sys.argv[1]) if len(sys.argv) > 1 else 24
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
CL = torch.channels_last_3d


def timed(f, reps=3):
    with torch.no_grad():
        out = f()
        t = time.perf_counter()
        for _ in range(reps):
            out = f()
    return (time.perf_counter() - t) / reps, out


for c, s in [(8, 128), (24, 64), (48, 64), (96, 32)]:
    torch.manual_seed(0)
    x = torch.randn(1, c, s, s, s)
    conv = torch.nn.Conv3d(c, c, 3, padding=1, bias=False).eval()
    a, ya = timed(lambda: conv(x))
    conv_cl = torch.nn.Conv3d(c, c, 3, padding=1, bias=False).eval()
    conv_cl.load_state_dict(conv.state_dict())
    conv_cl = conv_cl.to(memory_format=CL)
    x_cl = x.to(memory_format=CL)
    b, yb = timed(lambda: conv_cl(x_cl))
    rel = ((ya - yb).abs().max() / ya.abs().max()).item()
    norm = torch.nn.InstanceNorm3d(c)
    n_a, _ = timed(lambda: norm(x))
    n_b, _ = timed(lambda: norm(x_cl))
    print(f"{c} channels at {s}^3: conv {a * 1e3:.0f} -> {b * 1e3:.0f} ms (x{a / b:.2f}, rel diff {rel:.1e}); "
          f"instance norm {n_a * 1e3:.0f} -> {n_b * 1e3:.0f} ms (x{n_a / n_b:.2f})", flush=True)

net = mr.build_network("random:0", width).eval()
torch.manual_seed(1)
x = torch.randn(1, 1, 64, 64, 64)
cv = torch.tensor([[1], [3], [4], [6]])
a, ya = timed(lambda: net(x, class_vector=cv, transpose=True), reps=2)
net = net.to(memory_format=CL)
x_cl = x.to(memory_format=CL)
b, yb = timed(lambda: net(x_cl, class_vector=cv, transpose=True), reps=2)
rel = ((ya - yb).abs().max() / ya.abs().max()).item()
print(f"whole network, width {width}, 64^3, 4 labels: {a:.2f} -> {b:.2f} s (x{a / b:.2f}), rel diff {rel:.1e}")


aten_instance_norm = torch.nn.functional.instance_norm


def channels_last_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                                use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm of a channels_last_3d tensor computed as [N, DHW, C] (libtorch's own makes it contiguous)."""
    if input.is_contiguous() or not input.is_contiguous(memory_format=CL):
        return aten_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    n, c = input.shape[:2]
    flat = input.permute(0, 2, 3, 4, 1).reshape(n, -1, c)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + eps) * (1 if weight is None else weight)
    shift = -mean * scale + (0 if bias is None else bias)
    return (flat * scale + shift).reshape(n, *input.shape[2:], c).permute(0, 4, 1, 2, 3)


torch.nn.functional.instance_norm = torch.nn.modules.instancenorm.F.instance_norm = channels_last_instance_norm
for c, s in [(24, 64), (48, 64)]:
    x_norm = torch.randn(1, c, s, s, s).to(memory_format=CL)
    n_a, _ = timed(lambda: aten_instance_norm(x_norm))
    n_b, _ = timed(lambda: channels_last_instance_norm(x_norm))
    print(f"instance norm, {c} channels at {s}^3, channels_last_3d: libtorch {n_a * 1e3:.0f} ms, own {n_b * 1e3:.0f} ms")
c_, yc = timed(lambda: net(x_cl, class_vector=cv, transpose=True), reps=2)
rel = ((ya - yc).abs().max() / ya.abs().max()).item()
print(f"whole network, channels_last_3d with its own instance norm: {a:.2f} -> {c_:.2f} s (x{a / c_:.2f}), "
      f"rel diff {rel:.1e}")
