#include "lib/comm/mpi_runtime.h"

#include <mpi.h>

#include <exception>

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

}  // namespace qt
