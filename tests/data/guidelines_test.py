"""The guideline cleaning rules on crafted texts (each rule: one case it removes or rewrites, one
it keeps as it is), the filters and deduplication, and a whole folder through clean_documents."""

import json
import os

import pytest

from jaxlab.data import guidelines as g

ENGLISH = (
    "Patients with community acquired pneumonia should be treated with antibiotics as soon as "
    "the diagnosis is made, and the choice of the drug depends on the severity of the illness."
)

# rule name -> (function, text it changes, the changed text, count, text it keeps as it is)
RULES = {
    "cut_front_matter": (
        lambda t: g.cut_front_matter(t, ("key recommendations",)),
        "Menu\nLogin\n## Key recommendations\nTreat early.",
        "## Key recommendations\nTreat early.",
        2,
        "Menu\nTreat early.",  # no starter: nothing is cut
    ),
    "cut_back_matter": (
        g.cut_back_matter,
        "Treat early.\n## References\n1. Smith J. A trial.\n2. Doe J. Another.",
        "Treat early.",
        3,
        "Treat early.\nThe references below are graded by quality of evidence and by year.",
    ),
    "remove_boilerplate_lines": (
        g.remove_boilerplate_lines,
        "Skip to main content\nTreat early.\n© 2023 NICE. All rights reserved.",
        "Treat early.",
        2,
        "Treat early with a copyright-free leaflet.",  # the phrase is not at the line start
    ),
    "mark_formulas": (
        g.mark_formulas,
        "Dose is $d = 5 w$ mg and $$\\frac{a}{b}$$ here.",
        "Dose is [formula]d = 5 w[/formula] mg and [formula]\\frac{a}{b}[/formula] here.",
        2,
        "It costs $5 and $10 per dose.",
    ),
    "mark_tables": (
        g.mark_tables,
        "Text.\nTable 2: Doses by weight\n| kg | mg |\n|---|---|\n| 10 | 5 |\nMore text.",
        "Text.\n[table]Table 2: Doses by weight[/table]\nMore text.",
        1,
        "A line with a | pipe.\nAnother line.",
    ),
    "mark_figures": (
        g.mark_figures,
        "Figure 1: The algorithm.\nAs shown in Figure 1, treat.\n![Flow chart](f.png)",
        "[fig]Figure 1: The algorithm.[/fig]\nAs shown in [fig_ref]Figure 1[/fig_ref], "
        "treat.\n[fig]Flow chart[/fig]",
        3,
        "A figure of speech, not a figure reference.",
    ),
    "mark_citations": (
        g.mark_citations,
        "Treat early [1] or late [2, 3-5].",
        "Treat early [bib_ref]1[/bib_ref] or late [bib_ref]2, 3-5[/bib_ref].",
        2,
        "Treat early (grade A).",
    ),
    "strip_references": (
        g.strip_references,
        "Treat early [1] per [NICE](https://nice.org) <b>now</b> [see note].",
        "Treat early per NICE now.",
        5,
        "Treat early [fig_ref]Figure 1[/fig_ref] and [formula]x[i][/formula].",
    ),
    "strip_urls": (
        g.strip_urls,
        "See https://www.cdc.gov/flu/index.html. Or www.who.int today.",
        "See. Or today.",
        2,
        "See the CDC website.",
    ),
    "normalize_bullets": (
        g.normalize_bullets,
        "* one\n  + two\n• three\no four",
        "- one\n  - two\n- three\n- four",
        4,
        "- one\nordinary line",
    ),
    "remove_glyphs": (
        g.remove_glyphs,
        "■ **Bold** text \ufffd",
        " Bold text ",
        4,
        "Plain text.",
    ),
    "rescale_headers": (
        g.rescale_headers,
        "### Top\n#### Sub\n###### Deep",
        "# Top\n## Sub\n### Deep",
        3,
        "# Top\n## Sub",
    ),
    "drop_letterless_lines": (
        g.drop_letterless_lines,
        "Text.\n12\n---\n\nMore.",
        "Text.\n\nMore.",
        2,
        "Text 12.\n\nMore.",
    ),
    "collapse_blank_lines": (
        g.collapse_blank_lines,
        "Intro.\n\n\nBody.\n# Head\nEnd.",
        "Intro.\nBody.\n\n# Head\nEnd.",
        2,
        "Intro.\nBody.",
    ),
}


def test_every_text_rule_is_tested():
    assert set(RULES) == set(g.TEXT_RULES)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_removes_its_case(name):
    rule, text, expected, count, _ = RULES[name]
    assert rule(text) == (expected, count)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_keeps_other_text(name):
    rule, _, _, _, kept = RULES[name]
    assert rule(kept) == (kept, 0)


def test_formula_spans_are_left_alone_by_later_rules():
    text = "Risk [formula]p_[i] = **x** www.a.b[/formula] [3] https://x.org **end**"
    out = g.clean_text(text, citations="strip")
    assert out == "Risk [formula]p_[i] = **x** www.a.b[/formula] end"
    # A formula over several lines becomes one line, which the line rules keep whole.
    text = "Mean:\n$$\n1 + 2\n\n= 3\n$$\nDone."
    assert g.clean_text(text) == "Mean:\n[formula]1 + 2 = 3[/formula]\nDone."


def test_special_tokens_are_meditrons_twelve():
    assert len(g.SPECIAL_TOKENS) == len(set(g.SPECIAL_TOKENS)) == 12
    assert {t.strip("[]/") for t in g.SPECIAL_TOKENS} == {
        "bib_ref",
        "fig_ref",
        "bib",
        "fig",
        "table",
        "formula",
    }


def test_length_filter():
    assert not g.keep_by_length("ten chars!")  # MEDITRON drops <= 10 characters
    assert g.keep_by_length("eleven char")


@pytest.mark.parametrize(
    "text, language",
    [
        (ENGLISH, "en"),
        (
            "Les patients atteints de pneumonie doivent être traités par des antibiotiques dès "
            "que le diagnostic est posé, et le choix du médicament dépend de la gravité.",
            "fr",
        ),
        (
            "Los pacientes con neumonía deben ser tratados con antibióticos en cuanto se hace el "
            "diagnóstico, y la elección del fármaco depende de la gravedad de la enfermedad.",
            "es",
        ),
        (
            "Patienten mit einer Lungenentzündung sollten mit Antibiotika behandelt werden, "
            "sobald die Diagnose gestellt ist, und die Wahl des Medikaments hängt von der "
            "Schwere der Erkrankung ab.",
            "de",
        ),
        ("12 34 56 -- ++", "unknown"),
        ("Amoxicillin clavulanate azithromycin doxycycline ceftriaxone", "unknown"),
    ],
)
def test_language_detection(text, language):
    assert g.detect_language(text) == language
    assert g.keep_by_language(text) == (language == "en")


def test_dedup_key_collapses_near_duplicates_only():
    base = ENGLISH * 5  # > 500 characters
    near = base.upper().replace(",", " ;").replace(" ", "  ")
    late_change = base[:700] + " An extra sentence at the end."
    early_change = "Adults: " + base
    assert len(g.dedup_key(base[:700], 10**4)) > 500
    assert g.dedup_key(near) == g.dedup_key(base)
    assert g.dedup_key(late_change) == g.dedup_key(base)  # differs only after 500 characters
    assert g.dedup_key(early_change) != g.dedup_key(base)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _folder(tmp_path):
    """A folder of crafted guidelines: two sources (``nice`` as markdown files, ``who`` as
    JSONL), with exact and near duplicates, a too-short text, a French text and an image."""
    root = tmp_path / "docs"
    body = (
        "# Pneumonia in adults\n\nSkip to main content\n\n## Recommendations\n\n"
        f"* {ENGLISH} [1]\n* Review the treatment after 48 hours, see https://nice.org.uk.\n"
        "\n## References\n\n1. Smith J. Pneumonia. Lancet. 2020.\n"
    )
    _write(root / "nice" / "a.md", body)
    _write(root / "nice" / "b_exact_copy.md", body)
    _write(root / "nice" / "c_near_copy.md", body.upper().replace("\n\n", "\n"))
    _write(root / "nice" / "d_short.txt", "# Hi\n\nOk.")
    _write(root / "figure.png", "not a document")
    who = [
        {"text": body, "title": "Same text, other source", "url": "https://who.int/a"},
        {"text": ENGLISH.replace("pneumonia", "influenza") + "\n\n| a | b |\n| 1 | 2 |"},
        {
            "text": "Les patients atteints de pneumonie doivent être traités par des "
            "antibiotiques dès que le diagnostic est posé, et le choix dépend de la gravité."
        },
    ]
    _write(root / "who" / "docs.jsonl", "".join(json.dumps(r) + "\n" for r in who))
    return root


def test_clean_documents_on_a_folder(tmp_path):
    out = tmp_path / "out" / "guidelines.jsonl"
    report = g.clean_documents(str(_folder(tmp_path)), str(out))
    assert report.read == 7
    assert report.skipped_files == ["figure.png"]
    assert report.dropped == {"keep_by_length": 1, "keep_by_language": 1, "dedup": 2}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == report.documents
    assert [(r["source"], r["title"]) for r in records] == [
        ("nice", "Pneumonia in adults"),
        ("who", "Same text, other source"),  # dedup is per source: kept
        ("who", ""),
    ]
    assert records[1]["url"] == "https://who.int/a" and "url" not in records[0]
    assert records[0]["text"] == (
        f"# Pneumonia in adults\n\n## Recommendations\n- {ENGLISH}\n"
        "- Review the treatment after 48 hours, see."
    )
    assert records[2]["text"] == ENGLISH.replace("pneumonia", "influenza")
    assert len({r["id"] for r in records}) == 3
    counts = report.rule_counts
    assert list(counts) == list(g.TEXT_RULES)
    # Four copies of the body (NICE's three, WHO's one) each lose a boilerplate line, a
    # reference section (4 lines; 3 in the near copy, without blank lines), a citation, a URL,
    # and have two bullets rewritten.
    assert counts["remove_boilerplate_lines"] == 4
    assert counts["cut_back_matter"] == 3 * 4 + 3
    assert counts["strip_references"] == 4
    assert counts["strip_urls"] == 4
    assert counts["mark_tables"] == 1
    assert counts["normalize_bullets"] == 8
    assert counts["cut_front_matter"] == counts["mark_citations"] == 0
    assert report.summary()["written"] == 3


def test_clean_documents_global_dedup_and_marked_citations(tmp_path):
    report = g.clean_documents(str(_folder(tmp_path)), dedup="global", citations="mark")
    assert report.dropped["dedup"] == 3  # the WHO copy of the NICE text goes too
    assert report.jsonl_path is None
    assert "[bib_ref]1[/bib_ref]" in report.documents[0]["text"]
    assert report.rule_counts["mark_citations"] == 4


def test_clean_documents_errors(tmp_path):
    with pytest.raises(ValueError, match="dedup must be one of"):
        g.clean_documents(str(tmp_path), dedup="fuzzy")
    with pytest.raises(ValueError, match="folder must be a directory"):
        g.clean_documents(str(tmp_path / "missing"))
    _write(tmp_path / "bad" / "x.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: expected an object with a string field"):
        g.clean_documents(str(tmp_path / "bad"))


def test_tfds_output(tmp_path):
    array_record = pytest.importorskip("array_record")
    del array_record
    from jaxlab.data.tfds_text import tfds_text_source

    out = tmp_path / "guidelines.jsonl"
    report = g.clean_documents(
        str(_folder(tmp_path)),
        str(out),
        tfds_data_dir=str(tmp_path / "tfds"),
        validation_fraction=0.0,
    )
    train = tfds_text_source(report.tfds_dir, "train")
    assert sorted(train) == sorted(r["text"] for r in report.documents)


def test_dedup_keys_texts_of_any_script_and_refuses_output_inside_the_folder(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("Η θεραπεία της υπέρτασης ξεκινά με αλλαγές στον τρόπο ζωής.\n")
    (folder / "b.txt").write_text("Лечение гипертонии начинается с изменения образа жизни.\n")
    report = g.clean_documents(str(folder), language=None)
    assert len(report.documents) == 2 and report.dropped.get("dedup", 0) == 0
    assert g.dedup_key("Ἀ-Β!") != "" and g.dedup_key("Ab, c") == "abc"
    with pytest.raises(ValueError, match="output must lie outside folder"):
        g.clean_documents(str(folder), output=str(folder / "clean.jsonl"))
