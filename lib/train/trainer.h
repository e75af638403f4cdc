#pragma once
// The training recipe: load, attach adapters, step, log, evaluate, checkpoint, export. Reads like a recipe; the
// modules it calls know nothing of the loop.
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "lib/train/run_config.h"

namespace qt {

struct TrainSummary {
  int64_t steps = 0;
  double first_loss = 0;
  double last_loss = 0;
  double eval_loss = -1;  // < 0: no evaluation data
  double exact_match_before = -1;  // < 0: no exact-match evaluation configured
  double exact_match_after = -1;
  double seconds = 0;
  double tokens_per_s = 0;         // input tokens (padding not counted) per second of the training loop
  double target_tokens_per_s = 0;  // tokens in the loss per second
  std::string adapter_dir;
  // checkpoint.save_best: output_dir/best_adapter (best_model), its step and held-out loss; "" where none
  std::string best_dir;
  int64_t best_step = -1;
  double best_eval_loss = -1;
  int64_t steps_overlapped = 0;  // steps read back while the next step was already queued (trainer.cpp: overlap)
  bool stopped_early = false;  // train.early_stopping_patience ended it before its last step (complete: exit 0)
  bool stopped = false;  // stopped by a signal before its last step (a checkpoint to resume from), not complete
};

enum TrainPhase : int { kBeforeSteps = 0, kInSteps = 1, kFinishing = 2 };

struct TrainOptions {
  std::string resume;  // "", "auto" or a checkpoint directory
  // An earlier run's files in output_dir that this one replaces (--overwrite-output-dir: prepare_output_dir), removed
  // by rank 0 once the data and the model have loaded, before the run writes anything there.
  std::vector<std::string> replace;
  bool allow_resume_changes = false;  // --resume-allow-changes: a changed schedule length or train file resumes
  // Set by a SIGTERM/SIGINT handler: the loop checkpoints after the current step and stops.
  const std::atomic<bool>* stop_requested = nullptr;
  // Where train() is, for a stop signal's handler: kBeforeSteps (nothing to checkpoint: the handler ends the process
  // at once; loading a large model takes minutes), kInSteps (the loop checkpoints after the current step and stops)
  // or kFinishing (after the last step: the final evaluation and saves complete the run, which ends as if unsignalled).
  std::atomic<int>* phase = nullptr;
};

TrainSummary train(const RunConfig& config, const TrainOptions& options);


}  // namespace qt
