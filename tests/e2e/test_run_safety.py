"""What a user meets before training starts, on a tiny NF4 model (CPU): an output directory that holds another run
is refused (naming its files, touching none) unless --resume or --overwrite-output-dir says what to do; `--resume
auto` without a checkpoint starts a new run; a resume refuses a changed schedule length or train file; an output_dir that is a file is a config error; bad keys and values
(HF / PEFT / TRL spellings too) stop the run before any data is read; "all-linear" and optim.warmup_ratio; data.truncation;
records with no target left out; a resume with the data at another path."""
import json, os, pathlib, shutil, subprocess, sys, tempfile, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, save_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_safety_"))


def write_config(name, **over):
    cfg = {"output_dir": str(TMP / name), "model": {"path": str(TMP / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8},
           "data": {"train_file": str(TMP / "train.jsonl"), "format": "text", "max_seq_len": 32, "packing": True},
           "train": {"steps": 2, "batch_size": 2, "seed": 3, "log_every": 1},
           "optim": {"lr": 2e-3}, "checkpoint": {"every": 1, "keep_last": 3}, "eval": {},
           "logging": {"progress": "lines"}}
    return save_config(TMP, name, cfg, over)


def train(config, *extra):
    return subprocess.run([BIN, "--config", str(config), *extra], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def last_line(p):
    lines = p.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def snapshot(d):
    """Every file of a run under d, its bytes and time (not the lock file each run takes: .qlora-train.lock)."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".qlora-train.lock"}


def main():
    import torch
    p = subprocess.run([BIN, "--version"], capture_output=True, text=True)
    check(p.returncode == 0 and "commit " in p.stdout and f"LibTorch {torch.__version__.split('+')[0]}" in p.stdout
          and "CUDA kernels" in p.stdout, f"--version names the commit, LibTorch and CUDA: {p.stdout.strip()}")

    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 16, 21)

    # A file size limit (ulimit -f) the first checkpoint's optimizer state passes: the write fails naming the file
    # and EFBIG, exit 8 (SIGXFSZ killed the process with no message, exit 153, before it was ignored); the run
    # resumed without the limit completes.
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))  # the adapter 39 KB, AdamW's 79 KB
    p = subprocess.run([BIN, "--config", str(write_config("fsz"))], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit)
    check(p.returncode == 8 and "optimizer.safetensors" in p.stderr and "File too large" in p.stderr,
          f"a file past the size limit is an I/O error naming it, not SIGXFSZ (exit {p.returncode}): {last_line(p)}")
    p = train(write_config("fsz"), "--resume", "auto")
    check(p.returncode == 0 and (TMP / "fsz" / "adapter" / "adapter_model.safetensors").is_file(),
          f"the run resumed without the limit completes (exit {p.returncode}): {last_line(p)}")

    # A finished run, then a new run into its directory: refused at start, naming the files, none of them touched.
    p = train(write_config("o"))
    check(p.returncode == 0, f"a first run exits 0 ({p.returncode}) {last_line(p)}")
    before = snapshot(TMP / "o")
    p = train(write_config("o", train__seed=4))
    check(p.returncode == 3 and "checkpoint-2" in p.stderr and "adapter" in p.stderr and "metrics.jsonl" in p.stderr
          and "--overwrite-output-dir" in p.stderr and "output_dir" in p.stderr,
          f"a new run into a used output_dir is refused naming its files (exit {p.returncode}): {last_line(p)}")
    check("data:" not in p.stderr, "the refusal comes before the data is tokenized")
    check(snapshot(TMP / "o") == before, "the refused run touched none of the earlier run's files")

    # --overwrite-output-dir with data that does not load (a line cut short) or a missing model: the earlier run is
    # left whole (it is replaced only once the new run's data and model have loaded).
    bad = TMP / "bad.jsonl"
    bad.write_text((TMP / "train.jsonl").read_text() + '{"text": "cut\n')
    p = train(write_config("o", train__seed=4, data__train_file=str(bad)), "--overwrite-output-dir")
    check(p.returncode == 5 and "bad.jsonl" in p.stderr and "removing" not in p.stderr,
          f"--overwrite-output-dir with a bad data line: exit 5 naming the file (exit {p.returncode}) {last_line(p)}")
    check(snapshot(TMP / "o") == before, "... and the earlier run's files are all there, untouched")
    p = train(write_config("o", train__seed=4, model__path=str(TMP / "no_model")), "--overwrite-output-dir")
    check(p.returncode == 4 and snapshot(TMP / "o") == before,
          f"... a missing model: exit 4, the earlier run untouched (exit {p.returncode}) {last_line(p)}")
    empty = write_config("empty")
    empty.write_text(json.dumps({**json.loads(empty.read_text()), "output_dir": ""}))
    p = train(empty)
    check(p.returncode == 3 and "output_dir" in last_line(p) and "empty" in last_line(p),
          f"an empty output_dir is a config error naming the key (exit {p.returncode}) {last_line(p)}")
    # A run that stopped before its first checkpoint (a non-finite loss at step 1) leaves its config and metrics:
    # the corrected run replaces them without --overwrite-output-dir (nothing there to resume).
    p = subprocess.run([BIN, "--config", str(write_config("early")), "--set", "checkpoint.every=0"], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "QT_TEST_NAN_LOSS_AT_STEP": "1"})
    check(p.returncode == 7 and (TMP / "early" / "metrics.jsonl").exists() and
          not any(n.name.startswith("checkpoint-") for n in (TMP / "early").iterdir()),
          f"a run stopped at step 1 leaves metrics and no checkpoint (exit {p.returncode}) {last_line(p)}")
    check("no checkpoint was written" in last_line(p) and "first step" in last_line(p) and "lr?" not in last_line(p),
          "... and says so: no checkpoint, and at the first step the model, adapter or data, not the learning rate")
    p = train(write_config("early"))
    check(p.returncode == 0 and "before its first checkpoint" in p.stderr and (TMP / "early" / "adapter").is_dir(),
          f"... and the run started again in that output_dir replaces them (exit {p.returncode}) {last_line(p)}")
    # A config.json whose vocab_size is below the tokenizer's ids (a tokenizer and a model that do not belong
    # together): a model error naming config.json's key and the data's token, before the model loads.
    shutil.copytree(TMP / "model", TMP / "model_v")
    cj = json.loads((TMP / "model_v" / "config.json").read_text())
    cj["vocab_size"] = 10
    (TMP / "model_v" / "config.json").write_text(json.dumps(cj))
    p = train(write_config("vocab", model__path=str(TMP / "model_v")))
    check(p.returncode == 4 and "vocab_size" in last_line(p) and "token id" in last_line(p) and "train.jsonl" in last_line(p),
          f"vocab_size below the tokenizer's ids: exit 4 naming the key and the data (exit {p.returncode}) {last_line(p)}")
    # Sizes no run can hold, refused with the key before the model loads (a CPU allocation failure aborts the
    # process): a LoRA rank above a linear's smaller side, packed rows whose masks exceed the host on the CPU.
    p = train(write_config("rank", lora__r=100000))
    check(p.returncode == 3 and "lora.r" in last_line(p) and "smaller side" in last_line(p),
          f"lora.r above a linear's smaller side: exit 3 naming the key (exit {p.returncode}) {last_line(p)}")
    p = train(write_config("long", data__max_seq_len=10000000))
    check(p.returncode == 3 and "data.max_seq_len" in last_line(p) and "on the CPU" in last_line(p),
          f"packed rows whose masks exceed the host: exit 3 naming the key (exit {p.returncode}) {last_line(p)}")
    # Found by fuzzing (round 8): train.epochs 2^62 times the steps of an epoch wrapped to 0 steps, and the run saved
    # an untrained adapter with exit 0.
    p = train(write_config("epochs", train__steps=0, train__epochs=2**62))
    check(p.returncode == 3 and "train.epochs" in last_line(p) and "64-bit" in last_line(p)
          and not (TMP / "epochs" / "adapter").exists(),
          f"train.epochs whose steps overflow a 64-bit count: exit 3 naming the key (exit {p.returncode}) {last_line(p)}")
    # --overwrite-output-dir replaces the earlier run: its checkpoints do not survive beside the new run's.
    p = train(write_config("o", train__seed=4, checkpoint__every=2), "--overwrite-output-dir")
    check(p.returncode == 0 and "removing" in p.stderr, f"--overwrite-output-dir replaces it (exit {p.returncode}) {last_line(p)}")
    check(not (TMP / "o" / "checkpoint-1").exists() and (TMP / "o" / "checkpoint-2" / "COMPLETE").exists(),
          "the earlier run's checkpoint-1 is gone, the new run's checkpoint-2 is there")
    p = train(write_config("o"), "--resume", "auto", "--overwrite-output-dir")
    check(p.returncode == 2, f"--resume with --overwrite-output-dir is a usage error (exit {p.returncode})")

    # --resume auto without a checkpoint starts a new run and says so (preemptible jobs); --resume PATH stays strict.
    p = train(write_config("fresh"), "--resume", "auto")
    check(p.returncode == 0 and "starting a new run" in p.stderr and (TMP / "fresh" / "adapter").is_dir(),
          f"--resume auto with no checkpoint starts a new run (exit {p.returncode}) {last_line(p)}")
    (TMP / "pre").mkdir()
    (TMP / "pre" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    p = train(write_config("pre"), "--resume", "auto")
    records = [json.loads(l) for l in (TMP / "pre" / "metrics.jsonl").read_text().splitlines()]
    check(p.returncode == 0 and "plan" in records[0] and [r["loss"] for r in records if "loss" in r][0] != 9.0,
          f"--resume auto replaces what a run left before its first checkpoint (exit {p.returncode})")
    # Its only checkpoint damaged (a file deleted by hand): refused, saying so (it read "holds a finished run"), the
    # checkpoint left as it is.
    shutil.copytree(TMP / "fresh", TMP / "damaged", ignore=shutil.ignore_patterns("adapter", "checkpoint-1"))
    (TMP / "damaged" / "checkpoint-2" / "optimizer.safetensors").unlink()
    p = train(write_config("damaged"), "--resume", "auto")
    check(p.returncode == 3 and "optimizer.safetensors: missing from the checkpoint" in p.stderr
          and "holds checkpoints none of which loads (checkpoint-2" in last_line(p)
          and (TMP / "damaged" / "checkpoint-2" / "COMPLETE").exists(),
          f"--resume auto with its only checkpoint damaged: exit 3 naming it (exit {p.returncode}) {last_line(p)}")
    p = train(write_config("fresh2"), "--resume", str(TMP / "fresh2" / "checkpoint-9"))
    check(p.returncode == 6 and "checkpoint-9" in p.stderr, f"--resume PATH without a checkpoint is an error (exit {p.returncode})")

    # An output_dir that is a file: a config error naming it.
    (TMP / "afile").write_text("x")
    p = train(write_config("afile"))
    check(p.returncode == 3 and "output_dir" in p.stderr and "is a file" in p.stderr,
          f"an output_dir that is a file is refused (exit {p.returncode}): {last_line(p)}")
    check("data:" not in p.stderr, "and before the data is tokenized")

    # Resume gaps: a changed schedule length or train file is refused, naming it, unless --resume-allow-changes;
    # fewer steps than the checkpoint has done is an error. ("o" holds checkpoint-2 of a 2-step run.)
    p = train(write_config("o", train__seed=4, checkpoint__every=2, train__steps=4), "--resume", "auto")
    check(p.returncode == 6 and "train.steps" in p.stderr and "2 -> 4" in p.stderr and "--resume-allow-changes" in p.stderr,
          f"a changed train.steps is refused on resume (exit {p.returncode}): {last_line(p)}")
    p = train(write_config("o", train__seed=4, checkpoint__every=2, train__steps=1), "--resume", "auto")
    check(p.returncode == 3 and "train.steps" in p.stderr and "fewer than the 2" in p.stderr,
          f"fewer steps than the checkpoint has done is an error (exit {p.returncode}): {last_line(p)}")
    (TMP / "train2.jsonl").write_text((TMP / "train.jsonl").read_text() + '{"text": "one more record"}\n')
    (TMP / "train.jsonl").rename(TMP / "train.orig.jsonl")
    (TMP / "train2.jsonl").rename(TMP / "train.jsonl")
    p = train(write_config("o", train__seed=4, checkpoint__every=2), "--resume", "auto")
    check(p.returncode == 6 and "data.train_file" in p.stderr,
          f"a changed train file is refused on resume (exit {p.returncode}): {last_line(p)}")
    p = train(write_config("o", train__seed=4, checkpoint__every=2, train__steps=3), "--resume", "auto", "--resume-allow-changes")
    check(p.returncode == 0 and "with changes" in p.stderr and (TMP / "o" / "checkpoint-3").exists(),
          f"--resume-allow-changes resumes anyway, with a warning (exit {p.returncode}): {last_line(p)}")
    # The same file at another path (a run moved to another directory): refused, naming the flag; resumed with it
    # (its content is the same: no warning about it).
    (TMP / "moved").mkdir()
    shutil.copy(TMP / "train.jsonl", TMP / "moved" / "train.jsonl")
    moved = dict(train__seed=4, checkpoint__every=2, train__steps=3, data__train_file=str(TMP / "moved" / "train.jsonl"))
    p = train(write_config("o", **moved), "--resume", "auto")
    check(p.returncode == 6 and "data.train_file" in p.stderr and "other paths" in p.stderr
          and "--resume-allow-changes" in p.stderr, f"a moved train file is refused on resume, naming the flag "
          f"(exit {p.returncode}): {last_line(p)}")
    p = train(write_config("o", **moved), "--resume", "auto", "--resume-allow-changes")
    check(p.returncode == 0 and "other paths" in p.stderr and "with changes" not in p.stderr
          and "resumed from" in p.stderr,
          f"... and resumed with --resume-allow-changes (exit {p.returncode}): "
          f"{[l for l in p.stderr.splitlines() if 'warn' in l] or last_line(p)}")
    (TMP / "train.jsonl").rename(TMP / "train2.jsonl")
    (TMP / "train.orig.jsonl").rename(TMP / "train.jsonl")

    # Configuration errors arrive before the data is tokenized and the model loads, naming the key.
    for sets, needles, what in [
            (["lora.targets=[\"qproj\"]"], ["lora.targets", "q_proj"], "a bad lora.targets"),
            (["lora=5"], ["'lora'", "JSON object"], "--set lora=5"),
            (["data.chat_template=llama-3"], ["data.chat_template", "llama3"], "an unknown data.chat_template"),
            (["lora.lora_alpha=16"], ["lora.lora_alpha", "did you mean lora.alpha?"], "PEFT's lora.lora_alpha"),
            (["optim.learning_rate=1e-4"], ["optim.learning_rate", "optim.lr"], "HF's optim.learning_rate"),
            (["data.max_length=64"], ["data.max_length", "data.max_seq_len"], "TRL's data.max_length")]:
        p = train(write_config("bad"), *[a for s in sets for a in ("--set", s)])
        check(p.returncode == 3 and all(n in p.stderr for n in needles) and "data:" not in p.stderr
              and not (TMP / "bad").exists(),
              f"{what} is a config error before any data is read (exit {p.returncode}): {last_line(p)}")

    # PEFT's "all-linear" trains the seven projections; optim.warmup_ratio gives ceil(ratio x steps) warmup steps.
    p = train(write_config("all", lora__targets="all-linear", optim__warmup_ratio=0.5))
    ref = train(write_config("seven", optim__warmup_steps=1))
    lr = lambda name: [j["lr"] for j in map(json.loads, (TMP / name / "metrics.jsonl").read_text().splitlines()) if "lr" in j]
    check(p.returncode == 0 and ref.returncode == 0 and lr("all") == lr("seven")
          and (TMP / "all" / "adapter" / "adapter_model.safetensors").read_bytes()
          == (TMP / "seven" / "adapter" / "adapter_model.safetensors").read_bytes(),
          f"\"all-linear\" and warmup_ratio 0.5 of 2 steps train as the seven projections with 1 warmup step ({lr('all') if p.returncode == 0 else last_line(p)})")

    # data.truncation on chat records whose answers start after data.max_seq_len (lines 4-6): "truncate" (the default)
    # warns that they lose every target, "drop" leaves them out, "error" stops naming them; records that leave no
    # target at all stop the run before the model loads, naming data.max_seq_len.
    short = [{"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}] * 3
    long = [{"messages": [{"role": "user", "content": " ".join(["cat sat on the mat"] * 16)},
                          {"role": "assistant", "content": "dog"}]}] * 3
    (TMP / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short + long))
    (TMP / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    chat = dict(data__train_file=str(TMP / "chat.jsonl"), data__format="chat", data__chat_template="llama2",
                data__max_seq_len=48, data__packing=False, checkpoint__every=0)
    p = train(write_config("trunc", **chat))
    check(p.returncode == 0 and "lose every target token" in p.stderr and "lines 4, 5, 6" in p.stderr
          and "3 of 6 training records (lines 4, 5, 6) hold no target token" in p.stderr and "left out" in p.stderr,
          f"data.truncation \"truncate\" warns about the records that lose every target, and leaves them out "
          f"(exit {p.returncode}): {last_line(p)}")
    p = train(write_config("drop", data__truncation="drop", **chat))
    check(p.returncode == 0 and "3 of 6 records" in p.stderr and "left out (3 remain)" in p.stderr,
          f"data.truncation \"drop\" leaves the long records out, counted (exit {p.returncode}): {last_line(p)}")

    # tokens/s counts input tokens (as peers do), target tokens/s beside it: in the log line, metrics.jsonl and the
    # summary. Prompts are masked here, so the two differ.
    steps = [j for j in map(json.loads, (TMP / "drop" / "metrics.jsonl").read_text().splitlines()) if "loss" in j]
    summary = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    check(len(steps) == 2 and all(s["tokens"] > s["target_tokens"] > 0 and
                                  abs(s["tokens_per_s"] / s["target_tokens_per_s"] - s["tokens"] / s["target_tokens"]) < 1e-6
                                  for s in steps)
          and summary.get("tokens_per_s", 0) > summary.get("target_tokens_per_s", 1e30) > 0
          and " target)" in p.stderr,
          f"tokens/s counts input tokens, target tokens/s beside it ({steps[-1] if steps else None}; {summary})")
    p = train(write_config("dropall", data__truncation="drop", **{**chat, "data__train_file": str(TMP / "long.jsonl")}))
    check(p.returncode == 5 and "data.truncation" in last_line(p) and "leaves no training record" in last_line(p),
          f"\"drop\" of every record: exit 5 naming data.truncation (exit {p.returncode}): {last_line(p)}")
    p = train(write_config("err", data__truncation="error", **chat))
    check(p.returncode == 5 and "data.truncation" in p.stderr and "lines 4, 5, 6" in p.stderr and "max_seq_len = 48" in p.stderr,
          f"data.truncation \"error\" stops naming the records (exit {p.returncode}): {last_line(p)}")
    p = train(write_config("none", **{**chat, "data__train_file": str(TMP / "long.jsonl")}))
    check(p.returncode == 5 and "data.max_seq_len" in p.stderr and "no target token" in p.stderr and "lines 1, 2, 3" in p.stderr
          and "LoRA parameters" not in p.stderr,
          f"records that leave no target stop the run before the model loads (exit {p.returncode}): {last_line(p)}")
    # Records with no target at all, nothing cut (chat records of a system message only): named as such, not
    # blamed on data.max_seq_len.
    (TMP / "system.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"}]}) + "\n")
    p = train(write_config("sys", **{**chat, "data__train_file": str(TMP / "system.jsonl")}))
    check(p.returncode == 5 and "data.train_file" in last_line(p) and "hold no target token" in last_line(p)
          and "data.max_seq_len" not in last_line(p),
          f"records without any target: exit 5 naming data.train_file (exit {p.returncode}): {last_line(p)}")

    # generate stops at config.json's eos_token_id where the tokenizer files name no EOS (transformers' generate
    # falls back on the model config's).
    shutil.copytree(TMP / "model", TMP / "noeos")
    tc = json.loads((TMP / "noeos" / "tokenizer_config.json").read_text())
    (TMP / "noeos" / "tokenizer_config.json").write_text(json.dumps({**tc, "eos_token": None}))
    (TMP / "noeos" / "generation_config.json").unlink(missing_ok=True)
    def gen(eos):
        c = json.loads((TMP / "noeos" / "config.json").read_text())
        (TMP / "noeos" / "config.json").write_text(json.dumps({**c, "eos_token_id": eos}))
        p = subprocess.run([BIN, "generate", "--model", str(TMP / "noeos"), "--prompt", "the cat", "--max-new-tokens", "6",
                            "--json"], capture_output=True, text=True)
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": last_line(p)}
    free = gen(None)
    first = free.get("ids", [None])[0]
    stopped = gen(first) if first is not None else {}
    check(stopped.get("stop") == "eos" and stopped.get("ids") == [first],
          f"generate stops at config.json's eos_token_id when the tokenizer names none ({free} / {stopped})")

    # A byte-level BPE model that stops inside a UTF-8 character: generate --json prints valid JSON whose text is
    # what tokenizers' decode gives (U+FFFD for the partial sequence). The model is made to repeat id 0 (lm_head
    # zero: all logits tie), and id 0 is given to the token of the lone byte 0xE2 (the start of a 3-byte character).
    bpe = pathlib.Path(os.environ.get("QT_FIXTURES", "")) / "tokenizer" / "bpe"
    if (bpe / "tokenizer.json").exists():
        import torch
        from safetensors.torch import load_file, save_file
        from tokenizers import Tokenizer
        doc = json.loads((bpe / "tokenizer.json").read_text())
        vocab = doc["model"]["vocab"]
        lone = "\u00e2"  # ByteLevel's character for the byte 0xE2
        first = next(t for t, i in vocab.items() if i == 0)
        vocab[first], vocab[lone] = vocab[lone], 0
        (TMP / "bpe").mkdir()
        (TMP / "bpe" / "tokenizer.json").write_text(json.dumps(doc))
        shutil.copy(bpe / "tokenizer_config.json", TMP / "bpe" / "tokenizer_config.json")
        n = max([*vocab.values(), *(a["id"] for a in doc.get("added_tokens", []))]) + 1
        tiny_lm.make_model(TMP / "bpe", n, seed=1)
        w = load_file(str(TMP / "bpe" / "model.safetensors"))
        w["lm_head.weight"] = torch.zeros_like(w["lm_head.weight"])
        save_file(w, str(TMP / "bpe" / "model.safetensors"), metadata={"format": "pt"})
        p = subprocess.run([BIN, "generate", "--model", str(TMP / "bpe"), "--prompt", "hi", "--max-new-tokens", "4",
                            "--quant", "none", "--json"], capture_output=True)
        try:
            out = json.loads(p.stdout.decode("utf-8").strip().splitlines()[-1])
        except (UnicodeDecodeError, ValueError, IndexError):
            out = {}
        want = Tokenizer.from_file(str(TMP / "bpe" / "tokenizer.json")).decode(out.get("ids", [0]))
        check(p.returncode == 0 and out.get("ids") == [0, 0, 0, 0] and out.get("text") == want and "\ufffd" in want,
              f"generate --json on a partial UTF-8 sequence prints tokenizers' decode {want!r} (exit {p.returncode}): "
              f"{out or p.stderr.decode(errors='replace').strip()[-300:]}")
        p = subprocess.run([BIN, "generate", "--model", str(TMP / "bpe"), "--prompt", "hi", "--max-new-tokens", "4",
                            "--quant", "none"], capture_output=True)
        check(p.returncode == 0 and p.stdout.decode("utf-8", errors="strict").rstrip("\n") == want,
              "and the plain output is the same valid UTF-8 text")
    else:
        check(False, f"the byte-level BPE fixture {bpe} exists (QT_FIXTURES)")

    # The exact-match metric lands in metrics.jsonl too, before (step 0) and after training.
    (TMP / "em.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    p = train(write_config("em", eval__exact_match_file=str(TMP / "em.jsonl"), eval__max_new_tokens=3, **chat))
    em = [j for j in map(json.loads, (TMP / "em" / "metrics.jsonl").read_text().splitlines()) if "exact_match" in j] \
        if p.returncode == 0 else []
    check([j["step"] for j in em] == [0, 2] and all(j["exact_match_total"] == 3 for j in em),
          f"exact match is in metrics.jsonl before and after training (exit {p.returncode}): {em}")
    # Two runs into one output_dir at the same time (a job submitted twice): the second is refused, naming the
    # first's process, and the first runs on.
    first = subprocess.Popen([BIN, "--config", str(write_config("busy"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "QT_TEST_SETUP_DELAY_MS": "6000"})
    lock = TMP / "busy" / ".qlora-train.lock"
    for _ in range(100):
        if lock.exists() and lock.read_text().startswith("pid "):
            break
        time.sleep(0.1)
    p = train(write_config("busy"), "--resume", "auto")
    out, err = first.communicate(timeout=300)
    check(p.returncode == 3 and "in use by another run" in last_line(p) and f"pid {first.pid}" in last_line(p),
          f"a second run into a busy output_dir is refused, naming the first (exit {p.returncode}): {last_line(p)}")
    check(first.returncode == 0 and (TMP / "busy" / "adapter").is_dir(),
          f"... and the first completes (exit {first.returncode}) {err.strip().splitlines()[-1:] if first.returncode else ''}")
    # Chat records without an answer among others: left out at load, named, so that no batch is made of them alone
    # (one row a step, no packing: a step of such a record had nothing to train on and stopped the run).
    answered = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
                for w in ("one", "two", "three", "four")]
    unanswered = [{"messages": [{"role": "user", "content": f"ask {w}"}]} for w in ("five", "six", "seven", "eight")]
    (TMP / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for pair in zip(answered, unanswered) for r in pair))
    half = dict(data__train_file=str(TMP / "half.jsonl"), data__format="chat", data__chat_template="llama2",
                data__packing=False, data__shuffle=False, train__batch_size=1, train__steps=6, checkpoint__every=0)
    p = train(write_config("half", **half))
    check(p.returncode == 0 and "4 of 8 training records (lines 2, 4, 6, 8) hold no target token" in p.stderr,
          f"records with no target are left out at load and the run trains on the rest (exit {p.returncode}): "
          f"{last_line(p)}")
    # Held-out records with no target at all: refused before the model loads (their loss would be over no token).
    (TMP / "noeval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unanswered))
    p = train(write_config("noeval", data__eval_file=str(TMP / "noeval.jsonl"), **half))
    check(p.returncode == 5 and "data.eval_file" in last_line(p) and "no token" in last_line(p),
          f"an eval_file with no target token is refused (exit {p.returncode}): {last_line(p)}")

    # Found by fuzzing (round 9): launcher variables that no launcher sets ran one process of its own, silently (RANK
    # alone; WORLD_SIZE 2^32 + 1 wrapped to 1; OMPI_COMM_WORLD_SIZE=2 without mpirun made MPI's singleton, which
    # trained as rank 0 of 1 with its log and summary line muted as rank 1's). A usage error naming the variables.
    cfg = write_config("launch")
    for env, says in [({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
                      ({"RANK": "0", "WORLD_SIZE": "4294967297"}, "WORLD_SIZE='4294967297': expected an integer in"),
                      ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
                       "OMPI_COMM_WORLD_RANK=1 and OMPI_COMM_WORLD_SIZE=2 are set, but MPI started this process as "
                       "rank 0 of 1")]:
        launch_env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_COMM_WORLD") and
                      k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        p = subprocess.run([BIN, "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                           env={**launch_env, "OMP_NUM_THREADS": "1", **env})
        check(p.returncode == 2 and says in last_line(p) and not (TMP / "launch" / "metrics.jsonl").exists(),
              f"launcher variables {env}: a usage error before training (exit {p.returncode}): {last_line(p)}")
    finish("run safety checks")


if __name__ == "__main__":
    main()
