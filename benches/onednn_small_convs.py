#!/usr/bin/env python
"""libtorch picks its own im2col convolution (`slow_conv3d`), not oneDNN, for batch-1 3x3x3 convolutions with few
voxels per channel or one input channel; this times both on the shapes of VISTA3D's deepest levels and first layer,
then MONAI's whole network (seeded random WIDTH, one 64^3 window, 4 labels, THREADS) with those convolutions sent to
oneDNN: the first layer only, then all of them.
    $VISTA3D_PYTHON benches/onednn_small_convs.py [WIDTH=24] [THREADS=1]
"""
import sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
import monai_reference as mr  # noqa: E402

def t(f, n=10):
    f(); s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n*1000
for th in (1,2):
    torch.set_num_threads(th)
    for (c, o, s, k) in [(192,192,8,3),(384,384,4,3),(1,24,64,3)]:
        x=torch.randn(1,c,s,s,s); w=torch.randn(o,c,k,k,k)*0.01
        a=t(lambda: F.conv3d(x,w,padding=1)); b=t(lambda: torch.mkldnn_convolution(x,w,None,[1,1,1],[1,1,1],[1,1,1],1))
        d=(F.conv3d(x,w,padding=1)-torch.mkldnn_convolution(x,w,None,[1,1,1],[1,1,1],[1,1,1],1)).abs().max().item()
        print(f"threads {th} conv {c}->{o} at {s}^3: aten {a:.2f} ms, oneDNN {b:.2f} ms, x{a/b:.2f}, max diff {d:.1e}")


width = int(sys.argv[1]) if len(sys.argv) > 1 else 24
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
aten_conv3d = F.conv3d


def onednn_for(which):
    """F.conv3d sending libtorch's batch-1 `slow_conv3d` cases (N*C*D*H <= 20480) to oneDNN: "first" or "all"."""
    def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        n, c, d, h = input.shape[:4]
        small = n == 1 and n * c * d * h <= 20480 and groups == 1 and not isinstance(padding, str)
        if not small or (which == "first" and c != 1):
            return aten_conv3d(input, weight, bias, stride, padding, dilation, groups)
        three = lambda v: [v] * 3 if isinstance(v, int) else list(v)
        return torch.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, three(padding), three(stride),
                                        three(dilation), groups)
    return conv3d


def window(net, x, cv, reps=3):
    with torch.no_grad():
        out = net(x, class_vector=cv, transpose=True)
        s = time.perf_counter()
        for _ in range(reps):
            out = net(x, class_vector=cv, transpose=True)
    return (time.perf_counter() - s) / reps, out


net = mr.build_network("random:0", width).eval()
torch.manual_seed(1)
x = torch.randn(1, 1, 64, 64, 64)
cv = torch.tensor([[1], [3], [4], [6]])
for which in ("first", "all"):
    a, ya = window(net, x, cv)
    F.conv3d = torch.nn.modules.conv.F.conv3d = onednn_for(which)
    b, yb = window(net, x, cv)
    F.conv3d = torch.nn.modules.conv.F.conv3d = aten_conv3d
    c, _ = window(net, x, cv)
    rel = ((ya - yb).abs().max() / ya.abs().max()).item()
    print(f"whole network, width {width}, oneDNN for {which}: libtorch {a:.3f} / {c:.3f} s, with oneDNN {b:.3f} s "
          f"(x{(a + c) / 2 / b:.3f}), max rel logit diff {rel:.1e}, bit-identical {torch.equal(ya, yb)}", flush=True)
