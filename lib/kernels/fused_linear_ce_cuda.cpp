// CUDA driver of the fused linear cross-entropy: per chunk of tokens, the logits tile through cuBLAS (via
// at::mm_out, storage dtype = input dtype, fp32 accumulation), the tile kernel (fused_linear_ce.cu) turning
// it into the gradient tile in place, then dh = G W and dW += G^T h through cuBLAS again. With the
// vocabulary-tile schedule (fused_linear_ce.h), dW is left out of that loop and written slice by slice after it.
#include "lib/core/error.h"
#include "lib/kernels/fused_linear_ce_impl.h"
#include "lib/kernels/fused_linear_ce_kernel.h"
#include "lib/kernels/tuned_gemm.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#endif

namespace qt::detail {

#ifdef QT_WITH_CUDA

bool fused_linear_ce_cuda_available() { return true; }

namespace {

// The side stream of a device, the same one for every call of the process. A fresh stream from ATen's pool per
// call would round-robin over its 32 streams, and cuBLAS keeps one workspace per stream it has seen (32 MiB on
// Hopper): up to 1 GiB held. A handle fixed once, not state that changes.
at::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, at::cuda::CUDAStream> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it == streams.end()) it = streams.emplace(device, at::cuda::getStreamFromPool(false, device)).first;
  return it->second;
}

// QT_CE_RESIDENT_TILES=1: the tile kernel on its persistent grid by default (FusedLinearCeOptions::resident_tiles),
// read once; anything else, or unset: the grid of one CTA a row.
bool resident_tiles_from_env() {
  static const bool on = [] {
    const char* v = std::getenv("QT_CE_RESIDENT_TILES");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

}  // namespace

// Pass 2 of the vocabulary-tile schedule: dW[v0 : v0 + n] = G[:, v0 : v0 + n]^T h, each slice written once
// (beta = 0), G recomputed from the logits slice h W[v0 : v0 + n]^T and pass 1's per-row log-sum-exp. The
// [T, n] slice lives in dW's rows after v0 + n, which no GEMM has written yet, while they hold it; the last
// slices, once those rows are too few, use a small tile of their own of last_cols columns.
void write_dw_by_vocab_slices(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              const at::Tensor& lse, at::Tensor& dw, kernels::CeTileDtype dtype,
                              const kernels::CeTileParams& params, int64_t vocab_tile, int64_t last_cols,
                              cudaStream_t stream) {
  const int64_t tokens = hidden.size(0), hid = hidden.size(1), vocab = weight.size(0);
  const int64_t big = std::max(vocab_tile, last_cols);
  at::Tensor last_tile;  // allocated when first needed
  const at::Tensor flat = dw.view({-1});
  for (int64_t v0 = 0; v0 < vocab;) {
    const int64_t left = vocab - v0;
    // Largest n with tokens * n <= (left - n) * hid: the slice fits in the rows after it. Multiples of 64
    // keep rows 16-byte aligned.
    int64_t n = std::min(big, left * hid / (tokens + hid) / 64 * 64);
    at::Tensor z;
    if (n >= last_cols && n > 0) {
      z = flat.narrow(0, (v0 + n) * hid, tokens * n).view({tokens, n});
    } else {
      n = std::min(last_cols, left);
      if (!last_tile.defined()) last_tile = at::empty({tokens * last_cols}, dw.options());
      z = last_tile.narrow(0, 0, tokens * n).view({tokens, n});
    }
    const at::Tensor w = weight.narrow(0, v0, n);
    kernels::gemm_out(z, hidden, w.t());
    kernels::ce_slice_grad(z.data_ptr(), dtype, tokens, n, n, v0, vocab, labels.data_ptr<int64_t>(),
                           lse.data_ptr<float>(), params, stream);
    at::Tensor dw_slice = dw.narrow(0, v0, n);
    at::mm_out(dw_slice, z.t(), hidden);
    v0 += n;
  }
}

FusedCeForward fused_linear_ce_cuda(const at::Tensor& hidden, const at::Tensor& weight_in, const at::Tensor& labels,
                                    const FusedLinearCeOptions& options, int64_t chunk, bool want_dh, bool want_dw,
                                    const CountedRows& counted_rows) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t tokens = hidden.size(0);
  const int64_t hid = hidden.size(1);
  const int64_t vocab = weight_in.size(0);
  kernels::CeTileDtype dtype;
  switch (hidden.scalar_type()) {
    case at::kFloat:
      dtype = kernels::CeTileDtype::F32;
      break;
    case at::kBFloat16:
      dtype = kernels::CeTileDtype::BF16;
      break;
    case at::kHalf:
      dtype = kernels::CeTileDtype::F16;
      break;
    default:
      fail(ErrorKind::Internal, "fused_linear_ce_cuda: unsupported dtype");
  }
  kernels::CeTileParams params;
  params.ignore_index = options.ignore_index;
  params.label_smoothing = static_cast<float>(options.label_smoothing);
  params.z_loss = static_cast<float>(options.z_loss);
  params.logit_softcap = static_cast<float>(options.logit_softcap);
  params.resident = options.resident_tiles < 0 ? resident_tiles_from_env() : options.resident_tiles > 0;

  // A weight with odd strides would be copied by every GEMM; copy it once instead (a no-op when contiguous).
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor y_all = labels.contiguous();
  const at::cuda::CUDAStream main = at::cuda::getCurrentCUDAStream();

  // Ignored tokens have zero loss and zero gradient: their rows are left out of every GEMM (1 in 7 of the
  // bench's tokens; often half of a fine-tuning batch whose prompts are masked). The counted rows are gathered
  // chunk by chunk into a small buffer, so the GEMMs see dense operands. Labels counted on the host come with
  // their count and positions; else two syncs here (count, nonzero).
  int64_t counted = counted_rows.count;
  at::Tensor idx = counted_rows.index;
  if (counted < 0) {
    const at::Tensor mask = y_all.ne(options.ignore_index);
    counted = mask.sum().item<int64_t>();
    if (counted < tokens) idx = mask.nonzero().squeeze(1);
  }
  const bool compact = counted < tokens;
  QT_CHECK(!compact || (idx.defined() && idx.size(0) == counted), ErrorKind::Internal,
           "fused_linear_ce_cuda: the counted rows' positions do not match their count");
  const at::Tensor y = compact ? y_all.index_select(0, idx) : y_all;
  at::Tensor loss_c = at::empty({counted}, hidden.options().dtype(at::kFloat));  // over counted rows

  FusedCeForward out;
  const auto dense = hidden.options().memory_format(at::MemoryFormat::Contiguous);
  if (want_dh) out.dh = compact ? at::zeros({tokens, hid}, dense) : at::empty({tokens, hid}, dense);
  if (want_dw) out.dw = counted == 0 ? at::zeros_like(weight) : at::empty(weight.sizes(), weight.options());
  auto finish = [&]() -> FusedCeForward {
    out.loss_rows = compact ? at::zeros({tokens}, loss_c.options()).index_copy_(0, idx, loss_c) : loss_c;
    return std::move(out);
  };
  if (counted == 0) return finish();

  // Counted rows [c0, c0 + rows): a view of hidden, or gathered into `buf` (at least rows x H elements).
  auto rows_of = [&](int64_t c0, int64_t rows, const at::Tensor& buf) -> at::Tensor {
    if (!compact) return hidden.narrow(0, c0, rows);
    at::Tensor h = buf.narrow(0, 0, rows * hid).view({rows, hid});
    at::index_select_out(h, hidden, 0, idx.narrow(0, c0, rows));
    return h;
  };
  // dh of those rows = G W: in place, or into `h` (dead by then) and copied to the rows' positions.
  auto write_dh = [&](int64_t c0, int64_t rows, const at::Tensor& z, at::Tensor& h) {
    if (!compact) {
      at::Tensor dh = out.dh.narrow(0, c0, rows);
      kernels::gemm_out(dh, z, weight);
    } else {
      kernels::gemm_out(h, z, weight);
      out.dh.index_copy_(0, idx.narrow(0, c0, rows), h);
    }
  };

  if (want_dw && options.schedule == FusedCeSchedule::VocabTiles) {
    // Pass 1: loss, log-sum-exp and dh by token chunks; the [chunk, V] tile and the gathered rows [chunk, H] both
    // in dW's storage (chunk (V + H) <= V H).
    const int64_t chunk1 = std::max<int64_t>(1, std::min(chunk, compact ? vocab * hid / (vocab + hid) : hid));
    const at::Tensor lse_c = at::empty({counted}, loss_c.options());
    const at::Tensor flat = out.dw.view({-1});
    const at::Tensor gather_buf = compact ? flat.narrow(0, chunk1 * vocab, chunk1 * hid) : at::Tensor();
    for (int64_t c0 = 0; c0 < counted; c0 += chunk1) {
      const int64_t rows = std::min(chunk1, counted - c0);
      at::Tensor h = rows_of(c0, rows, gather_buf);
      at::Tensor z = flat.narrow(0, 0, rows * vocab).view({rows, vocab});
      kernels::gemm_out(z, h, weight.t());
      kernels::ce_tile_loss_grad(z.data_ptr(), dtype, rows, vocab, vocab, y.data_ptr<int64_t>() + c0,
                                 loss_c.data_ptr<float>() + c0, want_dh, params, main.stream(),
                                 lse_c.data_ptr<float>() + c0);
      if (want_dh) write_dh(c0, rows, z, h);
    }
    // Pass 2 over the counted rows only: gathered once (T_counted x H more memory) unless low_memory, which
    // runs it over every token (ignored ones give zero rows of G) with the log-sum-exps at token positions.
    const int64_t vocab_tile = options.vocab_tile > 0 ? options.vocab_tile : 4096;
    const int64_t last_cols = fused_linear_ce_last_tile_columns(tokens, hid, vocab);
    if (!compact) {
      write_dw_by_vocab_slices(hidden, weight, y, lse_c, out.dw, dtype, params, vocab_tile, last_cols, main.stream());
    } else if (!options.low_memory) {
      write_dw_by_vocab_slices(hidden.index_select(0, idx), weight, y, lse_c, out.dw, dtype, params, vocab_tile,
                               last_cols, main.stream());
    } else {
      const at::Tensor lse = at::zeros({tokens}, lse_c.options()).index_copy_(0, idx, lse_c);
      write_dw_by_vocab_slices(hidden, weight, y_all, lse, out.dw, dtype, params, vocab_tile, last_cols, main.stream());
    }
    return finish();
  }

  const bool write_grad = want_dh || want_dw;
  // Compact: the gathered rows [chunk, H] take from the tile's share, so tile plus buffer stay within the
  // [chunk, V] tile of the plain loop (a 64th less, for the per-row vectors).
  const int64_t chunk_t = compact ? std::max<int64_t>(1, chunk * vocab / (vocab + hid) * 63 / 64) : chunk;
  const int64_t tile_rows = std::min(chunk_t, counted);
  // One tile, reused by every chunk: [chunk, V] in the input dtype (bf16: the memory bound of the design).
  at::Tensor tile = at::empty({tile_rows, vocab}, dense);
  const at::Tensor gather_buf = compact ? at::empty({tile_rows * hid}, dense) : at::Tensor();
  // With a trainable weight, dW += G^T h (K = chunk: bound by reading and writing all of dW) runs on a side
  // stream next to dh = G W (bound by FLOPs); both only read the tile. The next chunk's logits GEMM overwrites
  // the tile, so the main stream waits for the side stream before it. Not when compact: dh is written over the
  // gathered rows, which dW reads.
  const bool overlap = want_dw && want_dh && options.overlap_dw && !compact;
  const at::cuda::CUDAStream side = overlap ? side_stream(hidden.device().index()) : main;
  at::cuda::CUDAEvent tile_ready, dw_done;

  for (int64_t c0 = 0; c0 < counted; c0 += chunk_t) {
    const int64_t rows = std::min(chunk_t, counted - c0);
    at::Tensor h = rows_of(c0, rows, gather_buf);
    at::Tensor z = tile.narrow(0, 0, rows);
    kernels::gemm_out(z, h, weight.t());
    kernels::ce_tile_loss_grad(z.data_ptr(), dtype, rows, vocab, vocab, y.data_ptr<int64_t>() + c0,
                               loss_c.data_ptr<float>() + c0, write_grad, params, main.stream());
    if (want_dw) {
      if (overlap) {
        tile_ready.record(main);
        tile_ready.block(side);
      }
      const c10::cuda::CUDAStreamGuard on_side(side);
      // The first chunk writes dW (beta = 0: no zero-fill pass over V x H); later ones accumulate into it.
      // cuBLAS accumulates in fp32 and rounds once per chunk into dW's dtype.
      if (c0 == 0) {
        at::mm_out(out.dw, z.t(), h);
      } else {
        out.dw.addmm_(z.t(), h);
      }
    }
    if (want_dh) write_dh(c0, rows, z, h);
    if (overlap) {
      // Also orders every later use (or free) of dW and of the tile on the main stream after the side work,
      // so the caching allocator needs no record_stream.
      dw_done.record(side);
      dw_done.block(main);
    }
  }
  return finish();
}

#else

bool fused_linear_ce_cuda_available() { return false; }

FusedCeForward fused_linear_ce_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const FusedLinearCeOptions&, int64_t, bool, bool, const CountedRows&) {
  fail(ErrorKind::Internal, "fused_linear_ce_cuda: this build has no CUDA kernels (QT_CUDA off)");
}

#endif

}  // namespace qt::detail
