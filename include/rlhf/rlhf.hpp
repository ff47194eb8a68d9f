#pragma once
/// @file Umbrella header: includes every public header of the library.

#include <rlhf/version.hpp>
#include <rlhf/detail/error.hpp>
