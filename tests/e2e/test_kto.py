"""KTO (train.objective "kto": unpaired records {prompt, completion, label}, or preference pairs read as two unpaired
records each) against TRL's KTOTrainer (tests/oracles/kto_trl.py, trl 1.16.0): optimizer steps on a tiny fp32 model
on the CPU from a PEFT adapter with non-zero B (lora.init_from, which is also the reference, as TRL's for a
PeftModel), in TRL's micro-batches (per_device_train_batch_size records, its gradient accumulation), each with its own
KL baseline. At the first step the policy is the reference (every loss 0.5 x its weight); one step's adapter equals
TRL's to 1e-4 of its update (AdamW with a large eps: this compares the gradients), and after two steps the loss, KL
baseline, rewards and log-probs equal TRL's logged metrics to 1e-5 and the adapter TRL's to 5e-4. Cases: kto, kto
with weights, apo_zero_unpaired (no KL sequences), preference pairs unpaired as TRL unpairs them, DoRA from a DoRA
adapter. The oracle's ids and its second step's metrics are checked against plain forward passes (kto_independent).
Two data-parallel ranks (mpirun) average the KL baseline over the ranks (the second step's kl and loss are those of
one baseline over both ranks' KL sequences).
`qlora-train eval --config` gives the held-out loss with one KL baseline over all the records; a run resumed from its
checkpoint ends with the straight run's adapter, and `eval` of its held-out records gives its last eval_loss; bad
records and keys are refused by name; the DPO demo's pairs under KTO teach its task.

    cd build && QT_BINARY=$PWD/qlora-train python3 ../tests/e2e/test_kto.py [--oracle-only]"""
import json, os, pathlib, random, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from safetensors.torch import load_file
import tiny_lm
import kto_trl
from checks import check, finish
from pair_checks import TARGETS, check_demo, check_resumed, compare_adapters, make_adapter, words

ORACLE_ONLY = "--oracle-only" in sys.argv
BIN = None if ORACLE_ONLY else os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_kto_"))
EPS, LR = 1.0, 0.5  # AdamW's first update -LR g / (|g| + EPS): near-linear in g (as tests/e2e/test_dpo.py)
# Our metrics.jsonl names -> TRL's logged names.
NAMES = {"loss": "loss", "kl": "kl", "rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
         "rewards_margin": "rewards/margins", "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}
# TRL's KTOConfig names; per_device (micro_batch_size) x accumulation records a step; data: "unpaired" or "pairs".
CASES = {"kto": dict(loss_type="kto", beta=0.3, per_device=4, accumulation=2, data="unpaired"),
         "weighted": dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5, per_device=4,
                          accumulation=2, data="unpaired"),
         "apo": dict(loss_type="apo_zero_unpaired", beta=0.2, per_device=4, accumulation=2, data="unpaired"),
         "pairs": dict(loss_type="kto", beta=0.5, per_device=3, accumulation=6, data="pairs"),
         # DoRA from a DoRA adapter (its magnitudes moved off the rows' norms): the reference that adapter too
         "dora": dict(loss_type="kto", beta=0.3, per_device=4, accumulation=2, data="unpaired", dora=True)}


def make_records(seed=29):
    """8 unpaired records (two desirable in each half: TRL's per-micro-batch means of the statistics are then the
    step's), one whose prompt ends with a space (its last token merges with the completion)."""
    rng = random.Random(seed)
    labels = [True, False, True, False, False, True, True, False]
    out = [{"prompt": words(rng, 3, 8), "completion": " " + words(rng, 2, 7) + rng.choice([".", "!", "?"]),
            "label": l} for l in labels]
    out[5] = {"prompt": "what is two and two? ", "completion": "four!", "label": True}
    return out


def make_pairs(seed=31):
    rng = random.Random(seed)
    return [{"prompt": words(rng, 3, 8), "chosen": " " + words(rng, 2, 6) + ".", "rejected": " " + words(rng, 2, 7) + "?"}
            for _ in range(9)]


def write_config(name, train_file, kto, train=None, data=None, objective="kto", checkpoint=None, dora=False):
    cfg = {"output_dir": str(TMP / name),
           "model": {"path": str(TMP / "model"), "quant": "none", "device": "cpu", "dtype": "fp32"},
           "lora": {"r": 8, "alpha": 16, "targets": TARGETS, "dropout": 0.0, "use_dora": dora,
                    "init_from": str(TMP / ("init_dora" if dora else "init"))},
           "data": {"train_file": str(train_file), "max_seq_len": 256, "packing": False, "shuffle": False,
                    **(data or {})},
           "train": {"objective": objective, "steps": 2, "batch_size": 8, "micro_batch_size": 4, "seed": 3,
                     "log_every": 1, **(train or {})},
           "optim": {"lr": LR, "eps": EPS, "weight_decay": 0, "warmup_steps": 0, "schedule": "constant",
                     "max_grad_norm": 0},
           "checkpoint": checkpoint or {"every": 0}, "logging": {"progress": "lines"}}
    if objective == "kto":
        cfg["kto"] = kto
    path = TMP / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def run(*args, mpi=0):
    pre = ["mpirun", "-np", str(mpi), "--oversubscribe"] if mpi else []
    return subprocess.run([*pre, BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
                               "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})


def case_config(name, v, steps):
    kto = {k: x for k, x in v.items() if k in ("loss_type", "beta", "desirable_weight", "undesirable_weight")}
    data = TMP / ("pairs.jsonl" if v["data"] == "pairs" else "records.jsonl")
    return write_config(name, data, kto, train={"steps": steps, "micro_batch_size": v["per_device"],
                                                "batch_size": v["per_device"] * v["accumulation"]},
                        dora=v.get("dora", False))


def run_ours(name, v, steps, mpi=0):
    """Trains; (each step's metrics, adapter tensors), or None after a failed check."""
    p = run("--config", case_config(name, v, steps), mpi=mpi)
    if p.returncode != 0:
        check(False, f"{name}: qlora-train exited {p.returncode}: {p.stderr[-2000:]}")
        return None
    lines = [json.loads(l) for l in (TMP / name / "metrics.jsonl").read_text().splitlines()]
    per_step = {j["step"]: j for j in lines if "kl" in j and "step" in j}
    adapter = TMP / name / "adapter" / "adapter_model.safetensors"
    check(len(per_step) == steps and adapter.exists(), f"{name}: metrics.jsonl has {steps} steps' KTO metrics and "
                                                       f"the adapter ({sorted(per_step)})")
    return (per_step, load_file(str(adapter))) if len(per_step) == steps and adapter.exists() else None


def compare(name, ours, trl, beta):
    """Loss, kl and log-probs to rel 1e-5; rewards (beta x a difference of log-prob sums) to 1e-5 of beta x the
    log-prob scale."""
    scale = beta * max(abs(trl.get("logps/chosen", 1)), abs(trl.get("logps/rejected", 1)), 1.0)
    for ok, tk in NAMES.items():
        if tk not in trl:  # TRL's margin: only from micro-batches with both kinds (ours: the step's two means)
            check(ok not in ours or tk == "rewards/margins", f"{name}: {ok} is absent as TRL's {tk} is")
            continue
        a, b = ours.get(ok, float("nan")), trl[tk]
        # (kl: a mean of differences of log-prob sums, so to 1e-7 of their scale)
        logps = max(abs(trl.get("logps/chosen", 1)), abs(trl.get("logps/rejected", 1)), 1.0)
        bound = 1e-5 * scale if tk.startswith("rewards/") else 1e-7 * logps if tk == "kl" else 1e-5 * abs(b)
        check(abs(a - b) <= bound, f"{name}: {ok} {a:.8g} vs TRL {tk} {b:.8g}")


def main():
    model, sp = tiny_lm.make_model_dir(TMP / "model", seed=5)
    records, pairs = make_records(), make_pairs()
    (TMP / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (TMP / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    make_adapter(model, TMP / "init", TMP / "model", b_std=0.5)
    make_adapter(model, TMP / "init_dora", TMP / "model", b_std=0.5, use_dora=True)
    inits = {k: load_file(str(TMP / ("init_dora" if v.get("dora") else "init") / "adapter_model.safetensors"))
             for k, v in CASES.items()}

    def init_dir(v):
        return TMP / ("init_dora" if v.get("dora") else "init")

    def trl(name, v, steps):
        kw = {k: x for k, x in v.items() if k not in ("data", "dora")}
        return kto_trl.trl_kto_step(TMP / "model", init_dir(v), pairs if v["data"] == "pairs" else records,
                                    TMP / f"trl_{name}", lr=LR, eps=EPS, max_length=256, steps=steps, **kw)
    trl2 = {k: trl(k, v, 2) for k, v in CASES.items()}
    trl1 = {k: trl(f"{k}1", v, 1) for k, v in CASES.items()}
    for k, r in trl2.items():
        print(f"oracle ({k}): " + ", ".join(f"{n} {x:.7g}" for n, x in r["metrics"].items()))

    # The oracle: TRL's ids are [BOS] + sentencepiece's of prompt + completion + [EOS], the KL completions rotated by
    # one in each micro-batch; pairs unpaired as all chosen, then all rejected; the first step at the reference (0.5
    # a record, weighted); the second step's metrics those of plain forward passes under TRL's first-step adapter.
    recs = trl2["kto"]["records"]
    ok = len(recs) == len(records)
    for i, (q, r) in enumerate(zip(recs, records)):
        ok &= q["prompt_ids"] + q["completion_ids"] == [sp.bos_id()] + sp.encode(r["prompt"] + r["completion"]) + \
            [sp.eos_id()] and q["label"] == r["label"]
        ok &= q["kl_completion_ids"] == recs[(i // 4) * 4 + (i % 4 + 3) % 4]["completion_ids"]
    check(ok, "oracle: TRL's ids are [BOS] + sentencepiece's + [EOS], the KL completions rotated in each micro-batch")
    unp = trl2["pairs"]["records"]
    check([q["label"] for q in unp] == [True] * 9 + [False] * 9
          and unp[0]["prompt_ids"] + unp[0]["completion_ids"] ==
          [sp.bos_id()] + sp.encode(pairs[0]["prompt"] + pairs[0]["chosen"]) + [sp.eos_id()]
          and unp[9]["prompt_ids"] + unp[9]["completion_ids"] ==
          [sp.bos_id()] + sp.encode(pairs[0]["prompt"] + pairs[0]["rejected"]) + [sp.eos_id()],
          "oracle: TRL unpairs the pairs as their 9 chosen completions, then their 9 rejected")
    check(trl2["apo"]["records"][0]["kl_completion_ids"] is None, "oracle: apo_zero_unpaired has no KL completions")
    for k, v in CASES.items():
        m = trl1[k]["metrics"]
        n_d = sum(q["label"] for q in trl1[k]["records"])
        want = 0.5 * (n_d * v.get("desirable_weight", 1.0) + (len(trl1[k]["records"]) - n_d) *
                      v.get("undesirable_weight", 1.0)) / len(trl1[k]["records"])
        check(abs(m["loss"] - want) < 1e-6 and m["kl"] == 0, f"oracle ({k}): the first step is at the reference "
                                                             f"(loss {m['loss']:.7g}, {want:.7g} a record; kl {m['kl']})")
    for k, v in CASES.items():
        recs = trl2[k]["records"]
        per = v["per_device"]
        groups = [list(range(s, min(s + per, len(recs)))) for s in range(0, len(recs), per)]
        ind = kto_trl.kto_independent(TMP / "model", TMP / f"trl_{k}1", init_dir(v), recs, groups, beta=v["beta"],
                                      desirable_weight=v.get("desirable_weight", 1.0),
                                      undesirable_weight=v.get("undesirable_weight", 1.0), loss_type=v["loss_type"],
                                      max_length=256)
        got = trl2[k]["metrics"]
        bad = {n: (got.get(n), x) for n, x in ind.items() if abs(got.get(n, float("nan")) - x) > 1e-5 * max(1.0, abs(x))}
        check(not bad and set(ind) == set(got),
              f"oracle ({k}): TRL's second-step metrics are the plain forward passes' (differ: {bad})")
    check(trl2["kto"]["metrics"]["kl"] > 0, f"oracle: the second step's KL baseline is not clamped to 0 "
                                            f"({trl2['kto']['metrics']['kl']})")
    if ORACLE_ONLY:
        finish("KTO oracle checks")
        return

    for k, v in CASES.items():
        got = run_ours(f"{k}1", v, 1)
        if got:
            compare_adapters(f"({k}) one step", got[1], load_file(str(TMP / f"trl_{k}1" / "adapter_model.safetensors")),
                             inits[k])
        got = run_ours(k, v, 2)
        if got:
            compare(f"({k}) step 1", got[0][1], trl2[k]["first_metrics"], v["beta"])
            compare(f"({k}) step 2", got[0][2], trl2[k]["metrics"], v["beta"])
            compare_adapters(f"({k}) two steps", got[1], load_file(str(TMP / f"trl_{k}" / "adapter_model.safetensors")),
                             inits[k], rel=5e-4)

    # The KTO loss and statistics of the records under the adapter after TRL's first step against the reference
    # (lora.init_from), with one KL baseline over all of them, from plain forward passes.
    recs = trl2["kto"]["records"]
    groups = [list(range(s, s + 4)) for s in range(0, 8, 4)]
    want = kto_trl.kto_independent(TMP / "model", TMP / "trl_kto1", TMP / "init", recs, groups, beta=0.3,
                                   max_length=256, kl_over_all=True)
    scale = max(abs(want["logps/chosen"]), abs(want["logps/rejected"]))

    # Two data-parallel ranks (mpirun), a micro-batch of 4 records each: the KL baseline is the mean over the ranks'
    # micro-batches (TRL gathers them). The first step is at the reference (baseline 0: TRL's step); the second
    # step's baseline is the mean over all 8 KL sequences (where one rank clamps each micro-batch's), so its kl and
    # loss are those of the plain forward passes with one baseline.
    got = run_ours("kto_ranks", CASES["kto"], 2, mpi=2)
    if got:
        check(abs(got[0][1]["loss"] - trl2["kto"]["first_metrics"]["loss"]) <= 1e-6,
              f"(kto) two ranks: the first step's loss is TRL's ({got[0][1]['loss']})")
        check(abs(got[0][2]["kl"] - want["kl"]) <= 1e-7 * scale and abs(got[0][2]["loss"] - want["loss"]) <= 1e-5
              and abs(want["kl"] - trl2["kto"]["metrics"]["kl"]) > 1e-3,
              f"(kto) two ranks: the second step's kl {got[0][2]['kl']:.8g} and loss {got[0][2]['loss']:.8g} are "
              f"those of the baseline over both ranks {want['kl']:.8g}, {want['loss']:.8g} (one rank's: "
              f"{trl2['kto']['metrics']['kl']:.8g})")

    # A resumed run: 3 steps of 4 records straight (micro-batches of 2, so KL groups of 2), against 1 step, then
    # --resume from its checkpoint to step 3: the same adapter, byte for byte; 2 records held out (evaluated at each
    # step, one KL baseline over both), and `qlora-train eval` of the last adapter on them gives the last eval_loss.
    def resume_config(name, steps):
        return write_config(name, TMP / "records.jsonl", {"beta": 0.3},
                            train={"steps": steps, "batch_size": 4, "micro_batch_size": 2, "eval_every": 1},
                            data={"eval_fraction": 0.25}, checkpoint={"every": 1})
    straight = run("--config", resume_config("r_straight", 3))
    first = run("--config", resume_config("r_resumed", 1))
    again = run("--config", resume_config("r_resumed", 3), "--resume", "auto")
    check_resumed("resume:", straight, first, again, TMP, BIN, 2)

    # Preference pairs (data.format "preference") with records held out: the held-out file holds them unpaired, in
    # the order they were held out in, and `eval --config` of it gives the logged eval_loss.
    p = run("--config", write_config("pairs_eval", TMP / "pairs.jsonl", {"beta": 0.5},
                                     train={"steps": 1, "batch_size": 3, "micro_batch_size": 3, "eval_every": 1},
                                     data={"format": "preference", "eval_fraction": 0.3}))
    held = [json.loads(l) for l in (TMP / "pairs_eval" / "eval.jsonl").read_text().splitlines()] \
        if p.returncode == 0 else []
    evals = [json.loads(l) for l in (TMP / "pairs_eval" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in l] if p.returncode == 0 else []
    check(len(held) == 5 and all(set(r) == {"prompt", "completion", "label"} for r in held) and len(evals) == 1,
          f"pairs held out: the 5 held-out records written unpaired (exit {p.returncode}): {held[:2]} "
          f"{p.stderr[-800:] if p.returncode else ''}")
    p = run("eval", "--config", TMP / "pairs_eval.json", "--adapter", TMP / "pairs_eval" / "adapter", "--data",
            TMP / "pairs_eval" / "eval.jsonl")
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else {}
    check(evals and out.get("pairs") == 5 and abs(out.get("loss", float("nan")) - evals[-1]["eval_loss"]) <=
          1e-5 * abs(evals[-1]["eval_loss"]),
          f"pairs held out: `qlora-train eval --config` of them gives the logged eval_loss: {out} vs "
          f"{evals[-1] if evals else None} {p.stderr[-500:]}")

    # eval --config: the held-out loss and statistics with one KL baseline over all the records.
    p = run("eval", "--config", TMP / "kto.json", "--adapter", TMP / "trl_kto1", "--data", TMP / "records.jsonl")
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else {}
    check(out.get("objective") == "kto" and out.get("pairs") == 8
          and all(abs(out.get(o, float("nan")) - want[t]) <= (1e-7 * scale if t == "kl" else
                                                               1e-5 * max(1.0, abs(want[t])))
                  for o, t in NAMES.items()),
          f"eval --config of a KTO run: the loss and statistics with one KL baseline over all records {want}: {out} "
          f"(exit {p.returncode}) {p.stderr[-600:] if p.returncode else ''}")

    # Bad records and keys are refused by name.
    bad = TMP / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": " b", "label": "yes"}) + "\n")
    p = run("--config", write_config("bad", bad, {}))
    check(p.returncode != 0 and "label" in p.stderr and "bad.jsonl:1" in p.stderr,
          f"a label that is not true / false is refused naming the file, line and key (exit {p.returncode}): "
          f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    p = run("--config", write_config("bad", TMP / "records.jsonl", {}, objective="sft"))
    check(p.returncode != 0 and "kto" in p.stderr,
          f"unpaired records under train.objective sft are refused naming kto (exit {p.returncode})")
    text = TMP / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"some text {i}"}) + "\n" for i in range(4)))
    p = run("--config", write_config("bad", text, {}))
    check(p.returncode != 0 and "label" in p.stderr,
          f"text records under kto are refused, naming the records it needs (exit {p.returncode})")
    for kto, key in (({"loss_type": "sigmoid"}, "kto.loss_type"), ({"beta": 0}, "kto.beta"),
                     ({"kl_group_size": 1}, "kto.kl_group_size"), ({"undesirable_weight": -1}, "kto.undesirable_weight"),
                     ({"gamma": 1}, "kto.gamma")):
        p = run("--config", write_config("bad", TMP / "records.jsonl", kto))
        check(p.returncode == 3 and key in p.stderr,
              f"kto {kto} is refused naming {key} (exit {p.returncode}): "
              f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")

    # The DPO demo's pairs (configs/demo-dpo.json) under KTO, the undesirable records weighted 0.25, teach its task:
    # held-out exact match from none to most. (At weight 1 the answers' digits are learnt and their end is not:
    # every rejected completion ends with EOS too, and KTO pushes each down on its own.)
    check_demo(BIN, TMP / "demo", ["train.objective=kto", "kto.undesirable_weight=0.25"],
               "KTO (kto, weights 1 desirable / 0.25 undesirable, beta 0.1)")
    finish("KTO checks")


if __name__ == "__main__":
    main()
