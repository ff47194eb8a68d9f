// Must not compile: a value head that cannot be built from the model width and has no forward.
#include <rlhf/rlhf.hpp>

struct NotAHead {};

int main() {
  rlhf::ActorCritic<rlhf::GPT2<>, NotAHead> policy(rlhf::GPT2<>(rlhf::GPT2Config{}));
  (void)policy;
}
