import json

import pytest

from agentlib import data
from agentlib.data import BENCHMARKS, DataError, load_benchmark, load_extra
from agentlib.paths import file_sha256

EXPECTED = {
    ("test", "hotpotqa"): 500,
    ("test", "bamboogle"): 125,
    ("test", "musique"): 500,
    ("test", "2wikimultihopqa"): 500,
    ("test", "math500"): 500,
    ("test", "gsm_hard"): 500,
    ("test", "aime"): 90,
    ("test", "olymath"): 200,
    ("train", "hotpotqa"): 1000,
    ("train", "math"): 1000,
    ("train", "math_medium"): 1000,
}


@pytest.mark.parametrize(("split", "name"), sorted(EXPECTED))
def test_paper_splits_have_exact_counts(data_root, split, name):
    examples = load_benchmark(name, split)
    assert len(examples) == EXPECTED[(split, name)]
    for ex in examples:
        assert ex.question.strip() and ex.answer.strip(), ex.id
        assert ex.domain == BENCHMARKS[split][name][1]
    assert len({ex.id for ex in examples}) == len(examples)


def test_all_eleven_files_are_covered():
    assert sum(len(v) for v in BENCHMARKS.values()) == 11 == len(EXPECTED)


def test_quirks_are_normalised(data_root):
    musique = load_benchmark("musique")
    assert all(ex.id == ex.id.strip() for ex in musique)
    assert {ex.extra["hops"] for ex in musique} == {3}  # the metadata says 4-hop
    math = {ex.id: ex for ex in load_benchmark("math", "train")}
    assert math["174"].answer == "0" and "answer_correction" in math["174"].extra
    gsm = load_benchmark("gsm_hard")
    assert gsm[0].answer == "13138980"  # 13138980.0 in the file
    assert not any(ex.answer.endswith(".0") for ex in gsm)
    hotpot = load_benchmark("hotpotqa")
    assert hotpot[0].extra["dev_row"] == 100 and hotpot[-1].extra["dev_row"] == 599


def test_answerable_hotpotqa_subset_is_the_200_in_corpus(data_root):
    sub = load_benchmark("hotpotqa", answerable_only=True)
    full = load_benchmark("hotpotqa")
    assert len(sub) == 200
    idx = [full.index(ex) for ex in sub]
    assert idx == [i for i in range(201) if i != 139]


def test_extras_load_with_paragraphs_and_aliases(data_root):
    dev = load_extra("hotpotqa_dev300")
    assert len(dev) == 300 and len(dev[0].extra["paragraphs"]) == 10
    assert dev[0].answer == "yes"
    train = load_extra("hotpotqa_train100")
    assert len(train) == 100 and all(ex.extra["supporting_titles"] for ex in train)
    mus = load_extra("musique_train100")
    assert len(mus) == 100 and mus[0].aliases == ["Stanley Hall"]
    assert len(load_extra("math_test")) == 5000
    assert all(ex.answer for ex in load_extra("math_test"))
    assert len(load_extra("aime24")) == 30 and len(load_extra("aime25")) == 30
    assert len(load_extra("olymmath_easy")) == 100


def test_limit(data_root):
    assert len(load_benchmark("math500", limit=7)) == 7


def test_unknown_names_give_clear_errors(data_root):
    with pytest.raises(DataError, match="unknown test benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(DataError, match="unknown split"):
        load_benchmark("hotpotqa", split="dev")
    with pytest.raises(DataError, match="unknown extra"):
        load_extra("nope")


def _fake_root(tmp_path, monkeypatch, rel, content):
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_text(content)
    monkeypatch.setenv("AGENTLIB_DATA_DIR", str(tmp_path))
    return path


def test_malformed_row_names_file_and_row(tmp_path, monkeypatch):
    rel = BENCHMARKS["test"]["bamboogle"][0]
    rows = [{"id": 0, "question": "q?", "answer": "a"}, {"id": 1, "question": "", "answer": "b"}]
    path = _fake_root(tmp_path, monkeypatch, rel, json.dumps({"metadata": {}, "examples": rows}))
    with pytest.raises(DataError) as e:
        load_benchmark("bamboogle")
    assert str(path) in str(e.value) and "row 1" in str(e.value) and "'question'" in str(e.value)


def test_missing_file_and_bad_json(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTLIB_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="file not found"):
        load_benchmark("aime")
    _fake_root(tmp_path, monkeypatch, data.EXTRAS["aime24"], '{"problem": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(DataError, match="row 1: not valid JSON"):
        load_extra("aime24")


def test_missing_data_dir_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTLIB_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.data_dir()


def test_manifest_matches_files_and_corpus_rebuilds(data_root, tmp_path):
    entries = data.manifest()
    assert len(entries) == 27
    for e in entries:
        assert file_sha256(data_root / e["path"]) == e["sha256"], e["path"]
        assert e["url"].startswith(("https://", "build:"))
    out = tmp_path / "wiki_mini.jsonl"
    assert data.build_corpus(data_root, out) == 11974
    corpus = next(e for e in entries if e["path"] == "corpus/wiki_mini.jsonl")
    assert file_sha256(out) == corpus["sha256"]


def test_fetch_from_mirror_is_verified_and_idempotent(data_root, tmp_path):
    dest = data.fetch(tmp_path / "cache", mirror=data_root)
    assert (dest / "corpus" / "wiki_mini.jsonl").is_file()
    bad = dest / "benchmarks/math_dataset/test/aime_90_20250504.json"
    bad.write_text("corrupt")
    data.fetch(dest, mirror=data_root)  # re-copies the file whose sha256 is wrong
    assert file_sha256(bad) == next(
        e["sha256"] for e in data.manifest() if e["path"].endswith("aime_90_20250504.json")
    )


def test_last_boxed():
    assert data.last_boxed(r"so \boxed{\frac{1}{2}} and \boxed{3^{2}}") == "3^{2}"
    assert data.last_boxed("no box") is None
