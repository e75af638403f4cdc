// lib/dist in one process: the single-rank communicator, argument checks, and the launches make_communicator
// refuses before it contacts anything. The multi-process tests are in test_dist_launched.cpp.
#include <optional>

#include "lib/core/error.h"
#include "lib/comm/communicator.h"
#include "tests/catch.h"
#include "tests/test_util.h"

namespace {


bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

qt::LaunchEnv torchrun_env(int rank, int world, int local_rank) {
  qt::LaunchEnv env;
  env.launcher = qt::Launcher::Torchrun;
  env.rank = rank;
  env.world_size = world;
  env.local_rank = local_rank;
  env.master_addr = "127.0.0.1";
  env.master_port = 1;  // never contacted: every case below is refused before any rendezvous
  return env;
}

}  // namespace

TEST_CASE("without a launcher on the CPU every collective is the identity", "[dist]") {
  auto comm = qt::make_communicator(qt::LaunchEnv{}, at::kCPU);
  REQUIRE(comm->world_size() == 1);
  REQUIRE(comm->rank() == 0);
  CHECK(std::string(comm->backend()) == "single");
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kLong, at::kByte}) {
    INFO(c10::toString(dt));
    at::Tensor x = at::randint(0, 200, {37}, at::TensorOptions().dtype(dt));
    at::Tensor out = at::zeros_like(x);
    comm->all_gather_into_tensor(out, x);
    CHECK(at::equal(out, x));
    at::Tensor rs = at::zeros_like(x);
    comm->reduce_scatter_tensor(rs, x, qt::ReduceOp::Max);
    CHECK(at::equal(rs, x));
    at::Tensor t = x.clone();
    comm->all_reduce(t, qt::ReduceOp::Sum);
    comm->broadcast(t, 0);
    CHECK(at::equal(t, x));
  }
  qt::check_same_across_ranks(*comm, "anything", "config");
}

TEST_CASE("one process on a GPU without a launcher runs no NCCL: collectives are the identity there", "[gpu]") {
  auto comm = qt::make_communicator(qt::LaunchEnv{}, at::Device(at::kCUDA));
  CHECK(std::string(comm->backend()) == "single");
  REQUIRE(comm->device().is_cuda());
  at::Tensor x = at::randn({1000}, at::TensorOptions().device(comm->device()));
  at::Tensor out = at::full_like(x, std::nan(""));
  comm->all_gather_into_tensor(out, x);
  CHECK(at::equal(out, x));
  at::Tensor t = x.clone();
  comm->all_reduce(t, qt::ReduceOp::Sum);
  CHECK(at::equal(t, x));
  qt::CommOptions nccl;
  nccl.nccl_for_one_rank = true;
  CHECK(std::string(qt::make_communicator(qt::LaunchEnv{}, at::Device(at::kCUDA), nccl)->backend()) == "nccl");
}

TEST_CASE("collective misuse is reported with the rank and the collective", "[dist]") {
  auto comm = qt::make_communicator(qt::LaunchEnv{}, at::kCPU);
  auto e = qt::test::caught([&] { comm->all_gather_into_tensor(at::empty({5}), at::empty({4})); });
  REQUIRE(e);
  INFO(e->what());
  CHECK(has(e->what(), "rank 0: single all_gather_into_tensor"));
  CHECK(has(e->what(), "pad every shard"));
  e = qt::test::caught([&] { comm->all_reduce(at::ones({4}, at::kLong), qt::ReduceOp::Avg); });
  REQUIRE(e);
  CHECK(has(e->what(), "avg needs a floating dtype"));
  e = qt::test::caught([&] { comm->all_reduce(at::ones({4, 4}).t()); });
  REQUIRE(e);
  CHECK(has(e->what(), "not contiguous"));
  e = qt::test::caught([&] { comm->broadcast(at::ones({4}), 1); });
  REQUIRE(e);
  CHECK(has(e->what(), "root 1"));
}

TEST_CASE("CPU collectives under torchrun with several ranks are a usage error that points to mpirun", "[dist]") {
  auto e = qt::test::caught([&] { qt::make_communicator(torchrun_env(1, 2, 1), at::kCPU); });
  REQUIRE(e);
  INFO(e->what());
  CHECK(e->kind() == qt::ErrorKind::Usage);
  CHECK(has(e->what(), "rank 1"));
  CHECK(has(e->what(), "mpirun -np 2"));
}

TEST_CASE("more processes on a host than GPUs is a usage error", "[dist]") {
  // Local rank 64: more than any host has GPUs (and on a machine without CUDA, more than zero).
  auto e = qt::test::caught([&] { qt::make_communicator(torchrun_env(64, 65, 64), at::Device(at::kCUDA)); });
  REQUIRE(e);
  INFO(e->what());
  CHECK(e->kind() == qt::ErrorKind::Usage);
  CHECK(has(e->what(), "rank 64"));
  e = qt::test::caught([&] { qt::make_communicator(torchrun_env(1, 2, 1), at::Device(at::kCUDA, 0)); });
  REQUIRE(e);
  CHECK(e->kind() == qt::ErrorKind::Usage);
  CHECK(has(e->what(), "one process per GPU"));
}
