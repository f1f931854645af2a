"""The reports people look at: the HTML page (in headless Chromium, offline), the Markdown summary
and $GITHUB_STEP_SUMMARY, PNG plots, the ``report`` command, and their figures against the JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from array import array
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pytest_llmload import render
from pytest_llmload.__main__ import main
from pytest_llmload.records import NS, RequestRecord
from pytest_llmload.report import write_json_report
from pytest_llmload.result import build_result, result_to_dict
from pytest_llmload.settings import settings_from_dict

pytest.importorskip("matplotlib")

SUITE = """
import pytest

@pytest.mark.llm_load(requests=30, rps=40, slo=["ttft.p99<2s", "itl.p95<=500ms", "error_rate<60%"])
def test_holds(llm):
    llm.stream("Tell me a story.")

@pytest.mark.llm_load(requests=20, rps=40, slo=["ttft.p99<1ms"])
def test_breaks(llm):
    llm.stream("Tell me a story.")
"""
#: Two kinds of failure: HTTP 500s and streams dropped mid-way.
MOCK = "ttft=15ms,itl=2ms,tokens=16,error_rate=0.15,fault=drop,fault_rate=0.15"
PREVIOUS_STEP = "## an earlier step's summary\n"


class Run:
    def __init__(self, root: Path, proc: subprocess.CompletedProcess[str]) -> None:
        self.root = root
        self.proc = proc
        self.json = root / "run.json"
        self.html = root / "out" / "report.html"
        self.markdown = root / "out" / "summary.md"
        self.plots = root / "plots"
        self.step_summary = root / "step_summary.md"

    def doc(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.json.read_text())
        return data


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One real pytest run against the mock, every report asked for."""
    root = tmp_path_factory.mktemp("reports")
    (root / "test_suite.py").write_text(SUITE)
    (root / "step_summary.md").write_text(PREVIOUS_STEP)
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(root / "step_summary.md")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test_suite.py", "-p", "no:cacheprovider",
         "-p", "no:xdist", "--llm-model", "mock", "--llm-mock", MOCK,
         "--llm-report", "run.json", "--llm-html", "out/report.html",
         "--llm-markdown", "out/summary.md", "--llm-plots", "plots"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    r = Run(root, proc)
    assert r.json.exists(), proc.stdout + proc.stderr
    return r


def test_the_run_says_where_the_reports_went_and_its_exit_code_stands(run: Run) -> None:
    out = run.proc.stdout
    assert run.proc.returncode == 1, out  # test_breaks failed its SLO
    assert f"HTML report written to {run.html}" in out
    assert f"Markdown summary written to {run.markdown}" in out
    assert "Markdown summary appended to $GITHUB_STEP_SUMMARY" in out
    assert re.search(r"\d+ PNG plots written to ", out)
    verdicts = {t["nodeid"]: t["verdict"] for t in run.doc()["tests"]}
    assert verdicts == {"test_suite.py::test_holds": "PASS", "test_suite.py::test_breaks": "FAIL"}


# -- the page in a browser ------------------------------------------------------------------------


def _report(*args: str) -> int:
    """``python -m pytest_llmload report ...`` in its own process: matplotlib is imported fresh
    there, whatever other tests of this process did to ``sys.modules``."""
    return subprocess.run([sys.executable, "-m", "pytest_llmload", "report", *args],
                          capture_output=True, text=True, timeout=300, check=False).returncode


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browse(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``page`` with the network off (every host unresolvable, a dead
    proxy), its console written to stderr."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp / 'profile'}",
         "--window-size=1280,2600", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_console_check_sees_errors(tmp_path: Path) -> None:
    """The browser test below can fail: a page that logs an error is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("broken")</script>'
                    "</body></html>")
    proc = _browse(page, tmp_path, "--dump-dom")
    assert any("broken" in line for line in _console(proc.stderr)), proc.stderr


def _series(dom: str) -> dict[str, list[str]]:
    """Per plot (``t0-latency`` ...): the data series drawn, from the ids the plots give them."""
    found: dict[str, list[str]] = {}
    for m in re.finditer(r'id="(t\d+-[a-z]+)-series-([^"]+)"', dom):
        found.setdefault(m.group(1), []).append(m.group(2))
    return found


def test_the_page_loads_offline_without_console_errors_and_draws_its_plots(
    run: Run, tmp_path: Path
) -> None:
    proc = _browse(run.html, tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr
    assert _console(proc.stderr) == []
    dom = proc.stdout
    assert "LLM load report" in dom
    series = _series(dom)
    doc = run.doc()
    for i, test in enumerate(doc["tests"]):
        kinds = len(test["error_types"])
        assert sorted(series[f"t{i}-latency"]) == sorted(
            ["E2E", "TTFT", *(f"failed_{k}" for k in test["error_types"])]
        ), test["nodeid"]
        assert kinds >= 1
        assert series[f"t{i}-load"] == ["in_flight", "tokens_per_s"]
        assert series[f"t{i}-ttft"] == ["TTFT"]
        assert series[f"t{i}-itl"] == ["ITL"]
        assert series[f"t{i}-errors"] == ["count"]
    # the SLO limits are drawn on the distributions (the holding test's, within the data)
    assert "SLO itl.p95&lt;=500ms" in dom or "SLO itl.p95<=500ms" in dom


def test_a_screenshot_shows_the_plots(run: Run, tmp_path: Path) -> None:
    from PIL import Image

    from pytest_llmload import plots

    shot = tmp_path / "page.png"
    proc = _browse(run.html, tmp_path, f"--screenshot={shot}")
    assert shot.exists(), proc.stderr
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 200  # not a blank page

    def near(hex_color: str) -> int:
        want = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
        return sum(n for n, c in colors if all(abs(a - b) < 60 for a, b in zip(c, want)))

    # the series' own colours are on screen: dots, bars and lines were painted
    assert near(plots.TTFT_COLOR) > 500
    assert near(plots.E2E_COLOR) > 200
    assert near(plots.TOKENS_COLOR) > 500


def test_the_page_references_nothing_outside_itself(run: Run) -> None:
    page = run.html.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page, flags=re.IGNORECASE)
    assert refs  # the summary links to each test's section
    assert [r for r in refs if re.match(r"\s*(https?:)?//", r, flags=re.IGNORECASE)] == []
    assert not re.search(r"<(script|link|iframe|img)\b", page, flags=re.IGNORECASE)


# -- figures against the JSON ---------------------------------------------------------------------


class _Cells(HTMLParser):
    """Text of the elements carrying data-metric/data-stat or data-slo, per test section."""

    def __init__(self) -> None:
        super().__init__()
        self.test: int | None = None
        self.key: tuple[str, ...] | None = None
        self.cells: dict[tuple[Any, ...], str] = {}
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("data-test") is not None:
            self.test = int(a["data-test"] or 0)
        if self.test is None:
            return
        if a.get("data-metric") and a.get("data-stat"):
            self.key = ("figure", a["data-metric"] or "", a["data-stat"] or "")
        elif tag == "tr" and a.get("data-slo"):
            self.slo = a["data-slo"]
        elif tag == "td" and a.get("class") == "observed":
            self.key = ("slo", self.slo)
        self.text = ""

    def handle_data(self, data: str) -> None:
        self.text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.key is not None:
            self.cells[(self.test, *self.key)] = self.text.strip()
            self.key = None


def _close(shown: str, value: float, scale: float = 1.0) -> None:
    """``shown`` (a number as printed, e.g. '207', '20.8', '0.207') is ``value * scale``
    rounded to the digits shown."""
    # a figure may carry its confidence interval after it ('15.9 [15.6, 16.3]'): the figure first
    figure = shown.split(" [", 1)[0]
    number = float(figure)
    digits = len(figure.split(".")[1]) if "." in figure else 0
    assert abs(number - value * scale) <= 0.5 * 10 ** -digits + 1e-9, (shown, value)


def _slo_number(text: str, unit: str) -> float:
    number, _, shown_unit = text.partition(" ") if unit != "%" else (text[:-1], "", "%")
    assert shown_unit == unit, text
    return float(number)


SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6, "%": 100.0}


def test_numbers_in_the_page_and_the_markdown_are_the_json_reports(run: Run) -> None:
    doc = run.doc()
    parser = _Cells()
    parser.feed(run.html.read_text())
    md = run.markdown.read_text()
    checked = 0
    for i, test in enumerate(doc["tests"]):
        section = md.split(f"`{test['nodeid']}`\n", 1)[1].split("\n### ", 1)[0]
        md_rows = {cells[0]: cells[1:] for cells in (
            [c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| "))}
        for label, metric in render.LATENCY_ROWS:
            value_of = test["metrics"][metric]
            for stat in render.TABLE_STATS:
                _close(parser.cells[(i, "figure", metric, stat)], value_of[stat], 1e3)
                checked += 1
            for j, stat in enumerate(render.MARKDOWN_STATS):
                _close(md_rows[label][j], value_of[stat], 1e3)
                checked += 1
            assert md_rows[label][-1] == str(value_of["count"])
        for slo in test["slo"]:
            label = slo["expr"].split("<")[0].split(">")[0]
            shown = parser.cells[(i, "slo", label)]
            _close(str(_slo_number(shown, slo["unit"])), slo["observed"], SCALE.get(slo["unit"], 1))
            md_shown = md_rows[f"`{label}`"][0]
            assert md_shown == shown  # same text in both
            assert md_rows[f"`{label}`"][3] == slo.get("verdict", "PASS" if slo["passed"] else
                                                   "FAIL")
            checked += 1
    assert checked > 50


def test_the_step_summary_is_appended_with_every_load_tests_verdict(run: Run) -> None:
    text = run.step_summary.read_text()
    assert text.startswith(PREVIOUS_STEP)  # appended, as GitHub expects: earlier steps kept
    for test in run.doc()["tests"]:
        assert re.search(rf"### \S+ {test['verdict']} `{re.escape(test['nodeid'])}`", text)
    assert text[len(PREVIOUS_STEP):] == run.markdown.read_text()


def test_png_plots_are_written_per_test(run: Run) -> None:
    from PIL import Image

    names = sorted(p.name for p in run.plots.iterdir())
    for test in ("test_suite-test_holds", "test_suite-test_breaks"):
        for plot in ("latency", "load", "ttft", "itl", "errors"):
            assert f"{test}-{plot}.png" in names
    image = Image.open(run.plots / "test_suite-test_holds-latency.png")
    assert image.size[0] > 800 and len(image.convert("RGB").getcolors(1 << 20) or []) > 50


def test_the_report_command_renders_the_same_reports_from_the_saved_json(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html, md = tmp_path / "again.html", tmp_path / "again.md"
    assert _report(str(run.json), "--html", str(html), "--markdown", str(md)) == 0
    assert md.read_text() == run.markdown.read_text()

    def body(text: str) -> str:  # the page names its source file and when it was rendered
        return re.sub(r'<p class="sub">.*?</p>', "", text)

    assert body(html.read_text()) == body(run.html.read_text())
    capsys.readouterr()
    assert main(["report", str(run.json)]) == 0  # no output option: the Markdown, printed
    assert capsys.readouterr().out == run.markdown.read_text()


def test_the_report_command_refuses_unusable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "Cannot read the LLM load report" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "tests": [{"nodeid": "t", "records": [{"start": "x", '
                   '"chunks": [], "error_type": null}]}]}')
    assert main(["report", str(bad), "--markdown", str(tmp_path / "o.md")]) == 2
    assert "record is malformed" in capsys.readouterr().err


# -- size, sampling and other features' data -------------------------------------------------------


def _synthetic(path: Path, n: int, *, extra: dict[str, Any] | None = None) -> None:
    """A report of ``n`` requests of 64 one-token chunks, 2 % of them failed."""
    records = []
    for i in range(n):
        start = i * NS // 100
        ok = i % 50 != 7
        ttft = (150 + (i * 37) % 100 + (900 if i % 997 == 0 else 0)) * 1_000_000
        chunks = array("q", (start + ttft + k * 20_000_000 for k in range(64))) if ok else \
            array("q")
        records.append(RequestRecord(
            start_ns=start, intended_start_ns=start, chunk_ns=chunks,
            chunk_tokens=array("l", [1] * len(chunks)),
            end_ns=(chunks[-1] if ok else start + 30_000_000), output_tokens=len(chunks),
            error_type=None if ok else ("http_500" if i % 100 == 7 else "timeout"),
            error=None if ok else "boom", transport="sse", wall_start=1.7e9 + start / NS,
        ))
    settings = settings_from_dict({"requests": n, "rps": 100.0, "arrival": "constant",
                                   "slo": ["ttft.p99<2s", "itl.p95<=25ms"]})
    result = build_result("tests/test_big.py::test_big", records, settings, None,
                          transport="sse", is_load_test=True)
    entry = result_to_dict(result)
    entry.update(extra or {})
    write_json_report(path, config={"model": "mock"}, tests=[entry])


def test_ten_thousand_requests_give_a_page_under_5_mb_that_says_it_sampled(
    tmp_path: Path,
) -> None:
    source = tmp_path / "big.json"
    _synthetic(source, 10_000)
    page = tmp_path / "big.html"
    assert _report(str(source), "--html", str(page)) == 0
    size = page.stat().st_size
    assert size < 5_000_000, size
    text = page.read_text()
    assert f"at most {2000:,} successful requests per series" in text
    assert "TTFT: 2,000 of 9,800 requests drawn" in text
    # the tail is kept: every request slower than p99 TTFT is on the plot (ten of them here)
    assert len(re.findall(r'id="t0-latency-series-TTFT"', text)) == 1


def test_other_features_data_and_intervals_are_shown_when_present(tmp_path: Path) -> None:
    source = tmp_path / "extra.json"
    _synthetic(source, 300, extra={
        "verdict": "INCONCLUSIVE",
        "capacity": {"probes": [{"rate": 5, "ttft_p99": 0.2}, {"rate": 10, "ttft_p99": 0.4}],
                     "limit": 0.5},
        "server_metrics": {
            "url": "http://127.0.0.1:8000/metrics", "interval": 1.0, "scrapes": 3, "t": [0, 1, 2],
            "series": {
                "requests_running": {"kind": "gauge", "min": 1.0, "mean": 2.67, "max": 4.0,
                                     "last": 3.0, "values": [1, 4, 3]},
                "generation_tokens": {"kind": "counter", "delta": 90.0, "rate": 45.0,
                                      "values": [10, 50, 100]},
            },
        },
    })
    doc = json.loads(source.read_text())
    doc["tests"][0]["slo"][0]["ci"] = {"low": 0.19, "high": 0.26, "confidence": 0.95}
    doc["tests"][0]["slo"][0]["verdict"] = "INCONCLUSIVE"
    doc["tests"][0]["metrics"]["ttft"]["ci"] = {"p99": {"low": 0.2, "high": None}}
    doc["compare"] = {"baseline": "0001_main", "regressions": 0, "not_comparable": 1, "tests": [
        {"nodeid": doc["tests"][0]["nodeid"], "baseline": "0001_main", "comparable": False,
         "reason": "the fingerprints differ in max_tokens (64 -> 128)", "rows": [],
         "checks": [], "regressions": []}]}
    source.write_text(json.dumps(doc))
    page, md = tmp_path / "extra.html", tmp_path / "extra.md"
    assert _report(str(source), "--html", str(page), "--markdown", str(md)) == 0
    text = page.read_text()
    assert 'data-verdict="INCONCLUSIVE"' in text
    assert "[0.19 s, 0.26 s]" in text and "[0.19 s, 0.26 s]" in md.read_text()
    assert "[200, -]" in text  # an upper side the samples could not bound
    for key in ("compare", "capacity", "server_metrics"):
        assert f'data-extra="{key}"' in text
    assert 'id="t0-capacity-series-probes"' in text
    assert "max_tokens (64 -&gt; 128)" in text  # the comparison, as the terminal prints it
    assert 'id="t0-server-series-requests_running"' in text
    assert 'id="t0-server-series-generation_tokens"' in text
    assert "<td>2.67</td>" in text  # the series' figures as the JSON has them
    assert "INCONCLUSIVE" in md.read_text()


def test_a_report_without_verdicts_tests_or_records_still_renders(tmp_path: Path) -> None:
    source = tmp_path / "old.json"
    plain = result_to_dict(build_result("t.py::test_plain", [], None, None, transport="sse",
                                        is_load_test=False))
    write_json_report(source, config={}, tests=[plain])
    page = tmp_path / "old.html"
    assert _report(str(source), "--html", str(page)) == 0
    assert "Tests without llm_load" in page.read_text()


# -- options ---------------------------------------------------------------------------------------


def test_html_without_matplotlib_is_a_usage_error_naming_the_extra(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(render, "plotting_available", lambda: False)
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest("-p", "no:cacheprovider", "--llm-html", "r.html")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([("*--llm-html draws its plots with matplotlib, which is not "
                                 "installed*pytest-llmload?report?*")])
    # the Markdown summary needs nothing more
    result = pytester.runpytest("-p", "no:cacheprovider", "--llm-markdown", "r.md")
    assert result.ret == pytest.ExitCode.OK


def test_plots_into_a_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass")
    (pytester.path / "taken").write_text("")
    result = pytester.runpytest("-p", "no:cacheprovider", "--llm-plots", "taken")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llm-plots: expected a folder*'taken', which is a file.*"])


def test_a_run_without_llm_tests_leaves_the_step_summary_alone(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(test_x="def test_x(): pass")
    assert pytester.runpytest("-p", "no:cacheprovider").ret == 0
    assert not summary.exists()


COMPARED = """
import pytest

@pytest.mark.llm_load(requests=30, rps=50, slo=["ttft.p99<5s"])
def test_compared(llm):
    llm.stream("Tell me a story.")
"""


def test_a_regression_against_the_baseline_is_the_verdict_of_every_report(
    tmp_path: Path,
) -> None:
    """The baseline comparison fails the test in the run: the JSON's verdict, the page and the
    Markdown say FAIL with its message, and show the comparison."""
    (tmp_path / "test_compared.py").write_text(COMPARED)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "test_compared.py", "-p", "no:cacheprovider",
             "-p", "no:xdist", "--llm-model", "mock", "--llm-storage", "saved", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        )

    first = run("--llm-mock", "ttft=20ms,itl=1ms,tokens=8", "--llm-save", "base")
    assert first.returncode == 0, first.stdout
    second = run("--llm-mock", "ttft=120ms,itl=1ms,tokens=8", "--llm-compare",
                 "--llm-compare-fail", "ttft.p50:10%", "--llm-report", "run.json",
                 "--llm-html", "page.html", "--llm-markdown", "summary.md")
    assert second.returncode == 1, second.stdout
    (entry,) = json.loads((tmp_path / "run.json").read_text())["tests"]
    assert entry["verdict"] == "FAIL"
    assert any("ttft.p50" in reason for reason in entry["failures"])
    md = (tmp_path / "summary.md").read_text()
    assert "FAIL `test_compared.py::test_compared`" in md
    assert "vs baseline" in md and "REGRESSION" in md
    page = (tmp_path / "page.html").read_text()
    assert 'data-verdict="FAIL"' in page and 'data-extra="compare"' in page
    assert "REGRESSION" in page


def test_a_merged_report_renders_like_a_run(run: Run, tmp_path: Path) -> None:
    merged = tmp_path / "merged.json"
    assert main(["merge", str(run.json), str(run.json), "--report", str(merged)]) == 1
    md = tmp_path / "merged.md"
    assert main(["report", str(merged), "--markdown", str(md)]) == 0
    text = md.read_text()
    doc = json.loads(merged.read_text())
    runs = {t["nodeid"]: t for t in run.doc()["tests"]}
    for test in doc["tests"]:
        assert f"{test['verdict']} `{test['nodeid']}`" in text
        sent = 2 * runs[test["nodeid"]]["requests"]["total"]  # the run's records, twice
        assert test["delivered"]["sent"] == test["requests"]["total"] == sent
        assert f"sent: {sent} requests" in text


def test_under_xdist_the_controller_alone_writes_the_step_summary(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    (tmp_path / "test_suite.py").write_text(SUITE)
    summary = tmp_path / "summary.md"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test_suite.py", "-p", "no:cacheprovider",
         "-n", "2", "--dist", "each", "--llm-model", "mock", "--llm-mock", MOCK],
        cwd=tmp_path, env={**os.environ, "GITHUB_STEP_SUMMARY": str(summary)},
        capture_output=True, text=True, timeout=300, check=False,
    )
    text = summary.read_text()
    assert text.count("## LLM load:") == 1, proc.stdout
    for name in ("test_holds", "test_breaks"):
        assert text.count(f"`test_suite.py::{name}`\n") == 1
