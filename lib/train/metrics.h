#pragma once
// What the user sees: a progress line per logged step (a redrawn bar on a terminal, plain lines otherwise),
// metrics.jsonl in the output directory (one JSON object per logged step or evaluation), TensorBoard event files
// there, and a self-contained HTML file with the loss curves (inline SVG: no network, no plotting library).
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/json.h"

namespace qt {

struct StepMetrics {
  int64_t step = 0;  // 1-based optimizer step
  int64_t total_steps = 0;
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  double tokens_per_s = 0;  // input tokens (padding not counted), as peers report throughput
  double target_tokens_per_s = 0;
  double step_s = 0;
  int64_t tokens = 0;         // input tokens in this step (all ranks)
  int64_t target_tokens = 0;  // tokens in the loss in this step
  double gpu_mem_gib = -1;  // peak allocated this step; < 0 on CPU
  double gpu_reserved_gib = -1;  // peak the caching allocator held from the driver this step; < 0 on CPU
  double eta_s = 0;
  // The caching allocator's retries after giving its cache back, cudaMalloc and cudaFree calls since the process
  // started (gpu_allocator_counts); < 0 on CPU.
  int64_t gpu_alloc_retries = -1;
  int64_t gpu_device_allocs = -1;
  int64_t gpu_device_frees = -1;
  // More scalars of the step (DPO's rewards and log-probabilities), in metrics.jsonl and TensorBoard (train/NAME).
  std::vector<std::pair<std::string, double>> extra;
};

class TensorBoardWriter;

class MetricsLog {
 public:
  // `path` is metrics.jsonl: started anew where `resume_step` is 0, else continued by a run resumed after that many
  // steps, the lines of later steps (a run that went on past the checkpoint, then stopped) dropped first so that no
  // step is logged twice; `bar`: redraw one line on a terminal.
  MetricsLog(const std::string& path, bool bar, bool enabled, int64_t resume_step);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void step(const StepMetrics& m);
  // `count`: the held-out targets, or with `pairs` (DPO) the held-out preference pairs.
  // preference: "DPO" or "CPO" for a loss over pairs (count: the pairs), null for the targets' mean loss
  void eval(int64_t step, double loss, int64_t count, const char* preference = nullptr);
  // eval.exact_match_file's figure after `step` optimizer steps (0: before training), in metrics.jsonl.
  void exact_match(int64_t step, int64_t correct, int64_t total);
  void line(const std::string& text);  // a message that must not be overwritten by the bar
  // A record other than a step's or an evaluation's (the execution plan at start: {"plan": {...}}).
  void record(const Json& j) {
    if (enabled_) write(j);
  }

  const std::vector<std::pair<int64_t, double>>& train_losses() const { return train_; }
  const std::vector<std::pair<int64_t, double>>& eval_losses() const { return eval_; }
  // Rewrite the loss plot at `path` (loss.html) at each logged step and evaluation, so that a run that stops in
  // any way (a signal, an error, a kill) leaves the plot of its last logged step. write_plot() writes it now.
  void set_plot(const std::string& path, const std::string& title);
  // The scalars also as a TensorBoard event file in `dir` (lib/train/tensorboard_events.h): train/loss,
  // train/learning_rate, train/grad_norm, train/tokens_per_s, train/target_tokens_per_s, eval/loss,
  // eval/exact_match. A resumed run adds a new file; TensorBoard reads a directory's files as one run.
  // TensorBoard event files in `dir`; a run resumed after `resume_step` steps starts its file with a purge of the
  // later steps an earlier file holds.
  void set_tensorboard(const std::string& dir, int64_t resume_step = 0);
  void write_plot() const;
  // Reads an existing metrics.jsonl (resume) so that the plot shows the whole run.
  void load_history(const std::string& path, int64_t up_to_step);

 private:
  void write(const Json& j);
  FILE* file_ = nullptr;
  bool bar_;
  bool enabled_;
  std::string path_;  // metrics.jsonl
  bool bar_open_ = false;
  std::vector<std::pair<int64_t, double>> train_, eval_, lr_;
  std::string plot_path_, plot_title_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
};

// Writes an HTML page with the training (and evaluation) loss against the step, and the learning rate on its own
// axis at the right, as inline SVG with ticks on both axes; written to a temporary file and renamed into place.
void write_loss_plot(const std::string& path, const std::vector<std::pair<int64_t, double>>& train,
                     const std::vector<std::pair<int64_t, double>>& eval, const std::string& title,
                     const std::vector<std::pair<int64_t, double>>& lr = {});

std::string format_duration(double seconds);

}  // namespace qt
