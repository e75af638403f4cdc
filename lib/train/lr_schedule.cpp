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
  if (type == LrScheduleType::Wsd) {
    // transformers' _get_wsd_scheduler_lambda (warmup_type "linear", num_cycles 0.5), the stable steps what the
    // warmup and the decay leave of total_steps.
    const double m = min_lr_ratio;
    if (step < warmup_steps) {
      const double progress = static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_steps));
      return lr * std::max(0.0, progress * (1.0 - m) + m);
    }
    const int64_t stable = std::max<int64_t>(0, total_steps - warmup_steps - decay_steps);
    if (step < warmup_steps + stable) return lr;
    if (step < warmup_steps + stable + decay_steps) {
      const double progress = static_cast<double>(step - warmup_steps - stable) /
                              static_cast<double>(std::max<int64_t>(1, decay_steps));
      double factor = 0;
      switch (decay) {
        case WsdDecay::Cosine: factor = 0.5 * (1.0 + std::cos(M_PI * progress)); break;
        case WsdDecay::Linear: factor = 1.0 - progress; break;
        case WsdDecay::OneMinusSqrt: factor = 1.0 - std::sqrt(progress); break;
      }
      return lr * std::max(0.0, factor * (1.0 - m) + m);
    }
    return lr * m;
  }
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
  if (name == "wsd" || name == "warmup_stable_decay") return LrScheduleType::Wsd;
  fail_key(ErrorKind::Config, file, key, "'" + name + "': expected constant, linear, cosine or wsd");
}

WsdDecay parse_wsd_decay(const std::string& name, const std::string& file, const std::string& key) {
  if (name == "cosine") return WsdDecay::Cosine;
  if (name == "linear") return WsdDecay::Linear;
  if (name == "1-sqrt") return WsdDecay::OneMinusSqrt;
  fail_key(ErrorKind::Config, file, key, "'" + name + "': expected cosine, linear or 1-sqrt");
}

const char* wsd_decay_name(WsdDecay decay) {
  switch (decay) {
    case WsdDecay::Cosine: return "cosine";
    case WsdDecay::Linear: return "linear";
    case WsdDecay::OneMinusSqrt: return "1-sqrt";
  }
  return "?";
}

const char* lr_schedule_name(LrScheduleType type) {
  switch (type) {
    case LrScheduleType::Constant: return "constant";
    case LrScheduleType::Linear: return "linear";
    case LrScheduleType::Cosine: return "cosine";
    case LrScheduleType::Wsd: return "wsd";
  }
  return "?";
}

}  // namespace qt
