"""Small random LLaMA checkpoints saved by transformers, with reference logits, loss and gradients.

For each case: <out>/llama/<case>/model/ (config.json + safetensors, as save_pretrained writes them) and
<out>/llama/<case>/reference.safetensors holding input_ids, labels, logits, loss, the gradient of the loss with
respect to the input embeddings ("grad.inputs_embeds") and to every weight ("grad.<hf name>")."""
import json, pathlib
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, \
    Qwen3Config, Qwen3ForCausalLM

CASES = {
    # GQA, untied, one file, transformers 5.x config (rope_parameters, dtype).
    "gqa_untied": dict(cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False), shard=None, era=5),
    # Plain multi-head, tied embeddings, sharded files with an index.
    "mha_tied_sharded": dict(cfg=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                                      num_key_value_heads=3, vocab_size=256, tie_word_embeddings=True),
                             shard="40KB", era=5),
    # Llama 3.1 rope scaling, explicit head_dim != hidden/heads, written the transformers 4.x way.
    "llama3_rope_v4": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=24, vocab_size=320, tie_word_embeddings=False,
                                    max_position_embeddings=256, rope_theta=500000.0,
                                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=16)),
                           shard=None, era=4),
    # Linear rope scaling in a 4.x config with the old "type" key.
    "linear_rope_v4": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                                    rope_scaling=dict(rope_type="linear", factor=3.0)),
                           shard=None, era=4, v4_type_key=True),
    # Dynamic NTK scaling with max_position_embeddings below the test length, so the base grows (5.x config).
    "dynamic_rope": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                                  max_position_embeddings=10, rope_scaling=dict(rope_type="dynamic", factor=2.0)),
                         shard=None, era=5),
    # YaRN: the ramp covers dimensions 2..6 of 8; attention_factor 0.1 ln 4 + 1 (5.x config).
    "yarn_rope": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                               max_position_embeddings=8192,
                               rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                                 original_max_position_embeddings=2048)),
                      shard=None, era=5),
    # YaRN in a 4.x config, explicit attention_factor.
    "yarn_rope_v4": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                                  max_position_embeddings=2048,
                                  rope_scaling=dict(rope_type="yarn", factor=2.0, beta_fast=16.0, beta_slow=2.0,
                                                    attention_factor=1.3, original_max_position_embeddings=1024)),
                         shard=None, era=4),
    # attention_bias and mlp_bias (biases randomised below: HF initialises them to zero).
    "bias": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                          attention_bias=True, mlp_bias=True), shard=None, era=5),
    # Llama 2 7B's shape ratios without GQA (intermediate 11008/4096), 4.x config.
    "llama2_mha": dict(cfg=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=320, tie_word_embeddings=False,
                                max_position_embeddings=4096), shard=None, era=4),
    # TinyLlama-1.1B's ratios: 32 query heads on 4 KV heads (8:1), intermediate 5632/2048; 22 layers shrunk to 2.
    "tinyllama_gqa": dict(cfg=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=16,
                                   num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False), shard=None, era=4),
    # Mistral with a sliding window shorter than the test sequence (17).
    "mistral_window": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                                    sliding_window=5), shard=None, era=5, arch="mistral"),
    # Qwen2 / 2.5: q, k, v with a bias, o_proj without; tied embeddings as the small sizes have; a sliding_window
    # written beside use_sliding_window false (as Qwen2.5's config.json has it: no window). 5.x config.
    "qwen2_tied": dict(cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
                                use_sliding_window=False, sliding_window=4, max_window_layers=1,
                                rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
                       shard=None, era=5, arch="qwen2"),
    # Qwen2, untied, 8:1 GQA, written the transformers 4.x way (rope_theta, torch_dtype); attention_bias and
    # mlp_bias true in config.json, which Qwen2's modules ignore (o_proj and the MLP have no bias whatever they say).
    "qwen2_v4": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=1, vocab_size=256, tie_word_embeddings=False,
                              use_sliding_window=False, sliding_window=8, attention_bias=True, mlp_bias=True,
                              rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
                     shard=None, era=4, arch="qwen2"),
    # Qwen3: q_norm / k_norm per head before RoPE (weights randomised below), head_dim given and != hidden / heads,
    # no bias, untied. 5.x config.
    "qwen3": dict(cfg=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=24, vocab_size=300, tie_word_embeddings=False,
                           use_sliding_window=False, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
                  shard=None, era=5, arch="qwen3"),
    # Qwen3, tied (as the 0.6B-4B sizes), 4:1 GQA, 4.x config.
    "qwen3_tied_v4": dict(cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True,
                                   use_sliding_window=False,
                                   rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
                          shard=None, era=4, arch="qwen3"),
}

def to_v4_config(path: pathlib.Path, type_key=False):
    """Rewrites a 5.x config.json in the 4.x spelling: top-level rope_theta / rope_scaling, torch_dtype; with
    type_key, rope_scaling names its type with the older "type" key."""
    c = json.loads(path.read_text())
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.pop("rope_theta", 10000.0)
    c["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    if type_key and c["rope_scaling"]:
        c["rope_scaling"]["type"] = c["rope_scaling"].pop("rope_type")
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    path.write_text(json.dumps(c, indent=2))

def generate(out: pathlib.Path):
    torch.manual_seed(1234)
    for name, case in CASES.items():
        d = out / "llama" / name
        (d / "model").mkdir(parents=True, exist_ok=True)
        config_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "qwen3": (Qwen3Config, Qwen3ForCausalLM)}.get(case.get("arch"),
                                                                             (LlamaConfig, LlamaForCausalLM))
        cfg = config_cls(**case["cfg"], rms_norm_eps=1e-5, attn_implementation="eager")
        model = model_cls(cfg).float().eval()
        with torch.no_grad():  # norms at 1.0 (biases at 0) would hide a missing scale (bias): randomise them
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif n.endswith(".bias"):
                    p.copy_(0.1 * torch.randn_like(p))
        kw = dict(safe_serialization=True)
        if case["shard"]:
            kw["max_shard_size"] = case["shard"]
        model.save_pretrained(d / "model", **kw)
        if case["era"] == 4:
            to_v4_config(d / "model" / "config.json", case.get("v4_type_key", False))
        if case.get("arch") == "qwen2":  # Qwen2.5's config.json keeps the window size beside use_sliding_window
            c = json.loads((d / "model" / "config.json").read_text())
            c["sliding_window"] = case["cfg"]["sliding_window"]
            (d / "model" / "config.json").write_text(json.dumps(c, indent=2))
        B, S = 2, 17
        ids = torch.randint(0, cfg.vocab_size, (B, S))
        labels = ids.clone()
        labels[0, :3] = -100  # some ignored positions
        emb = model.model.embed_tokens(ids)
        emb.retain_grad()
        logits = model(inputs_embeds=emb).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        ref = {"input_ids": ids, "labels": labels, "logits": logits.detach(), "loss": loss.detach().reshape(1),
               "grad.inputs_embeds": emb.grad}
        for n, p in model.named_parameters():
            ref["grad." + n] = p.grad.detach().clone()
        save_file({k: v.contiguous() for k, v in ref.items()}, str(d / "reference.safetensors"))
