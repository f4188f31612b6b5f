"""MEDITRON-7B finetuned on MedMCQA (paper §4.2): answer-only, in MEDITRON's ChatML.

Usage (MEDITRON_DIR: a Hugging Face MEDITRON-7B directory with its tokenizer, e.g. the export of
configs/meditron_7b.py; TRAIN_FILE: MedMCQA's train.json, JSON lines, cop 1-based as released):
  python -m experiments.train_lm --config=configs/meditron_7b_medmcqa.py:MEDITRON_DIR,TRAIN_FILE \
      --workdir=runs/meditron_7b_medmcqa --coordinator_address=auto

7490 updates of 64 sequences of 2,048 tokens (3 epochs of the paper's document count), the
schedule, optimizer and data format of configs/meditron_finetune.py (which marks what is
unverified); the finetuned model is written as a Hugging Face checkpoint to WORKDIR/hf.
"""

from configs import meditron_finetune


def get_config(arg: str = ""):
    return meditron_finetune.meditron_7b("medmcqa", arg, "configs/meditron_7b_medmcqa.py")
