"""Workloads like production: prompts from datasets, synthetic prompts of exact token lengths,
output length targets, shared prefixes.

Pure (no pytest) and cheap to import: the plugin parses ``--llm-dataset``,
``--llm-input-tokens``, ``--llm-output-tokens`` and ``--llm-prefix`` with it at configure time.
A dataset is read, and a tokenizer loaded, only when a test first draws a prompt; Hugging Face
``datasets`` is imported only for a Hugging Face folder or file, and never downloads anything.

Every draw is a pure function of the test's seed and the draw's position (the job's index in
the load schedule), so a test sends the same workload run to run, and xdist workers that each
drive a share of the schedule draw disjoint positions of one sequence.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, show

if TYPE_CHECKING:
    from pytest_llmload.tokens import Tokenizer

__all__ = [
    "DEFAULT_PROMPT_TOKENIZER",
    "DatasetSpec",
    "Draw",
    "LengthSpec",
    "PrefixSpec",
    "PromptBuilder",
    "Row",
    "Workload",
    "WorkloadError",
    "load_rows",
    "parse_dataset_spec",
    "parse_length_spec",
    "parse_prefix_spec",
]

#: Builds synthetic prompts when ``--llm-tokenizer`` is ``usage`` (it ships with litellm, offline).
DEFAULT_PROMPT_TOKENIZER = "tiktoken:cl100k_base"


class WorkloadError(ConfigError):
    """A dataset that cannot be read, or a workload that cannot be built: a usage error."""


# -- lengths: N | uniform:a-b | normal:mean,sd | 200:0.7,2000:0.3 ------------------------------

EXPECT_LENGTH = (
    "a token length: N (e.g. 512), uniform:a-b (e.g. uniform:100-1000), normal:mean,sd "
    "(e.g. normal:500,100) or a mixture of lengths with weights (e.g. 200:0.7,2000:0.3)"
)
_INT = r"\s*([0-9]+)\s*"
_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_UNIFORM = re.compile(rf"uniform:{_INT}-{_INT}", re.IGNORECASE)
_NORMAL = re.compile(rf"normal:{_NUM},{_NUM}", re.IGNORECASE)
_PAIR = re.compile(rf"{_INT}:{_NUM}")
#: No prompt or output is longer than this many tokens (a typo guard, not a model limit).
MAX_LENGTH = 10_000_000


@dataclass(frozen=True)
class LengthSpec:
    """A distribution of token lengths. ``sample`` always gives a whole number of one or more."""

    kind: str
    """``fixed``, ``uniform``, ``normal`` or ``mixture``."""
    values: tuple[float, ...]
    """fixed: (n,); uniform: (a, b); normal: (mean, sd); mixture: (n1, n2, ...)."""
    weights: tuple[float, ...] = ()
    """mixture only: the probability of each length (normalised to sum to 1)."""

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.values[0])
        if self.kind == "uniform":
            return rng.randint(int(self.values[0]), int(self.values[1]))
        if self.kind == "normal":
            mean, sd = self.values
            return max(1, min(MAX_LENGTH, round(rng.gauss(mean, sd))))
        return int(rng.choices(self.values, weights=self.weights)[0])

    @property
    def mean(self) -> float:
        if self.kind == "uniform":
            return (self.values[0] + self.values[1]) / 2
        if self.kind == "mixture":
            return sum(v * w for v, w in zip(self.values, self.weights))
        return self.values[0]

    def __str__(self) -> str:
        v = [_fmt(x) for x in self.values]
        if self.kind == "fixed":
            return v[0]
        if self.kind == "uniform":
            return f"uniform:{v[0]}-{v[1]}"
        if self.kind == "normal":
            return f"normal:{v[0]},{v[1]}"
        return ",".join(f"{a}:{_fmt(w)}" for a, w in zip(v, self.weights))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def parse_length_spec(value: object, option: str = "--llm-input-tokens") -> LengthSpec:
    """``N``, ``uniform:a-b``, ``normal:mean,sd`` or ``N1:w1,N2:w2,...``; ConfigError otherwise."""
    if isinstance(value, LengthSpec):
        return value

    def bad(why: str = "") -> ConfigError:
        tail = f" ({why})" if why else ""
        return ConfigError(f"{option}: expected {EXPECT_LENGTH}, got {show(value)}{tail}.")

    if isinstance(value, bool):
        raise bad()
    if isinstance(value, int):
        if not 1 <= value <= MAX_LENGTH:
            raise bad(f"a length is from 1 to {MAX_LENGTH} tokens")
        return LengthSpec("fixed", (value,))
    if isinstance(value, str):
        text = value.strip()
    else:
        raise bad()

    def length(raw: str) -> int:
        n = int(raw)
        if n < 1:
            raise bad("a length is one token or more")
        if n > MAX_LENGTH:
            raise bad(f"a length is at most {MAX_LENGTH} tokens")
        return n

    if re.fullmatch(_INT, text):
        return LengthSpec("fixed", (length(text),))
    m = _UNIFORM.fullmatch(text)
    if m:
        a, b = length(m[1]), length(m[2])
        if a > b:
            raise bad("the low end of uniform:a-b must not exceed the high end")
        return LengthSpec("uniform", (a, b))
    m = _NORMAL.fullmatch(text)
    if m:
        mean, sd = float(m[1]), float(m[2])
        if not (math.isfinite(mean) and math.isfinite(sd)) or mean < 1 or mean > MAX_LENGTH:
            raise bad("the mean is a number of tokens, one or more")
        return LengthSpec("normal", (mean, sd))
    if ":" in text and "," in text or _PAIR.fullmatch(text):
        lengths: list[float] = []
        weights: list[float] = []
        for part in text.split(","):
            pm = _PAIR.fullmatch(part)
            if not pm:
                raise bad(f"{part.strip()!r} is not LENGTH:WEIGHT")
            w = float(pm[2])
            if not math.isfinite(w) or w <= 0:
                raise bad(f"the weight in {part.strip()!r} must be above 0")
            lengths.append(length(pm[1]))
            weights.append(w)
        total = sum(weights)
        return LengthSpec("mixture", tuple(lengths), tuple(w / total for w in weights))
    raise bad()


# -- shared prefixes: groups=8,prefix_tokens=1024 -------------------------------------------------

EXPECT_PREFIX = (
    "comma-separated groups=G,prefix_tokens=N (e.g. groups=8,prefix_tokens=1024): every "
    "request's prompt starts with one of G shared system prompts of N tokens"
)


@dataclass(frozen=True)
class PrefixSpec:
    groups: int
    prefix_tokens: int

    def __str__(self) -> str:
        return f"groups={self.groups},prefix_tokens={self.prefix_tokens}"


def parse_prefix_spec(value: object, option: str = "--llm-prefix") -> PrefixSpec:
    if isinstance(value, PrefixSpec):
        return value

    def bad(why: str = "") -> ConfigError:
        tail = f" ({why})" if why else ""
        return ConfigError(f"{option}: expected {EXPECT_PREFIX}, got {show(value)}{tail}.")

    if not isinstance(value, str):
        raise bad()
    found: dict[str, int] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("groups", "prefix_tokens"):
            raise bad(f"unknown item {item.strip()!r}")
        if key in found:
            raise bad(f"{key} given twice")
        raw = raw.strip()
        if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
            raise bad(f"{key} must be a whole number, one or more")
        found[key] = int(raw)
    if "prefix_tokens" not in found:
        raise bad("prefix_tokens is required")
    if found["prefix_tokens"] > MAX_LENGTH:
        raise bad(f"a prefix is at most {MAX_LENGTH} tokens")
    return PrefixSpec(groups=found.get("groups", 1), prefix_tokens=found["prefix_tokens"])


# -- datasets ----------------------------------------------------------------------------------

FORMATS = ("auto", "sharegpt", "jsonl", "hf")
EXPECT_DATASET = (
    "the path of a local dataset: a ShareGPT-format .json/.jsonl file, a .jsonl of "
    "{\"prompt\": ...} or {\"messages\": [...]} rows, or a Hugging Face datasets folder or "
    ".parquet/.arrow/.csv file, optionally followed by ,column=NAME ,split=NAME or ,format="
    + "|".join(FORMATS)
)
MSG_NOT_LOCAL = (
    "{option}: there is no file or folder at {path!r}; datasets are read from local paths only, "
    "never downloaded (to use a Hugging Face Hub dataset, download it first, e.g. "
    "'huggingface-cli download --repo-type dataset NAME --local-dir ./data', and pass that path)."
)
_DATASET_KEYS = ("column", "split", "format")


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    """Absolute path of the file or folder."""
    column: str | None = None
    split: str | None = None
    format: str = "auto"

    def __str__(self) -> str:
        extra = "".join(
            f",{k}={v}" for k, v in (("column", self.column), ("split", self.split),
                                     ("format", None if self.format == "auto" else self.format))
            if v
        )
        return self.path + extra


def parse_dataset_spec(
    value: object, option: str = "--llm-dataset", base: str | os.PathLike[str] | None = None
) -> DatasetSpec:
    """``PATH[,column=NAME][,split=NAME][,format=auto|sharegpt|jsonl|hf]``. The path must
    exist (relative paths are taken from ``base``, else the working directory): a name that is
    not a local path is refused, never looked up on the Hub."""
    if isinstance(value, DatasetSpec):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{option}: expected {EXPECT_DATASET}, got {show(value)}.")
    parts = value.strip().split(",")
    opts: dict[str, str] = {}
    # options are the trailing key=value items; anything before them is the path (commas and all)
    while len(parts) > 1:
        key, sep, raw = parts[-1].partition("=")
        key = key.strip().lower()
        if not sep or key not in _DATASET_KEYS:
            if sep and re.fullmatch(r"[a-z_]+", key):
                raise ConfigError(
                    f"{option}: unknown dataset option {key!r} in {value!r}; expected "
                    f"{', '.join(_DATASET_KEYS)}."
                )
            break
        if key in opts:
            raise ConfigError(f"{option}: {key} given twice in {value!r}.")
        if not raw.strip():
            raise ConfigError(f"{option}: {key} needs a value in {value!r}.")
        opts[key] = raw.strip()
        parts.pop()
    raw_path = ",".join(parts).strip()
    fmt = opts.get("format", "auto").lower()
    if fmt not in FORMATS:
        raise ConfigError(
            f"{option}: format must be one of {', '.join(FORMATS)}, got {opts['format']!r} in "
            f"{value!r}."
        )
    expanded = os.path.expanduser(raw_path)
    path = Path(base, expanded) if base is not None else Path(expanded)
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    if not exists:
        raise ConfigError(MSG_NOT_LOCAL.format(option=option, path=raw_path))
    return DatasetSpec(str(path.resolve()), opts.get("column"), opts.get("split"), fmt)


@dataclass(frozen=True)
class Row:
    """One prompt of a dataset."""

    messages: tuple[dict[str, Any], ...]
    """What one request sends: for a multi-turn ShareGPT row, every turn up to and including
    the last user turn, with the dataset's own replies as the history."""
    max_tokens: int | None = None
    index: int = 0
    """The row's place in the dataset file (0-based)."""

    @property
    def user_turns(self) -> list[str]:
        """The user messages' text, in order: replay them with ``llm.chat().send(text)`` to get
        a conversation whose history holds the model's real replies."""
        return [_text(m.get("content")) for m in self.messages if m.get("role") == "user"]

    @property
    def prompt(self) -> str:
        """The last user message's text."""
        turns = self.user_turns
        return turns[-1] if turns else ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return "" if content is None else str(content)


_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
}
_TEXT_COLUMNS = ("conversations", "messages", "prompt", "text", "question", "instruction", "input")


def _row_from(obj: Any, index: int, column: str | None, where: str) -> Row | None:
    """A dataset row from one record; None for a row with nothing to send (skipped, as vLLM's
    ShareGPT reader skips rows without a user turn)."""
    if column is not None:
        if not isinstance(obj, Mapping) or column not in obj:
            raise WorkloadError(f"{where}: row {index} has no column {column!r}.")
        value = obj[column]
        max_tokens = obj.get("max_tokens") if isinstance(obj, Mapping) else None
        obj = {"__value__": value, "max_tokens": max_tokens}
        key = "__value__"
    elif isinstance(obj, str):
        return Row(({"role": "user", "content": obj},), None, index) if obj.strip() else None
    elif isinstance(obj, Mapping):
        key = next((k for k in _TEXT_COLUMNS if k in obj), "")
        if not key:
            raise WorkloadError(
                f"{where}: row {index} has none of the keys {', '.join(_TEXT_COLUMNS)}; name "
                "the column holding the prompt with ',column=NAME'."
            )
    else:
        raise WorkloadError(f"{where}: row {index} is not an object: {str(obj)[:80]!r}.")
    value = obj[key]
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise WorkloadError(
            f"{where}: row {index} has max_tokens {max_tokens!r}; expected a whole number, "
            "one or more."
        )
    messages: list[dict[str, Any]]
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = []
        for turn in value:
            if not isinstance(turn, Mapping):
                raise WorkloadError(f"{where}: row {index} has a turn that is not an object.")
            if "from" in turn or "value" in turn:  # ShareGPT
                role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
                if role is None:
                    raise WorkloadError(
                        f"{where}: row {index} has a turn from {turn.get('from')!r}; ShareGPT "
                        f"turns are from {', '.join(sorted(_SHAREGPT_ROLES))}."
                    )
                messages.append({"role": role, "content": str(turn.get("value") or "")})
            elif "role" in turn:
                messages.append(dict(turn))
            else:
                raise WorkloadError(
                    f"{where}: row {index} has a turn with neither 'role' nor 'from'."
                )
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if last_user < 0:
            return None
        messages = messages[: last_user + 1]
    else:
        raise WorkloadError(
            f"{where}: row {index}'s {key!r} is neither text nor a list of messages."
        )
    return Row(tuple(messages), max_tokens, index)


def _read_json_rows(path: Path) -> Iterator[Any]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".jsonl" or not stripped.startswith("["):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise WorkloadError(f"{path}: line {n} is not JSON ({exc}).") from None
        return
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise WorkloadError(f"{path}: not valid JSON ({exc}).") from None
    yield from data


_HF_FILES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}


def _read_hf_rows(spec: DatasetSpec) -> Iterator[Any]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local read must never reach the Hub
    try:
        import datasets
    except ImportError:
        raise WorkloadError(
            f"--llm-dataset: {spec.path!r} is a Hugging Face dataset, which needs the 'datasets' "
            "package (pip install datasets)."
        ) from None
    path = Path(spec.path)
    if path.is_dir():
        ds: Any = datasets.load_from_disk(str(path))
    else:
        builder = _HF_FILES.get(path.suffix.lower(), "json")
        kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        ds = datasets.load_dataset(builder, data_files=str(path), **kwargs)
    if isinstance(ds, datasets.DatasetDict):
        split = spec.split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise WorkloadError(
                f"--llm-dataset: {spec.path!r} has no split {split!r}; it has "
                f"{', '.join(ds)}."
            )
        ds = ds[split]
    yield from ds


def load_rows(spec: DatasetSpec) -> list[Row]:
    """Read every row of a local dataset. Raises WorkloadError (a usage error) when the file is
    unreadable or holds no usable row."""
    path = Path(spec.path)
    fmt = spec.format
    if fmt == "auto":
        hf = path.is_dir() or path.suffix.lower() in _HF_FILES
        fmt = "hf" if hf else "jsonl"
    try:
        raw = _read_hf_rows(spec) if fmt == "hf" else _read_json_rows(path)
        rows = []
        for i, obj in enumerate(raw):
            row = _row_from(obj, i, spec.column, str(path))
            if row is not None:
                rows.append(row)
    except OSError as exc:
        raise WorkloadError(f"--llm-dataset: cannot read {spec.path!r} ({exc}).") from None
    if not rows:
        raise WorkloadError(f"--llm-dataset: {spec.path!r} holds no row with a user prompt.")
    return rows


# -- synthetic prompts of an exact token length ---------------------------------------------------

_WORDS = """
the of and to in is was for that with as on by at from his her an were are which this be or has
had not but they their its one two been who also new first after more other would when into only
time year years made over some such most them these between city during under many later
world known used three where while people state part since school there then both team season
against early well may city through war being before second called national several including
government system public same own each film well began high around life area river four found
until could name family however music history country group house game best form series during
small number long work large end back south north east west back album members century main
still city local power water field light market voice color garden paper story simple window
travel doctor bridge engine silver forest island mountain letter mirror planet rocket ocean
winter summer spring autumn morning evening village harbor castle kitchen library station theater
engine machine program signal network model memory value method result answer problem question
reason moment pattern surface energy motion balance weight height length volume measure figure
purple orange yellow green blue red black white brown golden quiet gentle rapid careful bright
heavy narrow ancient modern famous strange common simple honest clever patient curious silent
build carry change choose follow gather happen imagine invite listen notice offer prepare remember
explain discover describe consider continue develop improve include produce provide receive wonder
apple bread butter cheese coffee honey lemon onion pepper potato rice salad sugar tomato walnut
camera candle carpet cotton feather hammer ladder pencil pillow ribbon saddle tunnel wallet whistle
""".split()
_VOCAB: tuple[str, ...] = tuple(dict.fromkeys(_WORDS))


class PromptBuilder:
    """Text of exactly N tokens (as the given tokenizer counts them), from seeded random words.

    Words are counted with a leading space (and the first without), and BPE tokenizers do not
    merge across the space before a word, so the words' counts add up; the finished text is
    counted once more and trimmed or padded until it is exactly N.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        counts = tokenizer.count_many([" " + w for w in _VOCAB])
        bare = tokenizer.count_many(list(_VOCAB))
        self._words = [(w, c, b) for w, c, b in zip(_VOCAB, counts, bare) if c >= 1 and b >= 1]
        self._ones = [w for w, c, b in self._words if c == 1 and b == 1]
        if not self._ones:
            raise WorkloadError(
                f"the tokenizer {getattr(tokenizer, 'name', tokenizer)!r} counts no common English "
                "word as one token, so prompts of exact lengths cannot be built with it."
            )

    def build(self, n_tokens: int, rng: random.Random) -> str:
        words: list[str] = []
        total = 0
        pool = self._words
        while total < n_tokens:
            w, c, b = pool[rng.randrange(len(pool))]
            cost = b if not words else c
            if total + cost > n_tokens:
                w = self._ones[rng.randrange(len(self._ones))]
                cost = 1
            words.append(w)
            total += cost
        text = " ".join(words)
        count = self.tokenizer.count
        actual = count(text)
        for _ in range(64):  # a tokenizer that merges across words: correct by single words
            if actual == n_tokens:
                break
            if actual > n_tokens and len(words) > 1:
                words.pop()
            else:
                words.append(self._ones[rng.randrange(len(self._ones))])
            text = " ".join(words)
            actual = count(text)
        return text


#: Tokens of the question that follows a shared prefix when nothing else gives the prompt.
QUESTION_TOKENS = 16


# -- drawing a request ---------------------------------------------------------------------------


@dataclass
class Draw:
    """What one request of the workload sends, and what the records note about it."""

    messages: list[dict[str, Any]]
    """The prompt drawn (a dataset row, a synthetic prompt), without the shared prefix; empty
    when the workload has neither a dataset nor input lengths."""
    max_tokens: int | None = None
    target_output_tokens: int | None = None
    """Set by ``--llm-output-tokens``: the length the server was asked for (EOS ignored)."""
    input_tokens: int | None = None
    """The prompt's length as the prompt tokenizer counts it (synthetic prompts)."""
    prefix_group: int | None = None
    prefix: str | None = None
    """The shared system prompt of ``prefix_group``."""
    prefix_tokens: int = 0
    row: Row | None = None

    def compose(self, messages: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """What to send: ``messages`` (else the drawn prompt) after the shared prefix, if any."""
        base = [dict(m) for m in (self.messages if messages is None else messages)]
        if self.prefix is not None:
            base.insert(0, {"role": "system", "content": self.prefix})
        return base

    @property
    def known_input_tokens(self) -> int | None:
        """The drawn prompt's length with its prefix, when both are of known length."""
        if self.input_tokens is None:
            return None
        return self.input_tokens + (self.prefix_tokens if self.prefix is not None else 0)

    def request_kwargs(self, ignore_eos: bool = True) -> dict[str, Any]:
        """Body fields for the request: the output cap, and vLLM's ``ignore_eos``/``min_tokens``
        when a target length was set."""
        out: dict[str, Any] = {}
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if self.target_output_tokens is not None and ignore_eos:
            out["ignore_eos"] = True
            out["min_tokens"] = self.target_output_tokens
        return out


@dataclass
class Workload:
    """The prompts and lengths of one load test. Thread-safe; every draw is a pure function of
    ``seed``, ``salt`` and the position drawn."""

    seed: int
    dataset: DatasetSpec | None = None
    input_tokens: LengthSpec | None = None
    output_tokens: LengthSpec | None = None
    prefix: PrefixSpec | None = None
    tokenizer_spec: str = "usage"
    salt: str = ""
    """Mixed into the synthetic text (not the lengths), so a run's prompts are new to a server's
    prefix cache; '' repeats the text run to run."""
    _rows: list[Row] | None = field(default=None, init=False, repr=False)
    _builder: PromptBuilder | None = field(default=None, init=False, repr=False)
    _orders: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    _prefixes: dict[int, str] = field(default_factory=dict, init=False, repr=False)
    _cache: dict[int, Draw] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)
    _next: int = field(default=0, init=False, repr=False)

    @property
    def active(self) -> bool:
        """True when the workload decides what a prompt-less ``llm.stream()`` sends."""
        return self.dataset is not None or self.input_tokens is not None or self.prefix is not None

    # -- lazily loaded parts

    @property
    def rows(self) -> list[Row]:
        with self._lock:
            if self._rows is None:
                assert self.dataset is not None
                self._rows = load_rows(self.dataset)
            return self._rows

    @property
    def builder(self) -> PromptBuilder:
        with self._lock:
            if self._builder is None:
                from pytest_llmload.tokens import load_tokenizer

                spec = self.tokenizer_spec
                tokenizer = load_tokenizer(spec) if spec != "usage" else None
                if tokenizer is None:
                    tokenizer = load_tokenizer(DEFAULT_PROMPT_TOKENIZER)
                assert tokenizer is not None
                self._builder = PromptBuilder(tokenizer)
            return self._builder

    # -- positions

    def next_position(self) -> int:
        """A position no draw of this workload has taken (for draws outside the schedule)."""
        with self._lock:
            pos = self._next
            self._next += 1
            return pos

    def claim(self, position: int) -> None:
        """Note that the schedule took ``position``, so :meth:`next_position` skips it."""
        with self._lock:
            self._next = max(self._next, position + 1)

    def _rng(self, what: str, position: int) -> random.Random:
        return random.Random(f"{self.seed}:{what}:{position}")

    def row(self, position: int) -> Row:
        """The dataset row at ``position``: the rows shuffled by the seed, reshuffled each time
        the position wraps around (cycled when there are fewer rows than requests)."""
        rows = self.rows
        cycle, i = divmod(position, len(rows))
        with self._lock:
            order = self._orders.get(cycle)
            if order is None:
                order = list(range(len(rows)))
                random.Random(f"{self.seed}:rows:{cycle}").shuffle(order)
                if len(self._orders) > 64:
                    self._orders.clear()
                self._orders[cycle] = order
        return rows[order[i]]

    def prefix_text(self, group: int) -> str:
        assert self.prefix is not None
        with self._lock:
            text = self._prefixes.get(group)
            if text is None:
                rng = random.Random(f"{self.seed}:{self.salt}:prefix:{group}")
                text = self.builder.build(self.prefix.prefix_tokens, rng)
                self._prefixes[group] = text
            return text

    def draw(self, position: int) -> Draw:
        """What the request at ``position`` sends."""
        with self._lock:
            cached = self._cache.pop(position, None)
        if cached is not None:
            return cached
        return self._make(position)

    def prepare(self, positions: Sequence[int]) -> None:
        """Build these positions' prompts now (before the schedule starts), so building them
        takes no CPU from the loop while requests stream."""
        for pos in positions:
            d = self._make(pos)
            with self._lock:
                self._cache[pos] = d

    def _make(self, position: int) -> Draw:
        messages: list[dict[str, Any]]
        max_tokens = None
        row = None
        input_tokens = None
        if self.dataset is not None:
            row = self.row(position)
            messages = [dict(m) for m in row.messages]
            max_tokens = row.max_tokens
        elif self.input_tokens is not None:
            n = self.input_tokens.sample(self._rng("input", position))
            rng = random.Random(f"{self.seed}:{self.salt}:text:{position}")
            messages = [{"role": "user", "content": self.builder.build(n, rng)}]
            input_tokens = n
        else:
            messages = []
        group = prefix = None
        prefix_tokens = 0
        if self.prefix is not None:
            group = self._rng("group", position).randrange(self.prefix.groups)
            prefix = self.prefix_text(group)
            prefix_tokens = self.prefix.prefix_tokens
            if not messages:  # a prefix alone: a short question of its own after it
                n = QUESTION_TOKENS
                rng = random.Random(f"{self.seed}:{self.salt}:question:{position}")
                messages = [{"role": "user", "content": self.builder.build(n, rng)}]
                input_tokens = n
        target = None
        if self.output_tokens is not None:
            target = self.output_tokens.sample(self._rng("output", position))
            max_tokens = target
        return Draw(messages, max_tokens, target, input_tokens, group, prefix, prefix_tokens, row)
