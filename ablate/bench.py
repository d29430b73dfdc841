"""`ablate bench`: how fast the training engine runs on the device JAX sees, and why.

Measured in one process, the compared things taking turns in interleaved rounds, each
reported by its best round (other processes only ever slow a measurement down, so the
fastest round is the least disturbed; every round is kept in the JSON), so that ratios hold
on a shared, noisy machine even when absolute times do not:

- the device's practical peak: a large matmul in the compute dtype (fp32 on CPU, bf16 on
  accelerators), interleaved with the models so that MFU compares like with like;
- the engine on the quick model (context_quick.toml's shape): 1 vs 50 steps per dispatch,
  Z vmapped seeds vs Z sequential runs of the same compiled program;
- per model shape (quick; medium: d_model 256, 4 layers, length 256, batch 32; gpt2_small:
  d 768, 12 layers, 12 heads, length 1024, vocab 50304, only on accelerators unless
  `--large`), and per attention variant at one shape: step time, tokens/s, compile time,
  model FLOP/s, MFU against the measured peak, memory;
- the attention core alone (scores, softmax, mixing; forward + backward) at the variants
  table's layer shape, by ablate's pattern path (what `learned` uses on a CPU) and by
  `jax.nn.dot_product_attention` (what it uses on accelerators);
- in fresh subprocesses: compile time with an empty persistent compilation cache, then with
  the cache the first one filled; and steps/s at one step per dispatch of the quick model
  and of the variants table's model, with ablate's GLIBC_TUNABLES and without (see below).

Model FLOPs per trained token (what MFU counts): the standard 6 per matmul weight, plus the
attention matmuls (PaLM's appendix B and nanoGPT count 12 * n_layers * L * d_model for them),
split per variant. Embeddings, biases, norms, softmax, activations and the optimiser are not
counted, nor is rematerialisation. Each part counts itself, reading its variable types (the
model is built abstractly, nothing computed):

    6 * N_trained + 4 * N_frozen + sum over layers and mixers of flops_per_token(L)

N is the number of matmul weights outside the mixers: per layer W_v and W_o (d*d each), the
MLP (2*d*F), and the head (d*V). A trained weight costs 2 FLOPs per token forward, 2 for the
input gradient and 2 for its own gradient; a frozen one (a `layer.N` in model.freeze) skips
its own gradient. A mixer's `flops_per_token` (attention.py) counts its own weights the same
way (W_q, W_k: d*K per head, for `learned` and `frozen`), plus c_variant * L * K per head:
  learned, frozen: 12 (Q K^T and P V: 2 L K forward each, 4 L K backward each);
  synthesizer: 6 (P V forward, gradients of V and of the trained P; 4 in a frozen layer);
  uniform, random_fixed, gaussian, none: 4 (P V forward and the gradient of V; the pattern
  is a constant, so it gets no gradient); fourier: 0 (an FFT, O(L log L), not a matmul).
L is the trained sequence length and K the head dim. The dense kernels compute the full
L x L scores and mask them, so causal masking is not halved.
Per step: that times batch_size * L * seeds. `xla_flops` in the output is XLA's own count
of the compiled step (shown for one step per dispatch), a cross-check that includes the
elementwise work.

glibc's malloc hands XLA's large per-step host buffers back to the OS after every call
unless told otherwise, and the next step faults them in again (ablate/malloc.py: with
ABLATE_MALLOC=keep the `ablate` command restarts itself with GLIBC_TUNABLES that keep them;
they help large steps and slow small ones). Those only work when set before the process
starts, so the bench measures them in two fresh processes, each timing the quick model and
the model of the variants table (steps/s and minor page faults per step, with ablate's
setting and with glibc's default); the rest of the bench runs with whatever this process
started with (the summary's first line says which).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ablate.attention import MIXERS, Learned
from ablate.config import ConfigError
from ablate.experiment import Experiment, build_experiment
from ablate.malloc import TUNABLES
from ablate.model import ModelConfig, abstract_model, mixers_of

RUN_STEPS = 400  # context_quick.toml's run length, for the seeds comparison with compile

#: name -> (task, model, batch size). `quick` is context_quick.toml's model on its mqar task.
SHAPES: dict[str, tuple[dict, dict, int]] = {
    "quick": ({"name": "mqar"}, {"d_model": 64, "n_heads": 4, "n_layers": 2}, 32),
    "medium": (
        {"name": "mqar", "seq_len": 256, "n_pairs": 16, "n_keys": 64, "n_values": 64},
        {"d_model": 256, "n_heads": 4, "n_layers": 4},
        32,
    ),
    "gpt2_small": (
        {"name": "memorize", "seq_len": 1024, "n_keys": 8192, "n_values": 8192},
        {"d_model": 768, "n_heads": 12, "n_layers": 12, "vocab_size": 50304},
        16,
    ),
    # --quick only: a smoke test of every code path in seconds.
    "tiny": ({"name": "mqar", "seq_len": 32}, {"d_model": 32, "n_heads": 2, "n_layers": 1}, 8),
}
QUICK_SWEEP_VARIANTS = ("learned", "frozen", "uniform", "random_fixed", "none")
SEEDS = 8  # Z of the vmapped-vs-sequential comparison, unless asked otherwise


# ------------------------------------------------------------------------------ FLOPs


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, by the formula in the module docstring."""
    model = abstract_model(cfg)
    # A tied head multiplies by the token embedding (a weight like any other here).
    head = model.token_embed.embedding if model.head is None else model.head.kernel
    weights = [head] + [w for b in model.blocks for w in b.matmul_weights()]
    flops = sum((6 if isinstance(w, nnx.Param) else 4) * math.prod(w.shape) for w in weights)
    for layer in mixers_of(model):
        flops += sum(mixer.flops_per_token(seq_len) for _, _, mixer in layer)
    return float(flops)


def train_flops_per_step(exp: Experiment) -> float:
    """Model FLOPs of one training step of every seed of `exp`."""
    L, B = exp.task.seq_len, exp.train.batch_size
    return model_flops_per_token(exp.model, L) * B * L * len(exp.train.seeds)


# ------------------------------------------------------------------------------ timing


class MatmulRunner:
    """An n x n x n matmul in `dtype`: the practical peak FLOP/s of the device."""

    def __init__(self, n: int, dtype: str):
        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        self.a = jax.random.normal(ka, (n, n), dtype)
        self.b = jax.random.normal(kb, (n, n), dtype)
        self.matmul = jax.jit(jnp.matmul)
        self.steps_per_dispatch, self.flops_per_step = 1, 2.0 * n**3
        _seconds(self.dispatch)  # compiles
        self.run_seconds = _seconds(self.dispatch)

    def dispatch(self):
        return self.matmul(self.a, self.b)


class EngineRunner:
    """One compiled experiment: `dispatch` runs steps_per_dispatch steps of every seed."""

    def __init__(self, exp: Experiment):
        from ablate.core import Programs

        self.exp = exp
        self.programs = Programs(exp)
        self.arrays = self.programs.place(exp.task.load().arrays)
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(self.programs.init())
        self.init_seconds = time.perf_counter() - t0
        first_seconds = _seconds(self.dispatch)  # compiles, then runs
        self.compile_seconds = self.programs.compile_seconds
        self.run_seconds = first_seconds - self.compile_seconds
        self.steps_per_dispatch = exp.train.steps_per_dispatch
        self.flops_per_step = train_flops_per_step(exp)
        self.tokens_per_step = exp.train.batch_size * exp.task.seq_len * len(exp.train.seeds)

    def dispatch(self):
        self.state, _ = self.programs.train_chunk(self.state, self.arrays)
        return self.state

    def facts(self) -> dict[str, Any]:
        """Compile time, FLOP and memory facts of the compiled chunk."""
        compiled = self.programs.compiled_chunk
        xla_flops = None
        if self.steps_per_dispatch == 1:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            xla_flops = float(cost.get("flops", 0)) or None
        memory = compiled.memory_analysis()
        compiled_bytes = None
        if memory is not None:
            compiled_bytes = (
                memory.argument_size_in_bytes
                + memory.temp_size_in_bytes
                + memory.output_size_in_bytes
                - memory.alias_size_in_bytes
            )
        stats = jax.devices()[0].memory_stats() or {}
        return {
            "compile_seconds": self.compile_seconds,
            "init_seconds": self.init_seconds,
            "model_flops_per_step": self.flops_per_step,
            "xla_flops_per_step": xla_flops,
            "compiled_memory_bytes": compiled_bytes,
            "device_peak_bytes": stats.get("peak_bytes_in_use"),
        }


#: How the attention core (scores, softmax, mixing) can be computed; `learned` uses the
#: pattern path on a CPU and dot_product_attention on accelerators (attention.py).
ATTENTION_KERNELS = ("pattern", "dot_product_attention")


class AttentionCoreRunner:
    """One causal attention core, forward + backward, by one of `ATTENTION_KERNELS`."""

    def __init__(self, kernel: str, B: int, H: int, L: int, K: int, dtype: str):
        from ablate.attention import apply_pattern, softmax_attention
        from ablate.model import visibility

        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        self.qkv = [jax.random.normal(key, (B, L, H, K), dtype) for key in keys]
        visible_BLS = visibility(L, True, None, B)

        def core(q_BLHK, k_BSHK, v_BSHK):
            if kernel == "dot_product_attention":
                return jax.nn.dot_product_attention(
                    q_BLHK, k_BSHK, v_BSHK, mask=visible_BLS[:, None]
                )
            probs_BHLS = softmax_attention(q_BLHK, k_BSHK, visible_BLS).astype(dtype)
            return apply_pattern(probs_BHLS, v_BSHK)

        def loss(q_BLHK, k_BSHK, v_BSHK):
            return jnp.sum(core(q_BLHK, k_BSHK, v_BSHK).astype(jnp.float32) ** 2)

        self.grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        self.kernel, self.shape = kernel, {"B": B, "H": H, "L": L, "K": K}
        self.steps_per_dispatch = 1
        self.flops_per_step = Learned.mixing_flops * B * H * L * L * K
        _seconds(self.dispatch)  # compiles
        self.run_seconds = _seconds(self.dispatch)

    def dispatch(self):
        return self.grad(*self.qkv)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleave(runners: list, rounds: int, seconds: float) -> list[list[float]]:
    """Seconds per step of each runner in each round; in a round each runs ~`seconds` in turn."""
    per_dispatch = []
    for r in runners:
        estimate = r.run_seconds
        if estimate < seconds:  # cheap: a first run includes warm-up, so time it again
            estimate = min(_seconds(r.dispatch) for _ in range(2))
        per_dispatch.append(max(estimate, 1e-6))
    samples = [[] for _ in runners]
    for _ in range(rounds):
        for i, r in enumerate(runners):
            n = max(1, round(seconds / per_dispatch[i]))
            t0 = time.perf_counter()
            out = None
            for _ in range(n):
                out = r.dispatch()
            jax.block_until_ready(out)
            per_dispatch[i] = (time.perf_counter() - t0) / n
            samples[i].append(per_dispatch[i] / r.steps_per_dispatch)
    return samples


def experiment(
    shape: str,
    *,
    variant: str,
    seeds: int,
    spd: int,
    dtype: str,
    batch: int | None = None,
    seed_devices: int = 1,
) -> Experiment:
    """The benchmark experiment of `shape` with the given variant, seeds and dispatch size.

    On one device (comparable with the one-device matmul peak), unless `seed_devices` > 1
    spreads the seeds over that many devices.
    """
    task, model, shape_batch = SHAPES[shape]
    return build_experiment(
        {
            "name": f"bench-{shape}",
            "task": dict(task),
            "model": {**model, "attention": variant, "dtype": dtype},
            "optim": {"warmup_steps": 10},
            "train": {
                "steps": spd * 1000,
                "batch_size": batch or shape_batch,
                "seeds": list(range(seeds)),
                "steps_per_dispatch": spd,
                "log_every": spd,
                "eval_every": 0,
                "checkpoint_every": 0,
                "compile_cache": False,
                "mesh": {"data": 1, "seeds": seed_devices},
            },
        }
    )


def row(r: EngineRunner, samples: list[float], peak: float) -> dict[str, Any]:
    """One line of the results table (all seeds together; the best round); MFU against `peak`."""
    exp = r.exp
    step_seconds = min(samples)
    flops_per_second = r.flops_per_step / step_seconds
    return {
        "config": exp.name.removeprefix("bench-"),
        "variant": exp.model.head_variants()[0][0],
        "seeds": len(exp.train.seeds),
        "steps_per_dispatch": r.steps_per_dispatch,
        "dtype": exp.model.dtype,
        "batch_size": exp.train.batch_size,
        "seq_len": exp.task.seq_len,
        "d_model": exp.model.d_model,
        "n_layers": exp.model.n_layers,
        "step_seconds": step_seconds,
        "step_seconds_rounds": samples,
        "steps_per_second": 1 / step_seconds,
        "tokens_per_second": r.tokens_per_step / step_seconds,
        "flops_per_second": flops_per_second,
        "mfu": flops_per_second / peak,
        "peak_flops_per_second": peak,
        **r.facts(),
    }


# ------------------------------------------------------------------------------ subprocesses


def _probe_worker(cache_dir: str, shape: str, burst_shape: str, burst_batch: str) -> None:
    """(A fresh process.) Build and compile `shape` with the persistent cache in `cache_dir`,
    print the times as one JSON line; then, if `burst_shape` is given, build that model too
    and, for every number of seconds read from stdin, run one burst of single-step dispatches
    of each model and print, per model, its seconds and minor page faults per step."""
    from ablate.train import enable_compile_cache

    enable_compile_cache(cache_dir)
    t0 = time.perf_counter()
    r = EngineRunner(experiment(shape, variant="learned", seeds=1, spd=1, dtype="float32"))
    ready = time.perf_counter() - t0
    facts = {"compile_seconds": r.compile_seconds, "init_seconds": r.init_seconds}
    print(json.dumps({**facts, "ready_seconds": ready}), flush=True)
    if not burst_shape:
        return
    runners = [r]
    if (burst_shape, int(burst_batch)) != (shape, SHAPES[shape][2]):  # not the same model twice
        big = experiment(
            burst_shape, variant="learned", seeds=1, spd=1, dtype="float32", batch=int(burst_batch)
        )
        runners.append(EngineRunner(big))
    per_step = [min(_seconds(x.dispatch) for _ in range(2)) for x in runners]
    for line in sys.stdin:
        burst = {"step_seconds": [], "page_faults": []}
        for i, x in enumerate(runners):
            n = max(1, round(float(line) / per_step[i]))
            faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(n):
                state = x.dispatch()
            jax.block_until_ready(state)
            per_step[i] = (time.perf_counter() - t0) / n
            burst["step_seconds"].append(per_step[i])
            burst["page_faults"].append(
                (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
            )
        print(json.dumps(burst), flush=True)


def seeds_over_devices(
    shape: str, seeds: int, devices: int, spd: int, rounds: int, seconds: float, dtype: str
) -> dict[str, Any]:
    """Z seeds vmapped on one device vs the same Z seeds spread over `devices` devices."""
    one = EngineRunner(experiment(shape, variant="learned", seeds=seeds, spd=spd, dtype=dtype))
    spread = EngineRunner(
        experiment(
            shape, variant="learned", seeds=seeds, spd=spd, dtype=dtype, seed_devices=devices
        )
    )
    t_one, t_spread = (min(x) for x in interleave([one, spread], rounds, seconds))
    return {
        "shape": shape,
        "seeds": seeds,
        "devices": devices,
        "platform": jax.default_backend(),
        "one_device_seed_steps_per_second": seeds / t_one,
        "spread_seed_steps_per_second": seeds / t_spread,
        "speedup": t_one / t_spread,
    }


def _seeds_worker(shape: str, seeds: str, devices: str, spd: str, rounds: str, seconds: str):
    """(A fresh process whose CPU poses as `devices` devices.) Print `seeds_over_devices`."""
    args = (int(seeds), int(devices), int(spd), int(rounds), float(seconds), "float32")
    print(json.dumps(seeds_over_devices(shape, *args)), flush=True)


def cpu_seeds_over_devices(
    shape: str, seeds: int, spd: int, rounds: int, seconds: float
) -> dict[str, Any] | None:
    """On a CPU: spread Z seeds over one host device per core, in a fresh process."""
    devices = max(d for d in range(1, min(os.cpu_count() or 1, seeds) + 1) if seeds % d == 0)
    if devices < 2:
        return None
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={devices}".strip(),
    )
    code = "import sys; from ablate.bench import _seeds_worker; _seeds_worker(*sys.argv[1:])"
    args = [shape, seeds, devices, spd, rounds, seconds]
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"bench seeds-over-devices process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Worker:
    """A `_probe_worker` process on this process's platform, with ablate's GLIBC_TUNABLES or
    with glibc's default malloc."""

    def __init__(
        self, cache_dir: str, shape: str, tunables: bool, burst: tuple[str, int] = ("", 0)
    ):
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env.pop("GLIBC_TUNABLES", None)
        if tunables:
            env["GLIBC_TUNABLES"] = TUNABLES
        if jax.default_backend() == "cpu":
            env.setdefault("JAX_PLATFORMS", "cpu")
        code = "import sys; from ablate.bench import _probe_worker; _probe_worker(*sys.argv[1:])"
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, cache_dir, shape, *map(str, burst)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.ready = self._read()  # returns once it has compiled (and filled the cache)
        self.step_seconds: list[list[float]] = []  # per burst, per model
        self.page_faults: list[list[float]] = []

    def _read(self) -> dict[str, float]:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.stderr.seek(0)
            raise RuntimeError(f"bench probe process failed:\n{self.stderr.read()[-3000:]}")
        return json.loads(line)

    def burst(self, seconds: float) -> None:
        self.process.stdin.write(f"{seconds}\n")
        self.process.stdin.flush()
        burst = self._read()
        self.step_seconds.append(burst["step_seconds"])
        self.page_faults.append(burst["page_faults"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.stderr.close()


def probes(
    shape: str, rounds: int, seconds: float, burst_shape: str, burst_batch: int
) -> dict[str, Any]:
    """Compile `shape` in a fresh process with an empty cache, then in two more that find it
    filled; then in those two time single-step dispatches of `shape` and of `burst_shape` at
    `burst_batch`, taking turns, one with ablate's GLIBC_TUNABLES and one with glibc's
    default (small and large steps gain and lose differently: ablate/malloc.py)."""
    burst = (burst_shape, burst_batch)
    with tempfile.TemporaryDirectory(prefix="ablate-bench-cache-") as cache:
        cold = _Worker(cache, shape, tunables=False)
        cached = _Worker(cache, shape, tunables=False, burst=burst)
        tuned = _Worker(cache, shape, tunables=True, burst=burst)
        try:
            for _ in range(rounds):
                for worker in (cached, tuned):
                    worker.burst(seconds)
        finally:
            for worker in (cold, cached, tuned):
                worker.close()
    c, w = cold.ready, cached.ready
    malloc = []
    models = list(dict.fromkeys([(shape, SHAPES[shape][2]), burst]))  # as _probe_worker
    for i, (name, batch) in enumerate(models):
        default = min(step[i] for step in cached.step_seconds)
        tunables = min(step[i] for step in tuned.step_seconds)
        malloc.append(
            {
                "shape": name,
                "batch_size": batch,
                "steps_per_dispatch": 1,
                "default_steps_per_second": 1 / default,
                "tunables_steps_per_second": 1 / tunables,
                "speedup": default / tunables,
                "default_page_faults_per_step": statistics.median(f[i] for f in cached.page_faults),
                "tunables_page_faults_per_step": statistics.median(f[i] for f in tuned.page_faults),
            }
        )
    return {
        "compile": {
            "shape": shape,
            "cold_compile_seconds": c["compile_seconds"],
            "cached_compile_seconds": w["compile_seconds"],
            "cold_init_seconds": c["init_seconds"],
            "cached_init_seconds": w["init_seconds"],
            "cold_ready_seconds": c["ready_seconds"],
            "cached_ready_seconds": w["ready_seconds"],
            "speedup": c["compile_seconds"] / w["compile_seconds"],
        },
        "malloc": {"glibc_tunables": TUNABLES, "rounds": rounds, "models": malloc},
    }


# ------------------------------------------------------------------------------ the bench


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one bench run (derived from the flags and the device)."""

    dtype: str
    matmul_n: int
    engine_shape: str
    scan_spd: int
    seeds: int
    shapes: tuple[str, ...]
    shape_spd: int
    shape_seeds: int
    variant_shape: str
    variant_batch: int
    variants: tuple[str, ...]
    attention_core: tuple[int, int, int, int]  # B, H, L, K
    rounds: int
    shape_rounds: int
    seconds: float
    quick: bool = False
    skipped: tuple[str, ...] = ()


def make_plan(
    *,
    quick: bool = False,
    shapes: str | None = None,
    large: bool = False,
    dtype: str | None = None,
    variants: str | None = None,
    seeds: int = SEEDS,
) -> Plan:
    """Default sizes for this device: a few minutes on a 2-core CPU, larger on accelerators.

    The arguments are `ablate bench`'s flags: `shapes` and `variants` comma-separated
    (`variants` may be "all"), None for this device's default.
    """
    accelerator = jax.default_backend() != "cpu"
    asked_variants = variants
    dtype = dtype or ("bfloat16" if accelerator else "float32")
    # Every registered variant a causal model can use (bench models are causal).
    causal = tuple(name for name, cls in MIXERS.items() if cls.supports_causal)
    if variants == "all":
        variants = causal
    elif variants:
        variants = tuple(variants.split(","))
    else:  # on a CPU, the variants of context_quick.toml (each costs a compile)
        variants = causal if accelerator else QUICK_SWEEP_VARIANTS
    if quick:
        return Plan(
            dtype=dtype,
            matmul_n=256,
            engine_shape="tiny",
            scan_spd=10,
            seeds=2,
            shapes=("tiny",),
            shape_spd=10,
            shape_seeds=1,
            variant_shape="tiny",
            variant_batch=8,
            variants=variants if asked_variants else ("learned", "uniform"),
            attention_core=(2, 2, 32, 16),
            rounds=2,
            shape_rounds=2,
            seconds=0.2,
            quick=True,
        )
    shapes = shapes.split(",") if shapes else ["quick", "medium", "gpt2_small"]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or seeds < 1:
        problem = f"--seeds must be >= 1, got {seeds}"
        if unknown:
            problem = f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}"
        raise ConfigError([("bench", problem)])
    skipped = ()
    if "gpt2_small" in shapes and not (accelerator or large):
        shapes.remove("gpt2_small")
        skipped = ("gpt2_small: skipped on a CPU (--large runs it)",)
    return Plan(
        dtype=dtype,
        matmul_n=8192 if accelerator else 2048,
        engine_shape="quick",
        scan_spd=50,
        seeds=seeds,
        shapes=tuple(shapes),
        shape_spd=10 if accelerator else 1,
        shape_seeds=4 if accelerator else 1,
        variant_shape="medium",
        variant_batch=32 if accelerator else 8,
        variants=variants,
        attention_core=(32 if accelerator else 8, 4, 256, 64),  # the variants table's layer
        skipped=skipped,
        rounds=5,
        shape_rounds=3,
        seconds=0.5,
    )


def bench(plan: Plan, out: Path | None = None, probe: bool = True, log=print) -> dict[str, Any]:
    """Run every measurement of `plan`; returns (and writes to `out` as it goes) the results."""
    t_start = time.perf_counter()
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "backend": jax.default_backend(),
            "device": device.device_kind,
            "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        },
        "plan": dataclasses.asdict(plan),
        "skipped": list(plan.skipped),
    }

    def save():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))

    def say(message: str):
        log(f"[{time.perf_counter() - t_start:4.0f} s] {message}")

    cache: dict[tuple, EngineRunner] = {}

    def runner(shape, variant="learned", seeds=1, spd=1, batch=None) -> EngineRunner:
        key = (shape, variant, seeds, spd, batch or SHAPES[shape][2])
        if key not in cache:
            exp = experiment(
                shape, variant=variant, seeds=seeds, spd=spd, dtype=plan.dtype, batch=batch
            )
            cache[key] = EngineRunner(exp)
        return cache[key]

    def measure(runners: list[EngineRunner], rounds: int) -> list[dict[str, Any]]:
        mm, *samples = interleave([matmul, *runners], rounds, plan.seconds)
        peak = matmul.flops_per_step / min(mm)
        return [row(r, s, peak) for r, s in zip(runners, samples)]

    say(f"device: {device.device_kind} ({jax.default_backend()}), dtype {plan.dtype}")
    result["engine"] = {}
    if probe:  # first, while this process holds little device memory
        say("compile-cache and malloc probes in subprocesses")
        result["engine"] = probes(
            plan.engine_shape, plan.rounds, plan.seconds, plan.variant_shape, plan.variant_batch
        )
        save()

    say(f"peak matmul; the engine on the {plan.engine_shape} model")
    matmul = MatmulRunner(plan.matmul_n, plan.dtype)
    shape, Z = plan.engine_shape, plan.seeds
    one, scan = runner(shape), runner(shape, spd=plan.scan_spd)
    vmap = runner(shape, seeds=Z, spd=plan.scan_spd)
    rows = measure([one, scan, vmap], plan.rounds)
    result["peak_matmul"] = {
        "n": plan.matmul_n,
        "dtype": plan.dtype,
        "flops_per_second": rows[0]["peak_flops_per_second"],
    }
    t_one, t_scan, t_vmap = (r["step_seconds"] for r in rows)
    result["engine"]["dispatch"] = {
        "shape": shape,
        "steps_per_dispatch": [1, plan.scan_spd],
        "steps_per_second": [1 / t_one, 1 / t_scan],
        "tokens_per_second": [rows[0]["tokens_per_second"], rows[1]["tokens_per_second"]],
        "speedup": t_one / t_scan,
        "overhead_seconds_per_dispatch": t_one - t_scan,
    }
    result["engine"]["seeds"] = {
        "shape": shape,
        "seeds": Z,
        "vmapped_seed_steps_per_second": Z / t_vmap,
        "sequential_seed_steps_per_second": 1 / t_scan,
        "speedup": Z * t_scan / t_vmap,
        "compile_seconds_one_seed": scan.compile_seconds,
        "compile_seconds_vmapped": vmap.compile_seconds,
        # Z runs of RUN_STEPS steps, each compiling its own program (as new Programs do)
        # vs one vmapped run.
        "speedup_with_compile": (Z * (scan.compile_seconds + RUN_STEPS * t_scan))
        / (vmap.compile_seconds + RUN_STEPS * t_vmap),
        "run_steps": RUN_STEPS,
    }
    result["configs"] = rows
    save()

    # The seeds axis of the mesh: on several accelerators here; on a CPU, one host device
    # per core in a fresh process (XLA_FLAGS must be set before JAX starts).
    if jax.device_count() > 1 and Z % min(Z, jax.device_count()) == 0:
        say(f"{Z} seeds over {min(Z, jax.device_count())} devices")
        over = seeds_over_devices(
            shape, Z, min(Z, jax.device_count()), plan.scan_spd, plan.rounds, plan.seconds,
            plan.dtype,
        )  # fmt: skip
    elif jax.default_backend() == "cpu" and probe:
        say(f"{Z} seeds over one CPU device per core, in a subprocess")
        over = cpu_seeds_over_devices(shape, Z, plan.scan_spd, plan.rounds, plan.seconds)
    else:
        over = None
    if over is not None:
        over["speedup_vs_sequential"] = (
            over["spread_seed_steps_per_second"] / result["engine"]["seeds"][
                "sequential_seed_steps_per_second"]
        )  # fmt: skip
        result["engine"]["seeds_over_devices"] = over
        save()

    for name in plan.shapes:
        if name == shape:
            continue
        say(f"shape {name}")
        runners = [runner(name, spd=plan.shape_spd)]
        if plan.shape_seeds > 1 and name != "gpt2_small":
            runners.append(runner(name, seeds=plan.shape_seeds, spd=plan.shape_spd))
        rows = measure(runners, plan.shape_rounds)
        result["configs"] += rows
        if len(rows) == 2:
            k = rows[1]["seeds"]
            speedup = k * rows[0]["step_seconds"] / rows[1]["step_seconds"]
            result["engine"][f"seeds_{name}"] = {"seeds": k, "speedup": speedup}
        save()
        for key in [key for key in cache if key[0] == "gpt2_small"]:
            del cache[key]  # frees its device memory

    say(f"attention variants at the {plan.variant_shape} shape, batch {plan.variant_batch}")
    runners = [
        runner(plan.variant_shape, v, spd=plan.shape_spd, batch=plan.variant_batch)
        for v in plan.variants
    ]
    result["variants"] = measure(runners, plan.shape_rounds)
    save()

    B, H, L, Z = plan.attention_core
    say(f"attention core, forward + backward, B {B} H {H} L {L} Z {Z}")
    cores = [AttentionCoreRunner(k, B, H, L, Z, plan.dtype) for k in ATTENTION_KERNELS]
    mm, *samples = interleave([matmul, *cores], plan.shape_rounds, plan.seconds)
    peak = matmul.flops_per_step / min(mm)
    result["attention_core"] = [
        {
            "kernel": c.kernel,
            **c.shape,
            "dtype": plan.dtype,
            "step_seconds": min(t),
            "step_seconds_rounds": t,
            "flops_per_second": c.flops_per_step / min(t),
            "mfu": c.flops_per_step / min(t) / peak,
        }
        for c, t in zip(cores, samples)
    ]
    result["wall_seconds"] = time.perf_counter() - t_start
    say("done")
    save()
    return result


# ------------------------------------------------------------------------------ printing


def _si(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    head = ["config", "variant", "seeds", "steps/disp", "dtype", "step ms", "tokens/s", "compile s",
            "FLOP/step", "FLOP/s", "MFU", "XLA/model", "compiled mem", "device peak"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        xla = r["xla_flops_per_step"]
        cells = [
            r["config"],
            r["variant"],
            str(r["seeds"]),
            str(r["steps_per_dispatch"]),
            r["dtype"],
            f"{1e3 * r['step_seconds']:.3g}",
            _si(r["tokens_per_second"]),
            f"{r['compile_seconds']:.1f}",
            _si(r["model_flops_per_step"]),
            _si(r["flops_per_second"]),
            f"{100 * r['mfu']:.0f}%",
            "n/a" if xla is None else f"{xla / r['model_flops_per_step']:.2f}",
            _si(r["compiled_memory_bytes"], "B"),
            _si(r["device_peak_bytes"], "B"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> str:
    """The whole result in words and tables."""
    m, peak = result["machine"], result["peak_matmul"]
    eng = result["engine"]
    d, s = eng["dispatch"], eng["seeds"]
    out = [
        f"ablate bench, {result['date']}: {m['device']} ({m['backend']}, {m['cpu_count']} CPUs), "
        f"jax {m['jax']}, GLIBC_TUNABLES={m['glibc_tunables'] or 'unset'}",
        f"peak: {peak['n']}^3 matmul in {peak['dtype']}: {_si(peak['flops_per_second'])}FLOP/s",
        f"dispatch ({d['shape']}): {d['steps_per_second'][0]:.0f} steps/s at 1 step/dispatch, "
        f"{d['steps_per_second'][1]:.0f} at {d['steps_per_dispatch'][1]}: x{d['speedup']:.1f}",
        f"seeds ({s['shape']}): {s['seeds']} vmapped {s['vmapped_seed_steps_per_second']:.0f} "
        f"seed-steps/s vs sequential {s['sequential_seed_steps_per_second']:.0f}: "
        f"x{s['speedup']:.1f}; compile {s['compile_seconds_vmapped']:.1f} s vs "
        f"{s['compile_seconds_one_seed']:.1f} s per run, so {s['run_steps']}-step runs "
        f"compiled each: x{s['speedup_with_compile']:.1f}",
    ]
    if "seeds_over_devices" in eng:
        o = eng["seeds_over_devices"]
        out.append(
            f"seeds over devices ({o['shape']}): {o['seeds']} seeds on {o['devices']} "
            f"{o['platform']} devices {o['spread_seed_steps_per_second']:.0f} seed-steps/s vs "
            f"{o['one_device_seed_steps_per_second']:.0f} vmapped on one (x{o['speedup']:.2f}); "
            f"x{o['speedup_vs_sequential']:.1f} over sequential runs"
        )
    for key, value in eng.items():
        if key.startswith("seeds_") and key != "seeds_over_devices":
            out.append(f"seeds ({key[6:]}): {value['seeds']} vmapped vs sequential: "
                       f"x{value['speedup']:.1f}")  # fmt: skip
    if "compile" in eng:
        c, mal = eng["compile"], eng["malloc"]
        out += [
            f"compile ({c['shape']}, fresh process): {c['cold_compile_seconds']:.2f} s with an "
            f"empty cache, {c['cached_compile_seconds']:.2f} s cached (x{c['speedup']:.1f}); "
            f"build+init+first step {c['cold_ready_seconds']:.1f} s vs "
            f"{c['cached_ready_seconds']:.1f} s",
            "malloc, 1 step/dispatch, glibc's default vs ablate's GLIBC_TUNABLES "
            f"(ABLATE_MALLOC=keep; best of {mal['rounds']} turns each): "
            + "; ".join(
                f"{m['shape']} (batch {m['batch_size']}) {m['default_steps_per_second']:.3g} vs "
                f"{m['tunables_steps_per_second']:.3g} steps/s (x{m['speedup']:.2f}), minor page "
                f"faults per step {m['default_page_faults_per_step']:.0f} vs "
                f"{m['tunables_page_faults_per_step']:.0f}"
                for m in mal["models"]
            ),
        ]
    out += [
        "",
        "Best of interleaved rounds; MFU against the matmul peak measured in the same rounds.",
        "Model shapes:",
        table(result["configs"]),
    ]
    out += ["", "Attention variants at equal shape:", table(result["variants"])]
    if "attention_core" in result:
        first, *rest = result["attention_core"]
        shape = ", ".join(f"{k} {first[k]}" for k in "BHLK")
        out += [
            "",
            f"Attention core, forward + backward ({shape}, {first['dtype']}): "
            + "; ".join(
                f"{c['kernel']} {1e3 * c['step_seconds']:.3g} ms ({100 * c['mfu']:.0f}% MFU)"
                for c in result["attention_core"]
            )
            + "; "
            + ", ".join(
                f"{first['kernel']} runs at x{c['step_seconds'] / first['step_seconds']:.2f} "
                f"the speed of {c['kernel']}"
                for c in rest
            ),
        ]
    out += [f"skipped: {why}" for why in result["skipped"]]
    return "\n".join(out)
