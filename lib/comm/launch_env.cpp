#include "lib/comm/launch_env.h"

#include <cerrno>
#include <climits>
#include <cstdlib>

#include "lib/core/error.h"

namespace qt {
namespace {

bool has_env(const char* name) { return std::getenv(name) != nullptr; }

// An int within [min_value, max_value]: a value past INT_MAX (WORLD_SIZE=99999999999) wrapped in the cast to int
// before, into a negative or a small world size.
int env_int(const char* name, int min_value, int max_value = INT_MAX) {
  const char* v = std::getenv(name);
  if (!v) fail(ErrorKind::Usage, std::string("environment variable ") + name + " is not set");
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || errno == ERANGE || x < min_value || x > max_value)
    fail(ErrorKind::Usage, std::string("environment variable ") + name + "='" + v + "': expected an integer in " +
                               std::to_string(min_value) + ".." + std::to_string(max_value));
  return static_cast<int>(x);
}

std::string named(const char* name, int value) { return std::string(name) + "=" + std::to_string(value); }

}  // namespace

const char* launcher_name(Launcher launcher) {
  switch (launcher) {
    case Launcher::None: return "none";
    case Launcher::Torchrun: return "torchrun";
    case Launcher::Mpirun: return "mpirun";
  }
  return "?";
}

LaunchEnv read_launch_env() {
  LaunchEnv env;
  // torchrun always sets both; one without the other is a hand-made launch that would otherwise run as one process
  // of its own (RANK=1 alone trained a whole model as rank 0 of 1).
  if (has_env("RANK") != has_env("WORLD_SIZE"))
    fail(ErrorKind::Usage, std::string("environment variable ") + (has_env("RANK") ? "RANK" : "WORLD_SIZE") +
                               " is set but " + (has_env("RANK") ? "WORLD_SIZE" : "RANK") +
                               " is not: a torchrun-style launch sets both (or use mpirun)");
  const char* rank_var = "RANK";
  const char* world_var = "WORLD_SIZE";
  if (has_env("OMPI_COMM_WORLD_SIZE")) {
    rank_var = "OMPI_COMM_WORLD_RANK";
    world_var = "OMPI_COMM_WORLD_SIZE";
    env.launcher = Launcher::Mpirun;
    env.world_size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    env.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    env.local_rank = has_env("OMPI_COMM_WORLD_LOCAL_RANK") ? env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0) : env.rank;
    env.local_world_size =
        has_env("OMPI_COMM_WORLD_LOCAL_SIZE") ? env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1) : env.world_size;
    // mpirun's variables win; torchrun's beside them must describe the same ranks (torchrun started by mpirun
    // leaves mpirun's variables in its workers' environment: they name the torchrun agents, not the workers).
    if (has_env("RANK")) {
      const int world = env_int("WORLD_SIZE", 1), rank = env_int("RANK", 0);
      if (world != env.world_size || rank != env.rank)
        fail(ErrorKind::Usage, "both mpirun's and torchrun's variables are set and disagree: " +
                                   named("OMPI_COMM_WORLD_SIZE", env.world_size) + ", " +
                                   named("OMPI_COMM_WORLD_RANK", env.rank) + " but " + named("WORLD_SIZE", world) +
                                   ", " + named("RANK", rank) + "; start qlora-train with one launcher");
    }
  } else if (has_env("WORLD_SIZE") && has_env("RANK")) {
    env.launcher = Launcher::Torchrun;
    env.world_size = env_int("WORLD_SIZE", 1);
    env.rank = env_int("RANK", 0);
    env.local_rank = has_env("LOCAL_RANK") ? env_int("LOCAL_RANK", 0) : env.rank;
    env.local_world_size = has_env("LOCAL_WORLD_SIZE") ? env_int("LOCAL_WORLD_SIZE", 1) : env.world_size;
    const char* addr = std::getenv("MASTER_ADDR");
    if (addr && *addr == '\0')
      fail(ErrorKind::Usage, "environment variable MASTER_ADDR is empty: expected the host name or address of rank 0");
    env.master_addr = addr ? addr : "127.0.0.1";
    env.master_port = has_env("MASTER_PORT") ? env_int("MASTER_PORT", 1, 65535) : 29500;
  } else if (has_env("PMI_SIZE") && std::string(std::getenv("PMI_SIZE")) != "1") {
    // The PMI launchers (MPICH's and Intel MPI's mpiexec / mpirun, srun --mpi=pmi2) name the ranks in PMI_RANK and
    // PMI_SIZE only: each process read no launcher here and trained alone, all of them into one output_dir.
    const std::string rank = has_env("PMI_RANK") ? std::string(" PMI_RANK=") + std::getenv("PMI_RANK") : "";
    fail(ErrorKind::Usage, std::string("PMI_SIZE=") + std::getenv("PMI_SIZE") + rank +
                               ": started as one of several processes by a PMI launcher (MPICH's or Intel MPI's "
                               "mpiexec, srun --mpi=pmi2), which this build cannot join; start the ranks with Open "
                               "MPI's mpirun, or with torchrun on GPUs");
  }
  if (env.rank >= env.world_size)
    fail(ErrorKind::Usage, named(rank_var, env.rank) + " is not below " + named(world_var, env.world_size) +
                               " (launcher " + launcher_name(env.launcher) + ")");
  const char* local_rank_var = env.launcher == Launcher::Mpirun ? "OMPI_COMM_WORLD_LOCAL_RANK" : "LOCAL_RANK";
  const char* local_world_var = env.launcher == Launcher::Mpirun ? "OMPI_COMM_WORLD_LOCAL_SIZE" : "LOCAL_WORLD_SIZE";
  if (env.local_world_size > env.world_size)
    fail(ErrorKind::Usage, named(local_world_var, env.local_world_size) + " is more than " +
                               named(world_var, env.world_size) + ": a host cannot run more ranks than the job has");
  if (env.local_rank >= env.local_world_size)
    fail(ErrorKind::Usage, named(local_rank_var, env.local_rank) + " is not below " +
                               named(local_world_var, env.local_world_size) + " (launcher " +
                               launcher_name(env.launcher) + ")");
  return env;
}

}  // namespace qt
