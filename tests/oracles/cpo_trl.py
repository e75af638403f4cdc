"""TRL's CPOTrainer and ORPOTrainer (trl 1.16.0, trl.experimental.cpo and .orpo; pinned in requirements.txt) as the
oracles of CPO / SimPO / AlphaPO and ORPO optimizer steps: trl_cpo_step() (trl_orpo_step() likewise, below) runs
`steps` steps on the CPU in fp32 over ALL the pairs in one batch and
returns the logged metrics, the gradients of the last step, TRL's token ids of each pair and the first step's loss and
metrics computed here from a plain forward pass (no TRL code), and saves the adapter (PEFT's save_pretrained).

What it follows in trl/experimental/cpo/cpo_trainer.py (1.16.0):
- Data (tokenize_row): standard records {"prompt", "chosen", "rejected"} (strings). The prompt is tokenized without
  special tokens; each completion as tokenizer(prompt + completion) without special tokens, its prompt part the
  prompt's own tokens, one fewer where the last one merged with the completion (build_tokenized_answer): each
  completion has ITS OWN split point (DPOTrainer's one split point a pair, which our trainer follows, is the same
  wherever the prompt's tokens are a prefix of both or neither). BOS is put before, the EOS id after each
  completion. A sequence longer than max_length loses completion tokens at its end. Labels: the completion's
  tokens, -100 over the prompt.
- Log-probs (get_batch_logps): the completion tokens' log-probabilities summed, or their mean for loss_type "ipo"
  and "simpo" (average_log_prob).
- Loss (cpo_loss): z = chosen - rejected (with alpha != 0, AlphaPO: each log-prob p first (1 - exp(-alpha p)) /
  alpha); sigmoid -(1-ls) logsigmoid(beta z) - ls logsigmoid(-beta z); simpo the same at z - simpo_gamma / beta;
  hinge relu(1 - beta z); ipo (z - 1/(2 beta))^2. Loss = mean over the pairs + cpo_alpha x the chosen sequences' NLL
  (nn.CrossEntropyLoss over the chosen labels of the batch: their tokens' mean). loss_type "alphapo" is simpo with
  cpo_alpha 0 (CPOConfig.__post_init__).
- Metrics: rewards/chosen = beta x the chosen log-prob (after AlphaPO's shape), rewards/rejected likewise,
  rewards/margins their difference, rewards/accuracies chosen > rejected (strict), logps/chosen and logps/rejected
  the log-probs as the loss reads them (means for ipo / simpo), nll_loss.
- disable_dropout (default True); transformers' Trainer with adamw_torch, constant schedule, max_grad_norm 0."""
import math
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss")


def completion_logps(model, prompt_ids, completion_ids):
    """(sum of log p(token) over the completion tokens of prompt + completion, their count): one sequence."""
    import torch
    ids = prompt_ids + completion_ids
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    mask = torch.tensor([0] * (len(prompt_ids) - 1) + [1] * len(completion_ids), dtype=lp.dtype)
    return float((lp * mask).sum()), len(completion_ids)


def sequence_nll(model, ids):
    """(sum of -log p(token) over every token of `ids` after the first, their count): ORPO's NLL of a sequence."""
    import torch
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    return float(-lp.sum()), len(ids) - 1


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def capture(model, logged, grads):
    """A transformers TrainerCallback that appends each logged dict to `logged` and keeps each trainable parameter's
    gradient before the optimizer step in `grads` (the last step's)."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(dict(logs or {}))

        def on_pre_optimizer_step(self, args, state, control, **kw):
            for n, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    grads[n] = p.grad.detach().clone()
    return Capture()


class _Run:
    """One TRL trainer (trainer_cls, config_cls from trl.experimental) over all `pairs` in one batch a step, from
    model_dir + the PEFT adapter adapter_dir, in fp32 on the CPU, its logged values and last gradients captured."""

    def __init__(self, trainer_cls, config_cls, model_dir, adapter_dir, pairs, *, lr, eps, max_length, seed, steps,
                 **loss_args):
        import torch
        from datasets import Dataset
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        if tok.pad_token is None:  # padding is masked out of everything
            tok.pad_token = tok.unk_token or tok.eos_token
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model = model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        self.args = config_cls(
            output_dir=tempfile.mkdtemp(prefix="trl_pref_"), per_device_train_batch_size=len(pairs),
            gradient_accumulation_steps=1, max_steps=steps, learning_rate=lr, adam_epsilon=eps, adam_beta1=0.9,
            adam_beta2=0.999, weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=0.0, max_length=max_length, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", seed=seed,
            data_seed=seed, dataloader_num_workers=0, disable_dropout=True, remove_unused_columns=False,
            disable_tqdm=True, **loss_args)
        self.logged, self.grads, self.steps = [], {}, steps
        self.trainer = trainer_cls(model=model, args=self.args, train_dataset=Dataset.from_list(pairs),
                                   processing_class=tok, callbacks=[capture(model, self.logged, self.grads)])
        for n, p in model.named_parameters():
            assert p.requires_grad == ("lora_" in n), (n, p.requires_grad)

    def pair_ids(self):
        """Each pair's (prompt ids, completion ids) of chosen and rejected, as TRL's tokenize_row gives them."""
        out = []
        for ex in self.trainer.train_dataset:
            seqs = {}
            for which in ("chosen", "rejected"):
                ids, labels = list(ex[f"{which}_input_ids"]), list(ex[f"{which}_labels"])
                k = next(i for i, l in enumerate(labels) if l != -100)
                assert all(l == -100 for l in labels[:k]) and labels[k:] == ids[k:], (which, labels, ids)
                seqs[which] = (ids[:k], ids[k:])
            out.append(seqs)
        return out

    def train(self, out_adapter_dir, per_pair, independent):
        self.trainer.train()
        steps_logged = [{k: float(l[k]) for k in METRICS} for l in self.logged if "rewards/chosen" in l]
        assert len(steps_logged) == self.steps, (len(steps_logged), self.steps)
        self.model.save_pretrained(str(out_adapter_dir))
        return {"metrics": steps_logged[-1], "first_metrics": steps_logged[0], "pairs": per_pair,
                "grads": {k.replace(".default.", "."): v for k, v in self.grads.items()}, "independent": independent}


def trl_cpo_step(model_dir, adapter_dir, pairs, out_adapter_dir, *, beta=0.1, label_smoothing=0.0, lr=1e-3, eps=1e-8,
                 max_length=1024, seed=3, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0, steps=1):
    """`steps` CPOTrainer steps (all pairs in one batch each) from the base model_dir + the PEFT adapter adapter_dir;
    the adapter after them saved to out_adapter_dir. Returns {"metrics": the last step's logged METRICS, "first_metrics":
    the first's, "grads": {PEFT key: the last step's gradient}, "pairs": [per pair: prompt_ids, chosen_ids,
    rejected_ids as TRL's tokenization gives them (each completion after its own prompt part: "chosen_prompt_ids",
    "rejected_prompt_ids")], "independent": the first step's loss and metrics from a plain forward pass}."""
    import torch
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    run = _Run(CPOTrainer, CPOConfig, model_dir, adapter_dir, pairs, lr=lr, eps=eps, max_length=max_length, seed=seed,
               steps=steps, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, cpo_alpha=cpo_alpha,
               simpo_gamma=simpo_gamma, alpha=alpha)
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    assert run.args.loss_type == loss_type and run.args.cpo_alpha == cpo_alpha, (run.args.loss_type, run.args.cpo_alpha)

    # TRL's token ids of each pair, and the first step's loss and metrics from a plain forward pass on them.
    per_pair = []
    with torch.no_grad():
        for seqs in run.pair_ids():
            logp = {w: completion_logps(run.model, *seqs[w]) for w in seqs}
            per_pair.append({"chosen_prompt_ids": seqs["chosen"][0], "chosen_ids": seqs["chosen"][1],
                             "rejected_prompt_ids": seqs["rejected"][0], "rejected_ids": seqs["rejected"][1],
                             "chosen_sum": logp["chosen"][0], "chosen_n": logp["chosen"][1],
                             "rejected_sum": logp["rejected"][0], "rejected_n": logp["rejected"][1]})
    average = loss_type in ("ipo", "simpo")
    n = len(per_pair)
    lc = [q["chosen_sum"] / q["chosen_n"] if average else q["chosen_sum"] for q in per_pair]
    lr_ = [q["rejected_sum"] / q["rejected_n"] if average else q["rejected_sum"] for q in per_pair]
    logps_c, logps_r = list(lc), list(lr_)
    if alpha != 0:
        lc = [(1 - math.exp(-alpha * v)) / alpha for v in lc]
        lr_ = [(1 - math.exp(-alpha * v)) / alpha for v in lr_]
    ls = label_smoothing

    def per_loss(c, r):
        z = c - r
        if loss_type in ("sigmoid", "simpo"):
            if loss_type == "simpo":
                z -= simpo_gamma / beta
            return -(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z)
        if loss_type == "hinge":
            return max(0.0, 1 - beta * z)
        if loss_type == "ipo":
            return (z - 1 / (2 * beta)) ** 2
        raise ValueError(loss_type)
    nll = -sum(q["chosen_sum"] for q in per_pair) / sum(q["chosen_n"] for q in per_pair)
    independent = {
        "loss": sum(per_loss(c, r) for c, r in zip(lc, lr_)) / n + cpo_alpha * nll,
        "rewards/chosen": beta * sum(lc) / n, "rewards/rejected": beta * sum(lr_) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(lc, lr_)) / n,
        "rewards/margins": beta * sum(c - r for c, r in zip(lc, lr_)) / n,
        "logps/chosen": sum(logps_c) / n, "logps/rejected": sum(logps_r) / n,
        "nll_loss": nll if cpo_alpha != 0 else 0.0}
    return run.train(out_adapter_dir, per_pair, independent)


def trl_orpo_step(model_dir, adapter_dir, pairs, out_adapter_dir, *, beta=0.1, lr=1e-3, eps=1e-8, max_length=1024,
                  seed=3, steps=1):
    """ORPOTrainer (trl 1.16.0, trl.experimental.orpo) as trl_cpo_step runs CPOTrainer. What it follows in
    orpo_trainer.py: the data as CPOTrainer's (tokenize_row); the log-probs the completion tokens' mean
    (average_log_prob=True); log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr)); the NLL the cross-entropy of the
    chosen sequences over ALL their tokens after the first (labels = the input ids where the attention mask is 1: the
    prompt's tokens included), the batch's token mean; loss = NLL - mean(beta logsigmoid(log_odds)); rewards beta x
    the mean log-probs. Returns the same dict as trl_cpo_step."""
    import torch
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    run = _Run(ORPOTrainer, ORPOConfig, model_dir, adapter_dir, pairs, lr=lr, eps=eps, max_length=max_length, seed=seed,
               steps=steps, beta=beta)
    per_pair = []
    with torch.no_grad():
        for seqs in run.pair_ids():
            logp = {w: completion_logps(run.model, *seqs[w]) for w in seqs}
            nll = sequence_nll(run.model, seqs["chosen"][0] + seqs["chosen"][1])
            per_pair.append({"chosen_prompt_ids": seqs["chosen"][0], "chosen_ids": seqs["chosen"][1],
                             "rejected_prompt_ids": seqs["rejected"][0], "rejected_ids": seqs["rejected"][1],
                             "lc": logp["chosen"][0] / logp["chosen"][1],
                             "lr": logp["rejected"][0] / logp["rejected"][1], "nll_sum": nll[0], "nll_n": nll[1]})

    def log1mexp(x):
        return math.log1p(-math.exp(x))
    n = len(per_pair)
    nll = sum(q["nll_sum"] for q in per_pair) / sum(q["nll_n"] for q in per_pair)
    odds = [(q["lc"] - q["lr"]) - (log1mexp(q["lc"]) - log1mexp(q["lr"])) for q in per_pair]
    independent = {
        "loss": nll - beta * sum(logsig(o) for o in odds) / n,
        "rewards/chosen": beta * sum(q["lc"] for q in per_pair) / n,
        "rewards/rejected": beta * sum(q["lr"] for q in per_pair) / n,
        "rewards/accuracies": sum(q["lc"] > q["lr"] for q in per_pair) / n,
        "rewards/margins": beta * sum(q["lc"] - q["lr"] for q in per_pair) / n,
        "logps/chosen": sum(q["lc"] for q in per_pair) / n, "logps/rejected": sum(q["lr"] for q in per_pair) / n,
        "nll_loss": nll}
    return run.train(out_adapter_dir, per_pair, independent)
