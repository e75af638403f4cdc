"""A small LLaMA model directory made from scratch, the way a user's would look: config.json + safetensors from
transformers' save_pretrained, a sentencepiece tokenizer.model trained here, tokenizer_config.json like Llama 2's.
Used by the end-to-end tests and by scripts/demo.sh (`python3 tests/oracles/tiny_lm.py --out DIR`)."""
import argparse, json, os, pathlib, random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the a cat dog sat on mat ran fast slow red blue green house tree river stone bird sings loud quiet "
         "one two three four five six seven eight nine ten and or but then when where why how what who "
         "qlora trains adapters quickly with four bit weights").split()

def corpus(n_lines: int, seed: int):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 18))) + rng.choice([".", "!", "?"])
            for _ in range(n_lines)]

def make_tokenizer(model_dir: pathlib.Path, vocab_size: int = 400):
    import sentencepiece as spm
    model_dir.mkdir(parents=True, exist_ok=True)
    text = model_dir / "corpus.txt"
    text.write_text("\n".join(corpus(400, 7)) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(model_dir / "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   character_coverage=1.0, minloglevel=2)
    (model_dir / "tokenizer.vocab").unlink()
    text.unlink()
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer", "model_max_length": 2048}, indent=2))
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))

def make_model(model_dir: pathlib.Path, vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    with torch.no_grad():  # attention_bias / mlp_bias: random (transformers' zeros would hide a missing one)
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(model_dir, safe_serialization=True)
    return model

def make_qwen_model(model_dir: pathlib.Path, arch: str, vocab_size: int, seed: int, **overrides):
    """A tiny Qwen2 (q / k / v biases, tied embeddings) or Qwen3 (q / k norms, head_dim 24, untied) model, saved;
    the biases and norms random (transformers' zero biases and unit norms would hide a missing one)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-6, use_sliding_window=False,
               bos_token_id=1, eos_token_id=2)
    cfg.update(dict(tie_word_embeddings=True) if arch == "qwen2" else dict(tie_word_embeddings=False, head_dim=24))
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "q_norm" in n or "k_norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(model_dir, safe_serialization=True)
    return model


def make_model_dir(model_dir: pathlib.Path, seed: int = 0, **overrides):
    sp = make_tokenizer(model_dir)
    model = make_model(model_dir, sp.get_piece_size(), seed, **overrides)
    return model, sp

def write_text_jsonl(path: pathlib.Path, n: int, seed: int):
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus(n, seed)))

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    make_model_dir(out / "model")
    write_text_jsonl(out / "eval.jsonl", 32, 99)
    print(f"wrote {out / 'model'} and {out / 'eval.jsonl'}")
