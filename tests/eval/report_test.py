"""jaxlab.eval.report against hand-written Markdown and JSON."""

import json

import pytest

from jaxlab.eval import plots, report

EXPECTED = """# Toy reproduction

Two lines of setup,
written as they come.

## Results

| model | loss | note |
|---|---:|:---:|
| a | 1.5 | x |
| b | 2 | None |

Verdict rule: holds when ours is within 5% of the paper's number.

| claim | paper | ours | verdict |
|---|---|---|---|
| loss of a | 1.50 | 1.52 | holds |
| b beats a | yes | no | does not hold |

![curve](curve.png) ![weights](weights.png)
"""


def test_report_writes_the_expected_markdown_and_json(tmp_path):
    built = (
        report.Report("Toy reproduction")
        .add("Two lines of setup,", "written as they come.")
        .section("Results")
        .table(("model", "loss", "note"), [("a", 1.5, "x"), ("b", 2, None)], align="lrc")
        .claims(
            [
                report.Claim("loss of a", "1.50", "1.52", "holds"),
                report.Claim("b beats a", "yes", "no", "does not hold"),
            ],
            rule="holds when ours is within 5% of the paper's number.",
        )
        .images(("curve.png", "curve"), ("weights.png", "weights"))
    )
    text = report.write(str(tmp_path / "run"), built, {"a": {"loss": 1.5}, "seeds": [0, 1]})
    assert text == EXPECTED
    assert (tmp_path / "run" / "REPORT.md").read_text() == EXPECTED
    # The claims table's verdict rule goes to results.json too, for the combined report.
    assert (tmp_path / "run" / "results.json").read_text() == (
        '{\n  "a": {\n    "loss": 1.5\n  },\n  "seeds": [\n    0,\n    1\n  ],\n'
        '  "claims_rule": "holds when ours is within 5% of the paper\'s number."\n}'
    )
    assert json.loads((tmp_path / "run" / "results.json").read_text())["seeds"] == [0, 1]


def test_report_without_results_writes_no_json(tmp_path):
    report.write(str(tmp_path), report.Report("Only text").add("body"))
    assert (tmp_path / "REPORT.md").read_text() == "# Only text\n\nbody\n"
    assert not (tmp_path / "results.json").exists()


def test_table_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"align='lr' must have one letter per column \(3\)"):
        report.table(("a", "b", "c"), [], align="lr")
    with pytest.raises(ValueError, match=r"may only hold l, r, c; got \['x'\]"):
        report.table(("a",), [], align="x")
    with pytest.raises(ValueError, match=r"has 1 cells, the header 2"):
        report.table(("a", "b"), [("only",)])


def test_save_figure_writes_a_png(tmp_path):
    fig, axes = plots.figure((4, 2), 1, 2)
    axes[0].plot([0, 1], [1, 0])
    path = report.save_figure(fig, str(tmp_path), "two.png")
    assert path == str(tmp_path / "two.png")
    assert (tmp_path / "two.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdicts_come_from_one_vocabulary():
    assert [report.verdict(h) for h in (True, False, None)] == [
        "holds",
        "does not hold",
        "not measured",
    ]
    assert set(report.VERDICTS) >= {"holds", "does not hold", "inconclusive", "not measured"}
    with pytest.raises(ValueError, match=r"Claim 'c': verdict must be one of .*got 'fails'"):
        report.Claim("c", "p", "o", "fails")
