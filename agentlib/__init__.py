"""agentlib: the reusable code behind the agent-distillation notebooks (arXiv 2505.17612)."""

__version__ = "0.1.0"
