"""Bad input never crashes: random mutations of every experiment file, through validation.

Each example takes an experiment file (every one in experiments/ and a few generated here),
mutates it (a wrong type, a table where a value goes and a value where a table goes, a
negative, zero, huge or NaN number, a unicode or path-like name, an unknown key, a key
removed), writes it as TOML text and parses it back (so it is a file someone could write),
and validates it as `ablate train` and `ablate sweep` do. Validation must accept it or
raise ConfigError naming every problem by a non-empty dotted path: never another
exception, never a file written, never a network connection or a process started.

The data-backed tasks (text_lm, stdlib_lm, text_classification) are validated without
reading their data: here their loaders raise, so a validation that read data would fail the
property. A tokenizer other than `bytes` is read to learn its vocabulary; a DataError from
one (no network here) is accepted as the refusal it is (exit 3).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import re
import socket
import subprocess
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ablate.data
from ablate.attention import MIXERS, variant_names
from ablate.config import ConfigError, dotted
from ablate.data import DataError
from ablate.distributed import MeshConfig, check_mesh
from ablate.experiment import SECTIONS, OptimConfig, TrainConfig, build_experiment, safe_join
from ablate.model import FREEZABLE, ModelConfig
from ablate.sweep import expand
from ablate.tasks import TASKS, task_names

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_FILES = sorted((ROOT / "experiments").glob("*.toml"))
TINY_TRAIN = {"steps": 20, "batch_size": 8, "seeds": [0, 1], "steps_per_dispatch": 10}
TINY_TRAIN |= {"log_every": 10, "eval_every": 10, "checkpoint_every": 20}
TINY_MODEL = {"d_model": 16, "n_heads": 2, "n_layers": 1}
# Knobs a generated file gives a data-backed task (its source is never read: see `offline`).
DATA_KNOBS = {
    "text_lm": {"source": "some-user/some-corpus", "seq_len": 32},
    "text_classification": {"source": "imdb", "seq_len": 32},
    "stdlib_lm": {"seq_len": 32},
    "text_mlm": {"source": "some-user/some-corpus", "seq_len": 32},
    "stdlib_mlm": {"seq_len": 32},
}
GENERATED = {
    # One small experiment per registered task, so every task's knobs are mutated.
    **{
        f"task_{name}": {
            "name": f"gen_{name}",
            "task": {"name": name, **DATA_KNOBS.get(name, {})},
            # A masked-LM task is read by a bidirectional model (a causal one is refused).
            "model": dict(TINY_MODEL, **({"causal": False} if TASKS[name].bidirectional else {})),
            "train": dict(TINY_TRAIN),
        }
        for name in task_names()
    },
    # A sweep using every shape a [sweep] table allows.
    "sweep_every_shape": {
        "sweep": {
            "name": "gen_sweep",
            "variants": [
                "learned",
                {"label": "frozen", "attention": "frozen", "freeze": ["token_embed", "layer.0"]},
                {"label": "per_layer", "attention": [["learned", "uniform"]]},
            ],
            "tasks": [
                {"name": "assoc_recall", "n_pairs": 2, "n_keys": 4, "n_values": 2},
                {"name": "majority", "label": "maj", "overrides": {"train.steps": 10}},
            ],
            "grid": {"optim.learning_rate": [1e-3, 3e-3], "model.d_mlp": [0, 32]},
            "probe": ["learned"],
        },
        "model": dict(TINY_MODEL),
        "optim": {"warmup_steps": 5, "schedule": "cosine"},
        "train": {**TINY_TRAIN, "mesh": {"data": 0, "seeds": 1}},
    },
}
DOCUMENTS = {
    **{f"experiments/{p.name}": tomllib.loads(p.read_text()) for p in EXPERIMENT_FILES},
    **GENERATED,
}
DATA_TASKS = {name for name, cls in TASKS.items() if not cls.has_dependencies}

# --------------------------------------------------------------------------- TOML writing


def toml_string(text: str) -> str:
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"not a TOML value: {v!r}")


def to_toml(doc: dict) -> str:
    """TOML text of `doc`: top-level values first, then one [section] per top-level table."""
    lines = [
        f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(key)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ mutations

NAMES = [
    "",
    " ",
    "..",
    "../../escaped",
    "/etc/passwd",
    "a/b",
    "C:\\x",
    "~",
    "${HOME}",
    "-rf",
    "learned",
    "assoc_recall",
    "imdb",
    "model.n_layers",
    "x" * 300,
    "ünïcödé",
    "名前",
    "💥",
    "layer.²",
    "layer.٣",
    "ⅷ",
    "nul\x00byte",
    "new\nline",
    "tab\there",
    "\u202eevil",
]
NUMBERS = [0, -1, 1, 2, 3, 7, 1000, 2**31, 2**63 - 1, -(2**63), 0.0, -0.0, 0.5, -1.5, 1e300]
NUMBERS += [-1e300, 5e-324, math.inf, -math.inf, math.nan]

scalars = st.one_of(
    st.sampled_from(NUMBERS),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NAMES),
    st.text(max_size=12),
    st.dates(),
    st.times(),
    st.datetimes(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(NAMES), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8), st.sampled_from(SECTIONS))
ODD_CHARS = ["²", "٣", "ⅷ", "é", "💥", "\x00", "\n", " ", "/", ".", "\\", "-", "_"]


@st.composite
def near(draw, old):
    """A value close to `old`: the same type gone wrong (an odd character, a sign, a size)."""
    if isinstance(old, bool):
        return draw(st.sampled_from([not old, int(old), str(old).lower()]))
    if isinstance(old, int | float):
        return draw(st.sampled_from([-old, old + 1, old - 1, old * 2**40, old / 3, 0, math.nan]))
    if isinstance(old, str):
        odd = draw(st.sampled_from(ODD_CHARS))
        return draw(st.sampled_from([old[:-1] + odd, old + odd, odd + old, old.upper(), old * 2]))
    if isinstance(old, list):
        return draw(st.sampled_from([[], old + old[:1], old[::-1], [old], old[:1] * 3]))
    if isinstance(old, dict):
        return draw(st.sampled_from([{}, dict(list(old.items())[:1]), [old]]))
    return draw(values)


# Words the config understands, to be bent by one character (`layer.0` -> `layer.²`).
WORDS = [*variant_names(), *task_names(), *FREEZABLE, "layer.0", "layer.1", "joint"]
WORDS += ["separate", "float32", "bfloat16", "constant", "cosine", "bytes", "text", "label"]
words = st.one_of(
    st.sampled_from(WORDS + NAMES),
    st.builds(
        lambda w, c, how: [w[:-1] + c, w + c, c + w][how],
        st.sampled_from(WORDS),
        st.sampled_from(ODD_CHARS),
        st.integers(0, 2),
    ),
)


@functools.cache
def typed(tp) -> st.SearchStrategy:
    """Values of annotation `tp`, biased to the edges: what a field of that type may get."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is bool:
        return st.booleans()
    if tp is int:
        ints = [n for n in NUMBERS if isinstance(n, int)]
        return st.one_of(st.sampled_from(ints), st.integers(-3, 70000))
    if tp is float:
        return st.one_of(st.sampled_from(NUMBERS), st.floats())
    if tp is str:
        return words
    if origin is Literal:
        return st.one_of(st.sampled_from(args), words)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(typed(a) for a in args if a is not type(None)))
    if origin in (tuple, list):
        return st.lists(typed(args[0] if args else str), max_size=5)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return st.fixed_dictionaries({}, optional={k: typed(v) for k, v in hints.items()})
    if origin is dict:  # model.attention_settings: a table of settings per variant name
        settings = st.one_of(*(typed(cls.Config) for cls in MIXERS.values()), values)
        return st.dictionaries(words, settings, max_size=3)
    raise TypeError(tp)


@functools.cache
def _hints(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def typed_tables(doc) -> list[tuple[tuple, dict]]:
    """(path, {field: annotation}) of every table of `doc` a config dataclass reads."""
    found = []
    for key, cls in (("model", ModelConfig), ("optim", OptimConfig), ("train", TrainConfig)):
        if isinstance(doc.get(key), dict):
            found.append(((key,), _hints(cls)))
    if isinstance(doc.get("train"), dict) and isinstance(doc["train"].get("mesh"), dict):
        found.append((("train", "mesh"), _hints(MeshConfig)))
    sweep = doc.get("sweep") if isinstance(doc.get("sweep"), dict) else {}
    entries = [(("task",), doc.get("task"))]
    if isinstance(sweep.get("tasks"), list):
        entries += [(("sweep", "tasks", i), t) for i, t in enumerate(sweep["tasks"])]
    for path, table in entries:
        if (
            isinstance(table, dict)
            and isinstance(table.get("name"), str)
            and table["name"] in TASKS
        ):
            found.append((path, _hints(TASKS[table["name"]].Config)))
    if isinstance(sweep.get("variants"), list):
        model = _hints(ModelConfig)
        variant = {"label": str, "attention": model["attention"], "freeze": model["freeze"]}
        found += [
            (("sweep", "variants", i), variant)
            for i, v in enumerate(sweep["variants"])
            if isinstance(v, dict)
        ]
    return found


def paths(node, prefix=()):
    """Every path to a value inside `node` (keys of tables, indices of lists)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, child in items:
        yield (*prefix, key)
        if isinstance(child, dict | list):
            yield from paths(child, (*prefix, key))


def tables(node, prefix=()):
    """Every path to a table inside `node`, the document itself first."""
    if isinstance(node, dict):
        yield prefix
    if isinstance(node, dict | list):
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            yield from tables(child, (*prefix, key))


def at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw):
    """(name, document): a document mutated one to three times."""
    name = draw(st.sampled_from(sorted(DOCUMENTS)))
    doc = json.loads(json.dumps(DOCUMENTS[name]))  # a private copy (the files hold no NaN)
    for _ in range(draw(st.integers(1, 3))):
        kinds = ["typed", "typed", "near", "replace", "wrap", "delete", "add"]
        kind = draw(st.sampled_from(kinds))
        typed_targets = typed_tables(doc)
        if kind == "typed" and typed_targets:  # a field given a bad value of its own type
            path, fields = draw(st.sampled_from(typed_targets))
            field = draw(st.sampled_from(sorted(fields)))
            at(doc, path)[field] = draw(typed(fields[field]))
            continue
        targets = list(paths(doc))
        if kind == "add" or not targets:
            table = at(doc, draw(st.sampled_from(list(tables(doc)))))
            table[draw(keys)] = draw(values)
            continue
        path = draw(st.sampled_from(targets))
        parent, key = at(doc, path[:-1]), path[-1]
        if kind == "near":
            parent[key] = draw(near(parent[key]))
        elif kind == "replace":
            parent[key] = draw(values)
        elif kind == "wrap":  # a value where a table goes, or a list where a value goes
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        else:
            del parent[key]
    return name, tomllib.loads(to_toml(doc))  # what a file holding it would give


# ---------------------------------------------------------------------- the property


class Watch:
    """Records writes, network connections and new processes while armed (an audit hook)."""

    WRITE_EVENTS = {
        "os.mkdir",
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.symlink",
        "os.link",
        "os.truncate",
        "os.chmod",
        "os.utime",
        "shutil.rmtree",
        "shutil.copyfile",
        "shutil.move",
    }
    PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self):
        self.armed, self.seen = False, []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if not self.armed:
            return
        if event == "open":
            _, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & self.WRITE_FLAGS)
            if writes:
                self.seen.append((event, args[0]))
        elif event in self.WRITE_EVENTS | self.PROCESS_EVENTS or event.startswith("socket."):
            self.seen.append((event, args[:2]))

    def __enter__(self):
        self.seen, self.armed = [], True
        return self

    def __exit__(self, *exc):
        self.armed = False


WATCH = Watch()


LOAD_DATASET = ablate.data.load_dataset  # before the module fixture replaces it


def no_data(*args, **kwargs):
    raise AssertionError(f"validation read data: {args} {kwargs}")


def refuse_connection(sock, address, *args):
    WATCH.seen.append(("socket.connect", address))
    raise ConnectionRefusedError(f"tests allow no network connection ({address})")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network at all, and no data read: validation reads neither the hub nor the disk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse_connection)
        mp.setattr(socket.socket, "connect_ex", refuse_connection)
        mp.setattr(ablate.data, "load_dataset", no_data)
        mp.setattr(ablate.data, "stdlib_files", no_data)
        # A hub tokenizer name is fetched to learn its vocabulary (tokenizers is installed):
        # offline, as here, fetching fails, and the task refuses the name with a DataError.
        mp.setattr(tokenizers.Tokenizer, "from_pretrained", offline_tokenizer)
        yield


def offline_tokenizer(name, *args, **kwargs):
    raise OSError(f"offline: tokenizer {name!r} cannot be fetched from the hub")


def task_names_in(doc: dict) -> set[str]:
    """The task names a document's [task] and sweep.tasks give."""
    sweep = doc.get("sweep")
    tasks = sweep.get("tasks") if isinstance(sweep, dict) else None
    entries = [doc.get("task"), *(tasks if isinstance(tasks, list) else [])]
    return {t["name"] for t in entries if isinstance(t, dict) and isinstance(t.get("name"), str)}


def rooted(path: str, doc: dict) -> bool:
    """Whether a problem's path starts at a section or a key of the document."""
    path = re.sub(r" \(in point .*\)$", "", path, flags=re.DOTALL)
    roots = [dotted("", k) for k in (*SECTIONS, *doc)]
    return any(path == k or path.startswith((f"{k}.", f"{k}[")) for k in roots)


def validate(doc: dict, workdir: Path) -> list[str]:
    """Validate `doc` as `ablate train` and `ablate sweep` do; the outcome of each, as text.

    "ok", or "refused" with every problem checked to have a dotted path rooted in the file.
    """
    outcomes = []

    def as_train():
        exp = build_experiment(doc, default_name="fuzz")
        safe_join(workdir, exp.name)
        check_mesh(exp.train.mesh, len(exp.train.seeds), exp.train.batch_size)

    def as_sweep():
        name, points = expand(doc, default_name="fuzz")
        safe_join(workdir, name)
        assert points
        for point in points:
            tc = point.experiment.train
            check_mesh(tc.mesh, len(tc.seeds), tc.batch_size)

    for check in (as_train, as_sweep):
        try:
            check()
            outcomes.append("ok")
        except ConfigError as e:
            assert e.problems, e
            for path, message in e.problems:
                assert path and rooted(path, doc) and message, (path, message)
            outcomes.append("refused")
        except DataError:
            # Raised by a data-backed task reading a tokenizer it cannot find.
            assert task_names_in(doc) & DATA_TASKS, doc
            outcomes.append("bad data")
    return outcomes


def check_property(case, tmp_path_factory):
    name, doc = case
    workdir = tmp_path_factory.getbasetemp() / "fuzz-workdir"  # never made
    with WATCH:
        validate(doc, workdir)
    assert WATCH.seen == [], f"{name}: {WATCH.seen[:5]}"
    assert not workdir.exists()


FUZZ = dict(
    deadline=None,
    database=None,  # hypothesis writes nothing either
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_every_experiment_file_and_generated_one_is_valid_as_written(tmp_path):
    """The unmutated documents are accepted (so the mutations are what gets refused); a
    sweep whose tasks are all in [sweep] has no [task] to train alone."""
    for name, doc in DOCUMENTS.items():
        with WATCH:
            outcomes = validate(json.loads(json.dumps(doc)), tmp_path / "runs")
        assert outcomes == ["ok" if "task" in doc else "refused", "ok"], name
        assert WATCH.seen == [], (name, WATCH.seen)


@settings(max_examples=300, derandomize=True, **FUZZ)
@given(case=mutated())
def test_mutated_experiment_files_are_accepted_or_refused_never_crash(case, tmp_path_factory):
    check_property(case, tmp_path_factory)


@pytest.mark.slow
@settings(max_examples=5000, **FUZZ)
@given(case=mutated())
def test_mutated_experiment_files_never_crash_many_examples(case, tmp_path_factory):
    check_property(case, tmp_path_factory)


SHAPED = [f"experiments/{p.name}" for p in EXPERIMENT_FILES] + ["sweep_every_shape"]


@pytest.mark.parametrize("name", SHAPED)
def test_every_table_and_list_given_another_shape_is_refused(name, tmp_path):
    """Each table and list of a file (sections, sweep.tasks, a task entry, grid, ...) in
    turn given a number (refused), a string, and a list for a table or a table for a list
    (accepted or refused): the random property above reaches each of them only rarely."""
    doc = DOCUMENTS[name]
    containers = [p for p in paths(doc) if isinstance(at(doc, p), dict | list)]
    assert len(containers) >= 4
    for path in containers:
        value = at(doc, path)
        swapped = [value] if isinstance(value, dict) else {str(i): v for i, v in enumerate(value)}
        for other in (3, "x", swapped):
            mutant = json.loads(json.dumps(doc))
            at(mutant, path[:-1])[path[-1]] = other
            mutant = tomllib.loads(to_toml(mutant))
            with WATCH:
                outcomes = validate(mutant, tmp_path / "runs")
            assert WATCH.seen == [], (path, WATCH.seen)
            if other == 3:
                assert "refused" in outcomes, (path, outcomes)


def test_the_issues_examples_are_refused_with_their_paths():
    """sweep = 3, [model] as a number or a list, sweep.tasks = true (the issue's examples)
    and others found by fuzzing or reading: each a ConfigError naming its path."""
    base = json.loads(json.dumps(GENERATED["sweep_every_shape"]))
    cases = {
        "sweep": ({**base, "sweep": 3}, "sweep"),
        "model number": ({**base, "model": 2.5}, "model"),
        "model list": ({**base, "model": [1, 2]}, "model"),
        "tasks": ({**base, "sweep": {**base["sweep"], "tasks": True}}, "sweep.tasks"),
        "variants": ({**base, "sweep": {**base["sweep"], "variants": "learned"}}, "sweep.variants"),
        "grid value": (
            {**base, "sweep": {**base["sweep"], "grid": {"model.d_mlp": 32}}},
            'sweep.grid."model.d_mlp"',
        ),
        "overrides": (
            {**base, "sweep": {**base["sweep"], "tasks": [{"name": "copy", "overrides": 1}]}},
            "sweep.tasks[0].overrides",
        ),
        "nan": ({**base, "optim": {"weight_decay": math.nan}}, "optim.weight_decay"),
        "label": (
            {**base, "sweep": {**base["sweep"], "tasks": [{"name": "copy", "label": "../x"}]}},
            "sweep.tasks[0].label",
        ),
        # str.isdigit() holds for "²", which int() refuses
        "freeze": ({**base, "model": {**base["model"], "freeze": ["layer.²"]}}, "model.freeze[0]"),
    }
    for what, (doc, path) in cases.items():
        with pytest.raises(ConfigError) as e:
            expand(doc)
            pytest.fail(f"{what} was accepted")
        assert path in [p.split(" ")[0] for p, _ in e.value.problems], (what, e.value.problems)


def test_a_hub_dataset_is_never_loaded_by_validation(monkeypatch):
    """A text task pointing at a hub name is validated, as a train and as a sweep, without
    reading the dataset: validation reads only the task's vocabulary, length and knobs."""
    import datasets

    def no_loading(*args, **kwargs):
        raise AssertionError(f"validation loaded a dataset: {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    monkeypatch.setattr(ablate.data, "load_dataset", LOAD_DATASET)  # the real one, here
    doc = GENERATED["task_text_classification"]
    exp = build_experiment(doc)
    assert exp.task.name == "text_classification" and exp.model.vocab_size == exp.task.vocab_size
    assert expand(doc)[1][0].experiment.task.name == "text_classification"
    # The data is read when it is loaded, and only then.
    with pytest.raises(AssertionError, match="validation loaded"):
        exp.task.load()


CLI_CASES = {
    "sweep = 3": ("sweep", "sweep = 3\n", "sweep: must be a table"),
    "model = 2.5": ("train", 'model = 2.5\n[task]\nname = "copy"\n', "model: must be a table"),
    "[[model]]": (
        "sweep",
        '[task]\nname = "copy"\n[[model]]\nd_model = 16\n',
        "model: must be a table",
    ),
    "sweep.tasks = true": (
        "sweep",
        "[sweep]\ntasks = true\n",
        "sweep.tasks: must be a non-empty list",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_shapes_through_the_command_exit_2_without_a_traceback(case, tmp_path):
    """The real command: exit 2, the problem and its path on stderr, no traceback, no folder."""
    command, text, expected = CLI_CASES[case]
    exp_file = tmp_path / "bad.toml"
    exp_file.write_text(text)
    workdir = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "ablate.cli", command, exp_file, "--workdir", workdir, "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not workdir.exists()
