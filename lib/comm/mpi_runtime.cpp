#include "lib/comm/mpi_runtime.h"

#include <mpi.h>

#include <exception>
#include <string>

#include "lib/core/error.h"

namespace qt {

MpiRuntime::MpiRuntime() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (finalized)
    fail(ErrorKind::Device, "MPI was finalized already and cannot be initialized again in this process; keep one "
                            "qt::MpiRuntime alive for the whole program");
  if (initialized) return;
  int provided = 0;
  if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
    fail(ErrorKind::Device, "MPI_Init_thread failed");
  owns_ = true;
}

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  // Leaving on an error (an exception unwinds through here): MPI_Finalize would wait for the other ranks, which
  // may be blocked in a collective with this one until their timeout. Exit without it instead: the launcher
  // (mpirun) then ends the whole job, naming this rank, and the error printed by main is the first thing seen.
  if (std::uncaught_exceptions() > 0) {
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) return;
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void check_mpi_world(const LaunchEnv& env) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank != env.rank || size != env.world_size)
    fail(ErrorKind::Usage, "OMPI_COMM_WORLD_RANK=" + std::to_string(env.rank) + " and OMPI_COMM_WORLD_SIZE=" +
                               std::to_string(env.world_size) + " are set, but MPI started this process as rank " +
                               std::to_string(rank) + " of " + std::to_string(size) +
                               ": the variables were set by hand or left from another job; start the ranks with "
                               "`mpirun -np " + std::to_string(env.world_size) + " qlora-train ...`");
}

}  // namespace qt
