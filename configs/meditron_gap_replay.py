"""GAP-Replay, MEDITRON's continued-pretraining mixture (Chen et al. 2023, Table 1), as a block the
meditron configs share: four JSONL sources under one folder, mixed by Table 1's token shares,
with MEDITRON's 12 special tokens and held-out perplexity per source.

Layout of the folder (the ``text`` field of each record is the document; the guidelines come
from :func:`jaxlab.data.guidelines.clean_documents`):

  ROOT/guidelines/*.jsonl  clinical guidelines        107M train tokens   0.23%
  ROOT/abstracts/*.jsonl   PubMed abstracts           5.48B               11.7%
  ROOT/papers/*.jsonl      PubMed full-text papers    40.7B               87.1%
  ROOT/replay/*.jsonl      general-domain replay      420M                 0.90%

Token shares, not record weights. MEDITRON concatenated the four corpora and sampled them by
natural proportion, so each source's share of the *tokens* trained on is its Table 1 token count
over the 46.7B total. Record-level mixers (grain's ``mix``, MaxText's data mixer) weight
*documents*, and a paper is about 8,300 tokens while an abstract is about 350: giving them these
numbers as record weights would put far more of the tokens on papers. jaxlab's pipeline packs
each source into examples of exactly ``seq_len`` tokens before mixing, so its weights are token
shares as they are (:mod:`jaxlab.data.pipeline`): the weights below are Table 1's token counts.

Per-source evaluation: each source's held-out documents (``config.data.validation_fraction``,
3% as MEDITRON's PubMed split; a hash of file and line picks them) give ``eval_loss/<name>`` and
``eval_perplexity/<name>`` at every evaluation (``config.eval_per_source``).
"""

from jaxlab.data.guidelines import SPECIAL_TOKENS

# Table 1, training split: source -> (documents, tokens).
TABLE_1 = {
    "guidelines": (41_000, 107e6),
    "abstracts": (15_700_000, 5.48e9),
    "papers": (4_900_000, 40.7e9),
    "replay": (494_000, 420e6),
}
TRAIN_TOKENS = sum(tokens for _, tokens in TABLE_1.values())  # 46.7B
TOKEN_SHARES = {name: tokens / TRAIN_TOKENS for name, (_, tokens) in TABLE_1.items()}
# MEDITRON held out 5% of guidelines and 3% of PubMed (replay: none); one fraction for all here.
VALIDATION_FRACTION = 0.03


def sources(root: str) -> tuple[str, ...]:
    """The four named JSONL sources under ``root`` (Table 1's order)."""
    root = root.rstrip("/")
    return tuple(f"{name}=jsonl:{root}/{name}/*.jsonl" for name in TABLE_1)


def apply(config, root: str):
    """Sets ``config.data`` to GAP-Replay under ``root`` (token-share weights, special tokens)
    and turns on per-source evaluation. Returns ``config``."""
    config.data.update(
        sources=sources(root),
        weights=tuple(tokens for _, tokens in TABLE_1.values()),
        text_field="text",
        validation_fraction=VALIDATION_FRACTION,
        special_tokens=SPECIAL_TOKENS,
    )
    config.eval_per_source = True
    return config


def one_epoch_steps(batch_size: int, seq_len: int) -> int:
    """Optimizer steps that read Table 1's training tokens once (rounded up)."""
    return -(-int(TRAIN_TOKENS) // (batch_size * seq_len))
