#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "test_util.hpp"

// This translation unit and odr_test.cpp both include the umbrella header: a non-inline definition in any header
// fails the link with a duplicate symbol.
#include <rlhf/rlhf.hpp>
