// Test runner for the launched lib/dist tests (tests/test_dist_launched.cpp): run by ctest under mpirun and
// torchrun. It exists apart from qt_tests because MPI can be initialized once per process only: main() holds
// the MPI runtime for the whole run, so that every test case can make and drop its own communicators.
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <ATen/Parallel.h>

#include <iostream>
#include <memory>

#include "lib/core/error.h"
#include "lib/comm/launch_env.h"
#include "lib/comm/mpi_runtime.h"

int main(int argc, char* argv[]) {
  // Several ranks share the machine's cores: one intra-op thread each.
  at::set_num_threads(1);
  try {
    const qt::LaunchEnv env = qt::read_launch_env();
    std::unique_ptr<qt::MpiRuntime> mpi;
    if (env.launcher == qt::Launcher::Mpirun) mpi = std::make_unique<qt::MpiRuntime>();
    return Catch::Session().run(argc, argv);
  } catch (const qt::Error& e) {
    std::cerr << qt::kind_name(e.kind()) << ": " << e.what() << "\n";
    return qt::exit_code(e.kind());
  }
}
