r"""Peer for the Qwen rows of scripts/bench.py: Unsloth QLoRA on random-init Qwen2.5-7B and Qwen3-8B, the shapes of
`qlora-train bench --shape qwen2.5-7b | qwen3-8b` (lib/model/random_init.cpp, the published config.json fields).

The step is ../shared/peers/unsloth_baseline.py's run() unchanged (NF4 with double quantization, LoRA r=16 on all
seven linears, Unsloth's checkpointing, AdamW, PEER_WARM / PEER_STEPS); only its model directory differs: made here
with transformers' Qwen2Config / Qwen2ForCausalLM (q, k, v biases) or Qwen3Config / Qwen3ForCausalLM (q / k
norms, head_dim 128), saved with a placeholder word-level tokenizer over the whole vocabulary, as make_model_dir
does for the Llama shapes (unsloth_baseline.make_model_dir is replaced by this file's). Prints one JSON line per case.

Usage (GPU, carried .usite, .peers, .peerscripts; scripts/bench.py sets this up for rows q2.5-7b-BxS, q3-8b-BxS):
    PYTHONPATH=$PWD/.usite:$PWD/.peers:$PWD/.peerscripts HF_HUB_OFFLINE=1 \
        python3 scripts/peers/unsloth_qwen.py SHAPE B S CKPT [SHAPE B S CKPT]...   (CKPT: 0, 1 = True, u = "unsloth")
    SHAPE: qwen2.5-7b, qwen3-8b, or qwen2-tiny / qwen3-tiny (the same structure, small: a quick look on the GPU).
Check (CPU, no Unsloth, no GPU, 10 s): python3 scripts/peers/unsloth_qwen.py --dry-run [DIR to keep the tiny dirs in]
    the full shapes built on the meta device must have the published parameter counts; the tiny ones are saved,
    loaded back with AutoModelForCausalLM / AutoTokenizer and checked (class, biases, norms, head_dim, pad id).
"""
import json, os, shutil, sys, tempfile

# config.json fields of lib/model/random_init.cpp's entries (Qwen/Qwen2.5-7B, Qwen/Qwen3-8B on the hub).
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-6,
                rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643, use_sliding_window=False)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, rms_norm_eps=1e-6,
                rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645, attention_bias=False,
                use_sliding_window=False)
# The same structures, small (the vocabulary kept, so that the tokenizer and the special ids are the real ones).
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SHAPES = {
    "qwen2.5-7b": ("qwen2", QWEN2_7B),
    "qwen3-8b": ("qwen3", QWEN3_8B),
    "qwen2-tiny": ("qwen2", dict(QWEN2_7B, **TINY)),
    "qwen3-tiny": ("qwen3", dict(QWEN3_8B, **TINY, head_dim=32)),
}
# Parameter counts (Qwen2.5 report: 7.62B; Qwen3-8B model card: 8.2B), as tests/test_random_init.cpp checks ours.
PUBLISHED = {"qwen2.5-7b": 7615616512, "qwen3-8b": 8190735360}
# Qwen's special tokens; the pad is <|vision_pad|>, a pad-named token distinct from the eos (as Unsloth's own Qwen
# uploads have it), so that Unsloth's pad fix neither adds a token nor resizes the embeddings.
SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151654: "<|vision_pad|>"}
PAD_ID = 151654


def config(name, pos):
    kind, fields = SHAPES[name]
    if kind == "qwen2":
        from transformers import Qwen2Config as C, Qwen2ForCausalLM as M
    else:
        from transformers import Qwen3Config as C, Qwen3ForCausalLM as M
    # max_position_embeddings as unsloth_baseline.make_model_dir sets it (max(8192, seq)), not the published 131072
    # / 40960: RoPE is computed, the weights are the same; it only bounds a rotary cache.
    return C(**fields, max_position_embeddings=pos, pad_token_id=PAD_ID), M


def expected_params(c):
    """The count transformers gives, from the config alone (as LlamaConfig::num_parameters counts ours)."""
    h, hd = c.hidden_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    block = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size + 2 * h  # q k v o, gate up down, two norms
    if c.model_type == "qwen2":
        block += q + 2 * kv  # q, k, v biases
    else:
        block += 2 * hd  # q_norm, k_norm
        if c.attention_bias:
            block += q + 2 * kv + h
    return c.num_hidden_layers * block + c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h


def save_tokenizer(d, c):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {SPECIALS.get(i, f"t{i}"): i for i in range(c.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # No bos_token: Qwen's tokenizers have none (config.json's bos_token_id is kept as published).
    others = [t for i, t in SPECIALS.items() if i not in (c.eos_token_id, PAD_ID)]
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=SPECIALS[c.eos_token_id], pad_token=SPECIALS[PAD_ID],
                            additional_special_tokens=others).save_pretrained(d)


def make_model_dir(name, seq, device="cuda", root=None):
    """The random model of shape `name` as an HF directory under root (default: the temporary directory), reused
    when there; written beside and renamed, so that an interrupted write leaves no half directory."""
    import torch
    pos = max(8192, seq)
    d = os.path.join(root or tempfile.gettempdir(), f"rand-{name}-{pos}")
    if os.path.exists(os.path.join(d, "config.json")):
        return d
    c, M = config(name, pos)
    tmp = d + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        m = M(c).to(torch.bfloat16)
    m.save_pretrained(tmp)
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    save_tokenizer(tmp, c)
    os.rename(tmp, d)
    return d


def dry_run(root=None):
    """CPU only, no Unsloth: the full shapes' parameter counts (meta device) and a tiny directory of each kind,
    loaded back as Unsloth's loader would find it. Exits non-zero on any difference."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    bad = []
    for name, published in PUBLISHED.items():
        c, M = config(name, 8192)
        with torch.device("meta"):
            m = M(c)
        n = sum(p.numel() for p in m.parameters())
        r = dict(shape=name, model_type=c.model_type, params=n, formula=expected_params(c), published=published,
                 head_dim=m.model.layers[0].self_attn.head_dim,
                 q_bias=m.model.layers[0].self_attn.q_proj.bias is not None,
                 qk_norm=hasattr(m.model.layers[0].self_attn, "q_norm"))
        print(json.dumps(r), flush=True)
        if not n == r["formula"] == published:
            bad.append(f"{name}: {n} parameters, formula {r['formula']}, published {published}")
        del m
    made = root is None
    root = root or tempfile.mkdtemp(prefix="unsloth_qwen_")
    for name in ("qwen2-tiny", "qwen3-tiny"):
        d = make_model_dir(name, 128, device="cpu", root=root)
        c = AutoConfig.from_pretrained(d, local_files_only=True)
        m = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        a = m.model.layers[0].self_attn
        want = dict(qwen2=("Qwen2ForCausalLM", True, False), qwen3=("Qwen3ForCausalLM", False, True))[c.model_type]
        got = (type(m).__name__, a.q_proj.bias is not None and a.k_proj.bias is not None and a.v_proj.bias is not None,
               hasattr(a, "q_norm") and hasattr(a, "k_norm"))
        x = torch.randint(0, 128000, (1, 16))  # unsloth_baseline's ids: below 128000, inside either vocabulary
        loss = m(input_ids=x, labels=x).loss.item()
        r = dict(shape=name, dir=d, cls=got[0], qkv_bias=got[1], qk_norm=got[2], head_dim=a.head_dim,
                 params=sum(p.numel() for p in m.parameters()), formula=expected_params(c), dtype=str(m.dtype),
                 vocab=len(tok), pad=[tok.pad_token, tok.pad_token_id], eos=[tok.eos_token, tok.eos_token_id],
                 config_ids=[c.bos_token_id, c.eos_token_id, c.pad_token_id], loss=round(loss, 3))
        print(json.dumps(r), flush=True)
        if got != want:
            bad.append(f"{name}: {got}, expected {want}")
        if r["params"] != r["formula"]:
            bad.append(f"{name}: {r['params']} parameters, formula {r['formula']}")
        if tok.pad_token_id != PAD_ID or tok.pad_token_id == tok.eos_token_id or tok.eos_token_id != c.eos_token_id:
            bad.append(f"{name}: tokenizer pad {tok.pad_token_id}, eos {tok.eos_token_id}, config eos {c.eos_token_id}")
        if len(tok) != c.vocab_size:
            bad.append(f"{name}: tokenizer of {len(tok)} ids, vocabulary {c.vocab_size}")
        if name == "qwen3-tiny" and a.head_dim != SHAPES[name][1]["head_dim"]:
            bad.append(f"{name}: head_dim {a.head_dim}")
    if made:
        shutil.rmtree(root)
    if bad:
        sys.exit("dry run: " + "; ".join(bad))
    print("dry run: ok", flush=True)


def main():
    a = sys.argv[1:]
    if a[:1] == ["--dry-run"]:
        return dry_run(a[1] if len(a) > 1 else None)
    if not a or len(a) % 4:
        sys.exit(__doc__)
    for i in range(0, len(a), 4):
        if a[i] not in SHAPES:
            sys.exit(f"unknown shape {a[i]!r}; known: {', '.join(SHAPES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth_baseline as ub  # imports Unsloth before transformers, as it must come first
    import torch
    ub.make_model_dir = make_model_dir  # run() looks it up in its module at call time
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    ck = lambda s: {"0": False, "1": True, "u": "unsloth"}[s]
    for i in range(0, len(a), 4):
        name, b, s, c = a[i], int(a[i + 1]), int(a[i + 2]), ck(a[i + 3])
        try:
            ub.run(name, b, s, c)
        except torch.OutOfMemoryError:
            print(json.dumps(dict(system="unsloth", model=name, batch=b, seq=s, grad_ckpt=c, error="OOM")), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
