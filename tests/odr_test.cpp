#include "test_util.hpp"

#include <rlhf/rlhf.hpp>

TEST_CASE("the umbrella header reports the library version") {
  CHECK(rlhf::kVersionMajor == 0);
  CHECK(std::string(rlhf::kVersion).rfind("0.", 0) == 0);
}

TEST_CASE("printable keeps UTF-8 and escapes the rest") {
  CHECK(rlhf::printable("caf\xc3\xa9 \xe4\xb8\xad\n\tx") == "caf\xc3\xa9 \xe4\xb8\xad  x");
  CHECK(rlhf::printable("a\xff" "b\xc3") == "a\\xffb\\xc3");
  CHECK(rlhf::printable("\xe4\xb8") == "\\xe4\\xb8");
}
