"""TRL's KTOTrainer (trl 1.16.0, `trl.KTOTrainer`; pinned in requirements.txt) as the oracle of KTO optimizer steps:
trl_kto_step() runs `steps` steps on the CPU in fp32 and returns the logged metrics, TRL's token ids of each record
and of its KL sequence, and saves the adapter (PEFT's save_pretrained). kto_independent() computes a step's loss and
metrics from plain forward passes (no TRL code) from the token ids, for a policy adapter and a reference adapter.

What it follows in trl/trainer/kto_trainer.py (1.16.0):
- Data (_prepare_dataset): unpaired records {"prompt", "completion", "label"} (strings), or preference records
  {"prompt", "chosen", "rejected"} unpaired first (unpair_preference_dataset: a batched map of 1,000 rows, each
  batch's chosen completions (label True) then its rejected ones (False)). The EOS text is appended to a completion
  that does not end with it; tokenizer(prompt) and tokenizer(prompt + completion) (BOS added); the completion starts
  where the two first differ (common_prefix_length), the prompt's ids are the common prefix. Records whose prompt
  alone fills max_length are dropped. KL completions: the completions rotated by one within each batch of
  per_device_train_batch_size rows in the data's order ([c_n, c_1, ..., c_{n-1}]): record i's KL sequence is its
  prompt before record i-1's completion (the batch's first takes its last's). loss_type "apo_zero_unpaired" has none.
- The collator truncates each sequence to its first max_length tokens (keep_start). Log-probs: the completion
  tokens' summed (no length normalisation), for the records and their KL sequences.
- The reference: for a PeftModel passed in with a trained adapter, a frozen copy of it named "ref" (as DPOTrainer's):
  the initial adapter. Reference and KL passes under no_grad; dropout disabled (disable_dropout, the default).
- Loss per micro-batch (per_device_train_batch_size rows): kl = max(0, mean over its KL sequences of policy -
  reference) (gathered over processes; one here), detached; r = policy - reference of each record;
  kto: desirable 1 - sigmoid(beta (r - kl)), undesirable 1 - sigmoid(beta (kl - r)); apo_zero_unpaired: desirable
  1 - sigmoid(beta r), undesirable sigmoid(beta r); times desirable_weight / undesirable_weight; the micro-batch's
  mean (the Trainer divides by gradient_accumulation_steps). Metrics per micro-batch, then their mean over the
  step's micro-batches: kl, rewards/chosen = beta r summed over the desirable records / their count (only where there
  is one), logps/chosen likewise of the policy's, the same for rejected, rewards/margins = chosen - rejected.
- Sampling "sequential" (KTOConfig's default): the records in their order, epoch after epoch.
- Optimizer: transformers' Trainer, adamw_torch, constant schedule, max_grad_norm 0 (no clipping)."""
import math
import os
import tempfile

import cpo_trl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _sig(x):
    return 1 / (1 + math.exp(-x))


def trl_kto_step(model_dir, adapter_dir, records, out_adapter_dir, *, beta=0.1, desirable_weight=1.0,
                 undesirable_weight=1.0, loss_type="kto", lr=1e-3, eps=1e-8, max_length=1024, seed=3, steps=1,
                 per_device=4, accumulation=2):
    """`steps` KTOTrainer steps of per_device x accumulation records each from the base model_dir + the PEFT adapter
    adapter_dir; the adapter after them saved to out_adapter_dir. Returns {"metrics": the last step's logged METRICS,
    "first_metrics": the first's, "records": [per record after unpairing: prompt_ids, completion_ids, label,
    kl_completion_ids (None for apo_zero_unpaired)]}."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer
    from dpo_trl import load_tokenizer
    torch.manual_seed(seed)
    tok = load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    args = KTOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_kto_"), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr, adam_epsilon=eps,
        adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, max_length=max_length, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", seed=seed, data_seed=seed,
        dataloader_num_workers=0, disable_dropout=True, remove_unused_columns=False, disable_tqdm=True, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss_type=loss_type)
    logged, grads = [], {}
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         callbacks=[cpo_trl.capture(model, logged, grads)])
    assert args.train_sampling_strategy == "sequential", args.train_sampling_strategy
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n and ".ref." not in n), (n, p.requires_grad)
    out = []
    for ex in trainer.train_dataset:
        out.append({"prompt_ids": list(ex["prompt_ids"]), "completion_ids": list(ex["completion_ids"]),
                    "label": bool(ex["label"]),
                    "kl_completion_ids": list(ex["KL_completion_ids"]) if "KL_completion_ids" in ex else None})
    trainer.train()
    steps_logged = [{k: float(l[k]) for k in METRICS if k in l} for l in logged if "kl" in l]
    assert len(steps_logged) == steps, (len(steps_logged), steps)
    model.save_pretrained(str(out_adapter_dir))
    return {"metrics": steps_logged[-1], "first_metrics": steps_logged[0], "records": out}


def _peft(model_dir, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def kto_independent(model_dir, policy_dir, reference_dir, records, groups, *, beta, desirable_weight=1.0,
                    undesirable_weight=1.0, loss_type="kto", max_length=1024, kl_over_all=False):
    """A step's loss and metrics from plain forward passes under the policy adapter policy_dir and the reference
    adapter reference_dir, over `records` (trl_kto_step's "records": their ids) split into `groups` (lists of
    indices: TRL's micro-batches, each with its own KL baseline), as TRL computes them: the loss the mean of the
    groups' means, each metric the mean of the groups' (where present). kl_over_all: one KL baseline over every
    record's KL sequence, the loss the mean over all records (our held-out evaluation's definition)."""
    import torch
    policy, reference = _peft(model_dir, policy_dir), _peft(model_dir, reference_dir)

    def logp(model, prompt, completion):
        ids = (prompt + completion)[:max_length]
        n = len(ids) - len(prompt)
        with torch.no_grad():
            return cpo_trl.completion_logps(model, prompt, ids[len(prompt):])[0] if n > 0 else 0.0

    kl_seq = loss_type == "kto"
    ratio, kl_diff, pol = [], [], []
    for r in records:
        p = logp(policy, r["prompt_ids"], r["completion_ids"])
        pol.append(p)
        ratio.append(p - logp(reference, r["prompt_ids"], r["completion_ids"]))
        kl_diff.append(logp(policy, r["prompt_ids"], r["kl_completion_ids"]) -
                       logp(reference, r["prompt_ids"], r["kl_completion_ids"]) if kl_seq else 0.0)
    if kl_over_all:
        groups = [list(range(len(records)))]
    per = {k: [] for k in METRICS}
    for g in groups:
        kl = max(0.0, sum(kl_diff[i] for i in g) / len(g)) if kl_seq else 0.0
        losses, ch, rj = [], [i for i in g if records[i]["label"]], [i for i in g if not records[i]["label"]]
        for i in g:
            x = ratio[i]
            if records[i]["label"]:
                losses.append(desirable_weight * (1 - _sig(beta * (x - kl))))
            else:
                losses.append(undesirable_weight * ((1 - _sig(beta * (kl - x))) if kl_seq else _sig(beta * x)))
        per["loss"].append(sum(losses) / len(losses))
        per["kl"].append(kl)
        if ch:
            per["rewards/chosen"].append(beta * sum(ratio[i] for i in ch) / len(ch))
            per["logps/chosen"].append(sum(pol[i] for i in ch) / len(ch))
        if rj:
            per["rewards/rejected"].append(beta * sum(ratio[i] for i in rj) / len(rj))
            per["logps/rejected"].append(sum(pol[i] for i in rj) / len(rj))
        if ch and rj:
            per["rewards/margins"].append(per["rewards/chosen"][-1] - per["rewards/rejected"][-1])
    return {k: sum(v) / len(v) for k, v in per.items() if v}
