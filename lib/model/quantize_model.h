#pragma once
// `qlora-train quantize`: writes a model directory whose block linears are stored pre-quantized in NF4, in the
// layout transformers + bitsandbytes save (config.json's `quantization_config`, `<module>.weight` uint8 plus
// its statistics), so that a large model is quantized once and later loads fast (and loads in transformers).
#include <c10/core/Device.h>

#include <string>

namespace qt {

struct QuantizeStats {
  int64_t linears = 0;
  int64_t input_bytes = 0;   // safetensors bytes read
  int64_t output_bytes = 0;  // safetensors bytes written
  int64_t shards = 0;
};

// Streams `in_dir`'s safetensors tensor by tensor (one 16-bit weight in memory at a time, quantized on `device`),
// writes `out_dir` (created; must not exist or be empty) with shards of at most `max_shard_bytes`, an index
// when there are several, config.json with quantization_config, and the tokenizer / generation files copied.
QuantizeStats quantize_model_dir(const std::string& in_dir, const std::string& out_dir, const at::Device& device,
                                 int64_t max_shard_bytes = int64_t{4} << 30);

}  // namespace qt
