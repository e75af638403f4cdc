"""DoRA on one linear with a bias, as PEFT computes it (CPU, fp32), in training with LoRA dropout and in eval.

PEFT's DoRA forward differs between the two (peft.tuners.lora.variants.DoraLinearVariant.forward): with dropout
active the DoRA term reads dropout(x) W^T and the LoRA branch dropout(x); without, it rescales the base result less
its bias. Dropout draws its mask from the default CPU generator (at::dropout, the same ATen function in torch and
LibTorch), so seeding both with the same value gives the same mask and the outputs can be compared exactly.

<out>/dora/linear.safetensors
    proj.weight*          the base weight quantized by bitsandbytes (nf4, blocksize 64, double quant), as
                          transformers saves a Linear4bit (QuantState.as_dict(packed=True) under 'proj.weight.')
    dense_weight          bitsandbytes' dequantized values of it: the weight PEFT computes with
    bias, lora_A, lora_B, magnitude, x, grad_out
    seed                  the torch.manual_seed value set just before each forward
    scale, dropout        PEFT's scaling and lora_dropout
    <mode>.y, <mode>.grad.{x, lora_A, lora_B, magnitude}   for mode in train, eval: y = model(x), backward(grad_out)
"""
import pathlib

import torch
from safetensors.torch import save_file

IN, OUT, R, ALPHA, DROPOUT, SEED = 128, 40, 4, 12, 0.25, 1234


class One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT, bias=True)

    def forward(self, x):
        return self.proj(x)


def generate(out: pathlib.Path):
    import bitsandbytes.functional as F
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(77)
    root = out / "dora"
    root.mkdir(parents=True, exist_ok=True)
    module = One().float()
    w = torch.randn(OUT, IN) * 0.1
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    dense = F.dequantize_4bit(q, state).float()
    with torch.no_grad():
        module.proj.weight.copy_(dense)
        module.proj.bias.copy_(torch.randn(OUT) * 0.1)
    model = get_peft_model(module, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["proj"],
                                              use_dora=True))
    layer = model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        A.copy_(torch.randn_like(A) * 0.2)
        B.copy_(torch.randn_like(B) * 0.1)
        m.mul_(1 + 0.2 * torch.randn_like(m))
    x = torch.randn(3, 5, IN)
    grad_out = torch.randn(3, 5, OUT)
    ref = {"proj.weight": q, "dense_weight": dense, "bias": module.proj.bias.detach().clone(),
           "lora_A": A.detach().clone(), "lora_B": B.detach().clone(), "magnitude": m.detach().clone(), "x": x,
           "grad_out": grad_out, "seed": torch.tensor([SEED]), "scale": torch.tensor([layer.scaling["default"]]),
           "dropout": torch.tensor([DROPOUT])}
    for k, v in state.as_dict(packed=True).items():
        ref["proj.weight." + k] = v
    for mode in ("train", "eval"):
        model.train(mode == "train")
        for p in (A, B, m):
            p.grad = None
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(SEED)
        y = model(xx)
        y.backward(grad_out)
        ref[mode + ".y"] = y.detach()
        ref[mode + ".grad.x"] = xx.grad.detach()
        for name, p in (("lora_A", A), ("lora_B", B), ("magnitude", m)):
            ref[mode + ".grad." + name] = p.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(root / "linear.safetensors"))
