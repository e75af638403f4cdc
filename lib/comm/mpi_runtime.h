#pragma once
// RAII for the MPI library's process-wide state. MPI may be initialized once per process and never again after
// MPI_Finalize, so the object that initializes it must live as long as anything uses MPI: a program that makes
// several communicators one after another (the test driver) holds one MpiRuntime in main(); a communicator
// also holds one, which initializes MPI only when nobody has yet and then finalizes it when the communicator
// goes. No mpi.h here: CPU-only code includes this header.
#include "lib/comm/launch_env.h"

namespace qt {

class MpiRuntime {
 public:
  // Initializes MPI (thread level FUNNELED: only the thread that made the communicator calls MPI) unless it
  // already is. Throws qt::Error(Device) if MPI was finalized already or initialization fails.
  MpiRuntime();
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  bool owns_init() const { return owns_; }

 private:
  bool owns_ = false;
};

// Throws qt::Error(Usage) unless MPI (initialized) put this process where mpirun's variables in `env` say: a process
// started without mpirun but with OMPI_COMM_WORLD_SIZE=2 in its environment is a world of its own (MPI's singleton).
void check_mpi_world(const LaunchEnv& env);

}  // namespace qt
