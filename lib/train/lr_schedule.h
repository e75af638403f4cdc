#pragma once
// Learning rate per optimizer step: linear warmup from 0, then constant, linear decay or cosine decay to
// min_lr_ratio * lr at total_steps; with min_lr_ratio 0, exactly transformers' get_*_schedule_with_warmup.
// Wsd (warmup, stable, decay): transformers' get_wsd_schedule with num_training_steps: a linear warmup from
// min_lr_ratio * lr, lr held, then the last decay_steps decaying to min_lr_ratio * lr (cosine, linear or 1 - sqrt).
#include <cstdint>
#include <string>

namespace qt {

enum class LrScheduleType { Constant, Linear, Cosine, Wsd };
enum class WsdDecay { Cosine, Linear, OneMinusSqrt };

struct LrSchedule {
  LrScheduleType type = LrScheduleType::Cosine;
  double lr = 2e-4;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_lr_ratio = 0.0;
  int64_t decay_steps = 0;  // Wsd only: the last steps, decaying
  WsdDecay decay = WsdDecay::Cosine;

  double at(int64_t step) const;  // step counts from 0 (the first update uses at(0))
};

// The warmup of a run: warmup_steps, else ceil(warmup_ratio x total_steps) (transformers'
// TrainingArguments.get_warmup_steps).
int64_t warmup_steps_of(int64_t warmup_steps, double warmup_ratio, int64_t total_steps);

LrScheduleType parse_lr_schedule(const std::string& name, const std::string& file, const std::string& key);
const char* lr_schedule_name(LrScheduleType type);
WsdDecay parse_wsd_decay(const std::string& name, const std::string& file, const std::string& key);
const char* wsd_decay_name(WsdDecay decay);

}  // namespace qt
