r"""Peer for the packed rows of scripts/bench.py (NAME-BxSpD: documents of SFT-like lengths packed into rows): Unsloth
QLoRA on the same token ids our trainer trained on, padding-free as Unsloth's trainer packs by default.

`qlora-train bench --doc-tokens D` writes its step's documents to OUT/tokens.jsonl (one {"input_ids": [...]} a line,
in order, rows of exactly S tokens). Here those documents are laid end to end in one row of B x S tokens with
position ids restarting at each document and `packed_seq_lengths` (the documents' lengths: Unsloth's attention
runs varlen over them, no token attends across a document), and the first token of each document not a target
(as transformers' DataCollatorWithFlattening masks it). The rest is ../shared/peers/unsloth_baseline.py's run():
the same model directory, NF4 with double quantization, LoRA r=16 on all seven linears, its checkpointing mode,
AdamW, PEER_WARM / PEER_STEPS; one JSON line with tokens/s (all B x S input tokens a step, as ours counts them),
target tokens/s and the peak memory.

Usage (GPU, carried .usite, .peers, .peerscripts; scripts/bench.py sets this up for packed rows):
    PYTHONPATH=$PWD/.usite:$PWD/.peers:$PWD/.peerscripts HF_HUB_OFFLINE=1 \
        python3 scripts/peers/unsloth_packed.py SHAPE B S CKPT TOKENS_JSONL   (CKPT: 0, 1 = True, u = "unsloth")
Check (CPU, no Unsloth, no GPU): python3 scripts/peers/unsloth_packed.py --dry-run TOKENS_JSONL B S
    prints the packed row's document count, targets and length; exits non-zero if the file is not B rows of S.
"""
import json, os, sys, time


def packed(tokens_path, batch, seq):
    """(input ids, position ids, labels, document lengths) as lists, one row of batch x seq tokens, from the
    documents of `tokens_path`; raises ValueError when they do not fill batch rows of seq tokens exactly."""
    docs = [json.loads(l)["input_ids"] for l in open(tokens_path) if l.strip()]
    if not docs or any(not d for d in docs):
        raise ValueError(f"{tokens_path}: no documents, or an empty one")
    ids, pos, labels, lengths, row = [], [], [], [], 0
    for d in docs:
        # Rows of seq tokens exactly, each document within one row (bench writes them so).
        if row + len(d) > seq:
            raise ValueError(f"{tokens_path}: a document of {len(d)} tokens crosses a row of {seq} at {row}")
        row = (row + len(d)) % seq
        ids += d
        pos += range(len(d))
        labels += [-100] + d[1:]
        lengths.append(len(d))
    if len(ids) != batch * seq:
        raise ValueError(f"{tokens_path}: {len(ids)} tokens, expected {batch} rows of {seq}")
    return ids, pos, labels, lengths


def run(name, batch, seq, ckpt, tokens_path, steps=int(os.environ.get("PEER_STEPS", 8)),
        warm=int(os.environ.get("PEER_WARM", 3))):
    import unsloth  # before transformers
    from unsloth import FastLanguageModel
    import torch
    import unsloth_baseline as ub
    ids, pos, labels, lengths = packed(tokens_path, batch, seq)
    d = ub.make_model_dir(name, seq)
    torch.cuda.empty_cache()
    model, _ = FastLanguageModel.from_pretrained(model_name=d, max_seq_length=batch * seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing=ckpt, random_state=0, max_seq_length=batch * seq)
    FastLanguageModel.for_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.tensor([ids], device="cuda")
    p = torch.tensor([pos], device="cuda")
    y = torch.tensor([labels], device="cuda")
    n = torch.tensor(lengths, dtype=torch.int32)  # on the host: Unsloth stages it once
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warm + steps):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        out = model(input_ids=x, labels=y, position_ids=p, packed_seq_lengths=n)
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
    t = sorted(times[warm:])[len(times[warm:]) // 2]
    targets = sum(l != -100 for l in labels)
    r = dict(system=f"unsloth-{unsloth.__version__}", model=name, batch=batch, seq=seq, documents=len(lengths), grad_ckpt=ckpt,
             step_s=round(t, 4), tok_per_s=round(batch * seq / t), target_tok_per_s=round(targets / t),
             peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=round(out.loss.item(), 3))
    print(json.dumps(r), flush=True)
    return r


def main():
    a = sys.argv[1:]
    if a[:1] == ["--dry-run"] and len(a) == 4:
        try:
            ids, pos, labels, lengths = packed(a[1], int(a[2]), int(a[3]))
        except ValueError as e:
            sys.exit(f"dry run: {e}")
        print(json.dumps(dict(tokens=len(ids), docs=len(lengths), targets=sum(l != -100 for l in labels),
                              median_doc=sorted(lengths)[len(lengths) // 2], restarts=sum(q == 0 for q in pos))))
        return
    if len(a) != 5:
        sys.exit(__doc__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    name, b, s, c, path = a[0], int(a[1]), int(a[2]), {"0": False, "1": True, "u": "unsloth"}[a[3]], a[4]
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    try:
        run(name, b, s, c, path)
    except torch.OutOfMemoryError:
        print(json.dumps(dict(system="unsloth", model=name, batch=b, seq=s, grad_ckpt=c, error="OOM")), flush=True)


if __name__ == "__main__":
    main()
