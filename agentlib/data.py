"""Benchmarks and extras as one `Example` record, read from the external data folder.

The files are public data (see data/README.md); they are never committed. `agentlib.paths.data_dir()`
finds them (``AGENTLIB_DATA_DIR`` or ``data/cache``); ``make data`` fills ``data/cache``
(``python -m agentlib.data fetch``). Known quirks of the files are normalised here, not in callers.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentlib.paths import ROOT, data_dir, file_sha256

__all__ = [
    "DataError",
    "Example",
    "BENCHMARKS",
    "EXTRAS",
    "MANIFEST",
    "ANSWER_CORRECTIONS",
    "format_number",
    "load_benchmark",
    "load_extra",
    "split_title",
    "last_boxed",
    "manifest",
    "fetch",
    "build_corpus",
]


class DataError(ValueError):
    """A data file is missing, unknown or malformed; the message names the file and the row."""


@dataclass
class Example:
    """One question with its gold answer (and aliases). ``domain`` is "factual" or "math"."""

    id: str
    question: str
    answer: str
    aliases: list[str] = field(default_factory=list)
    domain: str = "factual"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def golds(self) -> list[str]:
        """The answer followed by its aliases, without duplicates."""
        return list(dict.fromkeys([self.answer, *self.aliases]))

    def to_dict(self) -> dict:
        return asdict(self)


# name -> (relative path, domain, expected count). The paper's exact splits.
BENCHMARKS: dict[str, dict[str, tuple[str, str, int]]] = {
    "test": {
        "hotpotqa": ("benchmarks/qa_dataset/test/hotpotqa_500_20250422.json", "factual", 500),
        "bamboogle": ("benchmarks/qa_dataset/test/bamboogle_125_20250507.json", "factual", 125),
        "musique": ("benchmarks/qa_dataset/test/musique_500_20250504.json", "factual", 500),
        "2wikimultihopqa": ("benchmarks/qa_dataset/test/2wikimultihopqa_500_20250511.json", "factual", 500),
        "math500": ("benchmarks/math_dataset/test/math_500_20250414.json", "math", 500),
        "gsm_hard": ("benchmarks/math_dataset/test/gsm_hard_500_20250507.json", "math", 500),
        "aime": ("benchmarks/math_dataset/test/aime_90_20250504.json", "math", 90),
        "olymath": ("benchmarks/math_dataset/test/olymath_200_20250511.json", "math", 200),
    },
    "train": {
        "hotpotqa": ("benchmarks/qa_dataset/train/hotpotqa_1000_20250402.json", "factual", 1000),
        "math": ("benchmarks/math_dataset/train/math_1000_20250414.json", "math", 1000),
        "math_medium": ("benchmarks/math_dataset/train/math_medium_1000_20250430.json", "math", 1000),
    },
}

EXTRAS = {
    "hotpotqa_dev300": "extra/hotpotqa/hotpotqa_dev0-299_with_10para_docs.json",
    "hotpotqa_train100": "extra/hotpotqa/hipporag_hotpotqa_train100.json",
    "musique_train100": "extra/musique/hipporag_musique_train100.json",
    "2wiki_dev1000": "extra/2wikimultihopqa/2wiki_dev_first1000_qa.json",
    "math_test": "extra/math/math_test5000.jsonl",
    "math500_full": "extra/math/math500_test.jsonl",
    "gsm_hard_full": "extra/gsm_hard/gsmhardv2.jsonl",
    "aime24": "extra/aime/aime24_test.jsonl",
    "aime25": "extra/aime/aime25_test.jsonl",
    "olymmath_easy": "extra/olymmath/OlymMATH-EN-EASY.jsonl",
    "olymmath_hard": "extra/olymmath/OlymMATH-EN-HARD.jsonl",
    "olympiadbench": "extra/olympiadbench/olympiadbench_test.jsonl",
}

MANIFEST = Path(__file__).with_name("data_manifest.tsv")

# Four MATH training rows ship without a gold answer. Each is short enough to solve by hand:
# (split, benchmark, id) -> (answer, why). Applied in the loader and flagged in ``extra``.
ANSWER_CORRECTIONS = {
    ("train", "math", "174"): ("0", "n!+k is divisible by k for 2 <= k <= n, so none is prime: (A) 0"),
    ("train", "math", "499"): ("0", "P+n shares a prime factor <= 61 with P for 2 <= n <= 59: (A) 0"),
    ("train", "math_medium", "124"): ("2", "2x^2 - 5x + 2 = 0 gives x = 2 or 1/2; the largest is 2"),
    ("train", "math_medium", "519"): ("9", "x^2 + y^2 = (x + y)^2 - 2xy = 1 + 8 = 9"),
}


# ---------------------------------------------------------------- reading files
def _path(rel: str) -> Path:
    path = data_dir() / rel
    if not path.is_file():
        raise DataError(f"{path}: file not found (run `make data`, or set AGENTLIB_DATA_DIR)")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {i}: not valid JSON ({e})") from e
    return rows


def _require(row: Any, keys: tuple[str, ...], path: Path, i: int) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
    for key in keys:
        if key not in row or row[key] is None or str(row[key]).strip() == "":
            raise DataError(f"{path}: row {i}: missing or empty field {key!r}")


def format_number(value: Any) -> str:
    """GSM-Hard stores answers as floats: 13138980.0 -> "13138980", 2.5 -> "2.5"."""
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value).strip()


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---------------------------------------------------------------- the paper's splits
def load_benchmark(
    name: str, split: str = "test", limit: int | None = None, answerable_only: bool = False
) -> list[Example]:
    """The paper's exact split ``name`` (see ``BENCHMARKS``), normalised.

    ``answerable_only`` keeps only factual questions whose evidence is in the offline mini-corpus
    (for ``hotpotqa`` test: the 200 items matched by question text to HotpotQA dev rows 0-299).
    """
    if split not in BENCHMARKS:
        raise DataError(f"unknown split {split!r}; choose from {sorted(BENCHMARKS)}")
    if name not in BENCHMARKS[split]:
        raise DataError(f"unknown {split} benchmark {name!r}; choose from {sorted(BENCHMARKS[split])}")
    rel, domain, _ = BENCHMARKS[split][name]
    path = _path(rel)
    payload = _read_json(path)
    rows = payload.get("examples") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected an object with an 'examples' list")
    examples = []
    for i, row in enumerate(rows):
        fix = ANSWER_CORRECTIONS.get((split, name, str(row.get("id")) if isinstance(row, dict) else ""))
        if fix and not str(row.get("answer") or "").strip():
            row = {**row, "answer": fix[0], "answer_correction": fix[1]}
        _require(row, ("id", "question", "answer"), path, i)
        ex = Example(
            id=str(row["id"]).strip(),  # one MuSiQue id has a leading space
            question=str(row["question"]).strip(),
            answer=format_number(row["answer"]),
            domain=domain,
            source=f"{name}/{split}",
            extra={k: v for k, v in row.items() if k not in ("id", "question", "answer")},
        )
        if name == "musique":
            # The metadata says "4-hop"; the ids say how many hops each question has.
            # "3hop1__454441_55349_651302": one sub-question id per hop after "__".
            ex.extra["hops"] = len(ex.id.split("__", 1)[-1].split("_"))
        if name == "hotpotqa" and split == "test":
            ex.extra["hotpot_split"] = "dev"  # "test" is really HotpotQA dev rows 100-599
            ex.extra["dev_row"] = 100 + i
        examples.append(ex)
    if answerable_only and domain == "factual":  # math needs no retrieval: nothing to filter
        examples = [ex for ex in examples if ex.question in _corpus_questions()]
    return examples[:limit] if limit is not None else examples


def _corpus_questions() -> set[str]:
    """Questions whose evidence paragraphs are in the mini-corpus."""
    qs = {ex.question for ex in load_extra("hotpotqa_dev300")}
    qs |= {ex.question for ex in load_extra("hotpotqa_train100")}
    qs |= {ex.question for ex in load_extra("musique_train100")}
    return qs


# ---------------------------------------------------------------- extras
def load_extra(name: str, limit: int | None = None) -> list[Example]:
    """Offline extras: HotpotQA dev 0-299 with paragraphs, HippoRAG train-100 sets, MATH, AIME, ..."""
    if name not in EXTRAS:
        raise DataError(f"unknown extra {name!r}; choose from {sorted(EXTRAS)}")
    path = _path(EXTRAS[name])
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of rows")
    parse = _EXTRA_PARSERS[name]
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        try:
            ex = parse(row, i)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{path}: row {i}: {type(e).__name__}: {e}") from e
        if not ex.question or not ex.answer:
            raise DataError(f"{path}: row {i}: empty question or answer")
        ex.source = name
        out.append(ex)
    return out[:limit] if limit is not None else out


def split_title(paragraph: str) -> tuple[str, str]:
    """ "Title. text" -> (title, text), split at the first ". " (the HotpotQA-dev file's layout)."""
    title, sep, text = paragraph.partition(". ")
    return (title.strip(), text.strip()) if sep else ("", paragraph.strip())


def _hotpot_dev(row: dict, i: int) -> Example:
    answers = [str(a) for a in _as_list(row["answers"])]
    paragraphs = [split_title(p) for p in re.split(r"\n\s*\n", row["document"]) if p.strip()]
    return Example(
        id=f"dev{int(row['id'])}",
        question=row["question"].strip(),
        answer=answers[0],
        aliases=answers[1:],
        extra={"dev_row": int(row["id"]), "paragraphs": paragraphs},
    )


def _hotpot_train100(row: dict, i: int) -> Example:
    facts = _as_list(row["supporting_facts"])
    return Example(
        id=row["_id"],
        question=row["question"].strip(),
        answer=str(row["answer"]),
        extra={
            "supporting_titles": sorted({f[0] for f in facts}),
            "type": row.get("type"),
            "level": row.get("level"),
            "context": row.get("context"),
        },
    )


def _musique_train100(row: dict, i: int) -> Example:
    paragraphs = _as_list(row["paragraphs"])
    return Example(
        id=row["id"].strip(),
        question=row["question"].strip(),
        answer=str(row["answer"]),
        aliases=[str(a) for a in _as_list(row.get("answer_aliases", []))],
        extra={
            "supporting_titles": sorted({p["title"] for p in paragraphs if p.get("is_supporting")}),
            "paragraphs": paragraphs,
            "hops": int(row["id"][0]),
        },
    )


def _2wiki(row: dict, i: int) -> Example:
    answers = [str(a) for a in _as_list(row["answer"])]
    return Example(id=str(row["test_id"]), question=row["question"], answer=answers[0], aliases=answers[1:])


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def _math(row: dict, i: int) -> Example:
    answer = row.get("answer") or last_boxed(row.get("solution", "")) or ""
    keep = ("level", "type", "subject", "solution", "unique_id")
    return Example(
        id=str(row.get("unique_id") or row.get("idx") or row.get("id") or i),
        question=row["problem"],
        answer=str(answer),
        domain="math",
        extra={k: row[k] for k in keep if k in row},
    )


def _gsm_hard(row: dict, i: int) -> Example:
    return Example(
        id=str(i), question=row["input"], answer=format_number(float(row["target"])), domain="math"
    )


def _olympiad(row: dict, i: int) -> Example:
    answers = [str(a) for a in _as_list(row["final_answer"])]
    return Example(
        id=str(row["id"]),
        question=row["question"],
        answer=answers[0],
        domain="math",
        extra={"subfield": row.get("subfield")},
    )


_EXTRA_PARSERS = {
    "hotpotqa_dev300": _hotpot_dev,
    "hotpotqa_train100": _hotpot_train100,
    "musique_train100": _musique_train100,
    "2wiki_dev1000": _2wiki,
    "math_test": _math,
    "math500_full": _math,
    "gsm_hard_full": _gsm_hard,
    "aime24": _math,
    "aime25": _math,
    "olymmath_easy": _math,
    "olymmath_hard": _math,
    "olympiadbench": _olympiad,
}


# ---------------------------------------------------------------- make data
def manifest() -> list[dict]:
    """Rows of agentlib/data_manifest.tsv: path, sha256, url (the pinned public source)."""
    lines = MANIFEST.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:] if line.strip()]


def fetch(dest: Path | None = None, mirror: Path | None = None) -> Path:
    """Fill ``dest`` (default ``data/cache``) from a local mirror or the pinned URLs; verify sha256s."""
    dest = Path(dest or ROOT / "data" / "cache")
    if mirror is None:
        candidate = ROOT.parent / "shared" / "data"
        mirror = candidate if candidate.is_dir() else None
    for entry in manifest():
        target = dest / entry["path"]
        if target.is_file() and file_sha256(target) == entry["sha256"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        if mirror is not None and (mirror / entry["path"]).is_file():
            shutil.copyfile(mirror / entry["path"], tmp)
        elif entry["url"].startswith("build:"):
            continue  # built below from the files it pools
        else:
            print(f"downloading {entry['url']}", file=sys.stderr)
            with urllib.request.urlopen(entry["url"], timeout=120) as r, tmp.open("wb") as f:
                shutil.copyfileobj(r, f)
        if file_sha256(tmp) != entry["sha256"]:
            tmp.unlink()
            raise DataError(f"{entry['path']}: sha256 mismatch (expected {entry['sha256']})")
        tmp.replace(target)
    for entry in manifest():
        target = dest / entry["path"]
        if entry["url"].startswith("build:") and not target.is_file():
            build_corpus(dest, target)
            if file_sha256(target) != entry["sha256"]:
                raise DataError(f"{target}: rebuilt corpus does not match its pinned sha256")
    return dest


def build_corpus(root: Path, out: Path) -> int:
    """Rebuild corpus/wiki_mini.jsonl from the extras it pools (the recipe in data/README.md)."""
    seen: set[tuple[str, str]] = set()
    rows: list[dict] = []

    def add(title: str, text: str, source: str) -> None:
        if (title, text) not in seen:
            seen.add((title, text))
            rows.append({"id": f"p{len(rows):06d}", "title": title, "text": text, "source": source})

    for row in json.loads((root / EXTRAS["hotpotqa_dev300"]).read_text()):
        for p in re.split(r"\n\s*\n", row["document"]):
            if p.strip():
                add(*split_title(p), "hotpot_dev300")
    hotpot = json.loads((root / "extra/hotpotqa/hipporag_hotpotqa_train100_corpus.json").read_text())
    for title, sentences in hotpot.items():  # title -> sentences
        add(title, "".join(sentences).strip(), "hotpot_train100")
    for rel, source in [
        ("extra/musique/hipporag_musique_train100_corpus.json", "musique_train100"),
        ("extra/2wikimultihopqa/hipporag_2wiki_corpus.json", "2wiki_hipporag"),
    ]:
        for row in json.loads((root / rel).read_text()):  # list of {title, text}
            add(row["title"], row["text"], source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m agentlib.data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fill data/cache from a mirror folder or the pinned URLs")
    f.add_argument("--mirror", type=Path, default=None)
    f.add_argument("--dest", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        print(f"data ready in {fetch(args.dest, args.mirror)}")


if __name__ == "__main__":
    main()
