"""Brute-force numpy references for the estimators, written independently of opd_jax.losses."""

import numpy as np


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def kl(logp, logq):
  """Σ p (log p − log q) over the last axis for one distribution pair, 0·log 0 = 0."""
  total = 0.0
  for lp, lq in zip(logp, logq):
    if lp == -np.inf:
      continue
    total += np.exp(lp) * (lp - lq)
  return total


def token_mean(values, mask):
  n = mask.sum()
  return float((values * mask).sum() / max(n, 1)), n


def full_reverse_kl(s, t, mask):
  lp, lq = log_softmax(s), log_softmax(t)
  b, tt, _ = s.shape
  vals = np.zeros((b, tt))
  for i in range(b):
    for j in range(tt):
      vals[i, j] = kl(lp[i, j], lq[i, j])
  return token_mean(vals, mask)[0]


def topk_indices(x, k):
  return list(np.argsort(-np.asarray(x, np.float64), kind="stable")[:k])


def topk_reverse_kl(s, t, mask, k, support="teacher", renormalize=True, tail="none", y=None,
                    behavior=None, clip=None):
  """Per position: build the support as a python list, then evaluate the loss by definition."""
  lp_full, lq_full = log_softmax(s), log_softmax(t)
  b, tt, _ = s.shape
  vals = np.zeros((b, tt))
  for i in range(b):
    for j in range(tt):
      base = topk_indices(t[i, j] if support.startswith("teacher") else s[i, j], k)
      sup = list(base)
      if support.endswith("+sampled") and y[i, j] not in sup:
        sup.append(int(y[i, j]))
      if renormalize:
        lp = log_softmax(s[i, j, sup])
        lq = log_softmax(t[i, j, sup])
      else:
        lp = lp_full[i, j, sup]
        lq = lq_full[i, j, sup]
      v = kl(lp, lq)
      if tail == "ema_pg" and y[i, j] not in base:
        w = 1.0 if behavior is None else np.exp(lp_full[i, j, y[i, j]] - behavior[i, j])
        if clip is not None:
          w = min(w, clip)
        v += w * (lp_full[i, j, y[i, j]] - lq_full[i, j, y[i, j]])
      vals[i, j] = v
  return token_mean(vals, mask)[0]


def reward_to_go(r, mask, gamma):
  r = np.where(mask, r, 0.0)
  out = np.zeros_like(r, dtype=np.float64)
  tt = r.shape[-1]
  for t in range(tt):
    out[..., t] = sum(gamma ** (u - t) * r[..., u] for u in range(t, tt))
  return np.where(mask, out, 0.0)
