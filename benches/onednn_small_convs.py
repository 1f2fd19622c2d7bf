#!/usr/bin/env python
"""libtorch picks its own im2col convolution (`slow_conv3d`), not oneDNN, for batch-1 3x3x3 convolutions with few
voxels per channel or one input channel; this times both on the shapes of VISTA3D's deepest levels and first layer.
    $VISTA3D_PYTHON benches/onednn_small_convs.py
"""
import torch, time, torch.nn.functional as F
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
