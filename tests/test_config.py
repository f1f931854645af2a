"""Option parsers and the resolution of one load test's settings (marker > CLI > ini > default)."""

from __future__ import annotations

import math
import subprocess
import sys
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_llmload import config
from pytest_llmload.config import (
    parse_api_base,
    parse_arrival,
    parse_bool,
    parse_concurrency,
    parse_count,
    parse_duration,
    parse_model,
    parse_nonneg_int,
    parse_rate,
    parse_seed,
    parse_slo_list,
    parse_transport,
)
from pytest_llmload.errors import ConfigError
from pytest_llmload.options import LOAD_KEYS
from pytest_llmload.settings import LoadSettings, resolve_settings

Parser = Callable[..., object]

REPO = Path(__file__).resolve().parents[1]


def error_of(parse: Parser, value: object, option: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        if option is None:
            parse(value)
        else:
            parse(value, option)
    return str(info.value)


def assert_sentence(message: str, option: str, value: object) -> None:
    assert message.startswith(f"{option}: "), message
    assert repr(value) in message, message
    assert "expected" in message, message
    assert message.endswith("."), message


# -- parse_duration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        (" 30 s ", 30.0),
        ("500ms", 0.5),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("2m", 120.0),
        ("2min", 120.0),
        ("1.5h", 5400.0),
        ("1.5H", 5400.0),
        (".5s", 0.5),
        ("1e3ms", 1.0),
        (30, 30.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration_good(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "-3",
        "0",
        "0ms",
        "-1s",
        "30sec",
        "30 s s",
        "5s!",
        "1,5s",
        "1_000",
        "nan",
        "inf",
        "1e400",  # overflows to inf
        "1e-400",  # underflows to 0
        "1e305h",  # finite number, infinite seconds
        "٣٠",  # non-ASCII digits that float() would take
        True,
        False,
        0,
        -2,
        0.0,
        float("nan"),
        float("inf"),
        None,
        [30],
        b"30",
    ],
)
def test_parse_duration_bad(value: object) -> None:
    assert_sentence(error_of(parse_duration, value), "--llm-duration", value)


def test_parse_duration_names_the_given_option() -> None:
    message = error_of(parse_duration, "soon", "--llm-timeout")
    assert_sentence(message, "--llm-timeout", "soon")
    assert "'500ms'" in message  # says what is accepted


# -- whole numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("50", 50), (" 7 ", 7), ("+3", 3), (1, 1), (10**30, 10**30)]
)
def test_parse_count_good(value: object, expected: int) -> None:
    assert parse_count(value) == expected


@pytest.mark.parametrize(
    "value",
    ["0", "-1", "", "5.0", "1e3", "5 requests", "1_000", "٣", 0, -5, 5.0, True, None, "nan"],
)
def test_parse_count_bad(value: object) -> None:
    assert_sentence(error_of(parse_count, value), "--llm-requests", value)


def test_parse_count_names_the_given_option() -> None:
    assert_sentence(error_of(parse_count, "-3", "--llm-max-tokens"), "--llm-max-tokens", "-3")


def test_huge_numbers_are_refused_not_crashed_on() -> None:
    # more digits than int() or repr() will handle in Python >= 3.11
    message = error_of(parse_count, "9" * 5000)
    assert message.startswith("--llm-requests: ")
    assert len(message) < 600
    message = error_of(parse_duration, 10**5000)
    assert "integer" in message and message.startswith("--llm-duration: ")
    assert error_of(parse_rate, 10**5000).startswith("--llm-rps: ")
    assert parse_seed(10**40) == 10**40


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("5", 5), (0, 0), (12, 12)])
def test_parse_nonneg_int_good(value: object, expected: int) -> None:
    assert parse_nonneg_int(value) == expected


@pytest.mark.parametrize("value", ["-1", "x", "", "1.5", -1, 1.0, True, None])
def test_parse_nonneg_int_bad(value: object) -> None:
    assert_sentence(error_of(parse_nonneg_int, value), "--llm-warmup", value)


@pytest.mark.parametrize(("value", "expected"), [("32", 32), ("1", 1), (8, 8)])
def test_parse_concurrency_good(value: object, expected: int) -> None:
    assert parse_concurrency(value) == expected


@pytest.mark.parametrize("value", ["0", "-4", "many", "", 0, 2.0, True, None])
def test_parse_concurrency_bad(value: object) -> None:
    assert_sentence(error_of(parse_concurrency, value), "--llm-concurrency", value)


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0), ("1234", 1234), ("-7", -7), (0, 0), (2**40, 2**40)]
)
def test_parse_seed_good(value: object, expected: int) -> None:
    assert parse_seed(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "1.5", "0x10", 1.0, True, False, None])
def test_parse_seed_bad(value: object) -> None:
    assert_sentence(error_of(parse_seed, value), "--llm-seed", value)


# -- parse_rate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("0.5", 0.5),
        ("1e3", 1000.0),
        (10, 10.0),
        (0.25, 0.25),
        ("inf", None),
        ("INF", None),
        ("infinity", None),
        ("none", None),
        ("closed", None),
        (" Closed ", None),
        (None, None),
        (float("inf"), None),
    ],
)
def test_parse_rate_good(value: object, expected: float | None) -> None:
    assert parse_rate(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "-3",
        "abc",
        "",
        "nan",
        "5/s",
        "-inf",
        "1e400",
        "1_000",
        "٣",
        "5 5",
        "0x10",
        0,
        -1.5,
        True,
        float("nan"),
        [5],
    ],
)
def test_parse_rate_bad(value: object) -> None:
    message = error_of(parse_rate, value)
    assert_sentence(message, "--llm-rps", value)
    assert "'inf' for no rate limit" in message


def test_parse_rate_message_matches_the_contract() -> None:
    assert error_of(parse_rate, "-3") == (
        "--llm-rps: expected a positive number of requests per second "
        "(e.g. 5, 0.5, or 'inf' for no rate limit), got '-3'."
    )


# -- parse_bool -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("off", False),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
    ],
)
def test_parse_bool_good(value: object, expected: bool) -> None:
    assert parse_bool(value) is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "y", 2, -1, 1.0, None, []])
def test_parse_bool_bad(value: object) -> None:
    assert_sentence(error_of(parse_bool, value), "--llm-include-image", value)


# -- parse_model, parse_api_base --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mock", "mock"),
        ("openai/my-model", "openai/my-model"),
        (" hosted_vllm/x ", "hosted_vllm/x"),
    ],
)
def test_parse_model_good(value: str, expected: str) -> None:
    assert parse_model(value) == expected


@pytest.mark.parametrize("value", ["", "   ", "my model", "a\tb", 5, None, ["mock"]])
def test_parse_model_bad(value: object) -> None:
    assert_sentence(error_of(parse_model, value), "--llm-model", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("sse", "sse"), (" LiteLLM ", "litellm"), ("SSE", "sse")],
)
def test_parse_transport_good(value: str, expected: str) -> None:
    assert parse_transport(value) == expected


@pytest.mark.parametrize("value", ["", "http", "openai", "lite llm", None, 1, ["sse"]])
def test_parse_transport_bad(value: object) -> None:
    message = error_of(parse_transport, value)
    assert_sentence(message, "--llm-transport", value)
    assert "auto" in message and "sse" in message and "litellm" in message


@pytest.mark.parametrize(
    "value",
    [
        "http://localhost:8000/v1",
        "https://api.example.com/v1",
        "HTTP://127.0.0.1:8000",
        "http://[::1]:8000/v1",
        "http://host/v1?api-version=1",
    ],
)
def test_parse_api_base_good(value: str) -> None:
    assert parse_api_base(value) == value
    assert parse_api_base(f"  {value} ") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ftp://host/v1",
        "ws://host/v1",
        "localhost:8000/v1",
        "host/v1",
        "http://",
        "http:///v1",
        "http://:8000/v1",
        "http://host:99999/v1",
        "http://host:port/v1",
        "http://ho st/v1",
        "http://[::1/v1",
        5,
        None,
    ],
)
def test_parse_api_base_bad(value: object) -> None:
    assert_sentence(error_of(parse_api_base, value), "--llm-api-base", value)


def test_parse_api_base_names_the_wrong_scheme() -> None:
    assert "'ftp'" in error_of(parse_api_base, "ftp://host/v1")
    assert "did you mean 'http://localhost:8000/v1'" in error_of(
        parse_api_base, "localhost:8000/v1"
    )


def test_parse_api_base_refuses_credentials_without_printing_them() -> None:
    message = error_of(parse_api_base, "https://user:s3cret@host/v1")
    assert message.startswith("--llm-api-base: ")
    assert "s3cret" not in message and "user" not in message
    assert "--llm-api-key" in message
    assert "'https://***@host/v1'" in message


@pytest.mark.parametrize(
    "value",
    [
        "http://user:s3cret@host:port/v1",  # also a bad port
        "http://user:s3cret@[::1/v1",  # also unparseable
        "ftp://user:s3cret@host/",  # also a bad scheme
        "user:s3cret@host/v1",  # no scheme at all
        " https://user:s3cret@host ",
        "http://user:s3cret@host /v1",  # also whitespace
    ],
)
def test_parse_api_base_never_echoes_a_password(value: str) -> None:
    message = error_of(parse_api_base, value)
    assert message.startswith("--llm-api-base: ")
    assert "s3cret" not in message
    assert "***@" in message


@settings(max_examples=200, deadline=None)
@given(
    scheme=st.sampled_from(["http://", "https://", "ftp://", "", " http://", "HTTP://"]),
    user=st.text(alphabet=st.characters(exclude_characters="/?#@"), max_size=8),
    host=st.text(max_size=12),
)
def test_parse_api_base_never_echoes_a_password_property(scheme: str, user: str, host: str) -> None:
    value = f"{scheme}{user}:PW-s3cret@{host}"
    try:
        parse_api_base(value)
    except ConfigError as exc:
        assert "s3cret" not in str(exc)
    else:
        raise AssertionError(f"{value!r} was accepted")


# -- LOAD_KEYS, LoadSettings ------------------------------------------------------------------


def test_load_keys_are_exactly_the_marker_keywords() -> None:
    assert set(LOAD_KEYS) == {
        "requests",
        "rps",
        "concurrency",
        "arrival",
        "duration",
        "warmup",
        "timeout",
        "max_tokens",
        "slo",
        "seed",
        "include_image",
        "randomize_image_dimensions",
        "server_metrics",
        "server_metrics_interval",
        "compare_fail",
        "dataset",
        "input_tokens",
        "output_tokens",
        "prefix",
        "find_max",
        "between",
    }
    assert len(LOAD_KEYS) == 21


@pytest.mark.parametrize(
    ("kwargs", "line"),
    [
        (
            {"requests": 50, "rps": 5.0, "concurrency": 32},
            "50 requests at 5 req/s (poisson), concurrency <= 32",
        ),
        ({"requests": 500, "rps": None, "concurrency": 32}, "closed loop of 32, 500 requests"),
        ({"requests": 1, "rps": 0.5}, "1 request at 0.5 req/s (poisson)"),
        (
            {"requests": None, "duration": 30.0, "rps": 10.0},
            "requests for 30 s at 10 req/s (poisson)",
        ),
        (
            {"requests": 100, "duration": 300.0, "rps": None, "concurrency": 4, "warmup": 2},
            (
                "closed loop of 4, 100 requests or 5 min, whichever ends first, "
                "after 2 warm-up requests"
            ),
        ),
    ],
)
def test_describe(kwargs: dict[str, object], line: str) -> None:
    assert LoadSettings(**kwargs).describe() == line  # type: ignore[arg-type]


def test_describe_shows_the_arrival() -> None:
    gamma = parse_arrival("gamma:0.5")
    assert LoadSettings(rps=2.0, arrival=gamma).describe() == "50 requests at 2 req/s (gamma:0.5)"


def test_describe_batch_arrival_as_bursts() -> None:
    batch = parse_arrival("batch")
    assert (
        LoadSettings(requests=20, rps=4.0, arrival=batch).describe()
        == "20 requests in bursts of 4 per second (batch)"
    )


# -- resolve_settings -------------------------------------------------------------------------


def resolve(
    marker: Mapping[str, object] | None = None,
    cli: Mapping[str, object | None] | None = None,
    ini: Mapping[str, object | None] | None = None,
    test_id: str = "tests/test_x.py::test_story",
) -> LoadSettings:
    return resolve_settings(marker or {}, cli or {}, ini or {}, test_id=test_id)


def test_defaults() -> None:
    s = resolve()
    assert s.requests == 50
    assert s.rps == 5.0
    assert s.concurrency is None
    assert str(s.arrival) == "poisson"
    assert s.duration is None
    assert s.warmup == 0
    assert s.timeout == 60.0
    assert s.max_tokens is None
    assert s.slo == ()
    assert s.include_image is False
    assert s.randomize_image_dimensions is False
    assert s.seed == zlib.crc32(b"tests/test_x.py::test_story")


# key, (marker value, CLI text, ini text), (expected from marker, from CLI, from ini)
PRECEDENCE = [
    ("requests", (10, "20", "30"), (10, 20, 30)),
    ("rps", (1.5, "2", "3"), (1.5, 2.0, 3.0)),
    ("concurrency", (4, "8", "16"), (4, 8, 16)),
    ("duration", (1, "2s", "3000ms"), (1.0, 2.0, 3.0)),
    ("warmup", (1, "2", "3"), (1, 2, 3)),
    ("timeout", ("1s", "2", "3s"), (1.0, 2.0, 3.0)),
    ("max_tokens", (64, "128", "256"), (64, 128, 256)),
    ("seed", (0, "1", "2"), (0, 1, 2)),
    ("include_image", (True, "false", "yes"), (True, False, True)),
    ("randomize_image_dimensions", (False, "on", "1"), (False, True, True)),
]


@pytest.mark.parametrize(("key", "values", "expected"), PRECEDENCE)
def test_precedence_marker_cli_ini_default(
    key: str, values: tuple[object, str, str], expected: tuple[object, object, object]
) -> None:
    marker_value, cli_value, ini_value = values
    # concurrency alone would switch to a closed loop; pin the rate so only `key` varies
    base: dict[str, object] = {"rps": 5} if key == "concurrency" else {}
    cli = {key: cli_value}
    assert getattr(resolve({**base, key: marker_value}, cli, {key: ini_value}), key) == expected[0]
    assert getattr(resolve(base, cli, {key: ini_value}), key) == expected[1]
    assert getattr(resolve(base, {key: None}, {key: ini_value}), key) == expected[2]
    default = getattr(LoadSettings(), key)
    if key == "seed":
        default = zlib.crc32(b"tests/test_x.py::test_story")
    assert getattr(resolve(base, {key: None}, {key: None}), key) == default


def test_precedence_for_arrival() -> None:
    cli = {"arrival": "constant"}
    ini = {"arrival": "gamma:2"}
    assert str(resolve({"arrival": "batch"}, cli, ini).arrival) == "batch"
    assert str(resolve({}, cli, ini).arrival) == "constant"
    assert str(resolve({}, {}, ini).arrival) == "gamma:2"


def test_cli_and_ini_keys_outside_load_keys_are_ignored() -> None:
    assert resolve({}, {"model": "mock", "api_base": None}, {"report": "x.json"}) == resolve()


def test_an_unset_ini_string_counts_as_not_given() -> None:
    assert resolve({}, {}, {"rps": "", "requests": "  ", "slo": ""}) == resolve()


def test_an_empty_cli_string_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^--llm-rps: .*got ''\.$"):
        resolve({}, {"rps": ""})


# -- which option an error names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("requests", "-1"),
        ("rps", "-3"),
        ("concurrency", "0"),
        ("arrival", "sometimes"),
        ("duration", "soon"),
        ("warmup", "-2"),
        ("timeout", "0s"),
        ("max_tokens", "0"),
        ("slo", "ttft<"),
        ("seed", "x"),
        ("include_image", "maybe"),
        ("randomize_image_dimensions", "2"),
    ],
)
def test_errors_name_the_layer_the_value_came_from(key: str, bad: str) -> None:
    marker_name = f"llm_load({key}=...)"
    cli_name = "--llm-" + key.replace("_", "-")
    ini_name = f"llm_{key}"
    with pytest.raises(ConfigError) as marker_error:
        resolve({key: bad})
    with pytest.raises(ConfigError) as cli_error:
        resolve({}, {key: bad})
    with pytest.raises(ConfigError) as ini_error:
        resolve({}, {}, {key: bad})
    assert str(marker_error.value).startswith(marker_name + ": ")
    assert cli_name not in str(marker_error.value)
    assert str(cli_error.value).startswith(cli_name + ": ")
    assert str(ini_error.value).startswith(ini_name)
    assert cli_name not in str(ini_error.value)
    for error in (marker_error, cli_error, ini_error):
        assert repr(bad) in str(error.value)


def test_marker_error_message_in_full() -> None:
    with pytest.raises(ConfigError) as info:
        resolve({"rps": -3})
    assert str(info.value) == (
        "llm_load(rps=...): expected a positive number of requests per second "
        "(e.g. 5, 0.5, or 'inf' for no rate limit), got -3."
    )


def test_the_winning_layer_is_the_only_one_parsed() -> None:
    # a bad value hidden by a higher layer is never looked at
    assert resolve({"rps": 2}, {"rps": "junk"}, {"rps": "junk"}).rps == 2.0


def test_unknown_marker_keyword() -> None:
    with pytest.raises(ConfigError) as info:
        resolve({"rpss": 3})
    message = str(info.value)
    assert "'rpss'" in message
    assert "did you mean 'rps'" in message
    for key in LOAD_KEYS:
        assert key in message


def test_unknown_marker_keyword_without_a_close_match() -> None:
    with pytest.raises(ConfigError, match="unknown keyword 'zzz'; it accepts requests, rps"):
        resolve({"zzz": 1})


def test_positional_marker_arguments() -> None:
    with pytest.raises(ConfigError, match=r"llm_load takes keyword arguments only"):
        resolve_settings({}, {}, {}, test_id="t", marker_args=(100,))


# -- closed loop ------------------------------------------------------------------------------


def test_marker_concurrency_without_rate_is_a_closed_loop() -> None:
    s = resolve({"concurrency": 32, "requests": 500}, {"rps": "10"}, {"rps": "7"})
    assert s.rps is None and s.concurrency == 32
    assert s.describe() == "closed loop of 32, 500 requests"


def test_marker_concurrency_with_rate_is_an_open_loop_with_a_cap() -> None:
    s = resolve({"concurrency": 32, "rps": 10})
    assert (s.rps, s.concurrency) == (10.0, 32)


def test_marker_concurrency_none_is_not_a_closed_loop() -> None:
    s = resolve({"concurrency": None}, {"concurrency": "8"})
    assert (s.rps, s.concurrency) == (5.0, None)


@pytest.mark.parametrize(
    ("cli", "ini"),
    [({"concurrency": "8"}, {}), ({}, {"concurrency": "8"})],
)
def test_concurrency_anywhere_and_no_rate_anywhere_is_a_closed_loop(
    cli: dict[str, object | None], ini: dict[str, object | None]
) -> None:
    s = resolve({}, cli, ini)
    assert (s.rps, s.concurrency) == (None, 8)


@pytest.mark.parametrize(
    ("marker", "cli", "ini"),
    [
        ({}, {"concurrency": "8", "rps": "3"}, {}),
        ({}, {"concurrency": "8"}, {"rps": "3"}),
        ({"rps": 3}, {}, {"concurrency": "8"}),
        ({}, {"rps": "3"}, {"concurrency": "8"}),
    ],
)
def test_a_rate_anywhere_with_a_concurrency_is_an_open_loop(
    marker: dict[str, object], cli: dict[str, object | None], ini: dict[str, object | None]
) -> None:
    s = resolve(marker, cli, ini)
    assert (s.rps, s.concurrency) == (3.0, 8)


@pytest.mark.parametrize("no_rate", ["inf", "none", "closed", None])
def test_explicit_no_rate_with_a_concurrency_is_a_closed_loop(no_rate: str | None) -> None:
    s = resolve({"rps": no_rate, "concurrency": 4})
    assert (s.rps, s.concurrency) == (None, 4)
    if no_rate is not None:
        assert resolve({}, {"rps": no_rate, "concurrency": "4"}).rps is None


@pytest.mark.parametrize(
    ("marker", "cli", "option"),
    [
        ({"rps": None}, {}, "llm_load(rps=...)"),
        ({"rps": "inf"}, {}, "llm_load(rps=...)"),
        ({}, {"rps": "none"}, "--llm-rps"),
    ],
)
def test_no_rate_and_no_concurrency_is_refused(
    marker: dict[str, object], cli: dict[str, object | None], option: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(marker, cli)
    assert str(info.value).startswith(option + ": ")
    assert "needs a concurrency" in str(info.value)


def test_nothing_given_is_five_rps() -> None:
    s = resolve()
    assert (s.rps, s.concurrency) == (5.0, None)


# -- requests and duration --------------------------------------------------------------------


def test_duration_without_requests_runs_for_the_duration() -> None:
    assert (resolve({"duration": "30s"}).requests, resolve({"duration": "30s"}).duration) == (
        None,
        30.0,
    )
    assert resolve({}, {"duration": "2m"}).requests is None
    assert resolve({}, {}, {"duration": "10"}).requests is None


@pytest.mark.parametrize(
    ("marker", "cli", "ini"),
    [
        ({"duration": 30, "requests": 100}, {}, {}),
        ({"duration": 30}, {"requests": "100"}, {}),
        ({}, {"duration": "30"}, {"requests": "100"}),
    ],
)
def test_duration_and_requests_both_kept(
    marker: dict[str, object], cli: dict[str, object | None], ini: dict[str, object | None]
) -> None:
    s = resolve(marker, cli, ini)
    assert (s.requests, s.duration) == (100, 30.0)
    assert "whichever ends first" in s.describe()


def test_marker_requests_none_needs_a_duration() -> None:
    assert resolve({"requests": None}, {"duration": "5"}).requests is None
    with pytest.raises(ConfigError, match=r"^llm_load\(requests=\.\.\.\): got None.*duration"):
        resolve({"requests": None})


def test_marker_none_means_none_for_optional_settings() -> None:
    s = resolve(
        {"duration": None, "max_tokens": None, "concurrency": None},
        {"duration": "30", "max_tokens": "64", "concurrency": "4", "rps": "2"},
    )
    assert (s.duration, s.max_tokens, s.concurrency, s.requests) == (None, None, None, 50)


@pytest.mark.parametrize(
    "key", ["warmup", "timeout", "seed", "arrival", "include_image", "randomize_image_dimensions"]
)
def test_marker_none_is_refused_for_settings_that_need_a_value(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^llm_load\({key}=\.\.\.\): .*got None\.$"):
        resolve({key: None})


# -- seed -------------------------------------------------------------------------------------


def test_seed_defaults_to_crc32_of_the_test_id() -> None:
    test_id = "tests/test_story.py::test_story[param]"
    assert resolve(test_id=test_id).seed == zlib.crc32(test_id.encode())
    # a fixed number: the same test gets the same schedule in every run and every process
    assert resolve(test_id="tests/test_x.py::test_story").seed == 3015914741
    assert resolve(test_id="tests/test_x.py::test_other").seed != 3015914741


def test_seed_is_stable_across_processes() -> None:
    code = (
        "from pytest_llmload.settings import resolve_settings;"
        "print(resolve_settings({}, {}, {}, test_id='tests/t.py::test_a').seed)"
    )
    seeds = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
            cwd=REPO,
        ).stdout.strip()
        for hash_seed in ("1", "2")
    }
    assert seeds == {str(zlib.crc32(b"tests/t.py::test_a"))}


def test_explicit_seed_wins_over_the_derived_one() -> None:
    assert resolve({"seed": 0}).seed == 0
    assert resolve({}, {"seed": "-5"}).seed == -5


# -- SLOs -------------------------------------------------------------------------------------


def test_slos_add_up_marker_then_cli_then_ini_without_duplicates() -> None:
    s = resolve(
        {"slo": ["ttft.p99<2s", "error_rate<1%"]},
        {"slo": ["itl.p95<=50ms", "ttft.p99<2s"]},
        {"slo": ["e2e.max<30s", "error_rate<1%", "itl.p95<=50ms"]},
    )
    assert [slo.expr for slo in s.slo] == [
        "ttft.p99<2s",
        "error_rate<1%",
        "itl.p95<=50ms",
        "e2e.max<30s",
    ]


def test_slo_dedup_is_by_canonical_expression() -> None:
    s = resolve({"slo": "ttft.p99 < 2 s"}, {"slo": ["ttft.p99<2s"]})
    assert len(s.slo) == 1


def test_slo_from_a_single_string() -> None:
    (slo,) = resolve({"slo": "ttft.p99<2s"}).slo
    assert (slo.metric, slo.stat, slo.op, slo.limit) == ("ttft", "p99", "<", 2.0)


def test_marker_slo_none_or_empty_adds_none() -> None:
    assert resolve({"slo": None}, {"slo": ["ttft<1s"]}).slo == resolve({}, {"slo": ["ttft<1s"]}).slo
    assert resolve({"slo": []}).slo == ()


def test_a_bad_slo_in_any_layer_is_an_error() -> None:
    # SLOs add up across layers, so a bad one below a marker's SLOs is still reported
    with pytest.raises(ConfigError, match=r"^llm_slo \(ini\): .*'ttft<'"):
        resolve({"slo": ["ttft<1s"]}, {}, {"slo": ["ttft<"]})


# -- import cost ------------------------------------------------------------------------------


def test_importing_config_is_cheap() -> None:
    code = (
        "import sys, pytest_llmload.config;"
        "heavy = {'pytest', 'numpy', 'litellm', 'transformers', 'tiktoken', 'aiohttp', 'httpx',"
        " 'openai', 'tokenizers', 'pytest_llmload.engine', 'pytest_llmload.slo'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=REPO,
    ).stdout.strip()
    assert out == "[]"


# -- property-based: any input gives a value or a ConfigError, never another exception -------

PARSERS: list[Parser] = [
    parse_duration,
    parse_count,
    parse_nonneg_int,
    parse_concurrency,
    parse_seed,
    parse_rate,
    parse_bool,
    parse_model,
    parse_api_base,
]

natives = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=4000, max_value=5000).map(lambda digits: -(10**digits)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.integers(), st.text(max_size=10)), max_size=3),
    st.tuples(st.text(max_size=5)),
    st.binary(max_size=10),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
numberish = st.from_regex(
    r"\A\s?[+-]?[0-9]{0,4}\.?[0-9]{0,3}([eE][+-]?[0-9]{1,4})?\s?(us|µs|ms|s|m|min|h|inf|)\s?\Z"
)
texts = st.one_of(st.text(), numberish)


def value_or_config_error(parse: Parser, value: object) -> None:
    try:
        result = parse(value)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("--llm-") and message.endswith("."), message
        return
    assert result is None or isinstance(result, (bool, int, float, str))
    if isinstance(result, float):
        assert math.isfinite(result)


@pytest.mark.parametrize("parse", PARSERS, ids=lambda p: p.__name__)
@settings(max_examples=150, deadline=None)
@given(value=texts)
def test_any_text_gives_a_value_or_a_config_error(parse: Parser, value: str) -> None:
    value_or_config_error(parse, value)


@pytest.mark.parametrize("parse", PARSERS, ids=lambda p: p.__name__)
@settings(max_examples=150, deadline=None)
@given(value=natives)
def test_any_native_value_gives_a_value_or_a_config_error(parse: Parser, value: object) -> None:
    value_or_config_error(parse, value)


@settings(max_examples=200, deadline=None)
@given(
    number=st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False),
    unit=st.sampled_from([("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]),
)
def test_duration_text_round_trips(number: float, unit: tuple[str, float]) -> None:
    suffix, scale = unit
    assert parse_duration(f"{number!r}{suffix}") == pytest.approx(number * scale, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=1, max_value=10**18))
def test_whole_number_text_round_trips(n: int) -> None:
    assert parse_count(str(n)) == n
    assert parse_concurrency(str(n)) == n
    assert parse_nonneg_int(str(n)) == n
    assert parse_seed(str(-n)) == -n
    assert parse_rate(str(n)) == float(n)


layer_values = st.one_of(texts, natives)


@settings(max_examples=300, deadline=None)
@given(
    marker=st.dictionaries(st.sampled_from(LOAD_KEYS), layer_values, max_size=4),
    cli=st.dictionaries(st.sampled_from(LOAD_KEYS), st.one_of(st.none(), texts), max_size=4),
    ini=st.dictionaries(st.sampled_from(LOAD_KEYS), st.one_of(st.none(), texts), max_size=4),
    test_id=st.text(),
)
def test_resolve_gives_settings_or_a_config_error(
    marker: dict[str, object],
    cli: dict[str, object | None],
    ini: dict[str, object | None],
    test_id: str,
) -> None:
    try:
        s = resolve_settings(marker, cli, ini, test_id=test_id)
    except ConfigError as exc:
        assert str(exc).endswith("."), str(exc)
        return
    assert s.requests is not None or s.duration is not None
    assert s.rps is not None or s.concurrency is not None
    assert s.rps is None or (math.isfinite(s.rps) and s.rps > 0)
    assert s.timeout > 0 and s.warmup >= 0
    s.describe()


# -- delegation to the modules that own the grammar -------------------------------------------


def test_parse_slo_names_the_option_it_was_given() -> None:
    from pytest_llmload import slo

    with pytest.raises(ConfigError) as info:
        slo.parse_slo("latency<2", "llm_load(slo=...)")
    assert str(info.value).startswith("llm_load(slo=...): Invalid SLO 'latency<2': ")
    with pytest.raises(ConfigError) as info:
        slo.parse_slo("latency<2")
    assert str(info.value).startswith("Invalid SLO 'latency<2': ")


def test_parse_arrival_delegates_to_the_engine() -> None:
    from pytest_llmload import engine

    assert parse_arrival("poisson") == engine.Arrival("poisson")
    assert parse_arrival("gamma:2") == engine.Arrival("gamma", 2.0)
    arrival = engine.Arrival("constant")
    assert parse_arrival(arrival) is arrival
    message = error_of(parse_arrival, "sometimes", "llm_load(arrival=...)")
    assert message.startswith("llm_load(arrival=...): ")
    assert "'sometimes'" in message and "poisson" in message


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(texts, natives))
def test_parse_arrival_gives_a_value_or_a_config_error(value: object) -> None:
    try:
        parse_arrival(value)
    except ConfigError as exc:
        assert str(exc).startswith("--llm-arrival: ")


def test_parse_slo_list_delegates_to_slo() -> None:
    from pytest_llmload import slo

    (one,) = parse_slo_list("ttft.p99<2s")
    assert isinstance(one, slo.SLO)
    assert parse_slo_list(["ttft.p99<2s", "itl.p95<=50ms"]) == (
        slo.parse_slo("ttft.p99<2s"),
        slo.parse_slo("itl.p95<=50ms"),
    )
    assert parse_slo_list(("error_rate<1%",)) == (slo.parse_slo("error_rate<1%"),)
    assert parse_slo_list([]) == ()
    assert parse_slo_list([one]) == (one,)
    message = error_of(parse_slo_list, "latency<2", "llm_load(slo=...)")
    assert message.startswith("llm_load(slo=...): ") and "'latency<2'" in message
    message = error_of(parse_slo_list, ["ttft<1s", 7])
    assert message.startswith("--llm-slo: ") and "got 7 in ['ttft<1s', 7]" in message
    assert_sentence(error_of(parse_slo_list, 5), "--llm-slo", 5)


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.text(), st.lists(st.text(max_size=20), max_size=3), natives))
def test_parse_slo_list_gives_a_value_or_a_config_error(value: object) -> None:
    try:
        result = parse_slo_list(value)
    except ConfigError as exc:
        assert str(exc).startswith("--llm-slo: ")
        return
    assert isinstance(result, tuple)


def test_parse_tokenizer_delegates_to_tokens() -> None:
    assert config.parse_tokenizer("usage") == "usage"
    assert config.parse_tokenizer("tiktoken:cl100k_base") == "tiktoken:cl100k_base"
    message = error_of(config.parse_tokenizer, 5, "llm_load(tokenizer=...)")
    assert message.startswith("llm_load(tokenizer=...): ")
    for bad in ("", "tiktoken:no_such_encoding", "a b"):
        assert error_of(config.parse_tokenizer, bad).startswith("--llm-tokenizer: ")


def test_parse_mock_delegates_to_mock() -> None:
    spec = config.parse_mock("ttft=200ms,itl=20ms,tokens=128,jitter=0.1,error_rate=0.01")
    assert (spec.ttft_ns, spec.itl_ns, spec.tokens) == (200_000_000, 20_000_000, 128)
    assert (spec.jitter, spec.error_rate) == (0.1, 0.01)
    message = error_of(config.parse_mock, "ttft=soon", "llm_load(mock=...)")
    assert message.startswith("llm_load(mock=...): ") and "soon" in message


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(texts, natives))
def test_parse_tokenizer_gives_a_value_or_a_config_error(value: object) -> None:
    try:
        assert isinstance(config.parse_tokenizer(value), str)
    except ConfigError as exc:
        assert str(exc).startswith("--llm-tokenizer: ")


def test_parse_tokenizer_unknown_home_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="^--llm-tokenizer: "):
        config.parse_tokenizer("~no_such_user_llmload/tok")


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(texts, natives))
def test_parse_mock_gives_a_value_or_a_config_error(value: object) -> None:
    try:
        config.parse_mock(value)
    except ConfigError as exc:
        assert str(exc).startswith("--llm-mock: ")


# -- the settings codec (xdist payloads, JSON reports) -------------------------------------------

#: A value different from the default for every field of LoadSettings.
_NON_DEFAULT: dict[str, object] = {
    "requests": 7, "rps": 2.5, "concurrency": 3, "arrival": "gamma:0.5", "seed": -4,
    "duration": 12.0, "warmup": 2, "timeout": 9.0, "max_tokens": 64,
    "slo": ["ttft.p99<2s", "error_rate<1%"], "include_image": True,
    "randomize_image_dimensions": True, "server_metrics": "http://h:9/metrics",
    "server_metrics_interval": 0.5, "compare_fail": ["ttft.p99:10%", "error_rate:+1%"],
    "dataset": None, "input_tokens": "normal:500,100", "output_tokens": "200:0.7,2000:0.3",
    "prefix": "groups=8,prefix_tokens=1024",
    "find_max": "concurrency", "between": (2.0, 64.0),
}


def test_settings_codec_carries_every_field() -> None:
    import dataclasses
    import json

    from pytest_llmload.baseline import parse_compare_fail_list
    from pytest_llmload.engine import parse_arrival as arrival
    from pytest_llmload.settings import settings_from_dict, settings_to_dict
    from pytest_llmload.slo import parse_slo

    names = {f.name for f in dataclasses.fields(LoadSettings)}
    # a new field needs a value here: the codec must be shown to carry it
    assert set(_NON_DEFAULT) == names
    values = dict(_NON_DEFAULT)
    values["arrival"] = arrival(str(values["arrival"]))
    values["slo"] = tuple(parse_slo(str(e)) for e in values["slo"])  # type: ignore[attr-defined]
    values["compare_fail"] = parse_compare_fail_list(values["compare_fail"])
    from pytest_llmload.workload import (
        DatasetSpec,
        parse_length_spec,
        parse_prefix_spec,
    )

    # a path that exists nowhere: a report is read where its dataset may not be
    values["dataset"] = DatasetSpec("/nowhere/sg.json", column="q", split="test")
    values["input_tokens"] = parse_length_spec(values["input_tokens"])
    values["output_tokens"] = parse_length_spec(values["output_tokens"])
    values["prefix"] = parse_prefix_spec(values["prefix"])
    original = LoadSettings(**values)  # type: ignore[arg-type]
    for name in names:
        assert getattr(original, name) != getattr(LoadSettings(), name), name
    data = json.loads(json.dumps(settings_to_dict(original)))  # plain data, as execnet carries
    assert settings_from_dict(data) == original
