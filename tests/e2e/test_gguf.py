"""`qlora-train export --gguf TYPE` writes one GGUF file of the merged model (base +
adapter) and an Ollama Modelfile, for a sentencepiece model (Llama 2 style, Llama 2's chat template) and a byte-level BPE model (Llama 3
style). gguf-py (llama.cpp's own reader) reads every file back: the llama metadata, the tokenizer, every tensor's
name, dims and type, and its data equal to the merged HF model's (`export --merge --dtype fp32`) once llama.cpp's q/k
row permutation is undone: exactly as fp16 / bf16 roundings of the merged fp32 weights, and q8_0 blocks byte-equal to
gguf-py's quantizer and within the block's rounding. llama.cpp itself (llama-cpp-python) loads each file, tokenizes
text into the ids our tokenizer gives, and gives the next-token logits transformers gives on the merged model with
the same weight rounding (within the 16-bit / 8-bit arithmetic llama.cpp runs in), and the same greedy continuation.
The sentencepiece adapter trains lm_head too (modules_to_save): the GGUF's output is the trained one. A base
saved pre-quantized gives the same file; --quant none merges onto the 16-bit base. A Mistral model (model_type
mistral) the same way, in f16. Rope scaling (linear, Llama 3.1's, YaRN on llama and qwen3) as llama.cpp takes it, held to transformers the same way; a llama model with a bias on every
projection (attention_bias, mlp_bias).
Qwen2 (biases, tied) and Qwen3 (q / k norms, head_dim 24) models with Qwen's own style of tokenizer.json (Qwen2's
digit regex, NFC) as llama.cpp's qwen2 / qwen3, in f16 and q8_0.
q2_k, q3_k_s / m / l, q4_k_m / s, q5_k_m / s, q6_k, q4_0, q4_1, q5_0 and q5_1: byte for byte the files llama.cpp's
own quantizer (llama_model_quantize, as `llama-quantize` runs it without an importance matrix) makes of our f16 file, every
tensor's type, dims and bytes and every key/value, for an untied model of 256-wide rows, a tied one of 12 layers (the
layers given more bits, the tied embedding as output), a model whose rows fall back to q5_0 / q5_1 / q8_0 / f16,
and a Qwen3 model; llama.cpp runs our q4_k_m with transformers' argmax on the weights the file holds (gguf-py
dequantizes them).
`--gguf-lora f32|f16|bf16`: the adapter alone as llama.cpp's LoRA adapter file, read back by gguf-py and run by llama.cpp
over our GGUF of the base with transformers' logits on the merge (llama with the q / k permutation, qwen3, rsLoRA).
Refusals: an unresolvable base, a model type llama.cpp has no mapping here for, projection biases qwen3 cannot hold,
YaRN settings llama.cpp does not run (betas, truncate, attention factor),
an unsupported rope type, an existing output file, an output path that
is a file, a non-finite merged weight: each a clear error, a non-zero exit, nothing left behind."""
import json, os, pathlib, shutil, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numpy as np
import torch
import tiny_lm
import gen_data
import gen_tokenizer
from test_peft_roundtrip import run, run_ok, last_json
from checks import finish

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_TYPE = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPE = {"f16": 1, "bf16": 32, "q8_0": 7, "q4_k_m": 15, "q4_k_s": 14, "q5_k_m": 17, "q5_k_s": 16, "q6_k": 18,
             "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q3_k_m": 12, "q3_k_s": 11, "q3_k_l": 13, "q2_k": 10}
# The k-quant files and llama.cpp's names of them for llama_model_quantize (llama-quantize's library call).
K_QUANTS = {t: "LLAMA_FTYPE_MOSTLY_" + t.upper()
            for t in ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k_m",
                      "q3_k_s", "q3_k_l", "q2_k")}
# llama.cpp computes a matmul with f16 / bf16 weights on activations rounded to that type (11 / 8 significant bits),
# and with q8_0 weights on activations quantized to q8_0 blocks; its KV cache is f16. The reference is fp32
# transformers on the same rounded weights, for f16 / bf16 with each linear's input rounded to that type too
# (reference_model; rounding q8_0 blocks of the inputs the same way did not bring the figures closer, so q8_0 is held
# to the weights' rounding alone), and the bounds are on max |logit difference| / max |logit|. Measured
# (llama-cpp-python 0.3.36, CPU): f16 1.5e-3 to 5e-3, bf16 8e-3 / 9e-3 (6e-2 without rounding the inputs), q8_0
# 3.4e-2 to 5.1e-2; f16 9e-3 with Llama 3.1's rope scaling (where leaving out its rope_freqs would differ by 0.01 to
# 1.4).
LOGIT_BOUND = {"f16": 2e-2, "bf16": 2e-2, "q8_0": 8e-2}
# YaRN (rope_type yarn) with transformers' defaults (beta_fast 32, beta_slow 1, attention 1 + 0.1 ln(factor)): an
# original context of 4,096 puts the correction range inside head_dim 16's dimensions (2..6), where leaving YaRN's ramp
# out in llama.cpp (yarn_ext_factor 0) moved the logits by 1.16 of the largest.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 10000.0}
failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL:", msg)
    return cond


def add_adapter(model, model_dir: pathlib.Path, out: pathlib.Path, seed: int, modules_to_save=None):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                            modules_to_save=modules_to_save))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * (0.2 if "lora_A" in n else 0.3))
            elif "modules_to_save" in n:  # a trained lm_head: the GGUF's output.weight must be this one
                p.add_(0.05 * torch.randn_like(p))
    peft.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(model_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    peft.unload()


def bpe_vocab(doc: dict, n: int):
    """A byte-level BPE tokenizer.json's tokens, token types (normal 1, control 3, user-defined 4) and merges as
    the GGUF file must hold them."""
    tokens, types = [None] * n, [1] * n
    for t, i in doc["model"]["vocab"].items():
        tokens[i] = t
    for a in doc["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    return tokens, types, merges


def spm_vocab(sp, template: str, fmt: str):
    """What the GGUF file must hold for a sentencepiece model (llama.cpp's `llama` vocabulary) and its Modelfile."""
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(sp.get_piece_size())]
    return {"model": "llama", "pre": "default", "tokens": pieces, "types": types,
            "scores": [sp.get_score(i) for i in range(sp.get_piece_size())], "merges": None,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "add_bos": True,
            "template": template, "format": fmt, "stops": ["[INST]", "[/INST]", "</s>"]}


def spm_setup(tmp: pathlib.Path, name="spm", **overrides):
    """Llama 2 style: sentencepiece tokenizer.model, Llama 2's chat template, untied lm_head."""
    model_dir = tmp / f"{name}_model"
    # A wider init than transformers' 0.02 gives sharper logits: fewer near-ties in the greedy comparison.
    model, sp = tiny_lm.make_model_dir(model_dir, seed=3, initializer_range=0.1, **overrides)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = gen_data.LLAMA2
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    add_adapter(model, model_dir, tmp / f"{name}_adapter", seed=4, modules_to_save=["lm_head"] if name == "spm" else None)
    vocab = spm_vocab(sp, gen_data.LLAMA2, "llama2")
    encode = lambda text: [sp.bos_id()] + sp.encode(text)
    return model_dir, tmp / f"{name}_adapter", vocab, encode


def mistral_setup(tmp: pathlib.Path):
    """model_type mistral (MistralForCausalLM, sentencepiece, Mistral Instruct's chat template): llama.cpp's llama."""
    from transformers import MistralConfig, MistralForCausalLM
    model_dir = tmp / "mistral_model"
    sp = tiny_lm.make_tokenizer(model_dir)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = gen_data.MISTRAL
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(7)
    model = MistralForCausalLM(MistralConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=sp.get_piece_size(), max_position_embeddings=512, rms_norm_eps=1e-5, sliding_window=4096,
        bos_token_id=1, eos_token_id=2, initializer_range=0.1)).float().eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    add_adapter(model, model_dir, tmp / "mistral_adapter", seed=8)
    vocab = spm_vocab(sp, gen_data.MISTRAL, "mistral")
    return model_dir, tmp / "mistral_adapter", vocab, lambda text: [sp.bos_id()] + sp.encode(text)


def bpe_setup(tmp: pathlib.Path, name="bpe"):
    """Llama 3 style: byte-level BPE tokenizer.json with Llama 3's pre-tokenizer and specials, Llama 3's chat
    template, tied embeddings."""
    from tokenizers import Tokenizer
    if not (tmp / "bpe_tok" / "bpe").exists():
        gen_tokenizer.make_bpe(tmp / "bpe_tok", gen_tokenizer.corpus_lines())
    model_dir = tmp / f"{name}_model"
    model_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp / "bpe_tok" / "bpe" / f, model_dir / f)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = gen_data.LLAMA3
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    model = tiny_lm.make_model(model_dir, tok.get_vocab_size(with_added_tokens=True), seed=5, bos_token_id=bos,
                               eos_token_id=eos, tie_word_embeddings=True, initializer_range=0.1)
    add_adapter(model, model_dir, tmp / f"{name}_adapter", seed=6)
    doc = json.loads((model_dir / "tokenizer.json").read_text())
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens, types, merges = bpe_vocab(doc, n)
    vocab = {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "scores": None, "merges": merges,
             "bos": bos, "eos": eos, "unk": None, "add_bos": True, "template": gen_data.LLAMA3, "format": "llama3",
             "stops": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]}
    encode = lambda text: tok.encode(text).ids  # the post-processor adds BOS
    return model_dir, tmp / f"{name}_adapter", vocab, encode


def gpt2_setup(tmp: pathlib.Path, name: str, digits: bool):
    """GPT-2's byte-level layout: ByteLevel with its own regex. With `digits`, a SmolLM2-style directory (llama.cpp's
    smollm): each digit split off alone first, <|endoftext|> / <|im_start|> / <|im_end|> special, no BOS added, EOS
    <|im_end|>, SmolLM2-Instruct's template (ChatML, its default system prompt), tied embeddings. Without, bpe_setup's
    model with the pre-tokenizer alone (gpt-2)."""
    from tokenizers import Tokenizer
    if digits:
        if not (tmp / "bpe_tok" / "bpe").exists():
            gen_tokenizer.make_bpe(tmp / "bpe_tok", gen_tokenizer.corpus_lines())
        model_dir = gen_data.smollm_dir(tmp / f"{name}_model", tmp / "bpe_tok" / "bpe", gen_data.SMOLLM2)
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        n = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id("<|im_end|>")
        model = tiny_lm.make_model(model_dir, n, seed=11, bos_token_id=tok.token_to_id("<|im_start|>"),
                                   eos_token_id=eos, tie_word_embeddings=True, initializer_range=0.1)
        add_adapter(model, model_dir, tmp / f"{name}_adapter", seed=12)
        tokens, types, merges = bpe_vocab(json.loads((model_dir / "tokenizer.json").read_text()), n)
        vocab = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "types": types, "scores": None,
                 "merges": merges, "bos": tok.token_to_id("<|im_start|>"), "eos": eos, "unk": None, "add_bos": False,
                 "template": gen_data.SMOLLM2, "format": "chatml", "stops": ["<|im_start|>", "<|im_end|>"]}
    else:
        model_dir, _, vocab, _ = bpe_setup(tmp, name)
        doc = json.loads((model_dir / "tokenizer.json").read_text())
        doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        (model_dir / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
        vocab = dict(vocab, pre="gpt-2")
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    pieces = tok.encode("12345").tokens  # each digit alone only after Digits (this vocabulary merges "123", "45")
    check((pieces.count("1") + pieces.count("2") + pieces.count("5") == 3) == digits,
          f"{name}: the tokenizer does not split digits as its layout does: {pieces}")
    return model_dir, tmp / f"{name}_adapter", vocab, lambda text: tok.encode(text).ids


QWEN2_PATTERN = gen_tokenizer.QWEN2_PATTERN  # Qwen2's regex: Llama 3's with digits one at a time


def qwen_setup(tmp: pathlib.Path, arch: str, name=None, **overrides):
    """A Qwen2 (q / k / v biases, tied embeddings) or Qwen3 (q / k norms, head_dim 24, untied) model with a
    Qwen2.5-style tokenizer.json as Qwen ships it: Qwen2's regex (digits one by one), an NFC normalizer, no BOS,
    EOS <|im_end|>, ChatML. Our BPE tokenizer does not run it (train on pre-tokenized data); the export reads it."""
    from tokenizers import Tokenizer, normalizers
    if not (tmp / "bpe_tok" / "bpe").exists():
        gen_tokenizer.make_bpe(tmp / "bpe_tok", gen_tokenizer.corpus_lines())
    name = name or arch
    model_dir = gen_data.qwen_dir(tmp / f"{name}_model", tmp / "bpe_tok" / "bpe", gen_data.QWEN25)
    doc = json.loads((model_dir / "tokenizer.json").read_text())
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_PATTERN
    doc["normalizer"] = {"type": "NFC"}
    (model_dir / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    check(tok.encode("ab 12345").ids == [tok.token_to_id(t) for t in tok.encode("ab 12345").tokens] and
          len([t for t in tok.encode("12345").tokens]) == 5, "the Qwen-style tokenizer does not split digits one by one")
    n = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id("<|im_end|>")
    model = tiny_lm.make_qwen_model(model_dir, arch, n, seed=9, bos_token_id=None, eos_token_id=eos,
                                    initializer_range=0.1, **overrides)
    add_adapter(model, model_dir, tmp / f"{name}_adapter", seed=10)
    tokens, types, merges = bpe_vocab(doc, n)
    vocab = {"arch": arch, "model": "gpt2", "pre": "qwen2", "tokens": tokens, "types": types, "scores": None,
             "merges": merges, "bos": None, "eos": eos, "unk": None, "add_bos": False, "template": gen_data.QWEN25,
             "format": "chatml", "stops": ["<|im_start|>", "<|im_end|>"]}
    return model_dir, tmp / f"{name}_adapter", vocab, lambda text: tok.encode(text).ids


def gguf_name(hf: str):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    rest = ".".join(parts[3:])
    names = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
             "mlp.down_proj.weight": "ffn_down", "input_layernorm.weight": "attn_norm",
             "post_attention_layernorm.weight": "ffn_norm", "self_attn.q_proj.bias": "attn_q",
             "self_attn.k_proj.bias": "attn_k", "self_attn.v_proj.bias": "attn_v",
             "self_attn.o_proj.bias": "attn_output",
             "mlp.gate_proj.bias": "ffn_gate", "mlp.up_proj.bias": "ffn_up", "mlp.down_proj.bias": "ffn_down",
             "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm"}
    if rest.endswith(".bias"):
        return f"blk.{parts[2]}.{names[rest]}.bias"
    return f"blk.{parts[2]}.{names[rest]}.weight"


def llama3_rope_factors(rope, head_dim):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3."""
    import math
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute(w: np.ndarray, n_head: int):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rounded(w: torch.Tensor, gtype: str, name: str):
    """The merged fp32 weight as the GGUF holds it (norms and 1-D tensors f32 in every mode)."""
    import gguf
    if w.dim() < 2 or name.endswith("norm.weight"):
        return w
    if gtype == "f16":
        return w.half().float()
    if gtype == "bf16":
        return w.bfloat16().float()
    q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape).copy())


def check_gguf(label, path: pathlib.Path, gtype, merged: dict, config: dict, vocab: dict):
    import gguf
    r = gguf.GGUFReader(str(path))
    f = lambda k: r.fields[k].contents() if k in r.fields else None
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    a = vocab.get("arch", "llama")
    want = {"general.architecture": a, "general.alignment": 32, "general.file_type": FILE_TYPE[gtype],
            f"{a}.context_length": config["max_position_embeddings"], f"{a}.embedding_length": config["hidden_size"],
            f"{a}.block_count": config["num_hidden_layers"], f"{a}.feed_forward_length": config["intermediate_size"],
            f"{a}.attention.head_count": heads, f"{a}.attention.head_count_kv": kv_heads,
            f"{a}.attention.key_length": head_dim, f"{a}.attention.value_length": head_dim,
            f"{a}.rope.dimension_count": head_dim, f"{a}.vocab_size": config["vocab_size"],
            "tokenizer.ggml.model": vocab["model"], "tokenizer.ggml.pre": vocab["pre"],
            "tokenizer.ggml.bos_token_id": vocab["bos"], "tokenizer.ggml.eos_token_id": vocab["eos"],
            "tokenizer.ggml.unknown_token_id": vocab["unk"], "tokenizer.ggml.add_bos_token": vocab["add_bos"],
            "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": vocab["template"],
            "tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.token_type": vocab["types"],
            "tokenizer.ggml.merges": vocab["merges"]}
    for k, v in want.items():
        check(f(k) == v, f"{label}: {k} = {str(f(k))[:200]} (want {str(v)[:200]})")
    check(np.float32(f(f"{a}.attention.layer_norm_rms_epsilon")) == np.float32(config["rms_norm_eps"]),
          f"{label}: rms eps {f(f'{a}.attention.layer_norm_rms_epsilon')}")
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    check(np.float32(f(f"{a}.rope.freq_base")) == np.float32(theta), f"{label}: rope.freq_base {f(f'{a}.rope.freq_base')}")
    if vocab["scores"] is not None:
        check(np.array_equal(np.float32(f("tokenizer.ggml.scores")), np.float32(vocab["scores"])), f"{label}: scores")
    check(r.fields["GGUF.version"].contents() == 3, f"{label}: GGUF version")

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") == "linear":
        check(f("llama.rope.scaling.type") == "linear" and np.float32(f("llama.rope.scaling.factor")) == rope["factor"],
              f"{label}: rope scaling {f('llama.rope.scaling.type')} {f('llama.rope.scaling.factor')}")
    elif rope.get("rope_type") == "yarn":
        got = [f(f"{a}.rope.scaling.{k}") for k in ("type", "factor", "original_context_length")]
        check(got == ["yarn", np.float32(rope["factor"]), rope["original_max_position_embeddings"]],
              f"{label}: yarn keys {got}")
    else:
        check(f(f"{a}.rope.scaling.type") is None, f"{label}: rope scaling type {f(f'{a}.rope.scaling.type')}")
    tensors = {t.name: t for t in r.tensors}
    names = {gguf_name(k) for k in merged}
    if rope.get("rope_type") == "llama3":
        names.add("rope_freqs.weight")
        t = tensors.get("rope_freqs.weight")
        want = llama3_rope_factors(rope, head_dim)
        check(t is not None and t.tensor_type.name == "F32" and np.allclose(np.asarray(t.data), want, rtol=1e-6, atol=0),
              f"{label}: rope_freqs {None if t is None else np.asarray(t.data)} (want {want})")
    check(set(tensors) == names, f"{label}: tensors {sorted(set(tensors) ^ names)} differ")
    for hf, w in merged.items():
        t = tensors.get(gguf_name(hf))
        if t is None:
            continue
        is_f32 = w.dim() < 2 or hf.endswith("norm.weight")
        want_type = "F32" if is_f32 else GGUF_TYPE[gtype]
        check(t.tensor_type.name == want_type, f"{label}: {t.name} type {t.tensor_type.name} (want {want_type})")
        check(list(t.shape) == list(reversed(w.shape)), f"{label}: {t.name} dims {list(t.shape)} (want innermost first "
                                                          f"{list(reversed(w.shape))})")
        # llama.cpp's `llama` takes q / k rows interleaved; qwen2 / qwen3 run NEOX rope on HF's layout as it is.
        heads_of = None if a != "llama" else heads if ".attn_q." in t.name else kv_heads if ".attn_k." in t.name else None
        w_np = w.numpy()
        if heads_of:
            w_np = permute(w_np, heads_of)  # compare in llama.cpp's layout, then undo it below
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if heads_of:
            data = unpermute(data, heads_of)
            w_np = unpermute(w_np, heads_of)
        ref = w.numpy() if is_f32 else rounded(w, gtype, hf).numpy()
        if gtype == "q8_0" and not is_f32:
            # Byte-equal to gguf-py's reference quantizer (of the permuted rows), and each value within its block's
            # rounding: |q d - x| <= d / 2 plus d's own fp16 rounding (127 |q| 2^-11 d).
            wp = permute(w.numpy(), heads_of) if heads_of else w.numpy()
            q = gguf.quants.quantize(wp, gguf.GGMLQuantizationType.Q8_0)
            check(np.array_equal(np.asarray(t.data).reshape(-1), q.reshape(-1)), f"{label}: {t.name} q8_0 bytes differ from gguf-py's")
            d = np.abs(w.numpy().reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            err = np.abs(data.reshape(-1, 32) - w.numpy().reshape(-1, 32))
            check((err <= 0.57 * d + 1e-12).all(), f"{label}: {t.name} q8_0 error {float((err / (d + 1e-30)).max())} d")
        else:
            check(np.array_equal(data.astype(np.float32), ref), f"{label}: {t.name} data differ from the merged weight "
                                                               f"(max {float(np.abs(data - ref).max())})")
    return r


def check_modelfile(label, out: pathlib.Path, gguf_file: str, vocab):
    text = (out / "Modelfile").read_text()
    check(f"FROM ./{gguf_file}\n" in text, f"{label}: Modelfile lacks FROM ./{gguf_file}: {text}")
    markers = {"chatml": ["<|im_start|>user\n{{ .Prompt }}<|im_end|>", "<|im_start|>assistant\n"], "llama2": ["[INST] ", "<<SYS>>", "{{ .Prompt }} [/INST]"], "mistral": ["[INST] ", "{{ .Prompt }} [/INST]"],
               "llama3": ["<|start_header_id|>user<|end_header_id|>", "{{ .Prompt }}<|eot_id|>",
                          "<|start_header_id|>assistant<|end_header_id|>"]}[vocab["format"]]
    check("TEMPLATE \"\"\"" in text and all(m in text for m in markers), f"{label}: Modelfile TEMPLATE: {text}")
    for s in vocab["stops"]:
        check(f'PARAMETER stop "{s}"\n' in text, f"{label}: Modelfile lacks PARAMETER stop {s}: {text}")
    if vocab["template"] == gen_data.QWEN25:  # its default system prompt, as Ollama's SYSTEM
        check('SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."\n' in text,
              f"{label}: Modelfile lacks Qwen2.5's default system prompt: {text}")
    if vocab["template"] == gen_data.SMOLLM2:
        check('SYSTEM "You are a helpful AI assistant named SmolLM, trained by Hugging Face"\n' in text,
              f"{label}: Modelfile lacks SmolLM2's default system prompt: {text}")


def round_activations(x: torch.Tensor, gtype: str):
    """A linear's input as llama.cpp's CPU matmul takes it for weights of `gtype` (ggml's vec_dot_type)."""
    if gtype == "f16":
        return x.half().float()
    return x.bfloat16().float()


def reference_model(merged_dir: pathlib.Path, merged: dict, gtype: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in merged:
                p.copy_(rounded(merged[n], gtype, n))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and gtype in ("f16", "bf16"):
            m.register_forward_pre_hook(lambda mod, args: (round_activations(args[0], gtype),))
    return model


def greedy_ref(model, ids, steps):
    ids = list(ids)
    margins = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
    return ids, margins


def check_llama_cpp(label, path: pathlib.Path, gtype, model, encode, texts):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2,
                          seed=0)
    for text in texts:
        ours = encode(text)
        theirs = llm.tokenize(text.encode(), add_bos=True, special=False)
        check(theirs == ours, f"{label}: llama.cpp tokenizes {text!r} as {theirs}, our tokenizer {ours}")
    ids = encode(texts[0])
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"{label}: llama.cpp logits over {len(ids)} tokens vs transformers: max |diff| / max |logit| = {rel:.2e} "
          f"(bound {LOGIT_BOUND[gtype]:.0e})")
    check(rel <= LOGIT_BOUND[gtype], f"{label}: llama.cpp logits differ by {rel:.2e} of the largest (bound {LOGIT_BOUND[gtype]})")
    # Greedy continuation, 12 tokens: the same, unless the reference's top two were within the logit bound at the
    # step where they part (a tie that arithmetic of either side may break).
    steps = 12
    want, margins = greedy_ref(model, ids, steps)
    llm.reset()
    llm.eval(ids)
    got_ids = list(ids)
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got_ids.append(nxt)
        llm.eval([nxt])
    if got_ids != want:
        k = next(i for i in range(len(want)) if got_ids[i] != want[i]) - len(ids)
        tie = margins[k] <= 2 * LOGIT_BOUND[gtype] * float(np.abs(ref).max())
        print(f"{label}: greedy continuations part at step {k} (reference top-2 margin {margins[k]:.2e}: "
              f"{'a near tie' if tie else 'decided'})")
        check(tie, f"{label}: llama.cpp's greedy continuation {got_ids[len(ids):]} vs transformers' {want[len(ids):]}")
    else:
        print(f"{label}: the same greedy continuation of {steps} tokens: {want[len(ids):]}")
    # Teacher-forced along the reference's continuation: llama.cpp's argmax at every step is the reference's token,
    # except where the reference's top two are within the bound.
    llm.reset()
    llm.eval(want[:-1])
    preds = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)[len(ids) - 1:].argmax(axis=1)
    differ = [k for k in range(steps) if preds[k] != want[len(ids) + k]]
    print(f"{label}: teacher-forced, llama.cpp's next token is transformers' at {steps - len(differ)} of {steps} steps"
          + (f" (the others have reference margins {[round(margins[k], 5) for k in differ]})" if differ else ""))
    for k in differ:
        check(margins[k] <= 2 * LOGIT_BOUND[gtype] * float(np.abs(ref).max()),
              f"{label}: teacher-forced step {k}: llama.cpp picks {preds[k]}, transformers {want[len(ids) + k]} "
              f"(margin {margins[k]:.2e})")
    llm.close()


# Where GPT-2's regex differs from Llama 3's: contractions in capitals, runs of digits, spaces before marks and
# digits, tabs and several newlines, a mark or a tab before letters (the last two give other ids with Llama 3's
# regex on this vocabulary, so llama.cpp's llama-bpe would fail them).
GPT2_TEXTS = ["the cat sat on the mat and it's 12345 cats.", "It'S we'RE I'LL  two  spaces\t\ttabs\n\n new",
              "x=12345.678, y = -9 and 1 2 3", "end of line   \n", "caf\u00e9 na\u00efve 2024!!",
              "tab\tthe \"quoted\" text"]


def export_model(tmp: pathlib.Path, kind, model_dir, adapter, vocab, encode, gtypes=("f16", "bf16", "q8_0"),
                 texts=None):
    import safetensors.torch
    run_ok("export", "--adapter", adapter, "--out", tmp / f"{kind}_merged32", "--merge", "--dtype", "fp32")
    merged = safetensors.torch.load_file(str(tmp / f"{kind}_merged32" / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    base = json.loads((model_dir / "config.json").read_text())
    texts = texts or ["the cat sat on the mat and the dog ran fast.",
                      "qlora trains adapters quickly with four bit weights!", "where why how what who",
                      "1234567 and 89 ten"]
    for gtype in gtypes:
        label = f"{kind} {gtype}"
        out = tmp / f"{kind}_{gtype}"
        info = last_json(run_ok("export", "--adapter", adapter, "--out", out, "--gguf", gtype))
        gguf_file = f"{model_dir.name}-{gtype}.gguf"
        check(sorted(os.listdir(out)) == sorted([gguf_file, "Modelfile"]), f"{label}: files {os.listdir(out)}")
        check(info["adapters"] == 7 * config["num_hidden_layers"] and info["chat_format"] == vocab["format"],
              f"{label}: {info}")
        check_gguf(label, out / gguf_file, gtype, merged, base, vocab)
        check_modelfile(label, out, gguf_file, vocab)
        check_llama_cpp(label, out / gguf_file, gtype, reference_model(tmp / f"{kind}_merged32", merged, gtype),
                        encode, texts)


def same_gguf(label, ours: pathlib.Path, ref: pathlib.Path):
    """Every tensor (name, type, dims, bytes) and every key/value of two GGUF files equal; the tensors' order may
    differ (llama-quantize writes them sorted by block, then name)."""
    import gguf
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(ref))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    check(set(ta) == set(tb), f"{label}: tensors {sorted(set(ta) ^ set(tb))} in one file only")
    differ = [n for n in sorted(set(ta) & set(tb))
              if ta[n].tensor_type != tb[n].tensor_type or list(ta[n].shape) != list(tb[n].shape)
              or not np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8))]
    check(not differ, f"{label}: {len(differ)} tensor(s) differ from llama-quantize's: " +
          ", ".join(f"{n} ({ta[n].tensor_type.name} / {tb[n].tensor_type.name})" for n in differ[:6]))
    fa, fb = a.fields, b.fields
    keys = [k for k in sorted(set(fa) | set(fb)) if not k.startswith("GGUF.")]
    bad = [k for k in keys if k not in fa or k not in fb or
           [np.asarray(p).tobytes() for p in fa[k].parts] != [np.asarray(p).tobytes() for p in fb[k].parts]]
    check(not bad, f"{label}: keys {bad} differ from llama-quantize's file")
    return a


def check_k_quants(tmp: pathlib.Path, kind, model_dir, adapter, want_types, encode=None):
    """`--gguf q4_k_m|q4_k_s|...|q5_1` against llama_model_quantize run on our f16 file; with `encode`, llama.cpp runs
    our q4_k_m as transformers runs the weights it holds."""
    import collections, ctypes, llama_cpp
    run_ok("export", "--adapter", adapter, "--out", tmp / f"{kind}_kq_f16", "--gguf", "f16")
    f16_file = tmp / f"{kind}_kq_f16" / f"{model_dir.name}-f16.gguf"
    for gtype, ftype in K_QUANTS.items():
        label = f"{kind} {gtype}"
        out = tmp / f"{kind}_{gtype}"
        info = last_json(run_ok("export", "--adapter", adapter, "--out", out, "--gguf", gtype))
        ours = out / f"{model_dir.name}-{gtype}.gguf"
        check(info["type"] == gtype and ours.exists(), f"{label}: {info}")
        ref = tmp / f"{kind}_{gtype}_llama_quantize.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(ref).encode(), ctypes.byref(params))
        if not check(rc == 0, f"{label}: llama_model_quantize returned {rc}"):
            continue
        r = same_gguf(label, ours, ref)
        check(r.fields["general.file_type"].contents() == FILE_TYPE[gtype],
              f"{label}: general.file_type {r.fields['general.file_type'].contents()}")
        types = collections.Counter(t.tensor_type.name for t in r.tensors)
        print(f"{label}: {len(r.tensors)} tensors and every key byte-equal to llama-quantize's file ({dict(types)})")
        if gtype in want_types:
            check(want_types[gtype] <= set(types), f"{label}: types {dict(types)} lack {want_types[gtype]}")
    if encode is None:
        return
    # llama.cpp runs the file: its argmax against transformers' on the weights the file holds (gguf-py dequantizes
    # them). llama.cpp rounds the activations to 8-bit blocks for k-quant weights (q8_K, one scale for 256 values),
    # so the logits differ by 5-20% of the largest on this sharp tiny model, measured; the argmax mostly agrees.
    import gguf
    from transformers import AutoModelForCausalLM
    run_ok("export", "--adapter", adapter, "--out", tmp / f"{kind}_kq_merged32", "--merge", "--dtype", "fp32")
    config = json.loads((model_dir / "config.json").read_text())
    path = tmp / f"{kind}_q4_k_m" / f"{model_dir.name}-q4_k_m.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    model = AutoModelForCausalLM.from_pretrained(tmp / f"{kind}_kq_merged32", dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            t = tensors[gguf_name(n)]
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
            heads = (config["num_attention_heads"] if ".attn_q." in t.name
                     else config["num_key_value_heads"] if ".attn_k." in t.name else None)
            p.copy_(torch.from_numpy(np.array(unpermute(w, heads) if heads else w)))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2,
                          seed=0)
    agree, total = 0, 0
    texts = ("the cat sat on the mat and the dog ran fast.", "qlora trains adapters quickly with four bit weights!")
    for text in texts:
        ids = encode(text)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        check(np.isfinite(got).all(), f"{kind} q4_k_m: llama.cpp's logits are not finite")
        agree += int((got.argmax(1) == want.argmax(1)).sum())
        total += len(ids)
    llm.close()
    print(f"{kind} q4_k_m: llama.cpp's argmax is transformers' (on the file's weights) at {agree} of {total} positions")
    check(agree >= 0.6 * total, f"{kind} q4_k_m: llama.cpp's argmax agrees at {agree} of {total} positions only")


# llama.cpp applies a LoRA adapter file at run time with its A / B in the file's type: against transformers on the
# merge of the adapter as the file holds it (A and B rounded to its type; the base and the linears' inputs rounded to
# f16 as above), f32 / f16 adapters measured 4e-3 to 1.3e-2 of the largest logit, bf16 2.5e-2 to 4.3e-2; the base
# alone 1.5-1.7 away.
LORA_BOUND = {"f32": 2e-2, "f16": 2e-2, "bf16": 5e-2}


def check_gguf_lora(tmp: pathlib.Path, name: str, model_dir, adapter, vocab, encode):
    """`export --gguf-lora TYPE`: the adapter alone as llama.cpp's LoRA adapter file. gguf-py reads its keys and every
    A / B back (`llama`'s q / k rows of B permuted as the base's); llama.cpp runs it over the base's GGUF (our export
    of the adapter with B zeroed: the NF4 base dequantized) and gives transformers' logits on the merged model; the
    same for the adapter as rsLoRA (alpha written as PEFT's scale x r)."""
    import gguf, llama_cpp, safetensors.torch
    zero = tmp / f"{name}_zero_adapter"
    shutil.copytree(adapter, zero)
    t = safetensors.torch.load_file(str(zero / "adapter_model.safetensors"))
    for k in t:
        if "lora_B" in k:
            t[k].zero_()
    safetensors.torch.save_file(t, str(zero / "adapter_model.safetensors"))
    run_ok("export", "--adapter", zero, "--out", tmp / f"{name}_lora_base", "--gguf", "f16")
    base = next((tmp / f"{name}_lora_base").glob("*.gguf"))
    rs = tmp / f"{name}_rs_adapter"
    shutil.copytree(adapter, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    config = json.loads((model_dir / "config.json").read_text())
    llama = vocab.get("arch", "llama") == "llama"
    ids = encode("the cat sat on the mat and the dog ran fast.")
    # rsLoRA (scale alpha / sqrt(r): 4 here, twice the plain adapter's) in f32: in f16, llama.cpp ran the llama model
    # 0.17 of the largest logit from the reference that holds the f16-rounded adapter (the qwen3 model 8.5e-3; alpha
    # 16 without rsLoRA, the same scale, as far), an arithmetic of its own this test does not model; f32 is within
    # 1.3e-2 on both.
    for label, ad, types in ((name, adapter, ("f32", "f16", "bf16")), (f"{name} rslora", rs, ("f32",))):
        acfg = json.loads((ad / "adapter_config.json").read_text())
        r, alpha = acfg["r"], acfg["lora_alpha"]
        scale = alpha / r ** 0.5 if acfg.get("use_rslora") else alpha / r
        lora = safetensors.torch.load_file(str(ad / "adapter_model.safetensors"))
        for gtype in types:
            # The reference: transformers on the merge of the adapter as the file holds it (A and B rounded to its
            # type), the base's weights and the linears' inputs rounded to f16 as the base GGUF runs them.
            tag = f"{label}_{gtype}".replace(" ", "_")
            held = tmp / f"{tag}_held"
            shutil.copytree(ad, held)
            dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[gtype]
            safetensors.torch.save_file({k: v.to(dt).float() for k, v in lora.items()},
                                        str(held / "adapter_model.safetensors"))
            run_ok("export", "--adapter", held, "--out", tmp / f"{tag}_m32", "--merge", "--dtype", "fp32")
            merged = safetensors.torch.load_file(str(tmp / f"{tag}_m32" / "model.safetensors"))
            with torch.no_grad():
                want = reference_model(tmp / f"{tag}_m32", merged, "f16")(torch.tensor([ids])).logits[0].numpy()
            out = tmp / f"{label}_lora_{gtype}".replace(" ", "_")
            info = last_json(run_ok("export", "--adapter", ad, "--out", out, "--gguf-lora", gtype))
            path = pathlib.Path(info["gguf_lora"])
            check(sorted(os.listdir(out)) == [f"{ad.name}-lora-{gtype}.gguf"] and path.parent == out,
                  f"{label} {gtype}: files {os.listdir(out)}")
            rd = gguf.GGUFReader(str(path))
            f = lambda k: rd.fields[k].contents() if k in rd.fields else None
            got_keys = [f("general.architecture"), f("general.type"), f("adapter.type")]
            check(got_keys == [vocab.get("arch", "llama"), "adapter", "lora"] and
                  np.float32(f("adapter.lora.alpha")) == np.float32(scale * r) and info["adapters"] == len(lora) // 2,
                  f"{label} {gtype}: keys {got_keys}, alpha {f('adapter.lora.alpha')} (want {scale * r}), {info}")
            tensors = {x.name: x for x in rd.tensors}
            check(len(tensors) == len(lora), f"{label} {gtype}: {len(tensors)} tensors, the adapter {len(lora)}")
            for key, w in lora.items():
                hf = key[len("base_model.model."):].replace(".lora_A.weight", ".weight").replace(".lora_B.weight",
                                                                                                 ".weight")
                side = "a" if ".lora_A." in key else "b"
                x = tensors.get(f"{gguf_name(hf)}.lora_{side}")
                if not check(x is not None, f"{label} {gtype}: no tensor for {key}"):
                    continue
                wn = w.float().numpy()
                heads = config["num_attention_heads"] if ".q_proj." in key else config["num_key_value_heads"]
                if llama and side == "b" and (".q_proj." in key or ".k_proj." in key):
                    wn = permute(wn, heads)
                rounded_w = {"f32": wn, "f16": wn.astype(np.float16).astype(np.float32),
                             "bf16": torch.from_numpy(wn).bfloat16().float().numpy()}[gtype]
                data = gguf.quants.dequantize(x.data, x.tensor_type).reshape(wn.shape)
                check(x.tensor_type.name == gtype.upper() and np.array_equal(data.astype(np.float32), rounded_w),
                      f"{label} {gtype}: {x.name} {x.tensor_type.name} differs from {key}")
            for lp in (path, None):
                llm = llama_cpp.Llama(model_path=str(base), lora_path=str(lp) if lp else None, n_ctx=128,
                                      n_batch=128, logits_all=True, verbose=False, n_threads=2, seed=0)
                llm.eval(ids)
                got = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
                llm.close()
                rel = float(np.abs(got - want).max() / np.abs(want).max())
                if lp:
                    print(f"{label} lora {gtype}: llama.cpp (base + adapter file) vs transformers (merged): "
                          f"{rel:.2e} of the largest logit (bound {LORA_BOUND[gtype]:.0e})")
                    check(rel <= LORA_BOUND[gtype], f"{label} lora {gtype}: logits differ by {rel:.2e}")
                else:  # the control: the base alone is far from the merged model
                    check(rel > 10 * LORA_BOUND[gtype], f"{label}: the base without the adapter is only {rel:.2e} "
                                                        "from the merged model: the check above would prove nothing")
                if gtype != "f32":
                    break


def check_lm_head_trained(tmp: pathlib.Path, model_dir: pathlib.Path):
    import safetensors.torch
    base = safetensors.torch.load_file(str(model_dir / "model.safetensors"))["lm_head.weight"]
    merged = safetensors.torch.load_file(str(tmp / "spm_merged32" / "model.safetensors"))["lm_head.weight"]
    check((merged - base).abs().max() > 1e-3, "the adapter's trained lm_head (modules_to_save) did not reach the merge")


def check_prequantized_base(tmp: pathlib.Path, model_dir: pathlib.Path, adapter: pathlib.Path):
    """A base saved pre-quantized (`qlora-train quantize`, bitsandbytes' layout) exports the same GGUF as the 16-bit
    base it came from (NF4 on load); --quant none merges onto the 16-bit weights, as `export --merge --quant none`."""
    import gguf, safetensors.torch
    run_ok("quantize", "--model", model_dir, "--out", tmp / "nf4_base")
    run_ok("export", "--adapter", adapter, "--model", tmp / "nf4_base", "--out", tmp / "pq", "--gguf", "bf16")
    a = gguf.GGUFReader(str(tmp / "pq" / "nf4_base-bf16.gguf"))
    b = gguf.GGUFReader(str(tmp / "spm_bf16" / f"{model_dir.name}-bf16.gguf"))
    same = all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.tensors, b.tensors))
    check(len(a.tensors) == len(b.tensors) and same, "a pre-quantized base gives other tensors than its 16-bit base")
    run_ok("export", "--adapter", adapter, "--out", tmp / "dense32", "--merge", "--dtype", "fp32", "--quant", "none")
    run_ok("export", "--adapter", adapter, "--out", tmp / "dense", "--gguf", "f16", "--quant", "none")
    merged = safetensors.torch.load_file(str(tmp / "dense32" / "model.safetensors"))
    w = merged["model.layers.0.mlp.down_proj.weight"]
    t = {t.name: t for t in gguf.GGUFReader(str(tmp / "dense" / f"{model_dir.name}-f16.gguf")).tensors}
    check(np.array_equal(np.asarray(t["blk.0.ffn_down.weight"].data), w.half().numpy()),
          "--quant none: the GGUF's ffn_down differs from export --merge --quant none's")
    nf4 = {t.name: t for t in b.tensors}
    check(not np.array_equal(np.asarray(nf4["blk.0.ffn_down.weight"].data).view(np.uint16),
                             w.bfloat16().view(torch.int16).numpy().view(np.uint16)),
          "--quant none gives the NF4 merge's weights: the check above would prove nothing")


def check_refusals(tmp: pathlib.Path, model_dir: pathlib.Path, adapter: pathlib.Path):
    def refused(args, code, needles, out):
        p = run(*args)
        msg = p.stderr + p.stdout
        ok = check(p.returncode == code and all(n in msg for n in needles),
                   f"{args}: exit {p.returncode} (want {code}), message {msg.strip()[-500:]!r} lacks {needles}")
        if ok:
            print(f"ok: exit {code}: {msg.strip().splitlines()[-1]}")
        leftovers = [str(p) for p in pathlib.Path(out).parent.rglob("*.partial")] if pathlib.Path(out).parent.exists() else []
        check(not leftovers, f"{args}: left partial files {leftovers}")

    # The base cannot be found: adapter_config.json names a missing directory; --model names one.
    gone = tmp / "adapter_gone"
    shutil.copytree(adapter, gone)
    cfg = json.loads((gone / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp / "no_such_base")
    (gone / "adapter_config.json").write_text(json.dumps(cfg))
    refused(("export", "--adapter", gone, "--out", tmp / "r1", "--gguf", "f16"), 2,
            ["adapter_config.json", "no_such_base"], tmp / "r1")
    refused(("export", "--adapter", adapter, "--model", tmp / "no_such_model", "--out", tmp / "r2", "--gguf", "f16"), 4,
            ["no_such_model"], tmp / "r2")
    # Architectures and types llama.cpp would not load as `llama`.
    for name, patch, needles in (
            ("gemma", {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, ["model_type", "'gemma'"]),
            ("qwen3_attention_bias", {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                                      "use_sliding_window": False, "attention_bias": True},
             ["attention_bias", "qwen3 architecture has no place for these projection biases"]),
            ("qwen2_llama3_rope", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
                                   "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
             ["rope_scaling.rope_type", "'llama3'", "default, linear and yarn rope scaling only"]),
            ("dynamic", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
             ["rope_scaling.rope_type", "'dynamic'", "default, linear, yarn and llama3", "no dynamic NTK"]),
            # YaRN as llama.cpp runs it or not at all: its correction range at beta_fast 32 / beta_slow 1 (a file
            # asking for others ran at those), whole dimensions (truncate), attention scaled by 1 + 0.1 ln(factor).
            ("yarn_beta", {"rope_scaling": dict(YARN, beta_fast=8.0)}, ["rope_scaling.beta_fast", "beta_fast 8,"]),
            ("yarn_truncate", {"rope_scaling": dict(YARN, truncate=False)},
             ["rope_scaling.truncate", "whole dimensions"]),
            ("yarn_attention", {"rope_scaling": dict(YARN, attention_factor=0.8)},
             ["rope_scaling.attention_factor", "0.8", "1 + 0.1 ln(factor) = 1.13863"]),
            ("yarn_mscale", {"rope_scaling": dict(YARN, mscale=0.707, mscale_all_dim=1.0)},
             ["rope_scaling.attention_factor", "mscale"]),
            # Found in fuzzing round 12: a Qwen2 model whose head_dim is not hidden_size / heads (transformers runs it)
            # was written as a GGUF that llama.cpp's qwen2 refuses to load (q / k / v sized n_embd x n_embd), exit 0.
            ("qwen2_head_dim", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
                                "head_dim": 32}, ["head_dim", "32 x 4 heads is not hidden_size 64", "qwen2"])):
        d = tmp / f"model_{name}"
        shutil.copytree(model_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("rope_parameters", None) if "rope" in name or name == "dynamic" or name.startswith("yarn") else None
        cfg.update(patch)
        (d / "config.json").write_text(json.dumps(cfg))
        refused(("export", "--adapter", adapter, "--model", d, "--out", tmp / f"r_{name}", "--gguf", "f16"), 4,
                [str(d / "config.json"), *needles], tmp / f"r_{name}")
        check(not (tmp / f"r_{name}").exists(), f"{name}: the refused export created its output directory")
    refused(("export", "--adapter", adapter, "--out", tmp / "r3", "--gguf", "iq4_xs"), 2, ["--gguf", "iq4_xs"], tmp / "r3")
    # --gguf-lora: what a llama.cpp LoRA file cannot hold (a trained lm_head: this adapter's modules_to_save; DoRA),
    # a type it does not take here, and options of the merge.
    refused(("export", "--adapter", adapter, "--out", tmp / "rl1", "--gguf-lora", "f16"), 6,
            [str(adapter / "adapter_config.json"), "modules_to_save", "--gguf TYPE"], tmp / "rl1")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    dora = tmp / "adapter_dora"
    get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, task_type="CAUSAL_LM")).save_pretrained(dora)
    refused(("export", "--adapter", dora, "--model", model_dir, "--out", tmp / "rl2", "--gguf-lora", "f16"), 6,
            [str(dora / "adapter_config.json"), "use_dora", "DoRA"], tmp / "rl2")
    for args, needles in ((("--gguf-lora", "q8_0"), ["--gguf-lora", "q8_0"]),
                          (("--gguf-lora", "f16", "--gguf", "f16"), ["--gguf-lora", "excludes", "--gguf"]),
                          (("--gguf-lora", "f16", "--dtype", "fp16"), ["--dtype fp16", "--gguf-lora f16"]),
                          (("--gguf-lora", "f16", "--quant", "none"), ["--quant", "adapter alone"])):
        refused(("export", "--adapter", adapter, "--out", tmp / "rl3", *args), 2, needles, tmp / "rl3")
        check(not (tmp / "rl3").exists(), f"{args}: the refused export created its output directory")
    # An existing output file: named, and left as it was.
    out = tmp / "exists"
    run_ok("export", "--adapter", adapter, "--out", out, "--gguf", "f16")
    gguf_file = out / f"{model_dir.name}-f16.gguf"
    before = gguf_file.read_bytes()
    refused(("export", "--adapter", adapter, "--out", out, "--gguf", "f16"), 2, [str(gguf_file), "exists"], out)
    check(gguf_file.read_bytes() == before and sorted(os.listdir(out)) == sorted([gguf_file.name, "Modelfile"]),
          "the refused export changed the existing output")
    # Another type into the same directory: the Modelfile is there already.
    refused(("export", "--adapter", adapter, "--out", out, "--gguf", "q8_0"), 2, [str(out / "Modelfile"), "exists"], out)
    (tmp / "a_file").write_text("x")
    refused(("export", "--adapter", adapter, "--out", tmp / "a_file", "--gguf", "f16"), 2,
            [str(tmp / "a_file"), "not a directory"], tmp / "a_file")
    # A failure while writing (a merged weight that is not finite): exit 7, no file and no directory left.
    import safetensors.torch
    nan = tmp / "adapter_nan"
    shutil.copytree(adapter, nan)
    t = safetensors.torch.load_file(str(nan / "adapter_model.safetensors"))
    key = next(k for k in sorted(t) if "layers.1" in k and "down_proj.lora_B" in k)
    t[key][0, 0] = float("inf")
    safetensors.torch.save_file(t, str(nan / "adapter_model.safetensors"))
    refused(("export", "--adapter", nan, "--out", tmp / "r_nan", "--gguf", "q8_0"), 7,
            ["blk.1.ffn_down.weight", "non-finite"], tmp / "r_nan")
    check(not (tmp / "r_nan").exists(), "a failed export left its output directory")


def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qt_gguf_"))
    spm = spm_setup(tmp)
    export_model(tmp, "spm", *spm)
    # Rope scaling: linear (llama.rope.scaling.*) and Llama 3.1's (a rope_freqs tensor), in llama.cpp as in transformers.
    rope = {"rope_theta": 10000.0}
    for name, params in (("linear", dict(rope, rope_type="linear", factor=4.0)),
                         ("llama3", dict(rope, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=64))):
        export_model(tmp, f"rope_{name}", *spm_setup(tmp, f"rope_{name}", rope_parameters=params), gtypes=("f16",))
    # YaRN (llama.cpp's ramp and attention scaling; its type, factor and original context in the file) on `llama`.
    export_model(tmp, "rope_yarn", *spm_setup(tmp, "rope_yarn", rope_parameters=YARN, max_position_embeddings=16384),
                 gtypes=("f16",))
    # Every projection with a bias (attention_bias, mlp_bias; random): llama.cpp's `llama` reads all seven. Leaving
    # them out moved transformers' logits by 0.47 of the largest.
    export_model(tmp, "bias", *spm_setup(tmp, "bias", attention_bias=True, mlp_bias=True), gtypes=("f16",))
    export_model(tmp, "mistral", *mistral_setup(tmp), gtypes=("f16",))
    bpe = bpe_setup(tmp)
    export_model(tmp, "bpe", *bpe)
    # GPT-2's layout: SmolLM2's (each digit alone first) as llama.cpp's smollm, ByteLevel's regex alone as gpt-2.
    for name, digits in (("smollm", True), ("gpt2", False)):
        export_model(tmp, name, *gpt2_setup(tmp, name, digits), gtypes=("f16",), texts=GPT2_TEXTS)
    for arch in ("qwen2", "qwen3"):
        export_model(tmp, arch, *qwen_setup(tmp, arch), gtypes=("f16", "q8_0"))
    # YaRN as Qwen's model cards enable it for long contexts (rope_scaling added to config.json), NEOX rope there.
    export_model(tmp, "qwen3_yarn", *qwen_setup(tmp, "qwen3", "qwen3_yarn", rope_parameters=YARN,
                                                    max_position_embeddings=16384), gtypes=("f16",))
    # k-quants: rows of 256 (q4_K / q5_K / q6_K; 2 layers, the second given 6 bits), 12 tied layers (the embedding
    # as the output, q6_K), rows of 64 and 100 (q5_0 / q5_1 / q8_0 / f16 fallbacks), Qwen3's 96-wide attn_output.
    k2 = spm_setup(tmp, "k2", hidden_size=256, intermediate_size=512)
    check_k_quants(tmp, "k2", k2[0], k2[1], {"q4_k_m": {"Q4_K", "Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"},
                                             "q4_0": {"Q4_0", "Q6_K"}, "q4_1": {"Q4_1"}, "q5_1": {"Q5_1"},
                                             "q3_k_m": {"Q3_K", "Q4_K", "Q5_K"}, "q2_k": {"Q2_K", "Q3_K"}},
                   encode=k2[3])
    check_k_quants(tmp, "k12", *spm_setup(tmp, "k12", hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                                          tie_word_embeddings=True)[:2],
                   {"q4_k_m": {"Q4_K", "Q6_K"}, "q4_k_s": {"Q4_K", "Q5_K", "Q6_K"}, "q5_k_s": {"Q5_K", "Q6_K"}})
    check_k_quants(tmp, "kfall", *spm_setup(tmp, "kfall", num_hidden_layers=3, intermediate_size=100)[:2],
                   {"q4_k_m": {"Q5_0", "Q8_0", "F16"}, "q5_k_m": {"Q5_1", "Q8_0", "F16"}, "q6_k": {"Q8_0", "F16"},
                    "q2_k": {"Q4_0"}})
    check_k_quants(tmp, "qwen3", tmp / "qwen3_model", tmp / "qwen3_adapter", {"q4_k_m": {"Q5_0"}})
    # The trained lm_head (modules_to_save) is the GGUF's output.weight (checked against the merge above): it moved.
    # The adapter alone for llama.cpp (--gguf-lora), on `llama` (the q / k permutation) and qwen3.
    check_gguf_lora(tmp, "gl", *spm_setup(tmp, "gl"))
    check_gguf_lora(tmp, "glq3", *qwen_setup(tmp, "qwen3", "glq3"))
    check_lm_head_trained(tmp, spm[0])
    check_prequantized_base(tmp, spm[0], spm[1])
    check_refusals(tmp, spm[0], spm[1])
    finish("GGUF export checks", failures)


if __name__ == "__main__":
    main()
