#include "lib/train/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "lib/core/error.h"

namespace qt {

int64_t warmup_steps_of(int64_t warmup_steps, double warmup_ratio, int64_t total_steps) {
  if (warmup_steps > 0) return warmup_steps;
  return static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * warmup_ratio));
}

double LrSchedule::at(int64_t step) const {
  // As transformers: the warmup starts at 0 (step 0 makes no update), reaching lr at step == warmup_steps.
  if (warmup_steps > 0 && step < warmup_steps) return lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  if (type == LrScheduleType::Constant) return lr;
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  const double progress = std::clamp(static_cast<double>(step - warmup_steps) / span, 0.0, 1.0);
  const double floor = lr * min_lr_ratio;
  if (type == LrScheduleType::Linear) return floor + (lr - floor) * (1.0 - progress);
  return floor + (lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

LrScheduleType parse_lr_schedule(const std::string& name, const std::string& file, const std::string& key) {
  if (name == "constant") return LrScheduleType::Constant;
  if (name == "linear") return LrScheduleType::Linear;
  if (name == "cosine") return LrScheduleType::Cosine;
  fail_key(ErrorKind::Config, file, key, "'" + name + "': expected constant, linear or cosine");
}

const char* lr_schedule_name(LrScheduleType type) {
  switch (type) {
    case LrScheduleType::Constant: return "constant";
    case LrScheduleType::Linear: return "linear";
    case LrScheduleType::Cosine: return "cosine";
  }
  return "?";
}

}  // namespace qt
