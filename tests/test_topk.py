"""Fused top-K loss from hidden states against losses.topk_reverse_kl on materialised logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax import losses, sharding, topk

# N = 14 tokens (not a multiple of CT = 4), V = 44 (not a multiple of CV = 8; 11 or 22 per shard).
B, T, D, V, K, CT, CV = 2, 7, 8, 44, 4, 4, 8

OPTIONS = {
    "lsm": dict(),
    "lsm+logp_gap": dict(with_y=True),
    "unnormalized": dict(renormalize=False),
    "teacher+sampled": dict(support="teacher+sampled", with_y=True),
    "ema_pg": dict(renormalize=False, tail="ema_pg", with_y=True),
    "ema_pg+weights": dict(tail="ema_pg", with_y=True, with_blp=True, clip=1.5),
}


def _mesh(shape, axis_type=AxisType.Auto):
  """A (data, fsdp, tensor) mesh, the package's standard axes (the fused defaults name them)."""
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(axis_type,) * 3)


def _data(seed=0, b=B):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  d = dict(hs=f32(b, T, D), ws=f32(D, V), ht=f32(b, T, D) * 1.5, wt=f32(D, V))
  mask = rng.random((b, T)) < 0.7
  mask[0, 0] = True
  y = rng.integers(0, V, size=(b, T))
  # Make some sampled tokens fall inside the teacher's top-K, so both tail branches are taken.
  top = np.asarray(jax.lax.top_k(d["ht"] @ d["wt"], K)[1])
  y[:, ::3] = top[:, ::3, 1]
  d.update(mask=jnp.asarray(mask), y=jnp.asarray(y, jnp.int32),
           blp=jnp.asarray(-3.0 * rng.random((b, T)), jnp.float32))
  return d


def _kwargs(opt, d):
  o = dict(OPTIONS[opt])
  kw = dict(support=o.get("support", "teacher"), renormalize=o.get("renormalize", True),
            tail=o.get("tail", "none"), tail_weight_clip=o.get("clip"))
  kw["sampled_tokens"] = d["y"] if o.get("with_y") else None
  kw["behavior_logprobs"] = d["blp"] if o.get("with_blp") else None
  return kw


def _topk_of_logits(zt, y):
  """TopK built from materialised teacher logits, the reference the fused loss must match."""
  vals, idx = jax.lax.top_k(zt, K)
  sampled = jnp.take_along_axis(zt, y[..., None], axis=-1)[..., 0]
  return topk.TopK(idx, vals, jax.nn.logsumexp(zt, axis=-1), sampled)


@functools.partial(jax.jit, static_argnames=("opt",))
def _plain(hs, ws, ht, wt, mask, y, blp, *, opt):
  kw = _kwargs(opt, dict(y=y, blp=blp))
  f = lambda h, w: losses.topk_reverse_kl(h @ w, ht @ wt, mask, k=K, **kw)
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws)


@functools.partial(jax.jit, static_argnames=("opt", "mesh"))
def _fused(hs, ws, teacher, mask, y, blp, *, opt, mesh=None):
  kw = _kwargs(opt, dict(y=y, blp=blp))
  f = lambda h, w: topk.topk_reverse_kl_from_hidden(h, w, teacher, mask, chunk_tokens=CT,
                                                    chunk_vocab=CV, mesh=mesh, **kw)
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws)


@functools.partial(jax.jit, static_argnames=("mesh", "k", "cv"))
def _teacher(h, w, y, *, mesh=None, k=K, cv=CV):
  return topk.teacher_topk_from_hidden(h, w, k=k, sampled_tokens=y, chunk_tokens=CT,
                                       chunk_vocab=cv, mesh=mesh)


def _assert_same(got, want, atol=2e-6, rtol=2e-5):
  (loss_g, aux_g), grads_g = got
  (loss_w, aux_w), grads_w = want
  np.testing.assert_allclose(loss_g, loss_w, atol=atol, rtol=rtol)
  assert set(aux_g) == set(aux_w)
  for name in aux_w:
    np.testing.assert_allclose(aux_g[name], aux_w[name], atol=atol, rtol=rtol, err_msg=name)
  for g, w in zip(grads_g, grads_w):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(g, w, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def data():
  return _data()


# ----------------------------------------------------------------------------------------------
# teacher side
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", [None, (2, 1, 4)])
def test_teacher_topk_equals_lax_top_k_on_logits(data, mesh_shape):
  mesh = None if mesh_shape is None else _mesh(mesh_shape)
  got = _teacher(data["ht"], data["wt"], data["y"], mesh=mesh)
  want = _topk_of_logits(data["ht"] @ data["wt"], data["y"])
  np.testing.assert_array_equal(got.indices, want.indices)
  assert got.indices.shape == (B, T, K) and got.logsumexp.shape == (B, T)
  for name in ("logits", "logsumexp", "sampled_logits"):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=2e-6, rtol=1e-6)


def test_teacher_topk_accepts_flat_tokens(data):
  got = topk.teacher_topk_from_hidden(data["ht"].reshape(B * T, D), data["wt"], k=K,
                                      chunk_tokens=5, chunk_vocab=16)
  want = _topk_of_logits(data["ht"] @ data["wt"], data["y"])
  np.testing.assert_array_equal(got.indices, want.indices.reshape(B * T, K))
  assert got.sampled_logits is None


@pytest.mark.parametrize("mesh_shape", [None, (1, 1, 4), (2, 1, 2)])
def test_ties_go_to_the_lower_index_across_chunks_and_shards(mesh_shape):
  # Integer hidden states and only 3 distinct unembedding columns: exact float32 ties everywhere,
  # including between columns of different vocabulary chunks and different shards.
  rng = np.random.default_rng(3)
  h = jnp.asarray(rng.integers(-2, 3, size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.integers(-2, 3, size=(D, 3))[:, rng.integers(0, 3, size=V)], jnp.float32)
  mesh = None if mesh_shape is None else _mesh(mesh_shape)
  got = _teacher(h, w, None, mesh=mesh, k=6, cv=6)
  vals, idx = jax.lax.top_k(h @ w, 6)
  np.testing.assert_array_equal(got.indices, idx)
  np.testing.assert_array_equal(got.logits, vals)


# ----------------------------------------------------------------------------------------------
# student side: value, diagnostics and gradients against the plain loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", list(OPTIONS))
def test_fused_loss_and_gradients_equal_plain(data, opt):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  got = _fused(d["hs"], d["ws"], teacher, d["mask"], d["y"], d["blp"], opt=opt)
  want = _plain(d["hs"], d["ws"], d["ht"], d["wt"], d["mask"], d["y"], d["blp"], opt=opt)
  _assert_same(got, want)
  assert float(got[0][1]["kl/teacher_mass"]) < 1.0  # the support is a strict subset


@pytest.mark.parametrize("opt", ["lsm", "ema_pg"])  # the sparse and the dense backward
@pytest.mark.parametrize("mesh_shape,axis_type", [((2, 1, 4), AxisType.Auto),
                                                  ((2, 2, 2), AxisType.Explicit)])
def test_sharded_equals_unsharded(opt, mesh_shape, axis_type):
  d = _data(seed=1, b=3)  # 21 tokens: not a multiple of the data-parallel size
  mesh = _mesh(mesh_shape, axis_type)
  teacher = _teacher(d["ht"], d["wt"], d["y"])
  want = _fused(d["hs"], d["ws"], teacher, d["mask"], d["y"], d["blp"], opt=opt)
  args = (d["hs"], d["ws"], teacher, d["mask"], d["y"], d["blp"])
  if axis_type == AxisType.Explicit:
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    args = (put(d["hs"]), put(d["ws"], None, "tensor")) + args[2:]
    with jax.set_mesh(mesh):
      got = _fused(*args, opt=opt, mesh=mesh)
    assert got[1][1].sharding.spec == P(None, "tensor")  # the gradient stays vocabulary-sharded
  else:
    got = _fused(*args, opt=opt, mesh=mesh)
  _assert_same(got, want)


@functools.partial(jax.jit, static_argnames=("opt", "mesh"))
def _fused_statistics(hs, ws, teacher, mask, y, blp, statistics, *, opt, mesh=None):
  kw = _kwargs(opt, dict(y=y, blp=blp))
  f = lambda h, w: topk.topk_reverse_kl_from_hidden(
      h, w, teacher, mask, chunk_tokens=CT, chunk_vocab=CV, mesh=mesh, statistics=statistics,
      **kw)
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws)


@pytest.mark.parametrize("opt,mesh_shape", [("lsm", None), ("teacher+sampled", (2, 1, 4)),
                                            ("ema_pg", None)])
def test_statistics_off_gives_the_same_loss_and_gradients(opt, mesh_shape):
  # Without the sweep the forward gathers the support's rows: same loss and gradients, and the
  # diagnostics that read the sweep are NaN (traced flag) or left out (static False). A loss
  # that needs the logsumexp (the EMA-PG tail) sweeps whatever the flag says.
  d = _data(seed=3, b=3)
  mesh = None if mesh_shape is None else _mesh(mesh_shape)
  teacher = _teacher(d["ht"], d["wt"], d["y"])
  args = (d["hs"], d["ws"], teacher, d["mask"], d["y"], d["blp"])
  want = _fused(*args, opt=opt)
  _assert_same(_fused_statistics(*args, jnp.asarray(True), opt=opt, mesh=mesh), want)
  (loss, aux), grads = _fused_statistics(*args, jnp.asarray(False), opt=opt, mesh=mesh)
  (loss_w, aux_w), grads_w = want
  np.testing.assert_allclose(loss, loss_w, atol=2e-6, rtol=2e-5)
  for g, w in zip(grads, grads_w):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=2e-5)
  assert set(aux) == set(aux_w)
  for name in aux_w:
    if name in topk.STATISTICS and opt != "ema_pg":
      assert np.isnan(aux[name]), name
    else:
      np.testing.assert_allclose(aux[name], aux_w[name], atol=2e-6, rtol=2e-5, err_msg=name)
  kw = _kwargs(opt, d)
  (loss_s, aux_s), _ = topk.topk_reverse_kl_from_hidden(
      d["hs"], d["ws"], teacher, d["mask"], chunk_tokens=CT, chunk_vocab=CV, statistics=False,
      **kw), None
  np.testing.assert_allclose(loss_s, loss_w, atol=2e-6, rtol=2e-5)
  left_out = set(topk.STATISTICS) & set(aux_w) if opt != "ema_pg" else set()
  assert set(aux_s) == set(aux_w) - left_out


def _shard_map_in_specs(jaxpr):
  """The in_specs of every shard_map in a (closed) jaxpr, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      found.append(tuple(eqn.params["in_specs"]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(sub, "eqns"):
          found += _shard_map_in_specs(sub)
  return found


def test_standard_mesh_splits_tokens_over_data_and_fsdp():
  # The defaults split tokens over BATCH_AXES = (data, fsdp), the vocabulary over tensor.
  mesh = sharding.make_mesh(2, 2, 2)
  d = _data(seed=2, b=4)  # 28 tokens: 7 per (data, fsdp) shard, one batch row each
  got = _teacher(d["ht"], d["wt"], d["y"], mesh=mesh)
  want = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  np.testing.assert_array_equal(got.indices, want.indices)
  for name in ("logits", "logsumexp", "sampled_logits"):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=2e-6, rtol=1e-6)
  assert {s.data.shape for s in got.logsumexp.addressable_shards} == {(1, T)}
  # The dense backward (every option in play); test_sharded_equals_unsharded has the sparse one.
  args, opt = (d["hs"], d["ws"], want, d["mask"], d["y"], d["blp"]), "ema_pg+weights"
  _assert_same(_fused(*args, opt=opt, mesh=mesh), _fused(*args, opt=opt))
  jaxpr = jax.make_jaxpr(functools.partial(_fused.__wrapped__, opt=opt, mesh=mesh))(*args)
  specs = _shard_map_in_specs(jaxpr.jaxpr)
  assert len(specs) == 2  # the forward and the backward pass
  for spec in specs:
    assert spec[0] == P(("data", "fsdp"), None) and spec[1] == P(None, "tensor"), spec


@pytest.mark.parametrize("where", ["student_hidden", "teacher_logits", "teacher_logsumexp"])
def test_nan_at_a_counted_position_makes_the_fused_loss_nan(data, where):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  hs = d["hs"]
  if where == "student_hidden":
    hs = hs.at[0, 0, 3].set(jnp.nan)
  elif where == "teacher_logits":
    teacher = teacher._replace(logits=teacher.logits.at[0, 0, K - 1].set(jnp.nan))
  else:
    teacher = teacher._replace(logsumexp=teacher.logsumexp.at[0, 0].set(jnp.nan))
  assert d["mask"][0, 0]
  for opt in OPTIONS:
    assert np.isnan(_fused(hs, d["ws"], teacher, d["mask"], d["y"], d["blp"], opt=opt)[0][0]), opt
  eager, _ = topk.topk_reverse_kl_from_hidden(hs, d["ws"], teacher, d["mask"], chunk_tokens=CT,
                                              chunk_vocab=CV, **_kwargs("ema_pg+weights", d))
  assert np.isnan(eager)


def test_nan_behaviour_logprob_at_a_counted_tail_position_makes_the_loss_nan(data):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  outside = ~np.any(np.asarray(teacher.indices) == np.asarray(d["y"])[..., None], axis=-1)
  b, t = np.argwhere(outside & np.asarray(d["mask"]))[0]
  blp = d["blp"].at[b, t].set(jnp.nan)
  got = _fused(d["hs"], d["ws"], teacher, d["mask"], d["y"], blp, opt="ema_pg+weights")
  assert np.isnan(got[0][0])


def test_masked_positions_cost_nothing(data):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  ref = _fused(d["hs"], d["ws"], teacher, d["mask"], d["y"], d["blp"], opt="ema_pg")
  # Garbage (NaN / inf / out-of-range ids) at masked positions must change nothing at all.
  m = ~d["mask"]
  bad = lambda x, v: jnp.where(m.reshape(m.shape + (1,) * (x.ndim - 2)), v, x)
  hs = bad(d["hs"], jnp.nan)
  teacher = topk.TopK(bad(teacher.indices, V + 7), bad(teacher.logits, jnp.inf),
                      bad(teacher.logsumexp, jnp.nan), bad(teacher.sampled_logits, -jnp.inf))
  got = _fused(hs, d["ws"], teacher, d["mask"], bad(d["y"], -1), bad(d["blp"], jnp.nan),
               opt="ema_pg")
  _assert_same(got, ref, atol=0, rtol=0)
  dh = np.asarray(got[1][0])
  assert np.all(dh[np.asarray(m)] == 0) and np.all(np.isfinite(got[1][1]))
  empty = _fused(hs, d["ws"], teacher, jnp.zeros_like(d["mask"]), d["y"], d["blp"], opt="lsm")
  assert float(empty[0][0]) == 0.0 and not np.any(empty[1][0]) and not np.any(empty[1][1])


def test_memory_does_not_scale_with_tokens_times_vocab():
  # Compile only: the fused loss + gradient must not hold anything of size N × V.
  n, d, v = 4096, 64, 32768
  s = jax.ShapeDtypeStruct
  f = lambda h, w, t, m: topk.topk_reverse_kl_from_hidden(h, w, t, m, renormalize=False,
                                                          chunk_tokens=512, chunk_vocab=2048)[0]
  teacher = topk.TopK(s((n, 32), jnp.int32), s((n, 32), jnp.float32), s((n,), jnp.float32))
  compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(
      s((n, d), jnp.float32), s((d, v), jnp.float32), teacher, s((n,), bool)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < n * v * 4 / 20


@pytest.mark.parametrize("kwargs,match", [
    (dict(support="student"), r"support 'student' .*accepted: teacher, teacher\+sampled "
                              r"\(student supports .*losses.topk_reverse_kl"),
    (dict(tail="ema"), "unknown tail"),
    (dict(tail="ema_pg"), "needs sampled_tokens"),
    (dict(chunk_vocab=2), r"k must be .*chunk_vocab = 2"),
    (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(mesh="tensor3"), "divisible by the size 3"),
    (dict(mesh="no_tensor_axis"), r"mesh axis 'tensor' \(tensor_axis='tensor'\)"),
    (dict(mesh="no_fsdp_axis"), r"mesh axis 'fsdp' \(data_axis=\('data', 'fsdp'\)\).*make_mesh"),
    (dict(renormalize=np.bool_(True), chunk_tokens=2.0), "chunk_tokens must be a positive int"),
    (dict(renormalize="yes"), "renormalize must be True or False"),
    (dict(sampled_tokens="no_teacher_logits"), "sampled_logits"),
    (dict(tail_weight_clip=0.0), "tail_weight_clip"),
])
def test_bad_options_raise(data, kwargs, match):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  if kwargs.get("mesh") == "tensor3":
    kwargs["mesh"] = sharding.make_mesh(2, 1, 3, devices=jax.devices()[:6])
  elif kwargs.get("mesh") == "no_tensor_axis":
    kwargs["mesh"] = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  elif kwargs.get("mesh") == "no_fsdp_axis":
    kwargs["mesh"] = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  if kwargs.get("sampled_tokens") == "no_teacher_logits":
    kwargs["sampled_tokens"], teacher = d["y"], teacher._replace(sampled_logits=None)
  with pytest.raises(ValueError, match=match):
    topk.topk_reverse_kl_from_hidden(d["hs"], d["ws"], teacher, d["mask"], **kwargs)
  with pytest.raises(ValueError, match="teacher_topk.indices"):
    topk.topk_reverse_kl_from_hidden(d["hs"], d["ws"], teacher._replace(
        indices=teacher.indices[:1]), d["mask"])


@pytest.mark.parametrize("field,value,match", [
    ("indices", lambda x: x.astype(jnp.float32), "teacher_topk.indices must have an integer"),
    ("logits", lambda x: x.astype(jnp.int32), "teacher_topk.logits must have a floating"),
    ("mask", lambda x: x.astype(jnp.float32), "mask must have dtype bool"),
    ("sampled_tokens", lambda x: x.astype(jnp.float32), "sampled_tokens must have an integer"),
    ("student_hidden", lambda x: x.astype(jnp.int32), "hidden must have a floating"),
])
def test_bad_dtypes_raise(data, field, value, match):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  args = dict(student_hidden=d["hs"], student_unembed=d["ws"], teacher_topk=teacher,
              mask=d["mask"], sampled_tokens=d["y"])
  if field in ("indices", "logits"):
    args["teacher_topk"] = teacher._replace(**{field: value(getattr(teacher, field))})
  else:
    args[field] = value(args[field])
  with pytest.raises(ValueError, match=match):
    topk.topk_reverse_kl_from_hidden(**args)


def test_options_traced_under_jit_say_how_to_make_them_static(data):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  with pytest.raises(ValueError, match=r"k must be a static.*static_argnames=\('k',\)"):
    jax.jit(lambda h, w, k: topk.teacher_topk_from_hidden(h, w, k=k))(d["ht"], d["wt"], K)
  with pytest.raises(ValueError, match=r"static_argnames=\('chunk_vocab',\)"):
    jax.jit(lambda h, w, c: topk.teacher_topk_from_hidden(h, w, k=K, chunk_vocab=c))(
        d["ht"], d["wt"], CV)
  fused = lambda h, w, **kw: topk.topk_reverse_kl_from_hidden(h, w, teacher, d["mask"], **kw)
  with pytest.raises(ValueError, match=r"renormalize must be a static.*'renormalize',\)"):
    jax.jit(lambda h, w, r: fused(h, w, renormalize=r))(d["hs"], d["ws"], True)
  with pytest.raises(ValueError, match=r"tail_weight_clip must be a static.*'tail_weight_clip',"):
    jax.jit(lambda h, w, c: fused(h, w, tail="ema_pg", sampled_tokens=d["y"],
                                  tail_weight_clip=c))(d["hs"], d["ws"], 2.0)


def test_bfloat16_inputs_are_computed_in_float32(data):
  d = data
  teacher = _topk_of_logits(d["ht"] @ d["wt"], d["y"])
  hs, ws = d["hs"].astype(jnp.bfloat16), d["ws"].astype(jnp.bfloat16)
  got = _fused(hs, ws, teacher, d["mask"], d["y"], d["blp"], opt="unnormalized")
  (loss, _), grads = _fused(hs.astype(jnp.float32), ws.astype(jnp.float32), teacher, d["mask"],
                            d["y"], d["blp"], opt="unnormalized")
  assert got[0][0].dtype == jnp.float32 and got[1][1].dtype == jnp.bfloat16
  np.testing.assert_allclose(got[0][0], loss, rtol=1e-6)
  for g, want in zip(got[1], grads):
    np.testing.assert_array_equal(g, want.astype(jnp.bfloat16))
