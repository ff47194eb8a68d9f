// Precompiled header for the project's own tests, examples and benchmarks (never installed).
#pragma once
#include <torch/torch.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <CLI/CLI.hpp>
