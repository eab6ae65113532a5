"""agentlib.viz: the trajectory HTML (escaping, errors, candidates), the browser widget, the plots."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest

from agentlib import viz

EVIL = "</pre><script>alert('x')</script><img src=x onerror=alert(1)>"


def record(i: int = 0, score: float = 1.0) -> dict:
    return {
        "id": f"q{i}",
        "benchmark": "hotpotqa",
        "method": "agent+sag",
        "question": f"Question {i} & <b>bold</b>?",
        "gold": "Paris",
        "prediction": "Paris" if score else "Lyon",
        "score": score,
        "parse_errors": 1,
        "hit_step_limit": False,
        "used_prefix": True,
        "prefix": "Thought: first find the capital.",
        "sag_n": 2,
        "messages": [],
        "steps": [
            {
                "thought": "I search.",
                "code": f'print(search("{EVIL}"))',
                "observation": f"Doc 1 {EVIL}",
                "error": None,
                "parse_error": None,
                "duration_s": 0.1,
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "candidates": [
                    {
                        "code": 'print(search("a"))',
                        "outcome": "Doc A",
                        "error": None,
                        "votes": 3,
                        "chosen": True,
                    },
                    {
                        "code": "1/0",
                        "outcome": "",
                        "error": "ZeroDivisionError: division by zero",
                        "votes": 1,
                        "chosen": False,
                    },
                ],
            },
            {
                "thought": "Oops.",
                "code": "x = undefined_name",
                "observation": "",
                "error": "NameError: name 'undefined_name' is not defined",
                "parse_error": None,
                "candidates": [],
            },
            {
                "thought": "Done.",
                "code": 'final_answer("Paris")',
                "observation": "",
                "error": None,
                "parse_error": None,
                "candidates": [],
            },
        ],
    }


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def test_html_escapes_code_and_observations():
    out = viz.render_trajectory(record())
    parser = Tags()
    parser.feed(out)
    assert parser.tags <= {"div", "pre", "span", "b", "i", "details", "summary", "table", "tr", "td", "th"}
    assert parser.attrs <= {"style", "class", "open"}  # no onerror=, no src=
    assert "<b>bold</b>" not in out
    assert "&lt;script&gt;" in out  # shown as text instead
    assert html.escape("Question 0 & <b>bold</b>?") in out
    assert out.count("<div") == out.count("</div>")  # the injected </pre> did not break the structure
    assert out.count("<pre") == out.count("</pre>")


@pytest.mark.parametrize("pygments", [True, False])
def test_html_shows_steps_errors_candidates_and_score(monkeypatch, pygments):
    if not pygments:  # the fallback when pygments is missing
        monkeypatch.setitem(__import__("sys").modules, "pygments", None)
    out = viz.render_trajectory(record())
    text = html.unescape(re.sub(r"<[^>]+>", "", out))
    assert "Step 1" in text and "Step 3" in text and "Step 4" not in text
    assert "first find the capital" in text
    error = re.search(r'<pre style="[^"]*color:#c62828;">(.*?)</pre>', out, re.S)
    assert error and "NameError" in html.unescape(error.group(1))
    assert "ZeroDivisionError" in re.search(
        rf'color:{viz.RED}">([^<]*)', out.split("SAG candidates")[1]
    ).group(1)
    assert "SAG candidates (2)" in text and "chosen" in text
    assert re.search(r"<td[^>]*>1</td><td[^>]*>3</td><td[^>]*>&#10003; chosen</td>", out)
    assert "Prediction: Paris" in text and "Gold: Paris" in text and "score 1.0 (correct)" in text
    assert ("color: #" in out) == pygments  # highlighted only with pygments
    wrong = viz.render_trajectory(record(score=0.0))
    assert "score 0.0 (incorrect)" in html.unescape(re.sub(r"<[^>]+>", "", wrong))


def test_browser_pages_and_filters():
    recs = [record(0, 1.0), record(1, 0.0), record(2, 1.0), record(3, 0.0), record(4, 0.0)]
    box = viz.browse(recs)
    assert box.label.value == "1 / 5" and "Question 0" in box.view.value
    box.next.click()
    box.next.click()
    assert box.label.value == "3 / 5" and "Question 2" in box.view.value
    box.filter.value = "incorrect"
    assert box.label.value == "1 / 3" and "Question 1" in box.view.value
    box.prev.click()  # wraps around
    assert box.label.value == "3 / 3" and "Question 4" in box.view.value
    box.filter.value = "correct"
    assert box.label.value == "1 / 2" and "Question 0" in box.view.value
    assert viz.browse([]).label.value == "0 / 0"


def test_browser_static_view(monkeypatch):
    box = viz.browse([record(0), record(1)])
    monkeypatch.setenv("AGENTLIB_WIDGETS", "0")  # headless: the static first trajectory only
    bundle = box._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"} and "Question 0" in bundle["text/html"]
    assert "trajectory 1 of 2" in bundle["text/html"]
    monkeypatch.setenv("AGENTLIB_WIDGETS", "1")  # live: the widget, with the static view as alternative
    bundle = box._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "Question 0" in bundle["text/html"]


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    return data


def test_plots_write_png(tmp_path):
    import pandas as pd

    fig = viz.plot_loss_curves(
        {"agent": [2.0, 1.5, 1.2, 1.0], "cot": [1.8, 1.6, 1.5]}, tmp_path / "f" / "loss.png"
    )
    _png(tmp_path / "f" / "loss.png")
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [4, 3]

    df = pd.DataFrame(
        {
            "method": ["cot", "cot", "agent", "agent"],
            "benchmark": ["hotpotqa", "math500"] * 2,
            "score": [0.2, 0.3, 0.35, 0.4],
            "ci_low": [0.1, 0.2, 0.25, 0.3],
            "ci_high": [0.3, 0.4, 0.45, 0.5],
            "n": [40, 30, 40, 30],
        }
    )
    fig = viz.plot_accuracy_bars(df, tmp_path / "bars.png")
    _png(tmp_path / "bars.png")
    # one panel per benchmark; in each, one bar per method, top to bottom in the table's order
    assert [ax.get_title() for ax in fig.axes] == ["hotpotqa (n=40)", "math500 (n=30)"]
    widths = [
        [round(b.get_width(), 3) for b in sorted(ax.patches, key=lambda b: -b.get_y())] for ax in fig.axes
    ]
    assert widths == [[0.2, 0.35], [0.3, 0.4]]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "cot",
        "agent",
    ]  # the first method on top

    fig = viz.plot_sweep(
        [1, 2, 4, 8], [0.2, 0.25, 0.3, 0.31], [(0.1, 0.3)] * 4, tmp_path / "sweep.png", "SAG N", "EM"
    )
    _png(tmp_path / "sweep.png")
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [0.2, 0.25, 0.3, 0.31]


def test_mask_view_highlights_trained_tokens_and_escapes():
    class Tok:  # decode = the characters of the ids, enough to check spans and escaping
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    enc = {
        "input_ids": [ord(c) for c in "<s>q?A&B</s>"],
        "labels": [-100] * 5 + [ord(c) for c in "A&B"] + [-100] * 4,
        "truncated": True,
    }
    out = viz.render_mask(enc, Tok())
    green = re.findall(r'<span style="background:#c8e6c9;color:#1b5e20">([^<]*)</span>', out)
    assert green == ["trained", "A&amp;B"]
    assert "&lt;s&gt;q?" in out and "<s>" not in out
    assert "<b>3</b> of 12 tokens trained" in out and "truncated" in out


def test_teacher_and_shape_plots(tmp_path):
    import pandas as pd

    summary = pd.DataFrame(
        {
            "run": ["agent", "agent_ftp"],
            "accuracy_greedy": [30.0, 40.0],
            "yield_pct": [50.0, 60.0],
            "mean_search_calls": [1.5, None],
        }
    )
    fig = viz.plot_teacher_ftp(summary, tmp_path / "ftp.png")
    _png(tmp_path / "ftp.png")
    assert [[p.get_height() for p in ax.patches] for ax in fig.axes] == [[30, 40], [50, 60], [1.5, 0]]
    shape = pd.DataFrame(
        {
            "run": ["agent", "agent", "agent_ftp"],
            "steps": [2, 4, 1],
            "search_calls": [1, 3, 0],
            "code_lines": [3, 5, 2],
            "correct": [1.0, 0.0, 1.0],
        }
    )
    fig = viz.plot_trajectory_shape(shape, tmp_path / "shape.png")
    _png(tmp_path / "shape.png")
    assert [[p.get_height() for p in ax.patches] for ax in fig.axes] == [[3, 1], [2, 0], [4, 2]]


def test_sag_candidates_only_where_sag_ran():
    rec = record()
    assert "SAG candidates (2)" in viz.render_trajectory(rec)
    plain = {
        **rec,
        "sag_n": 1,
        "steps": [{**rec["steps"][0], "candidates": rec["steps"][0]["candidates"][:1]}],
    }
    assert "SAG candidates" not in viz.render_trajectory(plain)  # one "candidate" where no SAG ran: no table
    out = viz.render_trajectory(rec)
    assert "min-width:24em" in out  # the code column is readable, not squeezed


def test_figures_show_themselves_as_png(tmp_path):
    fig = viz.plot_loss_curves({"agent": [2.0, 1.5, 1.2]}, tmp_path / "loss.png")
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    ticks = fig.axes[0].xaxis.get_major_locator().tick_values(1, 3)
    assert all(float(t).is_integer() for t in ticks)  # optimizer steps are whole numbers


def test_all_zero_percent_axes_are_drawn_0_to_100(tmp_path):
    import pandas as pd

    fig = viz.plot_sweep(
        [1, 2], [0.0, 0.0], [(0.0, 0.0), (0.0, 0.0)], tmp_path / "s.png", "N", "accuracy (%)"
    )
    assert fig.axes[0].get_ylim() == (0, 100)
    fig = viz.plot_sweep([1, 2], [10.0, 20.0], None, tmp_path / "s.png", "N", "accuracy (%)")
    assert fig.axes[0].get_ylim()[1] < 30
    summary = pd.DataFrame(
        {"run": ["agent"], "accuracy_greedy": [0.0], "yield_pct": [0.0], "mean_search_calls": [0.0]}
    )
    fig = viz.plot_teacher_ftp(summary, tmp_path / "t.png")
    assert [ax.get_ylim() for ax in fig.axes] == [(0, 100), (0, 100), (0, 1)]


def test_progress_bar_is_text_outside_a_live_frontend(monkeypatch, capsys):
    from tqdm.std import tqdm

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.delenv("AGENTLIB_WIDGETS", raising=False)
    assert not viz.live_frontend()
    with viz.progress_bar(total=3, desc="items") as bar:
        assert isinstance(bar, tqdm) and "notebook" not in type(bar).__module__
        bar.update(3)
    out = capsys.readouterr().out
    assert "items: 100%" in out and "items:   0%" not in out  # headless and quick: only the final line
    monkeypatch.setenv("AGENTLIB_WIDGETS", "1")
    assert viz.live_frontend()


@pytest.mark.slow
def test_papermill_notebook_keeps_figures_browser_and_progress(tmp_path):
    """A notebook executed headless (papermill) keeps each plot as one PNG output, a static view of ``browse``
    and the final line of a progress bar."""

    import nbformat
    import papermill

    cells = [
        "from agentlib import viz",
        'viz.plot_loss_curves({"agent": [2.0, 1.5, 1.2]}, "loss.png")',
        'fig = viz.plot_sweep([1, 2], [0.0, 0.0], None, "sweep.png", "N", "accuracy (%)")\nprint("after")',
        f"viz.browse([{record()!r}])",
        'for _ in viz.progress_bar(range(3), desc="items"):\n    pass',
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {
        "name": "agentlib",
        "display_name": "Python (agentlib)",
        "language": "python",
    }
    nbformat.write(nb, tmp_path / "in.ipynb")
    papermill.execute_notebook(
        str(tmp_path / "in.ipynb"),
        str(tmp_path / "out.ipynb"),
        kernel_name="agentlib",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells

    def pngs(cell):
        return [o for o in cell.outputs if "image/png" in o.get("data", {})]

    assert len(pngs(out[1])) == 1 and len(pngs(out[2])) == 1  # shown once, also when not the cell's last line
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "sweep.png").exists()
    html_out = [o["data"]["text/html"] for o in out[3].outputs if "text/html" in o.get("data", {})]
    assert html_out and "Question 0" in html_out[0] and "Step 1" in html_out[0]
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in out[3].outputs)
    text = "".join(o.get("text", "") for o in out[4].outputs if o.output_type == "stream")
    assert "items: 100%" in text and "3/3" in text and "items:   0%" not in text
