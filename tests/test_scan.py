"""Stacked, scanned decoder layers: a per-layer brute-force reference, remat policies, HF I/O."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec
from safetensors.numpy import load_file

import model_helpers as mh
from opd_jax import models
from opd_jax.models import hf_io

B, T = 4, 12
# Every per-layer feature on at once: q/k/v and o biases, MLP biases, q/k RMSNorm (Qwen3),
# grouped-query attention, a head dimension other than D / N.
FULL = dict(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=48,
            num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, o_bias=True,
            mlp_bias=True, qk_norm=True, rope_theta=10000.0)


def _random_model(config, seed=0):
  """init_model, then every parameter (norm scales and biases too) redrawn at random."""
  graphdef, state = nnx.split(models.init_model(config, seed=seed))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    base = 1.0 if str(path[-1]) == "weight" else 0.0      # norm scales around 1
    flat.append((path, var.replace(jnp.asarray(
        base + 0.3 * rng.standard_normal(var.shape), var[...].dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------------
# brute force: the layers one after another, in float64 numpy, from the stacked parameters
# ----------------------------------------------------------------------------------------------


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
  """x [B, T, heads, H] rotated by rotary position pos [B, T] (halves convention)."""
  h = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  ang = pos[..., None].astype(np.float64) * inv                       # [B, T, H/2]
  cos, sin = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
  a, b = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _reference_logits(model, tokens, mask):
  c = model.config
  p = {tuple(map(str, k)): np.asarray(v[...], np.float64)
       for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  pos = mh.positions(mask)
  x = p[("embed_tokens", "embedding")][tokens]
  n, kv, h = c.num_heads, c.num_kv_heads, c.head_dim
  allowed = np.tril(np.ones((T, T), bool))[None] & mask[:, None, :]   # [B, Tq, Tk]
  for layer in range(c.num_layers):
    w = lambda *name: p[("layers",) + name][layer]    # this layer's slice of the stack
    lin = lambda x, *m: x @ w(*m, "kernel") + w(*m, "bias")
    y = _rms(x, w("input_layernorm", "weight"), c.rms_norm_eps)
    q = lin(y, "self_attn", "q_proj").reshape(B, T, n, h)
    k = lin(y, "self_attn", "k_proj").reshape(B, T, kv, h)
    v = lin(y, "self_attn", "v_proj").reshape(B, T, kv, h)
    q = _rms(q, w("self_attn", "q_norm", "weight"), c.rms_norm_eps)
    k = _rms(k, w("self_attn", "k_norm", "weight"), c.rms_norm_eps)
    q, k = _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta)
    out = np.zeros((B, T, n, h))
    for head in range(n):
      g = head // (n // kv)                          # the key/value head this query head reads
      s = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, g]) / np.sqrt(h)
      s = np.where(allowed, s, -1e300)                # exp() of it is 0 (uniform if all)
      s = np.exp(s - s.max(-1, keepdims=True))
      s /= s.sum(-1, keepdims=True)
      out[:, :, head] = np.einsum("bts,bsh->bth", s, v[:, :, g])
    x = x + lin(out.reshape(B, T, n * h), "self_attn", "o_proj")
    y = _rms(x, w("post_attention_layernorm", "weight"), c.rms_norm_eps)
    gate, up = lin(y, "mlp", "gate_proj"), lin(y, "mlp", "up_proj")
    x = x + lin(gate / (1.0 + np.exp(-gate)) * up, "mlp", "down_proj")
  x = _rms(x, p[("norm", "weight")], c.rms_norm_eps)
  return x @ p[("lm_head", "kernel")]


def test_scanned_layers_equal_a_per_layer_reference():
  model = _random_model(models.ModelConfig(**FULL), seed=1)
  assert model.layers.self_attn.q_proj.kernel[...].shape == (3, 32, 64)   # [L, D, N*H]
  tokens, mask = mh.left_padded_batch(0, B, T, 128)
  got = np.asarray(jax.jit(lambda s: models.forward(nnx.merge(*s), tokens, mask))(
      nnx.split(model)))
  want = _reference_logits(model, tokens, mask)
  assert np.abs(want[mask]).max() > 1.0
  np.testing.assert_allclose(got[mask], want[mask], atol=2e-4, rtol=1e-5)


def test_program_size_does_not_grow_with_depth():
  """One scan over the layers: the traced program of 2 and 6 layers has the same equations."""
  tokens, mask = mh.left_padded_batch(0, B, T, 128)

  def eqns(num_layers):
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: models.Decoder(models.ModelConfig(**{**FULL, "num_layers": num_layers}))))
    jaxpr = jax.make_jaxpr(lambda s: models.forward(nnx.merge(graphdef, s), tokens, mask))(state)
    return [e.primitive.name for e in jaxpr.eqns]

  two, six = eqns(2), eqns(6)
  assert two == six and two.count("scan") == 1


def test_unstacked_layers_are_the_slices_of_the_stacked_parameters():
  model = _random_model(models.ModelConfig(**FULL), seed=4)
  layers = models.decoder.unstack_layers(model)
  assert len(layers) == FULL["num_layers"]
  stacked = dict(nnx.to_flat_state(nnx.state(model.layers)))
  for i, layer in enumerate(layers):
    flat = dict(nnx.to_flat_state(nnx.state(layer)))
    assert flat.keys() == stacked.keys()
    for path, var in flat.items():
      np.testing.assert_array_equal(var[...], stacked[path][...][i])


def _decode_loop(model, tokens, mask, steps, *, hoist):
  """Prefill, then `steps` greedy decode steps in a fori_loop; the layers sliced once before
  the loop (hoist) or inside every step."""
  graphdef, state = nnx.split(model)

  def run(state):
    m = nnx.merge(graphdef, state)
    cache = models.init_cache(m.config, tokens.shape[0], tokens.shape[1] + steps)
    hidden, cache = models.prefill(m, tokens, mask, cache, return_hidden=True)
    layers = models.decoder.unstack_layers(m) if hoist else None

    def body(i, carry):
      hidden, cache, out = carry
      logits = models.logits_from_hidden(m, hidden)
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      hidden, cache = models.decode_step(m, tok, cache, return_hidden=True, layers=layers)
      return hidden, cache, out.at[:, i].set(logits)

    out = jnp.zeros((tokens.shape[0], steps, m.config.vocab_size), jnp.float32)
    return jax.lax.fori_loop(0, steps, body, (hidden[:, -1], cache, out))[2]
  return jax.jit(run), state


def test_decode_loop_reads_weights_and_cache_without_copies():
  """Inside a compiled decode loop no layer's weights or cache are copied: with the layers
  sliced once before the loop, the loop body holds no slice of a stacked [L, ...] parameter and
  no copy of a cache array (a scan over the stacked layers, or slicing inside the loop, copies
  every layer's kernels at every step). Both ways give the same logits, and each matches the
  full pass."""
  model = _random_model(models.ModelConfig(**FULL), seed=5)
  tokens, mask = mh.left_padded_batch(1, B, T, 128)
  steps = 3
  hoisted, state = _decode_loop(model, tokens, mask, steps, hoist=True)
  sliced, _ = _decode_loop(model, tokens, mask, steps, hoist=False)
  got = np.asarray(hoisted(state))
  np.testing.assert_allclose(got, np.asarray(sliced(state)), atol=1e-5, rtol=0)
  # Greedy continuation: the full pass over prompt + chosen tokens gives the same logits.
  chosen = got.argmax(-1).astype(np.int32)
  full_tokens = np.concatenate([tokens, chosen[:, :-1]], axis=1)
  full_mask = np.concatenate([mask, np.ones((B, steps - 1), bool)], axis=1)
  want = np.asarray(jax.jit(lambda s: models.forward(nnx.merge(*s), full_tokens, full_mask))(
      nnx.split(model)))[:, T - 1:]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  def loop_body_ops(fn):
    hlo = fn.lower(state).compile().as_text()
    bodies = [c for c in hlo.split("\n\n") if "while/body" in c]
    return "\n".join(bodies)
  L, d, f = FULL["num_layers"], FULL["hidden_size"], FULL["intermediate_size"]
  stacked_kernel = f"f32[{L},{d},{f}]"
  # The check itself can fail: slicing inside the loop shows the stacked kernel in the body.
  assert stacked_kernel in loop_body_ops(sliced)
  body = loop_body_ops(hoisted)
  assert stacked_kernel not in body
  s, k, h = T + steps, FULL["num_kv_heads"], FULL["head_dim"]
  for shape in ((B, k, s, h), (B, k, h, s)):        # one layer's keys, values
    copied = re.compile(rf"= f32\[{','.join(map(str, shape))}\]\S* copy\(")
    assert "dynamic-update-slice" in body and not copied.search(body), shape


# ----------------------------------------------------------------------------------------------
# rematerialisation
# ----------------------------------------------------------------------------------------------


def _loss_and_grads(config):
  model = _random_model(config, seed=2)
  graphdef, params = nnx.split(model)
  tokens, mask = mh.left_padded_batch(0, B, T, 128)
  targets = np.roll(tokens, -1, axis=1)

  def loss(params):
    logits = models.forward(nnx.merge(graphdef, params), tokens, mask)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0)) / mask.sum()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  # What the backward pass keeps from the forward pass: the arrays the vjp closes over.
  vjp = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
  residual_shapes = [x.shape for x in jax.tree.leaves(vjp)]
  return value, grads, residual_shapes


@pytest.mark.slow  # keeps `make test` under 10 minutes; `make test-all` runs it
def test_remat_policies_give_the_same_loss_and_gradients():
  base = models.ModelConfig(**FULL)
  out = {r: _loss_and_grads(dataclasses.replace(base, remat=r)) for r in ("none", "dots", "full")}
  v0, g0, _ = out["none"]
  for remat in ("dots", "full"):
    v, g, _ = out[remat]
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    # Recomputation may reorder float32 sums: equal up to rounding relative to the largest entry.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), g, g0)
  # The policies differ in what the backward pass keeps: without remat the attention
  # probabilities [L, B, K, G, T, T] are saved; "dots" keeps the projections' outputs but not
  # those; "full" keeps per layer only its [B, T, D] input, nothing of the MLP width.
  scores = lambda shapes: [s for s in shapes if len(s) == 6 and s[-2:] == (T, T)]
  # The MLP's [B, T, I] activations per layer, or [B * T, I] (Linear flattens leading dims).
  mlp_wide = lambda shapes: [s for s in shapes if len(s) >= 3 and s[0] == 3 and s[-1] == FULL[
      "intermediate_size"] and int(np.prod(s[1:-1])) == B * T]
  sizes = {r: sum(int(np.prod(s)) for s in out[r][2]) for r in out}
  assert scores(out["none"][2]) and not scores(out["dots"][2]) and not scores(out["full"][2])
  assert mlp_wide(out["dots"][2]) and not mlp_wide(out["full"][2])
  assert sizes["none"] > sizes["dots"] > sizes["full"]


def test_remat_setting_is_validated_and_not_written_to_config_json():
  with pytest.raises(ValueError, match=r"remat='some' is not a rematerialisation policy; "
                                       r"accepted: none, dots, full"):
    mh.tiny_model_config(remat="some")
  config = mh.tiny_model_config(remat="full")
  assert "remat" not in models.config_to_hf(config)
  assert models.config_from_hf(models.config_to_hf(config)) == dataclasses.replace(
      config, remat="none")


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints: layers unstacked on save, stacked on load
# ----------------------------------------------------------------------------------------------


def test_hf_tensor_names_of_stacked_parameters():
  path = ("layers", "self_attn", "q_proj", "kernel")
  assert hf_io.hf_tensor_name(path, 3) == ("model.layers.3.self_attn.q_proj.weight", True)
  assert hf_io.hf_tensor_name(("layers", "mlp", "up_proj", "bias"), 0) == (
      "model.layers.0.mlp.up_proj.bias", False)
  assert hf_io.hf_tensor_name(("norm", "weight")) == ("model.norm.weight", False)
  with pytest.raises(ValueError, match="layer=None for the parameter layers.self_attn"):
    hf_io.hf_tensor_name(path)
  with pytest.raises(ValueError, match="layer=2 for the parameter norm.weight"):
    hf_io.hf_tensor_name(("norm", "weight"), 2)


def test_save_unstacks_and_load_restacks_layers(tmp_path):
  # Llama with every bias, so that all kinds of layer parameters cross the checkpoint; small
  # files so that one layer's tensors are spread over several of them.
  config = models.ModelConfig(**{**FULL, "model_type": "llama", "qk_norm": False,
                                 "num_layers": 4, "remat": "dots"})
  model = _random_model(config, seed=3)
  models.save_hf_checkpoint(model, config, tmp_path, max_shard_bytes=20_000)
  files = sorted(tmp_path.glob("model-*.safetensors"))
  assert len(files) > 4
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
  q = np.asarray(model.layers.self_attn.q_proj.kernel[...])
  down_bias = np.asarray(model.layers.mlp.down_proj.bias[...])
  for i in range(4):
    np.testing.assert_array_equal(tensors[f"model.layers.{i}.self_attn.q_proj.weight"], q[i].T)
    np.testing.assert_array_equal(tensors[f"model.layers.{i}.mlp.down_proj.bias"], down_bias[i])
  assert not any(".layers.4." in n for n in tensors)

  again, config_again = models.load_hf_checkpoint(tmp_path)
  assert config_again == dataclasses.replace(config, remat="none")
  want = nnx.state(model, nnx.Param)
  assert jax.tree.structure(nnx.state(again, nnx.Param)) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(nnx.state(again, nnx.Param)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)

  # On a mesh every device reads its slices of every layer straight into the stacked array.
  mesh = jax.make_mesh((2, 2, 2), models.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  sharded, _ = models.load_hf_checkpoint(tmp_path, mesh=mesh)
  k = sharded.layers.self_attn.k_proj.kernel[...]
  assert k.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  assert k.addressable_shards[0].data.shape == (4, 16, 16)
  for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  # Saving the sharded model gives the same files' contents.
  models.save_hf_checkpoint(sharded, config, tmp_path / "again")
  resaved = load_file(tmp_path / "again" / "model.safetensors")
  assert resaved.keys() == tensors.keys()
  for name, x in tensors.items():
    np.testing.assert_array_equal(resaved[name], x, err_msg=name)


def test_load_names_a_missing_layer_tensor(tmp_path):
  config = models.ModelConfig(**{**FULL, "model_type": "llama", "qk_norm": False})
  models.save_hf_checkpoint(_random_model(config), config, tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  del tensors["model.layers.2.mlp.gate_proj.weight"]
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(models.CheckpointError,
                     match=r"lacks 1 tensors .*: model\.layers\.2\.mlp\.gate_proj\.weight"):
    models.load_hf_checkpoint(tmp_path)


def test_trainer_remat_setting_reaches_the_student_config():
  from opd_jax import configs, programs, settings  # pylint: disable=import-outside-toplevel
  m = configs.model_fields()
  m.remat = "full"
  source = settings.ModelSource.from_config(m, "model")
  assert programs.model_config_of(source, 32).remat == "full"
  m.remat = "all"
  with pytest.raises(settings.ConfigError, match=r"config.model.remat='all' is not accepted; "
                                                 r"accepted: none, dots, full"):
    settings.ModelSource.from_config(m, "model")
