"""The run folder's file writes and reads: atomic replacement, and one rule for JSON lines."""

import json
import os
import stat

import numpy as np
import pytest

from ablate.cli import EXIT_IO, main
from ablate.logging import MetricsFile
from ablate.runfolder import (
    RESULTS_FILE,
    DamagedFile,
    append_jsonl,
    read_jsonl,
    write_atomic,
    write_jsonl,
)

ROWS = [{"step": 0, "seed": 0, "loss": 2.5}, {"step": 10, "seed": 0, "loss": 1.5}]


def lines(*texts: str) -> bytes:
    return "".join(texts).encode()


def test_read_jsonl_of_no_file_and_of_an_empty_file_is_empty(tmp_path):
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


def test_read_jsonl_skips_blank_lines_anywhere(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(lines("\n", json.dumps(ROWS[0]), "\n  \n\n", json.dumps(ROWS[1]), "\n\n"))
    assert read_jsonl(path) == ROWS


@pytest.mark.parametrize(
    "cut",
    [
        '{"step": 20, "seed": 0, "lo',  # cut inside a key, no newline
        '{"step": 20, "seed": 0, "loss": 1.0',  # cut before the closing brace
        '{"step": 20, "seed": 0, "loss": 1.0\n',  # a newline, yet not a whole object
        "\0\0\0\0",  # the zeros a crashed filesystem may leave at the end
        "[1, 2]",  # JSON, but not a row
    ],
)
def test_read_jsonl_drops_a_last_line_that_is_not_a_whole_object(tmp_path, cut):
    path = tmp_path / "m.jsonl"
    path.write_bytes(lines(*(json.dumps(r) + "\n" for r in ROWS), cut))
    assert read_jsonl(path) == ROWS
    path.write_bytes(lines(*(json.dumps(r) + "\n" for r in ROWS), cut, "\n\n"))
    assert read_jsonl(path) == ROWS  # blank lines after it change nothing


def test_read_jsonl_drops_a_last_line_cut_inside_a_multibyte_character(tmp_path):
    path = tmp_path / "m.jsonl"
    whole = json.dumps({"step": 1, "note": "é"}, ensure_ascii=False).encode()
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + whole[: whole.index(b"\xc3") + 1])
    assert read_jsonl(path) == [ROWS[0]]


def test_read_jsonl_keeps_a_whole_last_line_without_a_newline(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(lines(json.dumps(ROWS[0]), "\n", json.dumps(ROWS[1])))
    assert read_jsonl(path) == ROWS


@pytest.mark.parametrize("bad", ['{"step": 5, "se', "not json", "17", "\xff"])
def test_read_jsonl_refuses_a_damaged_line_before_the_last_naming_it(tmp_path, bad):
    path = tmp_path / "m.jsonl"
    text = "\n".join([json.dumps(ROWS[0]), "", bad, json.dumps(ROWS[1])]) + "\n"
    path.write_bytes(text.encode("latin-1") if bad == "\xff" else text.encode())
    with pytest.raises(DamagedFile, match=r"m\.jsonl, line 3: not a JSON object"):
        read_jsonl(path)


def test_append_jsonl_writes_numpy_values_as_plain_json(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, [{"step": np.int64(3), "alignment": np.array([[0.5, 1.0]])}])
    append_jsonl(path, [ROWS[0]])
    assert read_jsonl(path) == [{"step": 3, "alignment": [[0.5, 1.0]]}, ROWS[0]]


def test_write_atomic_replaces_content_with_ordinary_permissions(tmp_path):
    path = tmp_path / "final.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    plain = tmp_path / "plain"
    plain.write_text("")  # what the umask gives a file made the ordinary way
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.json", "plain"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    write_jsonl(path, ROWS)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_jsonl(path, ROWS[:1])
    assert read_jsonl(path) == ROWS
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]  # no temporary left


def test_write_atomic_hides_the_half_written_file_from_readers_that_pick_by_name(
    tmp_path, monkeypatch
):
    # TensorBoard reads every file whose name holds "tfevents": a temporary named after
    # the event file would be read half-written.
    seen = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(src), replace(src, dst)))
    path = tmp_path / "events.out.tfevents.123.host"
    write_atomic(path, b"records")
    assert path.read_bytes() == b"records"
    assert len(seen) == 1 and "tfevents" not in os.path.basename(seen[0])


def test_metrics_truncation_drops_later_rows_and_a_cut_last_line(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    metrics.append(ROWS)
    with metrics.path.open("a") as f:
        f.write('{"step": 20, "se')
    metrics.truncate_after(5)
    assert metrics.path.read_text() == json.dumps(ROWS[0]) + "\n"
    metrics.append([ROWS[1]])
    assert metrics.rows() == ROWS


def test_a_fresh_start_empties_even_a_damaged_metrics_file(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    metrics.path.write_text("garbage\n" + json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DamagedFile):
        metrics.truncate_after(0)  # a resume would keep rows it cannot read: refused
    metrics.truncate_after(-1)
    assert metrics.path.read_text() == ""


def test_a_damaged_results_table_exits_with_the_io_code_naming_the_line(tmp_path, capsys):
    (tmp_path / RESULTS_FILE).write_text("{]\n" + json.dumps({"run": "a"}) + "\n")
    assert main(["report", str(tmp_path)]) == EXIT_IO
    assert f"{tmp_path / RESULTS_FILE}, line 1: not a JSON object" in capsys.readouterr().err


def _as_written_before_variant_settings(config: dict, **old_values) -> dict:
    """`config` as config.json was written before variants owned their settings."""
    old = json.loads(json.dumps(config))
    del old["model"]["attention_settings"]
    old["model"] |= {"n_classes": 0, "random_scale": 1.0, "gaussian_sigma": 1.0,
                     "gaussian_offsets": []} | old_values  # fmt: skip
    return old


def test_an_old_run_folder_resumes_and_probes_with_its_settings(tmp_path):
    from ablate.config import upgrade_saved
    from ablate.experiment import build_experiment
    from ablate.runfolder import CONFIG_FILE, check_run_config

    data = {
        "task": {"name": "copy"},
        "model": {"attention": [["random_fixed", "gaussian"], "learned"], "n_heads": 2},
    }
    config = build_experiment(data).to_dict()
    # Written at the old defaults: the same run, so resuming sees no change.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(json.dumps(_as_written_before_variant_settings(config)))
    assert check_run_config(run_dir, config, allow_change=False) == []
    # Old non-default values move to the variants that used them, and build.
    old = _as_written_before_variant_settings(config, random_scale=0.5, gaussian_sigma=2.0)
    upgraded = upgrade_saved(old)
    assert upgraded["model"]["attention_settings"] == {
        "gaussian": {"sigma": 2.0, "offsets": []},
        "random_fixed": {"scale": 0.5},
    }
    settings = build_experiment(upgraded).model.attention_settings
    assert settings["random_fixed"].scale == 0.5 and settings["gaussian"].sigma == 2.0
    assert old["model"]["random_scale"] == 0.5  # the saved dict itself is left alone


def test_a_run_folder_from_before_the_eval_schedule_resumes_as_every(tmp_path):
    from ablate.experiment import build_experiment
    from ablate.runfolder import CONFIG_FILE, check_run_config

    config = build_experiment({"task": {"name": "copy"}}).to_dict()
    old = json.loads(json.dumps(config))
    del old["train"]["eval_schedule"], old["train"]["eval_points"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(json.dumps(old))
    assert check_run_config(run_dir, config, allow_change=False) == []
    # It ran on the "every" schedule: asking for "log" is a change.
    log = build_experiment({"task": {"name": "copy"}, "train": {"eval_schedule": "log"}})
    changed = check_run_config(run_dir, log.to_dict(), allow_change=True)
    assert changed == ["train.eval_schedule: 'every' -> 'log'"]


def test_an_old_experiment_file_is_told_where_a_moved_field_went():
    from ablate.config import ConfigError
    from ablate.experiment import build_experiment

    with pytest.raises(ConfigError) as info:
        build_experiment({"task": {"name": "copy"}, "model": {"gaussian_sigma": 2.0}})
    assert info.value.problems == [
        ("model.gaussian_sigma", "moved to model.attention_settings.gaussian.sigma")
    ]
