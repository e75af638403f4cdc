// Test runner entry: Catch2 v2 needs CATCH_CONFIG_RUNNER before its header; v3 ships Catch::Session in a library.
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <ATen/Parallel.h>

int main(int argc, char* argv[]) {
  // Tests compare against references with tight bounds; a fixed thread count keeps reductions reproducible.
  at::set_num_threads(2);
  return Catch::Session().run(argc, argv);
}
