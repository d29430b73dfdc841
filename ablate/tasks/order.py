"""The epoch order of data-backed tasks: each example once per epoch, shuffled per seed and epoch.

Training walks the data in epochs: each epoch takes the examples (classification) or the
windows of a fresh tiling of the token stream (language modelling) in an order shuffled per
seed and epoch by a keyed Feistel permutation, none twice, dropping the n mod batch_size left
over. The batch of step s is a function of (seed, s) alone, so a resumed run continues on
exactly the batches it would have seen (the data position is the step, which checkpoints hold).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FEISTEL_ROUNDS = 4


def permute(key: jax.Array, x: jax.Array, n: int) -> jax.Array:
    """A pseudo-random permutation of range(n), keyed by `key`, applied to the ids `x`.

    A balanced Feistel network on the smallest even bit width holding n (round function:
    threefry bits of `fold_in(round_key, half)`), with cycle walking for ids that land at or
    past n. Costs O(len(x)), not O(n): no table of n entries per step.
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.split(key, FEISTEL_ROUNDS)

    def rounds(v):
        left, right = v >> half, v & mask
        for k in round_keys:
            f = jax.vmap(lambda r, k=k: jax.random.bits(jax.random.fold_in(k, r), (), jnp.uint32))
            left, right = right, left ^ (f(right) & mask)
        return (left << half) | right

    n32 = jnp.uint32(n)
    v = rounds(x.astype(jnp.uint32))
    v = jax.lax.while_loop(
        lambda v: jnp.any(v >= n32), lambda v: jnp.where(v >= n32, rounds(v), v), v
    )
    return v.astype(jnp.int32)


def epoch_order(key: jax.Array, step: jax.Array, batch_size: int, n: int):
    """(indices (B,), epochs (B,)): the examples of training step `step` out of n.

    With n >= batch_size an epoch is n // batch_size steps of distinct examples (the rest of
    that epoch's order is dropped, a different rest each epoch); with fewer examples than a
    batch, one step holds ceil(batch_size / n) epochs, the last of them cut short. Each
    epoch's order is `permute` under `fold_in(key, epoch)`.
    """
    j = jnp.arange(batch_size)
    if n >= batch_size:
        per_epoch = n // batch_size
        epoch_B = jnp.broadcast_to(step // per_epoch, (batch_size,))
        slot_B = (step % per_epoch) * batch_size + j
    else:
        epochs_per_step = -(-batch_size // n)
        epoch_B = step * epochs_per_step + j // n
        slot_B = j % n
    index_B = jax.vmap(lambda e, s: permute(jax.random.fold_in(key, e), s[None], n)[0])(
        epoch_B, slot_B
    )
    return index_B, epoch_B
