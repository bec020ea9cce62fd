"""benchmarks/trl_peer.py on a tiny Qwen2: TRL's trainer runs, steps are timed and split."""

import io
import json
import math
import pathlib
import sys

import pytest

pytest.importorskip("trl")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import trl_peer  # noqa: E402

from opd_jax import models  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("trl_peer")
  config = models.ModelConfig(
      model_type="qwen2", vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1,
      num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True, max_position_embeddings=256)
  paths = []
  for name, seed in (("student", 0), ("teacher", 1)):
    models.save_hf_checkpoint(models.init_model(config, seed=seed), config, root / name)
    paths.append(str(root / name))
  return paths


def test_tokenizer_maps_prompt_strings_to_their_ids():
  tokenizer = trl_peer.make_tokenizer(300)
  prompts = trl_peer.prompt_strings(300)
  assert len(prompts) == trl_peer.PROMPTS * trl_peer.COPIES
  ids = tokenizer(text=prompts)["input_ids"]
  assert all(len(row) == trl_peer.PROMPT_LEN for row in ids)
  assert ids[0] == [int(t) for t in prompts[0].split()]
  assert ids[0] == ids[trl_peer.COPIES - 1] != ids[trl_peer.COPIES]   # 4 copies per prompt
  assert min(min(row) for row in ids) >= 2       # never the pad or EOS id


def test_workloads_give_both_sides_the_same_generation_settings():
  fixed, variable = trl_peer.workload("fixed"), trl_peer.workload("variable")
  assert fixed == {"new": 128, "top_k": 50, "top_p": 0.9, "stop_ids": (), "exact": True}
  assert variable["new"] == 512 and variable["top_k"] == 0 and not variable["exact"]
  # TRL's own EOS and 410 more ids stop a response (geometric lengths, mean near 64).
  assert variable["stop_ids"][0] == trl_peer.EOS_ID and len(set(variable["stop_ids"])) == 411
  assert trl_peer.PAD_ID not in variable["stop_ids"]
  with pytest.raises(ValueError, match="accepted: fixed, variable"):
    trl_peer.workload("long")


@pytest.mark.slow   # ~30 s on an idle 2-core machine: TRL generates 32 x 128 tokens per step
def test_run_serves_steps_and_splits_them(folders):
  out = io.StringIO()
  result = trl_peer.run(*folders, steps=2, serve=(iter(["go\n"] * 2), out))
  lines = out.getvalue().splitlines()
  assert lines[0] == "ready" and len(lines) == 3
  steps = [json.loads(line) for line in lines[1:]]
  assert [s["step"] for s in steps] == [1, 2]
  assert steps[1]["s"] == result["s_per_step"]
  for step in steps:
    assert step["rollout_s"] > 0 and step["scoring_s"] > 0 and step["update_s"] > 0
    assert math.isclose(step["rollout_s"] + step["scoring_s"] + step["update_s"], step["s"],
                        abs_tol=0.01)
  # Generation ran to exactly 128 tokens for all 32 rollouts despite the EOS id being sampleable.
  assert result["prompt_len_min"] == result["prompt_len_max"] == trl_peer.PROMPT_LEN
  assert result["completion_len_min"] == result["completion_len_max"] == trl_peer.NEW
  assert len(result["losses"]) == 2 and all(loss > 0 for loss in result["losses"])
  for key in ("parts_s", "parts_cpu_s"):
    parts = result[key]
    assert set(parts) == set(trl_peer.NAMES)
    for name in ("rollout", "teacher_forward", "teacher_head", "student_forward",
                 "loss_forward", "backward", "optimizer"):
      assert all(t > 0 for t in parts[name]), (key, name)
  total = [sum(parts[i] for parts in result["parts_s"].values()) for i in range(2)]
  assert total == pytest.approx(result["step_s"], abs=0.01)


@pytest.mark.slow
def test_run_stops_when_the_turns_run_out(folders):
  with pytest.raises(RuntimeError, match="input ended before step 2 of 2"):
    trl_peer.run(*folders, steps=2, serve=(iter(["go\n"]), io.StringIO()))


def test_run_rejects_one_step(folders):
  with pytest.raises(ValueError, match="steps=1 must be >= 2"):
    trl_peer.run(*folders, steps=1)


def test_trl_beta_one_is_the_reverse_kl_over_the_full_vocabulary():
  # The comparison relies on TRL's beta = 1 meaning KL(student || teacher) per token, exactly.
  import torch
  from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
  gen = torch.Generator().manual_seed(0)
  h_s, h_t = torch.randn(5, 8, generator=gen), torch.randn(5, 6, generator=gen)
  w_s, w_t = torch.randn(40, 8, generator=gen), torch.randn(40, 6, generator=gen)
  divergence, _ = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, 1.0)
  log_ps = torch.log_softmax(h_s @ w_s.T, -1)
  log_pt = torch.log_softmax(h_t @ w_t.T, -1)
  reverse = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
  forward = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
  torch.testing.assert_close(divergence, reverse, rtol=1e-4, atol=1e-5)
  assert not torch.allclose(divergence, forward, rtol=1e-2)
