"""agentlib: the reusable code behind the agent-distillation notebooks (arXiv 2505.17612)."""

from agentlib.quiet import filter_known_warnings as _filter_known_warnings

__version__ = "0.1.0"

_filter_known_warnings()  # narrowly, by message: see agentlib.quiet
