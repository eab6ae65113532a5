"""Known-harmless warnings of the libraries agentlib loads, silenced narrowly: by logger or category, and message.

Each entry says why it is harmless; anything else still shows. Installed when ``agentlib`` is imported, so
the filters are in place before bitsandbytes, peft or transformers load. In a notebook run headless
(papermill), the libraries' own widget progress bars are turned off too: saved, they only ever show 0%.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

__all__ = ["KNOWN_HARMLESS_LOGS", "KNOWN_HARMLESS_WARNINGS", "filter_known_warnings", "headless_library_bars"]

# (logger, the start of the message as a regex, why it is harmless)
KNOWN_HARMLESS_LOGS = (
    (
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional faster CPU kernel (the `kernels` package); bitsandbytes falls back to its own",
    ),
)
# (category, the start of the message as a regex, why it is harmless)
KNOWN_HARMLESS_WARNINGS = (
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        "peft reads the old attribute name; transformers still answers it",
    ),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def filter_known_warnings() -> None:
    """Install the filters of ``KNOWN_HARMLESS_LOGS`` and ``KNOWN_HARMLESS_WARNINGS`` (idempotent)."""
    for category, pattern, _why in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)  # a duplicate replaces itself
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in KNOWN_HARMLESS_LOGS:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))


def headless_library_bars() -> None:
    """In a kernel without a live frontend, turn off transformers' and huggingface_hub's progress bars: their
    widgets would be saved frozen at 0%. agentlib's own bars (``viz.progress_bar``) print a final line instead."""
    from agentlib.viz import live_frontend

    if "ipykernel" not in sys.modules or live_frontend():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if "transformers" in sys.modules:  # already imported: its switch was read then
        sys.modules["transformers"].utils.logging.disable_progress_bar()
