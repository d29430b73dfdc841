"""The benchmark: FLOP counts against hand counts, the --quick run end to end, bf16 compute."""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablate.ablation import recorded
from ablate.attention import MIXERS
from ablate.bench import (
    ATTENTION_KERNELS,
    AttentionCoreRunner,
    model_flops_per_token,
    train_flops_per_step,
)
from ablate.cli import main
from ablate.core import Programs
from ablate.experiment import build_experiment
from ablate.model import ModelConfig, Transformer

# d_model 8, 2 heads of K = 4, 1 layer, MLP width 32, vocab 10, length 4. Matmul weights:
# W_v, W_o 8*8 each = 128; W_q, W_k (when the heads have them) 128; MLP 2*8*32 = 512; head 8*10
# = 80. Attention per head and token: c * L * K = c * 16, for 2 heads.
HAND_COUNTS = {
    "learned": 6 * (128 + 128 + 512 + 80) + 12 * 16 * 2,  # 5472
    "uniform": 6 * (128 + 512 + 80) + 4 * 16 * 2,  # 4448: no Q/K, P V without a pattern grad
    "frozen": 6 * (128 + 512 + 80) + 4 * 128 + 12 * 16 * 2,  # 5216: W_q, W_k get no gradient
    "synthesizer": 6 * (128 + 512 + 80) + 6 * 16 * 2,  # 4512: the trained pattern's gradient
    (("learned", "uniform"),): 6 * (128 + 64 + 512 + 80) + (12 + 4) * 16,  # 4960: per head
}


def tiny_config(attention, **over) -> ModelConfig:
    return ModelConfig(
        vocab_size=10, seq_len=4, d_model=8, n_heads=2, n_layers=1, d_mlp=32,
        attention=attention, **over,
    )  # fmt: skip


@pytest.mark.parametrize("attention", list(HAND_COUNTS), ids=str)
def test_flops_per_token_match_a_hand_count(attention):
    assert model_flops_per_token(tiny_config(attention), seq_len=4) == HAND_COUNTS[attention]


def test_every_registered_variant_counts_its_own_flops():
    # Each count is the class's own: none falls back to a table kept in step by hand.
    counts = {
        name: model_flops_per_token(tiny_config(name, causal=name != "fourier"), seq_len=4)
        for name in MIXERS
    }
    assert counts["fourier"] == 6 * (128 + 512 + 80)
    assert counts["gaussian"] == counts["none"] == counts["random_fixed"] == HAND_COUNTS["uniform"]


def test_flops_per_step_scale_with_tokens_seeds_and_frozen_layers():
    exp = build_experiment(
        {
            "task": {"name": "mqar", "seq_len": 16},
            "model": {"d_model": 8, "n_heads": 2, "n_layers": 1, "d_mlp": 32},
            "train": {"batch_size": 3, "seeds": [0, 1], "steps": 10, "steps_per_dispatch": 10,
                      "log_every": 10, "eval_every": 0, "checkpoint_every": 0},
        }
    )  # fmt: skip
    V = exp.task.vocab_size
    per_token = 6 * (256 + 512 + 8 * V) + 12 * 16 * 4 * 2
    assert train_flops_per_step(exp) == per_token * 3 * 16 * 2
    # A frozen layer's weights skip their own gradient: 4 FLOPs per weight instead of 6.
    frozen = model_flops_per_token(tiny_config("learned", freeze=("layer.0",)), seq_len=4)
    assert frozen == HAND_COUNTS["learned"] - 2 * (128 + 128 + 512)


@pytest.mark.slow
def test_quick_bench_runs_end_to_end_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # learned only: its runner is the engine phase's, so the variants table costs no compile
    argv = ["bench", "--quick", "--no-probes", "--variants", "learned", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert {"date", "machine", "plan", "peak_matmul", "engine", "configs", "variants"} <= set(
        result
    )
    cpu = jax.default_backend() == "cpu"  # scripts/gpu_check.sh runs this file on a GPU too
    assert result["machine"]["backend"] == jax.default_backend()
    assert result["peak_matmul"]["flops_per_second"] > 1e8
    assert result["engine"]["dispatch"]["steps_per_dispatch"] == [1, 10]
    assert result["engine"]["seeds"]["seeds"] == 2
    rows = result["configs"] + result["variants"]
    assert [r["seeds"] for r in result["configs"]] == [1, 1, 2]
    for r in rows:
        assert r["step_seconds"] > 0 and math.isfinite(r["tokens_per_second"])
        assert 0 < r["mfu"] < 2 and r["compile_seconds"] > 0
        assert r["compiled_memory_bytes"] > 0
        # The CPU backend exposes no memory stats; GPUs do.
        assert (r["device_peak_bytes"] is None) if cpu else (r["device_peak_bytes"] > 0)
    # Two seeds cost twice the FLOPs of one; the formula stays near XLA's own count (which
    # also counts the elementwise work, relatively large at this tiny size).
    one, _, two = result["configs"]
    assert two["model_flops_per_step"] == 2 * one["model_flops_per_step"]
    if cpu:
        assert 1.0 <= one["xla_flops_per_step"] / one["model_flops_per_step"] < 1.3
    assert [r["variant"] for r in result["variants"]] == ["learned"]
    assert [c["kernel"] for c in result["attention_core"]] == list(ATTENTION_KERNELS)
    assert all(c["step_seconds"] > 0 and 0 < c["mfu"] < 2 for c in result["attention_core"])
    printed = capsys.readouterr().out
    assert "| tiny | learned | 2 |" in printed and "MFU" in printed
    assert "Attention core, forward + backward (B 2, H 2, L 32, K 16" in printed


def test_the_attention_core_kernels_compute_the_same_gradients():
    # The bench compares their speed; that only means something if they compute one thing.
    grads = {
        k: AttentionCoreRunner(k, B=2, H=2, L=8, K=4, dtype="float32").dispatch()
        for k in ATTENTION_KERNELS
    }
    ref = grads["pattern"]
    for kernel, g in grads.items():
        for a, b in zip(g, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=kernel)
    assert np.abs(np.asarray(ref[0])).max() > 1e-3  # gradients that say something


@pytest.mark.slow
def test_quick_bench_probes_compile_cache_and_malloc_in_subprocesses(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, "-m", "ablate.cli", "bench", "--quick", "--out", str(out)],
        env=env,
        check=True,
    )
    engine = json.loads(out.read_text())["engine"]
    compile_, malloc = engine["compile"], engine["malloc"]
    assert compile_["cold_compile_seconds"] > 0 and compile_["cached_compile_seconds"] > 0
    # --quick's variants model is its engine model: timed once, not twice.
    assert [(m["shape"], m["batch_size"]) for m in malloc["models"]] == [("tiny", 8)]
    assert all(
        m["default_steps_per_second"] > 0 and m["tunables_steps_per_second"] > 0
        for m in malloc["models"]
    )
    if (os.cpu_count() or 1) >= 2:  # 2 seeds over 2 host devices, in its own process
        over = engine["seeds_over_devices"]
        assert over["devices"] == 2 and over["platform"] == "cpu"
        assert over["spread_seed_steps_per_second"] > 0 and over["speedup"] > 0


def dot_dtypes(fn, *args) -> Counter:
    """(lhs dtype, rhs dtype) of every dot_general in the traced fn, nested jaxprs included."""
    found = Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bfloat16_model_computes_in_bfloat16_with_float32_params(dtype):
    cfg = ModelConfig(vocab_size=11, seq_len=8, d_model=16, n_heads=2, n_layers=2, dtype=dtype)
    # Shapes and dtypes only: nothing is compiled.
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tokens_BL = jax.ShapeDtypeStruct((2, 8), jnp.int32)

    def forward(params, tokens_BL):
        return recorded(nnx.merge(graphdef, params, rest), tokens_BL)

    def loss(params, tokens_BL):
        return forward(params, tokens_BL)[0].logits.mean()

    dots = dot_dtypes(jax.value_and_grad(loss), params, tokens_BL)
    both_f32 = dots[("float32", "float32")]
    both_bf16 = dots[("bfloat16", "bfloat16")]
    if dtype == "float32":
        assert both_bf16 == 0 and both_f32 > 0
    else:
        # Every projection, the MLP and the head, forward and backward, multiply in bf16; the
        # only float32 operands left are jax's own attention scores (kept in f32 on purpose).
        assert both_f32 == 0
        assert both_bf16 >= 2 * 3 * (4 + 2) + 3  # 2 layers x (fwd, 2 grads) x (q,k,v,o,up,down)
    out, heads = jax.eval_shape(forward, params, tokens_BL)
    assert out.logits.dtype == jnp.float32
    assert heads[0].dtype == jnp.dtype(dtype)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


def test_bfloat16_training_keeps_float32_params_and_finite_loss():
    exp = build_experiment(
        {
            "task": {"name": "mqar"},
            "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "dtype": "bfloat16"},
            "train": {"batch_size": 8, "steps": 4, "steps_per_dispatch": 4, "log_every": 4,
                      "eval_every": 0, "checkpoint_every": 0},
        }
    )  # fmt: skip
    programs = Programs(exp)
    state = programs.init()
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    state, metrics = programs.train_chunk(state, ())
    loss = np.asarray(metrics["loss"])
    assert loss.shape == (1, 4) and np.isfinite(loss).all()
    after = jax.tree.leaves(state.params)
    assert {x.dtype for x in after} == {jnp.dtype("float32")}
    assert any(not np.array_equal(b, np.asarray(a)) for b, a in zip(before, after))


@pytest.mark.slow
def test_torch_baseline_script_compares_the_same_model():
    """scripts/torch_baseline.py (needs PyTorch, not an ablate dependency: skipped without it)
    prints every contender and one parameter count for all three (it exits if they differ)."""
    pytest.importorskip("torch")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "torch_baseline.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, script, "--batch", "1", "--rounds", "1"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "(3,287,169 parameters in each)" in done.stdout
    for name in ("ablate", "plain jax", "torch"):
        assert f"  {name} " in done.stdout
    assert "ablate step / torch step:" in done.stdout
