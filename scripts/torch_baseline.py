"""ablate's medium bench model vs the same model as an eager PyTorch loop and in plain JAX.

#10 sets the CPU bar as "a well-written eager PyTorch loop of that shape". This script measures
ablate's training step, the same model written directly in JAX + optax (no ablate: what
XLA makes of the model, so the difference is ablate's own cost) and in eager PyTorch, in one
process, in interleaved rounds (best round of each), so the ratios hold on a noisy machine:

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # not an ablate dependency
    python scripts/torch_baseline.py [--batch 32] [--rounds 3]

Both baselines copy ablate's model (the script checks that the three parameter counts
agree): pre-norm blocks of d 256, 4 heads, 4 layers, length 256, learned position embeddings,
Q/K/V/O projections without bias, a tanh-GELU MLP of width 1024, final LayerNorm and a
vocabulary head (ablate's mqar vocabulary, 129), AdamW with gradient clipping at 1.0,
float32. Attention is the explicit softmax(QK^T) pattern as in ablate's pattern path;
`--sdpa` has PyTorch use its fused `scaled_dot_product_attention` instead. All three are
charged the same FLOPs (`ablate.bench.model_flops_per_token`), and every MFU is against one
peak: the best 2048^3 float32 matmul of either library in this run (the per-library peaks
are printed too). ablate's step also samples its batch on the device; the baselines reuse one.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import optax
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from ablate import bench
from ablate.model import Transformer

L, D, H, N = 256, 256, 4, 4


class Block(nn.Module):
    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa
        self.norm_attn, self.norm_mlp = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.register_buffer("hidden", ~torch.ones(L, L, dtype=torch.bool).tril())

    def forward(self, x):
        B = x.shape[0]
        h = self.norm_attn(x)
        q, k, v = (m(h).view(B, L, H, D // H).transpose(1, 2) for m in (self.q, self.k, self.v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
            out = scores.masked_fill(self.hidden, float("-inf")).softmax(-1) @ v
        x = x + self.o(out.transpose(1, 2).reshape(B, L, D))
        return x + self.down(F.gelu(self.up(self.norm_mlp(x)), approximate="tanh"))


class Model(nn.Module):
    def __init__(self, vocab: int, sdpa: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.pos = nn.Parameter(0.02 * torch.randn(L, D))
        self.blocks = nn.ModuleList(Block(sdpa) for _ in range(N))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def plain_jax_step(batch: int, vocab: int):
    """The same model and optimiser written directly in JAX + optax: a jitted step closure."""
    K = D // H
    keys = iter(jax.random.split(jax.random.key(0), 64))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape)

    def norm_params():  # fresh arrays each time: the step donates its buffers
        return jnp.ones(D), jnp.zeros(D)

    def layer():
        return {"n1": norm_params(), "n2": norm_params(), "up": (normal(D, 4 * D), jnp.zeros(4 * D)),
                "down": (normal(4 * D, D), jnp.zeros(D)), **{w: normal(D, D) for w in "qkvo"}}  # fmt: skip

    params = {"embed": normal(vocab, D), "pos": normal(L, D), "layers": [layer() for _ in range(N)],
              "norm": norm_params(), "head": (normal(D, vocab), jnp.zeros(vocab))}  # fmt: skip
    hidden = ~jnp.tril(jnp.ones((L, L), bool))

    def norm(x, scale_bias):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale_bias[0] + scale_bias[1]

    def loss(p, tokens, targets):
        x = p["embed"][tokens] + p["pos"]
        for w in p["layers"]:
            h = norm(x, w["n1"])
            q, k, v = ((h @ w[n]).reshape(batch, L, H, K).transpose(0, 2, 1, 3) for n in "qkv")
            scores = jnp.where(hidden, -jnp.inf, q @ k.swapaxes(-1, -2) / math.sqrt(K))
            out = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(batch, L, D)
            x = x + out @ w["o"]
            h = jax.nn.gelu(norm(x, w["n2"]) @ w["up"][0] + w["up"][1])
            x = x + h @ w["down"][0] + w["down"][1]
        logits = norm(x, p["norm"]) @ p["head"][0] + p["head"][1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(3e-3, 0.9, 0.98, weight_decay=0.01)
    )
    state = [params, opt.init(params)]
    tokens = jax.random.randint(next(keys), (batch, L), 0, vocab)
    targets = jax.random.randint(next(keys), (batch, L), 0, vocab)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(p, s):
        grads = jax.grad(loss)(p, tokens, targets)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    def step():
        state[:] = jax.block_until_ready(update(*state))

    step()  # compiles
    return step, sum(x.size for x in jax.tree.leaves(params))


def best_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sdpa", action="store_true", help="torch's fused attention kernel")
    args = parser.parse_args()

    exp = bench.experiment("medium", variant="learned", seeds=1, spd=1, dtype="float32",
                           batch=args.batch)  # fmt: skip
    shape = (exp.model.seq_len, exp.model.d_model, exp.model.n_heads, exp.model.n_layers)
    if shape != (L, D, H, N):
        raise SystemExit(f"the bench's medium shape is now {shape}: update this script")
    ours = bench.EngineRunner(exp)
    flops = bench.train_flops_per_step(exp)

    torch.manual_seed(0)
    vocab = exp.model.vocab_size
    model = Model(vocab, args.sdpa)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    tokens = torch.randint(0, vocab, (args.batch, L))
    targets = torch.randint(0, vocab, (args.batch, L))

    def torch_step():
        loss = F.cross_entropy(model(tokens).reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    a_t, b_t = torch.randn(2048, 2048), torch.randn(2048, 2048)
    jax_matmul = bench.MatmulRunner(2048, "float32")
    torch_step()  # warm-up
    plain_step, plain_count = plain_jax_step(args.batch, vocab)
    ours_count = sum(x.size for x in jax.tree.leaves(
        nnx.state(Transformer(exp.model, rngs=nnx.Rngs(0)), nnx.Param)))  # fmt: skip
    torch_count = sum(p.numel() for p in model.parameters())
    if not ours_count == plain_count == torch_count:
        raise SystemExit(f"not the same model: {ours_count} ablate, {plain_count} plain JAX and "
                         f"{torch_count} PyTorch parameters")  # fmt: skip
    best = dict.fromkeys(["ablate", "plain jax", "torch", "jax peak", "torch peak"], math.inf)
    contenders = {
        "jax peak": lambda: jax.block_until_ready(jax_matmul.dispatch()),
        "ablate": lambda: jax.block_until_ready(ours.dispatch()),
        "plain jax": plain_step,
        "torch peak": lambda: a_t @ b_t,
        "torch": torch_step,
    }
    for _ in range(args.rounds):  # interleaved rounds; each thing keeps its best
        for name, fn in contenders.items():
            # PyTorch's OpenMP threads spin for a while after their work: let them settle
            # before timing anything else.
            time.sleep(0.5)
            best[name] = min(best[name], best_seconds(fn, 5 if "peak" in name else 3))
    peak = {k: 2 * 2048**3 / best[f"{k} peak"] for k in ("jax", "torch")}
    top = max(peak.values())
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"2048^3 fp32 matmul: jax {peak['jax'] / 1e9:.0f}, torch {peak['torch'] / 1e9:.0f} "
          "GFLOP/s")  # fmt: skip
    attention = "torch sdpa" if args.sdpa else "explicit softmax pattern"
    print(f"medium model ({ours_count:,} parameters in each), batch {args.batch}, "
          f"{flops / 1e9:.0f} GFLOP per step ({attention}):")  # fmt: skip
    for name in ("ablate", "plain jax", "torch"):
        seconds = best[name]
        print(f"  {name:9s} {seconds * 1e3:7.0f} ms/step  {flops / seconds / 1e9:5.0f} GFLOP/s"
              f"  {flops / seconds / top:4.0%} of the best peak")  # fmt: skip
    print(f"  ablate step / plain JAX step: {best['ablate'] / best['plain jax']:.2f}; "
          f"ablate step / torch step: {best['ablate'] / best['torch']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
