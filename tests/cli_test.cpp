#include "test_util.hpp"

#include <algorithm>
#include <cstdio>

#include <sys/wait.h>
#include <fstream>

#include <rlhf/rlhf.hpp>


namespace {

/// Runs a shell command, returns {exit status, stdout}.
std::pair<int, std::string> run(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

const std::string kCli = RLHF_CLI_PATH;

}  // namespace

TEST_CASE("rlhf command line: init, tokenize, forward, generate") {
  rlhf::test::TempDir dir;
  const auto model_dir = (dir.path() / "model").string();
  auto [init_status, init_out] =
      run(kCli + " init --out " + model_dir + " --layers 2 --heads 2 --width 16 --positions 64 --seed 3 2>&1");
  REQUIRE(init_status == 0);
  auto model = rlhf::GPT2<>::from_pretrained(model_dir);
  model->eval();
  auto tokenizer = rlhf::GPT2Tokenizer::from_pretrained(model_dir);

  SUBCASE("tokenize prints the ids as a JSON array") {
    const std::string text = "héllo <|endoftext|> wörld\n";
    std::ofstream(dir.path() / "in.txt") << text;
    auto [status, out] = run(kCli + " tokenize --tokenizer " + model_dir + " < " + (dir.path() / "in.txt").string());
    REQUIRE(status == 0);
    CHECK(nlohmann::json::parse(out).get<std::vector<int64_t>>() == tokenizer.encode(text, false));
    auto [status2, out2] =
        run(kCli + " tokenize --special --tokenizer " + model_dir + " < " + (dir.path() / "in.txt").string());
    REQUIRE(status2 == 0);
    auto special = nlohmann::json::parse(out2).get<std::vector<int64_t>>();
    CHECK(special == tokenizer.encode(text, true));
    CHECK(std::count(special.begin(), special.end(), tokenizer.eos_id()) == 1);
  }
  SUBCASE("forward writes the logits") {
    const auto out_file = (dir.path() / "logits.safetensors").string();
    auto [status, out] = run(kCli + " forward --model " + model_dir + " --ids 1,2,3,200 --out " + out_file + " 2>&1");
    REQUIRE(status == 0);
    rlhf::SafetensorsFile file(out_file);
    REQUIRE(file.tensors().size() == 1);
    CHECK((file.info("logits").dtype == torch::kFloat));
    auto logits = file.load("logits");
    CHECK(logits.sizes() == torch::IntArrayRef({1, 4, 257}));
    torch::NoGradGuard no_grad;
    auto expected = model->logits(model->forward(torch::tensor({{1, 2, 3, 200}}, torch::kLong)));
    CHECK(torch::allclose(logits, expected, 1e-5, 1e-6));
  }
  SUBCASE("generate samples text") {
    auto [status, out] = run(kCli + " generate --model " + model_dir +
                             " --prompt 'Hi there' --max-new-tokens 5 --num-samples 2 --seed 1 2>/dev/null");
    REQUIRE(status == 0);
    CHECK(out.rfind("Hi there", 0) == 0);
    CHECK(std::count(out.begin(), out.end(), '\n') >= 2);
  }
  SUBCASE("errors name the problem") {
    auto [status, out] = run(kCli + " forward --model " + dir.path().string() + "/nope --ids 1 --out x 2>&1");
    CHECK(status == 1);
    CHECK(out.find("config: " + dir.path().string() + "/nope/config.json: cannot open") != std::string::npos);
  }
}
