#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "test_util.hpp"

// This translation unit and odr_test.cpp both include the umbrella header: a non-inline definition in any header
// fails the link with a duplicate symbol.
#include <rlhf/rlhf.hpp>

// Configs that leave their precision at auto run in fp32 here, so every CPU computes the same numbers (the bf16
// paths run where a test asks for bf16; "precision: auto ..." checks the resolution by device).
[[maybe_unused]] static const bool pinned_automatic_precision =
    (rlhf::set_automatic_precision(rlhf::Precision::fp32), true);
