#include "test_util.hpp"

#include <rlhf/runtime.hpp>

TEST_CASE("configure_runtime names the malloc the process runs on and tunes only glibc's") {
  const auto info = rlhf::configure_runtime({.threads = 2});
  CHECK(info.threads == 2);
  CHECK(torch::get_num_threads() == 2);
#ifdef RLHF_TESTS_TCMALLOC  // tests/CMakeLists.txt: the test program links tcmalloc
  CHECK(info.allocator == "tcmalloc");
  CHECK_FALSE(info.malloc_tuned);  // nothing to tune
#else
  CHECK(info.allocator == "glibc");
  CHECK(info.malloc_tuned);
#endif
  CHECK_FALSE(rlhf::configure_runtime({.threads = 2, .keep_memory = false}).malloc_tuned);
}
