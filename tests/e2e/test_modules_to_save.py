"""lora.modules_to_save on a tiny NF4 model (CPU), untied and tied: training moves lm_head and the embeddings
(fp32 copies beside the adapters; a tied model's one tensor in both roles), the adapter holds them where PEFT puts
them, PEFT loads it (PeftModel.from_pretrained on the dequantized NF4 base) and gives the loss that
`qlora-train eval --adapter` gives, a resume is bit-identical to the straight run, and lora.init_from takes the
trained modules along."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
from safetensors.torch import load_file
import tiny_lm
from test_peft_roundtrip import dequantized_model, peft_loss

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_mts_"))
EMBED, HEAD = "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_ok(*args):
    p = run(*args)
    if p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(map(str, args))} exited {p.returncode}: {p.stderr[-3000:]}")
    return p


def write_config(root, name, lora=None, lr=1e-2, optim=None, **train):
    cfg = {"output_dir": str(root / name), "model": {"path": str(root / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "embed_tokens"],
                    **(lora or {})},
           "data": {"train_file": str(root / "train.jsonl"), "format": "text", "max_seq_len": 32, "packing": True},
           "train": {"steps": 4, "batch_size": 4, "seed": 3, "log_every": 1, **train},
           "optim": {"lr": lr, "warmup_steps": 0, "schedule": "constant", **(optim or {})},
           "checkpoint": {"every": 2, "keep_last": 3}, "logging": {"progress": "lines"}}
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def losses(root, name):
    out = {}
    for j in map(json.loads, (root / name / "metrics.jsonl").read_text().splitlines()):
        if "loss" in j and "step" in j and "eval_loss" not in j:
            out[j["step"]] = j["loss"]
    return out


def one_model(tied: bool):
    root = TMP / ("tied" if tied else "untied")
    what = "tied" if tied else "untied"
    base, sp = tiny_lm.make_model_dir(root / "model", seed=11, tie_word_embeddings=tied)
    tiny_lm.write_text_jsonl(root / "train.jsonl", 48, 21)
    eval_data = root / "eval.jsonl"
    tiny_lm.write_text_jsonl(eval_data, 10, 22)
    base_embed = base.model.embed_tokens.weight.detach().clone()
    base_head = base.lm_head.weight.detach().clone()

    p = run_ok("--config", write_config(root, "a"))
    check("with lm_head and embed_tokens in full" in p.stderr, f"{what}: the run says what it trains")
    adapter = root / "a" / "adapter"
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    check(EMBED in sd and HEAD in sd and cfg["modules_to_save"] == ["lm_head", "embed_tokens"],
          f"{what}: the adapter holds both modules under PEFT's keys")
    check(cfg.get("ensure_weight_tying", False) == tied, f"{what}: ensure_weight_tying is {tied}")
    check(sd[EMBED].dtype == torch.float32 and sd[HEAD].dtype == torch.float32, f"{what}: saved in fp32")
    check(not torch.equal(sd[EMBED], base_embed) and not torch.equal(sd[HEAD], base_head),
          f"{what}: training moved lm_head and the embeddings")
    if tied:
        check(torch.equal(sd[EMBED], sd[HEAD]), "tied: one tensor, saved under both keys")
    else:
        # An embedding row moves only when its token is in a batch; lm_head rows all move (every softmax sees them).
        moved = (sd[EMBED] != base_embed).any(dim=1)
        check(0 < int(moved.sum()) < sd[EMBED].shape[0], f"untied: {int(moved.sum())} embedding rows moved (tokens seen)")
        check(bool((sd[HEAD] != base_head).any(dim=1).all()), "untied: every lm_head row moved")

    # optim.embedding_lr, the modules' own learning rate: 0 keeps them at the base weights while LoRA trains; the
    # run's lr gives the default run byte for byte; without modules_to_save the key is refused.
    p = run_ok("--config", write_config(root, "e0", optim={"embedding_lr": 0.0}))
    e0 = load_file(str(root / "e0" / "adapter" / "adapter_model.safetensors"))
    check("lr 0)" in p.stderr and torch.equal(e0[EMBED], base_embed) and torch.equal(e0[HEAD], base_head)
          and any(not torch.equal(e0[k], sd[k]) for k in e0 if "lora_B" in k)
          and all(bool(e0[k].abs().sum() > 0) for k in e0 if "lora_B" in k),  # (PEFT's B starts at zero)
          f"{what}: embedding_lr 0 leaves lm_head and the embeddings at the base weights while LoRA trains")
    run_ok("--config", write_config(root, "e1", optim={"embedding_lr": 1e-2}))
    check((root / "e1" / "adapter" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes(),
          f"{what}: embedding_lr equal to lr gives the default run's adapter byte for byte")
    p = run("--config", write_config(root, "e2", lora={"modules_to_save": []}, optim={"embedding_lr": 1e-3}))
    check(p.returncode == 3 and "optim.embedding_lr" in p.stderr and "modules_to_save" in p.stderr,
          f"{what}: embedding_lr without modules_to_save is refused, naming both keys (exit {p.returncode})")

    # PEFT loads the adapter with modules_to_save and gives our eval loss on the same NF4 base.
    run_ok("quantize", "--model", root / "model", "--out", root / "model_nf4")
    ref, count = peft_loss(dequantized_model(root / "model", root / "model_nf4"), adapter, sp, eval_data)
    ours = json.loads(run_ok("eval", "--model", root / "model", "--adapter", adapter, "--data", eval_data).stdout.splitlines()[-1])
    plain = json.loads(run_ok("eval", "--model", root / "model", "--data", eval_data).stdout.splitlines()[-1])
    rel = abs(ours["loss"] - ref) / ref
    check(rel < 1e-5 and ours["tokens"] == count,
          f"{what}: PEFT's loss with our adapter {ref:.6f} = eval --adapter {ours['loss']:.6f} (rel {rel:.1e}; base {plain['loss']:.6f})")
    # The modules matter to that loss: without them (LoRA alone) PEFT gives another.
    lora_only = root / "lora_only"
    lora_only.mkdir()
    from safetensors.torch import save_file
    save_file({k: v for k, v in sd.items() if "lora_" in k}, str(lora_only / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg2 = dict(cfg, modules_to_save=None)
    cfg2.pop("ensure_weight_tying", None)
    (lora_only / "adapter_config.json").write_text(json.dumps(cfg2))
    alone = json.loads(run_ok("eval", "--model", root / "model", "--adapter", lora_only, "--data", eval_data).stdout.splitlines()[-1])
    check(abs(alone["loss"] - ours["loss"]) > 1e-4, f"{what}: the trained modules change the loss ({alone['loss']:.6f} without)")

    # Resume: 2 steps, then on to 4 from checkpoint-2 = the straight run, bit for bit (fp32 copies and moments).
    cfg_b = write_config(root, "b", steps=2)
    run_ok("--config", cfg_b)
    write_config(root, "b", steps=4)
    p = run_ok("--config", cfg_b, "--resume", "auto")
    check("checkpoint-2" in p.stderr, f"{what}: resumed from checkpoint-2")
    la, lb = losses(root, "a"), losses(root, "b")
    check(all(la[s] == lb[s] for s in (1, 2, 3, 4)), f"{what}: resumed losses equal the straight run's ({lb} vs {la})")
    check((root / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes(),
          f"{what}: the resumed run's adapter equals the straight run's byte for byte")
    opt = load_file(str(root / "a" / "checkpoint-4" / "optimizer.safetensors"))
    check(any(k.startswith(EMBED) for k in opt), f"{what}: the checkpoint holds the modules' AdamW moments")

    # lora.init_from takes the modules along: at lr 1e-30 the adapter comes back unchanged.
    run_ok("--config", write_config(root, "c", lora={"init_from": str(adapter)}, lr=1e-30, steps=1))
    check((root / "c" / "adapter" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes(),
          f"{what}: init_from starts exactly at the adapter, modules included (lr 1e-30 writes it back unchanged)")
    p = run("--config", write_config(root, "d", lora={"init_from": str(adapter), "modules_to_save": ["lm_head"]}, steps=1))
    if tied:  # lm_head, embed_tokens or both name the one tensor (PEFT itself rewrites the list)
        check(p.returncode == 0, f"tied: init_from accepts another name for the one tensor (exit {p.returncode})")
    else:
        check(p.returncode == 3 and "lora.modules_to_save: config [lm_head], adapter [embed_tokens, lm_head]" in p.stderr,
              f"untied: init_from names a modules_to_save difference (exit {p.returncode})")


def main():
    one_model(tied=False)
    one_model(tied=True)
    finish("modules_to_save checks")


if __name__ == "__main__":
    main()
