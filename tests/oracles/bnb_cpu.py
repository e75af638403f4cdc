"""bitsandbytes' CPU dequantization, made row-safe for the oracles.

bitsandbytes 0.50.2's native CPU kernel for dequantize_4bit (libbitsandbytes_cpu, reached for 2-D and larger
shapes with an even last dimension) indexes the 64-value blocks within each row of the weight: where a row's length
is not a multiple of the blocksize (a 4 x 32 x 96 tensor, a tiny model's [96, 96] projection) it scales values
with the wrong block's absmax. Seen 2026-12-02 on an AVX-512 Xeon (differences up to 1.08 on a [4, 96] bf16
tensor); machines of earlier CI runs gave bitsandbytes' own format. The same kernel on the flat tensor (one row,
blocks in storage order: bitsandbytes' format, what its CUDA kernel and its pure-PyTorch backend compute) is right
on every shape, so the oracles route CPU dequantization through it when a probe shows the difference.

The same version, on CPUs with AVX-512 BF16 (this workplace's since 2026-12), converts a Linear4bit's weight to a
packed layout the first time it runs without gradients in eval mode and then computes through a bf16 gemv kernel
(its own or one fetched from a hub through the `kernels` package): that layout assumes in_features a multiple of
the blocksize (the tiny models' down_proj, 160 inputs, fails with "shape '[64, 2]' is invalid for input of size
160"), and its bf16 arithmetic is not the fp32 reference the tests compare with. The oracles switch that path off
(plain dequantize + matmul, bitsandbytes' own path on other CPUs).

Checked against bitsandbytes 0.50.2 (tests/oracles/requirements.txt); CHECKED_WITH names it, and the functions
below say so when another version is installed."""
import copy
import sys

CHECKED_WITH = "0.50.2"


def _note_version():
    import bitsandbytes
    if bitsandbytes.__version__ != CHECKED_WITH:
        print(f"bnb_cpu: bitsandbytes {bitsandbytes.__version__} is installed; these work-arounds were checked "
              f"against {CHECKED_WITH} (tests/oracles/requirements.txt pins it)", file=sys.stderr)


def plain_cpu_linear4bit():
    """Switches off bitsandbytes' AVX-512 BF16 inference path for Linear4bit (see the module docstring): Linear4bit
    modules made after this call dequantize and multiply in their compute dtype on every CPU."""
    import bitsandbytes.nn.modules as modules
    _note_version()
    modules.has_avx512bf16 = lambda: False


def make_row_safe():
    """Patches bitsandbytes.functional.dequantize_4bit (which Linear4bit, PEFT and our scripts call) to dequantize
    CPU tensors of more than one dimension as the flat tensor, reshaped, if the probe finds the row bug, and
    switches off the AVX-512 BF16 inference path (plain_cpu_linear4bit). Returns True when the dequantization patch
    was applied."""
    import torch
    import bitsandbytes.functional as F

    plain_cpu_linear4bit()
    if getattr(F.dequantize_4bit, "_row_safe", False):
        return True
    original = F.dequantize_4bit

    def flat(A, quant_state):
        qs = copy.copy(quant_state)
        qs.shape = torch.Size([quant_state.shape.numel()])
        return original(A, qs).reshape(quant_state.shape)

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 96, generator=gen).to(torch.bfloat16)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    if torch.equal(original(q, state), flat(q, state)):
        return False

    def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        if quant_state is not None and A.device.type == "cpu" and len(quant_state.shape) > 1 and absmax is None \
                and out is None:
            return flat(A, quant_state)
        kw = {} if blocksize is None else {"blocksize": blocksize}
        return original(A, quant_state, absmax=absmax, out=out, quant_type=quant_type, **kw)

    dequantize_4bit._row_safe = True
    F.dequantize_4bit = dequantize_4bit
    return True
