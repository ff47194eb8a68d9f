#include "test_util.hpp"

#include <fstream>
#include <regex>
#include <sstream>

#include <rlhf/config/config_file.hpp>
#include <rlhf/config/library_fields.hpp>

namespace {

using rlhf::Error;
using rlhf::config::apply_override;
using rlhf::config::bind_config;
using rlhf::config::describe_fields;
using rlhf::config::FieldInfo;
using rlhf::config::load_config_file;
using rlhf::config::to_json_config;
using nlohmann::json;

void write_file(const std::filesystem::path& path, std::string_view text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

/// The message of the rlhf::Error that `f` throws ("" when it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

/// Names of the data members declared in `struct name { ... };` of a library header: lines indented by two spaces
/// that declare one variable (no parentheses), e.g. "  int64_t batch_size = 32;  ///< samples per phase".
std::vector<std::string> declared_fields(const std::string& header, const std::string& name) {
  const auto path = std::filesystem::path(__FILE__).parent_path().parent_path() / "include" / "rlhf" / header;
  std::ifstream in(path);
  REQUIRE_MESSAGE(in.is_open(), "cannot open " << path);
  std::stringstream text;
  text << in.rdbuf();
  const std::string source = text.str();
  const auto begin = source.find("struct " + name + " {");
  REQUIRE_MESSAGE(begin != std::string::npos, "no struct " << name << " in " << path);
  const auto end = source.find("\n};", begin);
  std::istringstream body(source.substr(begin, end - begin));
  static const std::regex member(R"(^  [A-Za-z_][\w:<>, ]*[\w>]\s+([A-Za-z_]\w*)\s*(=[^;]*)?;\s*$)");
  std::vector<std::string> fields;
  std::string line;
  std::getline(body, line);  // "struct name {"
  while (std::getline(body, line)) {
    std::smatch match;
    line = line.substr(0, line.find("//"));  // comments may hold parentheses
    if (line.find('(') == std::string::npos && std::regex_match(line, match, member)) fields.push_back(match[1]);
  }
  return fields;
}

template <class T>
std::vector<std::string> listed_fields() {
  const json written = to_json_config(T{});
  std::vector<std::string> keys;
  for (const auto& [key, value] : written.items()) keys.push_back(key);
  return keys;
}

std::vector<std::string> sorted(std::vector<std::string> keys) {
  std::sort(keys.begin(), keys.end());
  return keys;
}

}  // namespace

// A small config of every supported field type, for the binder's behaviour beyond the library's structs.
namespace rlhf::test::config_demo {

enum class Mode { fast, careful };

constexpr auto enum_names(Mode) {
  using Name = std::pair<std::string_view, Mode>;
  return std::array{Name{"fast", Mode::fast}, Name{"careful", Mode::careful}, Name{"slow", Mode::careful}};
}

struct Inner {
  bool on = false;
  int32_t depth = 3;
};

template <class V>
void visit_fields(Inner& c, V&& v) {
  v("on", c.on, "switch it on");
  v("depth", c.depth);
}

struct Demo {
  uint8_t level = 1;
  float ratio = 0.5f;
  std::filesystem::path out = "runs/demo";
  std::vector<std::string> tags;
  std::optional<int64_t> limit;
  Mode mode = Mode::fast;
  Inner inner;
  std::vector<Inner> layers;
};

template <class V>
void visit_fields(Demo& c, V&& v) {
  v("level", c.level, "verbosity, 0 to 255");
  v("ratio", c.ratio, "share of the data");
  v("out", c.out, "output folder");
  v("tags", c.tags);
  v("limit", c.limit, "stop after this many; unset = never");
  v("mode", c.mode);
  v("inner", c.inner);
  v("layers", c.layers);
}

}  // namespace rlhf::test::config_demo

TEST_SUITE("config") {

TEST_CASE("config: a TOML file and a JSON file with the same content load to the same JSON") {
  rlhf::test::TempDir dir;
  write_file(dir / "run.toml", R"(# the ppo subcommand
model = "out/model"
steps = 3

[ppo]
base_lr = 1e-5
batch_size = 16
precision = "bf16"
reward_clip = 5.0
normalize_reward = false

[ppo.freeze]
first_blocks = 2

[data]
prompts = ["This is", "Once upon"]
weights = [1, 2.5]
)");
  write_file(dir / "run.json", R"({
  "model": "out/model",
  "steps": 3,
  "ppo": {"base_lr": 1e-5, "batch_size": 16, "precision": "bf16", "reward_clip": 5.0, "normalize_reward": false,
          "freeze": {"first_blocks": 2}},
  "data": {"prompts": ["This is", "Once upon"], "weights": [1, 2.5]}
})");
  const json from_toml = load_config_file(dir / "run.toml");
  const json from_json = load_config_file(dir / "run.json");
  CHECK(from_toml == from_json);
  CHECK(from_toml.at("steps").is_number_integer());
  CHECK(from_toml.at("ppo").at("reward_clip").is_number_float());
  CHECK(from_toml.at("data").at("weights") == json::array({1, 2.5}));

  rlhf::PPOConfig ppo;
  bind_config(from_toml.at("ppo"), ppo, "run.toml", "ppo");
  CHECK(ppo.base_lr == 1e-5);
  CHECK(ppo.batch_size == 16);
  CHECK(ppo.precision == rlhf::Precision::bf16);
  CHECK(ppo.reward_clip == std::optional<double>(5.0));
  CHECK(ppo.normalize_reward == false);
  CHECK(ppo.freeze.first_blocks == 2);
  CHECK(ppo.freeze.embeddings == false);  // not in the file: default kept
  CHECK(ppo.total_phases == 200);
  CHECK(ppo.prefix == "This is");
}

TEST_CASE("config: TOML errors name file:line:column") {
  rlhf::test::TempDir dir;
  const std::string path = (dir / "run.toml").string();

  SUBCASE("syntax error: toml++'s description at the position") {
    write_file(path, "model = \"x\"\nsteps = = 3\n");
    const std::string message = error_of([&] { load_config_file(path); });
    CHECK(message.starts_with(path + ":2:9: "));
    CHECK(message.find("could not determine value type") != std::string::npos);
  }
  SUBCASE("redefined table") {
    write_file(path, "[ppo]\nseed = 1\n[ppo]\n");
    const std::string message = error_of([&] { load_config_file(path); });
    CHECK(message.starts_with(path + ":3:1: "));
    CHECK(message.find("'ppo'") != std::string::npos);
  }
  SUBCASE("inf and nan are refused with the key") {
    write_file(path, "[ppo]\nkl_coef = inf\n");
    CHECK_THROWS_WITH_AS(load_config_file(path),
                         (path + ":2:11: key 'ppo.kl_coef': inf is not supported in a config file (JSON cannot "
                                 "hold inf or nan)")
                             .c_str(),
                         Error);
    write_file(path, "[ppo]\nkl_coef = nan\n");
    CHECK_THROWS_WITH_AS(load_config_file(path),
                         (path + ":2:11: key 'ppo.kl_coef': nan is not supported in a config file (JSON cannot "
                                 "hold inf or nan)")
                             .c_str(),
                         Error);
  }
  SUBCASE("dates and times are refused with the key") {
    write_file(path, "[run]\nstarted = 1979-05-27T07:32:00Z\n");
    CHECK_THROWS_WITH_AS(load_config_file(path),
                         (path + ":2:11: key 'run.started': dates and times are not supported in a config file "
                                 "---> HINT: quote the value to make it a string")
                             .c_str(),
                         Error);
    write_file(path, "list = [1, 1979-05-27]\n");
    CHECK_THROWS_WITH_AS(load_config_file(path),
                         (path + ":1:12: key 'list[1]': dates and times are not supported in a config file "
                                 "---> HINT: quote the value to make it a string")
                             .c_str(),
                         Error);
  }
}

TEST_CASE("config: JSON errors name file:line:column") {
  rlhf::test::TempDir dir;
  const std::string path = (dir / "run.json").string();

  SUBCASE("syntax error: line and column from nlohmann's byte offset") {
    write_file(path, "{\n  \"model\": \"x\",\n  \"steps\" 3\n}");
    CHECK_THROWS_WITH_AS(load_config_file(path),
                         (path + ":3:11: syntax error while parsing object separator - unexpected number literal; "
                                 "expected ':'")
                             .c_str(),
                         Error);
  }
  SUBCASE("comments are not JSON, with a hint") {
    write_file(path, "{\n  // the model\n  \"model\": \"x\"\n}");
    const std::string message = error_of([&] { load_config_file(path); });
    CHECK(message.starts_with(path + ":2:3: syntax error while parsing object key"));
    CHECK(message.ends_with(" ---> HINT: JSON config files cannot hold comments; use a .toml file to comment"));
  }
  SUBCASE("the top level must be an object") {
    write_file(path, "[1, 2]");
    CHECK_THROWS_WITH_AS(load_config_file(path),
                         (path + ": expected a JSON object at the top level, got array [1,2]").c_str(), Error);
  }
}

TEST_CASE("config: unsupported extensions and missing files") {
  rlhf::test::TempDir dir;
  const std::string yaml = (dir / "run.yaml").string();
  write_file(yaml, "model: x\n");
  CHECK_THROWS_WITH_AS(load_config_file(yaml),
                       (yaml + ": unsupported config file extension '.yaml' (expected .toml or .json)").c_str(),
                       Error);
  const std::string missing = (dir / "missing.toml").string();
  CHECK_THROWS_WITH_AS(load_config_file(missing), (missing + ": no such config file").c_str(), Error);
  write_file(dir / "UPPER.TOML", "a = 1\n");
  CHECK(load_config_file(dir / "UPPER.TOML") == json{{"a", 1}});
}

TEST_CASE("config: command-line overrides") {
  json config = {{"ppo", {{"seed", 1}}}, {"model", "gpt2"}};

  SUBCASE("values are JSON literals when they parse") {
    apply_override(config, "ppo.base_lr=1e-5");
    apply_override(config, "ppo.stop_at_eos=true");
    apply_override(config, "ppo.reward_clip=null");
    apply_override(config, "data.weights=[1, 2.5]");
    apply_override(config, "ppo.prefix=\"42\"");
    CHECK(config.at("ppo").at("base_lr") == json(1e-5));
    CHECK(config.at("ppo").at("base_lr").is_number_float());
    CHECK(config.at("ppo").at("stop_at_eos") == json(true));
    CHECK(config.at("ppo").at("reward_clip").is_null());
    CHECK(config.at("data").at("weights") == json::array({1, 2.5}));
    CHECK(config.at("ppo").at("prefix") == json("42"));
    CHECK(config.at("ppo").at("seed") == json(1));  // siblings kept
  }
  SUBCASE("other values are plain strings") {
    apply_override(config, "model=out/model");
    apply_override(config, "ppo.prefix=Once upon a time");
    apply_override(config, "empty=");
    apply_override(config, "ppo.seed=7");  // later overrides win
    CHECK(config.at("model") == json("out/model"));
    CHECK(config.at("ppo").at("prefix") == json("Once upon a time"));
    CHECK(config.at("empty") == json(""));
    CHECK(config.at("ppo").at("seed") == json(7));
  }
  SUBCASE("intermediate tables are created, also in an empty config") {
    json empty;
    rlhf::config::apply_overrides(empty, {"a.b.c=3", "a.b.d=x", "a.e==y"});
    CHECK(empty == json{{"a", {{"b", {{"c", 3}, {"d", "x"}}}, {"e", "=y"}}}});
  }
  SUBCASE("errors name the override") {
    CHECK_THROWS_WITH_AS(apply_override(config, "ppo.seed"),
                         "override 'ppo.seed': expected key=value, e.g. ppo.base_lr=1e-5", Error);
    CHECK_THROWS_WITH_AS(apply_override(config, "=3"), "override '=3': the key before '=' is empty", Error);
    CHECK_THROWS_WITH_AS(apply_override(config, "ppo..seed=3"),
                         "override 'ppo..seed=3': key 'ppo..seed' has an empty segment", Error);
    CHECK_THROWS_WITH_AS(apply_override(config, "model.name=x"),
                         "override 'model.name=x': 'model' is string \"gpt2\", not a table", Error);
  }
}

TEST_CASE("config: unknown keys are errors with a did-you-mean hint") {
  rlhf::PPOConfig ppo;
  CHECK_THROWS_WITH_AS(bind_config(json{{"base_lrr", 1e-5}}, ppo, "run.toml", "ppo"),
                       "run.toml: unknown key 'ppo.base_lrr' ---> HINT: did you mean 'ppo.base_lr'?", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"gama", 0.99}}, ppo, "run.toml", "ppo"),
                       "run.toml: unknown key 'ppo.gama' ---> HINT: did you mean 'ppo.gamma'?", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"lora", {{"alpha", 16}}}}, ppo, "run.toml"),
                       "run.toml: unknown key 'lora' ---> HINT: the known keys are: seed, total_phases, batch_size, "
                       "num_minibatches, batches_per_learning_phase, base_lr, head_lr, weight_decay, max_grad_norm, "
                       "warmup_steps, final_scale, clip_coef, vf_coef, ent_coef, gen_len, temperature, top_k, top_p, "
                       "stop_at_eos, prefix, prepend_bos, kl_coef, normalize_reward, reward_scale, reward_clip, "
                       "gamma, lambda, whiten_advantages, clip_value, kl_placement, kl_estimator, target_kl, "
                       "train_dropout, precision, reference_bf16, recompute_old_logprobs, freeze, "
                       "layer_lr_decay",
                       Error);
  rlhf::LoRAOptions lora;
  CHECK_THROWS_WITH_AS(bind_config(json{{"rank", 8}}, lora, "run.json", "lora"),
                       "run.json: unknown key 'lora.rank' ---> HINT: the keys of 'lora' are: alpha, dropout", Error);
  CHECK(ppo.gamma == 1.0);  // a failed bind changes nothing
}

TEST_CASE("config: wrong types are errors naming the key, the expected type and the value") {
  rlhf::PPOConfig ppo;
  CHECK_THROWS_WITH_AS(bind_config(json{{"batch_size", "32"}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.batch_size': expected an integer, got string \"32\"", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"base_lr", "fast"}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.base_lr': expected a number, got string \"fast\"", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"stop_at_eos", 1}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.stop_at_eos': expected a boolean (true or false), got integer 1", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"prefix", 42}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.prefix': expected a string, got integer 42 ---> HINT: quote it: "
                       "ppo.prefix=\"42\" in TOML, or ppo.prefix='\"42\"' on the command line",
                       Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"freeze", true}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.freeze': expected a table, got boolean true", Error);
  CHECK_THROWS_WITH_AS(bind_config(json::array({1}), ppo, "run.toml"),
                       "run.toml: expected a table of keys at the top level, got array [1]", Error);
  CHECK(ppo.batch_size == 32);
}

TEST_CASE("config: integers: floats with a fraction, range of the field type, negatives for unsigned") {
  rlhf::PPOConfig ppo;
  CHECK_THROWS_WITH_AS(bind_config(json{{"batch_size", 1.5}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.batch_size': expected an integer, got float 1.5", Error);
  bind_config(json{{"batch_size", 2.0}}, ppo, "run.toml", "ppo");
  CHECK(ppo.batch_size == 2);
  CHECK_THROWS_WITH_AS(bind_config(json{{"seed", -1}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.seed': expected an integer in [0, 18446744073709551615], got integer -1",
                       Error);
  bind_config(json{{"seed", 18446744073709551615ull}}, ppo, "run.json", "ppo");
  CHECK(ppo.seed == 18446744073709551615ull);
  CHECK_THROWS_WITH_AS(bind_config(json{{"batch_size", 1e19}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.batch_size': expected an integer in [-9223372036854775808, "
                       "9223372036854775807], got float 1e+19",
                       Error);
  rlhf::test::config_demo::Demo demo;
  CHECK_THROWS_WITH_AS(bind_config(json{{"level", 256}}, demo, "demo.toml"),
                       "demo.toml: key 'level': expected an integer in [0, 255], got integer 256", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"inner", {{"depth", 3000000000}}}}, demo, "demo.toml"),
                       "demo.toml: key 'inner.depth': expected an integer in [-2147483648, 2147483647], got "
                       "integer 3000000000",
                       Error);
  bind_config(json{{"level", 255}, {"ratio", 2}}, demo, "demo.toml");  // an integer is a fine float
  CHECK(demo.level == 255);
  CHECK(demo.ratio == 2.0f);
  CHECK_THROWS_WITH_AS(bind_config(json{{"ratio", 1e300}}, demo, "demo.toml"),
                       "demo.toml: key 'ratio': 1e+300 does not fit a 32-bit float", Error);
}

TEST_CASE("config: optionals: null clears, a value sets") {
  rlhf::PPOConfig ppo;
  ppo.reward_clip = 3.0;
  bind_config(json{{"reward_clip", nullptr}, {"target_kl", 0.1}}, ppo, "run.json", "ppo");
  CHECK_FALSE(ppo.reward_clip.has_value());
  CHECK(ppo.target_kl == std::optional<double>(0.1));
  CHECK_THROWS_WITH_AS(bind_config(json{{"target_kl", "off"}}, ppo, "run.json", "ppo"),
                       "run.json: key 'ppo.target_kl': expected a number, got string \"off\"", Error);
  rlhf::SamplingConfig sampling;
  bind_config(json{{"eos_id", 50256}}, sampling, "run.json", "sampling");
  CHECK(sampling.eos_id == std::optional<int64_t>(50256));
}

TEST_CASE("config: enums by name, aliases accepted, unknown names list the valid ones") {
  rlhf::PPOConfig ppo;
  bind_config(json{{"precision", "bfloat16"}, {"kl_placement", "reward"}, {"kl_estimator", "k3"}}, ppo, "run.toml",
              "ppo");
  CHECK(ppo.precision == rlhf::Precision::bf16);
  CHECK(ppo.kl_placement == rlhf::KLPlacement::reward);
  CHECK(ppo.kl_estimator == rlhf::KLEstimator::k3);
  const json written = to_json_config(ppo);
  CHECK(written.at("precision") == json("bf16"));  // the canonical name
  CHECK(written.at("kl_placement") == json("reward"));
  CHECK(written.at("kl_estimator") == json("k3"));
  CHECK_THROWS_WITH_AS(bind_config(json{{"precision", "fp16"}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.precision': 'fp16' is not one of fp32, bf16, auto", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"kl_estimator", 1}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.kl_estimator': expected one of k1, k2, k3, got integer 1", Error);
}

TEST_CASE("config: nested structs are bound with the dotted prefix in messages") {
  rlhf::PPOConfig ppo;
  CHECK_THROWS_WITH_AS(bind_config(json{{"freeze", {{"embedding", true}}}}, ppo, "run.toml", "ppo"),
                       "run.toml: unknown key 'ppo.freeze.embedding' ---> HINT: did you mean 'ppo.freeze.embeddings'?",
                       Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"freeze", {{"first_blocks", true}}}}, ppo, "run.toml", "ppo"),
                       "run.toml: key 'ppo.freeze.first_blocks': expected an integer, got boolean true", Error);
  bind_config(json{{"freeze", {{"embeddings", true}}}}, ppo, "run.toml", "ppo");
  CHECK(ppo.freeze.embeddings);
  CHECK(ppo.freeze.first_blocks == 0);

  rlhf::test::config_demo::Demo demo;
  CHECK_THROWS_WITH_AS(bind_config(json{{"layers", {{{"on", true}}, {{"depht", 2}}}}}, demo, "demo.toml"),
                       "demo.toml: unknown key 'layers[1].depht' ---> HINT: did you mean 'layers[1].depth'?", Error);
  CHECK_THROWS_WITH_AS(bind_config(json{{"tags", {"a", 2}}}, demo, "demo.toml"),
                       "demo.toml: key 'tags[1]': expected a string, got integer 2 ---> HINT: quote it: "
                       "tags[1]=\"2\" in TOML, or tags[1]='\"2\"' on the command line",
                       Error);
  bind_config(json{{"layers", {{{"on", true}}, {{"depth", 2}}}},
                   {"tags", {"a", "b"}},
                   {"out", "runs/x"},
                   {"mode", "slow"},
                   {"limit", 10}},
              demo, "demo.toml");
  REQUIRE(demo.layers.size() == 2);
  CHECK(demo.layers[0].on);
  CHECK(demo.layers[0].depth == 3);
  CHECK(demo.layers[1].depth == 2);
  CHECK(demo.tags == std::vector<std::string>{"a", "b"});
  CHECK(demo.out == std::filesystem::path("runs/x"));
  CHECK(demo.mode == rlhf::test::config_demo::Mode::careful);
  CHECK(demo.limit == std::optional<int64_t>(10));
}

TEST_CASE("config: every field of the library's structs is listed") {
  CHECK(sorted(listed_fields<rlhf::PPOConfig>()) == sorted(declared_fields("ppo/config.hpp", "PPOConfig")));
  CHECK(sorted(listed_fields<rlhf::FreezeOptions>()) ==
        sorted(declared_fields("adapters/freeze.hpp", "FreezeOptions")));
  CHECK(sorted(listed_fields<rlhf::LoRAOptions>()) == sorted(declared_fields("adapters/lora.hpp", "LoRAOptions")));
  CHECK(sorted(listed_fields<rlhf::SamplingConfig>()) ==
        sorted(declared_fields("generation/sampling.hpp", "SamplingConfig")));
  CHECK(to_json_config(rlhf::PPOConfig{}).size() == 38);
  CHECK(to_json_config(rlhf::PPOConfig{}).at("freeze").size() == 2);
  CHECK(to_json_config(rlhf::SamplingConfig{}).size() == 8);
  CHECK(to_json_config(rlhf::LoRAOptions{}).size() == 2);
}

TEST_CASE("config: a non-default PPOConfig round-trips through to_json_config, a file and bind_config") {
  rlhf::PPOConfig x;
  x.seed = 12345678901234ull;
  x.total_phases = 300;
  x.batch_size = 64;
  x.num_minibatches = 8;
  x.batches_per_learning_phase = 3;
  x.base_lr = 1.2345678901234567e-5;
  x.head_lr = 3e-4;
  x.weight_decay = 0.0;
  x.max_grad_norm = 0.5;
  x.warmup_steps = 7;
  x.final_scale = 0.25;
  x.clip_coef = 0.1;
  x.vf_coef = 0.5;
  x.ent_coef = 0.0;
  x.gen_len = 20;
  x.temperature = 0.7;
  x.top_k = 0;
  x.top_p = 0.9;
  x.stop_at_eos = true;
  x.prefix = "Once upon a \"time\"\n";
  x.prepend_bos = false;
  x.kl_coef = 0.05;
  x.normalize_reward = false;
  x.reward_scale = 2.0;
  x.reward_clip = 5.0;
  x.gamma = 0.99;
  x.lambda = 0.95;
  x.whiten_advantages = false;
  x.clip_value = 0.2;
  x.kl_placement = rlhf::KLPlacement::reward;
  x.kl_estimator = rlhf::KLEstimator::k2;
  x.target_kl = 0.1;
  x.train_dropout = true;
  x.precision = rlhf::Precision::bf16;
  x.reference_bf16 = true;
  x.recompute_old_logprobs = true;
  x.freeze.embeddings = true;
  x.freeze.first_blocks = 6;
  x.layer_lr_decay = 0.9;

  const json written = to_json_config(x);
  const json defaults = to_json_config(rlhf::PPOConfig{});
  for (const auto& [key, value] : written.items()) CHECK_MESSAGE(value != defaults.at(key), key);  // all changed

  rlhf::test::TempDir dir;
  write_file(dir / "resolved.json", written.dump(2));
  rlhf::PPOConfig y;
  bind_config(load_config_file(dir / "resolved.json"), y, "resolved.json");
  CHECK(to_json_config(y) == written);
  CHECK(y.seed == x.seed);
  CHECK(y.base_lr == x.base_lr);  // exact, not approximate
  CHECK(y.prefix == x.prefix);
  CHECK(y.reward_clip == x.reward_clip);
  CHECK(y.kl_estimator == x.kl_estimator);
  CHECK(y.freeze.first_blocks == 6);

  // The defaults are written too, and unset optionals as null, which bind back to unset.
  CHECK(defaults.at("reward_clip").is_null());
  CHECK(defaults.at("precision") == json("auto"));
  bind_config(defaults, y, "defaults.json");
  CHECK_FALSE(y.reward_clip.has_value());
  CHECK(to_json_config(y) == defaults);
}

TEST_CASE("config: describe_fields documents every key with type, default and description") {
  const auto rows = describe_fields<rlhf::PPOConfig>();
  CHECK(rows.size() == 39);  // 37 leaf fields + freeze's 2
  CHECK(rows.front() == FieldInfo{"seed", "uint64", "1", "seeds sampling and minibatch shuffling"});
  const auto find = [&](std::string_view key) {
    auto it = std::find_if(rows.begin(), rows.end(), [&](const FieldInfo& row) { return row.key == key; });
    REQUIRE(it != rows.end());
    return *it;
  };
  CHECK(find("base_lr") == FieldInfo{"base_lr", "float64", "2e-05", "learning rate of the base model"});
  CHECK(find("prefix").default_value == "\"This is\"");
  CHECK(find("reward_clip").type == "optional<float64>");
  CHECK(find("reward_clip").default_value == "null");
  CHECK(find("precision").type == "fp32 | bf16 | auto");
  CHECK(find("precision").default_value == "\"auto\"");
  CHECK(find("kl_placement").type == "reward | loss");
  CHECK(find("freeze.first_blocks") ==
        FieldInfo{"freeze.first_blocks", "int64", "0", "freeze blocks 0 .. first_blocks - 1, e.g. 6 of gpt2's 12"});

  rlhf::test::config_demo::Demo defaults;
  defaults.tags = {"x"};
  CHECK(rlhf::config::format_fields(describe_fields(defaults), "demo") ==
        "  demo.level        uint8            = 1            verbosity, 0 to 255\n"
        "  demo.ratio        float32          = 0.5          share of the data\n"
        "  demo.out          path             = \"runs/demo\"  output folder\n"
        "  demo.tags         array<string>    = [\"x\"]\n"
        "  demo.limit        optional<int64>  = null         stop after this many; unset = never\n"
        "  demo.mode         fast | careful   = \"fast\"\n"
        "  demo.inner.on     bool             = false        switch it on\n"
        "  demo.inner.depth  int32            = 3\n"
        "  demo.layers       array<table>     = []\n");
}

}  // TEST_SUITE
