"""torch.optim.AdamW and bitsandbytes' AdamW8bit trajectories and transformers' LR schedules, for
tests/test_train.cpp."""
import json, pathlib
import torch
from safetensors.torch import save_file
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup, get_wsd_schedule)

def generate(out: pathlib.Path):
    d = out / "train"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    p0 = torch.randn(5, 7)
    grads = [torch.randn(5, 7) for _ in range(4)]
    p = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([p], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    t = {"p0": p0}
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        t[f"grad{i}"] = g
        t[f"p{i + 1}"] = p.detach().clone()
    st = opt.state[p]
    t["exp_avg"], t["exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
    save_file(t, str(d / "adamw.safetensors"))
    adamw_8bit(d)

    sched = {}
    for name, make in [("constant", lambda o: get_constant_schedule_with_warmup(o, 3)),
                       ("linear", lambda o: get_linear_schedule_with_warmup(o, 3, 20)),
                       ("cosine", lambda o: get_cosine_schedule_with_warmup(o, 3, 20)),
                       # warmup, stable, decay: 3 warmup steps, 5 decaying at the end of 20, each decay shape, and
                       # cosine to a floor of 0.1 (where the warmup starts too)
                       ("wsd_cosine", lambda o: get_wsd_schedule(o, 3, 5, num_training_steps=20)),
                       ("wsd_linear", lambda o: get_wsd_schedule(o, 3, 5, num_training_steps=20, decay_type="linear")),
                       ("wsd_1-sqrt", lambda o: get_wsd_schedule(o, 3, 5, num_training_steps=20, decay_type="1-sqrt")),
                       ("wsd_cosine_min", lambda o: get_wsd_schedule(o, 3, 5, num_training_steps=20,
                                                                     min_lr_ratio=0.1))]:
        o = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
        s = make(o)
        lrs = []
        for _ in range(20):
            lrs.append(o.param_groups[0]["lr"])
            o.step(); s.step()
        sched[name] = lrs
    (d / "schedules.json").write_text(json.dumps(sched))


def adamw_8bit(d: pathlib.Path):
    """bitsandbytes.optim.AdamW8bit on the CPU: a tensor of 37 x 300 elements (8-bit moments in 44 blocks of 256, the
    last one short) and one of 5 x 7 (under min_8bit_size: fp32 moments), four steps of gradients whose rows span a
    decade of magnitude; the parameters after each step, the final 8-bit state and the two quantization maps.
    (bitsandbytes 0.50's CPU quantizer picks codes through a 65,536-entry table, not the exact nearest value.)"""
    import bitsandbytes as bnb
    torch.manual_seed(11)
    big0, small0 = torch.randn(37, 300), torch.randn(5, 7)
    scale = 10.0 ** torch.empty(37, 1).uniform_(-1, 0)
    big, small = big0.clone().requires_grad_(), small0.clone().requires_grad_()
    opt = bnb.optim.AdamW8bit([big, small], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    t = {"big0": big0, "small0": small0}
    for i in range(4):
        gb, gs = torch.randn(37, 300) * scale, torch.randn(5, 7)
        big.grad, small.grad = gb.clone(), gs.clone()
        opt.step()
        t[f"big_grad{i}"], t[f"small_grad{i}"] = gb, gs
        t[f"big{i + 1}"], t[f"small{i + 1}"] = big.detach().clone(), small.detach().clone()
    st = opt.state[big]
    assert st["state1"].dtype == torch.uint8 and st["absmax1"].numel() == 44, "AdamW8bit kept 8-bit state"
    assert opt.state[small]["state1"].dtype == torch.float32, "AdamW8bit kept fp32 state for the small tensor"
    t.update({"state1": st["state1"], "absmax1": st["absmax1"], "state2": st["state2"], "absmax2": st["absmax2"],
              "qmap1": st["qmap1"], "qmap2": st["qmap2"]})
    # bitsandbytes' CPU update written out below with its table quantizer reproduces its trajectory; the same update
    # with each code the nearest value is the trajectory of the algorithm both implement, which the C++ test holds
    # our 8-bit AdamW to tightly (bitsandbytes' own, looser: its table is coarser than the map for small values).
    grads = [t[f"big_grad{i}"] for i in range(4)]
    lut = emulate_adamw_8bit(big0, grads, st["qmap1"], st["qmap2"], quantize_by_table)
    for i in range(4):
        diff = (lut[i] - t[f"big{i + 1}"]).abs().max().item()
        assert diff <= 1e-6 * t[f"big{i + 1}"].abs().max().item(), f"the emulation is not bitsandbytes' (step {i + 1}: {diff})"
    for i, p in enumerate(emulate_adamw_8bit(big0, grads, st["qmap1"], st["qmap2"], quantize_nearest)):
        t[f"big_nearest{i + 1}"] = p
    save_file(t, str(d / "adamw_8bit.safetensors"))


def quantize_by_table(x, code):
    """bitsandbytes 0.50's CPU quantize_blockwise (csrc/cpu_ops.cpp): x * (1 / absmax) looked up in a table of 65,536
    bins over [-1, 1], each bin the code whose midpoints enclose the bin's left edge; fp32 arithmetic throughout."""
    import numpy as np
    c = code.numpy().astype(np.float32)
    mids = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
    vals = (np.float32(-1.0) + (np.float32(2.0) * np.arange(65536, dtype=np.float32)) / np.float32(65535)).astype(np.float32)
    table = np.searchsorted(mids, vals, side="left").astype(np.uint8)  # midpoints below each bin's value
    blocks = x.reshape(-1, 256).numpy().astype(np.float32)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    inv = np.where(absmax == 0, np.float32(0), np.float32(1.0) / np.where(absmax == 0, np.float32(1), absmax))
    y = np.clip(blocks * inv[:, None].astype(np.float32), np.float32(-1), np.float32(1)).astype(np.float32)
    idx = ((y + np.float32(1.0)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)).astype(np.float32)
    codes = table[idx.astype(np.uint16)]
    codes[absmax == 0] = 0
    return torch.from_numpy(codes.reshape(-1).copy()), torch.from_numpy(absmax)


def quantize_nearest(x, code):
    """Each element the nearest value of the map after division by its block's absmax, the lower code on a tie."""
    blocks = x.reshape(-1, 256)
    absmax = blocks.abs().amax(1)
    y = (blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[:, None]).reshape(-1, 1)
    codes = (code[None, :] - y).abs().argmin(1).reshape(-1, 256)
    codes[absmax == 0] = 0
    return codes.reshape(-1).to(torch.uint8), absmax


def emulate_adamw_8bit(p0, grads, code1, code2, quantize, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1):
    """bitsandbytes' _optimizer_update_8bit_blockwise_cpu (adam, 0.50) op for op, over blocks of 256 (zero-padded)."""
    import math
    n = p0.numel()
    pad = (-n) % 256
    p = p0.reshape(-1).clone()
    s1, a1 = torch.zeros(n + pad, dtype=torch.uint8), torch.zeros((n + pad) // 256)
    s2, a2 = s1.clone(), a1.clone()
    out = []
    for step, g in enumerate(grads, 1):
        m = (code1[s1.long()].reshape(-1, 256) * a1[:, None]).reshape(-1)[:n]
        v = (code2[s2.long()].reshape(-1, 256) * a2[:, None]).reshape(-1)[:n]
        grad = g.reshape(-1).float()
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        c1, c2 = 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)
        denom = (v.sqrt() / c2).add_(eps)
        p.mul_(1.0 - lr * wd)
        p.addcdiv_(m, denom, value=-lr / c1)
        s1, a1 = quantize(torch.nn.functional.pad(m, (0, pad)), code1)
        s2, a2 = quantize(torch.nn.functional.pad(v, (0, pad)), code2)
        out.append(p.reshape(p0.shape).clone())
    return out
