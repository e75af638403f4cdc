"""`qlora-train generate`: greedy decoding gives the token ids of transformers' generate(do_sample=False) on the 16-bit
base (--quant none) and, with an adapter, on the NF4 base as PeftModel sees it; sampling is reproducible per seed,
and top-p small enough to keep one token is greedy. `--prompts FILE` generates a file's records together, each as
--prompt alone would."""
import json, pathlib, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
from test_peft_roundtrip import dequantized_model, last_json, make_setup, run, run_ok
from checks import finish

PROMPTS = ["the cat sat on", "qlora trains adapters"]
N = 24


def hf_greedy(model, prompt_ids, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=N, eos_token_id=eos,
                             pad_token_id=eos, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def main():
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qt_generate_"))
    sp, _ = make_setup(tmp, seed=21, b_std=0.5)
    run_ok("quantize", "--model", tmp / "model", "--out", tmp / "model_nf4")
    failures = []
    eos = sp.eos_id()
    setups = [
        ("16-bit base", ("--quant", "none"), LlamaForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32).eval()),
        ("NF4 base + adapter", ("--adapter", tmp / "peft_adapter"),
         PeftModel.from_pretrained(dequantized_model(tmp / "model", tmp / "model_nf4"), tmp / "peft_adapter").eval()),
    ]
    for name, extra, model in setups:
        for prompt in PROMPTS:
            ids = [sp.bos_id()] + sp.encode(prompt)
            ref = hf_greedy(model, ids, eos)
            ours = last_json(run_ok("generate", "--model", tmp / "model", "--prompt", prompt, "--max-new-tokens", N,
                                    "--json", *extra))
            ok = ours["prompt_ids"] == ids and ours["ids"] == ref
            print(f"{name}, {prompt!r}: {'ok' if ok else 'DIFFERENT'} {ours['ids']} ({ours['stop']})")
            if not ok:
                failures.append(f"{name} {prompt!r}: ours {ours['prompt_ids']} + {ours['ids']}, transformers {ids} + {ref}")
            text = ours["text"]
            want_text = sp.decode([t for t in ours["ids"] if t != eos])
            if text != want_text:
                failures.append(f"{name} {prompt!r}: text {text!r}, sentencepiece decodes {want_text!r}")
        # --prompts: the records together through the key / value cache, batches of at most 40 tokens (a prompt and
        # its 24 new tokens a batch here), the file's order and lines kept; each record's ids transformers'.
        records = PROMPTS + ["cat"]
        (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in records))
        for batch_tokens in ("40", "8192"):
            lines = [json.loads(l) for l in run_ok("generate", "--model", tmp / "model", "--prompts", tmp / "prompts.jsonl",
                                                   "--max-new-tokens", N, "--batch-tokens", batch_tokens,
                                                   *extra).stdout.splitlines()]
            for i, prompt in enumerate(records):
                ids = [sp.bos_id()] + sp.encode(prompt)
                got = lines[i] if i < len(lines) else {}
                ok = (len(lines) == len(records) and got.get("line") == i + 1 and got.get("prompt_ids") == ids
                      and got.get("ids") == hf_greedy(model, ids, eos)
                      and got.get("text") == sp.decode([t for t in got.get("ids", []) if t != eos]))
                print(f"{name}, --prompts line {i + 1} (batches of {batch_tokens} tokens): {'ok' if ok else 'DIFFERENT'}")
                if not ok:
                    failures.append(f"{name} --prompts {batch_tokens}: line {i + 1} {got}")
    plain = run_ok("generate", "--model", tmp / "model", "--prompt", PROMPTS[0], "--max-new-tokens", 8, "--quant", "none")
    first = last_json(run_ok("generate", "--model", tmp / "model", "--prompt", PROMPTS[0], "--max-new-tokens", 8,
                             "--quant", "none", "--json"))
    if plain.stdout.rstrip("\n") != first["text"]:
        failures.append(f"plain output {plain.stdout!r} is not the text {first['text']!r}")

    def sample(seed, top_p="0.9", temperature="1.0"):
        return last_json(run_ok("generate", "--model", tmp / "model", "--prompt", PROMPTS[0], "--max-new-tokens", N,
                                "--temperature", temperature, "--top-p", top_p, "--seed", seed, "--json"))["ids"]
    greedy = last_json(run_ok("generate", "--model", tmp / "model", "--prompt", PROMPTS[0], "--max-new-tokens", N,
                              "--json"))["ids"]
    a, b, c = sample(1), sample(1), sample(2)
    if a != b:
        failures.append(f"same seed, different samples: {a} vs {b}")
    if a == c:
        failures.append(f"seeds 1 and 2 sampled the same {N} tokens: {a}")
    if sample(3, top_p="1e-9") != greedy:
        failures.append("top-p keeping only the most likely token is not greedy")
    # Found by fuzzing (round 8): a temperature whose logits overflow float was an internal error in sampling; its
    # limit is greedy.
    if sample(4, temperature="1e-300") != greedy:
        failures.append("a temperature of 1e-300 is not greedy")
    # (Checked before the model loads: a directory that does not exist is not reached.)
    for args, needles in ((("--top-p", "0"), ["top-p"]), (("--top-p", "1.5"), ["top-p", "(0, 1]"]),
                          (("--top-p", "nan"), ["top-p"]), (("--temperature", "-1"), ["temperature"])):
        p = run("generate", "--model", tmp / "no_such_model", "--prompt", "x", *args)
        if p.returncode != 2 or any(n not in p.stderr for n in needles):
            failures.append(f"{args}: exit {p.returncode}, {p.stderr!r}")
    # --prompts records: each takes --format's rendering, its own "system" over the option's; bad records are named
    # by file and line before the model loads.
    (tmp / "chat.jsonl").write_text(json.dumps({"prompt": "hi", "system": "be brief"}) + "\n" + json.dumps({"prompt": "yo"}) + "\n")
    lines = [json.loads(l) for l in run_ok("generate", "--model", tmp / "model", "--prompts", tmp / "chat.jsonl",
                                           "--format", "chat", "--chat-template", "llama2", "--system", "be kind",
                                           "--max-new-tokens", 2, "--quant", "none").stdout.splitlines()]
    for i, (prompt, system) in enumerate((("hi", "be brief"), ("yo", "be kind"))):
        alone = last_json(run_ok("generate", "--model", tmp / "model", "--prompt", prompt, "--format", "chat",
                                 "--chat-template", "llama2", "--system", system, "--max-new-tokens", 2, "--quant",
                                 "none", "--json"))
        if len(lines) != 2 or lines[i]["prompt_ids"] != alone["prompt_ids"] or lines[i]["ids"] != alone["ids"]:
            failures.append(f"--prompts chat record {i + 1}: {lines[i] if i < len(lines) else None} against {alone}")
    ctx = json.loads((tmp / "model" / "config.json").read_text())["max_position_embeddings"]
    long_prompt = " ".join(["cat"] * (ctx + 8))
    for body, needles in (('{"prompt": "a"}\n{"promt": "b"}\n', ["prompts.bad.jsonl:2", "promt"]),
                          ('{"prompt": "a"}\n' + json.dumps({"prompt": long_prompt}) + "\n",
                           ["prompts.bad.jsonl:2", "max_position_embeddings", f"is {ctx}"]),
                          ('{"prompt": "a", "input": "b"}\n', ["prompts.bad.jsonl:1", '"input"', "--format alpaca"]),
                          ('{"prompt": "a", "system": "b"}\n', ["prompts.bad.jsonl:1", '"system"', "--format chat"]),
                          ('{"prompt": "a"}\n{"system": "b"}\n', ["prompts.bad.jsonl:2", "prompt"]),
                          ('{"prompt": 3}\n', ["prompts.bad.jsonl:1", "prompt"]),
                          ("", ["prompts.bad.jsonl"])):
        (tmp / "prompts.bad.jsonl").write_text(body)
        p = run("generate", "--model", tmp / "model", "--prompts", tmp / "prompts.bad.jsonl", "--quant", "none")
        if p.returncode != 5 or any(n not in p.stderr for n in needles):
            failures.append(f"--prompts {body!r}: exit {p.returncode}, {p.stderr[-300:]!r}")
    for args in (("--prompt", "x", "--prompts", tmp / "prompts.jsonl"), ()):
        p = run("generate", "--model", tmp / "model", *args)
        if p.returncode != 2 or "--prompt" not in p.stderr:
            failures.append(f"generate {args}: exit {p.returncode}, {p.stderr[-300:]!r}")
    # A prompt that fills the model's context: a usage error naming both lengths, not an empty answer.
    ctx = json.loads((tmp / "model" / "config.json").read_text())["max_position_embeddings"]
    p = run("generate", "--model", tmp / "model", "--prompt", " ".join(["cat"] * (ctx + 8)), "--quant", "none")
    if p.returncode != 2 or "max_position_embeddings" not in p.stderr or f"is {ctx}" not in p.stderr:
        failures.append(f"a prompt beyond the context: exit {p.returncode}, {p.stderr[-300:]!r}")
    finish("generate checks", failures)


if __name__ == "__main__":
    main()
