#pragma once
// Rank, world size and local rank from the launcher's environment: torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR, MASTER_PORT) or OpenMPI's mpirun (OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK). No launcher: one rank.
#include <string>

namespace qt {

enum class Launcher { None, Torchrun, Mpirun };

struct LaunchEnv {
  Launcher launcher = Launcher::None;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;  // ranks on this host (LOCAL_WORLD_SIZE / OMPI_COMM_WORLD_LOCAL_SIZE; else world_size)
  std::string master_addr;  // torchrun only
  int master_port = 0;      // torchrun only
};

// Reads the process environment; throws qt::Error(Usage) naming the variable when one is malformed.
LaunchEnv read_launch_env();
const char* launcher_name(Launcher launcher);

}  // namespace qt
