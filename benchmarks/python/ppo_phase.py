#!/usr/bin/python3
"""One PPO phase in plain PyTorch eager, the baseline of benchmarks/ppo_phase (the library's PPOTrainer).

Two ways of writing the phase, both on the same GPT-2 module written here (fused q/k/v projection, fp32 layernorms,
tied vocabulary projection, an MLP value head d -> 4d -> 1 on the final-layernorm output):

  seed  the seed notebook's RLHF loop as written: sampling with a KV cache that grows by concatenation and a
        full-vocabulary categorical draw after top-k masking (TransformerLens's generate), a rollout forward that
        returns logits of every position, the reference model's full-vocabulary logits of every position stored for
        the learning epochs, log-softmax recomputed by each loss term, advantages normalised per minibatch;
  lean  the same algorithm tuned as the library's design asks: a preallocated KV cache, inverse-CDF sampling over
        the top-k candidates, log-probs gathered in chunks, only the reference's final-layernorm outputs of the
        generated positions stored (its vocabulary projection is redone per minibatch), logits only where needed.

Modes:
  phase       one PPO phase, stage by stage (generation, reward, reference, training), as ppo_phase prints it
  generation  sampling speed at batch 1 and 16: fp32 and bf16 weights, and fp32 weights under bf16 autocast
              (generation_bench's set-up)
  train-step  one learning step of a minibatch, fp32 and bf16 autocast (train_step_bench's set-up)

Runs with Debian's torch 1.13 (/usr/bin/python3); --device cuda runs on a GPU with torch 2.x (every tensor is
created there, stages are timed to the end of the GPU's work, memory is torch's CUDA allocations). torch starts with
one thread: --threads sets torch's, and the OpenMP/OpenBLAS variables are set before torch loads. glibc malloc would
hand large buffers back to the kernel after every op: the script re-executes itself with MALLOC_MMAP_MAX_=0 and
MALLOC_TRIM_THRESHOLD_ set (unless --no-malloc-tuning). Gradients are cleared with zero_grad(set_to_none=True),
torch 2.x's default (1.13's default fills them with zeros, and the next backward adds to the zeros).

  /usr/bin/python3 benchmarks/python/ppo_phase.py --variant seed|lean --precision fp32|bf16 --shape small|tiny
  /usr/bin/python3 benchmarks/python/ppo_phase.py --mode generation
  /usr/bin/python3 benchmarks/python/ppo_phase.py --mode train-step
"""

import argparse
import json
import math
import os
import re
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["phase", "generation", "train-step"], default="phase")
    p.add_argument("--variant", choices=["seed", "lean"], default="seed")
    p.add_argument("--shape", choices=["small", "tiny"], default="small")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch 2.x: the default device of every tensor)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt, BOS included")
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--phases", type=int, default=2, help="phases run; only the last is measured")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="generation mode: batch sizes")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "autocast"], default=["fp32", "bf16", "autocast"],
                   help="generation mode: fp32 or bf16 weights, or fp32 weights under bf16 autocast")
    p.add_argument("--warmup", type=int, default=3, help="train-step mode: untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="train-step mode: timed steps")
    p.add_argument("--json", dest="json_path", default="", help="also write the JSON result to this file")
    p.add_argument("--no-malloc-tuning", action="store_true")
    return p.parse_args(argv)


ARGS = parse_args()
THREADS = ARGS.threads or os.cpu_count() or 1
if not ARGS.no_malloc_tuning and "MALLOC_MMAP_MAX_" not in os.environ:
    env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 30), MALLOC_TOP_PAD_=str(64 << 20))
    env.setdefault("OMP_NUM_THREADS", str(THREADS))
    env.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import torch  # noqa: E402  (after the environment is final)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(THREADS)
DEVICE = torch.device(ARGS.device)
if DEVICE.type != "cpu":
    torch.set_default_device(DEVICE)  # models, caches, prompts and index tensors are created there


# ---- shapes, prompts, reward (the same as benchmarks/bench_util.hpp) ----

SHAPES = {
    "small": dict(vocab=50257, d=768, layers=12, heads=12),
    "tiny": dict(vocab=1024, d=64, layers=2, heads=4),
}


def byte_order():
    """GPT-2's byte-level ids: id i is byte byte_order()[i] (printable bytes first)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    return printable + [b for b in range(256) if b not in set(printable)]


BYTE_ORDER = byte_order()
BYTE_ID = {b: i for i, b in enumerate(BYTE_ORDER)}


def letter_prompts(n, length):
    """Letter j of prompt i is 'a' + (7 i + 3 j + i j) mod 26, as in bench_util.hpp."""
    return ["".join(chr(ord("a") + (7 * i + 3 * j + i * j) % 26) for j in range(length)) for i in range(n)]


def decode(ids, vocab):
    """placeholder_tokenizer()'s decoding: byte tokens, "w<id>" placeholders, <|endoftext|> last."""
    out = bytearray()
    for i in ids:
        if i < 256:
            out.append(BYTE_ORDER[i])
        elif i == vocab - 1:
            out += b"<|endoftext|>"
        else:
            out += b"w%d" % i
    return out.decode("utf-8", errors="replace")


def letter_e_share(text):
    raw = text.encode("utf-8", errors="replace")
    return raw.count(b"e") / len(raw) if raw else 0.0


# ---- memory ----


def _status_mb(field):
    with open("/proc/self/status") as f:
        m = re.search(field + r":\s+(\d+)", f.read())
    return int(m.group(1)) / 1024.0 if m else 0.0


def sync():
    """Waits for the device's queued work, so that host clocks time it (CUDA launches are asynchronous)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def rss_mb():
    """Resident memory (MiB); on a GPU, torch's allocations there."""
    return torch.cuda.memory_allocated(DEVICE) / 2**20 if DEVICE.type == "cuda" else _status_mb("VmRSS")


def peak_rss_mb():
    return torch.cuda.max_memory_allocated(DEVICE) / 2**20 if DEVICE.type == "cuda" else _status_mb("VmHWM")


def reset_peak_rss():
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---- the model ----


def layer_norm_fp32(x, ln):
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, bias, cache=None, layer=0):
        b, t, d = x.shape
        h = layer_norm_fp32(x, self.ln_1).to(x.dtype)
        q, k, v = self.c_attn(h).view(b, t, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        if cache is not None:
            k, v = cache.append(layer, k, v)  # [B, H, S, Dh]
        scores = torch.matmul(q, k.transpose(-2, -1)).float() * (1.0 / math.sqrt(self.dh))  # [B, H, T, S]
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, -1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_proj(out)
        h = layer_norm_fp32(x, self.ln_2).to(x.dtype)
        return x + self.mlp_proj(F.gelu(self.c_fc(h), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab, d, layers, heads, n_positions=1024):
        super().__init__()
        self.vocab, self.d, self.layers, self.heads = vocab, d, layers, heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_positions, d)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids, cache=None):
        """Final-layernorm output [B, T, D] (fp32). Rows are unpadded; a cache holds earlier positions."""
        b, t = ids.shape
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + t)
        bias = None
        if t > 1:
            bias = torch.full((t, past + t), float("-inf")).triu_(past + 1)  # [T, S] causal
        x = self.wte(ids) + self.wpe(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, bias, cache, i)
        if cache is not None:
            cache.advance(t)
        return layer_norm_fp32(x, self.ln_f)

    def logits(self, hidden):
        w = self.wte.weight
        return torch.matmul(hidden.to(w.dtype), w.t()).float()

    def place(self, dtype):
        self.to(dtype)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.float()
        return self


class ActorCritic(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base
        d = base.d
        self.value_head = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, 1))

    def values(self, hidden):
        return self.value_head(hidden.to(self.value_head[0].weight.dtype)).squeeze(-1).float()

    def forward(self, ids):
        """The seed's TransformerWithValueHead: logits of every position [B, T, V] and values [B, T]."""
        hidden = self.base(ids)
        return self.base.logits(hidden), self.values(hidden)


# ---- KV caches and sampling ----


class ConcatCache:
    """TransformerLens's cache: keys and values grow by torch.cat at every step."""

    def __init__(self, layers):
        self.k, self.v, self.length = [None] * layers, [None] * layers, 0

    def append(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, t):
        self.length += t


class PreallocatedCache:
    """Buffers [B, H, capacity, Dh] per layer, written in place; a step returns views."""

    def __init__(self, layers, b, heads, capacity, dh, dtype):
        self.k = [torch.empty(b, heads, capacity, dh, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(b, heads, capacity, dh, dtype=dtype) for _ in range(layers)]
        self.length = 0

    def append(self, layer, k, v):
        t = k.shape[2]
        self.k[layer][:, :, self.length : self.length + t] = k
        self.v[layer][:, :, self.length : self.length + t] = v
        return self.k[layer][:, :, : self.length + t], self.v[layer][:, :, : self.length + t]

    def advance(self, t):
        self.length += t


def sample_seed(base, prompt_ids, new_tokens, temperature=1.0, top_k=10):
    """TransformerLens's generate(): KV cache, logits of the last position, top-k by masking the full vocabulary,
    torch.distributions.Categorical (multinomial) over all V logits. Returns ids [B, P + G]."""
    cache = ConcatCache(base.layers)
    ids = prompt_ids
    hidden = base(prompt_ids, cache)
    for step in range(new_tokens):
        logits = base.logits(hidden[:, -1]) / temperature  # [B, V]
        top = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < top, float("-inf"))
        token = torch.distributions.categorical.Categorical(logits=logits).sample()  # [B]
        ids = torch.cat([ids, token[:, None]], 1)
        if step + 1 < new_tokens:
            hidden = base(token[:, None], cache)
    return ids


def sample_lean(base, prompt_ids, new_tokens, generator, temperature=1.0, top_k=10, cache_dtype=None):
    """Preallocated cache, inverse-CDF draw over the top-k candidates (cumsum + searchsorted), log-probs under the
    full softmax gathered per step. Returns ids [B, P + G] and log-probs [B, G]."""
    b, p = prompt_ids.shape
    dtype = cache_dtype or base.wte.weight.dtype
    cache = PreallocatedCache(base.layers, b, base.heads, p + new_tokens, base.d // base.heads, dtype)
    ids = torch.empty(b, p + new_tokens, dtype=torch.long)
    ids[:, :p] = prompt_ids
    logprobs = torch.empty(b, new_tokens)
    uniforms = torch.rand(new_tokens, b, generator=generator)
    hidden = base(prompt_ids, cache)
    for step in range(new_tokens):
        scaled = base.logits(hidden[:, -1]) / temperature  # [B, V]
        values, indices = scaled.topk(top_k, -1)
        cdf = torch.softmax(values, -1).cumsum(-1)  # [B, K]
        choice = torch.searchsorted(cdf, uniforms[step, :, None] * cdf[:, -1:], right=True).clamp_max_(top_k - 1)
        token = indices.gather(-1, choice).squeeze(-1)
        logprobs[:, step] = scaled.gather(-1, token[:, None]).squeeze(-1) - scaled.logsumexp(-1)
        ids[:, p + step] = token
        if step + 1 < new_tokens:
            hidden = base(token[:, None], cache)
    return ids, logprobs


# ---- the seed notebook's loss terms, as written there ----


def get_log_probs(logits, tokens, prefix_len):
    logits, tokens = logits[:, prefix_len - 1 :], tokens[:, prefix_len - 1 :]
    log_probs = logits.log_softmax(-1)
    return log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


def calc_kl_penalty(logits, ref_logits, kl_coef):
    log_probs = logits.log_softmax(-1)
    ref_log_probs = ref_logits.log_softmax(-1)
    probs = log_probs.exp()
    return kl_coef * (probs * (log_probs - ref_log_probs)).sum(-1).mean()


def calc_entropy_bonus(logits, ent_coef):
    log_probs = logits.log_softmax(-1)
    return ent_coef * (-(log_probs * log_probs.exp()).sum(-1)).mean()


def calc_value_fn_loss(values, mb_returns, vf_coef):
    return 0.5 * vf_coef * (values - mb_returns).pow(2).mean()


def calc_clipped_sur_obj(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8):
    ratio = torch.exp(logprobs - mb_logprobs)
    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + eps)
    non_clipped = ratio * mb_advantages
    clipped = torch.clip(ratio, 1 - clip_coef, 1 + clip_coef) * mb_advantages
    return torch.minimum(non_clipped, clipped).mean()


def compute_advantages(values, rewards, prefix_len):
    one_step_est = torch.cat([values[:, prefix_len:-1], rewards[:, None]], -1)
    zero_step_est = values[:, prefix_len - 1 : -1]
    return one_step_est - zero_step_est


def normalize_reward(reward, eps=1e-5):
    return (reward - reward.mean()) / (reward.std() + eps)


# ---- one phase ----

STAGES = ("generation", "reward", "reference", "training")

HP = dict(base_lr=2e-5, head_lr=5e-4, max_grad_norm=1.0, clip_coef=0.2, vf_coef=0.15, ent_coef=0.001, kl_coef=2.5,
          temperature=1.0, top_k=10, weight_decay=0.01)


def autocast(bf16):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16)


def make_optimizer(policy, maximize):
    return torch.optim.AdamW(
        [{"params": policy.base.parameters(), "lr": HP["base_lr"]},
         {"params": policy.value_head.parameters(), "lr": HP["head_lr"]}],
        weight_decay=HP["weight_decay"], maximize=maximize)


class Timer:
    """Times a stage and records its peak RSS (VmHWM reset at the start)."""

    def __init__(self, stats, name):
        self.stats, self.name = stats, name

    def __enter__(self):
        sync()
        reset_peak_rss()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        sync()
        self.stats[self.name] = dict(seconds=time.perf_counter() - self.start, peak_rss_mb=peak_rss_mb())


def phase_seed(policy, ref, optimizer, prompt_ids, a, bf16, vocab):
    """The seed notebook's rollout and learning phase."""
    stats, p, g = {}, prompt_ids.shape[1], a.new_tokens
    with Timer(stats, "generation"), torch.inference_mode(), autocast(bf16):
        sample_ids = sample_seed(policy.base, prompt_ids, g, HP["temperature"], HP["top_k"])
    with Timer(stats, "reward"):
        samples = [decode(row[p:].tolist(), vocab) for row in sample_ids]
        rewards = normalize_reward(torch.tensor([letter_e_share(s) for s in samples]))
    with Timer(stats, "reference"), torch.inference_mode(), autocast(bf16):
        logits, values = policy(sample_ids)  # [B, T, V], [B, T]
        ref_logits = ref.logits(ref(sample_ids))  # [B, T, V], stored for the learning phase
        logprobs = get_log_probs(logits / HP["temperature"], sample_ids, p)  # [B, G]
        advantages = compute_advantages(values, rewards, p)
        returns = advantages + values[:, p - 1 : -1]
        del logits
    sample_ids, ref_logits = sample_ids.clone(), ref_logits.clone()  # out of inference mode
    logprobs, advantages, returns = logprobs.clone(), advantages.clone(), returns.clone()
    with Timer(stats, "training"):
        for _ in range(a.epochs):
            for idx in torch.randperm(a.prompts).reshape(a.minibatches, -1):
                ids = sample_ids[idx]
                with autocast(bf16):
                    logits, values = policy(ids)
                    logits = logits / HP["temperature"]
                    new_logprobs = get_log_probs(logits, ids, p)
                    total = (calc_clipped_sur_obj(new_logprobs, logprobs[idx], advantages[idx], HP["clip_coef"])
                             - calc_value_fn_loss(values[:, p - 1 : -1], returns[idx], HP["vf_coef"])
                             + calc_entropy_bonus(logits[:, p - 1 : -1], HP["ent_coef"])
                             - calc_kl_penalty(logits[:, p - 1 : -1],
                                               ref_logits[idx][:, p - 1 : -1] / HP["temperature"], HP["kl_coef"]))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), HP["max_grad_norm"])
                optimizer.step()
    return stats


def chunked_logprobs(base, hidden, tokens, chunk):
    parts = []
    for s in range(0, hidden.shape[0], chunk):
        logits = base.logits(hidden[s : s + chunk]) / HP["temperature"]
        parts.append(logits.gather(-1, tokens[s : s + chunk, :, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(parts)


def phase_lean(policy, ref, optimizer, prompt_ids, a, bf16, vocab, generator):
    """The same phase with a preallocated cache, gathered log-probs, and no full-vocabulary tensor kept."""
    stats, p, g = {}, prompt_ids.shape[1], a.new_tokens
    mb = a.prompts // a.minibatches
    with Timer(stats, "generation"), torch.inference_mode(), autocast(bf16):
        cache_dtype = torch.bfloat16 if bf16 else torch.float32
        sample_ids, _ = sample_lean(policy.base, prompt_ids, g, generator, HP["temperature"], HP["top_k"], cache_dtype)
    with Timer(stats, "reward"):
        samples = [decode(row[p:].tolist(), vocab) for row in sample_ids]
        rewards = normalize_reward(torch.tensor([letter_e_share(s) for s in samples]))
    tokens = sample_ids[:, p:]
    with Timer(stats, "reference"), torch.inference_mode(), autocast(bf16):
        hidden = policy.base(sample_ids)[:, p - 1 : -1]  # [B, G, D]
        old_values = policy.values(hidden)  # [B, G]
        old_logprobs = chunked_logprobs(policy.base, hidden, tokens, mb)
        ref_hidden = ref(sample_ids)[:, p - 1 : -1].contiguous()  # [B, G, D], all that is kept of the reference
        ref_logprobs = chunked_logprobs(ref, ref_hidden, tokens, mb)
        kl = (old_logprobs - ref_logprobs).sum(1).mean().item()
        next_values = torch.cat([old_values[:, 1:], rewards[:, None]], 1)
        advantages = next_values - old_values  # one-step (gamma 1, lambda 0), whitened over the phase
        returns = advantages + old_values
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    sample_ids, tokens, ref_hidden = sample_ids.clone(), tokens.clone(), ref_hidden.clone()
    old_logprobs, old_values, advantages, returns = (t.clone() for t in (old_logprobs, old_values, advantages, returns))
    with Timer(stats, "training"):
        for _ in range(a.epochs):
            for idx in torch.randperm(a.prompts).reshape(a.minibatches, -1):
                with autocast(bf16):
                    hidden = policy.base(sample_ids[idx])[:, p - 1 : -1]  # [mb, G, D]
                    values = policy.values(hidden)
                    logp_all = (policy.base.logits(hidden) / HP["temperature"]).log_softmax(-1)  # [mb, G, V]
                    logprobs = logp_all.gather(-1, tokens[idx, :, None]).squeeze(-1)
                    probs = logp_all.exp()
                    entropy = -(probs * logp_all).sum(-1).mean()
                    ratio = torch.exp(logprobs - old_logprobs[idx])
                    adv = advantages[idx]
                    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - HP["clip_coef"], 1 + HP["clip_coef"])).mean()
                    vf = 0.5 * (values - returns[idx]).pow(2).mean()
                    with torch.no_grad():
                        ref_logp_all = (ref.logits(ref_hidden[idx]) / HP["temperature"]).log_softmax(-1)
                    kl_term = (probs * (logp_all - ref_logp_all)).sum(-1).mean()
                    loss = pg + HP["vf_coef"] * vf - HP["ent_coef"] * entropy + HP["kl_coef"] * kl_term
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), HP["max_grad_norm"])
                optimizer.step()
    stats["kl"] = kl
    return stats


def stage_flops(shape, a):
    """Matmul FLOPs per stage, counted as benchmarks/ppo_phase.cpp counts them (the work the phase needs, the same
    for every implementation), so TFLOP/s compare across implementations."""
    v, d, l = shape["vocab"], shape["d"], shape["layers"]
    b, p, g = a.prompts, a.prompt_tokens, a.new_tokens
    t, mb, updates = p + g, b / a.minibatches, a.minibatches * a.epochs

    def blocks(tokens, context):
        return 2.0 * tokens * l * (12 * d * d + 2 * context * d)

    def vocab(positions):
        return 2.0 * positions * d * v

    def head(positions):
        return 2.0 * positions * (4 * d * d + 4 * d)

    generation = blocks(b * p, p) + vocab(b * g) + head(b * g) + sum(blocks(b, p + s) for s in range(1, g))
    # the last token predicts no generated token: the forwards the phase needs cover T - 1 positions; the reference's
    # log-probs come from the training's projections of its rows
    reference = blocks(b * (t - 1), t - 1)
    forward = blocks(mb * (t - 1), t - 1) + head(mb * g) + vocab(mb * g)
    return dict(generation=generation, reward=0.0, reference=reference,
                training=updates * (3 * forward + vocab(mb * g)))


def run_phase(a):
    shape = SHAPES[a.shape]
    bf16 = a.precision == "bf16"
    runtime_mb = rss_mb()
    torch.manual_seed(a.seed)
    policy = ActorCritic(GPT2(shape["vocab"], shape["d"], shape["layers"], shape["heads"]))
    ref = GPT2(shape["vocab"], shape["d"], shape["layers"], shape["heads"])
    ref.load_state_dict(policy.base.state_dict())
    ref.requires_grad_(False)
    policy.eval()  # dropout off, as the library's learning forwards
    ref.eval()
    optimizer = make_optimizer(policy, maximize=a.variant == "seed")
    eos = shape["vocab"] - 1
    prompts = letter_prompts(a.prompts, a.prompt_tokens - 1)
    prompt_ids = torch.tensor([[eos] + [BYTE_ID[c] for c in s.encode()] for s in prompts])  # [B, P], BOS first
    generator = torch.Generator(device=DEVICE).manual_seed(a.seed)
    # Times are the last phase's; per-stage peak RSS is the first phase's (malloc keeps freed memory, so later
    # phases start at the first one's high-water mark), as in benchmarks/ppo_phase.
    first = stats = None
    peak = 0.0  # over every stage of every phase
    for phase in range(a.phases):
        if a.variant == "seed":
            stats = phase_seed(policy, ref, optimizer, prompt_ids, a, bf16, shape["vocab"])
        else:
            stats = phase_lean(policy, ref, optimizer, prompt_ids, a, bf16, shape["vocab"], generator)
        first = first or stats
        peak = max([peak] + [stats[name]["peak_rss_mb"] for name in STAGES])
    for name in STAGES:
        stats[name]["peak_rss_mb"] = first[name]["peak_rss_mb"]
    flops = stage_flops(shape, a)
    b, p, g = a.prompts, a.prompt_tokens, a.new_tokens
    t, mb = p + g, b // a.minibatches
    tokens = dict(generation=b * g, reward=b * g, reference=2 * b * t, training=a.minibatches * a.epochs * mb * t)
    out_stages = {}
    print(f"eager ppo_phase ({a.variant}): shape {a.shape}, {a.precision} on {DEVICE}, {THREADS} threads, "
          f"torch {torch.__version__}")
    print(f"{'stage':<11} {'seconds':>9} {'tokens/s':>10} {'TFLOP':>8} {'TFLOP/s':>9} {'peak MB':>9}")
    total_s = total_f = 0.0
    for name in STAGES:
        s = stats[name]["seconds"]
        total_s += s
        total_f += flops[name]
        out_stages[name] = dict(seconds=s, tokens_per_s=tokens[name] / s, tflop=flops[name] / 1e12,
                                tflops=flops[name] / s / 1e12, peak_rss_mb=stats[name]["peak_rss_mb"])
        print(f"{name:<11} {s:>9.3f} {tokens[name] / s:>10.1f} {flops[name] / 1e12:>8.3f} "
              f"{flops[name] / s / 1e12:>9.3f} {stats[name]['peak_rss_mb']:>9.0f}")
    print(f"{'phase':<11} {total_s:>9.3f} {b * g / total_s:>10.1f} {total_f / 1e12:>8.3f} "
          f"{total_f / total_s / 1e12:>9.3f} {peak:>9.0f}")
    return dict(benchmark="ppo_phase", implementation=f"eager-{a.variant}", shape=a.shape, precision=a.precision,
                device=str(DEVICE), threads=THREADS, torch=torch.__version__, prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                new_tokens=a.new_tokens, minibatches=a.minibatches, epochs=a.epochs, runtime_mb=runtime_mb,
                stages=out_stages,
                phase=dict(seconds=total_s, tflops=total_f / total_s / 1e12, peak_rss_mb=peak))


# ---- generation only (generation_bench's set-up: 16-token prompts of random ids, top-k 10) ----


def run_generation(a):
    shape = SHAPES[a.shape]
    torch.manual_seed(a.seed)
    base = GPT2(shape["vocab"], shape["d"], shape["layers"], shape["heads"]).eval()
    results = []
    print(f"eager generation: shape {a.shape}, {THREADS} threads, {a.new_tokens} new tokens")
    print(f"{'variant':<6} {'dtype':<6} {'batch':>5} {'tokens/s':>10} {'ms/step':>9}")
    # fp32 and bf16 weights, and fp32 weights under bf16 autocast (how a bf16 PPO phase samples; the lean variant
    # keeps its cache in bf16 there, as in the phase)
    for dtype_name, dtype, bf16 in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                    ("autocast", torch.float32, True)):
        if dtype_name not in a.dtype:
            continue
        base.place(dtype)
        for b in a.batch:
            prompt = torch.randint(0, shape["vocab"], (b, 16))
            for variant in ("seed", "lean"):
                def run(n):
                    with torch.inference_mode(), autocast(bf16):
                        if variant == "seed":
                            sample_seed(base, prompt, n)
                        else:
                            sample_lean(base, prompt, n, torch.Generator(device=DEVICE).manual_seed(1),
                                        cache_dtype=torch.bfloat16 if bf16 else None)
                run(2)  # warm-up
                sync()
                start = time.perf_counter()
                run(a.new_tokens)
                sync()
                s = time.perf_counter() - start
                tps = b * a.new_tokens / s
                print(f"{variant:<6} {dtype_name:<6} {b:>5} {tps:>10.1f} {1e3 * s / a.new_tokens:>9.2f}")
                results.append(dict(variant=variant, dtype=dtype_name, batch=b, tokens_per_s=tps,
                                    ms_per_step=1e3 * s / a.new_tokens))
    return dict(benchmark="generation", implementation="eager", threads=THREADS, results=results)


# ---- one learning step (train_step_bench's set-up) ----


def run_train_step(a, batch=8, seq=66, gen=50):
    shape = SHAPES[a.shape]
    torch.manual_seed(a.seed)
    policy = ActorCritic(GPT2(shape["vocab"], shape["d"], shape["layers"], shape["heads"])).eval()
    ids = torch.randint(0, shape["vocab"], (batch, seq))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    d, l, v = shape["d"], shape["layers"], shape["vocab"]
    flops = 3.0 * (2.0 * batch * seq * l * (12 * d * d + 2 * seq * d) + 2.0 * batch * gen * d * v)
    results = []
    print(f"eager train step: shape {a.shape}, batch {batch} x {seq} ({gen} scored), {THREADS} threads")
    for precision in ("fp32", "bf16"):
        def step():
            with autocast(precision == "bf16"):
                hidden = policy.base(ids)[:, seq - gen - 1 : seq - 1]
                logp = policy.base.logits(hidden).log_softmax(-1)
                picked = logp.gather(-1, ids[:, seq - gen :, None]).squeeze(-1)
                entropy = -(logp.exp() * logp).sum(-1)
                values = policy.values(hidden)
                loss = -picked.mean() - 1e-3 * entropy.mean() + values.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for _ in range(a.warmup):  # first touch of gradients, AdamW state and activations
            step()
        sync()
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        s = (time.perf_counter() - start) / a.steps
        print(f"full {precision:<6} {s:>8.3f} s/step {flops / s / 1e12:>8.3f} TFLOP/s")
        results.append(dict(model="full", precision=precision, seconds_per_step=s, tflops=flops / s / 1e12))
    return dict(benchmark="train_step", implementation="eager", threads=THREADS, results=results)


def main(a):
    result = {"phase": run_phase, "generation": run_generation, "train-step": run_train_step}[a.mode](a)
    print(json.dumps(result))
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(ARGS)
