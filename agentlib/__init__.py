"""agentlib: the reusable code behind the agent-distillation notebooks (arXiv 2505.17612)."""

from agentlib import quiet as _quiet

__version__ = "0.1.0"

_quiet.filter_known_warnings()  # narrowly, by message: see agentlib.quiet
_quiet.headless_library_bars()  # papermill runs: no library progress widgets frozen at 0%
