"""MEDITRON's finetuning records: a benchmark's released train file as prompt/answer pairs.

MEDITRON finetuned one model per benchmark (paper §4.2; epfLLM/meditron
``evaluation/finetune_preprocessing.py``) on records whose ``prompt`` is the zero-shot
evaluation prompt (``{instruction}\\n{question block}\\nThe answer is:\\n``, the same text
:func:`jaxlab.eval.medical.prompts.prompt` gives) and whose ``gold`` is the label alone (an
option letter, or yes/no/maybe). Megatron-LLM then wrapped each in ChatML, the question and the
answer each a message, with the loss on the answer message only: the data layer's ``"meditron"``
template (:mod:`jaxlab.data.prompts`), whose inference prompt is the one a finetuned model is
evaluated with (``chat=True``). Training and evaluation prompts are therefore one function.

Importing this module registers, in :data:`jaxlab.data.prompts.RECORD_FORMATS`, one reader per
benchmark that has a train file (``FINETUNE_BENCHMARKS``), so that a data source
``qa:TRAIN_FILE?format=medqa&template=meditron`` trains on a released file as it is.
"""

from __future__ import annotations

from jaxlab.data import prompts as data_prompts
from jaxlab.eval.medical import data, prompts

# MMLU-medical has no train split: MEDITRON evaluates it with the MedMCQA model.
FINETUNE_BENCHMARKS = ("medqa", "medqa4", "medmcqa", "pubmedqa")


def finetuning_records(benchmark: str, path: str, *, cop_base: int = 1) -> list[dict[str, str]]:
    """``{"prompt", "answer"}`` records of the released file ``path`` of ``benchmark``, in file
    order: the zero-shot MEDITRON prompt and the gold label."""
    if benchmark not in FINETUNE_BENCHMARKS:
        raise ValueError(f"benchmark must be one of {FINETUNE_BENCHMARKS}, got {benchmark!r}")
    return [
        {"prompt": prompts.prompt(benchmark, q), "answer": q.answer}
        for q in data.read_file(benchmark, path, cop_base=cop_base)
    ]


def _register() -> None:
    for name in FINETUNE_BENCHMARKS:
        if name not in data_prompts.RECORD_FORMATS:  # importing twice (reload) is harmless

            def reader(path: str, benchmark: str = name) -> list[dict[str, str]]:
                return finetuning_records(benchmark, path)

            data_prompts.RECORD_FORMATS.register(name, reader)


_register()
