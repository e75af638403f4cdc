#pragma once
// Argument checks shared by the Communicator implementations, so that every backend rejects the same misuse
// with the same message: "rank R: <backend> <collective>: <what>".
#include <ATen/ATen.h>

#include <string>

#include "lib/comm/communicator.h"

namespace qt::dist_detail {

// "rank 1: mpi all_reduce" and the like: the prefix of every collective error.
std::string op_label(int rank, const char* backend, const char* collective);

[[noreturn]] void fail_collective(int rank, const char* backend, const char* collective, const std::string& what);

// Contiguous, on `device`, of a supported dtype. Returns nothing; throws qt::Error(Internal) (a caller bug).
void check_tensor(const Communicator& comm, const char* collective, const char* name, const at::Tensor& t);
void check_gather(const Communicator& comm, const at::Tensor& out, const at::Tensor& in);
void check_reduce_scatter(const Communicator& comm, const at::Tensor& out, const at::Tensor& in, ReduceOp op);
void check_all_reduce(const Communicator& comm, const at::Tensor& t, ReduceOp op);
void check_broadcast(const Communicator& comm, const at::Tensor& t, int root);

// True when `in` is rank `rank`'s slot of `out` (torch's in-place all_gather_into_tensor idiom).
bool is_gather_in_place(const at::Tensor& out, const at::Tensor& in, int rank);

}  // namespace qt::dist_detail
