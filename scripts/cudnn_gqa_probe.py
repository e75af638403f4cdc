#!/usr/bin/env python3
# Probe (GPU machine): cuDNN attention with grouped K/V passed as they are against K/V expanded to every query head,
# forward and backward, over rows, head counts and head_dims; prints relative differences, BAD above 2e-2.
#   python3 scripts/cudnn_gqa_probe.py

import torch, itertools
torch.manual_seed(0)
dev = "cuda"
def run(B, S, Hq, Hkv, D, native, layout_bshd=True):
    g = torch.Generator(device=dev).manual_seed(1)
    mk = lambda H: (torch.randn(B, S, H, D, device=dev, generator=g, dtype=torch.bfloat16)).transpose(1, 2)
    q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
    do = torch.randn(B, S, Hq, D, device=dev, generator=g, dtype=torch.bfloat16).transpose(1, 2)
    grp = Hq // Hkv
    ke = k if native else k.repeat_interleave(grp, 1)
    ve = v if native else v.repeat_interleave(grp, 1)
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, ke, ve, None, True, 0.0, True, False, scale=D ** -0.5)
    out, lse, cq, ck, mq, mk_, seed, off = r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(do, q, ke, ve, out, lse, seed, off, None, cq, ck, S, S, 0.0, True, scale=D ** -0.5)
    if not native:
        dk = dk.reshape(B, Hkv, grp, S, D).sum(2); dv = dv.reshape(B, Hkv, grp, S, D).sum(2)
    return out.float(), dq.float(), dk.float(), dv.float()
def rel(a, b): return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
print("B S Hq Hkv D | out dq dk dv (native vs expanded)")
for B, S, (Hq, Hkv), D in itertools.product([1, 2], [40, 64, 100, 128, 192, 256, 320, 1000, 1024, 2048],
                                             [(32, 8), (4, 2), (8, 2)], [16, 32, 64, 128]):
    try:
        a = run(B, S, Hq, Hkv, D, True); b = run(B, S, Hq, Hkv, D, False)
        errs = [rel(x, y) for x, y in zip(a, b)]
        flag = "BAD" if max(errs) > 2e-2 else "ok"
        print(B, S, Hq, Hkv, D, "|", " ".join(f"{e:.1e}" for e in errs), flag)
    except Exception as e:
        print(B, S, Hq, Hkv, D, "| error", str(e)[:100])
