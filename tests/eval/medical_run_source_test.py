"""``experiments.medical_eval`` reads a ``run:WORKDIR[@STEP]`` model: the parameters of the run's
checkpoint and the tokenizer of its config."""

import os

import jax
import numpy as np
from flax import nnx

from configs import lm_smoke
from experiments.medical_eval import load_model, tokenizer_for
from jaxlab.data.tokenizers import ByteTokenizer
from jaxlab.train import loop
from jaxlab.train.checkpoint import Checkpointer
from tests.train.overrides import configure


def by_name(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def test_load_model_from_a_run_checkpoint(tmp_path):
    workdir = str(tmp_path)
    config = configure(lm_smoke.get_config(), num_steps=2, checkpoint_every=1, eval_every=2)
    loop.train_and_evaluate(config, workdir)
    exp = loop.build_experiment(config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    for spec, step in ((f"run:{workdir}", 2), (f"run:{workdir}@1", 1)):
        state, _, _ = checkpointer.restore(step, exp.abstract_state)
        expected = by_name(state.params)
        got = by_name(nnx.to_pure_dict(nnx.state(load_model(spec), nnx.Param)))
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{spec}: {name}")
    checkpointer.close()
    tokenizer = tokenizer_for(f"run:{workdir}", "", False, exp.model_config.vocab_size)
    assert isinstance(tokenizer, ByteTokenizer)
