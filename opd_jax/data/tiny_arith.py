"""Synthetic arithmetic for the offline demo: "123+456=" -> the sum's digits reversed, then <eos>.

The data is a TFDS dataset (array_record, built locally from a seeded generator, no TensorFlow)
and the tokenizer is a character-level Hugging Face tokenizer made on the spot, so the demo runs
through exactly the code paths a real dataset and checkpoint use.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from opd_jax.data import math_datasets

PAD, EOS = "<pad>", "<eos>"
CHARS = tuple("0123456789+=")
VOCAB = (PAD, EOS) + CHARS
DIGITS = 3                         # operand digits; the sum has DIGITS + 1
PROMPT_LEN = 2 * DIGITS + 2        # "aaa+bbb="
TARGET_LEN = DIGITS + 2            # reversed sum digits + <eos>
SPLITS = {"train": 20_000, "valid": 500, "test": 500}   # disjoint problems


def make_tokenizer(folder: str | pathlib.Path):
  """A character-level PreTrainedTokenizerFast over VOCAB, saved to (and loaded from) `folder`."""
  # pylint: disable=import-outside-toplevel
  import tokenizers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  folder = pathlib.Path(folder)
  if not (folder / "tokenizer.json").exists():
    model = tokenizers.models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex("."), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    fast.save_pretrained(folder)
  return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def problem(a: int, b: int) -> tuple[str, str]:
  """The prompt text and the target text (reversed zero-padded sum, without <eos>)."""
  prompt = f"{a:0{DIGITS}d}+{b:0{DIGITS}d}="
  return prompt, f"{a + b:0{DIGITS + 1}d}"[::-1]


def encode(text: str) -> np.ndarray:
  """Token ids of a prompt or target text (characters of CHARS only)."""
  index = {c: i for i, c in enumerate(VOCAB)}
  bad = sorted(set(text) - set(CHARS))
  if bad:
    raise ValueError(f"text {text!r} has characters {bad} outside the arithmetic vocabulary "
                     f"{''.join(CHARS)!r}")
  return np.asarray([index[c] for c in text], np.int32)


def decode_answer(ids) -> str | None:
  """The target text of a response (digits before the first <eos>), None if it never ended."""
  out = []
  for i in np.asarray(ids).tolist():
    if VOCAB[i] == EOS:
      return "".join(out)
    out.append(VOCAB[i] if 0 <= i < len(VOCAB) else "?")
  return None


class TinyArith(math_datasets.QuietBuilder, tfds.core.GeneratorBasedBuilder):
  """Train problems and disjoint held-out test problems, both drawn from a fixed seed."""

  VERSION = tfds.core.Version("1.0.0")
  # Nothing is downloaded, so there are no checksums to look up (TFDS's lookup would locate this
  # module through importlib_resources, which it does not install).
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "prompt_ids": tfds.features.Tensor(shape=(PROMPT_LEN,), dtype=np.int32),
        "target_ids": tfds.features.Tensor(shape=(TARGET_LEN,), dtype=np.int32),
        "answer": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    pairs = _pairs(sum(SPLITS.values()))
    out, start = {}, 0
    for name, n in SPLITS.items():
      out[name] = self._generate_examples(pairs[start:start + n])
      start += n
    return out

  def _generate_examples(self, pairs):
    for a, b in pairs:
      prompt, target = problem(int(a), int(b))
      yield f"{a}+{b}", {"prompt_ids": encode(prompt),
                         "target_ids": np.append(encode(target), VOCAB.index(EOS)).astype(np.int32),
                         "answer": target}


def _pairs(n: int) -> np.ndarray:
  """n distinct (a, b) operand pairs, from a fixed seed (so the splits never overlap)."""
  hi = 10 ** DIGITS
  flat = np.random.default_rng(20_260_325).choice(hi * hi, size=n, replace=False)
  return np.stack([flat // hi, flat % hi], axis=1)


def load(data_dir: str | pathlib.Path, split: str):
  """The split as a random-access TFDS data source (built into `data_dir` on first use)."""
  if split not in SPLITS:
    raise ValueError(f"tiny_arith has no split {split!r}; accepted: {', '.join(SPLITS)}")
  with math_datasets.quiet_tfds():
    builder = TinyArith(data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
      print(f"building the tiny_arith dataset in {data_dir} (once)")
      builder.download_and_prepare()
    return builder.as_data_source()[split]
