"""Child process for `agentlib.metrics.math_equal`: reads JSON [pred, gold] lines, writes true/false."""

import json
import logging
import sys

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

logging.getLogger("math_verify").setLevel(logging.ERROR)  # no "timeout is disabled" notices
CONFIGS = [LatexExtractionConfig(), ExprExtractionConfig()]


def equal(pred: str, gold: str) -> bool:
    # math-verify's own SIGALRM timeouts are off (None): the parent kills this process instead.
    g = parse(f"\\boxed{{{gold}}}", extraction_config=CONFIGS, parsing_timeout=None)
    p_text = pred if ("\\boxed" in pred or "$" in pred) else f"${pred}$"
    p = parse(p_text, extraction_config=CONFIGS, parsing_timeout=None)
    if not p:  # plain text such as "12 apples": let the extractors look at the raw text
        p = parse(pred, extraction_config=CONFIGS, parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        pred, gold = json.loads(line)
        try:
            ok = equal(pred, gold)
        except Exception:  # noqa: BLE001 - an unparsable answer is simply not equal
            ok = False
        print(json.dumps(ok), flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the parent (e.g. a Jupyter kernel) is shutting down
        pass
