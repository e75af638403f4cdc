"""NF4 oracles from bitsandbytes (CPU): random weights, bitsandbytes' quantize_4bit(blocksize, quant_type='nf4',
compress_statistics=True) state serialized exactly as transformers saves a Linear4bit
(QuantState.as_dict(packed=True) under '<prefix>.weight.'), and bitsandbytes' dequantize_4bit output.

One caveat, found while writing these oracles (bitsandbytes 0.50.2): on the CPU, the nested 8-bit pass
(quantize_blockwise of absmax - offset) runs the native libbitsandbytes_cpu kernel, whose binary search
(BinSearch Direct2) is not exactly nearest-code: it even maps some code values to a neighbour. bitsandbytes'
CUDA kernel and its pure-PyTorch reference backend (backends/default/ops.py) both take the nearest code.
We follow the latter; the oracle stores both, 'ref_absmax_q' computed here with the reference backend's ops.
"""
import pathlib

import torch
from safetensors.torch import save_file

CASES = [  # name, shape, dtype, blocksize
    ("f32_64x64", (64, 64), torch.float32, 64),
    ("f32_128x320", (128, 320), torch.float32, 64),   # 640 blocks: the last nested group is partial
    ("f32_256x1024", (256, 1024), torch.float32, 64),  # 4096 blocks: whole nested groups
    ("bf16_64x64", (64, 64), torch.bfloat16, 64),
    ("bf16_128x320", (128, 320), torch.bfloat16, 64),
    ("bf16_256x1024", (256, 1024), torch.bfloat16, 64),
    ("bf16_1000x64", (1000, 64), torch.bfloat16, 64),  # 1000 blocks
    ("f16_96x192", (96, 192), torch.float16, 64),
    ("bf16_3d_4x32x96", (4, 32, 96), torch.bfloat16, 64),
    ("bf16_256x512_bs256", (256, 512), torch.bfloat16, 256),
    # numel not a multiple of the blocksize: bitsandbytes quantizes the flat tensor with a short last block.
    ("bf16_80x203", (80, 203), torch.bfloat16, 64),     # 16240 elements: 254 blocks, the last of 48
    ("f32_7x45", (7, 45), torch.float32, 64),           # 315: odd, a padding nibble in the last byte
    ("bf16_300x77", (300, 77), torch.bfloat16, 64),     # 361 blocks: short last block, short last nested group
    ("f16_3x70", (3, 70), torch.float16, 64),           # 210: even last dimension (the native CPU kernel)
    ("bf16_100x203_bs256", (100, 203), torch.bfloat16, 256),
]
PREFIX = "layer"


def reference_blockwise(a, code, blocksize):
    """bitsandbytes/backends/default/ops.py quantize_blockwise ('default' kernel), verbatim in effect."""
    a = a.reshape(-1).float()
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    com = a[:full].reshape(full // blocksize, blocksize)
    absmax = com.abs().max(dim=-1)[0]
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def generate(out_dir: pathlib.Path):
    import bitsandbytes.functional as F

    out = out_dir / "nf4"
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    for name, shape, dtype, blocksize in CASES:
        w = torch.randn(shape, generator=gen) * 0.02
        # A few outliers per tensor, as trained LLaMA weights have, so block scales differ widely.
        flat = w.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=gen)
        flat[idx] *= 20
        w = w.to(dtype)
        q, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        tensors = {f"{PREFIX}.weight": q}
        for k, v in state.as_dict(packed=True).items():
            tensors[f"{PREFIX}.weight.{k}"] = v
        deq = F.dequantize_4bit(q, state)
        # bitsandbytes' reference backend for the nested pass (see module docstring).
        absmax = reference_blockwise(w, F.get_4bit_type("nf4", device="cpu"), blocksize)[1]
        offset = absmax.mean()
        assert offset.item() == state.offset.item()
        ref_q, ref_absmax2 = reference_blockwise(absmax - offset, state.state2.code, 256)
        assert torch.equal(ref_absmax2, state.state2.absmax)
        tensors["input"] = w
        tensors["dequant"] = deq
        tensors["ref_absmax_q"] = ref_q
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
    (out / "cases.txt").write_text("".join(f"{c[0]}\n" for c in CASES))
