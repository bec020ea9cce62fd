"""Attention implementations: blockwise and splash equal the whole-matrix einsum (values and
gradients), the automatic choice, the errors, and blockwise memory that grows linearly."""

import dataclasses

import jax
import jax.numpy as jnp
import model_helpers
import numpy as np
import pytest
from flax import nnx

from opd_jax import models, sharding
from opd_jax.models import attention
from opd_jax.models.attention import CausalMask

B, N, K, H = 3, 4, 2, 8          # grouped-query: 2 query heads per key/value head


def _qkv(seed: int, t: int, s: int | None = None, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  q = rng.normal(size=(B, t, N, H))
  k, v = rng.normal(size=(B, s, K, H)), rng.normal(size=(B, s, K, H))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _left_padding(t: int) -> np.ndarray:
  """Rows with 0, 3 and t - 1 leading padding slots (the last row has one real token)."""
  pads = np.array([0, min(3, t - 1), t - 1])
  return np.arange(t)[None, :] >= pads[:, None]


def _grads(fn, q, k, v, mask, d_out):
  """d/dq, d/dk, d/dv of sum(fn(q, k, v, mask) * d_out), compiled (eager loops are slow)."""
  loss = lambda q, k, v, mask, d_out: jnp.sum(fn(q, k, v, mask) * d_out)
  return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v, mask, d_out)


def _blockwise(block_q, block_kv):
  return lambda q, k, v, m: attention.blockwise_attention(q, k, v, m, block_q=block_q,
                                                          block_kv=block_kv)


@pytest.mark.parametrize("t,block_q,block_kv", [(13, 4, 5), (16, 16, 3), (1, 4, 4), (9, 512, 512)])
def test_blockwise_equals_einsum_on_a_left_padded_causal_pass(t, block_q, block_kv):
  q, k, v = _qkv(t, t)
  valid = _left_padding(t)
  mask = CausalMask(jnp.asarray(valid))
  got = jax.jit(_blockwise(block_q, block_kv))(q, k, v, mask)
  want = attention.xla_attention(q, k, v, mask.dense())
  real = valid[:, :, None, None]
  assert got.shape == want.shape == (B, t, N, H)
  assert np.all(np.isfinite(got))                 # padding queries too
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6)
  # In the model nothing reads a padding query's output: its cotangent is zero.
  d_out = jnp.asarray(np.random.default_rng(1).normal(size=got.shape) * real, jnp.float32)
  g_got = _grads(_blockwise(block_q, block_kv), q, k, v, mask, d_out)
  g_want = _grads(lambda q, k, v, m: attention.xla_attention(q, k, v, m.dense()), q, k, v,
                  mask, d_out)
  for name, a, b in zip("qkv", g_got, g_want):
    np.testing.assert_allclose(a, b, atol=5e-6, err_msg=f"d/d{name}")


@pytest.mark.parametrize("block_q,block_kv", [(4, 4), (3, 64)])
def test_blockwise_equals_einsum_with_an_explicit_mask_and_fully_masked_rows(block_q, block_kv):
  t, s = 11, 14
  q, k, v = _qkv(2, t, s)
  rng = np.random.default_rng(3)
  valid = rng.random((B, t, s)) < 0.4
  valid[0, 2] = False                              # rows with no valid key at all
  valid[2, :5] = False
  valid = jnp.asarray(valid)
  got = jax.jit(_blockwise(block_q, block_kv))(q, k, v, valid)
  want = attention.xla_attention(q, k, v, valid)
  # Every row, fully masked ones included (both average all S values there).
  np.testing.assert_allclose(got, want, atol=2e-6)
  d_out = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
  g_got = _grads(_blockwise(block_q, block_kv), q, k, v, valid, d_out)
  g_want = _grads(attention.xla_attention, q, k, v, valid, d_out)
  for name, a, b in zip("qkv", g_got, g_want):
    np.testing.assert_allclose(a, b, atol=5e-6, err_msg=f"d/d{name}")


def test_blockwise_in_bfloat16_stays_close_to_the_float32_einsum():
  q, k, v = _qkv(4, 24)
  mask = CausalMask(jnp.asarray(_left_padding(24)))
  got = jax.jit(_blockwise(8, 8))(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask)
  want = attention.xla_attention(q, k, v, mask.dense())
  real = _left_padding(24)[:, :, None, None]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.where(real, got.astype(np.float32), 0), np.where(real, want, 0),
                             atol=3e-2)


def test_dispatch_runs_the_chosen_implementation():
  q, k, v = _qkv(5, 6)
  mask = CausalMask(jnp.asarray(_left_padding(6)))
  real = _left_padding(6)[:, :, None, None]
  want = attention.xla_attention(q, k, v, mask.dense())
  for impl in ("auto", "xla", "blockwise"):
    got = jax.jit(lambda q, k, v, m, impl=impl: attention.attention(
        q, k, v, m, implementation=impl, block_q=4, block_kv=4))(q, k, v, mask)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6,
                               err_msg=impl)


def test_auto_picks_the_fused_kernel_of_the_backend_else_by_length():
  pick = attention.resolve_implementation
  long, short = attention.AUTO_BLOCKWISE_MIN_KEYS, attention.AUTO_BLOCKWISE_MIN_KEYS - 1
  bf16 = jnp.bfloat16
  assert pick("auto", kv_len=short, dtype=bf16, head_dim=128, factored=True, backend="cpu") == "xla"
  assert pick("auto", kv_len=long, dtype=bf16, head_dim=128, factored=True,
              backend="cpu") == "blockwise"
  assert pick("auto", kv_len=64, dtype=bf16, head_dim=128, factored=True, backend="gpu") == "cudnn"
  # Splash only where it can be partitioned: one device, or traced under a mesh (8 fake here).
  assert pick("auto", kv_len=64, dtype=bf16, head_dim=128, factored=True, backend="tpu") == "xla"
  with jax.set_mesh(sharding.make_mesh(2, 2, 2)):
    assert pick("auto", kv_len=64, dtype=bf16, head_dim=128, factored=True,
                backend="tpu") == "splash"
  # cuDNN takes no float32 and no head_dim outside multiples of 8 up to 128.
  assert pick("auto", kv_len=long, dtype=jnp.float32, head_dim=128, factored=True,
              backend="gpu") == "blockwise"
  assert pick("auto", kv_len=64, dtype=bf16, head_dim=12, factored=True, backend="gpu") == "xla"
  # The fused kernels take only a full pass's causal mask.
  assert pick("auto", kv_len=long, dtype=bf16, head_dim=128, factored=False,
              backend="tpu") == "blockwise"
  for impl in ("xla", "blockwise", "cudnn", "splash"):
    assert pick(impl, kv_len=8, dtype=bf16, head_dim=128, factored=True, backend="cpu") == impl


def test_bad_choices_raise_naming_the_setting():
  q, k, v = _qkv(6, 4)
  mask = CausalMask(jnp.ones((B, 4), bool))
  with pytest.raises(ValueError, match=r"attention_impl='flash'.*accepted: auto, xla, blockwise"):
    attention.attention(q, k, v, mask, implementation="flash")
  with pytest.raises(ValueError, match=r"attention_impl='flash' is not supported"):
    model_helpers.tiny_model_config(attention_impl="flash")
  with pytest.raises(ValueError, match=r"attention_block_kv must be a positive integer, got 0"):
    model_helpers.tiny_model_config(attention_block_kv=0)
  with pytest.raises(ValueError, match=r"block_q=0; accepted: a positive int"):
    attention.blockwise_attention(q, k, v, mask, block_q=0)
  with pytest.raises(ValueError, match=r"'cudnn' takes the causal mask of a full pass"):
    attention.attention(q, k, v, mask.dense(), implementation="cudnn")
  if jax.default_backend() != "gpu":
    with pytest.raises(RuntimeError, match=r"attention_impl='cudnn' needs a GPU backend"):
      attention.attention(q, k, v, mask, implementation="cudnn")
  if jax.default_backend() != "tpu":
    with pytest.raises(RuntimeError, match=r"attention_impl='splash' needs a TPU backend"):
      attention.attention(q, k, v, mask, implementation="splash")


def test_attention_settings_stay_out_of_config_json():
  config = model_helpers.tiny_model_config(attention_impl="blockwise", attention_block_q=64)
  hf = models.config_to_hf(config)
  assert not any("attention_impl" in key or "block" in key for key in hf)
  assert models.config_from_hf(hf).attention_impl == "auto"


def _model_pair(**overrides):
  base = model_helpers.tiny_model_config(attention_impl="xla", **overrides)
  xla = models.init_model(base, seed=3, std=0.3)
  blockwise = models.decoder.with_config(
      xla, dataclasses.replace(base, attention_impl="blockwise", attention_block_q=4,
                              attention_block_kv=3))
  return xla, blockwise


def test_model_forward_and_gradients_are_the_same_with_blockwise_attention():
  xla, blockwise = _model_pair()
  tokens, mask = model_helpers.left_padded_batch(0, 3, 11, 128)
  logits = {}
  grads = {}
  for name, model in (("xla", xla), ("blockwise", blockwise)):
    graphdef, params = nnx.split(model)

    def loss(p, graphdef=graphdef):
      out = models.forward(nnx.merge(graphdef, p), jnp.asarray(tokens), jnp.asarray(mask))
      return jnp.sum(jnp.where(mask[:, :, None], jax.nn.log_softmax(out), 0.0)[..., 5]), out

    grads[name], logits[name] = jax.jit(jax.grad(loss, has_aux=True))(params)
  real = mask[:, :, None]
  np.testing.assert_allclose(np.where(real, logits["blockwise"], 0),
                             np.where(real, logits["xla"], 0), atol=2e-5)
  flat_b = jax.tree.leaves(grads["blockwise"])
  flat_x = jax.tree.leaves(grads["xla"])
  assert len(flat_b) == len(flat_x) > 0
  for a, b in zip(flat_b, flat_x):
    # float32 sums in a different order: errors relative to the parameter's gradient scale.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()) + 1e-7)


def test_prefill_with_blockwise_attention_continues_like_the_einsum():
  xla, blockwise = _model_pair()
  tokens, mask = model_helpers.left_padded_batch(1, 3, 9, 128)
  out = {}
  for name, model in (("xla", xla), ("blockwise", blockwise)):
    graphdef, params = nnx.split(model)

    def run(params, tokens, mask, graphdef=graphdef):
      model = nnx.merge(graphdef, params)
      cache = models.init_cache(model.config, 3, 12)
      logits, cache = models.prefill(model, tokens, mask, cache)
      step, _ = models.decode_step(model, jnp.asarray([5, 6, 7], jnp.int32), cache)
      return logits[:, -1], step

    out[name] = jax.jit(run)(params, tokens, mask)
  for a, b in zip(out["blockwise"], out["xla"]):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_with_config_takes_runtime_choices_and_refuses_another_architecture():
  xla, _ = _model_pair()
  tuned = models.decoder.with_config(
      xla, dataclasses.replace(xla.config, remat="full", attention_impl="blockwise"))
  assert (tuned.config.remat, tuned.config.attention_impl) == ("full", "blockwise")
  with pytest.raises(ValueError, match="changes only remat and the attention settings"):
    models.decoder.with_config(xla, dataclasses.replace(xla.config, num_layers=3))


def _grad_temp_bytes(t: int) -> int:
  q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
  valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)

  def loss(q, k, v, valid):
    return jnp.sum(attention.blockwise_attention(q, k, v, CausalMask(valid), block_q=256,
                                                 block_kv=256))

  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, valid).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_gradient_memory_grows_linearly_with_length():
  small, large = _grad_temp_bytes(2048), _grad_temp_bytes(4096)
  assert large / small < 2.6, (small, large)
  # Far below one float32 [T, T] score matrix of one head (the einsum keeps several).
  assert large < 4096 * 4096 * 4 / 8, large


@pytest.mark.slow
def test_splash_kernel_in_the_pallas_interpreter_equals_the_einsum():
  q, k, v = _qkv(7, 20)
  valid = _left_padding(20)
  mask = CausalMask(jnp.asarray(valid))
  real = valid[:, :, None, None]
  splash = lambda q, k, v, m: attention.splash_attention(q, k, v, m, interpret=True)
  einsum = lambda q, k, v, m: attention.xla_attention(q, k, v, m.dense())
  np.testing.assert_allclose(np.where(real, splash(q, k, v, mask), 0),
                             np.where(real, einsum(q, k, v, mask), 0), atol=2e-6)
  d_out = jnp.asarray(np.random.default_rng(8).normal(size=q.shape) * real, jnp.float32)
  for name, a, b in zip("qkv", _grads(splash, q, k, v, mask, d_out),
                        _grads(einsum, q, k, v, mask, d_out)):
    np.testing.assert_allclose(a, b, atol=5e-6, err_msg=f"d/d{name}")


def test_trainer_config_applies_the_attention_choice_to_every_model(tmp_path):
  # pylint: disable=import-outside-toplevel
  import train_helpers

  from opd_jax import programs, settings
  bad = train_helpers.tiny_config(tmp_path / "w", tmp_path / "tfds",
                                  **{"teacher.attention": "flash"})
  with pytest.raises(settings.ConfigError, match=r"config.teacher.attention='flash' .*accepted: "
                     r"auto, xla, blockwise, cudnn, splash"):
    settings.TrainSettings.from_config(bad)
  bad = train_helpers.tiny_config(tmp_path / "w", tmp_path / "tfds",
                                  **{"model.attention_block": 0})
  with pytest.raises(settings.ConfigError, match=r"config.model.attention_block=0"):
    settings.TrainSettings.from_config(bad)
  c = train_helpers.tiny_config(tmp_path / "w", tmp_path / "tfds",
                                **{"model.attention": "blockwise", "model.attention_block": 64})
  source = settings.TrainSettings.from_config(c).model
  config = programs.model_config_of(source, 128)                    # random weights of a shape
  assert (config.attention_impl, config.attention_block_q, config.attention_block_kv) == \
      ("blockwise", 64, 64)
  folder = tmp_path / "hf"
  models.save_hf_checkpoint(models.init_model(model_helpers.tiny_model_config()),
                            model_helpers.tiny_model_config(), folder)
  from_folder = dataclasses.replace(source, path=str(folder), tokenizer=str(folder))
  assert programs.model_config_of(from_folder, 128).attention_impl == "blockwise"
  loaded = programs.load_model(from_folder, 128, seed=0, mesh=None)   # config.json has no choice
  assert loaded.config.attention_impl == "blockwise"


@pytest.mark.slow
def test_splash_kernel_runs_per_device_under_a_mesh():
  q, k, v = _qkv(9, 20)
  valid = _left_padding(20)
  mask = CausalMask(jnp.asarray(valid))
  real = valid[:, :, None, None]
  want = attention.xla_attention(q, k, v, mask.dense())
  q = jnp.concatenate([q, q[:1]])                 # 4 rows: split over data x fsdp
  k, v = jnp.concatenate([k, k[:1]]), jnp.concatenate([v, v[:1]])
  mask = CausalMask(jnp.concatenate([mask.key_valid, mask.key_valid[:1]]))
  mesh = sharding.make_mesh(2, 2, 2)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, m: attention.splash_attention(q, k, v, m, interpret=True))
    assert "manual_computation" in fn.lower(q, k, v, mask).as_text()    # the shard_map
    got = fn(q, k, v, mask)[:B]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6)

  # The trainer's phases set the mesh inside jit instead (sharding.traced_under): "auto" finds
  # it there and the kernel takes the same per-device path, on rows placed over the mesh.
  @jax.jit
  def traced(q, k, v, m):
    with sharding.traced_under(mesh):
      assert attention.resolve_implementation("auto", kv_len=20, dtype=jnp.bfloat16,
                                              head_dim=H, factored=True,
                                              backend="tpu") == "splash"
      return attention.splash_attention(q, k, v, m, interpret=True)

  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
  rows = CausalMask(put(mask.key_valid))
  assert "manual_computation" in traced.lower(put(q), put(k), put(v), rows).as_text()
  got = traced(put(q), put(k), put(v), rows)[:B]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-6)


# ----------------------------------------------------------------------------------------------
# packed rows (segment ids)
# ----------------------------------------------------------------------------------------------


def _segments(t: int) -> np.ndarray:
  """Packed rows: several sequences side by side, padding (0) at the end or nowhere."""
  rows = []
  for lengths in ([5, 4, 2], [t], [1, 1, t - 4]):
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    rows.append(np.pad(ids, (0, t - len(ids)))[:t])
  return np.stack(rows).astype(np.int32)


def _per_sequence_reference(q, k, v, seg):
  """Each sequence of each packed row attended on its own (a causal pass over it alone)."""
  out = np.zeros(q.shape, np.float32)
  for b in range(seg.shape[0]):
    for sid in set(seg[b][seg[b] > 0].tolist()):
      where = np.flatnonzero(seg[b] == sid)
      sl = slice(where[0], where[-1] + 1)
      one = lambda x: x[b:b + 1, sl]
      m = CausalMask(jnp.ones((1, where.size), bool))
      out[b, sl] = attention.xla_attention(one(q), one(k), one(v), m.dense())[0]
  return out


@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash"])
def test_packed_rows_attend_within_their_own_sequence(impl):
  t = 14
  q, k, v = _qkv(3, t)
  seg = _segments(t)
  mask = attention.packed_mask(jnp.asarray(seg))
  fns = {"xla": lambda q, k, v, m: attention.xla_attention(q, k, v, m.dense()),
         "blockwise": _blockwise(4, 3),
         "splash": lambda q, k, v, m: attention.splash_attention(q, k, v, m, interpret=True)}
  got = jax.jit(fns[impl])(q, k, v, mask)
  real = (seg > 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, got, 0), _per_sequence_reference(q, k, v, seg),
                             atol=2e-6)
  # Gradients equal the einsum's with the same (dense, segmented) mask.
  d_out = jnp.asarray(np.random.default_rng(2).normal(size=q.shape) * real, jnp.float32)
  for name, a, b in zip("qkv", _grads(fns[impl], q, k, v, mask, d_out),
                        _grads(fns["xla"], q, k, v, mask, d_out)):
    np.testing.assert_allclose(a, b, atol=5e-6, err_msg=f"d/d{name}")


def test_packed_rows_never_pick_cudnn():
  bf16 = jnp.bfloat16
  assert attention.resolve_implementation("auto", kv_len=64, dtype=bf16, head_dim=128,
                                          factored=True, backend="gpu", segmented=True) == "xla"
  q, k, v = _qkv(0, 8)
  with pytest.raises(ValueError, match="cannot keep packed sequences apart"):
    attention.attention(q, k, v, attention.packed_mask(jnp.ones((B, 8), jnp.int32)),
                        implementation="cudnn")


def test_packed_forward_equals_each_sequence_alone():
  """The decoder on a packed row (positions restart per sequence) gives each sequence the
  logits of its own left-padded pass."""
  model = models.init_model(model_helpers.tiny_model_config(vocab_size=32), seed=0, std=0.3)
  rng = np.random.default_rng(0)
  lengths = [5, 3, 6]
  seqs = [rng.integers(1, 32, n) for n in lengths]
  tokens = np.zeros((1, 16), np.int32)
  seg = np.zeros((1, 16), np.int32)
  start = 0
  for i, s in enumerate(seqs):
    tokens[0, start:start + len(s)], seg[0, start:start + len(s)] = s, i + 1
    start += len(s)
  packed = models.forward(model, jnp.asarray(tokens), jnp.asarray(seg > 0),
                          segment_ids=jnp.asarray(seg))
  np.testing.assert_array_equal(models.decoder.positions_from_segments(jnp.asarray(seg))[0],
                                [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1])
  start = 0
  for s in seqs:
    width = 8
    alone = np.zeros((1, width), np.int32)
    alone[0, width - len(s):] = s                     # left-padded
    want = models.forward(model, jnp.asarray(alone), jnp.asarray(alone > 0))[0, width - len(s):]
    np.testing.assert_allclose(packed[0, start:start + len(s)], want, atol=2e-5)
    start += len(s)
