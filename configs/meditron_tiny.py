"""MEDITRON's continued-pretraining path at toy scale, on CPU in seconds: a tiny Hugging Face
Llama in, GAP-Replay continued pretraining with per-source held-out perplexity, a Hugging Face
checkpoint out.

Usage (LLAMA_DIR: a Hugging Face Llama of the architecture HF_LLAMA_CONFIG describes, e.g.
written by ``transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_LLAMA_CONFIG))``'s
``save_pretrained``; DATA: a GAP-Replay folder, configs/meditron_gap_replay.py):
  python -m experiments.train_lm --config=configs/meditron_tiny.py:LLAMA_DIR,DATA \
      --workdir=runs/meditron_tiny

The same engine path as configs/meditron_7b.py (init_from hf:, GAP-Replay weights, MEDITRON's
12 special tokens growing the vocabulary, the two-epoch cosine stopped after one, export at the
end) with the byte tokenizer, a 2-layer model and float32 everywhere, so the exported
checkpoint's logits can be compared with jaxlab's exactly.
"""

from configs import lm_tiny, meditron_7b

BYTE_VOCAB = 259  # jaxlab.data.tokenizers.ByteTokenizer: 256 bytes + pad, bos, eos
# The tiny checkpoint's architecture, as transformers.LlamaConfig arguments.
HF_LLAMA_CONFIG = dict(
    vocab_size=BYTE_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def tiny_llama(config):
    """Sets ``config.model`` to HF_LLAMA_CONFIG's architecture in float32 (the vocabulary: the
    tokenizer's). Returns ``config``."""
    config.model.update(
        vocab_size=0,  # the tokenizer's: 259 bytes + 12 special tokens
        hidden_size=HF_LLAMA_CONFIG["hidden_size"],
        intermediate_size=HF_LLAMA_CONFIG["intermediate_size"],
        num_layers=HF_LLAMA_CONFIG["num_hidden_layers"],
        num_heads=HF_LLAMA_CONFIG["num_attention_heads"],
        num_kv_heads=HF_LLAMA_CONFIG["num_key_value_heads"],
        max_seq_len=HF_LLAMA_CONFIG["max_position_embeddings"],
        rms_norm_eps=HF_LLAMA_CONFIG["rms_norm_eps"],
        rope_theta=HF_LLAMA_CONFIG["rope_theta"],
        tie_embeddings=False,
        param_dtype="float32",
        dtype="float32",
    )
    return config


def get_config(arg: str = ""):
    llama_dir, data = meditron_7b.paths(arg, "configs/meditron_tiny.py")
    config = tiny_llama(lm_tiny.get_config())
    config.seq_len = 64
    config.batch_size = 8
    config.eval_every = 4
    config.eval_batches = 1
    config.checkpoint_every = 8
    config.log_every = 1
    config.optim.learning_rate = 1e-3
    config = meditron_7b.continued_pretraining(config, llama_dir, data, epoch_steps=8)
    config.optim.warmup_steps = 2
    config.data.tokenizer = "byte"  # a tiny checkpoint has no tokenizer of its own
    config.export_hf_dtype = "float32"
    return config
