"""Baselines end to end: real pytest runs (pytester, in a subprocess) save runs and compare with
them, against mock servers on loopback: a fast one, and one three times slower to first token."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmload.baseline import machine_id
from pytest_llmload.mock import MockServer

FAST = "ttft=20ms,itl=2ms,tokens=6,jitter=0.2"
SLOW = "ttft=60ms,itl=2ms,tokens=6,jitter=0.2"
BASE_ARGS = ["-p", "no:cacheprovider"] + (
    ["-p", "no:asyncio"] if importlib.util.find_spec("pytest_asyncio") else []
)
TEST_FILE = """
import pytest

@pytest.mark.llm_load(requests=60, concurrency=6)
async def test_story(llm):
    out = await llm.astream("Tell me a story.")
    assert out.text
"""


@pytest.fixture(scope="module")
def fast() -> Iterator[MockServer]:
    with MockServer.start(FAST) as server:
        yield server


@pytest.fixture(scope="module")
def slow() -> Iterator[MockServer]:
    with MockServer.start(SLOW) as server:
        yield server


def run(pytester: pytest.Pytester, server: MockServer, *args: str) -> Any:
    endpoint = ["--llm-model", "openai/mock", "--llm-api-base", server.base_url]
    return pytester.runpytest_subprocess(*BASE_ARGS, *endpoint, *args, timeout=120)


def output(result: Any) -> str:
    return "\n".join(result.outlines + result.errlines)


def saved(pytester: pytest.Pytester) -> list[Path]:
    folder = pytester.path / ".llmload" / machine_id()
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def compare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_llmload", "compare", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_a_slower_server_fails_the_test_and_the_command_agrees(
    pytester: pytest.Pytester, fast: MockServer, slow: MockServer
) -> None:
    pytester.makepyfile(test_story=TEST_FILE)
    first = run(pytester, fast, "--llm-save", "main")
    assert first.ret == 0, output(first)
    [base] = saved(pytester)
    assert base.name.startswith("0001_main_") and base.name.endswith(".json")
    first.stdout.fnmatch_lines([f"LLM load: saved this run as .llmload/{machine_id()}/0001_main_*"])
    doc = json.loads(base.read_text())
    assert doc["tests"][0]["fingerprint"]["api_host"] == "127.0.0.1"
    assert len(doc["tests"][0]["records"]) == 60
    assert doc["saved"]["label"] == base.stem

    second = run(pytester, slow, "--llm-compare", "--llm-compare-fail", "ttft.p50:10%",
                 "--llm-compare-fail", "itl.p50:50%", "--llm-save", "pr",
                 "--llm-report", "run.json", "--junitxml", "junit.xml")
    assert second.ret == 1, output(second)
    text = output(second)
    second.stdout.fnmatch_lines([
        f"*regression: ttft.p50 +*% (95% CI +*..+*%) > 10% vs baseline {base.stem}",
        f"  vs baseline {base.stem} (95% CI of the change, bootstrap over requests):",
        "*baseline*new*change*95% CI",
        "    ttft.p50 *ms*ms*+*%*",
        "  REGRESSION  ttft.p50:10%: ttft.p50 +*",
        "  ok          itl.p50:50%: itl.p50 *not confidently worse by more than 50%",
        "FAILED test_story.py::test_story - Failed: regression: ttft.p50*",
    ])
    assert "1 failed" in text
    junit = ET.parse(pytester.path / "junit.xml").getroot()
    [failure] = junit.iter("failure")
    assert "regression: ttft.p50" in (failure.get("message") or "")
    report = json.loads((pytester.path / "run.json").read_text())
    section = report["compare"]
    assert section["baseline"] == base.stem and section["regressions"] == 1
    [test] = section["tests"]
    assert test["comparable"] and test["checks"][0]["status"] == "regression"
    row = next(r for r in test["rows"] if r["key"] == "ttft.p50")
    assert row["baseline"] < row["new"] and row["change_ci"][0] > 0.10
    assert row["count_baseline"] == row["count_new"] == 60

    new = saved(pytester)[-1]
    assert new.name.startswith("0002_pr_")
    done = compare_cli(str(base), str(new), "--json", "cli.json", cwd=pytester.path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "regression: ttft.p50 +" in done.stdout
    # one function computed both: the command's JSON is the run's, to the last digit
    assert json.loads((pytester.path / "cli.json").read_text()) == section
    # the same run against itself: nothing regressed
    same = compare_cli(str(new), str(new), cwd=pytester.path)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "LLM load compare: no regression in 1 compared tests" in same.stdout


def test_a_different_configuration_is_not_comparable_and_gets_no_verdict(
    pytester: pytest.Pytester, fast: MockServer, slow: MockServer
) -> None:
    pytester.makepyfile(test_story=TEST_FILE)
    assert run(pytester, fast, "--llm-save", "main").ret == 0
    result = run(pytester, slow, "--llm-compare", "main", "--llm-max-tokens", "6",
                 "--llm-compare-fail", "ttft.p50:10%", "--llm-save", "other")
    assert result.ret == 0, output(result)  # three times slower, but not comparable
    result.stdout.fnmatch_lines([
        ("  not comparable with baseline 0001_main_*: the fingerprints differ in "
         "max_tokens (None -> 6)"),
    ])
    assert "REGRESSION" not in output(result) and "regression:" not in output(result)
    base, new = saved(pytester)
    done = compare_cli(str(base), str(new), cwd=pytester.path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no load test of" in done.stderr and "max_tokens (None -> 6)" in done.stderr
    # a changed test body changes the workload's fingerprint
    pytester.makepyfile(test_story=TEST_FILE.replace("a story", "a poem"))
    result = run(pytester, fast, "--llm-compare", "main")
    assert result.ret == 0, output(result)
    result.stdout.fnmatch_lines([("  not comparable with baseline 0001_main_*: the fingerprints "
                                  "differ in workload (*")])


def test_a_marker_loosens_a_check_and_the_ini_file_sets_them(
    pytester: pytest.Pytester, fast: MockServer, slow: MockServer
) -> None:
    pytester.makepyfile(test_story=TEST_FILE, test_other=TEST_FILE.replace(
        "@pytest.mark.llm_load(requests=60, concurrency=6)",
        "@pytest.mark.llm_load(requests=60, concurrency=6, compare_fail=['ttft.p50:1000%'])",
    ).replace("test_story", "test_loose"))
    pytester.makeini("[pytest]\nllm_compare_fail =\n    ttft.p50:10%\nllm_storage = runs\n")
    assert run(pytester, fast, "--llm-save", "main").ret == 0
    assert (pytester.path / "runs" / machine_id()).is_dir()
    result = run(pytester, slow, "--llm-compare=1")
    assert result.ret == 1, output(result)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_story.py::test_story - Failed: regression: *"])
    result.stdout.fnmatch_lines(["  ok          ttft.p50:1000%: *"])


def test_nothing_saved_yet_is_a_note_and_bad_values_are_usage_errors(
    pytester: pytest.Pytester, fast: MockServer
) -> None:
    pytester.makepyfile(test_story=TEST_FILE)
    result = run(pytester, fast, "--llm-compare", "--llm-compare-fail", "ttft.p50:10%")
    assert result.ret == 0, output(result)
    result.stdout.fnmatch_lines([("note: --llm-compare: nothing is saved in * yet, so there is "
                                  "no baseline to compare with; save one with --llm-save NAME or "
                                  "--llm-autosave.")])
    for args, says in [
        (["--llm-compare", "0042"], "--llm-compare: no saved run '0042' in *"),
        (["--llm-compare-fail", "ttft.max:5%"], "*--llm-compare-fail: max has no confidence*"),
        (["--llm-save", "a b"], "*--llm-save: expected a name for the saved run*'a b'*"),
    ]:
        bad = run(pytester, fast, *args)
        assert bad.ret == pytest.ExitCode.USAGE_ERROR, output(bad)
        bad.stderr.fnmatch_lines([f"*{says}"])
        assert "Traceback" not in output(bad)


def test_autosave_names_the_run_after_the_commit(
    pytester: pytest.Pytester, fast: MockServer
) -> None:
    pytester.makepyfile(test_story=TEST_FILE)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for cmd in (["init", "-q"], ["add", "test_story.py"], ["commit", "-qm", "x"]):
        subprocess.run([*git, *cmd], cwd=pytester.path, check=True, capture_output=True)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=pytester.path,
                            capture_output=True, text=True, check=True).stdout.strip()
    result = run(pytester, fast, "--llm-autosave")
    assert result.ret == 0, output(result)
    [path] = saved(pytester)
    assert path.name.startswith(f"0001_{commit}_")


def test_each_worker_drives_a_share_and_the_controller_compares_the_merged_figures(
    pytester: pytest.Pytester, fast: MockServer, slow: MockServer
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_story=TEST_FILE)
    assert run(pytester, fast, "--llm-save", "main").ret == 0
    result = run(pytester, slow, "-n", "2", "--dist", "each", "--llm-compare",
                 "--llm-compare-fail", "ttft.p50:10%", "--llm-report", "run.json")
    assert result.ret == 1, output(result)
    result.stdout.fnmatch_lines([
        "*LLM load: SLOs checked on the figures merged from the workers (--dist each)*",
        "FAILED test_story.py::test_story",
        "  regression: ttft.p50 +*% (95% CI +*..+*%) > 10% vs baseline 0001_main_*",
    ])
    report = json.loads((pytester.path / "run.json").read_text())
    [test] = report["compare"]["tests"]
    row = next(r for r in test["rows"] if r["key"] == "ttft.p50")
    assert row["count_new"] == 60  # the merged figures, not one worker's share
