#include "lib/dist/fully_shard.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <map>

#include "lib/core/error.h"
#include "lib/model/lora.h"

namespace qt {
namespace {

int64_t elem_size(at::ScalarType t) { return static_cast<int64_t>(c10::elementSize(t)); }

}  // namespace

void FullyShard::add_entry(Unit& u, const ShardTensor& st, std::string& fingerprint) {
  const std::string& name = st.name;
  at::Tensor* slot = st.slot;
  const bool trainable = st.trainable;
  Entry e;
  e.name = name;
  e.slot = slot;
  e.trainable = trainable;
  e.released = st.released;
  QT_CHECK(slot->defined() && slot->dim() >= 1 && slot->size(0) > 0, ErrorKind::Internal,
           "FullyShard: " + name + " is not a tensor with rows");
  at::Tensor t = slot->detach().contiguous();
  e.shape = t.sizes().vec();
  e.dtype = t.scalar_type();
  e.rows = t.size(0);
  e.row_numel = t.numel() / e.rows;
  e.chunk = (e.rows + world_ - 1) / world_;
  std::vector<int64_t> shard_shape = e.shape;
  shard_shape[0] = e.chunk;
  e.shard = at::zeros(shard_shape, t.options());
  const int64_t start = std::min<int64_t>(e.rows, rank_ * e.chunk);
  const int64_t n = std::min<int64_t>(e.rows, start + e.chunk) - start;
  if (n > 0) e.shard.narrow(0, 0, n).copy_(t.narrow(0, start, n));
  if (trainable) {
    QT_CHECK(e.dtype == at::kFloat, ErrorKind::Internal, "FullyShard: LoRA tensor " + name + " is not fp32");
    e.shard.requires_grad_(true);
  }
  fingerprint += name + ":" + c10::toString(e.dtype);
  for (int64_t d : e.shape) fingerprint += "," + std::to_string(d);
  fingerprint += ";";
  u.entries.push_back(std::move(e));
  release(u, /*lora_only=*/false);  // (releases every entry added so far: none of them is gathered yet)
}

FullyShard::FullyShard(LlamaModel& model, Communicator& comm, FullyShardOptions options)
    : model_(model), comm_(comm), rank_(comm.rank()), world_(comm.world_size()) {
  if (!model.plan.checkpointing)
    fail(ErrorKind::Config, "FullyShard (train.shard \"blocks\") needs checkpointing (train.memory.checkpointing): a "
                            "block's weights exist only while it runs, so its backward pass recomputes it");
  at::NoGradGuard no_grad;
  std::string fingerprint;
  num_blocks_ = model.layers.size();
  units_.resize(num_blocks_);
  // The model names each unit's tensors (lib/model/llama.h, ShardTensor); nothing here knows NF4's fields.
  for (size_t i = 0; i < num_blocks_; ++i)
    for (const ShardTensor& t : model.block_shard_tensors(i)) add_entry(units_[i], t, fingerprint);
  if (options.shard_embeddings) {
    tied_ = model.lm_head.defined() && model.lm_head.is_same(model.embed_tokens);
    embed_unit_ = static_cast<int>(units_.size());
    units_.emplace_back();
    add_entry(units_.back(), model.embeddings_shard_tensor(), fingerprint);
    if (tied_) {
      model.lm_head = model.embed_tokens;
    } else {
      head_unit_ = static_cast<int>(units_.size());
      units_.emplace_back();
      add_entry(units_.back(), model.lm_head_shard_tensor(), fingerprint);
    }
  }
  // modules_to_save: the trained copies stay whole (a tied model has one tensor in both roles).
  if (model.embed_tokens_trainable.defined())
    replicated_.emplace_back(peft_module_key("embed_tokens"), model.embed_tokens_trainable);
  if (model.lm_head_trainable.defined() && !model.lm_head_trainable.is_same(model.embed_tokens_trainable))
    replicated_.emplace_back(peft_module_key("lm_head"), model.lm_head_trainable);
  for (const auto& [name, t] : replicated_) fingerprint += "replicated " + name + ";";
  check_same_across_ranks(comm_, fingerprint, "model tensors to shard (names, dtypes, shapes)");
  model_.block_hooks = this;
}

FullyShard::Unit* FullyShard::root_unit(Root which) {
  const int i = which == Root::Embeddings || tied_ ? embed_unit_ : head_unit_;
  return i < 0 ? nullptr : &units_[static_cast<size_t>(i)];
}

void FullyShard::gather_root(Root which) {
  Unit* u = root_unit(which);
  if (!u) return;
  if (u->holds++ == 0) {
    issue_gather(*u, /*lora_only=*/false);
    finish_gather(*u);
  }
  if (tied_) model_.lm_head = model_.embed_tokens;
}

void FullyShard::release_root(Root which) {
  Unit* u = root_unit(which);
  if (!u) return;
  QT_CHECK(u->holds > 0, ErrorKind::Internal, "FullyShard::release_root without gather_root");
  if (--u->holds == 0) release(*u, /*lora_only=*/false);
  if (tied_) model_.lm_head = model_.embed_tokens;
}

FullyShard::~FullyShard() {
  if (model_.block_hooks == this) model_.block_hooks = nullptr;
}

void FullyShard::issue_gather(Unit& u, bool lora_only) {
  at::NoGradGuard no_grad;
  int64_t seg = 0;
  for (const auto& e : u.entries)
    if (!lora_only || e.trainable) seg += e.chunk * e.row_numel * elem_size(e.dtype);
  const auto opts = at::TensorOptions().dtype(at::kByte).device(comm_.device());
  u.send = at::empty({seg}, opts);
  int64_t off = 0;
  for (const auto& e : u.entries) {
    if (lora_only && !e.trainable) continue;
    const int64_t nb = e.chunk * e.row_numel * elem_size(e.dtype);
    u.send.narrow(0, off, nb).copy_(e.shard.detach().reshape({-1}).view(at::kByte));
    off += nb;
  }
  u.recv = at::empty({world_ * seg}, opts);
  u.pending_lora_only = lora_only;
  u.work = comm_.all_gather_into_tensor_async(u.recv, u.send);
}

void FullyShard::finish_gather(Unit& u) {
  at::NoGradGuard no_grad;
  u.work->wait();
  u.work.reset();
  const bool lora_only = u.pending_lora_only;
  const int64_t seg = u.send.numel();
  at::Tensor all = u.recv.view({world_, seg});
  int64_t off = 0;
  for (auto& e : u.entries) {
    if (lora_only && !e.trainable) continue;
    const int64_t nb = e.chunk * e.row_numel * elem_size(e.dtype);
    // Copy-out: rank r's bytes of this tensor are rows [r * chunk, (r + 1) * chunk) of the padded tensor.
    std::vector<int64_t> padded = e.shape;
    padded[0] = world_ * e.chunk;
    // A fresh copy even with one rank (where the slice is already contiguous): its own allocation keeps the
    // alignment that the kernels reading it need (the NF4 kernel takes 16-byte aligned codes).
    at::Tensor full = all.narrow(1, off, nb).clone(at::MemoryFormat::Contiguous).view(e.dtype).view(padded).narrow(0, 0, e.rows);
    if (e.trainable) full = full.clone().requires_grad_(true);
    *e.slot = full;
    off += nb;
  }
  u.send = at::Tensor();
  u.recv = at::Tensor();
  if (!lora_only) u.gathered = true;
}

void FullyShard::gather(size_t layer) {
  QT_CHECK(layer < num_blocks_, ErrorKind::Internal, "FullyShard: no block " + std::to_string(layer));
  Unit& u = units_[layer];
  if (u.gathered) return;
  if (u.work && u.pending_lora_only) finish_gather(u);  // not expected: finish it before a full gather
  if (!u.work) issue_gather(u, /*lora_only=*/false);
  finish_gather(u);
}

void FullyShard::before_block(size_t layer, bool backward) {
  gather(layer);
  // Prefetch the block that runs next (forward: the following one; backward: the preceding one).
  const int64_t next = static_cast<int64_t>(layer) + (backward ? -1 : 1);
  if (next >= 0 && next < static_cast<int64_t>(num_blocks_)) {
    Unit& n = units_[static_cast<size_t>(next)];
    if (!n.gathered && !n.work) issue_gather(n, /*lora_only=*/false);
  }
}

void FullyShard::after_block(size_t layer, bool backward) {
  Unit& u = units_.at(layer);
  if (backward) reduce_scatter_grads(u);
  release(u, /*lora_only=*/false);
}

void FullyShard::release(Unit& u, bool lora_only) {
  for (auto& e : u.entries) {
    if (lora_only && !e.trainable) continue;
    if (e.released == ShardTensor::Released::EmptyRows) {
      std::vector<int64_t> empty = e.shape;
      empty[0] = 0;
      *e.slot = at::empty(empty, e.shard.options().requires_grad(false));
    } else if (e.released == ShardTensor::Released::Meta) {
      *e.slot = at::empty(e.shape, at::TensorOptions().dtype(e.dtype).device(at::kMeta));
    } else {
      *e.slot = at::Tensor();
    }
  }
  if (!lora_only) u.gathered = false;
}

void FullyShard::reduce_scatter_grads(Unit& u) {
  at::NoGradGuard no_grad;
  int64_t seg = 0;
  for (const auto& e : u.entries)
    if (e.trainable) seg += e.chunk * e.row_numel;
  if (seg == 0) return;  // no LoRA in this block (the same on every rank)
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(comm_.device());
  at::Tensor in = at::zeros({world_ * seg}, opts);
  at::Tensor in_rows = in.view({world_, seg});
  int64_t off = 0;
  for (const auto& e : u.entries) {
    if (!e.trainable) continue;
    const int64_t n = e.chunk * e.row_numel;
    const at::Tensor& g = e.slot->defined() ? e.slot->grad() : at::Tensor();
    if (g.defined()) {
      // Rank r receives the (summed) rows [r * chunk, (r + 1) * chunk) of the zero-padded gradient.
      at::Tensor padded = at::zeros({world_ * e.chunk, e.row_numel}, opts);
      padded.narrow(0, 0, e.rows).copy_(g.reshape({e.rows, e.row_numel}));
      in_rows.narrow(1, off, n).copy_(padded.view({world_, n}));
    }
    off += n;
  }
  at::Tensor out = at::empty({seg}, opts);
  comm_.reduce_scatter_tensor(out, in, ReduceOp::Sum);
  off = 0;
  for (auto& e : u.entries) {
    if (!e.trainable) continue;
    const int64_t n = e.chunk * e.row_numel;
    at::Tensor g = out.narrow(0, off, n).view(e.shard.sizes());
    if (e.shard.grad().defined()) e.shard.mutable_grad().add_(g);
    else e.shard.mutable_grad() = g.clone();
    off += n;
  }
}

std::vector<std::pair<std::string, at::Tensor>> FullyShard::parameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& u : units_)
    for (const auto& e : u.entries)
      if (e.trainable) out.emplace_back(e.name, e.shard);
  out.insert(out.end(), replicated_.begin(), replicated_.end());
  return out;
}

void FullyShard::reduce_replicated_grads() {
  at::NoGradGuard no_grad;
  for (auto& [name, t] : replicated_) {
    // Every rank calls the collective, also one whose micro-batches left this gradient undefined.
    if (!t.grad().defined()) t.mutable_grad() = at::zeros_like(t);
    comm_.all_reduce(t.mutable_grad());
  }
}

const at::Tensor* FullyShard::replicated(const std::string& param) const {
  for (const auto& [name, t] : replicated_)
    if (name == param) return &t;
  return nullptr;
}

double FullyShard::clip_grad_norm(double max_norm) {
  at::NoGradGuard no_grad;
  at::Tensor sq = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(comm_.device()));
  for (const auto& u : units_)
    for (const auto& e : u.entries)
      if (e.trainable && e.shard.grad().defined()) sq += e.shard.grad().to(at::kFloat).pow(2).sum();
  // The sum over ranks in float64 on the CPU path (MPI), float32 through NCCL.
  at::Tensor total = sq.to(comm_.device().is_cuda() ? at::kFloat : at::kDouble);
  comm_.all_reduce(total);
  double sum = total.to(at::kCPU, at::kDouble).item<double>();
  for (const auto& [name, t] : replicated_)  // the same summed gradient on every rank: counted once
    if (t.grad().defined()) sum += t.grad().to(at::kDouble).pow(2).sum().to(at::kCPU).item<double>();
  const double norm = std::sqrt(sum);
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto& u : units_)
      for (const auto& e : u.entries)
        if (e.trainable && e.shard.grad().defined()) e.shard.grad().mul_(scale);
    for (const auto& [name, t] : replicated_)
      if (t.grad().defined()) t.grad().mul_(scale);
  }
  return norm;
}

void FullyShard::gather_lora() {
  for (auto& u : units_) {
    bool any = false;
    for (const auto& e : u.entries) any = any || e.trainable;
    if (!any) continue;  // (the same units on every rank)
    if (u.work) finish_gather(u);
    issue_gather(u, /*lora_only=*/true);
    finish_gather(u);
  }
}

void FullyShard::release_lora() {
  for (auto& u : units_)
    if (!u.gathered) release(u, /*lora_only=*/true);
}

const FullyShard::Entry& FullyShard::entry(const std::string& param) const {
  for (const auto& u : units_)
    for (const auto& e : u.entries)
      if (e.name == param) return e;
  fail(ErrorKind::Internal, "FullyShard: no sharded tensor named " + param);
}

int64_t FullyShard::full_rows(const std::string& param) const {
  if (const at::Tensor* t = replicated(param)) return t->size(0);
  return entry(param).rows;
}

at::Tensor FullyShard::shard_of(const std::string& param, const at::Tensor& full) const {
  if (const at::Tensor* t = replicated(param)) {
    QT_CHECK(full.sizes() == t->sizes(), ErrorKind::Internal, "FullyShard::shard_of: " + param + " has another shape");
    return full.to(t->device());
  }
  const Entry& e = entry(param);
  QT_CHECK(full.dim() >= 1 && full.size(0) == e.rows && full.numel() == e.rows * e.row_numel, ErrorKind::Internal,
           "FullyShard::shard_of: " + param + " has another shape");
  at::Tensor out = at::zeros(e.shard.sizes(), full.options().device(e.shard.device()));
  const int64_t start = std::min<int64_t>(e.rows, rank_ * e.chunk);
  const int64_t n = std::min<int64_t>(e.rows, start + e.chunk) - start;
  if (n > 0) out.narrow(0, 0, n).copy_(full.narrow(0, start, n));
  return out;
}

int64_t FullyShard::sharded_bytes() const {
  int64_t n = 0;
  for (const auto& u : units_)
    for (const auto& e : u.entries) n += e.shard.numel() * elem_size(e.dtype);
  return n;
}

int64_t FullyShard::unsharded_bytes() const {
  int64_t n = 0;
  for (const auto& u : units_)
    for (const auto& e : u.entries) n += e.rows * e.row_numel * elem_size(e.dtype);
  return n;
}

int64_t FullyShard::gathered_bytes() const {
  int64_t n = 0;
  for (const auto& u : units_)
    for (const auto& e : u.entries)
      if (e.slot->defined() && !e.slot->is_meta()) n += e.slot->numel() * elem_size(e.dtype);
  return n;  // (a tied lm_head is the embeddings' tensor: counted once)
}

}  // namespace qt
