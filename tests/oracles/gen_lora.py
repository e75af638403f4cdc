"""LoRA and DoRA on an NF4 base, as transformers + PEFT + bitsandbytes compute it (CPU, fp32).

<out>/lora/base/          a small random LLaMA (fp32 save_pretrained): the ORIGINAL weights
<out>/lora/base_nf4/      the same with every block linear quantized by bitsandbytes (quantize_4bit, nf4,
                          blocksize 64, compress_statistics=True) and stored as transformers saves a Linear4bit
                          (config.json quantization_config; QuantState.as_dict(packed=True) under '<module>.weight.')
<out>/lora/base_tied/, base_tied_nf4/  the same for a model with tie_word_embeddings (one [V, H] tensor, both roles)
<out>/lora/<case>/adapter/          PEFT's save_pretrained of a LoRA adapter with random non-zero A and B (and, for
                                    the DoRA cases, a DoRA magnitude moved randomly away from its initial value;
                                    for the mts_* cases, modules_to_save lm_head + embed_tokens perturbed from the
                                    base; on the tied model with ensure_weight_tying, one trained tensor)
<out>/lora/<case>/reference.safetensors
    input_ids, labels, loss, logits, "grad.<saved PEFT key>" for every trained tensor (DoRA magnitudes and
    modules_to_save included), and for DoRA "init.<saved key>" of each magnitude as get_peft_model initialised it:
    the model is the transformers LLaMA whose block linear weights ARE bitsandbytes' dequantized NF4 values,
    wrapped by get_peft_model.

bitsandbytes' CPU path quantizes the nested absmax with a kernel that is not exactly nearest-code (gen_nf4.py), so
our quantizer may differ from it by a code now and then: the exact parity test reads base_nf4 (the same bytes);
base is there for quantize-on-load, held to a looser bound.
"""
import json, pathlib

import torch
from safetensors.torch import save_file

CFG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=300, tie_word_embeddings=False, rms_norm_eps=1e-5)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    # The QLoRA setup: every block linear, alpha / r scaling.
    "all_targets": dict(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=False),
    # rsLoRA scaling (alpha / sqrt(r)) on a subset of modules.
    "rslora_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    # DoRA (use_dora): every block linear; and with rsLoRA scaling on the MLP only. Listed after the LoRA cases so
    # that their random draws (and references) stay as they were.
    "dora_all": dict(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=False, use_dora=True),
    "dora_rslora_mlp": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True,
                            use_dora=True),
    # PEFT's modules_to_save: lm_head and the embeddings trained in full beside the adapters (untied model); last,
    # for the same reason.
    "mts_untied": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=False,
                       modules_to_save=["lm_head", "embed_tokens"]),
}
# The same on the tied model: with ensure_weight_tying PEFT trains one tensor for both roles and saves it under both
# keys (base_model.model.lm_head.weight and base_model.model.model.embed_tokens.weight).
TIED_CASES = {
    "mts_tied": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=False,
                     modules_to_save=["lm_head", "embed_tokens"], ensure_weight_tying=True),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANTIZATION_CONFIG = {  # what transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant).to_dict() saves
    "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
    "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
    "llm_int8_enable_fp32_cpu_offload": False}


def linear_names(n_layers):
    return [f"model.layers.{i}.{m}" for i in range(n_layers) for m in LINEARS]


def write_nf4_dir(model, src: pathlib.Path, dst: pathlib.Path):
    """Quantizes every block linear of `model` with bitsandbytes, writes dst as a pre-quantized checkpoint and puts
    the dequantized values back into `model` (so that it computes with exactly the NF4 base)."""
    import bitsandbytes.functional as F
    dst.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = {}
    for name in linear_names(model.config.num_hidden_layers):
        w = sd.pop(name + ".weight")
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        out[name + ".weight"] = q
        for k, v in state.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v
        model.get_submodule(name).weight.data.copy_(F.dequantize_4bit(q, state))
    out.update(sd)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = QUANTIZATION_CONFIG
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def make_base(root: pathlib.Path, name: str, arch="llama", **overrides):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}.get(arch, (LlamaConfig, LlamaForCausalLM))
    cfg = config_cls(**{**CFG, **overrides}, attn_implementation="eager")
    base = model_cls(cfg).float().eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):  # Qwen2's q / k / v biases: zero at init would hide a missing bias
                p.copy_(0.1 * torch.randn_like(p))
    base.save_pretrained(root / name, safe_serialization=True)
    write_nf4_dir(base, root / name, root / (name + "_nf4"))  # base now holds the dequantized NF4 weights
    return base


def write_cases(root: pathlib.Path, base, cases: dict, ids, labels):
    from peft import LoraConfig, get_peft_model
    V = base.config.vocab_size
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for case, lcfg in cases.items():
        d = root / case
        base.load_state_dict(state)
        model = get_peft_model(base, LoraConfig(**{"lora_dropout": 0.0, "task_type": "CAUSAL_LM", **lcfg}))
        init = {"init." + peft_key(n): p.detach().clone() for n, p in model.named_parameters()
                if "lora_magnitude_vector" in n}
        with torch.no_grad():  # random non-zero A and B (B = 0 would leave A's gradient zero)
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:  # ||W||_row at init; moved so that m / ||W + s B A|| is not ~1
                    p.mul_(1 + 0.2 * torch.randn_like(p))
                elif "lora_" in n:
                    p.copy_(torch.randn_like(p) * (0.2 if "lora_A" in n else 0.05))
                elif "modules_to_save" in n:  # a trained copy differs from the base: loading the base would fail
                    p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(d / "adapter")
        extra = {}
        if lcfg.get("lora_dropout", 0.0) > 0:  # in training, the masks drawn from this seed (the CPU generator)
            seed = 1234
            model.train()
            torch.manual_seed(seed)
            extra["seed"] = torch.tensor([seed])
        logits = model(input_ids=ids).logits
        model.eval()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        ref = {"input_ids": ids, "labels": labels, "loss": loss.detach().reshape(1), "logits": logits.detach(), **init,
               **extra}
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref["grad." + peft_key(n)] = p.grad.detach().clone()
        save_file({k: v.contiguous() for k, v in ref.items()}, str(d / "reference.safetensors"))
        base = model.unload()  # the plain transformers model again, for the next case
        base.load_state_dict(state)


def peft_key(name):  # the saved key: PeftModel's parameter name without the adapter name (and wrapper)
    name = name.replace(".modules_to_save.default", "").replace(".default", "")
    # get_peft_model_state_dict saves lora_magnitude_vector.<adapter>.weight as lora_magnitude_vector
    return name[:-len(".weight")] if name.endswith(".lora_magnitude_vector.weight") else name


def generate(out: pathlib.Path):
    torch.manual_seed(4321)
    root = out / "lora"
    root.mkdir(parents=True, exist_ok=True)
    base = make_base(root, "base")
    B, S = 2, 19
    ids = torch.randint(0, CFG["vocab_size"], (B, S))
    labels = ids.clone()
    labels[1, :4] = -100
    write_cases(root, base, CASES, ids, labels)
    write_cases(root, make_base(root, "base_tied", tie_word_embeddings=True), TIED_CASES, ids, labels)
    # Qwen2 (q / k / v biases beside the NF4 bases, tied embeddings as the small Qwen2.5 sizes): last, so that the
    # draws above stay as they were.
    write_cases(root, make_base(root, "base_qwen2", arch="qwen2", tie_word_embeddings=True, use_sliding_window=False),
                {"qwen2_all": dict(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=False)}, ids, labels)
    # Qwen3 (q / k norms before RoPE, head_dim 32 given (not hidden / heads = 16), untied; 32: a width the fused q / k
    # norm + RoPE kernel takes, so that the model's CUDA path runs it).
    write_cases(root, make_base(root, "base_qwen3", arch="qwen3", head_dim=32, use_sliding_window=False),
                {"qwen3_all": dict(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=False)}, ids, labels)
    # LoRA dropout in training (PEFT's lora_dropout on every block linear), on the NF4 base of the first cases (base_nf4): each
    # linear draws its own mask of its input from the CPU generator, in the order the model calls them (q, k, v, o,
    # gate, up, down); the reference holds the seed. Last, so that the draws above stay as they were.
    write_cases(root, base, {"dropout_all": dict(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=False,
                                                     lora_dropout=0.1)}, ids, labels)
