#pragma once
// A per-kernel profile of one training step (QT_PROFILE_STEP=N): LibTorch's Kineto profiler around step N,
// a Chrome trace (open in chrome://tracing or Perfetto) and a table of GPU kernels by total time.
#include <memory>
#include <string>

namespace qt {

class StepProfile {
 public:
  explicit StepProfile(bool cuda);  // starts recording (CPU ops, and CUDA kernels when `cuda`)
  ~StepProfile();
  // Stops; writes `dir`/profile_trace.json and `dir`/profile_kernels.txt (kernels by total GPU time, with their
  // share of the step). Returns the table.
  std::string finish(const std::string& dir);

 private:
  bool active_ = false;
};

}  // namespace qt
