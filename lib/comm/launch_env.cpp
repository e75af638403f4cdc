#include "lib/comm/launch_env.h"

#include <cstdlib>

#include "lib/core/error.h"

namespace qt {
namespace {

bool has_env(const char* name) { return std::getenv(name) != nullptr; }

int env_int(const char* name, int min_value) {
  const char* v = std::getenv(name);
  if (!v) fail(ErrorKind::Usage, std::string("environment variable ") + name + " is not set");
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || x < min_value)
    fail(ErrorKind::Usage, std::string("environment variable ") + name + "='" + v + "': expected an integer >= " +
                               std::to_string(min_value));
  return static_cast<int>(x);
}

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
  if (has_env("OMPI_COMM_WORLD_SIZE")) {
    env.launcher = Launcher::Mpirun;
    env.world_size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    env.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    env.local_rank = has_env("OMPI_COMM_WORLD_LOCAL_RANK") ? env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0) : env.rank;
    env.local_world_size =
        has_env("OMPI_COMM_WORLD_LOCAL_SIZE") ? env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1) : env.world_size;
  } else if (has_env("WORLD_SIZE") && has_env("RANK")) {
    env.launcher = Launcher::Torchrun;
    env.world_size = env_int("WORLD_SIZE", 1);
    env.rank = env_int("RANK", 0);
    env.local_rank = has_env("LOCAL_RANK") ? env_int("LOCAL_RANK", 0) : env.rank;
    env.local_world_size = has_env("LOCAL_WORLD_SIZE") ? env_int("LOCAL_WORLD_SIZE", 1) : env.world_size;
    const char* addr = std::getenv("MASTER_ADDR");
    env.master_addr = addr ? addr : "127.0.0.1";
    env.master_port = has_env("MASTER_PORT") ? env_int("MASTER_PORT", 1) : 29500;
  }
  if (env.rank >= env.world_size)
    fail(ErrorKind::Usage, "rank " + std::to_string(env.rank) + " is not below the world size " +
                               std::to_string(env.world_size) + " (launcher " + launcher_name(env.launcher) + ")");
  return env;
}

}  // namespace qt
