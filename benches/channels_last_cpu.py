"""Does libtorch's channels_last_3d memory format speed VISTA3D up on a CPU? (issue 13's CPU speed, fp32)

    $VISTA3D_PYTHON benches/channels_last_cpu.py [WIDTH=24] [THREADS=1]

Times single 3x3x3 convolutions and instance norms in both formats, then the whole MONAI network (seeded random
weights of WIDTH, one 64^3 window, 4 class prompts), and the largest relative logit difference between formats.
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
