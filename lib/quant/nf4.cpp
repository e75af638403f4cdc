// Nf4Weight: quantization, dequantization, and the bitsandbytes serialization (QuantState.as_dict(packed=True)
// / QuantState.from_dict in bitsandbytes/functional.py, 0.50).
#include "lib/quant/nf4.h"

#include <ATen/ATen.h>

#include <charconv>
#include <cstring>
#include <string>

#include "lib/core/error.h"
#include "lib/core/json.h"
#include "lib/core/safetensors.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_format.h"

namespace qt {
namespace {

const char* kStateKey = ".weight.quant_state.bitsandbytes__nf4";

// bitsandbytes writes str(torch.dtype).strip("torch.").
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    default:
      fail(ErrorKind::Internal, std::string("NF4: unsupported weight dtype ") + c10::toString(t));
  }
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Python's repr(float): shortest text that reads back to the same double.
std::string shortest(double v) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, res.ptr);
}

}  // namespace

int64_t Nf4Weight::bytes() const {
  const auto& d = data;
  return d.packed.nbytes() + d.absmax_q.nbytes() + d.nested_absmax.nbytes() + d.nested_map.nbytes() +
         d.quant_map.nbytes() + static_cast<int64_t>(sizeof(float));
}

at::Tensor Nf4Weight::dequantize(at::ScalarType out_dtype) const {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(out_dtype).device(device()));
  dequantize_into(out);
  return out;
}

void Nf4Weight::dequantize_into(const at::Tensor& out) const { kernels::nf4_dequant_into(data, out); }

Nf4Weight Nf4Weight::to(const at::Device& dev) const {
  Nf4Weight w = *this;
  w.data.packed = data.packed.to(dev);
  w.data.absmax_q = data.absmax_q.to(dev);
  w.data.nested_absmax = data.nested_absmax.to(dev);
  w.data.nested_map = data.nested_map.to(dev);
  w.data.quant_map = data.quant_map.to(dev);
  return w;
}

Nf4Weight quantize_nf4(const at::Tensor& weight, int64_t blocksize) {
  const auto t = weight.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf)
    fail(ErrorKind::Model,
         std::string("NF4 quantize: weight of dtype ") + c10::toString(t) + ", expected float32, bfloat16 or float16");
  if (blocksize < kernels::kNf4MinBlocksize || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    fail(ErrorKind::Model,
         "NF4 quantize: blocksize " + std::to_string(blocksize) + " is not a power of two in [64, 4096]");
  std::vector<int64_t> shape(weight.sizes().begin(), weight.sizes().end());
  // Any positive count: bitsandbytes quantizes the flat tensor with a short last block (nf4_format.h).
  if (weight.numel() == 0) fail(ErrorKind::Model, "NF4 quantize: weight of shape " + shape_str(shape) + " is empty");
  Nf4Weight w;
  w.data = kernels::nf4_quantize_ref(weight, blocksize);
  w.shape = std::move(shape);
  w.dtype = t;
  return w;
}

std::vector<std::pair<std::string, at::Tensor>> Nf4Weight::to_bnb_tensors(const std::string& prefix) const {
  // Key order and spacing of json.dumps(dict) as QuantState.as_dict builds it.
  std::string json =
      "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(data.blocksize) + ", \"dtype\": \"" +
      dtype_name(dtype) + "\", \"shape\": " + shape_str(shape) +
      ", \"nested_blocksize\": " + std::to_string(kernels::kNf4NestedBlocksize) +
      ", \"nested_dtype\": \"float32\", \"nested_offset\": " + shortest(static_cast<double>(data.offset)) + "}";
  at::Tensor state = at::empty({static_cast<int64_t>(json.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(state.data_ptr<uint8_t>(), json.data(), json.size());
  const std::string w = prefix + ".weight";
  return {
      {w, data.packed.to(at::kCPU).reshape({-1, 1})},          {w + ".absmax", data.absmax_q.to(at::kCPU)},
      {w + ".quant_map", data.quant_map.to(at::kCPU)},         {w + ".nested_absmax", data.nested_absmax.to(at::kCPU)},
      {w + ".nested_quant_map", data.nested_map.to(at::kCPU)}, {prefix + kStateKey, state},
  };
}

Nf4Weight nf4_from_bnb_tensors(const std::map<std::string, at::Tensor>& tensors, const std::string& prefix,
                               const std::string& source, const at::Device& device) {
  const std::string w = prefix + ".weight";
  auto get = [&](const std::string& key) -> const at::Tensor& {
    auto it = tensors.find(key);
    if (it == tensors.end()) {
      // An fp4 state or another quantizer names its state key differently: say so rather than "missing".
      if (key == prefix + kStateKey)
        for (const auto& kv : tensors)
          if (kv.first.rfind(w + ".quant_state.", 0) == 0)
            fail_key(ErrorKind::Model, source, kv.first,
                     "unsupported quantization state (only bitsandbytes nf4 is supported; expected " + key + ")");
      fail_key(ErrorKind::Model, source, key, "missing tensor of an NF4 (bitsandbytes 4-bit) weight");
    }
    return it->second;
  };
  auto expect = [&](bool ok, const std::string& key, const std::string& what) {
    if (!ok) fail_key(ErrorKind::Model, source, key, what);
  };

  // The packed JSON state.
  const std::string state_key = prefix + kStateKey;
  const at::Tensor& state_t = get(state_key);
  expect(state_t.scalar_type() == at::kByte && state_t.dim() == 1, state_key, "expected a 1-D uint8 tensor of JSON");
  at::Tensor state_c = state_t.to(at::kCPU).contiguous();
  const std::string text(reinterpret_cast<const char*>(state_c.data_ptr<uint8_t>()), state_c.numel());
  Json js = parse_json(text, source + ": " + state_key, ErrorKind::Model);
  expect(js.is_object(), state_key, "expected a JSON object");
  JsonReader r{js, source, ErrorKind::Model, state_key + "."};
  const std::string qtype = r.get_string("quant_type");
  expect(qtype == "nf4", state_key + ".quant_type", "quant_type '" + qtype + "' is not supported (expected nf4)");
  const int64_t blocksize = r.get_int("blocksize");
  expect(blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, state_key + ".blocksize",
         "blocksize " + std::to_string(blocksize) + " is not a power of two in [64, 4096]");
  const std::string dtype_s = r.get_string("dtype");
  at::ScalarType dtype;
  if (dtype_s == "bfloat16")
    dtype = at::kBFloat16;
  else if (dtype_s == "float16")
    dtype = at::kHalf;
  else if (dtype_s == "float32")
    dtype = at::kFloat;
  else
    fail_key(ErrorKind::Model, source, state_key + ".dtype", "dtype '" + dtype_s + "' is not a float type");
  const Json& shape_j = r.require("shape");
  expect(shape_j.is_array() && !shape_j.empty(), state_key + ".shape", "expected a non-empty array of sizes");
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (const auto& s : shape_j) {
    expect(s.is_number_integer() && s.get<int64_t>() > 0, state_key + ".shape", "sizes must be positive integers");
    shape.push_back(s.get<int64_t>());
    numel *= shape.back();
  }
  expect(r.has("nested_offset"), state_key + ".nested_absmax",
         "only double-quantized statistics (compress_statistics=True) are supported");
  expect(r.get_int("nested_blocksize") == kernels::kNf4NestedBlocksize, state_key + ".nested_blocksize",
         "expected 256");
  expect(r.get_string("nested_dtype", "float32") == "float32", state_key + ".nested_dtype", "expected float32");
  const float offset = static_cast<float>(r.get_double("nested_offset"));

  const int64_t blocks = kernels::nf4_blocks(numel, blocksize);
  const int64_t groups = (blocks + kernels::kNf4NestedBlocksize - 1) / kernels::kNf4NestedBlocksize;
  auto tensor = [&](const std::string& key, at::ScalarType type, int64_t n) {
    const at::Tensor& t = get(key);
    expect(t.scalar_type() == type, key,
           std::string("dtype ") + c10::toString(t.scalar_type()) + ", expected " + c10::toString(type));
    expect(t.numel() == n, key,
           std::to_string(t.numel()) + " elements, expected " + std::to_string(n) + " for shape " + shape_str(shape) +
               " and blocksize " + std::to_string(blocksize));
    return t.reshape({-1}).to(device).contiguous();
  };
  Nf4Weight out;
  out.shape = shape;
  out.dtype = dtype;
  out.data.blocksize = blocksize;
  out.data.numel = numel;
  out.data.offset = offset;
  out.data.packed = tensor(w, at::kByte, kernels::nf4_packed_bytes(numel));
  out.data.absmax_q = tensor(w + ".absmax", at::kByte, blocks);
  out.data.nested_absmax = tensor(w + ".nested_absmax", at::kFloat, groups);
  out.data.quant_map = tensor(w + ".quant_map", at::kFloat, 16);
  out.data.nested_map = tensor(w + ".nested_quant_map", at::kFloat, 256);
  // .clone() where the reshape/to() returned a view of the caller's (maybe mmapped) storage: own the bytes.
  for (at::Tensor* t :
       {&out.data.packed, &out.data.absmax_q, &out.data.nested_absmax, &out.data.quant_map, &out.data.nested_map})
    if (t->device().is_cpu()) *t = t->clone();
  return out;
}

Nf4Weight nf4_from_safetensors(const SafetensorsFile& file, const std::string& prefix, const at::Device& device) {
  std::map<std::string, at::Tensor> tensors;
  const std::string w = prefix + ".weight";
  for (const auto& info : file.tensors())
    if (info.name == w || info.name.rfind(w + ".", 0) == 0) tensors.emplace(info.name, file.view(info.name));
  return nf4_from_bnb_tensors(tensors, prefix, file.path(), device);
}

void dequantize_group_into(const std::vector<const Nf4Weight*>& weights, const std::vector<at::Tensor>& outs) {
  std::vector<const kernels::Nf4Data*> ds;
  for (const Nf4Weight* w : weights) ds.push_back(&w->data);
  kernels::nf4_dequant_group_into(ds, outs);
}

}  // namespace qt
