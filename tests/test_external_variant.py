"""A variant added from outside the package: one class and one registry line, nothing else.

`Shifted` lives in this file only. Registered in `MIXERS`, it is validated with its own
settings, trained and reported by a sweep, and counted and timed by the bench, without any
other file knowing its name.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ablate import bench
from ablate.attention import MIXERS, Fixed, Mixer, MixerSettings, NoSettings, normalize_rows
from ablate.config import ConfigError
from ablate.experiment import build_experiment
from ablate.model import frozen_parts
from ablate.sweep import run_sweep


@dataclasses.dataclass(frozen=True)
class ShiftConfig(NoSettings):
    """Settings of `shifted`: how far back each position reads."""

    shift: int = 1

    def problems(self) -> list[tuple[str, str]]:
        return [] if self.shift >= 1 else [("shift", f"must be >= 1, got {self.shift}")]


class Shifted(Mixer):
    """Position i reads position i - shift (the first positions read themselves)."""

    Config = ShiftConfig
    describe = {"table": "shift pattern"}
    lacks = ("learned routing: a fixed shift back", "learned routing")

    def __init__(self, n_heads: int, settings: MixerSettings, rngs: nnx.Rngs, config=None):
        super().__init__(n_heads, settings, rngs, config)
        i = jnp.arange(settings.max_len)
        source = jnp.maximum(i - self.config.shift, 0)
        self.table = Fixed((source[:, None] == i[None, :]).astype(jnp.float32))

    def pattern(self, x_BLD: jax.Array, visible_BLS: jax.Array) -> jax.Array:
        L = x_BLD.shape[1]
        table_11LS = self.table[...][None, None, :L, :L].astype(x_BLD.dtype)
        probs_B1LS = normalize_rows(table_11LS, visible_BLS)
        return jnp.broadcast_to(probs_B1LS, (x_BLD.shape[0], self.n_heads, L, L))


@pytest.fixture
def shifted(monkeypatch):
    monkeypatch.setitem(MIXERS, "shifted", Shifted)  # the one registry line


SWEEP = """
[sweep]
name = "outside"
variants = ["learned", "shifted"]
tasks = [{ name = "copy", n_items = 3, n_symbols = 4 }]
[model]
d_model = 16
n_heads = 2
n_layers = 1
[model.attention_settings.shifted]
shift = 2
[train]
steps = 20
batch_size = 8
seeds = [0]
steps_per_dispatch = 10
log_every = 10
eval_every = 10
eval_batches = 1
gradient_alignment = false
checkpoint_every = 20
compile_cache = false
"""


def test_a_variant_from_outside_is_validated_trained_reported_and_benched(shifted, tmp_path):
    # Validated: its settings are checked with their dotted path, like every other field.
    data = {"task": {"name": "copy"}, "model": {"attention": "shifted"}}
    bad = {**data, "model": {**data["model"], "attention_settings": {"shifted": {"shift": 0}}}}
    with pytest.raises(ConfigError) as info:
        build_experiment(bad)
    assert [p for p, _ in info.value.problems] == ["model.attention_settings.shifted.shift"]

    # Trained and reported by a sweep; the run's model reads its settings.
    exp_file = tmp_path / "outside.toml"
    exp_file.write_text(SWEEP)
    run_sweep(exp_file, workdir=tmp_path, progress=False)
    sweep_dir = tmp_path / "outside"
    rows = [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert {r["variant"]: r["status"] for r in rows} == {"learned": "ok", "shifted": "ok"}
    row = next(r for r in rows if r["variant"] == "shifted")
    assert 0 <= row["accuracy"] <= 1
    assert [p["what"] for p in row["frozen"]] == ["shift pattern"] * 2
    report = (sweep_dir / "REPORT.md").read_text()
    assert "shifted" in report and "shift pattern in 2 heads" in report
    summary = json.loads((sweep_dir / "report" / "summary.json").read_text())
    entry = summary["groups"][0]["variants"]["shifted"]
    assert entry["lacks"] == "learned routing: a fixed shift back"  # its own words
    assert entry["lacks_short"] == "learned routing"
    config = json.loads((sweep_dir / "copy-shifted" / "config.json").read_text())
    assert config["model"]["attention_settings"] == {"shifted": {"shift": 2}}

    # Benched: its FLOPs are its own class's count (P V forward and V's gradient: 4 L K per
    # head and token), and its engine runs.
    exp = bench.experiment("tiny", variant="shifted", seeds=1, spd=1, dtype="float32")
    cfg = exp.model
    L, d, F = exp.task.seq_len, cfg.d_model, cfg.mlp_width
    weights = cfg.n_layers * (2 * d * d + 2 * d * F) + d * cfg.vocab_size
    assert bench.model_flops_per_token(cfg, L) == 6 * weights + cfg.n_layers * 4 * L * d
    assert frozen_parts(cfg)[0]["part"] == "layer 0 head 0"
    runner = bench.EngineRunner(exp)
    assert runner.flops_per_step == bench.train_flops_per_step(exp) > 0
    runner.dispatch()
    assert "shifted" in bench.make_plan(variants="all").variants
