#include "test_util.hpp"

#include <rlhf/rlhf.hpp>

TEST_CASE("the umbrella header reports the library version") {
  CHECK(rlhf::kVersionMajor == 0);
  CHECK(std::string(rlhf::kVersion).rfind("0.", 0) == 0);
}
