"""What the preference-pair tests (test_dpo.py, test_cpo.py) share: TRL's metric names, the initial PEFT adapter, and
the comparisons of our metrics and adapters with TRL's."""
import json
import os
import pathlib
import subprocess

import torch
import tiny_lm
from checks import check

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Our metrics.jsonl names -> TRL's logged names.
NAMES = {"loss": "loss", "rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
         "rewards_accuracy": "rewards/accuracies", "rewards_margin": "rewards/margins",
         "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}


def words(rng, lo, hi):
    return " ".join(rng.choice(tiny_lm.WORDS) for _ in range(rng.randint(lo, hi)))


def make_adapter(model, out, base_dir, b_std, use_dora=False):
    """A PEFT LoRA adapter (r 8, alpha 16, all seven projections, dropout 0) with random A and B ~ b_std (0: PEFT's
    B = 0), base_model_name_or_path base_dir; with use_dora, DoRA's magnitudes moved off the rows' norms too."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(7)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                            use_dora=use_dora, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn_like(p) * 0.2)
            elif "lora_B" in n:
                p.copy_(torch.randn_like(p) * b_std)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    peft.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    peft.unload()


def compare_metrics(name, ours, trl, beta):
    """Loss and log-probs to rel 1e-5; rewards (beta x a difference of two log-prob sums) to 1e-5 of beta x the
    log-prob scale; the accuracy exactly."""
    scale = beta * max(abs(trl["logps/chosen"]), abs(trl["logps/rejected"]), 1.0)
    for ok, tk in NAMES.items():
        a, b = ours[ok], trl[tk]
        if tk == "rewards/accuracies":  # TRL's is a float32 mean (0.6000000238)
            good = abs(a - b) <= 1e-6
        elif tk.startswith("rewards/"):
            good = abs(a - b) <= 1e-5 * scale
        else:
            good = abs(a - b) <= 1e-5 * abs(b)
        check(good, f"{name}: {ok} {a:.8g} vs TRL {tk} {b:.8g}")


def compare_adapters(name, ours, trl, init, rel=1e-4):
    """(ours - init) against (trl - init), tensor by tensor: max |difference| <= rel x the largest TRL update of
    the tensor + the fp32 rounding of the stored sums init + update (2 ulps of the tensor's largest value). Two
    PyTorch implementations of the step (TRL's, dpo_trl.torch_dpo_step) agree to ~3e-6 of each tensor's largest
    gradient; what is left of their difference is that rounding."""
    check(set(ours) == set(trl), f"{name}: the adapter has TRL's {len(trl)} tensors ({len(ours)})")
    worst, raw, biggest, bad = 0.0, 0.0, 0.0, []
    for k in sorted(set(ours) & set(trl)):
        d_ours, d_trl = ours[k].float() - init[k], trl[k] - init[k]
        big = d_trl.abs().max().item()
        ulp = torch.finfo(torch.float32).eps * trl[k].abs().max().item()
        diff = (d_ours - d_trl).abs().max().item()
        biggest = max(biggest, big)
        worst = max(worst, max(0.0, diff - 2 * ulp) / big)
        raw = max(raw, diff / big)
        if not diff <= rel * big + 2 * ulp:
            bad.append(f"{k}: differs by {diff:.3g}, TRL's largest update {big:.3g}")
    check(not bad and biggest > 0, f"{name}: every tensor's update is TRL's within {worst:.2e} of its largest "
                                   f"(<= {rel:g}) beyond fp32 rounding ({raw:.2e} with it); largest update "
                                   f"{biggest:.3g}"
                                   + "".join("\n    " + b for b in bad[:6]))


def check_demo(binary, output_dir, sets, says):
    """The DPO demo (configs/demo-dpo.json) on the CPU with `sets` ("key=value" overrides): its held-out exact match
    from none (< 5%) to most (>= half), and `says` in its log."""
    root = pathlib.Path(__file__).resolve().parents[2]
    args = [binary, "--config", "configs/demo-dpo.json", "--set", f"output_dir={output_dir}"]
    for s in [*sets, "model.device=cpu", "logging.progress=lines"]:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "2"})
    summary = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else {}
    check(summary.get("exact_match_before", 1) < 0.05 and summary.get("exact_match_after", 0) >= 0.5
          and says in p.stderr,
          f"the DPO demo's pairs with {', '.join(sets)}: exact match {summary.get('exact_match_before')} -> "
          f"{summary.get('exact_match_after')} (exit {p.returncode}) {p.stderr[-800:] if p.returncode else ''}")


def check_resumed(tag, straight, first, again, root, binary, eval_count):
    """A run resumed from its checkpoint (`first` ran 1 step into root / "r_resumed", `again` resumed it to the end)
    against the straight run (root / "r_straight", its config root / "r_straight.json", held-out data evaluated at
    each of its 3 steps): all complete, the adapters are equal byte for byte, and `qlora-train eval --config` of the
    straight run's adapter on its held-out records (eval.jsonl) gives its last eval_loss (over `eval_count` pairs
    where not None)."""
    ok = all(p.returncode == 0 for p in (straight, first, again))
    check(ok, f"{tag} the straight, first and resumed runs complete ({straight.returncode}, {first.returncode}, "
              f"{again.returncode}): {(again.stderr or first.stderr or straight.stderr)[-1500:]}")
    if not ok:
        return
    a = (root / "r_straight" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (root / "r_resumed" / "adapter" / "adapter_model.safetensors").read_bytes()
    check(a == b, f"{tag} the resumed run's adapter is the straight run's, byte for byte")
    evals = [json.loads(l) for l in (root / "r_straight" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in l]
    check(len(evals) == 3 and all("eval_pairs" in e for e in evals), f"{tag} three held-out evaluations: {evals}")
    p = subprocess.run([str(binary), "eval", "--config", str(root / "r_straight.json"), "--adapter",
                        str(root / "r_straight" / "adapter"), "--data", str(root / "r_straight" / "eval.jsonl")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else {}
    check(evals and abs(out.get("loss", float("nan")) - evals[-1]["eval_loss"]) <= 1e-5 * abs(evals[-1]["eval_loss"])
          and out.get("pairs") == evals[-1]["eval_pairs"] and eval_count in (None, out.get("pairs")),
          f"{tag} `qlora-train eval` of the held-out records gives the run's last eval_loss: {out} vs "
          f"{evals[-1] if evals else None} {p.stderr[-500:]}")
