"""Warnings a user should see (issue 29): chat records with no assistant message (nothing to train on) are named by
line, and so are those whose reasoning_content, reasoning in the answer or system message the chat template leaves
out; an adapter applied to another base than
the one adapter_config.json names is warned about (eval, generate, lora.init_from), the same base through a symbolic
link is not; a second Ctrl-C says that it exits at once."""
import json, os, pathlib, signal, subprocess, sys, tempfile, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_warnings_"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def config(name, **data):
    path = TMP / f"{name}.json"
    path.write_text(json.dumps({
        "output_dir": str(TMP / name), "model": {"path": str(TMP / "a"), "device": "cpu"}, "lora": {"r": 4},
        "data": {"train_file": str(TMP / "train.jsonl"), "max_seq_len": 32, **data},
        "train": {"steps": 2, "batch_size": 2}, "checkpoint": {}, "logging": {"progress": "lines"}}))
    return path


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, env=ENV)


def main():
    tiny_lm.make_model_dir(TMP / "a", seed=1)
    tiny_lm.make_model_dir(TMP / "b", seed=2)
    (TMP / "a_link").symlink_to(TMP / "a")
    words = tiny_lm.corpus(16, 5)
    chat = []
    for i in range(8):
        m = [{"role": "user", "content": words[2 * i]}]
        if i not in (1, 4):
            m.append({"role": "assistant", "content": words[2 * i + 1]})
        chat.append({"messages": m})
    (TMP / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 8, 3)

    p = run("--config", config("chat", train_file=str(TMP / "chat.jsonl"), chat_template="llama2", max_seq_len=128))
    check(p.returncode == 0 and "2 chat record(s) with no assistant message (lines 2, 5)" in p.stderr
          and "chat.jsonl" in p.stderr, f"chat records with only a user turn are named by line (exit {p.returncode}) "
          f"{[l for l in p.stderr.splitlines() if 'assistant' in l]}")
    # reasoning_content that the template leaves out (only Qwen3's renders it): warned, naming the lines.
    for i in (2, 5):
        chat[i]["messages"][-1]["reasoning_content"] = "because"
    chat[0]["messages"][-1]["reasoning_content"] = ""  # nothing left out
    (TMP / "reasoning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    p = run("--config", config("reasoning", train_file=str(TMP / "reasoning.jsonl"), chat_template="llama2",
                               max_seq_len=128))
    check(p.returncode == 0 and "2 chat record(s) with a reasoning_content (lines 3, 6) that the llama2 template "
          "leaves out" in p.stderr, f"reasoning_content the template leaves out is named by line (exit "
          f"{p.returncode}) {[l for l in p.stderr.splitlines() if 'reasoning' in l]}")
    # A system message that Mistral v0.3's template leaves out (it renders one in a last user message alone): warned,
    # naming the lines; not where the record ends with its user message (line 2).
    for i in (1, 2, 5):
        chat[i]["messages"].insert(0, {"role": "system", "content": words[0]})
    for r in chat:
        r["messages"][-1].pop("reasoning_content", None)
    (TMP / "system.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    p = run("--config", config("system", train_file=str(TMP / "system.jsonl"), chat_template="mistral-v0.3",
                               max_seq_len=128))
    check(p.returncode == 0 and "2 chat record(s) with a system message (lines 3, 6) that the mistral-v0.3 template "
          "leaves out" in p.stderr, f"a system message the template leaves out is named by line (exit "
          f"{p.returncode}) {[l for l in p.stderr.splitlines() if 'system message' in l]}")
    for i in (1, 2, 5):
        chat[i]["messages"].pop(0)
    # Answers whose reasoning DeepSeek-R1-Distill-Llama's template leaves out (it keeps what follows the last
    # </think>): warned, naming the lines. A tiny model with that template's tokenizer (gen_data's fixture recipe).
    import gen_data, gen_tokenizer
    (TMP / "tok").mkdir()
    gen_tokenizer.make_bpe(TMP / "tok", gen_tokenizer.corpus_lines())
    gen_data.deepseek_dir(TMP / "ds", TMP / "tok" / "bpe", gen_data.DEEPSEEK_R1)
    tiny_lm.make_model(TMP / "ds", vocab_size=1024, seed=3)
    think = [{"messages": [{"role": "user", "content": words[i]},
                           {"role": "assistant", "content": (f"<think>{words[i + 1]}</think>" if i in (1, 3) else "")
                            + words[i + 2]}]} for i in range(5)]
    (TMP / "think.jsonl").write_text("".join(json.dumps(r) + "\n" for r in think))
    cfg = json.loads(config("think", train_file=str(TMP / "think.jsonl"), max_seq_len=128).read_text())
    cfg["model"]["path"] = str(TMP / "ds")
    (TMP / "think.json").write_text(json.dumps(cfg))
    p = run("--config", TMP / "think.json")
    check(p.returncode == 0 and "2 chat record(s) with an answer holding </think> (lines 2, 4): the deepseek-r1 "
          "template keeps what follows" in p.stderr, f"answers whose reasoning the template leaves out are named by "
          f"line (exit {p.returncode}) {[l for l in p.stderr.splitlines() if 'think' in l or 'rror' in l]}")
    # A held-out share too small to hold out a record: warned, the run trains without evaluation.
    (TMP / "one.jsonl").write_text((TMP / "train.jsonl").read_text().splitlines()[0] + "\n")
    p = run("--config", config("one", train_file=str(TMP / "one.jsonl"), eval_fraction=0.5))
    check(p.returncode == 0 and "holds none out" in p.stderr,
          f"data.eval_fraction that holds out nothing is warned about (exit {p.returncode}) {p.stderr[-300:]}")
    # Under mpirun with 2 ranks (each reads the data whole) the data's warning comes once, from rank 0.
    cfg = config("chat_2", train_file=str(TMP / "chat.jsonl"), chat_template="llama2", max_seq_len=128)
    p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg)], capture_output=True,
                       text=True, env={**ENV, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    said = (p.stderr + p.stdout).count("with no assistant message")
    check(p.returncode == 0 and said == 1, f"2 ranks: the data's warning once (exit {p.returncode}, {said} times)")
    # ... and so do the resume's warnings (every rank printed them before, fuzzing round 9): an interrupted save
    # passed over, a resume with a changed schedule length.
    (TMP / "chat_2" / ".checkpoint-9.tmp-1").mkdir()
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "train": {"steps": 3, "batch_size": 2}}))
    p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg), "--resume", "auto",
                        "--resume-allow-changes"], capture_output=True, text=True,
                       env={**ENV, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    said = [(p.stderr + p.stdout).count(w) for w in ("ignoring the incomplete checkpoint", "with changes")]
    check(p.returncode == 0 and said == [1, 1], f"2 ranks: the resume's warnings once (exit {p.returncode}, {said} times)")
    p = run("--config", config("chat_all", train_file=str(TMP / "chat.jsonl"), chat_template="llama2", max_seq_len=128,
                               train_on_prompt=True))
    check(p.returncode == 0 and "no assistant message" not in p.stderr, "not with data.train_on_prompt (they train)")

    # An adapter trained on a, applied to b: warned; to a through a link: not.
    p = run("--config", config("on_a"))
    check(p.returncode == 0, f"an adapter is trained on a ({p.returncode})")
    adapter = TMP / "on_a" / "adapter"
    data = TMP / "train.jsonl"
    for cmd in (["eval", "--data", data], ["generate", "--prompt", "the", "--max-new-tokens", 2]):
        p = run(cmd[0], "--model", TMP / "b", "--adapter", adapter, *cmd[1:])
        check(p.returncode == 0 and "was trained on " + str(TMP / "a") in p.stderr and "not on --model" in p.stderr,
              f"{cmd[0]}: an adapter on another base is warned about (exit {p.returncode})")
        p = run(cmd[0], "--model", TMP / "a_link", "--adapter", adapter, *cmd[1:])
        check(p.returncode == 0 and "was trained on" not in p.stderr, f"{cmd[0]}: the same base through a link is not")
    cfg = config("init_b")
    j = json.loads(cfg.read_text())
    j["model"]["path"] = str(TMP / "b")
    j["lora"]["init_from"] = str(adapter)
    j["lora"]["alpha"] = 16
    cfg.write_text(json.dumps(j))
    p = run("--config", cfg)
    check(p.returncode == 0 and "lora.init_from" in p.stderr and "was trained on" in p.stderr,
          f"lora.init_from an adapter of another base is warned about (exit {p.returncode}) {p.stderr[-300:]}")

    # A second Ctrl-C: a message, then the process ends at once.
    proc = subprocess.Popen([BIN, "--config", str(config("ctrl_c")), "--set", "train.steps=50"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "QT_TEST_STEP_DELAY_MS": "500"})
    t0 = time.time()
    while not (TMP / "ctrl_c" / "metrics.jsonl").exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    check(proc.returncode == -signal.SIGINT and "Ctrl-C (SIGINT): checkpointing after the current step" in err
          and "Ctrl-C (SIGINT) again: exiting now" in err,
          f"the first Ctrl-C says what happens, the second says it exits at once (rc {proc.returncode}) "
          f"{[l for l in err.splitlines() if 'Ctrl-C' in l]}")
    finish("warning checks")


if __name__ == "__main__":
    main()
