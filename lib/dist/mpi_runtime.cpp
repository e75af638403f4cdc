#include "lib/dist/mpi_runtime.h"

#include <mpi.h>

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
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

}  // namespace qt
