"""TRL's DPOTrainer (trl 1.16.0, pinned in requirements.txt) as the oracle of one DPO optimizer step: trl_dpo_step()
runs exactly one step on the CPU in fp32 over ALL the pairs in one batch and returns the step's logged metrics, the
gradients and the per-pair log-probs, and saves the adapter after the step (PEFT's save_pretrained).

What it follows in trl/trainer/dpo_trainer.py (1.16.0), i.e. what a trainer must do to agree with it:
- Data (`_prepare_dataset`): standard records {"prompt", "chosen", "rejected"} (strings): the EOS *text*
  (tokenizer.eos_token, "</s>") is appended to chosen and rejected unless they already end with it; then
  tokenizer(prompt), tokenizer(prompt + chosen), tokenizer(prompt + rejected) are tokenized as whole strings (the
  strings concatenated as they are: no separator; BOS added by the tokenizer, add_special_tokens default; "</s>"
  parsed as the EOS id). prompt_len = min(common_prefix(prompt, prompt+chosen), common_prefix(prompt,
  prompt+rejected)) -- ONE length for both, so a prompt whose last token merges with one completion moves that token
  into BOTH completions -- and chosen_ids / rejected_ids are the rest of each sequence (their EOS included).
  Conversational records (prompt a list of messages, chosen / rejected one assistant message each) go through
  apply_chat_template (prompt with add_generation_prompt=True) and get no EOS text appended.
- Records whose prompt_ids alone are >= max_length are dropped (filter, keep_start). The collator
  (DataCollatorForPreference) truncates each sequence prompt+completion to its first max_length tokens (keep_start,
  per sequence: chosen and rejected independently), pads on the right; the batch is [all chosen; all rejected].
- Log-probs: labels = input_ids with the non-completion positions at -100, shifted by one (the fused LM head: the
  log-prob of token t+1 given the prefix up to t), summed over the completion tokens (no length normalisation):
  logps/chosen = mean over pairs of the policy's sum, likewise logps/rejected.
- The reference, with ref_model=None and a PEFT model: `use_adapter(model, "ref" if "ref" in peft_config else None)`:
  adapters disabled (the base) when there is no "ref" adapter. CAUTION: for a PeftModel passed in with a trained
  adapter (PeftModel.from_pretrained) and peft >= 0.20 (we pin 0.21.2), DPOTrainer.__init__ ADDS a frozen copy of the
  adapter named "ref" -- TRL's own reference is then the INITIAL ADAPTER (base + init adapter), not the base, and the
  first step's loss is exactly log 2. reference="adapter" keeps TRL's behaviour (what our trainer does with
  lora.init_from); reference="base" deletes that "ref" adapter after the trainer is built, so that the reference is
  the base with the adapter disabled (as TRL does for a fresh adapter made from peft_config).
  The reference forward runs under no_grad, in the policy's mode (train), with dropout disabled in the whole model
  (DPOConfig.disable_dropout defaults to True: every nn.Dropout's p set to 0, lora_dropout included).
- Loss (loss_type ["sigmoid"], f_divergence_type reverse_kl): delta = (pc - rc) - (pr - rr) (policy / reference,
  chosen / rejected log-prob sums); per pair -logsigmoid(beta*delta); loss = mean over the pairs of the micro-batch
  (the Trainer divides by gradient_accumulation_steps on top). TRL 1.16's "sigmoid" IGNORES label_smoothing
  (DPOConfig: "used in Robust DPO and EXO"); "robust" is (-(1-ls)*logsigmoid(beta*delta) +
  ls*logsigmoid(-beta*delta)) / (1-2ls), "hinge" relu(1 - beta*delta), "ipo" (delta' - 1/(2 beta))^2 with each
  log-ratio of delta' divided by its completion's token count.
- Metrics (means over the pairs): rewards/chosen = beta*(pc - rc), rewards/rejected = beta*(pr - rr),
  rewards/margins = their difference, rewards/accuracies = mean of (rewards/chosen > rewards/rejected) -- strict, so
  a tie (a fresh adapter) counts 0 --, logps/chosen = pc, logps/rejected = pr (the policy's, before the step).
- Optimizer: transformers' Trainer with optim "adamw_torch" (torch.optim.AdamW, betas (0.9, 0.999), weight_decay 0
  here), lr_scheduler "constant", max_grad_norm 0 (transformers clips only when max_grad_norm > 0)."""
import json
import math
import os
import pathlib
import tempfile

import cpo_trl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:  # padding is masked out of everything; TRL itself would take the EOS
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def tokenize_pair(tok, pair, max_length=None):
    """TRL's tokenization of one standard-format pair (see the module docstring), computed here without TRL:
    (prompt_ids, chosen_ids, rejected_ids) before truncation, or None when TRL drops the pair."""
    eos = tok.eos_token
    chosen = pair["chosen"] if pair["chosen"].endswith(eos) else pair["chosen"] + eos
    rejected = pair["rejected"] if pair["rejected"].endswith(eos) else pair["rejected"] + eos
    p = tok(pair["prompt"])["input_ids"]
    pc = tok(pair["prompt"] + chosen)["input_ids"]
    pr = tok(pair["prompt"] + rejected)["input_ids"]

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    k = min(common(p, pc), common(p, pr))
    if max_length is not None and k >= max_length:
        return None
    return p[:k], pc[k:], pr[k:]


def sequence_logps(model, prompt_ids, completion_ids, max_length=None):
    """Sum of log p(token) over the completion tokens of prompt+completion (truncated keep_start), one sequence."""
    import torch
    ids = (prompt_ids + completion_ids)
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    return float((lp * torch.tensor(mask[1:], dtype=lp.dtype)).sum())


def trl_dpo_step(model_dir, adapter_dir, pairs, out_adapter_dir, *, beta=0.1, label_smoothing=0.0, lr=1e-3,
                 eps=1e-8, max_length=None, reference="base", seed=3, chat_template=None, loss_type="sigmoid",
                 steps=1, loss_weights=None, discopop_tau=0.05):
    """`steps` DPOTrainer steps (all pairs in one batch, each step) from the base model_dir + the PEFT adapter
    adapter_dir; the adapter after them is saved to out_adapter_dir. Returns {"metrics": the last step's logged
    values (METRICS, TRL's names), "first_metrics": the first's, "grads": {PEFT key (as saved): the last step's
    gradient}, "pairs": [per pair: prompt_ids, chosen_ids, rejected_ids and the policy / reference log-prob sums at
    the start, computed here without TRL], "independent": the first step's loss and metrics from those sums, "kept":
    how many pairs TRL kept}."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    if reference not in ("base", "adapter"):
        raise ValueError(f"reference: 'base' or 'adapter', not {reference!r}")
    torch.manual_seed(seed)
    tok = load_tokenizer(model_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    conversational = isinstance(pairs[0]["prompt"], list)
    if conversational and not tok.chat_template:
        raise ValueError("conversational pairs need a tokenizer with a chat template (chat_template=...)")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)

    types = list(loss_type) if isinstance(loss_type, (list, tuple)) else [loss_type]
    work = pathlib.Path(tempfile.mkdtemp(prefix="trl_dpo_"))
    args = DPOConfig(
        output_dir=str(work), per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=lr, adam_epsilon=eps, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        beta=beta, label_smoothing=label_smoothing, loss_type=types, loss_weights=loss_weights,
        discopop_tau=discopop_tau, max_length=max_length,
        truncation_mode="keep_start", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to=[], logging_steps=1, save_strategy="no", seed=seed, data_seed=seed, dataloader_num_workers=0,
        precompute_ref_log_probs=False, disable_dropout=True, pad_to_multiple_of=None, dataset_num_proc=None,
        remove_unused_columns=False, disable_tqdm=True)

    logged, grads = [], {}
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tok, callbacks=[cpo_trl.capture(model, logged, grads)])
    if reference == "base" and "ref" in model.peft_config:
        model.delete_adapter("ref")  # TRL's reference is then use_adapter(model, None): the adapter disabled
    model.set_adapter("default")
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n and ".default." in n), (n, p.requires_grad)
    kept = len(trainer.train_dataset)
    if kept != len(pairs):  # a dropped pair changes the batch: the caller's comparison would be off
        raise ValueError(f"TRL dropped {len(pairs) - kept} of {len(pairs)} pairs (prompt >= max_length {max_length})")

    # The per-pair log-prob sums, computed here with the plain forward (no TRL code) on TRL's own token ids, which
    # are checked against tokenize_pair's (standard format only).
    per_pair = []
    with torch.no_grad():
        for i, ex in enumerate(trainer.train_dataset):
            ids = (list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"]))
            if not conversational:
                mine = tokenize_pair(tok, pairs[i], max_length)
                assert mine == ids, (i, mine, ids)
            pc = sequence_logps(model, ids[0], ids[1], max_length)
            pr = sequence_logps(model, ids[0], ids[2], max_length)
            if reference == "base":
                with model.disable_adapter():
                    rc = sequence_logps(model, ids[0], ids[1], max_length)
                    rr = sequence_logps(model, ids[0], ids[2], max_length)
            else:
                model.set_adapter("ref")
                rc = sequence_logps(model, ids[0], ids[1], max_length)
                rr = sequence_logps(model, ids[0], ids[2], max_length)
                model.set_adapter("default")
            per_pair.append({"prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[2],
                             "policy_chosen": pc, "policy_rejected": pr, "ref_chosen": rc, "ref_rejected": rr})
    # set_adapter can flip requires_grad; restore the trainable set (default's LoRA only)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n and ".default." in n)

    def logsig(x):
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
    rc_ = [beta * (q["policy_chosen"] - q["ref_chosen"]) for q in per_pair]
    rr_ = [beta * (q["policy_rejected"] - q["ref_rejected"]) for q in per_pair]
    n = len(per_pair)
    ls = label_smoothing

    def completion_tokens(q, which):  # after keep_start truncation
        p, c = len(q["prompt_ids"]), len(q[which])
        return max(1, (min(p + c, max_length) if max_length is not None else p + c) - p)

    def sig(x):
        return math.exp(logsig(x))
    # "sft": the chosen completions' mean NLL over the batch's tokens, the same for every pair
    sft = -sum(q["policy_chosen"] for q in per_pair) / sum(completion_tokens(q, "chosen_ids") for q in per_pair)

    def per_type(t, q, c, r):  # c, r: beta x the chosen / rejected log-ratios
        d = c - r
        if t == "sigmoid":  # (label_smoothing unused by TRL's sigmoid)
            return -logsig(d)
        if t == "robust":
            return (-(1 - ls) * logsig(d) + ls * logsig(-d)) / (1 - 2 * ls)
        if t == "hinge":
            return max(0.0, 1 - d)
        if t in ("ipo", "sigmoid_norm"):  # each log-ratio over its completion's tokens
            d = (c / completion_tokens(q, "chosen_ids") - r / completion_tokens(q, "rejected_ids"))
            return (d / beta - 1 / (2 * beta)) ** 2 if t == "ipo" else -logsig(d)
        if t == "exo_pair":
            return sig(d) * (logsig(d) - math.log1p(-ls)) + sig(-d) * (logsig(-d) - math.log(ls))
        if t == "nca_pair":
            return -logsig(c) - 0.5 * logsig(-c) - 0.5 * logsig(-r)
        if t == "bco_pair":
            return -logsig(c) - logsig(-r)
        if t == "sppo_hard":
            return (c / beta - 0.5 / beta) ** 2 + (r / beta + 0.5 / beta) ** 2
        if t == "apo_zero":
            return (1 - sig(c)) + sig(r)
        if t == "apo_down":
            return sig(c) + (1 - sig(d))
        if t == "discopop":
            mix = sig(d / discopop_tau)
            return -logsig(d) * (1 - mix) + math.exp(-d) * mix
        if t == "sft":
            return sft
        raise ValueError(t)

    def per_loss(q, c, r):
        return sum(w * per_type(t, q, c, r) for t, w in zip(types, loss_weights or [1.0] * len(types)))
    independent = {
        "loss": sum(per_loss(q, c, r) for q, c, r in zip(per_pair, rc_, rr_)) / n,
        "rewards/chosen": sum(rc_) / n, "rewards/rejected": sum(rr_) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(rc_, rr_)) / n,
        "rewards/margins": sum(c - r for c, r in zip(rc_, rr_)) / n,
        "logps/chosen": sum(q["policy_chosen"] for q in per_pair) / n,
        "logps/rejected": sum(q["policy_rejected"] for q in per_pair) / n}

    trainer.train()
    steps_logged = [{k: float(l[k]) for k in METRICS} for l in logged if "rewards/chosen" in l]
    assert len(steps_logged) == steps, (len(steps_logged), steps)
    metrics = steps_logged[-1]
    model.save_pretrained(str(out_adapter_dir), selected_adapters=["default"])
    # PEFT's saved keys: ".default" dropped
    saved_grads = {k.replace(".default.", "."): v for k, v in grads.items()}
    return {"metrics": metrics, "first_metrics": steps_logged[0], "grads": saved_grads, "pairs": per_pair,
            "independent": independent, "kept": kept}
