"""The published trajectories re-run in today's sandbox with the same observations.

Every trajectory in ``data/*.jsonl.gz`` whose steps call no tool (so that its observations depend on
the code alone) is replayed step by step in one sandbox, as the agent ran it, and each step's output
is compared with the recorded observation: the same printed logs and, where the step failed, the same
error. One kind of difference is expected and checked the other way round: a step that an older sandbox
refused although it is ordinary code (``datetime.strptime``, the ``idna`` codec) must now run, after which
that trajectory's later steps are no longer comparable (the retired teacher trials had such steps).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from agentlib.sandbox import Sandbox

DATA = Path(__file__).resolve().parents[1] / "data"
PER_FILE = 30  # tool-free trajectories per published teacher set
OLD_REFUSALS = ("import of '_strptime' is not allowed", "unknown encoding: idna")


def _trajectories() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DATA.glob("*.jsonl.gz")):
        taken = 0
        with gzip.open(path, "rt") as f:
            for line in f:
                rec = json.loads(line)
                steps = [s for s in rec.get("steps") or [] if s.get("code") is not None]
                if steps and not any("search(" in s["code"] for s in steps) and taken < PER_FILE:
                    out.append((f"{path.name}:{rec['id']}", rec))
                    taken += 1
    return out


TRAJECTORIES = _trajectories()


@pytest.mark.skipif(not TRAJECTORIES, reason="no trajectories in data/")
def test_tool_free_trajectories_replay_with_the_same_observations():
    compared, fixed, mismatches = 0, 0, []
    for name, rec in TRAJECTORIES:
        with Sandbox(timeout_s=30) as sb:
            for step in rec["steps"]:
                if step.get("code") is None:
                    continue
                recorded = step["observation"]
                if "TimeoutError" in recorded:
                    break  # it ran out of time then; the state after it is unknown
                r = sb.run(step["code"])
                if r.restarted:
                    sb.run("pass")
                if any(refusal in recorded for refusal in OLD_REFUSALS):
                    assert r.error is None or not any(x in r.error for x in OLD_REFUSALS), (name, r.error)
                    fixed += 1
                    break
                ok = recorded.startswith("Execution logs:\n" + r.stdout)
                if r.error:
                    ok = ok and r.error.strip().splitlines()[-1] in recorded
                elif "\nError:\n" in recorded and r.stdout.strip() == "" and not r.called_final_answer:
                    ok = False
                compared += 1
                if not ok:
                    mismatches.append((name, step["code"][:300], recorded[:300], r.stdout[:300], r.error))
    assert compared >= 40, (compared, fixed)
    assert not mismatches, mismatches[:3]
