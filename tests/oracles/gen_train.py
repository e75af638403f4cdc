"""torch.optim.AdamW trajectories and transformers' LR schedules, for tests/test_train.cpp."""
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
