"""GPU smoke test of the trainer (tooling, run by scripts/gpu-check.sh): a Llama-3.2-1B-shaped random model made
with transformers, a repeated batch of random token ids (tokenized jsonl), QLoRA r=16 on all seven linears, bf16,
gradient checkpointing on. Checks that the loss falls and prints one JSON line with tokens/s and peak memory
(the trainer's metrics.jsonl), to compare with ../shared/peers/hf_peft_baseline.py on the same shape.
Usage: python3 scripts/gpu_train_smoke.py BINARY WORKDIR [BATCH SEQ STEPS [LOSS]]   (LOSS: fused (default) or plain)"""
import json, os, pathlib, subprocess, sys
import torch

def main():
    binary, work = sys.argv[1], pathlib.Path(sys.argv[2])
    batch, seq, steps = (int(x) for x in (sys.argv[3:6] if len(sys.argv) >= 6 else (4, 2048, 12)))
    loss_kind = sys.argv[6] if len(sys.argv) >= 7 else "fused"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "llama-3.2-1b"
    if not (model_dir / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                          max_position_embeddings=max(8192, seq), rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192), bos_token_id=128000, eos_token_id=128001)
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        m.save_pretrained(model_dir, safe_serialization=True)
        del m
        torch.cuda.empty_cache()
        # A tokenizer file so that the model directory is complete; the data below is already tokenized.
        tok = pathlib.Path(os.environ.get("QT_FIXTURES", "build-gpu/tests/fixtures")) / "tokenizer"
        src = tok / "bpe" / "tokenizer.json"
        if not src.exists():
            sys.exit(f"no tokenizer.json fixture under {tok}")
        for f in src.parent.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (model_dir / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(1)
    # Ids below 256 exist in any byte-level BPE vocabulary (the copied tokenizer is a small test one).
    rows = [torch.randint(0, 256, (seq,), generator=g).tolist() for _ in range(batch)]
    data = work / "repeated.jsonl"
    data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    out = work / "run"
    config = {"output_dir": str(out), "model": {"path": str(model_dir), "quant": "nf4", "device": "cuda"},
              "lora": {"r": 16, "alpha": 16},
              "data": {"train_file": str(data), "format": "tokenized", "max_seq_len": seq, "packing": False, "shuffle": False},
              "train": {"steps": steps, "batch_size": batch, "seed": 0, "log_every": 1, "memory": {"checkpointing": True},
                        "loss": loss_kind},
              "optim": {"lr": 1e-3, "schedule": "constant"}, "checkpoint": {"every": 0}, "logging": {"progress": "lines"}}
    (work / "smoke.json").write_text(json.dumps(config))
    subprocess.run(["rm", "-rf", str(out)])
    p = subprocess.run([binary, "--config", str(work / "smoke.json")], capture_output=True, text=True)
    print(p.stderr[-2500:])
    if p.returncode != 0:
        sys.exit(f"qlora-train exited {p.returncode}")
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if "loss" in x]
    timed = m[3:] if len(m) > 4 else m
    tps = sorted(x["tokens_per_s"] for x in timed)[len(timed) // 2]
    # The peers count batch * seq input tokens per step (padding too; there is none here).
    step_s = sorted(x["step_s"] for x in timed)[len(timed) // 2]
    res = dict(system="qlora-train", loss=loss_kind, model="llama-3.2-1b", batch=batch, seq=seq, steps=len(m),
               first_loss=round(m[0]["loss"], 4), last_loss=round(m[-1]["loss"], 4), step_s=round(step_s, 4),
               tok_per_s=round(batch * seq / step_s), peak_gib=round(max(x.get("gpu_mem_gib", 0) for x in m), 2))
    print(json.dumps(res), flush=True)
    if not m[-1]["loss"] < m[0]["loss"] - 0.5:
        sys.exit("the loss did not fall on a repeated batch")

if __name__ == "__main__":
    main()
