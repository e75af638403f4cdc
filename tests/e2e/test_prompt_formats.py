"""`eval` and `generate` take the training formats (issue 29): `eval` reads alpaca and chat records (the training
file itself) through training's rendering and masking, and gives transformers' loss over the answer tokens alone
(prompt tokens too with --train-on-prompt); `generate --format alpaca|chat` gives the model the prompt of such a
record as training rendered it (the documented Alpaca template; the chat template's user turn); `data` shows records
as training reads them; a chat format spelled
out in the run config (data.chat_format, or --chat-format FILE) gives a built-in template's loss; an adapter
directory passed as --model is named as such."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import torch
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_formats_"))

# README, "Prompt formats": the Stanford Alpaca templates (tatsu-lab/stanford_alpaca train.py PROMPT_DICT).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


def masked(sp, prompt, answer):
    """[BOS] + ids(prompt + answer) + [EOS] and its loss mask, as training tokenizes a rendered record: the whole text
    at once, a token in the loss from the first one where the ids of the whole text and of the prompt alone differ."""
    whole, pre = sp.encode(prompt + answer), sp.encode(prompt)
    k = next((i for i, (a, b) in enumerate(zip(whole, pre)) if a != b), min(len(whole), len(pre)))
    return [sp.bos_id()] + whole + [sp.eos_id()], [0] + [0] * k + [1] * (len(whole) - k) + [1]


def llama2_chat(sp, user, answer):
    """Llama 2's chat template (one user turn, one answer): <s>[INST] user [/INST] answer </s>, the answer in the
    loss."""
    ids, mask = masked(sp, f"[INST] {user.strip()} [/INST] ", f"{answer.strip()} ")
    return ids, mask


def reference(model, docs, all_tokens=False):
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in docs:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].float()
            t = torch.tensor([ids[i] if (mask[i] or all_tokens) else -100 for i in range(1, len(ids))])
            total += torch.nn.functional.cross_entropy(logits[:-1], t, reduction="sum", ignore_index=-100).item()
            count += int((t != -100).sum())
    return total / count, count


def main():
    model, sp = tiny_lm.make_model_dir(TMP / "model", seed=11)
    words = tiny_lm.corpus(24, 3)
    alpaca = [{"instruction": words[i], "input": words[i + 1] if i % 4 == 0 else "", "output": words[i + 2]}
              for i in range(0, 18, 3)]
    (TMP / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    chat = [{"messages": [{"role": "user", "content": words[i]}, {"role": "assistant", "content": words[i + 1]}]}
            for i in range(0, 12, 2)]
    (TMP / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))

    # eval on the alpaca training file (format auto, as data.format's default): the answers' loss.
    docs = [masked(sp, (PROMPT_INPUT if r["input"] else PROMPT_NO_INPUT).format(**r), r["output"]) for r in alpaca]
    ref, count = reference(model, docs)
    p = run("eval", "--model", TMP / "model", "--data", TMP / "alpaca.jsonl", "--quant", "none")
    ours = last_json(p) if p.returncode == 0 else {}
    check(p.returncode == 0 and ours["tokens"] == count and abs(ours["loss"] - ref) / ref < 1e-5,
          f"eval on an alpaca training file gives transformers' loss over the answers: {ours} vs {ref:.6f} "
          f"over {count} tokens (exit {p.returncode}) {p.stderr[-300:]}")
    ref_all, count_all = reference(model, docs, all_tokens=True)
    p = run("eval", "--model", TMP / "model", "--data", TMP / "alpaca.jsonl", "--quant", "none", "--train-on-prompt")
    ours = last_json(p) if p.returncode == 0 else {}
    check(p.returncode == 0 and ours["tokens"] == count_all and abs(ours["loss"] - ref_all) / ref_all < 1e-5,
          f"--train-on-prompt: the prompt tokens count too: {ours} vs {ref_all:.6f} over {count_all}")
    p = run("eval", "--model", TMP / "model", "--data", TMP / "alpaca.jsonl", "--format", "text")
    check(p.returncode == 5 and "alpaca.jsonl:1" in p.stderr and "'text'" in p.stderr,
          f"--format text on alpaca records names the missing key (exit {p.returncode}) {p.stderr.strip()[-200:]}")

    # Chat records with a named template; the tokenizer has none, so "auto" is refused naming the option.
    docs = [llama2_chat(sp, r["messages"][0]["content"], r["messages"][1]["content"]) for r in chat]
    ref, count = reference(model, docs)
    p = run("eval", "--model", TMP / "model", "--data", TMP / "chat.jsonl", "--quant", "none", "--format", "chat",
            "--chat-template", "llama2")
    ours = last_json(p) if p.returncode == 0 else {}
    check(p.returncode == 0 and ours["tokens"] == count and abs(ours["loss"] - ref) / ref < 1e-5,
          f"eval --format chat --chat-template llama2 gives transformers' loss over the answers: {ours} vs "
          f"{ref:.6f} over {count} tokens (exit {p.returncode}) {p.stderr[-300:]}")
    # The same template spelled out as a custom format (data.chat_format), from --chat-format and from --config.
    fmt = {"bos": True, "user_prefix": "[INST] ", "user_suffix": " [/INST]", "assistant_prefix": " ",
           "assistant_suffix": " </s>", "strip": True}
    (TMP / "format.json").write_text(json.dumps(fmt))
    (TMP / "run.json").write_text(json.dumps({"model": {"path": str(TMP / "model")}, "data": {
        "train_file": str(TMP / "chat.jsonl"), "chat_template": "custom", "chat_format": fmt}}))
    for how, extra in [("--chat-format", ["--chat-template", "custom", "--chat-format", TMP / "format.json"]),
                       ("--config", ["--config", TMP / "run.json"])]:
        p = run("eval", "--model", TMP / "model", "--data", TMP / "chat.jsonl", "--quant", "none", *extra)
        ours = last_json(p) if p.returncode == 0 else {}
        check(p.returncode == 0 and ours["tokens"] == count and abs(ours["loss"] - ref) / ref < 1e-5,
              f"eval with Llama 2's template as a custom format ({how}) gives the same loss: {ours} vs {ref:.6f} "
              f"(exit {p.returncode}) {p.stderr[-300:]}")
    p = run("generate", "--model", TMP / "model", "--prompt", "name three birds", "--format", "chat",
            "--chat-template", "custom", "--chat-format", TMP / "format.json", "--max-new-tokens", 2, "--json",
            "--quant", "none")
    want = [sp.bos_id()] + sp.encode("[INST] name three birds [/INST] ")
    check(p.returncode == 0 and last_json(p)["prompt_ids"] == want,
          f"generate with a custom format: the conversation and its generation prompt (exit {p.returncode}) "
          f"{p.stderr[-300:]}")
    p = run("generate", "--model", TMP / "model", "--prompt", "x", "--format", "chat", "--chat-template", "llama2",
            "--chat-format", TMP / "format.json")
    check(p.returncode == 2 and "--chat-template custom" in p.stderr,
          f"--chat-format with another template is a usage error (exit {p.returncode}) {p.stderr[-200:]}")
    (TMP / "bad_format.json").write_text(json.dumps({"user_prefix": "U: "}))
    p = run("generate", "--model", TMP / "model", "--prompt", "x", "--format", "chat", "--chat-template", "custom",
            "--chat-format", TMP / "bad_format.json")
    check(p.returncode == 3 and "bad_format.json" in p.stderr and "data.chat_format.assistant_suffix" in p.stderr,
          f"a custom format without an answer's end names the file and key (exit {p.returncode}) {p.stderr[-300:]}")
    p = run("eval", "--model", TMP / "model", "--data", TMP / "chat.jsonl")
    check(p.returncode == 3 and "--chat-template" in p.stderr and "data.chat_template" not in p.stderr
          and "model.safetensors" not in p.stderr,
          f"chat records without a template name --chat-template (exit {p.returncode}) {p.stderr.strip()[-300:]}")

    # `data` shows the records as training reads them: the same ids and targets, the text in runs in the loss or not.
    (TMP / "data_run.json").write_text(json.dumps({
        "output_dir": str(TMP / "data_out"), "model": {"path": str(TMP / "model")},
        "data": {"train_file": str(TMP / "chat.jsonl"), "chat_template": "llama2", "max_seq_len": 64},
        "train": {"batch_size": 2}}))
    p = run("data", "--config", TMP / "data_run.json", "--show", 3, "--json")
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")] if p.returncode == 0 else [{}]
    shown, counts = lines[:-1], lines[-1].get("counts", {})
    everything = [llama2_chat(sp, r["messages"][0]["content"], r["messages"][1]["content"]) for r in chat]
    check(p.returncode == 0 and [(d["ids"], d["loss"]) for d in shown] == [(i, m) for i, m in everything[:3]]
          and [d["record"] for d in shown] == [f"{TMP / 'chat.jsonl'}:{k}" for k in (1, 2, 3)],
          f"data --json shows the first records' ids and targets as training reads them (exit {p.returncode}) "
          f"{p.stderr[-300:]}")
    # (sentencepiece's decoder drops <s> and </s>: they show as their pieces, and the text after one starts anew)
    def answer_run(d):
        targets = [t for t, target in d["runs"] if target]
        return targets[0][:-len("</s>")].strip() if len(targets) == 1 and targets[0].endswith("</s>") else None

    runs_ok = all("".join(t for t, _ in d["runs"]) == "<s>" + sp.decode(d["ids"][1:-1]) + "</s>"
                  and answer_run(d) == r["messages"][1]["content"].strip() for d, r in zip(shown, chat))
    check(runs_ok, f"its runs put the record's text together, the answer and </s> alone in the loss: {shown[:1]}")
    check(counts.get("records") == len(chat) and counts.get("tokens") == sum(len(i) for i, _ in everything)
          and counts.get("loss_tokens") == sum(sum(m) for _, m in everything) and counts.get("steps_per_epoch", 0) >= 1,
          f"data's counts are the training set's: {counts}")
    p = run("data", "--config", TMP / "data_run.json", "--show", 1)
    check(p.returncode == 0 and f"{TMP / 'chat.jsonl'}:1" in p.stdout and "\u00ab" in p.stdout
          and "steps an epoch" in p.stdout, f"data prints the record with its targets marked (exit {p.returncode}) "
          f"{p.stdout[-400:]}")

    # A run on a custom format leaves it beside its adapter (chat_format.json, chat_template.jinja); the Jinja renders
    # as training did (transformers' ids of each record, and its generation prompt, equal ours); a merge and a GGUF
    # file carry it as their chat template, the Modelfile as its TEMPLATE.
    import gen_data, gguf
    # (Single spaces and no line breaks: this small sentencepiece model normalizes white space, which transformers'
    # Llama tokenizer built from its pieces does not.)
    fmt2 = {"bos": True, "user_prefix": "USER: ", "user_suffix": " ", "assistant_prefix": "ASSISTANT: ",
            "assistant_suffix": "</s>", "generation_prompt": "ASSISTANT:", "strip": True, "default_system": "Be brief.",
            "system_suffix": " "}
    (TMP / "custom_run.json").write_text(json.dumps({
        "output_dir": str(TMP / "custom_run"), "model": {"path": str(TMP / "model")}, "lora": {"r": 4},
        "data": {"train_file": str(TMP / "chat.jsonl"), "chat_template": "custom", "chat_format": fmt2,
                 "max_seq_len": 256}, "train": {"steps": 1, "batch_size": 2}, "logging": {"progress": "lines"}}))
    p = run("--config", TMP / "custom_run.json")
    adapter = TMP / "custom_run" / "adapter"
    saved = json.loads((adapter / "chat_format.json").read_text()) if (adapter / "chat_format.json").exists() else {}
    check(p.returncode == 0 and all(saved.get(k) == v for k, v in fmt2.items())
          and (adapter / "chat_template.jinja").exists(),
          f"a run on a custom format leaves it beside its adapter (exit {p.returncode}) {saved} {p.stderr[-300:]}")
    jinja = (adapter / "chat_template.jinja").read_text() if (adapter / "chat_template.jinja").exists() else ""
    hf, _ = gen_data.hf_llama_from_spm(TMP / "model" / "tokenizer.model", jinja)
    p = run("data", "--config", TMP / "custom_run.json", "--show", len(chat), "--json")
    shown = [json.loads(l) for l in p.stdout.splitlines() if '"record"' in l]
    ours = [d["ids"] for d in shown]
    theirs = [list(hf.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in chat]
    check(p.returncode == 0 and ours == theirs and len(ours) == len(chat),
          f"transformers renders the adapter's chat_template.jinja as training rendered the records: "
          f"{[(a, b) for a, b in zip(ours, theirs) if a != b][:1]} ({len(ours)} records)")
    prompt = [{"role": "user", "content": "name three birds"}]
    (TMP / "format2.json").write_text(json.dumps(fmt2))
    p = run("generate", "--model", TMP / "model", "--prompt", "name three birds", "--format", "chat",
            "--chat-template", "custom", "--chat-format", TMP / "format2.json", "--max-new-tokens", 1, "--json",
            "--quant", "none")
    want = list(hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
    check(p.returncode == 0 and last_json(p)["prompt_ids"] == want,
          f"its generation prompt is generate's (exit {p.returncode})")
    # With the adapter, eval and generate take its format where no template is named.
    p = run("generate", "--model", TMP / "model", "--adapter", adapter, "--prompt", "name three birds", "--format",
            "chat", "--max-new-tokens", 1, "--json", "--quant", "none")
    check(p.returncode == 0 and last_json(p)["prompt_ids"] == want and "the adapter's custom one" in p.stderr,
          f"generate --adapter takes the adapter's chat format (exit {p.returncode}) {p.stderr[-300:]}")
    p = run("eval", "--model", TMP / "model", "--adapter", adapter, "--data", TMP / "chat.jsonl", "--quant", "none",
            "--max-seq-len", 256)
    check(p.returncode == 0 and last_json(p)["tokens"] == sum(sum(d["loss"]) - d["loss"][0] for d in shown),
          f"eval --adapter reads the records in the adapter's chat format (exit {p.returncode}) {p.stdout[-200:]} "
          f"{p.stderr[-300:]}")
    p = run("export", "--adapter", adapter, "--model", TMP / "model", "--out", TMP / "merged", "--merge",
            "--quant", "none")
    merged_template = json.loads((TMP / "merged" / "tokenizer_config.json").read_text()).get("chat_template") \
        if p.returncode == 0 else None
    check(merged_template == jinja and (TMP / "merged" / "chat_format.json").exists(),
          f"export --merge makes it the merged model's chat template (exit {p.returncode}) {p.stderr[-300:]}")
    full = json.loads((TMP / "custom_run.json").read_text())
    full.update(output_dir=str(TMP / "full_run"))
    full["train"]["full_finetune"], full["model"]["quant"] = True, "none"
    (TMP / "full_run.json").write_text(json.dumps(full))
    p = run("--config", TMP / "full_run.json")
    model_cfg = TMP / "full_run" / "model" / "tokenizer_config.json"
    check(p.returncode == 0 and json.loads(model_cfg.read_text()).get("chat_template") == jinja,
          f"full fine-tuning makes it the trained model's chat template (exit {p.returncode}) {p.stderr[-300:]}")
    p = run("export", "--adapter", adapter, "--model", TMP / "model", "--out", TMP / "gguf", "--gguf", "f16",
            "--quant", "none")
    files = list((TMP / "gguf").glob("*.gguf")) if p.returncode == 0 else []
    reader = gguf.GGUFReader(str(files[0])) if files else None
    template = reader.fields["tokenizer.chat_template"].contents() if files else None
    add_bos = reader.fields["tokenizer.ggml.add_bos_token"].contents() if files else None
    modelfile = (TMP / "gguf" / "Modelfile").read_text() if files else ""
    check(template == jinja and add_bos is True
          and 'USER: {{ .Prompt }} {{ end }}ASSISTANT:{{ .Response }}</s>' in modelfile
          and 'SYSTEM "Be brief."' in modelfile and 'PARAMETER stop "USER:"' in modelfile,
          f"export --gguf carries it as the file's chat template and the Modelfile's TEMPLATE (exit {p.returncode}) "
          f"{modelfile} {p.stderr[-300:]}")

    # generate: the prompt of an alpaca / chat record as training rendered it.
    instruction, context = "name three birds", "red blue"
    for fmt, extra, text in [("alpaca", [], PROMPT_NO_INPUT.format(instruction=instruction)),
                             ("alpaca", ["--input", context], PROMPT_INPUT.format(instruction=instruction, input=context)),
                             ("chat", ["--chat-template", "llama2"], f"[INST] {instruction} [/INST]")]:
        p = run("generate", "--model", TMP / "model", "--prompt", instruction, "--format", fmt, *extra,
                "--max-new-tokens", 3, "--json", "--quant", "none")
        ours = last_json(p) if p.returncode == 0 else {}
        want = [sp.bos_id()] + sp.encode(text)
        got = ours.get("prompt_ids")
        check(p.returncode == 0 and got == want,
              f"generate --format {fmt} {' '.join(extra)} prompts with the training prompt {text!r} "
              f"(exit {p.returncode}): " + (f"{len(want)} ids, equal" if got == want else f"{got} vs {want} {p.stderr[-300:]}"))
    p = run("generate", "--model", TMP / "model", "--prompt", "hi", "--format", "chat", "--json")
    check(p.returncode == 3 and "--chat-template" in p.stderr,
          f"generate --format chat without a template names --chat-template (exit {p.returncode})")
    p = run("generate", "--model", TMP / "model", "--prompt", "hi", "--system", "be brief")
    check(p.returncode == 2 and "--format chat" in p.stderr, f"--system without --format chat is a usage error "
          f"(exit {p.returncode})")
    p = run("generate", "--model", TMP / "model", "--prompt", "the cat", "--max-new-tokens", 2, "--json", "--quant", "none")
    check(p.returncode == 0 and last_json(p)["prompt_ids"] == [sp.bos_id()] + sp.encode("the cat"),
          "generate's default (--format text) is the prompt as it is, after BOS")

    # An adapter directory where the model belongs.
    (TMP / "adapter").mkdir()
    (TMP / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    for cmd in (["eval", "--data", TMP / "alpaca.jsonl"], ["generate", "--prompt", "x"]):
        p = run(cmd[0], "--model", TMP / "adapter", *cmd[1:])
        check(p.returncode == 4 and f"{TMP / 'adapter'} is a LoRA adapter (adapter_config.json); pass it as --adapter "
              "and its base as --model" in p.stderr,
              f"{cmd[0]} --model ADAPTER_DIR says what it is (exit {p.returncode}) {p.stderr.strip()[-200:]}")
    finish("prompt format checks")


if __name__ == "__main__":
    main()
