"""ABLATE_MALLOC=keep: the `ablate` command restarts itself once with ablate's GLIBC_TUNABLES.

What the settings buy and cost (page faults and steps/s per training step, large and small
models) is measured by `ablate bench` (its malloc line), not here: the fault count of a small
program depends on glibc's allocation history and is not a stable thing to assert.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from ablate.config import ConfigError
from ablate.malloc import OPT_IN, TUNABLES, wanted

glibc_linux = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
SHOW = "import os, sys; print(os.getpid(), sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))"
# As the `ablate` entry point does: main() without arguments reads sys.argv.
CLI = f"{SHOW}; sys.stdout.flush(); from ablate.cli import main; sys.argv[1:] = ['list']; sys.exit(main())"


@pytest.mark.skipif(not glibc_linux, reason="the settings are for glibc on Linux")
def test_wanted_only_when_asked_and_not_set():
    assert wanted({OPT_IN: "keep"})
    assert not wanted({})
    assert not wanted({OPT_IN: ""})
    assert not wanted({OPT_IN: "keep", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


def test_a_misspelt_request_is_refused_with_what_is_allowed():
    with pytest.raises(ConfigError, match="ABLATE_MALLOC: must be 'keep' or unset, got 'yes'"):
        wanted({OPT_IN: "yes"})


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_IN)}
    return subprocess.run(
        [sys.executable, "-c", code, "extra", "args"],
        env={**base, **env},
        capture_output=True,
        text=True,
    )


def shown(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.split()[0].isdigit()]


@pytest.mark.skipif(not glibc_linux, reason="the settings are for glibc on Linux")
def test_keep_restarts_the_command_once_in_the_same_process_with_the_same_arguments():
    done = run_python(CLI, ABLATE_MALLOC="keep")
    assert done.returncode == 0, done.stderr
    before, after = shown(done)  # before the restart, then once after it
    pid = before.split()[0]
    assert before == f"{pid} ['extra', 'args'] None"
    assert after == f"{pid} ['extra', 'args'] {TUNABLES}"
    assert "attention variants:" in done.stdout  # then the command ran


@pytest.mark.slow
def test_no_restart_by_default_with_your_tunables_or_from_library_calls():
    for env in ({}, {"ABLATE_MALLOC": "keep", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}):
        done = run_python(CLI, **env)
        assert done.returncode == 0 and len(shown(done)) == 1, done.stdout
    # Library code (main with arguments, as tests and scripts call it) never restarts.
    done = run_python(f"{SHOW}; from ablate.cli import main; main(['list'])", ABLATE_MALLOC="keep")
    assert done.returncode == 0 and len(shown(done)) == 1, done.stdout


def test_the_command_refuses_a_misspelt_request_before_doing_anything():
    done = run_python(CLI, ABLATE_MALLOC="on")
    assert done.returncode == 2
    assert "ABLATE_MALLOC: must be 'keep' or unset, got 'on'" in done.stderr
    assert "attention variants:" not in done.stdout
