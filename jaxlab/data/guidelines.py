"""Cleaning a folder of clinical-guideline documents into a pretraining corpus, after the
guidelines pipeline of MEDITRON (Chen et al. 2023; epfLLM/meditron ``gap-replay/guidelines``).

Every rule is a named function. Text rules take a document's text and return ``(text, count)``,
``count`` being the items the rule removed or rewrote (lines, links, glyphs, ...); document
filters return whether a document stays. :func:`clean_documents` runs them in this order on a
folder of ``.txt``/``.md`` files (one document each) and ``.jsonl`` files (one document per line)
and reports per-rule counts:

1. :func:`cut_front_matter`: drop the lines before the first "starter" line (a source's own
   start marker such as "Key recommendations"; none by default, so nothing is cut).
2. :func:`cut_back_matter`: drop everything from the first "stopper" heading on: references,
   bibliography, acknowledgements, disclaimers, conflicts of interest, funding, ...
3. :func:`remove_boilerplate_lines`: drop lines that start with a boilerplate phrase (cookie
   and sharing banners, copyright lines, "skip to main content", ...).
4. :func:`mark_formulas`, :func:`mark_tables`, :func:`mark_figures`: MEDITRON's special tokens
   (:data:`SPECIAL_TOKENS`, lowercase as in its code): ``$..$``, ``$$..$$``, ``\\(..\\)`` and
   ``\\[..\\]`` become ``[formula]..[/formula]``; a pipe table loses its body and keeps its
   "Table N" caption as ``[table]..[/table]`` (a table without a caption goes entirely); a
   figure caption line ("Figure N: ...", "Fig. N. ...") and a markdown image become
   ``[fig]..[/fig]``, and in-text mentions of a figure or table become ``[fig_ref]..[/fig_ref]``.
5. Citations: :func:`strip_references` (the guidelines pipeline: numeric ``[1]``, ``[2, 3-5]``
   citations, any other ``[...]`` and ``<...>`` markup go; a markdown link keeps its anchor text,
   where MEDITRON drops the link entirely) or, with ``citations="mark"``, :func:`mark_citations`
   (numeric citations become ``[bib_ref]N[/bib_ref]``, as in its PubMed papers).
6. :func:`strip_urls`, :func:`normalize_bullets` (``*``, ``+``, ``•``, ``◦``, ``o`` items
   become ``- ``), :func:`remove_glyphs` (◆ • ▪ ■ □ ``**`` and U+FFFD),
   :func:`rescale_headers` (the shallowest ``#`` level becomes ``#``, deeper ones are capped at
   ``###``), :func:`drop_letterless_lines`, :func:`collapse_blank_lines` (no blank lines, except
   one before each header).

Rules after step 4 never change the inside of a ``[formula]..[/formula]`` span.

Then the document filters: :func:`keep_by_length` (MEDITRON drops texts of 10 characters or
fewer), :func:`keep_by_language` (English only: a stop-word heuristic, :func:`detect_language`,
instead of MEDITRON's ``langdetect``, which is not installed here) and deduplication
(:func:`dedup_key`: the first 500 characters of the text lowercased, with everything but
``[a-z0-9]`` removed, so copies that differ in case, punctuation, whitespace or after the first 500
characters collapse to the first one seen; per source by default, as MEDITRON's "title
matching").

The output is JSONL (fields ``id``, ``source``, ``title``, ``text`` and ``url`` when the input
had one), readable by the ``jsonl:`` source of :mod:`jaxlab.data.pipeline`, and optionally a TFDS
array_record dataset (:func:`jaxlab.data.tfds_text.build_text_dataset`; needs the installed
``tensorflow-datasets`` and ``array_record``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from jaxlab.data import sources

# MEDITRON's 12 pretraining tokens (gap-replay/tokenize.sh; its code writes them lowercase).
SPECIAL_TOKENS = (
    "[bib_ref]",
    "[/bib_ref]",
    "[fig_ref]",
    "[/fig_ref]",
    "[bib]",
    "[/bib]",
    "[fig]",
    "[/fig]",
    "[table]",
    "[/table]",
    "[formula]",
    "[/formula]",
)

DEFAULT_STOPPERS = (
    "references",
    "reference list",
    "bibliography",
    "selected references",
    "acknowledgements",
    "acknowledgments",
    "disclaimer",
    "conflicts of interest",
    "conflict of interest",
    "competing interests",
    "funding",
    "author contributions",
)
DEFAULT_REMOVERS = (
    "skip to main content",
    "share this page",
    "print this page",
    "cookie",
    "we use cookies",
    "subscribe",
    "sign up for",
    "all rights reserved",
    "copyright",
    "©",
    "last updated",
    "page last reviewed",
    "back to top",
)
TEXT_EXTENSIONS = (".txt", ".md")
DEDUP_PREFIX_CHARS = 500

_TOKEN_NAMES = "bib_ref|fig_ref|bib|fig|table|formula"
_FORMULA_SPAN = re.compile(r"(\[formula\].*?\[/formula\])", re.DOTALL)


def _outside_formulas(text: str, rule: Callable[[str], tuple[str, int]]) -> tuple[str, int]:
    """``rule`` applied to the text between ``[formula]..[/formula]`` spans only."""
    parts = _FORMULA_SPAN.split(text)
    total = 0
    for i in range(0, len(parts), 2):  # odd parts are the formula spans
        parts[i], count = rule(parts[i])
        total += count
    return "".join(parts), total


def _line_key(line: str) -> str:
    """A line as the line filters compare it: lowercased, without header hashes, list markers,
    emphasis and surrounding spaces."""
    return re.sub(r"^[\s#*\-+•>_]+", "", line.lower()).strip(" *_:.")


def _starts_with_any(line: str, phrases: Sequence[str]) -> bool:
    key = _line_key(line)
    return any(key.startswith(p.lower()) for p in phrases)


# ----------------------------------------------------------------------------------------------
# Text rules: text -> (text, count of items removed or rewritten).


def cut_front_matter(text: str, starters: Sequence[str] = ()) -> tuple[str, int]:
    """Drops the lines before the first line that starts with a starter (case, header hashes,
    list markers and emphasis ignored). No starters, or none found: nothing is cut, so a
    document without the marker is kept whole. Count: lines dropped."""
    if not starters:
        return text, 0
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if _starts_with_any(line, starters):
            return "\n".join(lines[i:]), i
    return text, 0


def cut_back_matter(
    text: str, stoppers: Sequence[str] = DEFAULT_STOPPERS, *, max_words: int = 6
) -> tuple[str, int]:
    """Drops everything from the first short line (at most ``max_words`` words: a heading, not
    a sentence that mentions "references") that starts with a stopper. Count: lines dropped."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if len(line.split()) <= max_words and _starts_with_any(line, stoppers):
            return "\n".join(lines[:i]), len(lines) - i
    return text, 0


def remove_boilerplate_lines(
    text: str, removers: Sequence[str] = DEFAULT_REMOVERS
) -> tuple[str, int]:
    """Drops every line that starts with a boilerplate phrase. Count: lines dropped."""
    kept = [line for line in text.split("\n") if not _starts_with_any(line, removers)]
    return "\n".join(kept), text.count("\n") + 1 - len(kept)


_FORMULA = re.compile(
    r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<![\\$\w])\$(?=\S)([^$\n]+?)(?<=\S)\$(?![\w$])",
    re.DOTALL,
)


def mark_formulas(text: str) -> tuple[str, int]:
    """``$$x$$``, ``\\[x\\]``, ``\\(x\\)`` and ``$x$`` (no space inside the dollars, so "$5 and
    $10" stays) become ``[formula]x[/formula]``, on one line (runs of whitespace in ``x``
    become one space, so the line rules that follow cannot split a formula). Count: formulas
    marked."""

    def mark(match: re.Match) -> str:
        body = next(g for g in match.groups() if g is not None)
        return f"[formula]{' '.join(body.split())}[/formula]"

    return _FORMULA.subn(mark, text)


_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_TABLE_CAPTION = re.compile(r"^\s*[*_]*(table\s+\d+[a-z]?\b.*)$", re.IGNORECASE)


def mark_tables(text: str) -> tuple[str, int]:
    """Pipe tables (two or more consecutive ``| ... |`` lines) lose their body, as MEDITRON
    drops table bodies. A "Table N ..." caption on the line before or after (blank lines
    between allowed) stays as ``[table]caption[/table]``; a table without one goes entirely.
    Count: tables removed."""
    lines = text.split("\n")
    out: list[str] = []
    i, tables = 0, 0
    while i < len(lines):
        j = i
        while j < len(lines) and _TABLE_ROW.match(lines[j]):
            j += 1
        if j - i < 2:
            out.append(lines[i])
            i += 1
            continue
        tables += 1
        before = len(out) - 1
        while before >= 0 and not out[before].strip():
            before -= 1
        after = j
        while after < len(lines) and not lines[after].strip():
            after += 1
        if before >= 0 and _TABLE_CAPTION.match(out[before]):
            caption = _TABLE_CAPTION.match(out[before]).group(1).strip(" *_")
            out[before] = f"[table]{caption}[/table]"
            i = j
        elif after < len(lines) and _TABLE_CAPTION.match(lines[after]):
            caption = _TABLE_CAPTION.match(lines[after]).group(1).strip(" *_")
            out.append(f"[table]{caption}[/table]")
            i = after + 1
        else:
            i = j
    return "\n".join(out), tables


_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_FIGURE_CAPTION = re.compile(r"^\s*[*_]*((?:figure|fig\.)\s*\d+[a-z]?\b.*)$", re.IGNORECASE)
_MENTION = re.compile(r"\b(?:Figures?|Figs?\.|Tables?)\s+\d+[a-z]?\b")


def mark_figures(text: str) -> tuple[str, int]:
    """A markdown image becomes ``[fig]alt text[/fig]`` (nothing when it has none); a line
    starting "Figure N" / "Fig. N" (a caption) becomes ``[fig]caption[/fig]``; an in-text
    "Figure N" / "Fig. N" / "Table N" becomes ``[fig_ref]..[/fig_ref]`` (MEDITRON marks table
    mentions as figure references too). Count: images, captions and mentions marked."""
    text, images = _IMAGE.subn(lambda m: f"[fig]{m.group(1)}[/fig]" if m.group(1) else "", text)
    lines, count = [], images
    for line in text.split("\n"):
        caption = _FIGURE_CAPTION.match(line)
        if caption:
            lines.append(f"[fig]{caption.group(1).strip(' *_')}[/fig]")
            count += 1
        elif line.startswith("[table]") or "[fig]" in line:
            lines.append(line)
        else:
            line, mentions = _MENTION.subn(lambda m: f"[fig_ref]{m.group(0)}[/fig_ref]", line)
            lines.append(line)
            count += mentions
    return "\n".join(lines), count


_NUMERIC_CITATION = re.compile(r"[ \t]?\[(\d+(?:\s*[-–,]\s*\d+)*)\]")
_MARKDOWN_LINK = re.compile(r"(?<!!)\[([^\[\]\n]*)\]\([^)\n]*\)")
_BRACKETED = re.compile(rf"[ \t]?\[(?!/?(?:{_TOKEN_NAMES})\])[^\[\]\n]*\]")
_ANGLED = re.compile(r"<[^<>\n]*>")


def strip_references(text: str) -> tuple[str, int]:
    """Removes in-text references and markup, as MEDITRON's guidelines cleaning: markdown links
    keep their anchor text; numeric citations (``[1]``, ``[2, 3-5]``), any other ``[...]``
    (special tokens excepted) and ``<...>`` (HTML tags) go. Count: items removed."""

    def rule(part: str) -> tuple[str, int]:
        part, links = _MARKDOWN_LINK.subn(r"\1", part)
        part, numeric = _NUMERIC_CITATION.subn("", part)
        part, bracketed = _BRACKETED.subn("", part)
        part, angled = _ANGLED.subn("", part)
        return part, links + numeric + bracketed + angled

    return _outside_formulas(text, rule)


def mark_citations(text: str) -> tuple[str, int]:
    """Numeric citations (``[1]``, ``[2, 3-5]``) become ``[bib_ref]2, 3-5[/bib_ref]`` (MEDITRON's
    papers hold the cited title and first author there; a plain document has only the numbers).
    Count: citations marked."""
    return _outside_formulas(
        text, lambda part: _NUMERIC_CITATION.subn(r" [bib_ref]\1[/bib_ref]", part)
    )


_URL = re.compile(r"[ \t]?\b(?:https?://|www\.)[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'\"]", re.IGNORECASE)


def strip_urls(text: str) -> tuple[str, int]:
    """Removes ``http(s)://`` and ``www.`` addresses. Count: URLs removed."""
    return _outside_formulas(text, lambda part: _URL.subn("", part))


_BULLET = re.compile(r"^(\s*)(?:[*+•◦▪‣]|o(?= [A-Za-z]))\s+", re.MULTILINE)


def normalize_bullets(text: str) -> tuple[str, int]:
    """List items marked ``*``, ``+``, ``•``, ``◦``, ``▪``, ``‣`` or a lone ``o`` (PDF bullets)
    become ``- `` items (indentation kept). Count: items rewritten."""
    return _outside_formulas(text, lambda part: _BULLET.subn(r"\1- ", part))


_GLYPHS = re.compile(r"[◆•▪■□\ufffd]|\*\*")


def remove_glyphs(text: str) -> tuple[str, int]:
    """Deletes decorative glyphs (◆ • ▪ ■ □), bold markers ``**`` and the replacement character
    U+FFFD. Count: glyphs deleted."""
    return _outside_formulas(text, lambda part: _GLYPHS.subn("", part))


_HEADER = re.compile(r"^(#+)(?=\s)", re.MULTILINE)


def rescale_headers(text: str, max_level: int = 3) -> tuple[str, int]:
    """Shifts markdown header levels so that the shallowest becomes ``#`` and caps the deepest
    at ``max_level`` hashes. Count: headers whose level changed."""
    levels = [len(m.group(1)) for m in _HEADER.finditer(text)]
    if not levels:
        return text, 0
    shift = min(levels) - 1

    def rescale(match: re.Match) -> str:
        return "#" * min(len(match.group(1)) - shift, max_level)

    changed = sum(min(level - shift, max_level) != level for level in levels)
    return _HEADER.sub(rescale, text), changed


def drop_letterless_lines(text: str) -> tuple[str, int]:
    """Drops non-blank lines without a letter (page numbers, rules such as ``---``, stray
    symbols); blank lines are left to :func:`collapse_blank_lines`. Count: lines dropped."""
    lines = text.split("\n")
    kept = [line for line in lines if not line.strip() or re.search(r"[^\W\d_]", line)]
    return "\n".join(kept), len(lines) - len(kept)


def collapse_blank_lines(text: str) -> tuple[str, int]:
    """Removes blank lines and trailing spaces, then puts one blank line before each header
    (not before the first line). Count: blank lines removed."""
    lines = [line.rstrip() for line in text.strip().split("\n")]
    kept = [line for line in lines if line.strip()]
    out: list[str] = []
    for line in kept:
        if out and line.startswith("#"):
            out.append("")
        out.append(line)
    return "\n".join(out), len(lines) - len(kept)


# ----------------------------------------------------------------------------------------------
# Document filters.


def keep_by_length(text: str, min_chars: int = 11) -> bool:
    """Whether the cleaned text has at least ``min_chars`` characters (MEDITRON drops texts of
    10 characters or fewer: the default 11)."""
    return len(text.strip()) >= min_chars


# Frequent function words that are rare as words in the other listed languages.
STOP_WORDS = {
    "en": frozenset(
        "the and of to is that for with as are be this by or not it on was which from at an "
        "have has should may can these their been were will other than also such more who when "
        "there into if only but they we you all its".split()
    ),
    "fr": frozenset(
        "le la les et des du un une est dans pour sur au aux avec ce qui pas sont ou par plus "
        "cette être chez".split()
    ),
    "es": frozenset(
        "el la los las y del que en un una es por con para se su al lo como más pero sus "
        "está son".split()
    ),
    "de": frozenset(
        "der die das und ist nicht mit den von zu sich des auf für eine ein dem im werden "
        "wird oder bei sind auch".split()
    ),
}


def detect_language(text: str, *, sample_chars: int = 10_000, min_ratio: float = 0.15) -> str:
    """The language of ``text`` by stop words: the language of :data:`STOP_WORDS` whose words
    make up the largest share of the first ``sample_chars`` characters' words, if that share
    is at least ``min_ratio`` (running English prose: 30-50%); else ``"unknown"`` (no words,
    word lists, code, other languages). A documented stand-in for ``langdetect``, which
    MEDITRON used on the first 10k characters and which is not installed here."""
    words = re.findall(r"[^\W\d_]+", text[:sample_chars].lower())
    if not words:
        return "unknown"
    shares = {lang: sum(w in stop for w in words) / len(words) for lang, stop in STOP_WORDS.items()}
    best = max(shares, key=shares.get)
    return best if shares[best] >= min_ratio else "unknown"


def keep_by_language(text: str, language: str = "en") -> bool:
    """Whether :func:`detect_language` finds ``language`` (MEDITRON keeps English only)."""
    return detect_language(text) == language


def dedup_key(text: str, prefix_chars: int = DEDUP_PREFIX_CHARS) -> str:
    """The deduplication key: the text lowercased with every character that is not a Unicode
    letter or digit removed, cut to ``prefix_chars`` characters. MEDITRON cuts first and removes
    after, so there a copy with extra spaces or punctuation shifts its window and escapes;
    cutting after removing makes such copies collide too. Letters of any script count, so texts
    in Greek or CJK do not all share an empty key."""
    return re.sub(r"[\W_]", "", text.lower())[:prefix_chars]


# ----------------------------------------------------------------------------------------------
# The pipeline.

TEXT_RULES = (
    "cut_front_matter",
    "cut_back_matter",
    "remove_boilerplate_lines",
    "mark_formulas",
    "mark_tables",
    "mark_figures",
    "mark_citations",
    "strip_references",
    "strip_urls",
    "normalize_bullets",
    "remove_glyphs",
    "rescale_headers",
    "drop_letterless_lines",
    "collapse_blank_lines",
)
FILTERS = ("keep_by_length", "keep_by_language", "dedup")
CITATION_MODES = ("strip", "mark")
DEDUP_MODES = ("per_source", "global", "none")


def _check_mode(argument: str, value: str, modes: Sequence[str]) -> None:
    if value not in modes:
        raise ValueError(f"{argument} must be one of {tuple(modes)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RawDocument:
    """A document as read: ``where`` is ``"relative/path"`` or ``"relative/path:line"``."""

    where: str
    source: str
    title: str
    text: str
    url: str = ""


@dataclasses.dataclass
class CleaningReport:
    """What :func:`clean_documents` did.

    Attributes:
      documents: the kept documents as output records (``id``, ``source``, ``title``, ``text``,
        ``url`` when known), in input order.
      read: documents read.
      rule_counts: per text rule, the items it removed or rewrote over all documents.
      dropped: per filter (``keep_by_length``, ``keep_by_language``, ``dedup``), the documents
        it dropped.
      skipped_files: files in the folder that are neither text, markdown nor JSONL.
      jsonl_path: where the JSONL went (None: not written).
      tfds_dir: the TFDS dataset directory (None: not built).
    """

    documents: list[dict[str, str]]
    read: int
    rule_counts: dict[str, int]
    dropped: dict[str, int]
    skipped_files: list[str]
    jsonl_path: str | None = None
    tfds_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        """The counts as one JSON-able dict."""
        return {
            "read": self.read,
            "written": len(self.documents),
            "rule_counts": dict(self.rule_counts),
            "dropped": dict(self.dropped),
            "skipped_files": list(self.skipped_files),
        }


def _title_of(text: str, fallback: str) -> str:
    for line in text.split("\n"):
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return fallback


def read_folder(
    folder: str, *, text_field: str = "text", title_field: str = "title", url_field: str = "url"
) -> tuple[list[RawDocument], list[str]]:
    """The documents under ``folder`` (recursively, in sorted path order) and the files
    skipped (other extensions).

    A ``.txt``/``.md`` file is one document, titled by its first line if that is a markdown
    header, else by its file name. A ``.jsonl`` line is one document: its ``text_field``
    (required), ``title_field``, ``url_field`` and ``source`` (all optional). A document's
    source is the record's ``source``, else the first folder under ``folder`` that holds the
    file, else the file's name without extension. Files must be UTF-8 (errors name the file,
    line and byte offset).
    """
    if not os.path.isdir(folder):
        raise ValueError(f"read_folder: folder must be a directory, got {folder!r}")
    documents, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, folder)
            parts = rel.split(os.sep)
            stem, ext = os.path.splitext(filename)
            source = parts[0] if len(parts) > 1 else stem
            if ext == ".jsonl":
                for where, record in sources.jsonl_lines(path):
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(
                            f"{where}: expected an object with a string field {text_field!r}"
                        )
                    text = sources.check_text(record[text_field], where, text_field)
                    documents.append(
                        RawDocument(
                            where=f"{rel}:{where.rpartition(':')[2]}",
                            source=str(record.get("source") or source),
                            title=str(record.get(title_field) or ""),
                            text=text,
                            url=str(record.get(url_field) or ""),
                        )
                    )
            elif ext in TEXT_EXTENSIONS:
                text = sources.FileDocuments([path], rel)[0]
                documents.append(RawDocument(rel, source, _title_of(text, stem), text))
            else:
                skipped.append(rel)
    return documents, skipped


def clean_text(
    text: str,
    *,
    starters: Sequence[str] = (),
    stoppers: Sequence[str] = DEFAULT_STOPPERS,
    removers: Sequence[str] = DEFAULT_REMOVERS,
    citations: str = "strip",
    counts: dict[str, int] | None = None,
) -> str:
    """``text`` through every text rule in the module's order; ``counts`` (if given) is
    increased by each rule's count."""
    _check_mode("citations", citations, CITATION_MODES)
    rules: dict[str, Callable[[str], tuple[str, int]]] = {
        "cut_front_matter": lambda t: cut_front_matter(t, starters),
        "cut_back_matter": lambda t: cut_back_matter(t, stoppers),
        "remove_boilerplate_lines": lambda t: remove_boilerplate_lines(t, removers),
        "mark_formulas": mark_formulas,
        "mark_tables": mark_tables,
        "mark_figures": mark_figures,
        # Marked citations first: stripping would remove them.
        "mark_citations": mark_citations if citations == "mark" else lambda t: (t, 0),
        "strip_references": strip_references,
        "strip_urls": strip_urls,
        "normalize_bullets": normalize_bullets,
        "remove_glyphs": remove_glyphs,
        "rescale_headers": rescale_headers,
        "drop_letterless_lines": drop_letterless_lines,
        "collapse_blank_lines": collapse_blank_lines,
    }
    text = sources.universal_newlines(text)
    for name, rule in rules.items():
        text, count = rule(text)
        if counts is not None:
            counts[name] = counts.get(name, 0) + count
    return text.strip()


def clean_documents(
    folder: str,
    output: str | None = None,
    *,
    text_field: str = "text",
    starters: Sequence[str] = (),
    stoppers: Sequence[str] = DEFAULT_STOPPERS,
    removers: Sequence[str] = DEFAULT_REMOVERS,
    citations: str = "strip",
    min_chars: int = 11,
    language: str | None = "en",
    dedup: str = "per_source",
    tfds_data_dir: str | None = None,
    tfds_name: str = "guidelines",
    validation_fraction: float = 0.05,
) -> CleaningReport:
    """Cleans every document under ``folder`` (see :func:`read_folder`) with the text rules,
    then filters by length, language and duplicates.

    Args:
      folder: the documents.
      output: JSONL file to write the kept documents to (None: return them only).
      text_field: the text field of JSONL records.
      starters, stoppers, removers: the phrases of :func:`cut_front_matter`,
        :func:`cut_back_matter` and :func:`remove_boilerplate_lines`.
      citations: ``"strip"`` (guidelines) or ``"mark"`` (``[bib_ref]`` tokens, as papers).
      min_chars: :func:`keep_by_length`'s minimum.
      language: the language kept (:func:`keep_by_language`); None keeps every language.
      dedup: ``"per_source"`` (MEDITRON), ``"global"`` or ``"none"``.
      tfds_data_dir: also write ``output`` as a TFDS array_record dataset there (needs
        ``output``), split into train and validation by a hash of each text.
      tfds_name: the TFDS dataset's name.
      validation_fraction: the TFDS validation share (MEDITRON held out 5% of guidelines).

    Returns:
      A :class:`CleaningReport` with the kept documents and the per-rule counts.
    """
    _check_mode("dedup", dedup, DEDUP_MODES)
    _check_mode("citations", citations, CITATION_MODES)
    if tfds_data_dir and not output:
        raise ValueError("clean_documents: tfds_data_dir needs output (the JSONL it is built from)")
    if output:
        inside = os.path.commonpath([os.path.abspath(folder), os.path.abspath(output)])
        if inside == os.path.abspath(folder):
            raise ValueError(
                f"clean_documents: output must lie outside folder (it would be read back as a "
                f"document on the next run), got folder={folder!r}, output={output!r}"
            )
    raw, skipped = read_folder(folder, text_field=text_field)
    counts = dict.fromkeys(TEXT_RULES, 0)
    dropped = dict.fromkeys(FILTERS, 0)
    seen: set[tuple[str, str]] = set()
    kept = []
    for doc in raw:
        text = clean_text(
            doc.text,
            starters=starters,
            stoppers=stoppers,
            removers=removers,
            citations=citations,
            counts=counts,
        )
        if not keep_by_length(text, min_chars):
            dropped["keep_by_length"] += 1
            continue
        if language is not None and not keep_by_language(text, language):
            dropped["keep_by_language"] += 1
            continue
        key = (doc.source if dedup == "per_source" else "", dedup_key(text))
        if dedup != "none" and key[1]:  # a text without letters or digits has no key to share
            if key in seen:
                dropped["dedup"] += 1
                continue
            seen.add(key)
        record = {
            "id": hashlib.sha1(f"{doc.source}:{doc.where}".encode()).hexdigest(),
            "source": doc.source,
            "title": doc.title,
            "text": text,
        }
        if doc.url:
            record["url"] = doc.url
        kept.append(record)
    report = CleaningReport(kept, len(raw), counts, dropped, skipped)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        report.jsonl_path = output
    if tfds_data_dir:
        from jaxlab.data import tfds_text  # imported here: TFDS is slow to import

        report.tfds_dir = tfds_text.build_text_dataset(
            output,
            tfds_data_dir,
            name=tfds_name,
            validation_fraction=validation_fraction,
            overwrite=True,
        )
    return report
