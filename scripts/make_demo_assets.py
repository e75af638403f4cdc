"""Generates the demo's data and the starting point of its base model (tooling; the trainer never runs Python).

Writes under configs/demo/:
  tokenizer.model, tokenizer_config.json   a sentencepiece tokenizer trained here on the generated corpus
  init/                                    a randomly initialised small LLaMA (config.json + safetensors) with it
  pretrain.jsonl                           chat records the base is pretrained on by qlora-train itself
  task_train.jsonl, task_eval.jsonl        the fine-tuning task (chat records, llama2 template), eval held out

The base is pretrained (full fine-tuning) to repeat 4 digits ("Repeat the digits: 8962" -> "8962"), which gives
it the attention that copies each digit to its place in the answer; it never sees the task's rule. The task:
"Shift every digit by one" (0->1, ..., 9->0) over 4 digits, so the LoRA adapter only has to learn a new mapping
of the copied digits. Exact match over held-out prompts is a metric anyone can read. Digits are written without
separators (the tokenizer splits digits, one token each). Found with transformers + PEFT first: a base pretrained
on plain text, the Alpaca prompt, or digits separated by spaces all left the shift at chance within the demo's
budget. Deterministic for a given seed."""
import argparse, json, os, pathlib, random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Words for the tokenizer's corpus only (a 512-piece BPE needs more than the task's few words).
WORDS = ("the a cat dog sat on mat ran fast slow red blue green house tree river stone bird sings loud quiet "
         "one two three four five six seven eight nine ten and or but then when where why how what who list "
         "count digits numbers shift every digit by one answer question below write only result repeat").split()

def digits(rng, n=4):
    return "".join(str(rng.randrange(10)) for _ in range(n))

def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

def pretrain_record(rng):
    d = digits(rng)
    return chat("Repeat the digits: " + d, d)

def task_record(rng):
    d = digits(rng)
    return chat("Shift every digit by one: " + d, "".join(str((int(x) + 1) % 10) for x in d))

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="configs/demo")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--task-only", action="store_true", help="rewrite only the task files")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    pre = [pretrain_record(rng) for _ in range(3000)]
    (out / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pre))
    train = [task_record(rng) for _ in range(2000)]
    seen = {r["messages"][0]["content"] for r in train}
    evals = []
    while len(evals) < 100:
        r = task_record(rng)
        if r["messages"][0]["content"] not in seen:
            seen.add(r["messages"][0]["content"])
            evals.append(r)
    (out / "task_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "task_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    if args.task_only:
        return

    import sentencepiece as spm
    corpus = out / "corpus.tmp"
    text = lambda r: "[INST] " + r["messages"][0]["content"] + " [/INST] " + r["messages"][1]["content"]
    words = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 16))) + "." for _ in range(3000)]
    corpus.write_text("\n".join([text(r) for r in pre] + [text(r) for r in train[:200]] + words) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=512,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   character_coverage=1.0, split_digits=True, minloglevel=2)
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "model_max_length": 256}, indent=2) + "\n")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    init = out / "init"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(init, safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (init / f).write_bytes((out / f).read_bytes())
    print(f"wrote {out}: {len(pre)} pretraining lines, {len(train)} task records, {len(evals)} held out")

if __name__ == "__main__":
    main()
