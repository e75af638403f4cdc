// lib/dist tests that need several processes: run by tests/dist_driver.cpp under mpirun (-np 2 and 3: "[mpi]"),
// torchrun ("[torchrun]") and, on a GPU, under any launcher with NCCL ("[gpu]"). Every rank draws its inputs from
// a generator seeded by its rank, so each rank can rebuild all ranks' inputs and compute the expected result of
// a collective itself, with no communication.
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <optional>
#include <random>
#include <thread>

#include "lib/core/error.h"
#include "lib/comm/communicator.h"
#include "lib/comm/mpi_communicator.h"
#include "lib/comm/store_rendezvous.h"
#include "lib/model/exec_plan.h"
#include "lib/model/random_init.h"
#include "lib/train/train_stages.h"
#include "tests/catch.h"
#include "tests/test_util.h"

namespace {

using qt::Communicator;
using qt::ReduceOp;

const qt::CommOptions kTestOptions{std::chrono::seconds(60), /*nccl_for_one_rank=*/true};  // a broken test fails instead of hanging ctest

// Rank `rank`'s input number `salt` (a different tensor per call site), on the CPU.
at::Tensor rank_data(int rank, int salt, int64_t n, at::ScalarType dtype) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 * rank + salt + 1);
  switch (dtype) {
    case at::kByte: return at::randint(0, 256, {n}, gen, at::TensorOptions().dtype(at::kByte));
    case at::kLong:
      return at::randint(-(int64_t{1} << 40), int64_t{1} << 40, {n}, gen, at::TensorOptions().dtype(at::kLong));
    default: return at::randn({n}, gen, at::TensorOptions().dtype(at::kFloat)).to(dtype);
  }
}

// The op over all ranks' tensors, in float64 for floating dtypes (a reference more exact than any backend) and
// in the dtype itself for integers (uint8 sums wrap modulo 256 in MPI, NCCL and torch alike).
at::Tensor reference_reduce(const std::vector<at::Tensor>& xs, ReduceOp op) {
  const bool fp = at::isFloatingType(xs[0].scalar_type());
  at::Tensor acc = fp ? xs[0].to(at::kDouble) : xs[0].clone();
  for (size_t r = 1; r < xs.size(); ++r) {
    at::Tensor x = fp ? xs[r].to(at::kDouble) : xs[r];
    acc = op == ReduceOp::Max ? at::maximum(acc, x) : acc + x;
  }
  if (op == ReduceOp::Avg) acc = acc / static_cast<double>(xs.size());
  return acc;
}

// Integers and max: exact. Sums of floats: within the rounding that a backend may do at each of the world-size
// pairwise steps plus the final rounding, relative to the sum of magnitudes (the condition of a sum).
void check_reduced(const at::Tensor& got_dev, const std::vector<at::Tensor>& xs, ReduceOp op) {
  at::Tensor got = got_dev.to(at::kCPU);
  at::Tensor want = reference_reduce(xs, op);
  const at::ScalarType dt = xs[0].scalar_type();
  if (!at::isFloatingType(dt)) {
    CHECK(at::equal(got, want));
    return;
  }
  if (op == ReduceOp::Max) {
    CHECK(at::equal(got, want.to(dt)));
    return;
  }
  at::Tensor mag = at::zeros_like(want);
  for (const auto& x : xs) mag += x.to(at::kDouble).abs();
  if (op == ReduceOp::Avg) mag /= static_cast<double>(xs.size());
  const double unit = dt == at::kFloat ? std::ldexp(1.0, -24) : std::ldexp(1.0, -8);  // fp32, bf16 unit roundoff
  const double tol = unit * (static_cast<double>(xs.size()) + 1);
  at::Tensor err = (got.to(at::kDouble) - want).abs();
  at::Tensor bound = mag * tol + 1e-30;
  INFO("dtype " << c10::toString(dt) << ", op " << qt::reduce_op_name(op) << ", max error/bound "
                << (err.numel() ? (err / bound).max().item<double>() : 0.0));
  CHECK((err <= bound).all().item<bool>());
}

std::vector<at::Tensor> all_ranks(int world, int salt, int64_t n, at::ScalarType dt) {
  std::vector<at::Tensor> xs;
  for (int r = 0; r < world; ++r) xs.push_back(rank_data(r, salt, n, dt));
  return xs;
}

const at::ScalarType kDtypes[] = {at::kFloat, at::kBFloat16, at::kLong, at::kByte};

// Every collective against its arithmetic; shared by the MPI (CPU) and NCCL (CUDA) test cases.
void check_collectives(Communicator& comm) {
  const int W = comm.world_size(), me = comm.rank();
  const at::Device dev = comm.device();
  int salt = 0;
  for (at::ScalarType dt : kDtypes) {
    INFO("dtype " << c10::toString(dt) << ", rank " << me << " of " << W);
    // Sizes that divide nothing evenly: all_reduce and broadcast take any size; all_gather and reduce_scatter
    // need equal per-rank sizes (padding is the caller's), so their shard size is what is odd.
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{1001}}) {
      INFO("n " << n);
      {  // all_gather_into_tensor, out of place and in place (the input is this rank's slot of the output)
        auto xs = all_ranks(W, ++salt, n, dt);
        at::Tensor want = at::cat(xs);
        at::Tensor out = at::empty({W * n}, xs[me].options().device(dev));
        comm.all_gather_into_tensor(out, xs[me].to(dev));
        CHECK(at::equal(out.to(at::kCPU), want));
        at::Tensor buf = at::zeros({W * n}, xs[me].options().device(dev));
        at::Tensor slot = buf.narrow(0, me * n, n);
        slot.copy_(xs[me].to(dev));
        comm.all_gather_into_tensor(buf, slot);
        CHECK(at::equal(buf.to(at::kCPU), want));
      }
      for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max}) {
        if (op == ReduceOp::Avg && !at::isFloatingType(dt)) continue;
        INFO("op " << qt::reduce_op_name(op));
        {  // reduce_scatter_tensor: this rank's chunk of the op over all ranks' inputs
          auto xs = all_ranks(W, ++salt, W * n, dt);
          at::Tensor out = at::empty({n}, xs[me].options().device(dev));
          comm.reduce_scatter_tensor(out, xs[me].to(dev), op);
          std::vector<at::Tensor> chunks;
          for (const auto& x : xs) chunks.push_back(x.narrow(0, me * n, n));
          check_reduced(out, chunks, op);
        }
        {  // all_reduce, in place
          auto xs = all_ranks(W, ++salt, n, dt);
          at::Tensor t = xs[me].to(dev, /*non_blocking=*/false, /*copy=*/true);  // a copy: xs is the reference
          comm.all_reduce(t, op);
          check_reduced(t, xs, op);
        }
      }
      for (int root = 0; root < W; ++root) {
        auto xs = all_ranks(W, ++salt, n, dt);
        at::Tensor t = xs[me].to(dev, /*non_blocking=*/false, /*copy=*/true);  // a copy: xs is the reference
        comm.broadcast(t, root);
        CHECK(at::equal(t.to(at::kCPU), xs[root]));
      }
    }
  }
}

// Prefetch pattern of FullyShard: several gathers in flight, waited in another order than issued.
void check_async_gathers(Communicator& comm) {
  const int W = comm.world_size(), me = comm.rank();
  const int64_t n = 4099;
  std::vector<std::vector<at::Tensor>> inputs;
  std::vector<at::Tensor> outs;
  std::vector<std::unique_ptr<qt::Work>> works;
  for (int k = 0; k < 4; ++k) {
    inputs.push_back(all_ranks(W, 9000 + k, n, at::kByte));
    outs.push_back(at::empty({W * n}, at::TensorOptions().dtype(at::kByte).device(comm.device())));
    works.push_back(comm.all_gather_into_tensor_async(outs[k], inputs[k][me].to(comm.device())));
  }
  for (int k = 3; k >= 0; --k) {
    works[k]->wait();
    CHECK(at::equal(outs[k].to(at::kCPU), at::cat(inputs[k])));
  }
}


bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

TEST_CASE("mpi collectives match their arithmetic for fp32, bf16, int64, uint8", "[.mpi]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  REQUIRE(std::string(comm->backend()) == "mpi");
  CHECK(qt::read_launch_env().local_world_size == comm->world_size());  // one host (OMPI_COMM_WORLD_LOCAL_SIZE)
  check_collectives(*comm);
  check_async_gathers(*comm);
}

TEST_CASE("mpi barrier releases no rank before the last one arrives", "[.mpi]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  // The last rank arrives late; steady_clock is CLOCK_MONOTONIC, one clock for all processes of the host.
  if (comm->rank() == comm->world_size() - 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  at::Tensor entered = at::full({1}, now_ns(), at::kLong);
  comm->barrier();
  const int64_t left = now_ns();
  at::Tensor all = at::empty({comm->world_size()}, at::kLong);
  comm->all_gather_into_tensor(all, entered);
  CHECK(left >= all.max().item<int64_t>());
}

TEST_CASE("check_same_across_ranks names the ranks whose config differs", "[.mpi]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  const int W = comm->world_size(), me = comm->rank();
  REQUIRE(W >= 2);
  qt::check_same_across_ranks(*comm, "{\"lr\": 1e-4}", "run config");  // equal: returns
  // The last rank has another learning rate: every rank reports it, none is left waiting.
  std::string cfg = me == W - 1 ? "{\"lr\": 2e-4}" : "{\"lr\": 1e-4}";
  auto e = qt::test::caught([&] { qt::check_same_across_ranks(*comm, cfg, "run config"); });
  REQUIRE(e);
  INFO(e->what());
  CHECK(e->kind() == qt::ErrorKind::Config);
  CHECK(contains(e->what(), "rank " + std::to_string(W - 1) + " differs"));
  CHECK(contains(e->what(), "run config"));
  comm->barrier();  // the communicator still works after a config mismatch
}

TEST_CASE("every rank decides one plan, from the least free device memory and host share over the ranks", "[.mpi]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::kCPU, kTestOptions);
  const int W = comm->world_size(), me = comm->rank();
  REQUIRE(W >= 2);
  CHECK(qt::min_across_ranks(*comm, {10.0 + me, 5.5 - me, -1.0}) ==
        std::vector<double>{10.0, 5.5 - (W - 1), -1.0});

  // 8B on an H200's rates, 8 rows of 2048 tokens a rank, micro-batch and plan left to the plan; the ranks' GPUs
  // have from 20 to 36 GiB free and their hosts from 125 GiB down.
  qt::PlanInputs in;
  in.model = qt::shape_config("llama-3.1-8b", "test", "shape");
  in.micro_batch = 8;
  in.seq = 2048;
  in.cuda = true;
  in.world = W;
  const auto& c = in.model;
  in.lora_params = c.num_hidden_layers * 16 *
                   ((c.hidden_size + c.q_size()) * 2 + (c.hidden_size + c.kv_size()) * 2 +
                    (c.hidden_size + c.intermediate_size) * 3);
  in.host_bytes = (uint64_t{125} << 30) - (uint64_t{1} << 30) * static_cast<uint64_t>(me);
  const double free_gib = 20.0 + 16.0 * me / (W - 1);
  auto fields = [](const qt::MicroDecision& d) {
    return qt::plan_fields(d.decision.plan).dump() + " micro " + std::to_string(d.micro_batch) + " budget " +
           std::to_string(d.decision.budget_gib);
  };
  // Each rank alone would run another plan: the case the agreement is for.
  const qt::MicroDecision own = qt::decide_micro_batch(in, {}, free_gib, 8, 0);
  CHECK(qt::test::caught([&] { qt::check_same_across_ranks(*comm, fields(own), "plan"); }));
  // Decided across the ranks: one plan, that of rank 0's free memory (the least) and the last rank's host (the least).
  qt::PlanInputs rank0_host = in;
  rank0_host.host_bytes = (uint64_t{125} << 30) - (uint64_t{1} << 30) * static_cast<uint64_t>(W - 1);
  const qt::MicroDecision agreed = qt::decide_plan_across_ranks(*comm, in, {}, free_gib, 8, 0);
  qt::check_same_across_ranks(*comm, fields(agreed), "plan");
  CHECK(fields(agreed) == fields(qt::decide_micro_batch(rank0_host, {}, 20.0, 8, 0)));
}

TEST_CASE("an mpi collective that a peer does not join times out with the rank and the collective", "[.mpi]") {
  const qt::LaunchEnv env = qt::read_launch_env();
  // Only rank 0 is impatient: the others' late call must not time out while rank 0 catches up with it.
  qt::MpiCommunicator slow(env.rank == 0 ? qt::CommOptions{std::chrono::milliseconds(500)} : kTestOptions);
  qt::MpiCommunicator other(kTestOptions);
  at::Tensor t = at::ones({16});
  if (env.rank == 0) {
    auto e = qt::test::caught([&] { slow.all_reduce(t); });
    REQUIRE(e);
    INFO(e->what());
    CHECK(e->kind() == qt::ErrorKind::Device);
    CHECK(contains(e->what(), "rank 0: mpi all_reduce"));
    CHECK(contains(e->what(), "did not complete"));
    auto again = qt::test::caught([&] { slow.barrier(); });
    REQUIRE(again);
    CHECK(contains(again->what(), "unusable"));
  } else {
    // Joins late, so that rank 0's abandoned all-reduce completes (while rank 0 waits in the barrier below)
    // and the communicators can be freed cleanly.
    std::this_thread::sleep_for(std::chrono::milliseconds(2000));
    slow.all_reduce(t);
    CHECK(t.sum().item<float>() == 16.0f * static_cast<float>(env.world_size));
  }
  other.barrier();
}

TEST_CASE("torchrun ranks share rank 0's value through the TCPStore; CPU collectives need mpirun", "[.torchrun]") {
  const qt::LaunchEnv env = qt::read_launch_env();
  REQUIRE(env.launcher == qt::Launcher::Torchrun);
  REQUIRE(env.world_size >= 2);
  CHECK(env.local_world_size == env.world_size);  // one host: every rank is local (LOCAL_WORLD_SIZE)
  qt::StoreRendezvous store(env, std::chrono::seconds(60));
  // Rank 0's value is random: no other rank can know it except through the store.
  std::string mine(128, '\0');
  std::random_device rd;
  for (char& c : mine) c = static_cast<char>(rd());
  const std::string got = store.broadcast("test/unique_id", mine);
  if (env.rank == 0) CHECK(got == mine);
  CHECK(got.size() == 128);
  // Each rank shows every other what it received.
  store.set("test/echo/" + std::to_string(env.rank), got);
  for (int r = 0; r < env.world_size; ++r) CHECK(store.get("test/echo/" + std::to_string(r)) == got);
  store.broadcast("test/done", "");  // a serving rank 0 keeps the store up until every rank is through

  auto e = qt::test::caught([&] { qt::make_communicator(env, at::kCPU); });
  REQUIRE(e);
  INFO(e->what());
  CHECK(e->kind() == qt::ErrorKind::Usage);
  CHECK(contains(e->what(), "CPU collectives need mpirun"));
  CHECK(contains(e->what(), "rank " + std::to_string(env.rank)));
}

TEST_CASE("nccl collectives on CUDA tensors match their arithmetic", "[gpu]") {
  auto comm = qt::make_communicator(qt::read_launch_env(), at::Device(at::kCUDA), kTestOptions);
  REQUIRE(std::string(comm->backend()) == "nccl");
  REQUIRE(comm->device().is_cuda());
  check_collectives(*comm);
  check_async_gathers(*comm);
  comm->barrier();
  qt::check_same_across_ranks(*comm, "same everywhere", "fingerprint");
}
