"""The one registry of options: each ``--llm-*`` option with its ini twin ``llm_*``, its
``llm_load(...)`` keyword when it has one, its help, metavar and parser. Every name an error
message, ``--help`` or the settings resolution uses is built here, once.

Pure (no pytest): the settings, the plugin's option set-up and the tests all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import baseline as b
from . import config as c

#: The variable the API key may come from when no option or ini key gives one.
ENV_API_KEY = "LLMLOAD_API_KEY"

#: How a TOML ``[tool.pytest]`` table may give an ini value besides text.
NATIVE_INT = "int"
NATIVE_NUMBER = "number"
NATIVE_BOOL = "bool"


@dataclass(frozen=True)
class Option:
    """One option. ``parse(value, name)`` checks a value and returns it clean, or raises
    ConfigError naming ``name``; None for free text (a key, a path)."""

    key: str
    help: str
    metavar: str | None = None
    parse: Callable[[object, str], object] | None = None
    flag: bool = False
    repeat: bool = False
    native: str | None = None
    """What a TOML ini file may give natively: NATIVE_INT, NATIVE_NUMBER or NATIVE_BOOL."""
    marker: bool = False
    """Also a keyword of ``@pytest.mark.llm_load(...)``."""
    const: str | None = None
    """The value of the option given without one (``--llm-compare`` alone)."""

    @property
    def cli(self) -> str:
        """``--llm-max-tokens``"""
        return "--llm-" + self.key.replace("_", "-")

    @property
    def dest(self) -> str:
        """``llm_max_tokens``: the argparse destination and the ini key."""
        return "llm_" + self.key

    @property
    def ini_label(self) -> str:
        """How an error names the ini key: ``llm_max_tokens (ini)``."""
        return f"{self.dest} (ini)"

    @property
    def marker_label(self) -> str:
        """How an error names the marker keyword: ``llm_load(max_tokens=...)``."""
        return f"llm_load({self.key}=...)"


OPTIONS: tuple[Option, ...] = (
    Option("model", "litellm model string (openai/x, hosted_vllm/x, anthropic/x ...) or 'mock' "
           "for the embedded OpenAI-compatible server.", "MODEL", c.parse_model),
    Option("api_base", "base URL of the endpoint, e.g. http://host:8000/v1.", "URL",
           c.parse_api_base),
    Option("api_key", f"API key (else ${ENV_API_KEY}, else the provider's own variable); never "
           "printed or stored.", "KEY"),
    Option("requests", "requests per load test. Default: 50.", "N", c.parse_count,
           native=NATIVE_INT, marker=True),
    Option("rps", "open-loop arrival rate in requests/s ('inf' for none: a closed loop of "
           "--llm-concurrency). Default: 5.", "R", c.parse_rate, native=NATIVE_NUMBER,
           marker=True),
    Option("concurrency", "cap on requests in flight; without a rate, a closed loop of C.", "C",
           c.parse_concurrency, native=NATIVE_INT, marker=True),
    Option("arrival", "arrival process: poisson, constant, gamma:<burstiness>, batch. "
           "Default: 'poisson'.", "KIND", c.parse_arrival, marker=True),
    Option("duration", "stop issuing requests after this long (30s, 2m ...).", "S",
           c.parse_duration, native=NATIVE_NUMBER, marker=True),
    Option("warmup", "warm-up requests per load test, never counted. Default: 0.", "N",
           c.parse_nonneg_int, native=NATIVE_INT, marker=True),
    Option("timeout", "per-request timeout. Default: 60s.", "S", c.parse_duration,
           native=NATIVE_NUMBER, marker=True),
    Option("max_tokens", "output token cap sent with each request.", "N", c.parse_count,
           native=NATIVE_INT, marker=True),
    Option("slo", "SLO added to every load test, e.g. 'ttft.p99<2s' (repeatable).", "EXPR",
           c.parse_slo_list, repeat=True, marker=True),
    Option("seed", "seed of the arrival schedule and of the image heights. Default: derived "
           "from the test id.", "N", c.parse_seed, native=NATIVE_INT, marker=True),
    Option("include_image", "attach a locally generated 1024x512 PNG to each request (made "
           "before the schedule starts, new pixels every run).", parse=c.parse_bool, flag=True,
           native=NATIVE_BOOL, marker=True),
    Option("randomize_image_dimensions", "attach images with a random height from 100 to "
           "1024, repeating with --llm-seed; implies --llm-include-image unless include_image "
           "is false at the same or a higher level (marker over CLI over ini).",
           parse=c.parse_bool, flag=True, native=NATIVE_BOOL, marker=True),
    Option("server_metrics", "the server's Prometheus metrics, scraped during each load test: "
           "'auto' (the endpoint's /metrics beside its base URL, if it answers with Prometheus "
           "text), 'off', or the URL of its /metrics. Default: 'auto'.", "URL|auto|off",
           c.parse_server_metrics, marker=True),
    Option("server_metrics_interval", "how often the server's metrics are scraped during a "
           "load test (also once before and once after). Default: 1s.", "S", c.parse_duration,
           native=NATIVE_NUMBER, marker=True),
    Option("find_max", "search for the highest load at which each load test's SLOs hold: the "
           "arrival rate ('rps') or the size of a closed loop ('concurrency'), over "
           "--llm-between; see docs/capacity.md. Default: none.", "rps|concurrency",
           c.parse_find_max, marker=True),
    Option("between", "the range a capacity search covers, 'lo,hi'. Default: the test's own rate "
           "(or concurrency) to 64 times it.", "LO,HI", c.parse_between, marker=True),
    Option("tokenizer", "token counts when the server reports no usage: 'usage' (server "
           "counts, else one per chunk), tiktoken:<encoding>, or a Hugging Face name/path. "
           "Default: 'usage'.", "SPEC", c.parse_tokenizer),
    Option("report", "write a JSON report (config, per-test summaries, per-request records).",
           "PATH"),
    Option("error_log", "write one line per failed request.", "PATH"),
    Option("html", "write a self-contained HTML report with plots (verdicts, SLOs, latency "
           "over time, distributions, load, errors); it opens offline. Needs matplotlib: "
           "pip install 'pytest-llmload[report]'.", "PATH"),
    Option("markdown", "write a Markdown summary (verdicts, SLOs, key percentiles, load "
           "delivered). With $GITHUB_STEP_SUMMARY set, the summary is appended there too.",
           "PATH"),
    Option("plots", "write PNG plots (one file per plot and load test) into this folder. "
           "Needs matplotlib: pip install 'pytest-llmload[report]'.", "DIR"),
    Option("mock", "behaviour of the embedded mock server, e.g. "
           "'ttft=200ms,itl=20ms,tokens=128,jitter=0.1,error_rate=0.01'.", "SPEC", c.parse_mock),
    Option("transport", "how requests are streamed and timed: 'auto' (the lean SSE reader for "
           "OpenAI-compatible providers, litellm for the others), 'sse' (the lean reader; the "
           "endpoint must speak OpenAI's wire format) or 'litellm' (litellm.acompletion, e.g. "
           "to compare the two). Default: 'auto'.", "KIND", c.parse_transport),
    Option("save", "save this run (its JSON report with every request) in the storage folder "
           "as NNNN_NAME_DATE.json, to compare later runs with.", "NAME", b.parse_save_name),
    Option("autosave", "save this run like --llm-save, named after the git commit.",
           parse=c.parse_bool, flag=True, native=NATIVE_BOOL),
    Option("storage", "folder of saved runs (one subfolder per machine id). "
           f"Default: '{b.DEFAULT_STORAGE}'.", "DIR", b.parse_storage),
    Option("compare", "compare every load test with its entry in a saved run: a number "
           "(0003), a name (its latest run), a path, or no value for the latest saved run.",
           "REF", b.parse_compare_ref, const=b.LATEST),
    Option("compare_fail", "fail a load test whose figure got worse than the baseline's by "
           "more than a tolerance, with confidence: 'ttft.p99:10%', 'itl.p50:5ms', "
           "'error_rate:+1%' (repeatable).", "EXPR", b.parse_compare_fail_list, repeat=True,
           marker=True),
    Option("dataset", "prompts from a local dataset: a ShareGPT .json/.jsonl, a .jsonl of "
           "{'prompt'} or {'messages'} rows, or a Hugging Face datasets folder/file "
           "(PATH[,column=NAME][,split=NAME]); llm.stream() without a prompt sends the next "
           "row, shuffled by the test's seed. Never downloaded.", "SPEC", c.parse_dataset,
           marker=True),
    Option("input_tokens", "synthetic prompts of exactly this many tokens for llm.stream() "
           "without a prompt: N, uniform:a-b, normal:mean,sd or 200:0.7,2000:0.3.", "SPEC",
           c.parse_input_tokens, native=NATIVE_INT, marker=True),
    Option("output_tokens", "output length asked of every request (max_tokens, and "
           "ignore_eos/min_tokens so the server does not stop early); same grammar as "
           "--llm-input-tokens.", "SPEC", c.parse_output_tokens, native=NATIVE_INT,
           marker=True),
    Option("prefix", "shared system prompts: groups=G,prefix_tokens=N starts every request "
           "with one of G prefixes of N tokens (prefix caching).", "SPEC", c.parse_prefix,
           marker=True),
)

BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}

#: The keywords ``@pytest.mark.llm_load(...)`` accepts, in the order ``--help`` lists them.
LOAD_KEYS: tuple[str, ...] = tuple(o.key for o in OPTIONS if o.marker)

#: Options whose value is the path of a file the run writes.
OUTPUT_KEYS: tuple[str, ...] = ("report", "error_log", "html", "markdown")
#: Options whose value is a folder the run writes files into.
OUTPUT_DIR_KEYS: tuple[str, ...] = ("plots",)
#: Options that draw plots, so need matplotlib.
PLOT_KEYS: tuple[str, ...] = ("html", "plots")


__all__ = [
    "BY_KEY",
    "ENV_API_KEY",
    "LOAD_KEYS",
    "OPTIONS",
    "OUTPUT_DIR_KEYS",
    "OUTPUT_KEYS",
    "PLOT_KEYS",
    "Option",
]
