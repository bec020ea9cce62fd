"""Forward-pass tokens/s of the jitted decoder vs transformers' PyTorch Qwen2 on CPU; one JSON line.

Same weights (a random ~20M-parameter Qwen2: vocab 32000, hidden 256, 4 layers, 4 heads, 2 KV
heads, MLP 1024, untied output head; ours from `init_model`, saved with `save_hf_checkpoint` and
loaded by transformers), batch 8 x 256 tokens, float32, logits of every position. transformers
(sdpa attention, its fastest on CPU) runs in a child process of its own; both processes are held
to the same 2 cores and torch to 2 threads, so each side computes with 2 threads. After a warm-up
call on each side (ours includes compilation, reported separately), the two sides take turns, one
call each per round, so that a slow spell of a shared machine hits both; medians over --repeats
rounds and each round's ratio. The logits of both sides are compared once, after the warm-up.

Run: python benchmarks/bench_forward.py [--repeats 10] [--batch 8] [--seq_len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import _turns

THREADS = 2
CORES = _turns.pin_cores(THREADS)            # before JAX starts its CPU client and thread pool
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the comparison is CPU against CPU

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from opd_jax import models  # noqa: E402

CONFIG = models.ModelConfig(
    model_type="qwen2", vocab_size=32000, hidden_size=256, intermediate_size=1024, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=False,
    max_position_embeddings=4096)
CALL = "forward"
THEIR_LOGITS = "transformers_logits.npy"


def tokens_and_mask(batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (batch, seq_len))
  return tokens.astype(np.int32), np.ones((batch, seq_len), bool)


def torch_server(folder: str, batch: int, seq_len: int) -> None:
  """Child process: transformers' forward on the same inputs, timed call by call (see _turns)."""
  import torch  # noqa: PLC0415 (the parent never needs torch)
  import transformers  # noqa: PLC0415

  torch.set_num_threads(THREADS)
  model = transformers.Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
  tokens, mask = (torch.as_tensor(x.astype(np.int64)) for x in tokens_and_mask(batch, seq_len))

  def call():
    with torch.inference_mode():
      return model(input_ids=tokens, attention_mask=mask).logits

  np.save(pathlib.Path(folder) / THEIR_LOGITS, call().numpy())
  _turns.serve({CALL: call})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10, help="rounds of one call per side")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument(_turns.SERVER_FLAG, metavar="FOLDER", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_server:
    torch_server(args.torch_server, args.batch, args.seq_len)
    return
  for name in ("repeats", "batch", "seq_len"):
    if getattr(args, name) <= 0:
      parser.error(f"--{name} must be positive, got {getattr(args, name)}")
  result = {"benchmark": "forward", "model": "qwen2", "params": CONFIG.num_params,
            "batch": args.batch, "seq_len": args.seq_len, "dtype": CONFIG.dtype,
            "threads": THREADS, "cores": len(CORES), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "rounds": args.repeats}
  model = models.init_model(CONFIG, seed=0)
  tokens, mask = tokens_and_mask(args.batch, args.seq_len)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, t, m: models.forward(nnx.merge(graphdef, s), t, m))
  tokens_j, mask_j = jax.device_put(tokens), jax.device_put(mask)

  def ours():
    return jax.block_until_ready(jitted(state, tokens_j, mask_j))

  with tempfile.TemporaryDirectory() as folder:
    models.save_hf_checkpoint(model, CONFIG, folder)
    with _turns.Worker([__file__, _turns.SERVER_FLAG, folder, "--batch", str(args.batch),
                        "--seq_len", str(args.seq_len)]) as worker:
      worker.wait_ready()                    # its warm-up done: nothing competes
      first_s = _turns.seconds(ours)
      diff = float(np.abs(np.asarray(ours()) - np.load(pathlib.Path(folder) / THEIR_LOGITS)).max())
      times = _turns.take_turns({CALL: ours}, worker, args.repeats)
  result.update(_turns.summary(*times[CALL], args.batch * args.seq_len, first_s=first_s))
  result["max_abs_logit_diff"] = diff
  print(json.dumps(result))


if __name__ == "__main__":
  main()
