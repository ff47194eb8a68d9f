// Must not compile: an int is no reward. The build of this file is a test that expects the PPOTrainer's message.
#include <rlhf/rlhf.hpp>

int main() {
  using Trainer = rlhf::PPOTrainer<rlhf::ActorCritic<>, int, rlhf::FixedKL>;
  Trainer* trainer = nullptr;
  (void)trainer->phase();
}
