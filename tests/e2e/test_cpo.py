"""CPO, SimPO and AlphaPO (train.objective "cpo", data.format "preference") against TRL's CPOTrainer, and ORPO
(train.objective "orpo") against its ORPOTrainer (tests/oracles/cpo_trl.py, trl 1.16.0's trl.experimental.cpo and
.orpo): optimizer steps on a tiny fp32 model on the CPU from a
PEFT adapter with non-zero B (lora.init_from), all the pairs in each step. For each loss type (sigmoid with label
smoothing and the NLL term, hinge, ipo, simpo with and without the NLL term, AlphaPO; ORPO at two betas, its NLL over
the chosen sequences' prompts too): one step's adapter equals
TRL's to 1e-4 of its update (AdamW with a large eps makes the first update close to linear in the gradient, so this
compares the gradients), and after two steps the loss, rewards and log-probs equal TRL's logged metrics to 1e-5 and
the adapter TRL's to 5e-4. The same steps in micro-batches of one pair give the step's loss (the pairs' mean; the NLL
term each micro-batch's token mean, as TRL's per batch, so the sigmoid + NLL case is compared with cpo_alpha 0 there).
`qlora-train eval --config` of a CPO run gives the CPO loss reference-free; the DPO demo's pairs under CPO teach its
task (exact match from none to most); keys out of range are refused by name.

    cd build && QT_BINARY=$PWD/qlora-train python3 ../tests/e2e/test_cpo.py [--oracle-only]"""
import json, math, os, pathlib, random, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
from safetensors.torch import load_file
import tiny_lm
import cpo_trl
from checks import check, finish
from pair_checks import NAMES, TARGETS, check_demo, compare_adapters, compare_metrics, make_adapter, words

ORACLE_ONLY = "--oracle-only" in sys.argv
BIN = None if ORACLE_ONLY else os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_cpo_"))
EPS, LR = 1.0, 0.5  # AdamW's first update -LR g / (|g| + EPS): near-linear in g (as tests/e2e/test_dpo.py)
# TRL's CPOConfig names; each case two steps (and one, for the gradient).
CASES = {"sigmoid": dict(loss_type="sigmoid", beta=0.3, label_smoothing=0.2, cpo_alpha=0.5),
         "hinge": dict(loss_type="hinge", beta=0.05, cpo_alpha=1.0),
         "ipo": dict(loss_type="ipo", beta=0.5, cpo_alpha=0.0),
         "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.8, cpo_alpha=0.0),
         "cpo_simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0),
         "alphapo": dict(loss_type="alphapo", beta=2.0, simpo_gamma=0.5, alpha=0.25),
         # ORPO (train.objective "orpo", its section's beta alone)
         "orpo": dict(objective="orpo", beta=0.1), "orpo_strong": dict(objective="orpo", beta=2.0)}


def make_pairs(seed=23):
    """8 pairs of short texts (completions starting with a space: the prompt's tokens a prefix of both sequences'),
    and one whose prompt ends with a space (its last token merges with both completions alike)."""
    rng = random.Random(seed)
    pairs = [{"prompt": words(rng, 3, 8), "chosen": " " + words(rng, 2, 6) + rng.choice([".", "!"]),
              "rejected": " " + words(rng, 2, 7) + rng.choice([".", "?"])} for _ in range(8)]
    pairs.insert(4, {"prompt": "what is two and two? ", "chosen": "four!", "rejected": "five or six."})
    return pairs


def write_config(name, train_file, cpo, train=None, data=None, optim=None, objective="cpo"):
    cfg = {"output_dir": str(TMP / name),
           "model": {"path": str(TMP / "model"), "quant": "none", "device": "cpu", "dtype": "fp32"},
           "lora": {"r": 8, "alpha": 16, "targets": TARGETS, "dropout": 0.0, "init_from": str(TMP / "init")},
           "data": {"train_file": str(train_file), "format": "preference", "max_seq_len": 256, "packing": True,
                    **(data or {})},
           "train": {"objective": objective, "steps": 2, "batch_size": 9, "micro_batch_size": 9, "seed": 3,
                     "log_every": 1, **(train or {})},
           objective: cpo,
           "optim": {"lr": LR, "eps": EPS, "weight_decay": 0, "warmup_steps": 0, "schedule": "constant",
                     "max_grad_norm": 0, **(optim or {})},
           "checkpoint": {"every": 0}, "logging": {"progress": "lines"}}
    path = TMP / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_ours(name, *args, **kw):
    """Trains; (metrics of the last step, adapter tensors), or None after a failed check."""
    p = run("--config", write_config(name, *args, **kw))
    if p.returncode != 0:
        check(False, f"{name}: qlora-train exited {p.returncode}: {p.stderr[-2000:]}")
        return None
    steps = json.loads((TMP / f"{name}.json").read_text())["train"]["steps"]
    lines = [json.loads(l) for l in (TMP / name / "metrics.jsonl").read_text().splitlines()]
    m = next((j for j in lines if j.get("step") == steps and "rewards_chosen" in j), None)
    adapter = TMP / name / "adapter" / "adapter_model.safetensors"
    check(m is not None and adapter.exists(), f"{name}: metrics.jsonl has step {steps}'s CPO metrics and the adapter")
    return (m, load_file(str(adapter))) if m is not None and adapter.exists() else None


def trl_step(name, pairs, steps, **kw):
    if kw.pop("objective", "cpo") == "orpo":
        return cpo_trl.trl_orpo_step(TMP / "model", TMP / "init", pairs, TMP / f"trl_{name}", lr=LR, eps=EPS,
                                     max_length=256, steps=steps, **kw)
    return cpo_trl.trl_cpo_step(TMP / "model", TMP / "init", pairs, TMP / f"trl_{name}", lr=LR, eps=EPS,
                                max_length=256, steps=steps, **kw)


def main():
    model, sp = tiny_lm.make_model_dir(TMP / "model", seed=5)
    pairs = make_pairs()
    data = TMP / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    make_adapter(model, TMP / "init", TMP / "model", b_std=0.5)
    init = load_file(str(TMP / "init" / "adapter_model.safetensors"))
    trl2 = {k: trl_step(k, pairs, 2, **v) for k, v in CASES.items()}
    trl1 = {k: trl_step(f"{k}1", pairs, 1, **v) for k, v in CASES.items()}
    for k, r in trl2.items():
        print(f"oracle ({k}): " + ", ".join(f"{n} {v:.7g}" for n, v in r["metrics"].items()))

    # The oracle: TRL's ids are [BOS] + sentencepiece's of prompt + completion, + EOS, one split point a pair (ours);
    # its first logged metrics are the plain forward pass's; the losses are not at a kink or a tie.
    for i, (q, pair) in enumerate(zip(trl2["sigmoid"]["pairs"], pairs)):
        whole = {x: sp.encode(pair["prompt"] + pair[x]) for x in ("chosen", "rejected")}
        check(q["chosen_prompt_ids"] == q["rejected_prompt_ids"]
              and q["chosen_prompt_ids"] + q["chosen_ids"] == [sp.bos_id()] + whole["chosen"] + [sp.eos_id()]
              and q["rejected_prompt_ids"] + q["rejected_ids"] == [sp.bos_id()] + whole["rejected"] + [sp.eos_id()],
              f"oracle: pair {i}: TRL's ids are [BOS] + sentencepiece's + [EOS], one prompt for both")
    for k, r in trl2.items():
        bad = {n: (v, r["independent"][n]) for n, v in r["first_metrics"].items()
               if abs(v - r["independent"][n]) > 1e-5 * max(1.0, abs(v))}
        check(not bad, f"oracle ({k}): TRL's first logged metrics equal the plain forward pass's (differ: {bad})")
    acc = {k: r["first_metrics"]["rewards/accuracies"] for k, r in trl2.items()}
    check(all(0 < a < 1 for a in acc.values()), f"oracle: the pairs' rewards are not all one way ({acc})")
    if ORACLE_ONLY:
        finish("CPO and ORPO oracle checks")
        return

    for k, v in CASES.items():
        cpo = {n: x for n, x in v.items() if n != "objective"}
        objective = v.get("objective", "cpo")
        got = run_ours(f"{k}1", data, cpo, train={"steps": 1}, objective=objective)
        if got:
            compare_adapters(f"({k}) one step", got[1], load_file(str(TMP / f"trl_{k}1" / "adapter_model.safetensors")),
                             init)
        got = run_ours(k, data, cpo, objective=objective)
        if got:
            compare_metrics(f"({k}) two steps", got[0], trl2[k]["metrics"], v["beta"])
            compare_adapters(f"({k}) two steps", got[1], load_file(str(TMP / f"trl_{k}" / "adapter_model.safetensors")),
                             init, rel=5e-4)
    # Micro-batches of one pair: the step's loss is the pairs' mean (without the NLL term, a micro-batch's mean).
    got = run_ours("simpo_micro", data, CASES["simpo"], train={"micro_batch_size": 1})
    if got:
        compare_metrics("(simpo) micro-batches of 1", got[0], trl2["simpo"]["metrics"], CASES["simpo"]["beta"])
        compare_adapters("(simpo) micro-batches of 1", got[1],
                         load_file(str(TMP / "trl_simpo" / "adapter_model.safetensors")), init, rel=5e-4)

    # eval --config of a CPO run: the CPO loss of the pairs, reference-free, each pair alone (simpo without the NLL
    # term: the mean of the pairs' losses, the first step's loss at the initial adapter).
    p = run("eval", "--config", TMP / "simpo.json", "--adapter", TMP / "init", "--data", data)
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else {}
    want = trl2["simpo"]["first_metrics"]["loss"]
    check(out.get("objective") == "cpo" and abs(out.get("loss", float("nan")) - want) <= 1e-5 * abs(want)
          and out.get("pairs") == len(pairs) and "reference-free" in p.stderr,
          f"eval --config of a CPO run gives TRL's first-step loss {want:.7g}: {out} (exit {p.returncode}) "
          f"{p.stderr[-400:] if p.returncode else ''}")
    p = run("eval", "--config", TMP / "simpo.json", "--adapter", TMP / "init", "--data", data, "--reference-adapter",
            TMP / "init")
    check(p.returncode != 0 and "--reference-adapter" in p.stderr,
          f"eval: --reference-adapter with a CPO config is refused naming it (exit {p.returncode})")

    # The DPO demo's pairs (configs/demo-dpo.json) under CPO's defaults (sigmoid + the chosen answers' NLL) teach its
    # task: held-out exact match from none to most.
    check_demo(BIN, TMP / "demo", ["train.objective=cpo"], "CPO (sigmoid + 1 x NLL)")

    # ORPO in micro-batches of one pair: the NLL term each micro-batch's token mean, so not TRL's batch mean; the odds
    # ratio term alone (beta large against it) is compared through the metrics, which it does not change.
    got = run_ours("orpo_micro", data, {"beta": 2.0}, train={"micro_batch_size": 1, "steps": 1}, objective="orpo")
    if got:
        m, trl = got[0], trl1["orpo_strong"]["metrics"]
        check(all(abs(m[o] - trl[t]) <= 1e-5 * max(1.0, abs(trl[t])) for o, t in NAMES.items() if o != "loss"),
              f"(orpo) micro-batches of 1: the first step's rewards and log-probs are TRL's")
    p = run("eval", "--config", TMP / "orpo.json", "--adapter", TMP / "init", "--data", data)
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else {}
    want = trl2["orpo"]["first_metrics"]["rewards/margins"]
    check(out.get("objective") == "orpo" and abs(out.get("rewards_margin", 0) - want) <= 1e-5 * max(1.0, abs(want)),
          f"eval --config of an ORPO run: its rewards are TRL's first step's: {out} (exit {p.returncode})")

    # Bad keys are refused by name before anything loads.
    for bad, key in (({"loss_type": "robust"}, "cpo.loss_type"), ({"beta": 0}, "cpo.beta"),
                     ({"loss_type": "hinge", "label_smoothing": 0.1}, "cpo.label_smoothing"),
                     ({"loss_type": "alphapo", "cpo_alpha": 1.0}, "cpo.cpo_alpha"), ({"gamma": 1}, "cpo.gamma"),
                     ({"cpo_alpha": -1}, "cpo.cpo_alpha")):
        p = run("--config", write_config("bad", data, bad))
        check(p.returncode == 3 and key in p.stderr,
              f"cpo {bad} is refused naming {key} (exit {p.returncode}): "
              f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    for bad, key in (({"beta": -1}, "orpo.beta"), ({"loss_type": "sigmoid"}, "orpo.loss_type")):
        p = run("--config", write_config("bad", data, bad, objective="orpo"))
        check(p.returncode == 3 and key in p.stderr,
              f"cpo {bad} is refused naming {key} (exit {p.returncode}): "
              f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    finish("CPO and ORPO checks")


if __name__ == "__main__":
    main()
