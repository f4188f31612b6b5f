"""The MEDITRON evaluation harness: MedQA (5 and 4 options), MedMCQA, PubMedQA and
MMLU-medical from their released files, prompts in MEDITRON's and lm-evaluation-harness's
formats, top-token / likelihood / chain-of-thought / self-consistency modes, and MEDITRON's
parsing rules exactly (``parity``) or fixed (``clean``).

* :mod:`~jaxlab.eval.medical.data`: :class:`Question` and :func:`load`.
* :mod:`~jaxlab.eval.medical.prompts`: :func:`prompt`, :func:`few_shot`.
* :mod:`~jaxlab.eval.medical.parsing`: :func:`parse_parity`, :func:`parse_clean`, votes.
* :mod:`~jaxlab.eval.medical.runner`: :class:`EvalConfig`, :func:`evaluate`, :func:`evaluate_many`.
* :mod:`~jaxlab.eval.medical.finetuning`: :func:`finetuning_records` (a released train file in
  MEDITRON's finetuning prompt; importing registers the ``qa:...?format=BENCHMARK`` readers).

Users of lm-evaluation-harness run its own tasks on a jaxlab model through
:class:`jaxlab.eval.lm_eval_adapter.JaxlabLM` (the ``lm_eval`` extra); its likelihoods equal
:func:`~jaxlab.eval.medical.runner.label_logprobs`'s.
"""

from jaxlab.eval.medical.data import (
    BENCHMARKS,
    MMLU_FEWSHOT_POOL,
    MMLU_MEDICAL_SUBJECTS,
    Question,
    load,
    read_file,
)
from jaxlab.eval.medical.finetuning import FINETUNE_BENCHMARKS, finetuning_records
from jaxlab.eval.medical.parsing import PARSERS, parse_clean, parse_parity
from jaxlab.eval.medical.prompts import FORMATS, SEEDS, few_shot, prompt
from jaxlab.eval.medical.runner import MODES, EvalConfig, evaluate, evaluate_many, write_json

__all__ = [
    "BENCHMARKS",
    "FINETUNE_BENCHMARKS",
    "FORMATS",
    "MMLU_FEWSHOT_POOL",
    "MMLU_MEDICAL_SUBJECTS",
    "MODES",
    "PARSERS",
    "SEEDS",
    "EvalConfig",
    "Question",
    "evaluate",
    "evaluate_many",
    "few_shot",
    "finetuning_records",
    "load",
    "parse_clean",
    "parse_parity",
    "prompt",
    "read_file",
    "write_json",
]
