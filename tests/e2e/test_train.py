"""The training binary end to end on a tiny NF4 model (CPU): reproducible for a seed, micro-batch accumulation
equal to one batch, exact resume after kill -9 (also in the middle of a checkpoint save), refusal of a config
change that matters, and the files a user takes away; DoRA training and its resume."""
import json, os, pathlib, shutil, signal, subprocess, sys, tempfile, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, save_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_train_"))

def write_config(name, **over):
    cfg = {"output_dir": str(TMP / name), "model": {"path": str(TMP / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8},
           "data": {"train_file": str(TMP / "train.jsonl"), "format": "text", "max_seq_len": 32, "packing": True},
           "train": {"steps": 6, "batch_size": 4, "seed": 3, "log_every": 1},
           "optim": {"lr": 2e-3, "warmup_steps": 1},
           "checkpoint": {"every": 3, "keep_last": 3}, "logging": {"progress": "lines"}}
    return save_config(TMP, name, cfg, over)

def train(config, *extra, env=None, check_rc=True):
    p = subprocess.run([BIN, "--config", str(config), *extra], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check_rc and p.returncode != 0:
        sys.exit(f"training {config} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p

def losses(name):
    out = {}
    for line in (TMP / name / "metrics.jsonl").read_text().splitlines():
        j = json.loads(line)
        if "loss" in j:
            out[j["step"]] = j["loss"]  # a resumed run rewrites the steps after its checkpoint: keep the last
    return out

def adapter_bytes(name):
    return (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()

def start_and_kill(config, marker, env):
    """Starts training, kills it with SIGKILL as soon as `marker` exists."""
    p = subprocess.Popen([BIN, "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    t0 = time.time()
    while not marker() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return p

def eval_losses(name):
    return {j["step"]: j["eval_loss"] for j in map(json.loads, (TMP / name / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in j}

def check_best_adapter():
    """checkpoint.save_best: after each evaluation with the lowest held-out loss so far, the adapter in best_adapter
    with best.json (step, eval_loss); `eval` of it on the run's held-out records gives that loss. A run that fails
    at step 7 (its loss not finite) after its checkpoint at step 4 and is resumed ends with the straight run's
    best_adapter byte for byte (a best adapter written after the resume point is removed, then written anew). Without
    held-out data or train.eval_every it is refused naming the key."""
    # (a constant learning rate this high moves the held-out loss up and down. Its rows packed in order: packed best
    # fit, step 8 meets a gradient-norm spike, 14 against 0.1-0.5, which magnifies the two sharded ranks' float
    # differences from the single process's to 4e-5 of the held-out loss, past the 1e-5 compared below)
    best = dict(data__eval_fraction=0.25, train__eval_every=1, train__steps=8, checkpoint__every=4,
                checkpoint__save_best=True, optim__lr=0.05, optim__schedule="constant",
                data__packing_strategy="in_order")
    p = train(write_config("best", **best))
    ev = eval_losses("best")
    step = min(ev, key=lambda k: (ev[k], k))  # the first of the lowest: a later equal loss is no better
    meta = json.loads((TMP / "best" / "best_adapter" / "best.json").read_text())
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    check(len(ev) == 8 and meta == {"step": step, "eval_loss": ev[step]} and summary["best"]["step"] == step and
          summary["best"]["dir"].endswith("best_adapter"),
          f"best_adapter is the lowest held-out loss's: best.json {meta}, eval losses {ev}, summary {summary.get('best')}")
    final = (TMP / "best" / "adapter" / "adapter_model.safetensors").read_bytes()
    kept = (TMP / "best" / "best_adapter" / "adapter_model.safetensors").read_bytes()
    check((kept == final) == (step == 8), f"best_adapter (step {step}) is the final adapter only where step 8 is best")
    q = subprocess.run([BIN, "eval", "--config", str(TMP / "best" / "config.resolved.json"), "--data",
                        str(TMP / "best" / "eval.jsonl"), "--adapter", str(TMP / "best" / "best_adapter")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = json.loads(q.stdout.strip().splitlines()[-1])["loss"] if q.returncode == 0 else None
    check(got is not None and abs(got - ev[step]) <= 1e-5 * ev[step],
          f"eval of best_adapter gives its logged held-out loss {ev[step]}: {got} (exit {q.returncode}) {q.stderr[-300:]}")
    # Killed by a non-finite loss at step 7, after evaluations 1-6 and the checkpoint at 4, then resumed.
    p = train(write_config("best_r", **best), env={"QT_TEST_NAN_LOSS_AT_STEP": "7"}, check_rc=False)
    check(p.returncode != 0 and (TMP / "best_r" / "checkpoint-4").exists(), f"the run stops at step 7 (exit {p.returncode})")
    first = json.loads((TMP / "best_r" / "best_adapter" / "best.json").read_text())["step"]
    p = train(write_config("best_r", **best), "--resume", "auto")
    later = (" (it was written at step " + str(first) + ", after the resume point: " +
             ("removed: " + str("removed " in p.stderr)) + ")") if first > 4 else ""
    check((TMP / "best_r" / "best_adapter" / "best.json").read_text() ==
          (TMP / "best" / "best_adapter" / "best.json").read_text() and
          (TMP / "best_r" / "best_adapter" / "adapter_model.safetensors").read_bytes() ==
          (TMP / "best" / "best_adapter" / "adapter_model.safetensors").read_bytes() and
          (first <= 4 or f"removed {TMP / 'best_r' / 'best_adapter'} (from step {first}" in p.stderr),
          f"the resumed run ends with the straight run's best_adapter{later}")
    # Two ranks, the blocks sharded (write_best gathers the adapter on every rank), resumed from step 4: the same
    # evaluation picked (the losses equal the single process's within float sums' order).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cfg = write_config("best_2", train__shard="blocks", **best)
    for extra in ([], ["--resume", str(TMP / "best_2" / "checkpoint-4")]):
        p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg), *extra],
                           capture_output=True, text=True, env=env, timeout=300)
        got = json.loads((TMP / "best_2" / "best_adapter" / "best.json").read_text()) if p.returncode == 0 else {}
        check(got.get("step") == step and abs(got["eval_loss"] - ev[step]) <= 1e-5 * ev[step],
              f"two sharded ranks{' resumed at step 4' if extra else ''} keep step {step}'s adapter as the best: {got} "
              f"(exit {p.returncode}) {p.stderr[-300:] if p.returncode else ''}")
    # A plain run into that output_dir is refused (best_adapter is trained work no checkpoint may hold); one with
    # --overwrite-output-dir sets it aside as best_adapter.abandoned.
    p = train(write_config("best", **best), check_rc=False)
    check(p.returncode == 3 and "best_adapter" in p.stderr, f"a plain run over best_adapter is refused (exit {p.returncode})")
    p = train(write_config("best", **best), "--overwrite-output-dir")
    check((TMP / "best" / "best_adapter.abandoned" / "best.json").read_text() ==
          (TMP / "best_r" / "best_adapter" / "best.json").read_text() and "aside" in p.stderr,
          "--overwrite-output-dir sets the earlier best_adapter aside")
    # Full fine-tuning: best_model, the whole model.
    p = train(write_config("best_ff", model__quant="none", train__full_finetune=True,
                           **dict(best, train__steps=3, optim__lr=5e-4)))
    meta = json.loads((TMP / "best_ff" / "best_model" / "best.json").read_text())
    ev_ff = eval_losses("best_ff")
    check(meta["step"] == min(ev_ff, key=lambda k: (ev_ff[k], k)) and
          (TMP / "best_ff" / "best_model" / "model.safetensors").exists(),
          f"full fine-tuning keeps the best model in best_model: {meta}, {ev_ff}")
    for name, over, needle in (("best_no_eval", {"data__eval_fraction": 0}, "data.eval_fraction"),
                               ("best_no_every", {"train__eval_every": 0}, "train.eval_every")):
        p = train(write_config(name, **dict(best, **over)), check_rc=False)
        check(p.returncode == 3 and "checkpoint.save_best" in p.stderr and needle in p.stderr,
              f"save_best without {needle} is refused naming the key (exit {p.returncode}): {p.stderr[-200:]}")

def check_early_stopping():
    """train.early_stopping_patience P: the run ends after P evaluations in a row without a held-out loss under the
    lowest (where, computed from check_best_adapter's run of the same steps to the end), complete: exit 0, its summary
    "stopped_early", its checkpoint and final adapter at that step, best_adapter the lowest's. Resumed from that
    checkpoint it trains no more. Without train.eval_every it is refused naming the key."""
    base = dict(data__eval_fraction=0.25, train__eval_every=1, train__steps=8, checkpoint__every=4,
                checkpoint__save_best=True, optim__lr=0.05, optim__schedule="constant",
                data__packing_strategy="in_order")  # (check_best_adapter's rows)
    curve = eval_losses("best")
    for patience in (1, 2):
        want, lowest, since = 8, float("inf"), 0
        for step in sorted(curve):
            since = 0 if curve[step] < lowest else since + 1
            lowest = min(lowest, curve[step])
            if since >= patience and step < 8:
                want = step
                break
        name = f"es{patience}"
        p = train(write_config(name, train__early_stopping_patience=patience, **base))
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        check(summary["steps"] == want and summary.get("stopped_early", False) == (want < 8) and
              sorted(eval_losses(name)) == list(range(1, want + 1)) and
              (TMP / name / f"checkpoint-{want}" / "COMPLETE").exists() and
              json.loads((TMP / name / "best_adapter" / "best.json").read_text())["step"] ==
              min((k for k in curve if k <= want), key=lambda k: (curve[k], k)),
              f"patience {patience}: the run ends after step {want} (the curve {curve}): {summary}")
        if want < 8:
            final = adapter_bytes(name)
            p = train(write_config(name, train__early_stopping_patience=patience, **base), "--resume", "auto")
            again = json.loads(p.stdout.strip().splitlines()[-1])
            check(again["steps"] == want and again.get("stopped_early") and "resumed at its early stop" in p.stderr and
                  sorted(eval_losses(name)) == list(range(1, want + 1)) and adapter_bytes(name) == final,
                  f"patience {patience}: resumed at its early stop, the run trains no more: {again}")
    # Two ranks stop together where one process does, and resume there alike.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cfg = write_config("es_2", train__early_stopping_patience=1, **base)
    for extra in ([], ["--resume", "auto"]):
        p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg), *extra],
                           capture_output=True, text=True, env=env, timeout=300)
        got = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
        check(got.get("steps") == json.loads((TMP / "es1" / "best_adapter" / "best.json").read_text())["step"] + 1
              and got.get("stopped_early"),
              f"two ranks{' resumed' if extra else ''} stop where one process does: {got} (exit {p.returncode}) "
              f"{p.stderr[-300:] if p.returncode else ''}")
    # A run that completed (its last evaluation, off the eval_every grid, the P-th without a lower loss) and is given
    # more steps trains on: only a checkpoint of an early stop ends a resumed run at once.
    short = dict(base, train__eval_every=2, train__steps=3, checkpoint__every=0)
    train(write_config("es_more", train__early_stopping_patience=1, **short))
    p = train(write_config("es_more", train__early_stopping_patience=1, **dict(short, train__steps=8)), "--resume",
              "auto")
    seq = [(k, curve[k]) for k in (2, 3, 4, 6, 8)]
    want, lowest, since = 8, float("inf"), 0
    for k, v in seq:
        since = 0 if v < lowest else since + 1
        lowest = min(lowest, v)
        if k > 3 and since >= 1 and k < 8:
            want = k
            break
    got = json.loads(p.stdout.strip().splitlines()[-1])
    check(got["steps"] == want and "resumed at its early stop" not in p.stderr,
          f"a completed run given more steps trains on to step {want}: {got}")
    p = train(write_config("es_no_every", train__early_stopping_patience=2,
                           **dict(base, train__eval_every=0, checkpoint__save_best=False)), check_rc=False)
    check(p.returncode == 3 and "train.early_stopping_patience" in p.stderr and "train.eval_every" in p.stderr,
          f"early stopping without train.eval_every is refused naming the key (exit {p.returncode})")

def check_loraplus():
    """optim.loraplus_lr_ratio R (LoRA+): one AdamW step from B = 0 moves each lora_B element by R times what it moves
    at R = 1 (the update is lr * R times the same m / (sqrt(v) + eps)), lora_A not at all differently, and DoRA's
    magnitudes likewise by R (two ratios against a third, the base row norms unknown here). R = 1 is the default run
    byte for byte. R <= 0 and train.full_finetune are refused naming the key."""
    import torch
    from safetensors.torch import load_file
    # (weight decay moves A and lm_head in the first step too, where A's gradient is still zero with B = 0)
    one = dict(train__steps=1, optim__lr=1e-3, optim__warmup_steps=0, optim__schedule="constant", checkpoint__every=0,
               optim__weight_decay=0.1, lora__modules_to_save=["lm_head"])
    def run(name, ratio, **over):
        extra = {} if ratio is None else {"optim__loraplus_lr_ratio": ratio}
        train(write_config(name, **{**one, **extra, **over}))
        return load_file(str(TMP / name / "adapter" / "adapter_model.safetensors"))
    default, r1, r4 = run("lp_default", None), run("lp1", 1.0), run("lp4", 4.0)
    check(adapter_bytes("lp1") == adapter_bytes("lp_default"), "LoRA+ ratio 1 gives the default run's adapter byte for byte")
    bs = [k for k in r1 if ".lora_B." in k]
    others = [k for k in r1 if ".lora_B." not in k]
    moved = sum(int((r1[k] != 0).sum()) for k in bs)
    check(len(bs) == 14 and moved > 0 and any("lm_head" in k for k in others) and
          all(torch.equal(r4[k], r1[k]) for k in others) and
          all(torch.allclose(r4[k], 4 * r1[k], rtol=1e-5, atol=0) for k in bs),
          f"ratio 4: lora_B moved 4x as far as at ratio 1 ({moved} elements moved), lora_A and lm_head alike")
    tiny = run("lp_tiny_lr", 1.0, optim__lr=1e-6)
    check(any(not torch.equal(tiny[k], r1[k]) for k in others if ".lora_A." in k),
          "lora_A moves in that step (weight decay at lr), so its equality across ratios has content")
    dora = {"lora__use_dora": True}
    d1, d2, d4 = run("lpd1", 1.0, **dora), run("lpd2", 2.0, **dora), run("lpd4", 4.0, **dora)
    mags = [k for k in d1 if k.endswith("lora_magnitude_vector")]
    check(len(mags) == 14 and all(torch.allclose(d4[k] - d2[k], 2 * (d2[k] - d1[k]), rtol=2e-3, atol=1e-7) and
                                  float((d2[k] - d1[k]).abs().max()) > 0 for k in mags),
          "DoRA's magnitudes move at lr times the ratio too, as PEFT's LoRA+ groups them")
    # PEFT's grouping itself (create_loraplus_optimizer on this model with DoRA): lora_B and the magnitudes at lr * R,
    # lora_A at lr.
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import LlamaForCausalLM
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(TMP / "model"), LoraConfig(
        r=4, lora_alpha=8, use_dora=True, modules_to_save=["lm_head"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = create_loraplus_optimizer(peft, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0)
    names = {id(p): n for n, p in peft.named_parameters()}
    kind = lambda n: ("B" if ".lora_B." in n else "A" if ".lora_A." in n else "m" if "magnitude" in n else
                      "lm_head" if "lm_head" in n else n)
    groups = {}
    for g in opt.param_groups:
        for q in g["params"]:
            groups.setdefault(kind(names[id(q)]), set()).add(round(g["lr"], 9))
    decay = {g["weight_decay"] for g in opt.param_groups if g["params"]}
    check(groups == {"A": {1e-3}, "B": {4e-3}, "m": {4e-3}, "lm_head": {1e-3}} and decay == {0.0},
          f"PEFT's LoRA+ groups: {groups}, weight decay {decay} (its loraplus_weight_decay, default 0)")
    for name, over, needle in (("lp_neg", {"optim__loraplus_lr_ratio": -1.0}, "must be > 0"),
                               ("lp_big", {"optim__loraplus_lr_ratio": 2000.0}, "times it under 1"),
                               ("lp_ff", {"optim__loraplus_lr_ratio": 16.0, "model__quant": "none",
                                          "train__full_finetune": True}, "full_finetune")):
        p = train(write_config(name, **dict(one, **over)), check_rc=False)
        check(p.returncode == 3 and "optim.loraplus_lr_ratio" in p.stderr and needle in p.stderr,
              f"{name}: refused naming optim.loraplus_lr_ratio (exit {p.returncode}): {p.stderr[-200:]}")

def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 48, 21)

    # Reproducible: two runs with one seed give the same losses and adapter bytes.
    train(write_config("a"))
    train(write_config("b"))
    la, lb = losses("a"), losses("b")
    check(len(la) == 6 and la == lb, f"two runs with one seed give identical losses {list(la.values())}")
    check(adapter_bytes("a") == adapter_bytes("b"), "two runs with one seed give identical adapters")
    check(la[6] < la[1], f"the loss falls ({la[1]:.4f} -> {la[6]:.4f})")
    for f in ("metrics.jsonl", "loss.html", "adapter/adapter_config.json", "checkpoint-6/COMPLETE", "checkpoint-3/COMPLETE"):
        check((TMP / "a" / f).exists(), f"{f} written")
    from safetensors import safe_open
    with safe_open(TMP / "a" / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    check(len(keys) == 2 * 7 * 2 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
          and all(k.startswith("base_model.model.model.layers.") for k in keys),
          f"the adapter holds PEFT's 28 lora_A/lora_B tensors ({len(keys)})")

    # Steps overlap (step N + 1 queued before step N is read back and logged) except at the boundaries that need
    # the model as a step left it: here the first step, the checkpoints at 3 and 6 and the evaluation at 4 leave
    # steps 2 and 5 read back with the next step queued. QT_OVERLAP_STEPS=0 reads every step back first: the same
    # losses, evaluation losses, checkpoints and adapter bit for bit, with LoRA dropout (the CPU generator's draws)
    # and NEFTune's noise on.
    def summary_line(p):
        return json.loads(p.stdout.strip().splitlines()[-1])
    over = dict(lora__dropout=0.1, train__neftune_alpha=5.0, train__eval_every=4, data__eval_fraction=0.2)
    po = train(write_config("ov", **over))
    ps = train(write_config("ov0", **over), env={"QT_OVERLAP_STEPS": "0"})
    so, ss = summary_line(po), summary_line(ps)
    evals = lambda name: [json.loads(l).get("eval_loss") for l in (TMP / name / "metrics.jsonl").read_text().splitlines()
                          if "eval_loss" in l]
    check(so.get("steps_overlapped") == 2 and ss.get("steps_overlapped") == 0,
          f"steps 2 and 5 are read back while the next is queued, none with QT_OVERLAP_STEPS=0 "
          f"({so.get('steps_overlapped')}, {ss.get('steps_overlapped')})")
    check(losses("ov") == losses("ov0") and len(losses("ov")) == 6 and evals("ov") == evals("ov0")
          and len(evals("ov")) == 2 and adapter_bytes("ov") == adapter_bytes("ov0")
          and all((TMP / "ov" / "checkpoint-3" / f).read_bytes() == (TMP / "ov0" / "checkpoint-3" / f).read_bytes()
                  for f in ("adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors")),
          f"overlapped steps give the losses, evaluations, checkpoint and adapter of steps read back one by one "
          f"({list(losses('ov').values())}, {evals('ov')})")

    # data.train_file as a list: its files read in order are one set of records, so two parts of train.jsonl give
    # the whole file's run (losses, adapter, held-out records); a record is named by its file and line; the
    # checkpoint's hash covers every file, so a changed part refuses the resume.
    lines = (TMP / "train.jsonl").read_text().splitlines(keepends=True)
    (TMP / "part1.jsonl").write_text("".join(lines[:20]))
    (TMP / "part2.jsonl").write_text("".join(lines[20:]))
    parts = [str(TMP / "part1.jsonl"), str(TMP / "part2.jsonl")]
    train(write_config("whole", data__eval_fraction=0.2))
    train(write_config("parts", data__train_file=parts, data__eval_fraction=0.2))
    check(losses("parts") == losses("whole") and adapter_bytes("parts") == adapter_bytes("whole")
          and (TMP / "parts" / "eval.jsonl").read_text() == (TMP / "whole" / "eval.jsonl").read_text()
          and (TMP / "parts" / "eval.jsonl").read_text().count("\n") >= 2,
          f"data.train_file [part1, part2] trains as the file they were cut from ({losses('parts')} vs {losses('whole')})")
    (TMP / "part2_long.jsonl").write_text("".join(lines[20:22]) + json.dumps({"text": " ".join(["word"] * 200)}) + "\n")
    p = train(write_config("parts_long", data__train_file=[parts[0], str(TMP / "part2_long.jsonl")],
                           data__truncation="error"), check_rc=False)
    check(p.returncode != 0 and "part2_long.jsonl:3" in p.stderr and "data.truncation" in p.stderr,
          f"a record too long in the second file is named by its file and line (exit {p.returncode}): "
          f"{p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else ''}")
    p = train(write_config("parts_empty", data__train_file=[]), check_rc=False)
    check(p.returncode == 3 and "data.train_file" in p.stderr and "empty list" in p.stderr,
          f"an empty list is a config error naming data.train_file (exit {p.returncode})")
    (TMP / "part2.jsonl").write_text("".join(lines[20:-1]))
    p = train(write_config("parts", data__train_file=parts, data__eval_fraction=0.2), "--resume", "auto",
              check_rc=False)
    check(p.returncode != 0 and "data.train_file's content" in p.stderr,
          f"a changed second file refuses the resume, naming data.train_file's content (exit {p.returncode})")

    # Accumulation: 4 micro-batches of 1 row give the step of one batch of 4 rows (token-normalised).
    train(write_config("m1", train__micro_batch_size=1, train__steps=2))
    train(write_config("m4", train__micro_batch_size=4, train__steps=2))
    l1, l4 = losses("m1"), losses("m4")
    check(all(abs(l1[s] - l4[s]) / l4[s] < 1e-5 for s in (1, 2)),
          f"micro-batches of 1 and one batch of 4 give the same losses {l1} vs {l4}")

    # Data parallel: 2 MPI ranks on the same global batch give the single-rank losses (to fp32 rounding).
    cfg = write_config("mpi2")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg)], capture_output=True,
                       text=True, env=env)
    check(p.returncode == 0, f"mpirun -np 2 training exits 0 ({p.returncode}) {p.stderr[-500:] if p.returncode else ''}")
    summaries = [l for l in p.stdout.splitlines() if l.startswith("{")]
    check(len(summaries) == 1, f"rank 0 alone prints the summary line ({len(summaries)} printed)")
    if p.returncode == 0:
        lm = losses("mpi2")
        check(all(abs(lm[s] - la[s]) / la[s] < 1e-5 for s in (1, 2, 3)),
              f"2 ranks give the single-rank losses {[lm[s] for s in (1, 2, 3)]} vs {[la[s] for s in (1, 2, 3)]}")

    # Held-out data of one batch over 2 ranks (rank 1's share empty): every rank evaluates, and the eval losses are
    # the single process's. Before (fuzzing round 9) rank 1 skipped evaluation, rank 0's all-reduce of the eval loss
    # paired with rank 1's gradient all-reduce: a wrong eval loss (3.0101 over 16 tokens for 6.0202 over 8), then
    # MPI_ERR_TRUNCATE (sharded: an abort).
    (TMP / "eval1.jsonl").write_text((TMP / "train.jsonl").read_text().splitlines()[0] + "\n")
    ev = dict(data__eval_file=str(TMP / "eval1.jsonl"), train__eval_every=1, train__steps=2, checkpoint__every=0)
    train(write_config("ev_ref", **ev))
    want = {j["step"]: j["eval_loss"] for j in map(json.loads, (TMP / "ev_ref" / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in j}
    for shard in ("none", "blocks"):
        p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config",
                            str(write_config(f"ev_{shard}", train__shard=shard, **ev))],
                           capture_output=True, text=True, env=env, timeout=120)
        got = {j["step"]: j["eval_loss"] for j in map(json.loads, (TMP / f"ev_{shard}" / "metrics.jsonl").read_text().splitlines())
               if "eval_loss" in j} if p.returncode == 0 else {}
        check(p.returncode == 0 and len(got) == 2 and all(abs(got[s] - want[s]) / want[s] < 1e-5 for s in want),
              f"one held-out batch over 2 ranks (shard {shard}): the single-process eval losses {got} vs {want} "
              f"(exit {p.returncode}) {p.stderr[-300:] if p.returncode else ''}")

    # Ranks that read different training data under one path (node-local copies; here one relative path from two
    # working directories), other held-out records, another model (one weight byte changed) or, sharded, other
    # output_dirs stop before training, naming the rank; so do ranks that would resume different checkpoints.
    def two_dirs(cfg):
        """Rank 0 in wa, rank 1 in wb, one config: its relative paths name each directory's own files."""
        mpmd = ["mpirun", "--oversubscribe", "-np", "1", "-wdir", str(TMP / "wa"), BIN, "--config", str(cfg), ":",
                "-np", "1", "-wdir", str(TMP / "wb"), BIN, "--config", str(cfg)]
        return subprocess.run(mpmd, capture_output=True, text=True, env=env, timeout=300)

    lines = (TMP / "train.jsonl").read_text().splitlines()
    for sub, n in (("wa", 16), ("wb", 17)):
        (TMP / sub).mkdir(exist_ok=True)
        (TMP / sub / "train.jsonl").write_text("".join(l + "\n" for l in lines[:n]))
        (TMP / sub / "eval.jsonl").write_text("".join(l + "\n" for l in lines[:n - 10]))
        shutil.copytree(TMP / "model", TMP / sub / "model", dirs_exist_ok=True)
    weights = sorted((TMP / "wb" / "model").glob("*.safetensors"))[0]
    raw = bytearray(weights.read_bytes())
    begin = 8 + int.from_bytes(raw[:8], "little")
    raw[begin + (len(raw) - begin) // 2] ^= 0x55
    weights.write_bytes(bytes(raw))
    sharded = write_config("mpi_out", train__shard="blocks")
    sharded.write_text(json.dumps({**json.loads(sharded.read_text()), "output_dir": "out"}))
    for cfg, says, what in [(write_config("mpi_data", data__train_file="train.jsonl"), "content of data.train_file",
                             "reading different data"),
                            (write_config("mpi_eval", data__eval_file="eval.jsonl"), "content of data.eval_file",
                             "holding out different records"),
                            (write_config("mpi_model", model__path="model"), "model directory",
                             "loading different models under one path"),
                            (sharded, "output_dir out", "sharded, seeing other output_dirs")]:
        p = two_dirs(cfg)
        check(p.returncode == 3 and says in p.stderr and "rank 1" in p.stderr,
              f"ranks {what}: a config error naming the rank (exit {p.returncode}) {p.stderr[-400:]}")
    # A rank whose data file is missing: its error line names it (it said only "data error: only_a.jsonl: file not
    # found" before, fuzzing round 9), and the job ends at once.
    (TMP / "wa" / "only_a.jsonl").write_text((TMP / "wa" / "train.jsonl").read_text())
    p = two_dirs(write_config("mpi_missing", data__train_file="only_a.jsonl"))
    check(p.returncode == 5 and "qlora-train: rank 1 of 2: data error: only_a.jsonl: file not found" in p.stderr,
          f"a rank without the data file: a data error naming the rank (exit {p.returncode}) {p.stderr[-400:]}")
    mpmd = ["mpirun", "--oversubscribe", "-np", "1", BIN, "--config", str(write_config("mpi2")), "--resume", "auto", ":",
            "-np", "1", BIN, "--config", str(write_config("mpi2")), "--resume", str(TMP / "k_none")]
    p = subprocess.run(mpmd, capture_output=True, text=True, env=env, timeout=300)
    check(p.returncode != 0 and "resume point" in p.stderr,
          f"ranks resuming different points: an error naming it, no hang (exit {p.returncode}) {p.stderr[-400:]}")

    # Exact resume after kill -9 once checkpoint-3 is complete.
    cfg = write_config("k")
    start_and_kill(cfg, lambda: (TMP / "k" / "checkpoint-3" / "COMPLETE").exists(),
                   {"QT_TEST_SLEEP_AFTER_CHECKPOINT_MS": "3000"})
    check(not (TMP / "k" / "checkpoint-6").exists(), "the killed run stopped before its last checkpoint")
    train(cfg, "--resume", "auto")
    lk = losses("k")
    check(all(lk[s] == la[s] for s in (4, 5, 6)), f"resumed losses of steps 4-6 equal the straight run's bit for bit")
    check(adapter_bytes("k") == adapter_bytes("a"), "the resumed run's final adapter equals the straight run's")

    # DoRA (lora.use_dora, with dropout): the adapters carry PEFT's magnitude vectors, and a resume from checkpoint-3
    # ends with the straight run's adapter (magnitudes and their optimizer state come back).
    dora = dict(lora__use_dora=True, lora__dropout=0.1)
    train(write_config("d", **dora))
    ld = losses("d")
    check(len(ld) == 6 and ld[6] < ld[1] and ld != la, f"DoRA trains: losses {list(ld.values())}")
    with safe_open(TMP / "d" / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    check(len(keys) == 3 * 7 * 2 and sum(k.endswith(".lora_magnitude_vector") for k in keys) == 7 * 2,
          f"the DoRA adapter holds lora_A, lora_B and lora_magnitude_vector for 14 modules ({len(keys)} tensors)")
    shutil.copytree(TMP / "d", TMP / "dr")
    shutil.rmtree(TMP / "dr" / "checkpoint-6")
    shutil.rmtree(TMP / "dr" / "adapter")
    train(write_config("dr", **dora), "--resume", "auto")
    check(all(losses("dr")[s] == ld[s] for s in (4, 5, 6)) and adapter_bytes("dr") == adapter_bytes("d"),
          "a DoRA run resumed from checkpoint-3 ends with the straight run's losses and adapter")

    # Full fine-tuning (train.full_finetune on a 16-bit base): the checkpoint holds the weights (training dtype, in
    # the manifest), and a run resumed from checkpoint-3 ends with the straight run's losses and model bytes.
    full = dict(model__quant="none", train__full_finetune=True)
    train(write_config("ff", **full))
    lf = losses("ff")
    check(len(lf) == 6 and lf[6] < lf[1], f"full fine-tuning trains: losses {list(lf.values())}")
    weights = pathlib.Path("checkpoint-3") / "model" / "model.safetensors"
    state = json.loads((TMP / "ff" / "checkpoint-3" / "trainer_state.json").read_text())
    check((TMP / "ff" / weights).exists() and "model/model.safetensors" in state["files"],
          "a full fine-tuning checkpoint holds the model's weights, listed with their checksum")
    for name in ("ffr", "fft"):
        shutil.copytree(TMP / "ff", TMP / name)
        shutil.rmtree(TMP / name / "checkpoint-6")
        shutil.rmtree(TMP / name / "model")
    p = train(write_config("ffr", **full), "--resume", "auto")
    model_bytes = lambda name: (TMP / name / "model" / "model.safetensors").read_bytes()
    check("checkpoint-3" in p.stderr and all(losses("ffr")[s] == lf[s] for s in (4, 5, 6))
          and model_bytes("ffr") == model_bytes("ff"),
          "a full fine-tuning run resumed from checkpoint-3 ends with the straight run's losses and weights")
    w = TMP / "fft" / weights
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    p = train(write_config("fft", **full), "--resume", str(TMP / "fft" / "checkpoint-3"), check_rc=False)
    check(p.returncode != 0 and "model.safetensors" in p.stderr and "truncated" in p.stderr,
          f"a truncated weights file in the checkpoint is named (exit {p.returncode})")

    # NEFTune (train.neftune_alpha): the noisy embeddings change the run from its first step, and a resume from
    # checkpoint-3 draws the straight run's noise (the generator states are in the checkpoint).
    train(write_config("n", train__neftune_alpha=5.0))
    ln = losses("n")
    check(len(ln) == 6 and ln[1] != la[1] and ln[6] < ln[1], f"NEFTune changes the losses from step 1 and trains ({ln[1]} vs {la[1]})")
    shutil.copytree(TMP / "n", TMP / "nr")
    shutil.rmtree(TMP / "nr" / "checkpoint-6")
    shutil.rmtree(TMP / "nr" / "adapter")
    train(write_config("nr", train__neftune_alpha=5.0), "--resume", "auto")
    check(all(losses("nr")[s] == ln[s] for s in (4, 5, 6)) and adapter_bytes("nr") == adapter_bytes("n"),
          "a NEFTune run resumed from checkpoint-3 ends with the straight run's losses and adapter")

    # A kill in the middle of writing checkpoint-6: resume falls back to checkpoint-3 and still ends the same.
    cfg = write_config("c")
    start_and_kill(cfg, lambda: any(n.startswith(".checkpoint-6") for n in os.listdir(TMP / "c")) if (TMP / "c").exists() else False,
                   {"QT_TEST_CHECKPOINT_DELAY_MS": "1500"})
    check(not (TMP / "c" / "checkpoint-6").exists(), "no checkpoint-6 after a kill during its save")
    p = train(cfg, "--resume", "auto")
    check("incomplete checkpoint" in p.stderr and ".checkpoint-6" in p.stderr, "resume warns about the interrupted save")
    check("resumed from" in p.stderr and "checkpoint-3" in p.stderr, "resume picks checkpoint-3")
    check(adapter_bytes("c") == adapter_bytes("a"), "after a crash during save, the run still ends with the straight run's adapter")
    # Resumed from a checkpoint older than the newest (--resume PATH): the later checkpoint belongs to the run it
    # departs from and is moved aside (a later `--resume auto` would have taken it, and metrics.jsonl no longer
    # holds its steps); the resumed run's own checkpoint-6 and adapter equal the straight run's.
    shutil.copytree(TMP / "a", TMP / "o")
    p = train(write_config("o"), "--resume", str(TMP / "o" / "checkpoint-3"))
    check("moved aside" in p.stderr and (TMP / "o" / "checkpoint-6.abandoned" / "COMPLETE").exists()
          and (TMP / "o" / "checkpoint-6" / "COMPLETE").exists() and adapter_bytes("o") == adapter_bytes("a"),
          f"resumed from checkpoint-3 with checkpoint-6 there: moved aside, a new checkpoint-6, the straight run's "
          f"adapter {sorted(f.name for f in (TMP / 'o').iterdir())} {p.stderr[-300:]}")
    p = train(write_config("o2"), "--resume", str(TMP / "a" / "checkpoint-3"))
    check("outside output_dir" in p.stderr and adapter_bytes("o2") == adapter_bytes("a"),
          f"a resume from another output_dir's checkpoint says so, and trains on: {p.stderr[-300:]}")
    p = train(write_config("o"), "--resume", "auto")
    check("checkpoint-6.abandoned" not in p.stderr.split("resumed from")[-1].split("\n")[0]
          and "checkpoint-6" in p.stderr, "--resume auto then takes the resumed run's checkpoint-6, not the one aside")
    steps = [json.loads(l)["step"] for l in (TMP / "c" / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]
    check(steps == [1, 2, 3, 4, 5, 6],
          f"metrics.jsonl logs each step once: the killed run's steps after checkpoint-3 dropped at the resume ({steps})")

    # Resuming with a LoRA shape or batch that differs is refused, naming the keys; more steps are allowed with
    # --resume-allow-changes (the schedule length changes).
    p = train(write_config("a", lora__r=8, train__batch_size=8), "--resume", "auto", check_rc=False)
    check(p.returncode == 6 and "lora.r" in p.stderr and "train.batch_size" in p.stderr,
          f"a changed lora.r / batch_size is refused (exit {p.returncode}): {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    p = train(write_config("a", train__steps=8), "--resume", "auto", "--resume-allow-changes", check_rc=False)
    check(p.returncode == 0 and losses("a").get(8) is not None, "more steps may be added on resume")

    # Bad configs and data: clear errors, non-zero exit, nothing written.
    p = train(write_config("e", optim__lerning_rate=1), check_rc=False)
    check(p.returncode == 3 and "optim.lerning_rate" in p.stderr, f"a config typo is named (exit {p.returncode})")
    (TMP / "bad.jsonl").write_text('{"text": "a b c"}\n\n{"text": "d e f"}\n')
    p = train(write_config("e2", data__train_file=str(TMP / "bad.jsonl")), check_rc=False)
    check(p.returncode == 5 and "bad.jsonl:2" in p.stderr, f"an empty jsonl line between records is named (exit {p.returncode})")
    (TMP / "trailing.jsonl").write_text((TMP / "train.jsonl").read_text() + "\n \n")
    p = train(write_config("e4", data__train_file=str(TMP / "trailing.jsonl"), train__steps=1), check_rc=False)
    check(p.returncode == 0, f"blank lines at the end of a jsonl file are accepted (exit {p.returncode})")
    (TMP / "chat.jsonl").write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    p = train(write_config("e3", data__train_file=str(TMP / "chat.jsonl"), data__format="chat", data__chat_template="llama2"), check_rc=False)
    check(p.returncode == 5 and "wizard" in p.stderr and "chat.jsonl:1" in p.stderr, f"an unknown chat role is named (exit {p.returncode})")
    check_best_adapter()
    check_early_stopping()
    check_loraplus()
    finish("training checks")

if __name__ == "__main__":
    main()
