#include "test_util.hpp"

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <rlhf/pipeline/eval.hpp>
#include <rlhf/pipeline/main_job.hpp>
#include <rlhf/rlhf.hpp>

// The stages of the recipe as resumable runs (pipeline/stages.hpp, loop.hpp), the main job (main_job.hpp) and the
// `rlhf` command's config subcommands. Every run uses a tiny fresh model and data written here, so each case takes a
// few seconds on two cores.

namespace {

namespace fs = std::filesystem;
namespace pl = rlhf::pipeline;
using json = nlohmann::json;
using rlhf::test::TempDir;

const std::string kCli = RLHF_CLI_PATH;

// ---- files ----

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  REQUIRE(out.good());
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

size_t count_lines(const fs::path& path) {
  const std::string text = read_text(path);
  return static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
}

/// Runs `rlhf ARGS` with stderr merged into stdout; returns {exit status, output}.
std::pair<int, std::string> run_cli(const std::string& args) {
  std::string output;
  FILE* pipe = ::popen((kCli + " " + args + " 2>&1").c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

/// A small review-like corpus of short sentences with the lexicon's words in them (deterministic).
std::string make_corpus(size_t bytes) {
  const std::vector<std::string> subjects = {"The film", "The movie", "The story", "The plot", "The cast"};
  const std::vector<std::string> words = {"good", "bad", "great", "dull", "fun", "sad"};
  std::string text;
  uint64_t state = 12345;
  auto next = [&](size_t n) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<size_t>((state >> 33) % n);
  };
  while (text.size() < bytes)
    text += subjects[next(subjects.size())] + " was " + words[next(words.size())] + ". ";
  return text;
}

/// Word lists of the rule (data/sentiment_words.json's format).
void write_lexicon(const fs::path& path) {
  write_text(path, R"({"positive": ["good", "great", "fun"], "negative": ["bad", "dull", "sad"]})");
}

void write_prompts(const fs::path& path) {
  write_text(path, "{\"prompt\": \"The film\"}\n{\"prompt\": \"The movie\"}\n{\"prompt\": \"The story\"}\n");
}

/// `n` preference pairs: the positive continuation chosen.
void write_preferences(const fs::path& path, int n) {
  const std::vector<std::string> good = {" was good.", " was great fun.", " was great.", " was good fun."};
  const std::vector<std::string> bad = {" was bad.", " was dull.", " was sad and dull.", " was bad and sad."};
  std::string text;
  for (int i = 0; i < n; ++i) {
    json line = {{"prompt", i % 2 ? "The film" : "The movie"},
                 {"chosen", good[static_cast<size_t>(i) % good.size()]},
                 {"rejected", bad[static_cast<size_t>(i / 2) % bad.size()]}};
    text += line.dump() + "\n";
  }
  write_text(path, text);
}

/// `n` SFT examples: varied prompts, one fixed completion the model can learn.
void write_sft(const fs::path& path, int n) {
  std::string text;
  for (int i = 0; i < n; ++i)
    text += json{{"prompt", "Review " + std::to_string(i) + ":"}, {"completion", " a great film."}}.dump() + "\n";
  write_text(path, text);
}

pl::ModelShape tiny_shape() { return {.n_layer = 2, .n_head = 2, .n_embd = 32, .n_positions = 64}; }

// ---- comparisons ----

/// Wall-clock fields of a metrics line (also with the "eval_" prefix of evaluation metrics).
bool is_timing_key(std::string key) {
  if (key.starts_with("eval_")) key = key.substr(5);
  return key == "time" || key == "seconds" || key == "tokens_per_second" || key.starts_with("seconds_");
}

/// Every line of the two metrics.jsonl files has the same step, the same keys and the same numbers (timings aside).
void check_same_metrics(const fs::path& a, const fs::path& b) {
  const auto lines_a = rlhf::run::read_metrics(a), lines_b = rlhf::run::read_metrics(b);
  REQUIRE(lines_a.size() == lines_b.size());
  REQUIRE(!lines_a.empty());
  int differences = 0;
  std::string first;
  for (size_t i = 0; i < lines_a.size(); ++i) {
    const auto& x = lines_a[i];
    const auto& y = lines_b[i];
    std::set<std::string> keys_x, keys_y;
    for (const auto& [key, value] : x.items()) keys_x.insert(key);
    for (const auto& [key, value] : y.items()) keys_y.insert(key);
    if (keys_x != keys_y) {
      ++differences;
      if (first.empty()) first = fmt::format("line {}: keys differ: {} vs {}", i + 1, x.dump(), y.dump());
      continue;
    }
    for (const auto& [key, value] : x.items()) {
      if (is_timing_key(key) || !value.is_number()) continue;
      const double u = value.get<double>(), v = y[key].get<double>();
      if (!(std::abs(u - v) <= 1e-6 * std::max(1.0, std::abs(u)))) {
        ++differences;
        if (first.empty()) first = fmt::format("line {} (step {}): '{}' {} vs {}", i + 1, x["step"].dump(), key, u, v);
      }
    }
  }
  INFO(first);
  CHECK(differences == 0);
}

/// The two safetensors files hold the same tensors, bit for bit.
void check_same_weights(const fs::path& a, const fs::path& b) {
  const auto x = rlhf::load_safetensors(a), y = rlhf::load_safetensors(b);
  REQUIRE(x.size() == y.size());
  REQUIRE(!x.empty());
  for (const auto& [name, tensor] : x) {
    INFO(name);
    REQUIRE(y.count(name) == 1);
    CHECK(torch::equal(tensor, y.at(name)));
  }
}

/// The records of a JSON Lines file, parsed (a resume rewrites the lines before its checkpoint with the keys in
/// another order, so the files are compared as JSON, not as bytes).
std::vector<json> read_jsonl(const fs::path& path) {
  std::vector<json> out;
  std::istringstream in(read_text(path));
  for (std::string line; std::getline(in, line);) out.push_back(json::parse(line));
  return out;
}

std::string checkpoint_latest(const fs::path& run) { return read_text(run / "checkpoints" / "latest"); }

// ---- stage configs ----

pl::PretrainConfig pretrain_config(const TempDir& dir, const std::string& out) {
  if (!fs::exists(dir / "corpus.txt")) write_text(dir / "corpus.txt", make_corpus(6000));
  pl::PretrainConfig c;
  c.out = (dir / out).string();
  c.corpus = (dir / "corpus.txt").string();
  c.model.shape = tiny_shape();  // dropout 0.1: the resumed run must restore the RNG to match
  c.context = 16;
  c.batch_size = 4;
  c.eval_batches = 2;
  c.held_out = 0.1;
  c.train.total_steps = 12;
  c.train.warmup_steps = 2;
  c.schedule = {.log_every = 1, .eval_every = 4, .sample_every = 4, .checkpoint_every = 100, .keep_checkpoints = 0};
  c.sample_prompts = {"The film"};
  c.sampling.max_new_tokens = 8;
  return c;
}

pl::PPORunConfig ppo_config(const TempDir& dir, const std::string& out) {
  // an untrained model's samples are random bytes: single letters as words give rewards that vary
  if (!fs::exists(dir / "letters.json"))
    write_text(dir / "letters.json", R"({"positive": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m"],
                                         "negative": ["n", "o", "p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z"]})");
  if (!fs::exists(dir / "words.json")) write_lexicon(dir / "words.json");
  if (!fs::exists(dir / "prompts.jsonl")) write_prompts(dir / "prompts.jsonl");
  pl::PPORunConfig c;
  c.out = (dir / out).string();
  c.policy.shape = tiny_shape();
  c.reward.lexicon = (dir / "letters.json").string();
  c.gold = (dir / "words.json").string();
  c.prompts = (dir / "prompts.jsonl").string();
  c.ppo.total_phases = 6;
  c.ppo.batch_size = 4;
  c.ppo.num_minibatches = 2;
  c.ppo.warmup_steps = 1;
  c.ppo.gen_len = 8;
  c.schedule = {.log_every = 1, .eval_every = 0, .sample_every = 2, .checkpoint_every = 100, .keep_checkpoints = 0};
  return c;
}

pl::RewardConfig reward_config(const TempDir& dir, const std::string& out) {
  if (!fs::exists(dir / "pairs.jsonl")) write_preferences(dir / "pairs.jsonl", 40);
  pl::RewardConfig c;
  c.out = (dir / out).string();
  c.model.shape = tiny_shape();
  c.data = (dir / "pairs.jsonl").string();
  c.max_length = 24;
  c.held_out = 0.2;
  c.batch_size = 4;
  c.normalise_on = 16;
  c.train.total_steps = 10;
  c.train.warmup_steps = 1;
  c.schedule = {.log_every = 1, .eval_every = 3, .sample_every = 0, .checkpoint_every = 100, .keep_checkpoints = 0};
  return c;
}

}  // namespace

TEST_SUITE("pipeline") {

// ---- resume equivalence ----

TEST_CASE("pipeline: a pretraining run stopped and resumed equals an uninterrupted one") {
  TempDir dir;
  auto full = pretrain_config(dir, "full");
  auto r = pl::run_pretrain(full);
  REQUIRE(r.completed);
  CHECK(r.model_dir == fs::path(full.out) / "model");

  auto split = pretrain_config(dir, "split");
  split.schedule.stop_after = 5;
  auto first = pl::run_pretrain(split);
  CHECK_FALSE(first.completed);
  CHECK(fs::is_directory(fs::path(split.out) / "checkpoints" / "step-000005"));
  CHECK(checkpoint_latest(split.out) == "step-000005\n");
  CHECK_FALSE(fs::exists(fs::path(split.out) / "model"));
  CHECK(rlhf::run::read_metrics(fs::path(split.out) / "metrics.jsonl").back()["step"] == 5);

  {  // a resume with a different learning rate is refused, naming the key
    auto changed = split;
    changed.schedule.stop_after = 0;
    changed.train.lr = 5e-3;
    CHECK_THROWS_WITH_AS(
        pl::run_pretrain(changed, true),
        ("run: " + (fs::path(split.out) / "config.json").string() +
         ": cannot resume: the configuration differs from the stored one at /train/lr (stored 0.002, given 0.005)\n"
         "---> HINT: resume with the stored run's settings, or start a new run in another folder; settings that may "
         "change on resume: /train/total_steps, /schedule")
            .c_str(),
        rlhf::Error);
  }
  {  // a new run in the stopped run's folder is refused
    CHECK_THROWS_WITH_AS(pl::run_pretrain(split, false),
                         ("run: " + split.out +
                          ": the folder already holds a run (config.json)\n---> HINT: pass --resume to continue it, "
                          "or choose another output folder")
                             .c_str(),
                         rlhf::Error);
  }

  // the refused attempts above change nothing: the resume still matches the uninterrupted run
  split.schedule.stop_after = 0;  // schedule keys may change on resume
  auto second = pl::run_pretrain(split, true);
  REQUIRE(second.completed);
  check_same_metrics(fs::path(full.out) / "metrics.jsonl", fs::path(split.out) / "metrics.jsonl");
  CHECK(read_jsonl(fs::path(full.out) / "samples.jsonl") == read_jsonl(fs::path(split.out) / "samples.jsonl"));
  check_same_weights(fs::path(full.out) / "model" / "model.safetensors",
                     fs::path(split.out) / "model" / "model.safetensors");
  CHECK(checkpoint_latest(split.out) == "step-000012\n");
}

TEST_CASE("pipeline: a PPO run stopped twice and resumed equals an uninterrupted one") {
  TempDir dir;
  auto full = ppo_config(dir, "full");
  REQUIRE(pl::run_ppo(full).completed);

  auto split = ppo_config(dir, "split");
  split.schedule.stop_after = 2;
  CHECK_FALSE(pl::run_ppo(split).completed);
  CHECK(checkpoint_latest(split.out) == "step-000002\n");
  // stop_after counts the steps of this session: 2 more after the resume
  CHECK_FALSE(pl::run_ppo(split, true).completed);
  CHECK(checkpoint_latest(split.out) == "step-000004\n");
  CHECK(fs::is_directory(fs::path(split.out) / "checkpoints" / "step-000002"));
  CHECK(fs::is_directory(fs::path(split.out) / "checkpoints" / "step-000004"));

  auto changed = split;
  changed.ppo.base_lr = 3e-4;
  CHECK_THROWS_WITH_AS(
      pl::run_ppo(changed, true),
      ("run: " + (fs::path(split.out) / "config.json").string() +
       ": cannot resume: the configuration differs from the stored one at /ppo/base_lr (stored 0.0001, given 0.0003)\n"
       "---> HINT: resume with the stored run's settings, or start a new run in another folder; settings that may "
       "change on resume: /ppo/total_phases, /schedule")
          .c_str(),
      rlhf::Error);

  split.schedule.stop_after = 0;
  REQUIRE(pl::run_ppo(split, true).completed);
  const auto metrics = rlhf::run::read_metrics(fs::path(full.out) / "metrics.jsonl");
  REQUIRE(metrics.size() == 6);
  CHECK(metrics.back().contains("gold_mean"));
  double reward_std = 0;
  for (const auto& line : metrics) reward_std += line["reward_std"].get<double>();
  CHECK(reward_std > 0);  // the rule scored the samples differently: the policy got a learning signal
  check_same_metrics(fs::path(full.out) / "metrics.jsonl", fs::path(split.out) / "metrics.jsonl");
  CHECK(read_jsonl(fs::path(full.out) / "samples.jsonl") == read_jsonl(fs::path(split.out) / "samples.jsonl"));
  check_same_weights(fs::path(full.out) / "model" / "model.safetensors",
                     fs::path(split.out) / "model" / "model.safetensors");
}

TEST_CASE("pipeline: a reward-model run stopped and resumed equals an uninterrupted one") {
  TempDir dir;
  auto full = reward_config(dir, "full");
  REQUIRE(pl::run_reward(full).completed);

  auto split = reward_config(dir, "split");
  split.schedule.stop_after = 4;
  CHECK_FALSE(pl::run_reward(split).completed);
  CHECK(fs::is_directory(fs::path(split.out) / "checkpoints" / "step-000004"));
  CHECK(checkpoint_latest(split.out) == "step-000004\n");

  auto changed = split;
  changed.max_length = 32;
  CHECK_THROWS_WITH_AS(
      pl::run_reward(changed, true),
      ("run: " + (fs::path(split.out) / "config.json").string() +
       ": cannot resume: the configuration differs from the stored one at /max_length (stored 24, given 32)\n"
       "---> HINT: resume with the stored run's settings, or start a new run in another folder; settings that may "
       "change on resume: /train/total_steps, /schedule")
          .c_str(),
      rlhf::Error);

  split.schedule.stop_after = 0;
  REQUIRE(pl::run_reward(split, true).completed);
  const auto metrics = rlhf::run::read_metrics(fs::path(full.out) / "metrics.jsonl");
  REQUIRE(metrics.size() == 10);
  CHECK(metrics.back().contains("eval_accuracy"));
  check_same_metrics(fs::path(full.out) / "metrics.jsonl", fs::path(split.out) / "metrics.jsonl");
  check_same_weights(fs::path(full.out) / "model" / "model.safetensors",
                     fs::path(split.out) / "model" / "model.safetensors");
}

// ---- TensorBoard ----

TEST_CASE("pipeline: TensorBoard holds the loss curve of metrics.jsonl") {
  TempDir dir;
  auto c = pretrain_config(dir, "run");
  c.schedule.checkpoint_every = 3;
  REQUIRE(pl::run_pretrain(c).completed);

  // loss points (step, float value) of metrics.jsonl
  auto losses_of = [](const fs::path& metrics) {
    std::vector<std::pair<int64_t, float>> out;
    for (const auto& line : rlhf::run::read_metrics(metrics))
      if (line.contains("loss")) out.emplace_back(line["step"].get<int64_t>(), line["loss"].get<float>());
    return out;
  };
  auto tensorboard_losses = [](const std::vector<rlhf::run::ScalarEvent>& events) {
    std::vector<std::pair<int64_t, float>> out;
    for (const auto& e : events)
      if (e.tag == "loss") out.emplace_back(e.step, e.value);
    return out;
  };
  const auto expected = losses_of(fs::path(c.out) / "metrics.jsonl");
  REQUIRE(expected.size() == 12);
  const auto events = rlhf::run::read_tensorboard_events(fs::path(c.out) / "tensorboard");
  CHECK(tensorboard_losses(events) == expected);
  std::set<std::string> tags;
  for (const auto& e : events) tags.insert(e.tag);
  CHECK(tags.count("eval_loss") == 1);
  CHECK(tags.count("lr") == 1);

  SUBCASE("after a crash past a checkpoint, the resumed session's file purges the later points") {
    // A session that logged steps 1-5 and checkpointed at 3 and 5; then "crash" after the checkpoint of step 3:
    // step-000005 never got written.
    auto split = pretrain_config(dir, "split");
    split.schedule.checkpoint_every = 3;
    split.schedule.stop_after = 5;
    CHECK_FALSE(pl::run_pretrain(split).completed);
    fs::remove_all(fs::path(split.out) / "checkpoints" / "step-000005");
    write_text(fs::path(split.out) / "checkpoints" / "latest", "step-000003\n");
    split.schedule.stop_after = 0;
    REQUIRE(pl::run_pretrain(split, true).completed);
    CHECK(losses_of(fs::path(split.out) / "metrics.jsonl") == expected);  // metrics.jsonl was cut back to step 3

    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(fs::path(split.out) / "tensorboard")) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    REQUIRE(files.size() == 2);
    // The second file starts with file_version, then SessionLog START at the purge step (4): TensorBoard drops the
    // earlier files' points from step 4 on.
    const auto second = rlhf::run::read_tensorboard_file(files[1]);
    REQUIRE(second.size() >= 2);
    CHECK(second[0].file_version == "brain.Event:2");
    CHECK(second[1].session_status == 1);
    CHECK(second[1].step == 4);

    // read_tensorboard_events returns the points as written, without purge semantics: steps 4 and 5 twice.
    const auto raw = tensorboard_losses(rlhf::run::read_tensorboard_events(fs::path(split.out) / "tensorboard"));
    REQUIRE(raw.size() == 14);
    std::vector<int64_t> steps;
    for (const auto& [step, value] : raw) steps.push_back(step);
    CHECK(steps == std::vector<int64_t>{1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11, 12});
    // Applying the purge as TensorBoard does (drop the first file's points at steps >= 4) gives the uninterrupted
    // curve, and the dropped points are the ones the resumed session recomputed identically.
    std::vector<std::pair<int64_t, float>> purged;
    for (size_t i = 0; i < raw.size(); ++i)
      if (!(i < 5 && raw[i].first >= 4)) purged.push_back(raw[i]);
    CHECK(purged == expected);
    CHECK(raw[3] == raw[5]);
    CHECK(raw[4] == raw[6]);
  }
}

// ---- SFT ----

TEST_CASE("pipeline: SFT learns the completions and exports a model that loads") {
  TempDir dir;
  write_sft(dir / "sft.jsonl", 48);
  pl::SFTConfig c;
  c.out = (dir / "sft").string();
  c.model.shape = tiny_shape();
  c.model.shape.dropout = 0.0;
  c.data = (dir / "sft.jsonl").string();
  c.max_length = 32;
  c.held_out = 0.2;
  c.batch_size = 8;
  c.eval_batches = 2;
  c.train.total_steps = 100;
  c.train.lr = 1e-2;
  c.train.warmup_steps = 5;
  c.schedule = {.log_every = 10, .eval_every = 5, .sample_every = 0, .checkpoint_every = 0};
  c.num_samples = 2;
  c.sampling.max_new_tokens = 8;
  auto result = pl::run_sft(c);
  REQUIRE(result.completed);

  std::vector<double> eval_losses;
  for (const auto& line : rlhf::run::read_metrics(fs::path(c.out) / "metrics.jsonl"))
    if (line.contains("eval_loss")) eval_losses.push_back(line["eval_loss"].get<double>());
  REQUIRE(eval_losses.size() == 20);
  INFO("eval loss at step 5: " << eval_losses.front() << ", at step 100: " << eval_losses.back());
  CHECK(eval_losses.back() < 0.5 * eval_losses.front());

  auto model = rlhf::GPT2<>::from_pretrained(result.model_dir);
  CHECK(model->config().n_layer == 2);
  CHECK(model->config().n_embd == 32);
  auto tokenizer = rlhf::GPT2Tokenizer::from_pretrained(result.model_dir);
  // greedy continuation of a held-in-distribution prompt: the learned completion
  auto samples = pl::detail::sample_texts(model, tokenizer, {"Review 99:"},
                                          {.max_new_tokens = 14, .temperature = 0.0, .top_k = 0});
  CHECK(samples[0]["completion"].get<std::string>() == " a great film.");
}

}  // TEST_SUITE("pipeline")

// ---- the `rlhf` command ----

namespace {

/// "--set key=value" for each pair, quoted for the shell.
std::string sets(const std::vector<std::pair<std::string, std::string>>& pairs) {
  std::string out;
  for (const auto& [key, value] : pairs) out += " --set '" + key + "=" + value + "'";
  return out;
}

/// The first line of `text` that starts with `prefix`, or "".
std::string line_starting(const std::string& text, const std::string& prefix) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.starts_with(prefix)) return line;
  return "";
}

}  // namespace

TEST_SUITE("pipeline") {

TEST_CASE("pipeline: rlhf config subcommands report bad configs and data exactly, with exit status 1") {
  TempDir dir;
  SUBCASE("an unknown key in a TOML file") {
    const auto file = dir / "run.toml";
    write_text(file, "out = \"x\"\n\n[train]\nlerning_rate = 1e-3\n");
    auto [status, out] = run_cli("pretrain " + file.string());
    CHECK(status == 1);
    CHECK(out == "rlhf: error: " + file.string() +
                     ": unknown key 'train.lerning_rate' ---> HINT: the keys of 'train' are: seed, total_steps, "
                     "batch_size, lr, weight_decay, eps, warmup_steps, final_scale, max_grad_norm, layer_lr_decay, "
                     "freeze, precision, train_dropout, loss_chunk_rows\n");
    CHECK_FALSE(fs::exists(dir / "x"));
  }
  SUBCASE("a near miss gets a suggestion") {
    const auto file = dir / "run.toml";
    write_text(file, "[schedule]\nstop_afer = 3\n");
    auto [status, out] = run_cli("pretrain " + file.string());
    CHECK(status == 1);
    CHECK(out == "rlhf: error: " + file.string() +
                     ": unknown key 'schedule.stop_afer' ---> HINT: did you mean 'schedule.stop_after'?\n");
  }
  SUBCASE("a value of the wrong type given with --set") {
    auto [status, out] = run_cli("pretrain --set train.total_steps=abc");
    CHECK(status == 1);
    CHECK(out == "rlhf: error: --set: key 'train.total_steps': expected an integer, got string \"abc\"\n");
    auto [status2, out2] = run_cli("ppo --set ppo.base_lr=true");
    CHECK(status2 == 1);
    CHECK(out2 == "rlhf: error: --set: key 'ppo.base_lr': expected a number, got boolean true\n");
  }
  SUBCASE("a malformed SFT line names the file, the line and the field") {
    const auto data = dir / "sft.jsonl";
    write_text(data, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": 3}\n");
    auto [status, out] = run_cli("sft --set data=" + data.string() + " --set out=" + (dir / "run").string());
    CHECK(status == 1);
    CHECK(out == "rlhf: error: " + data.string() + ":2: field 'completion': expected a string, got number\n");
    write_text(data, "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"c\", \"answer\": \"d\"}\n");
    auto [status2, out2] = run_cli("sft --set data=" + data.string() + " --set out=" + (dir / "run").string());
    CHECK(status2 == 1);
    CHECK(out2 == "rlhf: error: " + data.string() +
                      ":3: missing field 'completion' (expected fields: prompt, completion)\n");
    CHECK_FALSE(fs::exists(dir / "run"));  // bad data starts no run
  }
  SUBCASE("an empty preferences file") {
    const auto data = dir / "pairs.jsonl";
    write_text(data, "");
    auto [status, out] = run_cli("reward --set data=" + data.string() + " --set out=" + (dir / "run").string());
    CHECK(status == 1);
    CHECK(out == "rlhf: error: " + data.string() +
                     ": no records (expected one JSON object per line with fields prompt, chosen, rejected)\n");
    CHECK_FALSE(fs::exists(dir / "run"));
  }
  SUBCASE("the pipeline refuses a stage key that it sets itself") {
    auto [status, out] = run_cli("pipeline --set out=" + (dir / "main").string() + " --set pretrain.corpus=x.txt");
    CHECK(status == 1);
    CHECK(out == "rlhf: error: pipeline: 'pretrain.corpus' is set by the pipeline (from corpus) ---> HINT: remove it, "
                 "or run the stage on its own with `rlhf pretrain`\n");
    CHECK_FALSE(fs::exists(dir / "main"));
  }
  SUBCASE("PPO without a reward") {
    auto [status, out] = run_cli("ppo --set out=" + (dir / "run").string() +
                                 sets({{"policy.shape.n_layer", "1"}, {"policy.shape.n_embd", "32"},
                                       {"policy.shape.n_head", "2"}, {"policy.shape.n_positions", "64"}}));
    CHECK(status == 1);
    CHECK(out == "rlhf: error: reward: set exactly one of reward.model (a reward-model folder) and reward.lexicon (a "
                 "word-list JSON)\n");
    CHECK_FALSE(fs::exists(dir / "run"));
  }
}

TEST_CASE("pipeline: rlhf pretrain --print-config prints a config that the command reads back") {
  TempDir dir;
  write_text(dir / "corpus.txt", make_corpus(3000));
  const std::string overrides =
      sets({{"out", (dir / "run").string()}, {"corpus", (dir / "corpus.txt").string()}, {"context", "16"},
            {"batch_size", "4"}, {"model.shape.n_layer", "1"}, {"model.shape.n_head", "2"},
            {"model.shape.n_embd", "32"}, {"model.shape.n_positions", "64"}, {"train.total_steps", "2"},
            {"train.warmup_steps", "0"}, {"train.lr", "0.002"}, {"sampling.max_new_tokens", "4"}});
  auto [status, printed] = run_cli("pretrain --print-config" + overrides);
  REQUIRE(status == 0);
  const auto config = json::parse(printed);
  CHECK(config["train"]["lr"] == 0.002);
  CHECK(config["model"]["shape"]["n_embd"] == 32);
  CHECK(config["schedule"]["stop_after"] == 0);
  CHECK(config["sample_prompts"] == json{"The film was", "I thought the"});
  const auto file = dir / "pretrain.json";
  write_text(file, printed);

  // read back: the same resolved config, and a run
  auto [status2, reprinted] = run_cli("pretrain " + file.string() + " --print-config");
  CHECK(status2 == 0);
  CHECK(reprinted == printed);
  auto [status3, out] = run_cli("pretrain " + file.string());
  INFO(out);
  REQUIRE(status3 == 0);
  const auto metrics = rlhf::run::read_metrics(dir / "run" / "metrics.jsonl");
  REQUIRE(metrics.size() == 1);
  CHECK(metrics[0]["step"] == 2);
  CHECK(json::parse(read_text(dir / "run" / "config.json")) == config);
  CHECK(fs::exists(dir / "run" / "model" / "model.safetensors"));

  auto [status4, keys] = run_cli("pretrain --keys");
  CHECK(status4 == 0);
  const auto lr = line_starting(keys, "  train.lr ");
  CHECK(lr.find("float64") != std::string::npos);
  CHECK(lr.find("= 0.002") != std::string::npos);
  CHECK(lr.ends_with("peak learning rate"));
  CHECK(line_starting(keys, "  schedule.stop_after ").ends_with(
      "end this session after so many steps with a checkpoint (0 = run to the end)"));
}

TEST_CASE("pipeline: the main job finds its data as given, then under RLHF_DATA_DIR") {
  TempDir dir;
  write_text(dir / "words-only-here.json", R"({"positive": ["good"], "negative": ["bad"]})");
  const std::string shipped = "data/words-only-here.json";  // not under the working directory
  REQUIRE_FALSE(fs::exists(shipped));
  ::unsetenv("RLHF_DATA_DIR");
  CHECK(rlhf::pipeline::detail::locate_data_file(shipped) == shipped);  // not found: the loader names it as given
  ::setenv("RLHF_DATA_DIR", dir.path().c_str(), 1);
  CHECK(rlhf::pipeline::detail::locate_data_file(shipped) == (dir / "words-only-here.json").string());
  CHECK(rlhf::pipeline::detail::locate_data_file("words-only-here.json") == (dir / "words-only-here.json").string());
  const auto given = (dir / "words-only-here.json").string();  // an existing path is kept as it is
  CHECK(rlhf::pipeline::detail::locate_data_file(given) == given);
  CHECK(rlhf::pipeline::detail::locate_data_file("data/missing.json") == "data/missing.json");
  ::unsetenv("RLHF_DATA_DIR");
}

TEST_CASE("pipeline: rlhf pipeline runs the main job end to end, stops, resumes and skips finished stages") {
  TempDir dir;
  std::string corpus;
  for (int i = 0; corpus.size() < 4000; ++i) corpus += (i * 7 % 3 ? "The film was good. " : "The film was bad. ");
  write_text(dir / "corpus.txt", corpus);
  // "the" and "was" make the rule tell most samples of a barely trained model apart
  write_text(dir / "words.json", R"({"positive": ["good", "the"], "negative": ["bad", "was"]})");
  write_prompts(dir / "prompts.jsonl");
  // the recipe starts from a Hugging Face GPT-2 folder given on the command line, as it would from a real GPT-2
  const auto start = dir / "start-model";
  auto [init_status, init_out] =
      run_cli("init --out " + start.string() + " --layers 1 --heads 2 --width 32 --positions 64 --seed 5");
  REQUIRE_MESSAGE(init_status == 0, init_out);
  const auto out = dir / "main";
  const std::string command =
      "pipeline --model " + start.string() +
      sets({{"out", out.string()}, {"corpus", (dir / "corpus.txt").string()},
           {"prompts", (dir / "prompts.jsonl").string()}, {"lexicon", (dir / "words.json").string()},
           {"pretrain.context", "16"}, {"pretrain.batch_size", "8"},
           {"pretrain.train.total_steps", "40"}, {"pretrain.train.lr", "1e-2"},
           {"pretrain.train.warmup_steps", "2"}, {"pretrain.sampling.max_new_tokens", "8"},
           {"pairs.count", "40"}, {"pairs.batch_size", "16"}, {"pairs.sampling.max_new_tokens", "12"},
           {"reward.train.total_steps", "10"}, {"reward.train.warmup_steps", "1"},
           {"reward.batch_size", "8"}, {"reward.max_length", "32"}, {"ppo.ppo.total_phases", "4"},
           {"ppo.ppo.batch_size", "8"}, {"ppo.ppo.warmup_steps", "1"}, {"ppo.ppo.gen_len", "8"},
           {"report_samples", "8"}});

  // first session: stops after 2 PPO phases (a time-limited job)
  auto [status, first] = run_cli(command + " --set ppo.schedule.stop_after=2");
  INFO(first);
  REQUIRE(status == 130);
  CHECK(first.find("ppo: stopped (stop_after) at step 2; checkpoint written") != std::string::npos);
  CHECK(first.find("interrupted during PPO") != std::string::npos);  // stdout: the main job's result
  CHECK_FALSE(fs::exists(out / "report.md"));
  CHECK(count_lines(out / "pairs.jsonl") == 40);

  // the same command without --resume refuses to start the stopped PPO run over
  auto [status_new, refused] = run_cli(command);
  CHECK(status_new == 1);
  CHECK(refused.find("rlhf: error: run: " + (out / "ppo").string() +
                     ": the folder already holds a run (config.json)\n---> HINT: pass --resume to continue it, or "
                     "choose another output folder\n") != std::string::npos);

  // second session: finishes PPO from its checkpoint and writes the report
  auto [status2, second] = run_cli(command + " --resume");
  INFO(second);
  REQUIRE(status2 == 0);
  CHECK(second.find("ppo: resuming from " + (out / "ppo" / "checkpoints" / "step-000002").string() + " (step 2)") !=
        std::string::npos);
  CHECK(second.find("pretrain 100%") == std::string::npos);  // finished stages are skipped
  const std::string report = read_text(out / "report.md");
  CHECK(second.find(report) != std::string::npos);  // printed on stdout too
  CHECK(report.find("| phase | gold (rule) | proxy (reward model) | KL to reference |\n|---:|---:|---:|---:|\n| 1 |") !=
        std::string::npos);
  CHECK(report.find("| 4 |") != std::string::npos);
  CHECK(report.find("Reward model: held-out accuracy") != std::string::npos);
  CHECK(report.find("| before PPO |") != std::string::npos);
  for (const char* stage : {"pretrain", "reward", "ppo"}) {
    INFO(stage);
    CHECK(fs::is_regular_file(out / stage / "metrics.jsonl"));
    CHECK(fs::is_regular_file(out / stage / "plot.png"));
    CHECK(fs::is_directory(out / stage / "tensorboard"));
    CHECK(fs::is_regular_file(out / stage / "model" / "config.json"));
  }
  CHECK(rlhf::run::read_metrics(out / "ppo" / "metrics.jsonl").size() == 4);

  // third session: everything is done; the same report from the same seeds
  auto [status3, third] = run_cli(command + " --resume");
  INFO(third);
  REQUIRE(status3 == 0);
  CHECK(third.find("resuming") == std::string::npos);
  CHECK(third.find("100%") == std::string::npos);
  CHECK(read_text(out / "report.md") == report);
}

}  // TEST_SUITE("pipeline")
