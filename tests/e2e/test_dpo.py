"""DPO (train.objective "dpo", data.format "preference") against TRL's DPOTrainer (tests/oracles/dpo_trl.py, trl
1.16.0): optimizer steps on a tiny fp32 model on the CPU from a PEFT adapter with non-zero B (lora.init_from; the
reference is the model as training starts, base + that adapter, as TRL's for a PeftModel), all the pairs in each
step. At the first step the policy is the reference (loss log 2) and the adapter after it equals TRL's: AdamW with a
large eps makes the first update -lr * g / (|g| + eps), close to linear in the gradient, so the adapters compare the
gradients themselves. After a second step the loss, rewards and log-probs equal TRL's logged metrics and the adapter
TRL's. The same steps split into micro-batches (gradient accumulation: 2 x 5 pairs, 10 x 1) or over two data-parallel
ranks (mpirun, 5 pairs each) give the same loss and adapter; per-sequence keep_start truncation (max_seq_len) as TRL's max_length; TRL's
loss types robust (label smoothing), hinge and ipo; DoRA from a DoRA adapter; a fresh adapter (DoRA's too) (B = 0, the reference the base) starts at loss
log 2 exactly with zero rewards; a run resumed from its checkpoint ends with the straight run's adapter (the
reference read again from lora.init_from); `qlora-train eval` gives the logged held-out DPO loss; the DPO demo
(configs/demo-dpo.json) takes the demo base's held-out exact match from 0 to at least half; a record missing
"rejected" is refused naming file:line and the key; text records with objective "dpo" are refused.

    cd build && QT_BINARY=$PWD/qlora-train python3 ../tests/e2e/test_dpo.py [--oracle-only]

--oracle-only runs the TRL side alone and prints its numbers (no binary needed)."""
import json, math, os, pathlib, random, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
from safetensors.torch import load_file
import tiny_lm
import dpo_trl
from checks import check, finish
from pair_checks import NAMES, TARGETS, check_resumed, compare_adapters, compare_metrics, make_adapter, words

ORACLE_ONLY = "--oracle-only" in sys.argv
BIN = None if ORACLE_ONLY else os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_dpo_"))
# The reference of a run from lora.init_from: the base with that adapter, frozen (TRL 1.16 with peft >= 0.20, given a
# PeftModel, keeps a frozen copy of the initial adapter as "ref": dpo_trl's reference="adapter").
REFERENCE = "adapter"
# AdamW's first update is exactly -LR * g / (|g| + EPS) (m, v bias-corrected to g, g^2): with EPS = 1 over
# gradients of at most ~0.06 it is within 6% of linear in g (optim.lr must be under 1).
BETA, EPS, LR = 0.1, 1.0, 0.5
B_STD = 0.5  # the initial adapter's B: policy far enough from the reference that rewards and margins are not ~0


def make_pairs(seed=17):
    """10 pairs of short texts: completions start with a space (the strings are concatenated as they are); one prompt
    ends with a space (its tokens are not a prefix of prompt+completion's: the completion starts where they diverge);
    one prompt ends inside a word that only the chosen completion finishes (the prompt length is the shorter of the
    two common prefixes, so the rejected completion takes in the prompt's last tokens too)."""
    rng = random.Random(seed)
    pairs = [{"prompt": words(rng, 3, 8), "chosen": " " + words(rng, 2, 6) + rng.choice([".", "!"]),
              "rejected": " " + words(rng, 2, 6) + rng.choice([".", "?"])} for _ in range(8)]
    pairs.insert(3, {"prompt": "what is two and two? ", "chosen": "four!", "rejected": "five or six."})
    pairs.insert(6, {"prompt": "the dog sat on the ca", "chosen": "t.", "rejected": " mat quickly."})
    return pairs


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sp_split(sp, pair):
    """What our trainer computes with sentencepiece: [BOS] + ids(prompt + X) + [EOS] for X chosen / rejected, the
    completion from the shorter of the two points where ids(prompt + X) and ids(prompt) first differ."""
    pre = sp.encode(pair["prompt"])
    whole = [sp.encode(pair["prompt"] + pair[x]) for x in ("chosen", "rejected")]
    k = min(next((i for i, (a, b) in enumerate(zip(w, pre)) if a != b), min(len(w), len(pre))) for w in whole)
    return [sp.bos_id()] + whole[0][:k], whole[0][k:] + [sp.eos_id()], whole[1][k:] + [sp.eos_id()]


def write_config(name, train_file, lora=None, train=None, dpo=None, data=None, optim=None, checkpoint=None):
    cfg = {"output_dir": str(TMP / name),
           "model": {"path": str(TMP / "model"), "quant": "none", "device": "cpu", "dtype": "fp32"},
           "lora": {"r": 8, "alpha": 16, "targets": TARGETS, "dropout": 0.0, **(lora or {})},
           "data": {"train_file": str(train_file), "format": "preference", "max_seq_len": 256, "packing": True,
                    **(data or {})},
           "train": {"objective": "dpo", "steps": 2, "batch_size": 10, "micro_batch_size": 10, "seed": 3,
                     "log_every": 1, **(train or {})},
           "dpo": {"beta": BETA, **(dpo or {})},
           "optim": {"lr": LR, "eps": EPS, "weight_decay": 0, "warmup_steps": 0, "schedule": "constant",
                     "max_grad_norm": 0, **(optim or {})},
           "checkpoint": {"every": 0, **(checkpoint or {})}, "logging": {"progress": "lines"}}
    path = TMP / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def train(config):
    return subprocess.run([BIN, "--config", str(config)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def step_metrics(name, step):
    """metrics.jsonl's line of `step` (the one with the DPO keys), or None."""
    path = TMP / name / "metrics.jsonl"
    if not path.exists():
        return None
    for j in map(json.loads, path.read_text().splitlines()):
        if j.get("step") == step and "loss" in j and "rewards_chosen" in j:
            return j
    return None


def run_ours(name, *args, **kw):
    """Trains; returns (metrics of the last step, adapter tensors) or None after a failed check."""
    p = train(write_config(name, *args, **kw))
    if p.returncode != 0:
        check(False, f"{name}: qlora-train exited {p.returncode}: {p.stderr[-2000:]}")
        return None
    steps = json.loads((TMP / f"{name}.json").read_text())["train"]["steps"]
    m = step_metrics(name, steps)
    adapter = TMP / name / "adapter" / "adapter_model.safetensors"
    check(m is not None and all(k in m for k in NAMES), f"{name}: metrics.jsonl has step {steps} with {sorted(NAMES)}")
    check(adapter.exists(), f"{name}: the adapter is written to {name}/adapter")
    if m is None or not adapter.exists():
        return None
    return m, load_file(str(adapter))


def trl_step(name, pairs, **kw):
    args = dict(beta=BETA, lr=LR, eps=EPS, max_length=256, reference=REFERENCE)
    args.update(kw)
    return dpo_trl.trl_dpo_step(TMP / "model", TMP / "init", pairs, TMP / f"trl_{name}", **args)


def main():
    model, sp = tiny_lm.make_model_dir(TMP / "model", seed=5)
    pairs = make_pairs()
    data = write_jsonl(TMP / "pairs.jsonl", pairs)
    make_adapter(model, TMP / "init", TMP / "model", b_std=B_STD)
    init = load_file(str(TMP / "init" / "adapter_model.safetensors"))

    # TRL: one step from init (a1: the policy is the reference, base + init, the loss log 2, the gradient not 0), two
    # steps (a: the second step's policy moved off the reference); (f) keep_start truncation per sequence: a max
    # length that cuts several completions and no prompt; TRL's other loss types. Two steps each: all the pairs each.
    trl1 = trl_step("a1", pairs)
    trl = trl_step("a", pairs, steps=2)
    lens = [(len(q["prompt_ids"]), len(q["prompt_ids"]) + max(len(q["chosen_ids"]), len(q["rejected_ids"])))
            for q in trl["pairs"]]
    max_len_f = max(p for p, _ in lens) + 2
    trl_tr = trl_step("f", pairs, max_length=max_len_f, steps=2)
    losses = {"robust": dict(loss_type="robust", label_smoothing=0.25, beta=0.3), "hinge": dict(loss_type="hinge", beta=0.5),
              "ipo": dict(loss_type="ipo", beta=0.1),
              # the rest of TRL's pairwise losses, and RPO (DPO plus the chosen answers' NLL, weighted) and a
              # three-way sum as MPO combines them
              "exo_pair": dict(loss_type="exo_pair", label_smoothing=1e-3, beta=0.3),
              "nca_pair": dict(loss_type="nca_pair", beta=0.3), "bco_pair": dict(loss_type="bco_pair", beta=0.3),
              "sppo_hard": dict(loss_type="sppo_hard", beta=0.5), "apo_zero": dict(loss_type="apo_zero", beta=0.3),
              "apo_down": dict(loss_type="apo_down", beta=0.3), "discopop": dict(loss_type="discopop", beta=0.3,
                                                                                 discopop_tau=0.1),
              "sigmoid_norm": dict(loss_type="sigmoid_norm", beta=0.5),
              "rpo": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1),
              "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1)}
    trl_loss = {k: trl_step(k, pairs, steps=2, **v) for k, v in losses.items()}
    trl_loss1 = {k: trl_step(f"{k}1", pairs, **v) for k, v in losses.items()}
    # DoRA: from a DoRA adapter (magnitudes off the norms), two steps.
    make_adapter(model, TMP / "init_dora", TMP / "model", b_std=B_STD, use_dora=True)
    init_dora = load_file(str(TMP / "init_dora" / "adapter_model.safetensors"))
    trl_dora = dpo_trl.trl_dpo_step(TMP / "model", TMP / "init_dora", pairs, TMP / "trl_dora", beta=BETA, lr=LR,
                                    eps=EPS, max_length=256, reference=REFERENCE, steps=2)
    for name, r in (("a1", trl1), ("a", trl), ("f", trl_tr), ("dora", trl_dora), *trl_loss.items()):
        print(f"oracle ({name}): " + ", ".join(f"{k} {v:.7g}" for k, v in r["metrics"].items()))
    print(f"(f) max_length {max_len_f}: {sum(l > max_len_f for _, l in lens)} of {len(lens)} pairs truncated")

    # The oracle itself: TRL's token ids are what our trainer computes with sentencepiece; TRL's logged metrics are
    # the ones computed here from the per-pair log-probs of a plain forward; every margin is far from a tie.
    for i, (q, pair) in enumerate(zip(trl["pairs"], pairs)):
        p_ids, c_ids, r_ids = sp_split(sp, pair)
        check((q["prompt_ids"], q["chosen_ids"], q["rejected_ids"]) == (p_ids, c_ids, r_ids),
              f"oracle: pair {i}: TRL's ids are [BOS] + sentencepiece's, split at the shorter common prefix"
              + (f" (prompt {len(p_ids)} tokens, its own {1 + len(sp.encode(pair['prompt']))})"
                 if len(p_ids) != 1 + len(sp.encode(pair["prompt"])) else ""))
    for r, name in ((trl1, "a1"), (trl, "a"), (trl_tr, "f"), (trl_dora, "dora"), *((v, k) for k, v in trl_loss.items())):
        bad = {k: (v, r["independent"][k]) for k, v in r["first_metrics"].items()
               if abs(v - r["independent"][k]) > 1e-5 * max(1.0, abs(v))}
        check(not bad, f"oracle ({name}): TRL's first logged metrics equal the plain forward's (differ: {bad})")
    check(abs(trl1["metrics"]["loss"] - math.log(2)) < 1e-6,
          f"oracle: at the first step the policy is the reference (loss {trl1['metrics']['loss']:.7f})")
    m2 = trl["metrics"]
    check(abs(m2["rewards/margins"]) > 1e-3 and abs(m2["loss"] - math.log(2)) > 1e-3,
          f"oracle: the second step's policy is off the reference (margin {m2['rewards/margins']:.3g}, loss "
          f"{m2['loss']:.6f})")
    gmax = max(g.abs().max().item() for g in trl1["grads"].values())
    check(1e-3 < gmax < 0.1 * EPS, f"oracle: the largest gradient {gmax:.3g}, well under eps {EPS:g}")
    trl_a1 = load_file(str(TMP / "trl_a1" / "adapter_model.safetensors"))
    trl_a = load_file(str(TMP / "trl_a" / "adapter_model.safetensors"))
    upd = {k: -LR * g / (g.abs() + EPS) for k, g in trl1["grads"].items()}
    off = max((((trl_a1[k] - init[k]) - u).abs().max() - 2 * torch.finfo(torch.float32).eps * trl_a1[k].abs().max())
              .clamp(min=0).item() / u.abs().max().item() for k, u in upd.items())
    check(off < 1e-5, f"oracle: TRL's step is one AdamW step, -lr g / (|g| + eps), to {off:.2e} of each tensor's "
                      f"largest update (no clipping, no decay, lr {LR:g}); largest {max(u.abs().max().item() for u in upd.values()):.3g}")
    if ORACLE_ONLY:
        finish("DPO oracle checks")
        return
    from_init = {"init_from": str(TMP / "init")}

    # (a1) one step: the policy is the reference (loss log 2 exactly, rewards 0), the gradient TRL's.
    got = run_ours("a1", data, lora=from_init, train={"steps": 1})
    if got:
        compare_metrics("(a1) one step", got[0], trl1["metrics"], BETA)
        check(abs(got[0]["loss"] - math.log(2)) <= 1e-7, f"(a1) one step: the loss {got[0]['loss']!r} is log 2")
        compare_adapters("(a1) one step", got[1], trl_a1, init)
    # (a) two steps, all ten pairs in one micro-batch.
    got = run_ours("a", data, lora=from_init)
    if got:
        compare_metrics("(a) one micro-batch", got[0], trl["metrics"], BETA)
        compare_adapters("(a) one micro-batch", got[1], trl_a, init)
    # (b) the same step in micro-batches of 5 pairs and of 1 (the loss a mean over the step's pairs).
    for micro in (5, 1):
        got = run_ours(f"b{micro}", data, lora=from_init, train={"micro_batch_size": micro})
        if got:
            compare_metrics(f"(b) micro-batches of {micro}", got[0], trl["metrics"], BETA)
            compare_adapters(f"(b) micro-batches of {micro}", got[1], trl_a, init)
    # (p) two data-parallel ranks (mpirun, CPU), a micro-batch of 5 pairs each: TRL's loss and adapter, as one rank's.
    cfg = write_config("p2", data, lora=from_init, train={"micro_batch_size": 5})
    p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg)], capture_output=True,
                       text=True, env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                                       "OMP_NUM_THREADS": "1"})
    check(p.returncode == 0, f"(p) two ranks complete (exit {p.returncode}) {p.stderr[-1500:] if p.returncode else ''}")
    if p.returncode == 0:
        m = step_metrics("p2", 2)
        adapter = TMP / "p2" / "adapter" / "adapter_model.safetensors"
        if m and adapter.exists():
            compare_metrics("(p) two ranks", m, trl["metrics"], BETA)
            compare_adapters("(p) two ranks", load_file(str(adapter)), trl_a, init)
        else:
            check(False, "(p) two ranks: the step's metrics and the adapter are written")
    # (e) TRL's other loss types: the first step's gradient (its adapter, to 1e-4 of the update), the second step's
    # metrics and adapter (to 5e-4: the second AdamW update divides the first step's fp32 differences by
    # sqrt(v) + eps and adds them to the second's, about twice as large here as a step alone).
    for k, v in losses.items():
        got = run_ours(f"e_{k}1", data, lora=from_init, dpo=v, train={"steps": 1})
        if got:
            compare_adapters(f"(e) loss_type {k}, one step", got[1],
                             load_file(str(TMP / f"trl_{k}1" / "adapter_model.safetensors")), init)
        got = run_ours(f"e_{k}", data, lora=from_init, dpo=v)
        if got:
            compare_metrics(f"(e) loss_type {k}", got[0], trl_loss[k]["metrics"], beta=v["beta"])
            compare_adapters(f"(e) loss_type {k}", got[1], load_file(str(TMP / f"trl_{k}" / "adapter_model.safetensors")),
                             init, rel=5e-4)
    # (g) DoRA from a DoRA adapter: TRL's step (its reference the adapter as it starts, magnitudes included); a fresh
    # DoRA adapter starts at log 2 (the reference the base: fresh adapters left out).
    got = run_ours("g", data, lora={"init_from": str(TMP / "init_dora"), "use_dora": True})
    if got:
        compare_metrics("(g) DoRA", got[0], trl_dora["metrics"], BETA)
        compare_adapters("(g) DoRA", got[1], load_file(str(TMP / "trl_dora" / "adapter_model.safetensors")), init_dora,
                         rel=5e-4)
    got = run_ours("g_fresh", data, lora={"use_dora": True}, train={"steps": 1})
    if got:
        check(abs(got[0]["loss"] - math.log(2)) <= 1e-6 and got[0]["rewards_accuracy"] == 0,
              f"(g) a fresh DoRA adapter: the loss {got[0]['loss']!r} is log 2, accuracy {got[0]['rewards_accuracy']}")
    # (f) max_seq_len cutting completions (keep_start, each sequence on its own).
    got = run_ours("f", data, lora=from_init, data={"max_seq_len": max_len_f})
    if got:
        compare_metrics(f"(f) max_seq_len {max_len_f}", got[0], trl_tr["metrics"], BETA)
        compare_adapters(f"(f) max_seq_len {max_len_f}", got[1],
                         load_file(str(TMP / "trl_f" / "adapter_model.safetensors")), init)

    # (c) a fresh adapter (B = 0): policy == reference == the base, the loss log 2 exactly, zero rewards, accuracy 0
    # (a tie is not a win); the log-probs are the base's.
    got = run_ours("c", data, train={"steps": 1})
    if got:
        m = got[0]
        check(abs(m["loss"] - math.log(2)) <= 1e-7, f"(c) fresh adapter: loss {m['loss']!r} is log 2")
        check(m["rewards_chosen"] == 0 and m["rewards_rejected"] == 0 and m["rewards_margin"] == 0
              and m["rewards_accuracy"] == 0, f"(c) fresh adapter: rewards 0, accuracy 0 ({m})")
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(str(TMP / "model"), dtype=torch.float32).eval()
        with torch.no_grad():
            base_c = sum(dpo_trl.sequence_logps(base, q["prompt_ids"], q["chosen_ids"]) for q in trl["pairs"]) / len(pairs)
            base_r = sum(dpo_trl.sequence_logps(base, q["prompt_ids"], q["rejected_ids"]) for q in trl["pairs"]) / len(pairs)
        check(abs(m["logps_chosen"] - base_c) <= 1e-5 * abs(base_c)
              and abs(m["logps_rejected"] - base_r) <= 1e-5 * abs(base_r),
              f"(c) fresh adapter: log-probs {m['logps_chosen']:.6f} / {m['logps_rejected']:.6f} are the base's "
              f"{base_c:.6f} / {base_r:.6f}")

    # (r) a resumed run: 3 steps of 4 pairs straight, against 1 step, then --resume from its checkpoint to step 3
    # (the reference read again from lora.init_from, the policy from the checkpoint): the same adapter, byte for byte;
    # held-out pairs (data.eval_fraction) evaluated at each step, and `qlora-train eval` of the last adapter on the
    # held-out records gives the run's last eval_loss.
    resumed = dict(lora=from_init, train={"batch_size": 4, "micro_batch_size": 2, "steps": 3, "eval_every": 1},
                   data={"eval_fraction": 0.2}, optim={"lr": 1e-2, "eps": 1e-8})
    straight = train(write_config("r_straight", data, **resumed))
    cfg = write_config("r_resumed", data, **{**resumed, "train": {**resumed["train"], "steps": 1}})
    first = train(cfg)
    again = subprocess.run([BIN, "--config", str(write_config("r_resumed", data, **resumed)), "--resume", "auto"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    check_resumed("(r)", straight, first, again, TMP, BIN, None)

    # (t) the DPO demo (configs/demo-dpo.json: the demo's pretrained base, no SFT first, its task's pairs from
    # scripts/make_demo_pairs.py) teaches the task: held-out exact match from none to most, rewards apart.
    root = pathlib.Path(__file__).resolve().parents[2]
    check(subprocess.run([sys.executable, str(root / "scripts" / "make_demo_pairs.py"), "--check"]).returncode == 0,
          "(t) configs/demo/task_pairs.jsonl is what scripts/make_demo_pairs.py makes")
    p = subprocess.run([BIN, "--config", "configs/demo-dpo.json", "--set", f"output_dir={TMP / 'demo'}", "--set",
                        "model.device=cpu", "--set", "logging.progress=lines"], capture_output=True, text=True,
                       cwd=root, env={**os.environ, "OMP_NUM_THREADS": "2"})
    summary = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else {}
    last = step_metrics("demo", 60) if p.returncode == 0 else None
    check(summary.get("exact_match_before", 1) < 0.05 and summary.get("exact_match_after", 0) >= 0.5 and last
          and last["rewards_accuracy"] == 1 and last["rewards_margin"] > 1,
          f"(t) the DPO demo: exact match {summary.get('exact_match_before')} -> {summary.get('exact_match_after')}, "
          f"the last step's reward accuracy {last and last['rewards_accuracy']}, margin "
          f"{last and last['rewards_margin']} (exit {p.returncode}) {p.stderr[-800:] if p.returncode else ''}")

    # `qlora-train data` of pairs: each pair's two sequences apart, the targets marked; the JSON names where the
    # rejected sequence starts; data.max_seq_len a sequence, rows of twice it.
    p = subprocess.run([BIN, "data", "--config", str(TMP / "a.json"), "--show", "2"], capture_output=True, text=True)
    shown = p.stdout.splitlines()
    check(p.returncode == 0 and sum(l.startswith("-- chosen: ") for l in shown) == 2
          and sum(l.startswith("-- rejected: ") for l in shown) == 2 and "a pair: chosen, then rejected" in p.stdout,
          f"`qlora-train data` shows each pair's chosen and rejected sequences (exit {p.returncode}): {shown[:3]}")
    p = subprocess.run([BIN, "data", "--config", str(TMP / "a.json"), "--show", "1", "--json"], capture_output=True,
                       text=True)
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")] if p.returncode == 0 else []
    q0 = trl["pairs"][0]
    want_from = len(q0["prompt_ids"]) + len(q0["chosen_ids"])
    check(len(lines) == 2 and lines[0].get("rejected_from") == want_from
          and lines[0]["ids"] == q0["prompt_ids"] + q0["chosen_ids"] + q0["prompt_ids"] + q0["rejected_ids"]
          and lines[1]["counts"]["max_seq_len"] == 256 and lines[1]["counts"]["row_tokens"] == 512,
          f"`qlora-train data --json` of a pair: TRL's ids, rejected_from {want_from}, max_seq_len 256 in rows of 512: "
          f"{[{k: v for k, v in l.items() if k not in ('ids', 'loss', 'runs')} for l in lines]}")

    # (d) bad input: a record without "rejected" (line 3) is refused naming file:line and the key; text records
    # under objective "dpo" are refused; TRL's sigmoid loss with label_smoothing is refused naming the key.
    bad = [dict(p) for p in pairs]
    del bad[2]["rejected"]
    write_jsonl(TMP / "bad_pairs.jsonl", bad)
    p = train(write_config("d1", TMP / "bad_pairs.jsonl", lora=from_init))
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check(p.returncode != 0 and "bad_pairs.jsonl:3" in p.stderr and "rejected" in p.stderr,
          f"(d) a record without \"rejected\" exits non-zero naming bad_pairs.jsonl:3 and the key (exit "
          f"{p.returncode}): {last}")
    tiny_lm.write_text_jsonl(TMP / "text.jsonl", 10, 21)
    for fmt in ("text", "auto"):
        p = train(write_config(f"d2{fmt}", TMP / "text.jsonl", data={"format": fmt}))
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        check(p.returncode != 0 and ("preference" in p.stderr or "chosen" in p.stderr),
              f"(d) text records (data.format {fmt}) with objective dpo exit non-zero naming the preference format "
              f"(exit {p.returncode}): {last}")
    p = train(write_config("d3", data, dpo={"label_smoothing": 0.1}))
    check(p.returncode != 0 and "dpo.label_smoothing" in p.stderr,
          f"(d) label_smoothing with the sigmoid loss is refused naming dpo.label_smoothing (exit {p.returncode}): "
          f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    p = train(write_config("d5", data, train={"neftune_alpha": 5.0}))
    check(p.returncode != 0 and "train.neftune_alpha" in p.stderr,
          f"(d) NEFTune with DPO is refused naming train.neftune_alpha (exit {p.returncode})")
    # A resume whose lora.init_from changed (the reference would be another model) is refused naming it.
    import shutil
    from safetensors.torch import save_file
    shutil.copytree(TMP / "init", TMP / "init_moved")
    moved = dict(lora={"init_from": str(TMP / "init_moved")}, train={"steps": 1, "batch_size": 5, "micro_batch_size": 5},
                 checkpoint={"every": 1})
    cfg = write_config("d6", data, **moved)
    first = train(cfg)
    t = load_file(str(TMP / "init_moved" / "adapter_model.safetensors"))
    save_file({k: v * 2 if "lora_B" in k else v for k, v in t.items()}, str(TMP / "init_moved" / "adapter_model.safetensors"))
    again = subprocess.run([BIN, "--config", str(write_config("d6", data, **{**moved, "train": {**moved["train"], "steps": 2}})),
                            "--resume", "auto"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    check(first.returncode == 0 and again.returncode != 0 and "lora.init_from" in again.stderr,
          f"(d) a resume whose lora.init_from changed is refused naming it (exits {first.returncode}, "
          f"{again.returncode}): {again.stderr.strip().splitlines()[-1] if again.stderr.strip() else ''}")
    sft = json.loads(write_config("d4", data).read_text())
    sft["train"]["objective"] = "sft"
    sft.pop("dpo")
    (TMP / "d4.json").write_text(json.dumps(sft))
    p = train(TMP / "d4.json")
    check(p.returncode != 0 and "train.objective" in p.stderr,
          f"(d) preference pairs under objective sft are refused naming train.objective (exit {p.returncode}): "
          f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    finish("DPO checks")


if __name__ == "__main__":
    main()
