"""MEDITRON end to end at toy scale (issue 22 item 6), offline: experiments/meditron.py.

  python -m experiments.meditron --workdir=runs/meditron [--config.experiment.cpt_steps=300]

The engine config is the pretraining stage's: lm_tiny's byte-level Llama (max_seq_len 1,024: the
MEDITRON prompts are 350-800 bytes) on the embedded standard-library corpus, the "general" text.
The ``experiment`` block (read only by experiments/meditron.py) sets the seeded synthetic medical
world and the later stages:

* corpus: ``num_diseases`` invented diseases, each with an invented first-line drug, a symptom
  and an organ; ``docs_per_disease`` guideline, abstract and paper-like documents per disease
  state its facts in varied sentences (papers carry MEDITRON's ``[bib_ref]`` spans).
* question bank, derived from the same facts, in each benchmark's released format: MedQA (5
  options), MedMCQA (4), PubMedQA (yes/no about a named drug, contexts that do not give the
  answer away). Diseases are split: finetuning questions ask about ``train_fraction`` of them,
  test questions about the others, so only facts learnt from the corpus can answer the test.
* continued pretraining: the pretrained run, GAP-Replay-style sources guidelines / abstracts /
  papers / replay (the embedded corpus) at ``cpt_weights`` (token shares; Table 1's 0.23 /
  11.7 / 87.2 / 0.9 % follow corpus sizes, ours are equal-sized by construction, so replay is
  raised to 10% to keep it visible at this scale), the 12 special tokens, a cosine over two
  horizons stopped after one (as MEDITRON).
* answer-only finetuning (configs/meditron_finetune.py's block) per benchmark, from the
  continued-pretrained model ("meditron") and from the pretrained one ("baseline": no continued
  pretraining), then evaluation of every finetuned model in ``modes`` x ``parsers`` (chat
  prompts), and of both raw models zero-shot by likelihood (Table 4's few-shot is out of reach:
  one 3-shot MedQA prompt is ~2,500 bytes).

Claims and verdict rules (fixed before any run; experiments/meditron.py CLAIMS):
1. Continued pretraining lowers the held-out perplexity of every medical source.
   Holds if after < before for guidelines, abstracts and papers; fails otherwise.
2. Replay keeps general text: general (embedded held-out) perplexity after continued
   pretraining is at most 1.10 x before. Holds / fails.
3. Finetuned MEDITRON beats chance (the most frequent test label's share) on each benchmark in
   top-token (clean parser): holds if accuracy > chance + 2 sqrt(chance (1 - chance) / n),
   fails if accuracy < chance - that margin, else inconclusive.
4. Continued pretraining helps after finetuning (paper Table 5, 7B: 57.5 vs 53.2 average):
   MEDITRON minus baseline top-token accuracy, averaged over benchmarks, holds if > 2 standard
   errors (sqrt(sum of p (1 - p) / n) over both models, averaged), fails if < -2, else
   inconclusive.

Cost, measured (2026-12-02, this 2-core CPU machine shared with helper jobs and a test run, load
average 4-12): the run ``python -m experiments.meditron --workdir=runs/meditron
"--config.experiment.benchmarks=('medqa', 'pubmedqa')"`` (two benchmarks, four finetuning runs,
to fit one session) took about 2 h 10 min of wall time: pretraining 600 steps about 33 min (1.9 s
per step quiet, 3-4.5 s loaded), continued pretraining 400 steps 20 min, the raw models' likelihood
evaluations 3 min, each finetuning run of 100 steps 9-14 min (5-10 s per step of 4 x 1,024 tokens)
and each finetuned model's evaluation (60 questions, 7 mode/parser runs sharing generation across
parsers, SC-CoT over 3 seeds) about 4-6 min. The default three benchmarks add two finetuning runs
and evaluations (about 35 min more here). Results: runs/meditron/REPORT.md.
"""

import ml_collections

from configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    config = lm_tiny.get_config()
    config.num_steps = 600
    config.batch_size = 16
    config.seq_len = 256
    config.eval_every = 200
    config.checkpoint_every = 200
    config.eval_batches = 4
    config.model.max_seq_len = 1024
    config.mesh.update(data=1, num_devices=1)
    config.experiment = ml_collections.ConfigDict(
        dict(
            seed=0,
            # The synthetic medical world.
            num_diseases=80,
            docs_per_disease=3,
            questions_per_disease=2,
            train_fraction=0.5,
            # Continued pretraining (GAP-Replay style).
            cpt_steps=400,
            cpt_learning_rate=1e-3,
            cpt_weights=(0.2, 0.3, 0.4, 0.1),  # guidelines, abstracts, papers, replay
            # Answer-only finetuning, per benchmark and starting model.
            benchmarks=("medqa", "medmcqa", "pubmedqa"),
            finetune_steps=100,  # about 5 epochs of the 80 finetuning questions
            finetune_learning_rate=1e-3,
            finetune_batch_size=4,
            finetune_seq_len=1024,
            # Finetuning questions held out for the finetuning runs' own evaluation.
            finetune_validation_fraction=0.1,
            # Evaluation of the finetuned models.
            modes=("top_token", "likelihood", "cot", "sc_cot"),
            parsers=("parity", "clean"),
            max_test_questions=60,
            sc_samples=5,
            temperature=0.8,
            cot_max_new_tokens=32,
            eval_batch_size=16,
            seeds=(1234, 432, 32),
        )
    )
    return config
