// lib/dist in one process: the single-rank communicator, argument checks, and the launches make_communicator
// refuses before it contacts anything. The multi-process tests are in test_dist_launched.cpp.
#include <cstdlib>
#include <map>
#include <optional>

#include <unistd.h>

#include "lib/core/error.h"
#include "lib/comm/communicator.h"
#include "lib/comm/store_rendezvous.h"
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

// The launcher variables as given (the others unset) for the scope; the process's own come back after.
class LaunchVars {
 public:
  explicit LaunchVars(const std::map<std::string, std::string>& vars) {
    for (const char* name : kNames) {
      if (const char* v = std::getenv(name)) saved_[name] = v;
      ::unsetenv(name);
    }
    for (const auto& [name, value] : vars) ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~LaunchVars() {
    for (const char* name : kNames) ::unsetenv(name);
    for (const auto& [name, value] : saved_) ::setenv(name.c_str(), value.c_str(), 1);
  }

 private:
  static constexpr const char* kNames[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                           "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                                           "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE",
                                           "PMI_RANK"};
  std::map<std::string, std::string> saved_;
};

// The Usage error's message read_launch_env throws under `vars` ("" when it throws none).
std::string launch_error(const std::map<std::string, std::string>& vars) {
  LaunchVars scope(vars);
  qt::ErrorKind kind = qt::ErrorKind::Internal;
  std::string message = qt::test::error_of([] { qt::read_launch_env(); }, &kind);
  if (!message.empty() && kind != qt::ErrorKind::Usage) return "(not a usage error) " + message;
  return message;
}

}  // namespace

TEST_CASE("malformed launcher variables are usage errors naming the variable, the value and what was expected",
          "[dist]") {
  const std::map<std::string, std::string> two = {{"RANK", "0"}, {"WORLD_SIZE", "2"}};
  const auto with = [&](std::map<std::string, std::string> more) {
    for (const auto& kv : two) more.emplace(kv);
    return more;
  };
  struct Case {
    std::map<std::string, std::string> vars;
    std::vector<std::string> says;
  };
  const std::vector<Case> cases = {
      // Past INT_MAX: wrapped to 1215752191 (or -1) in the cast to int before.
      {{{"RANK", "0"}, {"WORLD_SIZE", "99999999999"}}, {"WORLD_SIZE='99999999999'", "1..2147483647"}},
      {{{"RANK", "0"}, {"WORLD_SIZE", "99999999999999999999999"}}, {"WORLD_SIZE='99999999999999999999999'"}},
      {{{"RANK", "4294967296"}, {"WORLD_SIZE", "2"}}, {"RANK='4294967296'"}},
      {{{"OMPI_COMM_WORLD_SIZE", "4294967298"}, {"OMPI_COMM_WORLD_RANK", "0"}}, {"OMPI_COMM_WORLD_SIZE='4294967298'"}},
      {{{"RANK", "x"}, {"WORLD_SIZE", "2"}}, {"RANK='x'", "0..2147483647"}},
      {{{"RANK", "-1"}, {"WORLD_SIZE", "2"}}, {"RANK='-1'"}},
      {{{"RANK", "0"}, {"WORLD_SIZE", "0"}}, {"WORLD_SIZE='0'", "1..2147483647"}},
      {{{"RANK", "2"}, {"WORLD_SIZE", "2"}}, {"RANK=2 is not below WORLD_SIZE=2"}},
      // One of the pair alone ran as a single process of its own before.
      {{{"RANK", "1"}}, {"RANK is set but WORLD_SIZE is not"}},
      {{{"WORLD_SIZE", "2"}}, {"WORLD_SIZE is set but RANK is not"}},
      // MASTER_PORT past 65535 was accepted here (and the store said only "must be in 1..65535").
      {with({{"MASTER_PORT", "70000"}}), {"MASTER_PORT='70000'", "1..65535"}},
      {with({{"MASTER_PORT", "0"}}), {"MASTER_PORT='0'", "1..65535"}},
      {with({{"MASTER_PORT", "http"}}), {"MASTER_PORT='http'"}},
      {with({{"MASTER_ADDR", ""}}), {"MASTER_ADDR is empty"}},
      {with({{"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}}), {"LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"}},
      {with({{"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "8"}}), {"LOCAL_WORLD_SIZE=8 is more than WORLD_SIZE=2"}},
      {with({{"LOCAL_RANK", "5"}}), {"LOCAL_RANK=5 is not below LOCAL_WORLD_SIZE=2"}},
      // torchrun's variables beside mpirun's must name the same ranks (a torchrun started by mpirun).
      {{{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "1"}, {"RANK", "3"}, {"WORLD_SIZE", "8"}},
       {"both mpirun's and torchrun's variables are set and disagree", "OMPI_COMM_WORLD_SIZE=2", "WORLD_SIZE=8",
        "RANK=3"}},
  };
  for (const Case& c : cases) {
    std::string vars;
    for (const auto& [k, v] : c.vars) vars += k + "=" + v + " ";
    INFO(vars);
    const std::string message = launch_error(c.vars);
    INFO(message);
    CHECK(!message.empty());
    for (const std::string& part : c.says) CHECK(has(message, part));
  }
  // A PMI launcher's ranks (MPICH / Intel MPI mpiexec, srun --mpi=pmi2) each trained alone before.
  CHECK(has(launch_error({{"PMI_SIZE", "2"}, {"PMI_RANK", "1"}}), "PMI_SIZE=2 PMI_RANK=1: started as one of several"));
  CHECK(launch_error({{"PMI_SIZE", "1"}, {"PMI_RANK", "0"}}).empty());
  // Well-formed launches read as given.
  CHECK(launch_error(with({{"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_PORT", "65535"}})).empty());
  CHECK(launch_error({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "1"}, {"RANK", "1"}, {"WORLD_SIZE", "2"}})
            .empty());
  CHECK(launch_error({}).empty());
  LaunchVars scope({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                    {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29400"}});
  const qt::LaunchEnv env = qt::read_launch_env();
  CHECK(env.launcher == qt::Launcher::Torchrun);
  CHECK((env.rank == 1 && env.world_size == 4 && env.local_rank == 1 && env.local_world_size == 2));
  CHECK((env.master_addr == "node0" && env.master_port == 29400));
}

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

TEST_CASE("a torchrun rank whose store cannot be reached fails in its timeout with one line naming the address",
          "[dist]") {
  // Rank 1 of 2: a client of rank 0's store, which nothing serves (port 1: privileged, never a store here), and of
  // a host name that does not resolve (spaces: refused by the resolver itself, without asking DNS).
  for (const std::string addr : {"127.0.0.1", "no such host"}) {
    qt::LaunchEnv env;
    env.launcher = qt::Launcher::Torchrun;
    env.rank = 1;
    env.world_size = 2;
    env.local_world_size = 2;
    env.master_addr = addr;
    env.master_port = 1;
    const auto t0 = std::chrono::steady_clock::now();
    auto e = qt::test::caught([&] { qt::StoreRendezvous store(env, std::chrono::milliseconds(500)); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    REQUIRE(e);
    INFO(e->what());
    CHECK(e->kind() == qt::ErrorKind::Device);
    CHECK(has(e->what(), "rank 1: TCPStore at " + addr + ":1: cannot connect"));
    CHECK(has(e->what(), "does not resolve") == (addr != "127.0.0.1"));
    CHECK(has(e->what(), "is rank 0 (or torchrun's agent) running at MASTER_ADDR:MASTER_PORT?"));
    // c10's message without its C++ backtrace (it filled the one error line with 20 lines of frames).
    CHECK(!has(e->what(), "frame #"));
    CHECK(!has(e->what(), "Exception raised from"));
    CHECK(seconds < 30);
  }
  // Rank 0 of 2 alone (WORLD_SIZE=2, one process started): it serves the store and gives up on the other rank in its
  // timeout, naming the key it waited for.
  qt::LaunchEnv env;
  env.launcher = qt::Launcher::Torchrun;
  env.world_size = env.local_world_size = 2;
  env.master_addr = "127.0.0.1";
  env.master_port = 20000 + static_cast<int>(::getpid() % 20000);
  qt::StoreRendezvous store(env, std::chrono::milliseconds(500));
  auto e = qt::test::caught([&] { store.broadcast("test/alone", "x"); });
  REQUIRE(e);
  INFO(e->what());
  CHECK(has(e->what(), "only 0 of 1 ranks read key 'qlora-train/none/0/test/alone' in time (500 ms); did all 2 ranks "
                       "(WORLD_SIZE) start?"));
}
