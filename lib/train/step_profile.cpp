#include "lib/train/step_profile.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <vector>

#include "lib/core/files.h"

namespace qt {
namespace {
std::set<torch::profiler::impl::ActivityType> activities(bool cuda) {
  std::set<torch::profiler::impl::ActivityType> a{torch::profiler::impl::ActivityType::CPU};
  if (cuda) a.insert(torch::profiler::impl::ActivityType::CUDA);
  return a;
}
}  // namespace

StepProfile::StepProfile(bool cuda) {
  // Input shapes ride along (scripts/trace_summary.py groups GPU time by op and shape with them).
  torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO, /*report_input_shapes=*/true);
  torch::autograd::profiler::prepareProfiler(config, activities(cuda));
  torch::autograd::profiler::enableProfiler(config, activities(cuda));
  active_ = true;
}

StepProfile::~StepProfile() {
  if (active_) torch::autograd::profiler::disableProfiler();
}

std::string StepProfile::finish(const std::string& dir) {
  active_ = false;
  std::unique_ptr<torch::autograd::profiler::ProfilerResult> result = torch::autograd::profiler::disableProfiler();
  result->save(files::join(dir, "profile_trace.json"));
  struct Row { double us = 0; int64_t calls = 0; };
  std::map<std::string, Row> kernels;
  double total = 0;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    const double us = static_cast<double>(e.durationNs()) / 1e3;
    Row& r = kernels[e.name().substr(0, 90)];
    r.us += us;
    r.calls += 1;
    total += us;
  }
  std::vector<std::pair<std::string, Row>> rows(kernels.begin(), kernels.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.us > b.second.us; });
  std::string table = "GPU time by kernel (one step, " + std::to_string(static_cast<int64_t>(total / 1e3)) + " ms in kernels)\n";
  char line[256];
  for (size_t i = 0; i < rows.size() && i < 40; ++i) {
    std::snprintf(line, sizeof line, "%9.2f ms %5.1f%% %6lld  %s\n", rows[i].second.us / 1e3,
                  100.0 * rows[i].second.us / std::max(total, 1e-9), static_cast<long long>(rows[i].second.calls),
                  rows[i].first.c_str());
    table += line;
  }
  files::write_file_atomically(files::join(dir, "profile_kernels.txt"), table);  // (was unchecked: cut short on a full disk)
  return table;
}

}  // namespace qt
