// Must not compile: an adapter policy without make_linear / Linear.
#include <rlhf/rlhf.hpp>

struct NotAnAdapter {};

int main() {
  rlhf::GPT2<NotAnAdapter> model(rlhf::GPT2Config{});
  (void)model;
}
