// Must not compile: a KL controller without update(). The build of this file is a test that expects the message.
#include <rlhf/rlhf.hpp>

struct NoUpdate {
  double value() const { return 1.0; }
};

int main() {
  auto reward = rlhf::FunctionReward([](const std::string& s) { return double(s.size()); });
  using Trainer = rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), NoUpdate>;
  Trainer* trainer = nullptr;
  (void)trainer->phase();
}
