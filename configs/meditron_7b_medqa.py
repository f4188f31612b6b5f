"""MEDITRON-7B finetuned on MedQA (paper §4.2): answer-only, in MEDITRON's ChatML.

Usage (MEDITRON_DIR: a Hugging Face MEDITRON-7B directory with its tokenizer, e.g. the export of
configs/meditron_7b.py; TRAIN_FILE: MedQA's US train file, jind11/MedQA
data_clean/questions/US/train.jsonl):
  python -m experiments.train_lm --config=configs/meditron_7b_medqa.py:MEDITRON_DIR,TRAIN_FILE \
      --workdir=runs/meditron_7b_medqa --coordinator_address=auto

480 updates of 64 sequences of 2,048 tokens (3 epochs of the paper's document count), the
schedule, optimizer and data format of configs/meditron_finetune.py (which marks what is
unverified); the finetuned model is written as a Hugging Face checkpoint to WORKDIR/hf.
"""

from configs import meditron_finetune


def get_config(arg: str = ""):
    return meditron_finetune.meditron_7b("medqa", arg, "configs/meditron_7b_medqa.py")
