"""Looking at results: a trajectory viewer (HTML, a Jupyter widget) and the notebooks' plots.

    show(record)                     # one trajectory, rendered in the notebook
    browse(records)                  # page through a run, filter correct / incorrect
    plot_loss_curves({"agent": losses}, "figures/loss.png")

Everything a model or a tool wrote is HTML-escaped (code, observations, answers): a trajectory cannot
inject markup or scripts into the notebook. Plots use matplotlib's ``Figure`` directly (no pyplot state),
are saved as PNG, shown in the notebook as a PNG output (live and in papermill-executed notebooks alike)
and returned. ``browse`` leaves a static rendering of its first trajectory in saved notebooks, and
``progress_bar`` leaves a final count where a widget bar would freeze.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "highlight_code",
    "render_trajectory",
    "show",
    "browse",
    "render_mask",
    "show_mask",
    "live_frontend",
    "progress_bar",
    "plot_loss_curves",
    "plot_accuracy_bars",
    "plot_sweep",
    "plot_teacher_ftp",
    "plot_trajectory_shape",
]

RED = "#c62828"
GREEN = "#2e7d32"
BOX = "border:1px solid #ddd;border-radius:4px;padding:6px 8px;margin:4px 0;"
PRE = "white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;"


def _esc(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def highlight_code(code: str) -> str:
    """Python code as HTML: pygments with inline styles when installed, else an escaped ``<pre>``."""
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer
    except ImportError:
        return f'<pre style="{PRE}">{_esc(code)}</pre>'
    return highlight(
        code, PythonLexer(), HtmlFormatter(noclasses=True, nobackground=True, prestyles=PRE.rstrip(";"))
    )


def _block(label: str, body: str, color: str = "#555") -> str:
    return f'<div style="{BOX}"><div style="color:{color};font-weight:bold;font-size:11px">{label}</div>{body}</div>'


def _text(text: str, color: str | None = None) -> str:
    style = PRE + (f"color:{color};" if color else "")
    return f'<pre style="{style}">{_esc(text)}</pre>'


def _candidates(cands: Sequence[dict]) -> str:
    td = '<td style="text-align:left;vertical-align:top;padding:2px 6px">'  # notebook CSS right-aligns cells
    narrow = td[:-2] + ';width:1%;white-space:nowrap">'
    chosen = ' style="background:#f1f8e9"'
    rows = []
    for i, c in enumerate(cands, 1):
        mark = "&#10003; chosen" if c.get("chosen") else ""
        err = f'<div style="color:{RED}">{_esc(c["error"])}</div>' if c.get("error") else ""
        rows.append(
            f"<tr{chosen if c.get('chosen') else ''}>"
            f"{narrow}{i}</td>{narrow}{_esc(c.get('votes', 0))}</td>{narrow}{mark}</td>"
            f'{td[:-2]};min-width:24em;width:60%">{highlight_code(c.get("code") or "")}</td>'
            f"{td}{_text(c.get('outcome', ''))}{err}</td></tr>"
        )
    th = '<th style="text-align:left;padding:2px 6px">'
    head = f"<tr>{th}#</th>{th}votes</th>{th}</th>{th}code</th>{th}outcome</th></tr>"
    return f'<table style="font-size:12px;border-collapse:collapse;width:100%;table-layout:auto">{head}{"".join(rows)}</table>'


def render_trajectory(record: dict) -> str:
    """A trajectory record as self-contained HTML: question, steps (thought, code, observation, errors,
    SAG candidates with votes), and the final answer against the gold answer with the score."""
    score = record.get("score")
    ok = score is not None and score > 0
    verdict = "correct" if ok else "incorrect"
    head = (
        f'<div style="font-size:12px;color:#777">{_esc(record.get("benchmark", ""))} · {_esc(record.get("id", ""))}'
        f" · {_esc(record.get('method', ''))}</div>"
        f'<div style="font-size:14px;margin:4px 0"><b>Question:</b> {_esc(record.get("question", ""))}</div>'
    )
    if record.get("used_prefix") and record.get("prefix"):
        head += _block("first-thought prefix", _text(record["prefix"]), "#6a1b9a")
    steps = []
    sag = (record.get("sag_n") or 1) > 1
    for i, s in enumerate(record.get("steps", []), 1):
        parts = []
        if s.get("thought"):
            parts.append(_block("thought", _text(s["thought"])))
        if s.get("code"):
            parts.append(_block("code", highlight_code(s["code"])))
        if s.get("parse_error"):
            parts.append(_block("parse error", _text(s["parse_error"], RED), RED))
        if s.get("observation"):
            parts.append(_block("observation", _text(s["observation"])))
        if s.get("error"):
            parts.append(_block("error", _text(s["error"], RED), RED))
        if s.get("candidates") and (
            sag or len(s["candidates"]) > 1
        ):  # where SAG ran: one candidate says nothing
            parts.append(_block(f"SAG candidates ({len(s['candidates'])})", _candidates(s["candidates"])))
        steps.append(f"<details open><summary><b>Step {i}</b></summary>{''.join(parts)}</details>")
    color = GREEN if ok else RED
    flags = []
    if record.get("hit_step_limit"):
        flags.append("hit the step limit")
    if record.get("stopped_on_repeat"):
        flags.append("stopped on a repeated step")
    if record.get("parse_errors"):
        flags.append(f"{record['parse_errors']} parse error(s)")
    foot = (
        f'<div style="{BOX}border-color:{color}">'
        f"<b>Prediction:</b> {_esc(record.get('prediction'))} &nbsp; <b>Gold:</b> {_esc(record.get('gold'))}"
        f' &nbsp; <b style="color:{color}">score {_esc(score)} ({verdict})</b>'
        f"{' &nbsp; <i>' + _esc(', '.join(flags)) + '</i>' if flags else ''}</div>"
    )
    return f'<div style="font-family:sans-serif;max-width:980px">{head}{"".join(steps)}{foot}</div>'


def show(record: dict) -> None:
    """Display one trajectory in Jupyter."""
    from IPython.display import HTML, display

    display(HTML(render_trajectory(record)))


def browse(records: Sequence[dict]) -> Any:
    """An ipywidgets browser over a run's trajectories: previous/next and a correct/incorrect filter.

    A notebook run headless (papermill) shows a static rendering of the first trajectory instead, which
    saved and exported notebooks keep; a live notebook also carries it as the widget's ``text/html``
    alternative.
    """
    import ipywidgets as w

    class Browser(w.VBox):
        def _repr_mimebundle_(self, **kwargs: Any) -> dict:
            first = render_trajectory(records[0]) if records else "<i>no trajectory</i>"
            note = (
                f'<div style="font-size:11px;color:#777">trajectory 1 of {len(records)}; run the notebook in '
                "JupyterLab to page through all of them</div>"
            )
            static = {
                "text/plain": f"trajectory browser: {len(records)} trajectories",
                "text/html": note + first,
            }
            if not live_frontend():
                return static
            return {**(super()._repr_mimebundle_(**kwargs) or {}), "text/html": static["text/html"]}

    which = w.ToggleButtons(options=["all", "correct", "incorrect"], value="all")
    prev, nxt = w.Button(description="◀ prev"), w.Button(description="next ▶")
    label, view = w.Label(), w.HTML()
    state = {"i": 0, "items": list(records)}

    def refresh(*_: Any) -> None:
        items = state["items"]
        if not items:
            label.value, view.value = "0 / 0", "<i>no trajectory matches</i>"
            return
        state["i"] %= len(items)
        label.value = f"{state['i'] + 1} / {len(items)}"
        view.value = render_trajectory(items[state["i"]])

    def refilter(*_: Any) -> None:
        keep = {
            "all": lambda r: True,
            "correct": lambda r: (r.get("score") or 0) > 0,
            "incorrect": lambda r: not (r.get("score") or 0) > 0,
        }[which.value]
        state["items"], state["i"] = [r for r in records if keep(r)], 0
        refresh()

    def move(step: int) -> None:
        state["i"] += step
        refresh()

    prev.on_click(lambda _: move(-1))
    nxt.on_click(lambda _: move(1))
    which.observe(refilter, names="value")
    refresh()
    box = Browser([w.HBox([which, prev, nxt, label]), view])
    box.view, box.label, box.filter, box.prev, box.next = view, label, which, prev, nxt  # handles for tests
    return box


def render_mask(encoded: dict, tokenizer: Any, max_tokens: int = 4000) -> str:
    """The SFT loss mask as HTML: trained tokens highlighted green, masked ones grey (``sft.encode_chat``)."""
    ids, labels = encoded["input_ids"][:max_tokens], encoded["labels"][:max_tokens]
    spans, cur, trained = [], [], None
    for tok, lab in zip(ids, labels, strict=True):
        if cur and (lab != -100) != trained:
            spans.append((trained, cur))
            cur = []
        trained = lab != -100
        cur.append(tok)
    if cur:
        spans.append((trained, cur))
    style = {True: "background:#c8e6c9;color:#1b5e20", False: "color:#888"}
    body = "".join(f'<span style="{style[t]}">{_esc(tokenizer.decode(c))}</span>' for t, c in spans)
    n = sum(lab != -100 for lab in encoded["labels"])
    more = f" (first {max_tokens} shown)" if len(encoded["input_ids"]) > max_tokens else ""
    head = (
        f'<div style="font-size:12px"><b>{n}</b> of {len(encoded["input_ids"])} tokens trained'
        f"{' · truncated' if encoded.get('truncated') else ''}{more} · "
        f'<span style="{style[True]}">trained</span> <span style="{style[False]}">masked</span></div>'
    )
    return f'<div style="font-family:sans-serif">{head}<pre style="{PRE}">{body}</pre></div>'


def show_mask(encoded: dict, tokenizer: Any) -> None:
    """Display the loss mask of one encoded example in Jupyter."""
    from IPython.display import HTML, display

    display(HTML(render_mask(encoded, tokenizer)))


# ---------------------------------------------------------------------------------------------- progress


def live_frontend() -> bool:
    """True inside a kernel of a live Jupyter frontend (JupyterLab, Notebook), where widgets render; False in
    a terminal, a script, or a kernel run headless by papermill/nbclient (no ``JPY_SESSION_NAME``).
    ``AGENTLIB_WIDGETS=1`` or ``=0`` forces the answer (progress bars, ``browse``)."""
    import os
    import sys

    forced = os.environ.get("AGENTLIB_WIDGETS", "")
    if forced in ("0", "1"):
        return forced == "1"
    return "ipykernel" in sys.modules and bool(os.environ.get("JPY_SESSION_NAME"))


def progress_bar(iterable: Any = None, **kw: Any) -> Any:
    """A tqdm bar that reads well wherever it runs: the widget bar in a live notebook; a text bar in a terminal;
    headless (papermill, a log), a text bar first shown after 30 s and refreshed at most every 30 s, which
    always ends with its final line (count and time): what a saved notebook keeps, where a widget bar would
    stay frozen at 0%."""
    import sys

    if live_frontend():
        from tqdm.notebook import tqdm

        return tqdm(iterable, **kw)
    from tqdm.std import tqdm

    class TextBar(tqdm):
        def close(self) -> None:
            if not self.disable and getattr(self, "last_print_t", None) is not None:
                self.delay = 0  # shown or not yet (a loop shorter than the delay): print the final line
            super().close()

    kw.setdefault("file", sys.stdout)  # one stream: the bar's last line sits with the cell's printed text
    if not sys.stdout.isatty():  # a saved notebook or a log keeps every refresh: few of them
        kw.setdefault("mininterval", 30.0)
        kw.setdefault("delay", 30.0)
    return TextBar(iterable, **kw)


# ---------------------------------------------------------------------------------------------- plots


def _figure(**kw: Any) -> Any:
    """A matplotlib ``Figure`` that shows itself in a notebook as a PNG (``_repr_png_``)."""
    import matplotlib.figure

    class Figure(matplotlib.figure.Figure):  # the same name in reprs: "<Figure size 600x350 with 1 Axes>"
        def _repr_png_(self) -> bytes:
            import io

            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100)
            return buf.getvalue()

        def _ipython_display_(self) -> None:
            from IPython import get_ipython
            from IPython.display import display

            ip = get_ipython()
            count = getattr(ip, "execution_count", None)
            if getattr(self, "_shown_in", None) == count and count is not None:
                return  # already shown by the plot call in this cell: not twice when the cell ends with it
            self._shown_in = count
            display({"image/png": self._repr_png_(), "text/plain": repr(self)}, raw=True)

    kw.setdefault("layout", "constrained")  # no tight_layout() call, no tight_layout warnings
    return Figure(**kw)


def _save(fig: Any, path: str | Path) -> Any:
    """Write the PNG, show the figure once in a notebook (inside a kernel), return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    if _in_kernel():
        fig._ipython_display_()
    return fig


def _in_kernel() -> bool:
    import sys

    if "ipykernel" not in sys.modules:
        return False
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


def _empty_axis(ax: Any, values: Any, percent: bool) -> None:
    """Nothing above zero: draw 0..100 for a percent (0..1 for a count), not matplotlib's -0.04..0.04."""
    import numpy as np

    if not (np.nan_to_num(np.asarray(list(values), float)) > 0).any():
        ax.set_ylim(0, 100 if percent else 1)


def plot_loss_curves(
    logs: dict[str, Sequence[float]], path: str | Path, title: str = "SFT training loss"
) -> Any:
    """One line per run: training loss per optimizer step."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, losses in logs.items():
        ax.plot(
            range(1, len(losses) + 1),
            list(losses),
            marker="o" if len(losses) < 30 else None,
            ms=3,
            label=name,
        )
    ax.set(xlabel="optimizer step", ylabel="loss (per trained token)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    if logs:
        ax.legend()
    return _save(fig, path)


def plot_accuracy_bars(df: Any, path: str | Path, title: str = "", xmax: float = 100) -> Any:
    """Small multiples, one panel per benchmark (averages last): a horizontal bar per method with its CI
    whisker (columns: method, benchmark, score, ci_low, ci_high, n), on a 0..``xmax`` % axis. Methods keep
    their order of first appearance, so pass the table sorted the way the reader should compare them."""
    import numpy as np

    benches = list(dict.fromkeys(df["benchmark"]))
    methods = list(dict.fromkeys(df["method"]))
    ncols = min(len(benches), 5)
    nrows = -(-len(benches) // ncols)
    fig = _figure(figsize=(2.6 * ncols + 1.6, 0.28 * len(methods) * nrows + 0.9 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    y = np.arange(len(methods))[::-1]
    colors = [f"C{k % 10}" for k in range(len(methods))]
    for ax, bench in zip(axes, benches, strict=False):
        sub = df[df["benchmark"] == bench].set_index("method").reindex(methods)
        score = sub["score"].to_numpy(float)
        err = np.vstack([score - sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float) - score])
        ax.barh(y, np.nan_to_num(score), xerr=np.nan_to_num(err), color=colors, capsize=2, height=0.7)
        ax.set_title(f"{bench} (n={int(sub['n'].max())})", fontsize=9)
        ax.set_xlim(0, xmax)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(benches) :]:
        ax.set_visible(False)
    axes[0].set_yticks(y, methods)
    for ax in axes:
        ax.tick_params(labelsize=8)
    for ax in axes[-ncols:]:
        ax.set_xlabel("score (%)", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sweep(
    xs: Sequence[float],
    ys: Sequence[float],
    ci: Sequence[tuple[float, float]] | None,
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Any:
    """A metric against a swept parameter (e.g. SAG's N), with a shaded confidence band when ``ci`` is given."""
    fig = _figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(list(xs), list(ys), marker="o")
    if ci is not None:
        ax.fill_between(list(xs), [lo for lo, _ in ci], [hi for _, hi in ci], alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xticks(list(xs))
    _empty_axis(ax, [*ys, *(hi for _, hi in ci or [])], "%" in ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _bars(ax: Any, labels: Sequence[str], values: Sequence[float], title: str) -> None:
    ax.bar(range(len(values)), list(values), color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), list(labels), fontsize=8)
    ax.set_title(title, fontsize=10)
    _empty_axis(ax, values, "%" in title)
    ax.grid(axis="y", alpha=0.3)


def plot_teacher_ftp(summary: Any, path: str | Path) -> Any:
    """Teacher runs side by side (rows of ``pipeline.teacher_summary``): greedy accuracy, yield, search calls."""
    cols = [
        ("accuracy_greedy", "accuracy, greedy (%)"),
        ("yield_pct", "questions with a kept trajectory (%)"),
        ("mean_search_calls", "search calls / trajectory"),
    ]
    cols = [(c, t) for c, t in cols if c in summary]
    labels = list(summary["run"])
    if "domain" in summary:  # one row per run and domain
        labels = [f"{run}\n{domain}" for run, domain in zip(summary["run"], summary["domain"], strict=True)]
    fig = _figure(figsize=(max(3.2, 0.8 * len(labels)) * len(cols), 3.2))
    for ax, (col, title) in zip(fig.subplots(1, len(cols), squeeze=False)[0], cols, strict=True):
        _bars(ax, labels, summary[col].fillna(0).to_numpy(float), title)
    return _save(fig, path)


def plot_trajectory_shape(shape: Any, path: str | Path) -> Any:
    """Mean steps, search calls and code lines per run (rows of ``pipeline.trajectory_shape``)."""
    cols = ["steps", "search_calls", "code_lines"]
    means = shape.groupby("run", sort=False)[cols].mean()
    fig = _figure(figsize=(9, 3.2))
    for ax, col in zip(fig.subplots(1, len(cols)), cols, strict=True):
        _bars(ax, list(means.index), means[col].to_numpy(float), f"mean {col.replace('_', ' ')}")
    return _save(fig, path)
