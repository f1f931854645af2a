"""Workload building blocks: the length grammar, exact-length synthetic prompts, datasets."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from pytest_llmload.errors import ConfigError
from pytest_llmload.tokens import load_tokenizer
from pytest_llmload.workload import (
    LengthSpec,
    PromptBuilder,
    Workload,
    WorkloadError,
    load_rows,
    parse_dataset_spec,
    parse_length_spec,
    parse_prefix_spec,
)


@pytest.fixture(scope="module")
def cl100k():
    tok = load_tokenizer("tiktoken:cl100k_base")
    assert tok is not None
    return tok


# -- the length grammar ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "values"),
    [
        ("512", "fixed", (512,)),
        (" uniform:100-1000 ", "uniform", (100, 1000)),
        ("normal:500,100", "normal", (500.0, 100.0)),
        ("200:0.7,2000:0.3", "mixture", (200, 2000)),
    ],
)
def test_length_spec_forms(text: str, kind: str, values: tuple[float, ...]) -> None:
    spec = parse_length_spec(text)
    assert spec.kind == kind and spec.values == values
    assert parse_length_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "bad", ["0", "-5", "uniform:10-5", "normal:abc", "200:0.7,2000", "200:0", "lots", "", True, 1.5]
)
def test_length_spec_refuses(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^--llm-output-tokens: expected a token length.*got"):
        parse_length_spec(bad, "--llm-output-tokens")


def test_mixture_weights_are_honoured() -> None:
    spec = parse_length_spec("200:0.7,2000:0.3")
    rng = random.Random(1)
    draws = [spec.sample(rng) for _ in range(5000)]
    assert set(draws) == {200, 2000}
    assert abs(draws.count(200) / 5000 - 0.7) < 0.03


def test_uniform_stays_in_range() -> None:
    spec = parse_length_spec("uniform:3-7")
    rng = random.Random(2)
    assert {spec.sample(rng) for _ in range(500)} == {3, 4, 5, 6, 7}


def test_prefix_spec() -> None:
    assert str(parse_prefix_spec("groups=8,prefix_tokens=1024")) == "groups=8,prefix_tokens=1024"
    assert parse_prefix_spec("prefix_tokens=64").groups == 1
    for bad in ("groups=8", "groups=0,prefix_tokens=5", "size=3,prefix_tokens=5", "x"):
        with pytest.raises(ConfigError, match=r"^--llm-prefix: expected comma-separated groups"):
            parse_prefix_spec(bad)


# -- exact lengths -----------------------------------------------------------------------------


def _ks_normal(samples: list[int], mean: float, sd: float) -> tuple[float, float]:
    """One-sample Kolmogorov-Smirnov statistic against N(mean, sd) and its asymptotic p-value
    (Stephens' small-sample correction, as scipy's 'asymp' mode)."""
    xs = sorted(samples)
    n = len(xs)

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf((x - mean) / (sd * math.sqrt(2))))

    d = max(max((i + 1) / n - cdf(x), cdf(x) - i / n) for i, x in enumerate(xs))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def test_ks_helper_can_fail() -> None:
    """The check below is able to reject: a shifted distribution gets a tiny p-value."""
    rng = random.Random(0)
    shifted = [round(rng.gauss(530, 100)) for _ in range(1000)]
    assert _ks_normal(shifted, 500, 100)[1] < 0.01


def test_thousand_prompts_hit_n_exactly(cl100k) -> None:
    w = Workload(seed=7, input_tokens=parse_length_spec("300"), tokenizer_spec="tiktoken:cl100k_base")
    texts = [w.draw(i).messages[-1]["content"] for i in range(1000)]
    counts = cl100k.count_many(texts)
    assert counts == [300] * 1000
    # varied text, not one word repeated, and no two prompts alike
    assert len(set(texts)) == 1000
    assert len(set(texts[0].split())) > 100


def test_normal_lengths_pass_a_ks_test(cl100k) -> None:
    w = Workload(
        seed=11, input_tokens=parse_length_spec("normal:500,100"),
        tokenizer_spec="tiktoken:cl100k_base",
    )
    draws = [w.draw(i) for i in range(1000)]
    counts = cl100k.count_many([d.messages[-1]["content"] for d in draws])
    assert counts == [d.input_tokens for d in draws]  # every prompt is its drawn length
    d, p = _ks_normal(counts, 500, 100)
    assert p > 0.01, (d, p)


def test_builder_with_a_hugging_face_tokenizer() -> None:
    """A tokenizer of another family (litellm ships some tokenizer.json files) hits N too."""
    from pytest_llmload.tokens import litellm_tokenizer_files

    files = litellm_tokenizer_files()
    if not files:
        pytest.skip("litellm ships no tokenizer.json here")
    tok = load_tokenizer(str(next(iter(files.values()))))
    assert tok is not None
    builder = PromptBuilder(tok)
    rng = random.Random(3)
    for n in (1, 17, 250):
        assert tok.count(builder.build(n, rng)) == n


def test_draws_repeat_with_the_seed_and_salt_changes_text(cl100k) -> None:
    spec = parse_length_spec("uniform:50-80")
    a = Workload(seed=1, input_tokens=spec, tokenizer_spec="tiktoken:cl100k_base")
    b = Workload(seed=1, input_tokens=spec, tokenizer_spec="tiktoken:cl100k_base")
    c = Workload(seed=1, input_tokens=spec, tokenizer_spec="tiktoken:cl100k_base", salt="run2")
    assert [a.draw(i).messages for i in range(5)] == [b.draw(i).messages for i in range(5)]
    assert [a.draw(i).input_tokens for i in range(5)] == [c.draw(i).input_tokens for i in range(5)]
    assert a.draw(0).messages != c.draw(0).messages


def test_output_target_asks_to_ignore_eos() -> None:
    w = Workload(seed=1, output_tokens=parse_length_spec("128"))
    d = w.draw(0)
    assert d.request_kwargs() == {"max_tokens": 128, "ignore_eos": True, "min_tokens": 128}


def test_prefix_groups_share_their_system_prompt(cl100k) -> None:
    w = Workload(
        seed=5, prefix=parse_prefix_spec("groups=3,prefix_tokens=64"),
        input_tokens=parse_length_spec("20"), tokenizer_spec="tiktoken:cl100k_base",
    )
    draws = [w.draw(i) for i in range(60)]
    assert {d.prefix_group for d in draws} == {0, 1, 2}
    by_group: dict[int, set[str]] = {}
    for d in draws:
        sent = d.compose()
        assert [m["role"] for m in sent] == ["system", "user"]
        by_group.setdefault(d.prefix_group or 0, set()).add(sent[0]["content"])
    assert all(len(texts) == 1 for texts in by_group.values())
    assert len({next(iter(t)) for t in by_group.values()}) == 3
    assert cl100k.count(draws[0].compose()[0]["content"]) == 64
    assert draws[0].known_input_tokens == 84
    # a body's own prompt gets the prefix too
    own = draws[0].compose([{"role": "user", "content": "hi"}])
    assert own[0]["role"] == "system" and own[1] == {"role": "user", "content": "hi"}


# -- datasets ----------------------------------------------------------------------------------


def _sharegpt(path: Path, n: int) -> list[dict]:
    rows = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"question {i} first"},
                {"from": "gpt", "value": f"answer {i}"},
                {"from": "human", "value": f"question {i} second"},
                {"from": "gpt", "value": f"answer {i} again"},
            ],
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return rows


def test_sharegpt_rows_keep_their_turns(tmp_path: Path) -> None:
    _sharegpt(tmp_path / "sg.json", 3)
    rows = load_rows(parse_dataset_spec(str(tmp_path / "sg.json")))
    assert len(rows) == 3
    assert [m["role"] for m in rows[1].messages] == ["user", "assistant", "user"]
    assert rows[1].user_turns == ["question 1 first", "question 1 second"]


def test_rows_are_shuffled_by_seed_and_cycled(tmp_path: Path) -> None:
    _sharegpt(tmp_path / "sg.json", 5)
    spec = parse_dataset_spec(str(tmp_path / "sg.json"))
    w = Workload(seed=3, dataset=spec)
    first = [w.row(i).index for i in range(5)]
    second = [w.row(i).index for i in range(5, 10)]
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4]
    assert first != [0, 1, 2, 3, 4] or second != [0, 1, 2, 3, 4]
    assert [Workload(seed=3, dataset=spec).row(i).index for i in range(10)] == first + second
    assert [Workload(seed=4, dataset=spec).row(i).index for i in range(10)] != first + second


def test_jsonl_prompt_and_messages_rows(tmp_path: Path) -> None:
    p = tmp_path / "rows.jsonl"
    p.write_text(
        json.dumps({"prompt": "hello there", "max_tokens": 7}) + "\n\n"
        + json.dumps({"messages": [{"role": "system", "content": "s"},
                                   {"role": "user", "content": "u"}]}) + "\n"
    )
    rows = load_rows(parse_dataset_spec(str(p)))
    assert rows[0].messages == ({"role": "user", "content": "hello there"},)
    assert rows[0].max_tokens == 7
    assert [m["role"] for m in rows[1].messages] == ["system", "user"]


def test_column_option_and_bad_rows(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"q": "what?", "other": 1}) + "\n")
    assert load_rows(parse_dataset_spec(f"{p},column=q"))[0].prompt == "what?"
    with pytest.raises(WorkloadError, match="has none of the keys"):
        load_rows(parse_dataset_spec(str(p)))
    with pytest.raises(WorkloadError, match="no column 'nope'"):
        load_rows(parse_dataset_spec(f"{p},column=nope"))


def test_a_hub_name_is_refused_not_downloaded() -> None:
    with pytest.raises(ConfigError) as info:
        parse_dataset_spec("anon8231489123/ShareGPT_Vicuna_unfiltered", "--llm-dataset")
    msg = str(info.value)
    assert msg.startswith("--llm-dataset: there is no file or folder at")
    assert "local paths only, never downloaded" in msg
    with pytest.raises(ConfigError, match="unknown dataset option 'colum'"):
        parse_dataset_spec("x.json,colum=a")


def test_hugging_face_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"question": ["a b", "c d", "e f"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "hf"))
    rows = load_rows(parse_dataset_spec(f"{tmp_path / 'hf'},column=question"))
    assert [r.prompt for r in rows] == ["a b", "c d", "e f"]
    ds.to_parquet(str(tmp_path / "d.parquet"))
    rows = load_rows(parse_dataset_spec(str(tmp_path / "d.parquet")))
    assert [r.prompt for r in rows] == ["a b", "c d", "e f"]
