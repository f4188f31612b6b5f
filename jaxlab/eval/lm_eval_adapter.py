"""lm-evaluation-harness's model interface over a jaxlab language model (the ``lm_eval`` extra).

:class:`JaxlabLM` is an ``lm_eval.api.model.LM`` wrapping any model of :mod:`jaxlab.models`
(Llama, Mamba, hybrid, CoTFormer: all ``model(tokens) -> logits`` with a ``config.max_seq_len``)
and a :class:`jaxlab.data.tokenizers.Tokenizer`, so lm-eval's tasks run on it unchanged.
Only users who installed ``lm-eval`` import this module; importing it registers the model name
``"jaxlab"`` in lm-eval's registry (nothing else in jaxlab imports it)::

    import lm_eval
    from jaxlab.data.tokenizers import load_tokenizer
    from jaxlab.eval.lm_eval_adapter import JaxlabLM
    from jaxlab.interop.hf import load_hf_llama

    lm = JaxlabLM(load_hf_llama("llama-2-7b"), load_tokenizer("llama-2-7b"), batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["pubmedqa"], num_fewshot=3)
    print(results["results"]["pubmedqa"]["acc,none"])

    # the same from a model source, through lm-eval's registry:
    lm_eval.simple_evaluate(
        model="jaxlab", model_args="model=hf:llama-2-7b,batch_size=16", tasks=["pubmedqa"]
    )

``model`` may be a source string, ``hf:PATH`` (a Hugging Face Llama directory) or
``run:WORKDIR[@STEP]`` (a jaxlab run's checkpoint), read by
:func:`jaxlab.train.pretrained.load_model`; ``tokenizer`` may be a spec for
:func:`jaxlab.data.tokenizers.load_tokenizer`, by default the source's own (the HF directory,
the run's ``data.tokenizer``).

The three request types:

* ``loglikelihood``: ``(context, continuation) -> (logprob, is_greedy)``: the summed
  log-probability of the continuation's tokens after the context's, and whether every one of
  them is the model's argmax after its prefix. Tokenization is that of jaxlab's native scorer
  (:func:`jaxlab.eval.medical.runner.label_logprobs`): context and continuation are encoded
  separately and concatenated, the context with the tokenizer's bos in front (``add_bos``;
  default when the tokenizer has one). lm-eval's Hugging Face model instead moves trailing
  whitespace of the context into the continuation (and scores it), encodes ``context +
  continuation`` whole and splits the ids where the context's ids end: the two agree for a byte
  tokenizer and a context that does not end in whitespace (lm-eval's tasks put the space
  before an answer into the continuation), and can differ for a subword tokenizer. An empty
  context is the prefix token alone (the tokenizer's bos, else its eos, as lm-eval's
  ``prefix_token_id``). A pair longer than ``config.max_seq_len`` keeps its last
  ``max_seq_len`` tokens (the context is cut from the left, the continuation kept whole), as
  lm-eval's Hugging Face model does; that model keeps ``max_length + 1`` tokens because it never
  feeds the last one, this adapter keeps one fewer because
  :func:`jaxlab.infer.token_logprobs_and_greedy` feeds every token it scores.
* ``loglikelihood_rolling``: ``(text,) -> logprob`` of the whole text after the prefix token,
  in lm-eval's disjoint windows (``lm_eval.utils.get_rolling_token_windows`` and
  ``make_disjoint_window``): each forward pass holds at most ``max_seq_len`` tokens and
  predicts at most ``max_seq_len - 1`` of them, every text token is predicted exactly once, and
  the last window is filled up with earlier tokens as context.
* ``generate_until``: ``(context, gen_kwargs) -> text``: greedy generation of at most
  ``max_gen_toks`` tokens (:func:`jaxlab.infer.generate_in_batches`), stopped at the
  tokenizer's eos and at the ``until`` strings, the text cut before the first of them. Contexts
  longer than ``max_seq_len - max_gen_toks`` tokens are cut from the left, as lm-eval's Hugging
  Face model does. Only greedy decoding is offered: ``do_sample=True`` (or a temperature > 0
  without ``do_sample``) and beam search raise a ValueError; ``top_p``/``top_k``/``min_p``,
  which change nothing under greedy decoding, are ignored as Hugging Face's greedy search
  ignores them.

Requests are batched ``batch_size`` rows at a time, longest first (so rows of one call have
similar lengths), and the results come back in the order of the requests. Every call has
``min(batch_size, rows)`` rows (the last one is filled up with copies of its first row) and a
width rounded up to a power of two (at most ``max_seq_len``), so a task compiles a few shapes.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence

import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from jaxlab.data.tokenizers import Tokenizer, load_tokenizer
from jaxlab.infer import generate_in_batches, token_logprobs_and_greedy
from jaxlab.train import pretrained

# Keys that only shape sampling: greedy decoding ignores them, as Hugging Face's does.
_SAMPLING_ONLY_KWARGS = ("top_p", "top_k", "min_p")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@register_model("jaxlab")
class JaxlabLM(LM):
    """lm-eval's ``LM`` over a jaxlab language model and tokenizer (module docstring).

    Args:
      model: any model of :mod:`jaxlab.models` (``model(tokens) -> [batch, seq, vocab]``, a
        ``config`` with ``vocab_size`` and ``max_seq_len``), or a source string ``hf:PATH`` /
        ``run:WORKDIR[@STEP]`` to load one from.
      tokenizer: a :class:`jaxlab.data.tokenizers.Tokenizer` whose ids fit the model's
        vocabulary, or a spec for ``load_tokenizer``; default (None, with a source string
        only) the source's own tokenizer.
      batch_size: rows per forward pass or generation call, an int >= 1 (or its decimal
        string, as lm-eval's command line passes it).
      max_gen_toks: the generation budget when a request's ``gen_kwargs`` name none (lm-eval's
        default is 256); it must leave room for a context: ``< max_seq_len``.
      add_bos: put the tokenizer's bos before every context and prompt; default (None) when
        the tokenizer has one, as Llama's Hugging Face tokenizer does.
      device, max_batch_size: what lm-eval's evaluator passes every model (its command line
        sets ``device="cuda:0"`` by default); ignored: jax places the model, and batches have
        one size.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer | str | None = None,
        *,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        add_bos: bool | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        del device, max_batch_size
        if isinstance(batch_size, str) and batch_size.strip().isdigit():
            batch_size = int(batch_size)
        for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
            if not _is_int(value) or value < 1:  # checked before a model is loaded
                raise ValueError(f"JaxlabLM: {name} must be an int >= 1, got {value!r}")
        if isinstance(model, str):
            if tokenizer is None:
                tokenizer = pretrained.source_tokenizer(model, "JaxlabLM: model")
            model = pretrained.load_model(model, "JaxlabLM: model")
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        config = getattr(model, "config", None)
        if not all(_is_int(getattr(config, f, None)) for f in ("vocab_size", "max_seq_len")):
            raise TypeError(
                "JaxlabLM: model must be a jaxlab language model whose config has int "
                f"vocab_size and max_seq_len, got {type(model).__name__} with config {config!r}"
            )
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(
                "JaxlabLM: tokenizer must be a jaxlab.data.tokenizers.Tokenizer or a spec for "
                f"load_tokenizer (None only with a model source string), got {tokenizer!r}"
            )
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"JaxlabLM: the tokenizer's vocab_size={tokenizer.vocab_size} exceeds the "
                f"model's vocab_size={config.vocab_size}; its ids must fit the model"
            )
        if config.max_seq_len < 2:
            raise ValueError(
                f"JaxlabLM: the model's max_seq_len must be >= 2 (a token of context and one "
                f"to score), got {config.max_seq_len}"
            )
        if add_bos is None:
            add_bos = tokenizer.bos_id is not None
        elif add_bos and tokenizer.bos_id is None:
            raise ValueError(
                f"JaxlabLM: add_bos=True but the tokenizer ({type(tokenizer).__name__}) has no "
                "bos id"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = bool(add_bos)

    @property
    def max_length(self) -> int:
        """The model's ``config.max_seq_len``: the most tokens one forward pass holds."""
        return int(self.model.config.max_seq_len)

    def _prefix_token(self, request_type: str) -> int:
        """The token an empty context or a rolling text starts from: bos, else eos."""
        for token in (self.tokenizer.bos_id, self.tokenizer.eos_id):
            if token is not None:
                return token
        raise ValueError(
            f"{request_type}: an empty context or a rolling text needs a prefix token, but the "
            f"tokenizer ({type(self.tokenizer).__name__}) has neither a bos nor an eos id"
        )

    def _encode_context(self, context: str, request_type: str) -> list[int]:
        ids = self.tokenizer.encode(context, add_bos=self.add_bos)
        return ids or [self._prefix_token(request_type)]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(logprob, is_greedy)`` of each request's ``(context, continuation)``."""
        rows = []
        for i, request in enumerate(requests):
            context, continuation = request.args
            scored = self.tokenizer.encode(continuation)
            if not scored:
                raise ValueError(
                    f"loglikelihood: request {i}: the continuation {continuation!r} encodes to "
                    "no tokens; there is nothing to score"
                )
            rows.append((self._encode_context(context, "loglikelihood") + scored, len(scored)))
        return self._score_rows(rows, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each request's ``(text,)`` after the prefix token, in windows."""
        rows, owners = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            windows = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tokenizer.encode(text),
                prefix_token=self._prefix_token("loglikelihood_rolling"),
                # lm-eval's windows feed max_seq_len tokens and score one more; here every
                # scored token is fed, so max_length - 1 predictions fill a forward pass.
                max_seq_len=self.max_length - 1,
                context_len=1,
            )
            for context, scored in map(lm_eval_utils.make_disjoint_window, windows):
                rows.append((context + scored, len(scored)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(
            owners, self._score_rows(rows, "loglikelihood_rolling"), strict=True
        ):
            totals[i] += logprob
        return totals

    def _score_rows(
        self, rows: Sequence[tuple[list[int], int]], request_type: str
    ) -> list[tuple[float, bool]]:
        """``(summed log-probability, all argmax)`` of the last ``n`` tokens of each
        ``(ids, n)``, ``ids`` cut to their last ``max_length`` tokens."""
        limit = self.max_length
        kept = []
        for i, (ids, scored) in enumerate(rows):
            if scored > limit - 1:
                raise ValueError(
                    f"{request_type}: request {i}: its continuation has {scored} tokens; at most "
                    f"{limit - 1} fit the model's max_seq_len={limit} after one token of context"
                )
            kept.append(ids[-limit:])
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for chunk, tokens in self._batches(kept, limit):
            logprobs, greedy = map(np.asarray, token_logprobs_and_greedy(self.model, tokens))
            for row, i in enumerate(chunk):
                end = len(kept[i])
                span = slice(end - rows[i][1], end)
                results[i] = (
                    float(np.sum(logprobs[row, span], dtype=np.float64)),
                    bool(greedy[row, span].all()),
                )
        return results

    def _batches(
        self, sequences: Sequence[Sequence[int]], limit: int
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """``(indices, padded)`` per batch of ``sequences``, longest first: ``padded`` is
        ``[min(batch_size, len(sequences)), width <= limit]`` int32, right-padded and filled up
        with copies of its first row; ``indices`` are the real rows' positions in ``sequences``.
        """
        if not sequences:
            return
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        rows_per_call = min(self.batch_size, len(sequences))
        for start in range(0, len(order), rows_per_call):
            chunk = order[start : start + rows_per_call]
            width = _padded_width(len(sequences[chunk[0]]), limit)
            tokens = np.zeros((rows_per_call, width), np.int32)  # any id pads: models are causal
            for row, i in enumerate(chunk + [chunk[0]] * (rows_per_call - len(chunk))):
                tokens[row, : len(sequences[i])] = sequences[i]
            yield chunk, tokens

    def generate_until(self, requests) -> list[str]:
        """Greedy text after each request's context, cut at its ``until`` strings."""
        # One generation call sequence per (until, max_gen_toks): one stop rule and budget each.
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self._generation_settings(i, request.args[1]), []).append(i)
        texts = [""] * len(requests)
        for (until, max_gen_toks), members in groups.items():
            room = self.max_length - max_gen_toks
            if room < 1:
                raise ValueError(
                    f"generate_until: max_gen_toks={max_gen_toks} leaves no room for a context "
                    f"in the model's max_seq_len={self.max_length} (request {members[0]})"
                )
            prompts = {
                i: self._encode_context(requests[i].args[0], "generate_until")[-room:]
                for i in members
            }
            order = sorted(members, key=lambda i: -len(prompts[i]))
            outputs = generate_in_batches(
                self.model,
                [prompts[i] for i in order],
                batch_size=self.batch_size,
                max_new_tokens=max_gen_toks,
                width=_padded_width(len(prompts[order[0]]), room),
                stop_tokens=() if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,),
                stop_strings=until,
                tokenizer=self.tokenizer,
            )
            for i, tokens in zip(order, outputs, strict=True):
                texts[i] = _cut_at_first(self.tokenizer.decode(tokens.tolist()), until)
        return texts

    def _generation_settings(self, i: int, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
        """``(until, max_gen_toks)`` of request ``i``; anything but greedy decoding raises."""
        if not isinstance(gen_kwargs, dict):
            raise TypeError(
                f"generate_until: request {i}: gen_kwargs must be a dict, got {gen_kwargs!r}"
            )
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until, max_gen_toks = kwargs.pop("until"), kwargs.pop("max_gen_toks")
        do_sample, temperature = kwargs.pop("do_sample"), kwargs.pop("temperature", 0.0)
        if do_sample:
            raise ValueError(
                f"generate_until: request {i}: only greedy decoding is supported (do_sample "
                f"false, temperature 0), got do_sample={do_sample!r}, temperature={temperature!r}"
            )
        if kwargs.pop("num_beams", 1) != 1:
            raise ValueError(
                f"generate_until: request {i}: beam search is not supported (num_beams must be "
                f"1), got {gen_kwargs!r}"
            )
        unknown = sorted(set(kwargs) - set(_SAMPLING_ONLY_KWARGS))
        if unknown:
            raise ValueError(
                f"generate_until: request {i}: unsupported generation kwargs {unknown}; "
                "supported: until, max_gen_toks (or max_new_tokens), do_sample=False, "
                f"temperature=0, num_beams=1, and {list(_SAMPLING_ONLY_KWARGS)} (ignored when "
                f"greedy); got {gen_kwargs!r}"
            )
        if not all(isinstance(s, str) for s in until):
            raise TypeError(f"generate_until: request {i}: until must hold strings, got {until!r}")
        if max_gen_toks < 1:
            raise ValueError(
                f"generate_until: request {i}: max_gen_toks must be >= 1, got {max_gen_toks}"
            )
        return tuple(s for s in until if s), int(max_gen_toks)


def _padded_width(longest: int, limit: int) -> int:
    """``longest`` rounded up to a power of two (and at least 2), at most ``limit``: few widths,
    few compilations."""
    return min(limit, max(2, 1 << (longest - 1).bit_length()))


def _cut_at_first(text: str, stops: Sequence[str]) -> str:
    """``text`` before the earliest occurrence of any of ``stops``."""
    return text[: min((text.find(s) for s in stops if s in text), default=len(text))]
