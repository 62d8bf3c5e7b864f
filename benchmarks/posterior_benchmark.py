"""Where does the posterior pay off? blrax against tuned AdamW baselines.

Tasks (scikit-learn's bundled sets and synthetic data; each seed its own
stratified 60/20/20 train/validation/test split, features standardised on the
training split):

========== ======================================================= ==========
task       data                                                    model
========== ======================================================= ==========
digits     8x8 digits, all 1078 training images                    MLP 128-128
digits25   25% of them (269)                                       MLP 128-128
digits10   10% (107)                                               MLP 128-128
cancer     breast cancer (341 training rows, 30 features)          MLP 64-64
wine       wine (106 rows, 13 features, 3 classes)                 MLP 64-64
moons      2-D two moons (300 rows) + an OOD ring at radius 4-6    MLP 64-64
diabetes   diabetes regression (265 rows)                          MLP 64-64
gap1d      1-D regression, x in [-3,-1] U [1,3]; test on [-3, 3]   MLP 64-64
========== ======================================================= ==========

Every run takes the same number of steps (``--steps``, batch 32, cosine
decay): many epochs on these small sets, the regime where a point estimate
overfits. Methods, all selected on the same validation split:

- ``adamw``: a grid of learning rate x weight decay (``ADAMW_GRID``), each
  with early stopping on the validation NLL (the params of the best epoch);
  the config with the best validation NLL is kept.
- ``adamw+ts``: the same network with a temperature fitted on the validation
  logits (:func:`blrax.uncertainty.fit_temperature`); for regression the
  observation noise is fitted on the validation residuals for every method.
- ``ensemble``: 5 members of the chosen AdamW config (early stopping each).
- ``ivon``: ``blrax.ivon`` with its documented defaults and ``ess`` = the
  training-set size; the learning rate and weight decay from a grid of the
  same size as AdamW's (``IVON_GRID``), chosen by the validation NLL of the
  mean. Reported at the mean (``ivon/mean``), as the model average of the
  posterior as trained (``ivon/bma``), calibrated
  (:func:`blrax.calibrate_posterior` on the validation split:
  ``ivon/cal``) and with the linearised predictive of the calibrated
  posterior (``ivon/lin``, its temperature fitted for the linearised
  predictive: ``calibrate_posterior(..., linearized=True)``).
- ``von``, ``vogn``, ``evon``: documented defaults and starting learning
  rates, calibrated (classification only); VOGN's squared per-example
  gradients from :func:`blrax.value_grads_and_squares` (``hessian=``).

Metrics on the test split, mean over the seeds: accuracy, NLL, ECE (15
bins), the AUROC of the predictive entropy for telling the test split from
out-of-distribution inputs (moons: the ring; other classification tasks:
their test inputs with the feature order reversed), the 90% interval
coverage and NLL for regression (standardised targets), and the training
cost of one run relative to one AdamW run (execution time of the compiled
training program, this machine, same process; an ensemble costs 5 runs).

    python benchmarks/posterior_benchmark.py [--tasks ...] [--seeds 0 1 2]
        [--steps 2000] [--out benchmarks/results/posterior_benchmark]

or, on 2 cores, two halves side by side and then the table from both:

    python benchmarks/posterior_benchmark.py --tasks digits digits25 \
        digits10 moons --out /tmp/a &
    python benchmarks/posterior_benchmark.py --tasks cancer wine diabetes \
        gap1d --out /tmp/b; wait
    python benchmarks/posterior_benchmark.py --merge /tmp/a.json /tmp/b.json

writes ``<out>.md`` (the table), ``<out>.json`` (every number) and
``<out>.png`` (NLL per task and method). ``--smoke`` runs a tiny version
(CI); ``--wide-grids`` tunes both harder (12 points each; IVON's grid adds
``b2`` = 0.999); ``--selection one_se`` calibrates by the one-standard-error
rule.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

import blrax

BATCH = 32
NUM_SAMPLES = 32
ENSEMBLE = 5
ADAMW_GRID = tuple((lr, wd) for lr in (1e-3, 3e-3, 1e-2) for wd in (1e-4, 1e-2))
IVON_GRID = tuple((lr, wd) for lr in (0.03, 0.1, 0.3) for wd in (1e-4, 1e-3))
# Squared-error losses are not scale-free: IVON's step is SGD-like there.
IVON_REGRESSION_GRID = tuple((lr, wd) for lr in (1e-3, 3e-3, 1e-2)
                             for wd in (1e-4, 1e-3))
# --wide-grids: 12 points each; IVON's add b2 = 0.999, whose curvature EMA
# (1/(1-b2) = 1000 steps) moves within the run (configs are (lr, wd,
# ensemble member, b2)).
IVON_B2 = inspect.signature(blrax.ivon).parameters["b2"].default
WIDE_ADAMW_GRID = tuple((lr, wd) for lr in (3e-4, 1e-3, 3e-3, 1e-2)
                        for wd in (1e-4, 1e-2, 1e-1))
WIDE_IVON_GRID = tuple((lr, wd, 0, b2) for lr, wd in IVON_GRID
                       for b2 in (IVON_B2, 0.999))
WIDE_IVON_REGRESSION_GRID = tuple((lr, wd, 0, b2)
                                  for lr, wd in IVON_REGRESSION_GRID
                                  for b2 in (IVON_B2, 0.999))
# The documented starting learning rates (benchmarks/digits_family.py).
FAMILY = {"von": 0.3, "vogn": 0.3, "evon": 1e-3}
IVON_OPTIONS: dict = {}  # --ivon-options, for experiments
CALIBRATION: dict = {}  # --selection
IVON_EARLY_STOPPING = {"on": False}  # --ivon-early-stopping
# What defines a run besides its tasks: kept when runs are merged, and named
# in the table's first line when not the default.
RUN_OPTIONS = ("seeds", "steps", "family", "wide_grids", "selection",
               "ivon_options", "ivon_early_stopping")
TASKS = ("digits", "digits25", "digits10", "cancer", "wine", "moons",
         "diabetes", "gap1d")


# ----------------------------------------------------------------- data


def _standardise(train, *others):
  mean, std = train.mean(0), train.std(0) + 1e-8
  return [(a - mean) / std for a in (train,) + others]


def _split(x, y, seed, stratify=True):
  strat = y if stratify else None
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y, test_size=0.2, random_state=seed, stratify=strat)
  strat = y_rest if stratify else None
  x_train, x_val, y_train, y_val = train_test_split(
      x_rest, y_rest, test_size=0.25, random_state=seed, stratify=strat)
  return x_train, y_train, x_val, y_val, x_test, y_test


def _fraction(x, y, frac, seed):
  if frac >= 1.0:
    return x, y
  x, _, y, _ = train_test_split(x, y, train_size=frac, random_state=seed,
                                stratify=y)
  return x, y


def load_task(name: str, seed: int) -> dict:
  """One seed's split of a task, as float32/int32 numpy arrays."""
  rng = np.random.default_rng(seed)
  ood = None
  if name.startswith("digits"):
    frac = {"digits": 1.0, "digits25": 0.25, "digits10": 0.1}[name]
    x, y = datasets.load_digits(return_X_y=True)
    x = x / 16.0
    xt, yt, xv, yv, xs, ys = _split(x, y, seed)
    xt, yt = _fraction(xt, yt, frac, seed)
    xv, yv = _fraction(xv, yv, frac, seed)
    kind, hidden = "classification", (128, 128)
  elif name in ("cancer", "wine"):
    loader = {"cancer": datasets.load_breast_cancer,
              "wine": datasets.load_wine}[name]
    x, y = loader(return_X_y=True)
    xt, yt, xv, yv, xs, ys = _split(x, y, seed)
    xt, xv, xs = _standardise(xt, xv, xs)
    kind, hidden = "classification", (64, 64)
  elif name == "moons":
    x, y = datasets.make_moons(n_samples=500, noise=0.2, random_state=seed)
    xt, yt, xv, yv, xs, ys = _split(x, y, seed)
    xt, xv, xs = _standardise(xt, xv, xs)
    angle = rng.uniform(0, 2 * np.pi, 200)
    radius = rng.uniform(4.0, 6.0, 200)
    ood = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    kind, hidden = "classification", (64, 64)
  elif name == "diabetes":
    x, y = datasets.load_diabetes(return_X_y=True)
    xt, yt, xv, yv, xs, ys = _split(x, y, seed, stratify=False)
    xt, xv, xs = _standardise(xt, xv, xs)
    yt, yv, ys = _standardise(yt, yv, ys)
    kind, hidden = "regression", (64, 64)
  elif name == "gap1d":
    def sample(n, low, high):
      side = rng.choice([-1.0, 1.0], n)
      xx = side * rng.uniform(low, high, n)
      return xx[:, None], xx * np.sin(xx) + 0.3 * rng.standard_normal(n)
    xt, yt = sample(120, 1.0, 3.0)
    xv, yv = sample(40, 1.0, 3.0)
    xs = rng.uniform(-3.0, 3.0, 200)[:, None]
    ys = xs[:, 0] * np.sin(xs[:, 0]) + 0.3 * rng.standard_normal(200)
    yt, yv, ys = _standardise(yt, yv, ys)
    kind, hidden = "regression", (64, 64)
  else:
    raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
  if kind == "classification" and ood is None:
    ood = xs[:, ::-1]  # the same inputs, features reversed
  ydt = np.int32 if kind == "classification" else np.float32
  out = dict(x_train=xt, y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys)
  out = {k: np.asarray(v, np.float32 if k[0] == "x" else ydt)
         for k, v in out.items()}
  out.update(kind=kind, hidden=hidden, ood=None if ood is None else
             np.asarray(ood, np.float32),
             classes=int(np.max(y) + 1) if kind == "classification" else 1)
  return out


# ---------------------------------------------------------------- model


def init_mlp(key, sizes):
  params = []
  for a, b in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (a, b)) * jnp.sqrt(2.0 / a),
                   "b": jnp.zeros((b,))})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  out = x @ params[-1]["w"] + params[-1]["b"]
  return out


def mlp_scalar(params, x):
  return mlp(params, x)[:, 0]


def make_loss(kind):
  if kind == "classification":
    return lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
        mlp(p, x), y).mean()
  return lambda p, x, y: 0.5 * jnp.mean(jnp.square(mlp(p, x)[:, 0] - y))


def make_optimizer(method, lr, wd, b2, ess, steps, key):
  schedule = optax.cosine_decay_schedule(lr, steps)
  if method == "adamw":
    return optax.adamw(schedule, weight_decay=wd)
  if method == "ivon":
    options = {"b2": b2, **IVON_OPTIONS}
    return blrax.ivon(schedule, ess=ess, weight_decay=wd, key=key, **options)
  if method == "von":
    return blrax.von(schedule, ess=ess, key=key)
  if method == "vogn":
    return blrax.vogn(schedule, ess=ess, key=key)
  if method == "evon":
    return blrax.evon(schedule, ess=ess, key=key)
  raise ValueError(method)


# ------------------------------------------------------------- training


def make_trainer(task, method, steps, early_stopping):
  """A jitted program: (configs, seeds, data) -> (params, opt_state), vmapped
  over the configs (learning rate, weight decay; traced, so one compilation
  serves a whole grid) and the seeds; with ``early_stopping`` the params of
  the epoch with the best validation NLL (and its optimizer state)."""
  n_train, dim = task["x_train"].shape[1:]
  batch = min(BATCH, n_train)
  per_epoch = n_train // batch
  epochs = max(1, steps // per_epoch)
  total = epochs * per_epoch
  sizes = (dim,) + task["hidden"] + (task["classes"] if
                                     task["kind"] == "classification" else 1,)
  loss = make_loss(task["kind"])
  variational = method != "adamw"

  def run(lr, wd, member, b2, seed, x, y, xv, yv):
    k_init, k_opt, k_data = jax.random.split(
        jax.random.key(seed * 1000 + member), 3)
    params = init_mlp(k_init, sizes)
    opt = make_optimizer(method, lr, wd, b2, n_train, total, k_opt)
    state = opt.init(params)

    def step(carry, idx):
      params, state = carry
      xb, yb = x[idx], y[idx]
      theta = blrax.sample_params(params, state) if variational else params
      if method == "vogn":  # VOGN at Adam's cost: the documented path
        _, grads, squares = blrax.value_grads_and_squares(loss, theta, xb, yb)
        updates, state = opt.update(grads, state, params, hessian=squares)
      else:
        grads = jax.grad(loss)(theta, xb, yb)
        updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    def epoch(carry, key):
      params, state, best, best_nll = carry
      order = jax.random.permutation(key, n_train)[:per_epoch * batch]
      params, state = jax.lax.scan(step, (params, state),
                                   order.reshape(per_epoch, batch))[0]
      if early_stopping:
        val = loss(params, xv, yv)
        better = val < best_nll
        best = jax.lax.cond(better, lambda: (params, state), lambda: best)
        best_nll = jnp.where(better, val, best_nll)
      return (params, state, best, best_nll), None

    carry = (params, state, (params, state), jnp.inf)
    params, state, best, _ = jax.lax.scan(
        epoch, carry, jax.random.split(k_data, epochs))[0]
    return best if early_stopping else (params, state)

  over_seeds = jax.vmap(run, in_axes=(None,) * 4 + (0,) * 5)
  return jax.jit(jax.vmap(over_seeds, in_axes=(0,) * 4 + (None,) * 5))


def train(task, method, configs, steps, seeds, early_stopping=False):
  """Trains every (lr, weight decay[, ensemble member]) config on every seed.

  Returns (params, states) with leading axes (config, seed), and the
  execution seconds of one config (the compiled program's time over the
  number of configs; configs run side by side).
  """
  fn = make_trainer(task, method, steps, early_stopping)
  lrs = jnp.asarray([c[0] for c in configs], jnp.float32)
  wds = jnp.asarray([c[1] for c in configs], jnp.float32)
  members = jnp.asarray([c[2] if len(c) > 2 else 0 for c in configs])
  b2s = jnp.asarray([c[3] if len(c) > 3 else IVON_B2 for c in configs],
                    jnp.float32)
  args = (lrs, wds, members, b2s, jnp.asarray(seeds), task["x_train"],
          task["y_train"], task["x_val"], task["y_val"])
  compiled = fn.lower(*args).compile()
  start = time.perf_counter()
  params, states = jax.block_until_ready(compiled(*args))
  return params, states, (time.perf_counter() - start) / len(configs)


def index(tree, *i):
  return jax.tree.map(lambda a: a[i], tree)


# ----------------------------------------------------------- evaluation


def entropy(log_probs):
  return -np.sum(np.exp(log_probs) * log_probs, -1)


def classification_metrics(log_probs, y, ood_log_probs=None):
  log_probs = np.asarray(log_probs, np.float64)
  log_probs = log_probs - np.logaddexp.reduce(log_probs, -1, keepdims=True)
  out = {
      "acc": float(np.mean(log_probs.argmax(-1) == y)),
      "nll": float(-np.mean(log_probs[np.arange(len(y)), y])),
      "ece": float(blrax.metrics.expected_calibration_error(
          jnp.asarray(np.exp(log_probs), jnp.float32), jnp.asarray(y))),
  }
  if ood_log_probs is not None:
    scores = np.concatenate([entropy(log_probs),
                             entropy(np.asarray(ood_log_probs, np.float64))])
    labels = np.concatenate([np.zeros(len(y)), np.ones(len(ood_log_probs))])
    out["auroc"] = float(roc_auc_score(labels, scores))
  return out


def regression_metrics(mean, variance, y):
  mean, variance = np.asarray(mean, np.float64), np.asarray(variance,
                                                            np.float64)
  nll = 0.5 * (np.log(2 * np.pi * variance) + (y - mean) ** 2 / variance)
  half = 1.6448536269514722 * np.sqrt(variance)
  return {"nll": float(np.mean(nll)),
          "rmse": float(np.sqrt(np.mean((y - mean) ** 2))),
          "coverage90": float(np.mean(np.abs(y - mean) <= half))}


@jax.jit
def log_softmax(params, x):
  return jax.nn.log_softmax(mlp(params, x))


@jax.jit
def bma_log_probs(params, state, x):
  return blrax.predictive.predictive_log_probs(mlp, 1, params, state, x,
                                               NUM_SAMPLES)


@jax.jit
def linearized_log_probs(params, state, x):
  return blrax.predictive.linearized_log_probs(mlp, 1, params, state, x,
                                               NUM_SAMPLES)


def evaluate_point(task, params):
  """AdamW at its early-stopped params, with and without temperature."""
  xs, ys = task["x_test"], task["y_test"]
  if task["kind"] == "regression":
    noise = float(np.mean((mlp(params, task["x_val"])[:, 0]
                           - task["y_val"]) ** 2))
    mean = mlp(params, xs)[:, 0]
    return {"adamw": regression_metrics(mean, np.full(len(ys), noise), ys)}
  t = float(blrax.uncertainty.fit_temperature(
      mlp(params, task["x_val"]), task["y_val"]))
  ood = task["ood"]
  scaled = lambda p, x: jax.nn.log_softmax(mlp(p, x) / t)
  return {
      "adamw": classification_metrics(log_softmax(params, xs), ys,
                                      log_softmax(params, ood)),
      "adamw+ts": classification_metrics(scaled(params, xs), ys,
                                         scaled(params, ood)),
  }


def evaluate_ensemble(task, members):
  xs, ys = task["x_test"], task["y_test"]
  if task["kind"] == "regression":
    val = np.mean([mlp(p, task["x_val"])[:, 0] for p in members], 0)
    outs = np.stack([mlp(p, xs)[:, 0] for p in members])
    noise = float(np.mean((val - task["y_val"]) ** 2))
    return regression_metrics(outs.mean(0), outs.var(0) + noise, ys)
  avg = lambda x: (jax.nn.logsumexp(jnp.stack(
      [log_softmax(p, x) for p in members]), 0) - math.log(len(members)))
  return classification_metrics(avg(xs), ys, avg(task["ood"]))


@functools.partial(jax.jit, static_argnames="linear")
def _regression_predictive(params, state, x, noise, linear=False):
  if linear:
    mean, var = blrax.predictive.linearized_mean_variance(
        mlp, 1, params, state, x, NUM_SAMPLES, noise_variance=noise)
  else:
    mean, var = blrax.predictive.predictive_mean_variance(
        mlp, 1, params, state, x, NUM_SAMPLES, noise_variance=noise)
  return mean[:, 0], var[:, 0]


def evaluate_posterior(task, name, params, state):
  """A blrax method: mean, BMA, calibrated BMA, calibrated linearised."""
  xs, ys, xv, yv = (task["x_test"], task["y_test"], task["x_val"],
                    task["y_val"])
  out = {}
  if task["kind"] == "regression":
    noise = float(np.mean((mlp(params, xv)[:, 0] - yv) ** 2))
    out[f"{name}/mean"] = regression_metrics(
        mlp(params, xs)[:, 0], np.full(len(ys), noise), ys)
    out[f"{name}/bma"] = regression_metrics(
        *_regression_predictive(params, state, xs, noise), ys)
    cal = blrax.calibrate_posterior(
        mlp_scalar, params, state, [(xv, yv)],
        likelihood="gaussian", noise_variance=noise, num_samples=NUM_SAMPLES,
        **CALIBRATION)
    out[f"{name}/cal"] = regression_metrics(
        *_regression_predictive(params, cal.opt_state, xs, noise), ys)
    lin = blrax.calibrate_posterior(
        mlp_scalar, params, state, [(xv, yv)], likelihood="gaussian",
        noise_variance=noise, num_samples=NUM_SAMPLES, linearized=True,
        **CALIBRATION)
    out[f"{name}/lin"] = regression_metrics(
        *_regression_predictive(params, lin.opt_state, xs, noise, True), ys)
    out[f"{name}/cal"]["temperature"] = cal.temperature
    return out
  ood = task["ood"]
  out[f"{name}/mean"] = classification_metrics(
      log_softmax(params, xs), ys, log_softmax(params, ood))
  out[f"{name}/bma"] = classification_metrics(
      bma_log_probs(params, state, xs), ys, bma_log_probs(params, state, ood))
  cal = blrax.calibrate_posterior(mlp, params, state, [(xv, yv)],
                                  num_samples=NUM_SAMPLES, **CALIBRATION)
  out[f"{name}/cal"] = classification_metrics(
      bma_log_probs(params, cal.opt_state, xs), ys,
      bma_log_probs(params, cal.opt_state, ood))
  out[f"{name}/cal"]["temperature"] = cal.temperature
  lin = blrax.calibrate_posterior(mlp, params, state, [(xv, yv)],
                                  num_samples=NUM_SAMPLES, linearized=True,
                                  **CALIBRATION)
  out[f"{name}/lin"] = classification_metrics(
      linearized_log_probs(params, lin.opt_state, xs), ys,
      linearized_log_probs(params, lin.opt_state, ood))
  out[f"{name}/lin"]["temperature"] = lin.temperature
  return out


def val_nll(task, params):
  xv, yv = task["x_val"], task["y_val"]
  if task["kind"] == "regression":
    return float(np.mean((mlp(params, xv)[:, 0] - yv) ** 2))
  return float(optax.softmax_cross_entropy_with_integer_labels(
      mlp(params, xv), yv).mean())


# ------------------------------------------------------------------ run


def stack_tasks(name, seeds):
  splits = [load_task(name, s) for s in seeds]
  task = dict(splits[0])
  for k in ("x_train", "y_train", "x_val", "y_val"):
    task[k] = np.stack([s[k] for s in splits])
  return task, splits


def run_task(name, seeds, steps, family, log):
  """Every method on one task; {method: {metric: [per seed]}}."""
  task, splits = stack_tasks(name, seeds)
  results: dict[str, dict[str, list]] = {}
  costs: dict[str, float] = {}

  def add(per_seed):
    for method, metrics in per_seed.items():
      for k, v in metrics.items():
        results.setdefault(method, {}).setdefault(k, []).append(v)

  # AdamW: grid, early stopping; pick per seed by validation NLL.
  params, _, seconds = train(task, "adamw", ADAMW_GRID, steps, seeds, True)
  costs["adamw"] = seconds
  chosen = []
  for i, split in enumerate(splits):
    best = min(range(len(ADAMW_GRID)),
               key=lambda c: val_nll(split, index(params, c, i)))
    chosen.append(best)
    add(evaluate_point(split, index(params, best, i)))
  log(f"  adamw chosen {[ADAMW_GRID[c] for c in chosen]}")
  # The ensemble: 5 members of the chosen config (the first is the one above).
  config = max(set(chosen), key=chosen.count)
  others = train(task, "adamw", [ADAMW_GRID[config] + (m,)
                                 for m in range(1, ENSEMBLE)], steps, seeds,
                 True)[0]
  members = [index(params, config)] + [index(others, m)
                                       for m in range(ENSEMBLE - 1)]
  for i, split in enumerate(splits):
    add({"ensemble": evaluate_ensemble(split, [index(m, i) for m in members])})
  costs["ensemble"] = ENSEMBLE * costs["adamw"]

  # IVON: a grid of the same size, picked by the validation NLL of the mean.
  ivon_grid = (IVON_GRID if task["kind"] == "classification" else
               IVON_REGRESSION_GRID)
  params, states, costs["ivon"] = train(task, "ivon", ivon_grid, steps, seeds,
                                        IVON_EARLY_STOPPING["on"])
  picked = []
  for i, split in enumerate(splits):
    best = min(range(len(ivon_grid)),
               key=lambda c: val_nll(split, index(params, c, i)))
    picked.append(best)
    add(evaluate_posterior(split, "ivon", index(params, best, i),
                           index(states, best, i)))
  log(f"  ivon chosen {[ivon_grid[c] for c in picked]}")
  if task["kind"] == "classification":
    for method in family:
      params, states, costs[method] = train(
          task, method, [(FAMILY[method], 0.0)], steps, seeds)
      for i, split in enumerate(splits):
        add(evaluate_posterior(split, method, index(params, 0, i),
                               index(states, 0, i)))
  base = costs["adamw"]
  for method in results:
    family_name = method.split("/")[0].split("+")[0]
    results[method]["cost"] = [costs.get(family_name, base) / base]
  return results


def summarise(results):
  return {task: {method: {k: float(np.mean(v)) for k, v in metrics.items()}
                 for method, metrics in per.items()}
          for task, per in results.items()}


def table(summary):
  lines = []
  for task, per in summary.items():
    regression = "coverage90" in next(iter(per.values()))
    cols = (("nll", "rmse", "coverage90", "cost") if regression else
            ("acc", "nll", "ece", "auroc", "cost"))
    lines += [f"\n### {task}\n", "| method | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for method, m in per.items():
      cells = [f"{m[c]:.4f}" if c in m and c != "cost" else
               (f"{m[c]:.2f}x" if c in m else "–") for c in cols]
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def compact(summary):
  """One row per task: test NLL of the baselines and of IVON, the winner."""
  cols = ("adamw", "adamw+ts", "ensemble", "ivon/mean", "ivon/bma",
          "ivon/cal", "ivon/lin")
  lines = ["| task | " + " | ".join(cols) + " | best (single model) |",
           "|---" * (len(cols) + 2) + "|"]
  for task, per in summary.items():
    single = [c for c in cols if c in per and c != "ensemble"]
    best = min(single, key=lambda c: per[c]["nll"])
    cells = [f"{per[c]['nll']:.4f}" if c in per else "–" for c in cols]
    lines.append(f"| {task} | " + " | ".join(cells) + f" | {best} |")
  return "\n".join(lines)


def verdict(summary):
  """Who wins where: the targets of the benchmark, measured."""
  lines = ["\n### Targets\n"]
  wins, ens = [], []
  for task, per in summary.items():
    if "adamw+ts" not in per or "ivon/cal" not in per:
      continue
    a, c, e = per["adamw+ts"], per["ivon/cal"], per["ensemble"]
    lin = per.get("ivon/lin")
    win = c["nll"] < a["nll"] and c["acc"] >= a["acc"] - 0.005
    wins.append(win)
    near = c["nll"] <= 1.1 * e["nll"]
    ens.append(near)
    # tau = 0 averages copies of the mean: equal up to rounding.
    never_worse = per["ivon/cal"]["nll"] <= per["ivon/mean"]["nll"] * (
        1 + 1e-6)
    lines.append(
        f"- {task}: ivon/cal NLL {c['nll']:.4f} vs adamw+ts {a['nll']:.4f} "
        f"({c['nll'] / a['nll']:.2f}x), acc {c['acc']:.4f} vs "
        f"{a['acc']:.4f}; vs ensemble {c['nll'] / e['nll']:.2f}x at "
        f"{per['ivon/cal']['cost'] / e['cost']:.2f} of its cost"
        + (f"; ivon/lin {lin['nll']:.4f}" if lin else "")
        + ("" if never_worse else " (calibrated BMA worse than mean on test)"))
  lines.append(f"\nivon/cal beats adamw+ts (NLL, acc within 0.5 pt) on "
               f"{sum(wins)} of {len(wins)} classification tasks; within 10% "
               f"of the ensemble's NLL on {sum(ens)}.")
  return "\n".join(lines)


def plot(summary, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(summary)
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2))
  for ax, task in zip(np.atleast_1d(axes), tasks):
    per = summary[task]
    names = list(per)
    ax.barh(names, [per[n]["nll"] for n in names], color="tab:blue")
    ax.set_title(task)
    ax.set_xlabel("test NLL")
    ax.tick_params(axis="y", labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", nargs="+", default=list(TASKS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--family", nargs="*", default=list(FAMILY))
  parser.add_argument("--out", default="benchmarks/results/posterior_benchmark")
  parser.add_argument("--wide-grids", action="store_true",
                      help="12-point grids for AdamW (lr x weight decay) and "
                      "IVON (lr x weight decay x b2 in {0.99999, 0.999})")
  parser.add_argument("--selection", default="minimum",
                      choices=("minimum", "one_se"),
                      help="calibrate_posterior's rule for the temperature")
  parser.add_argument("--ivon-options", type=json.loads, default={},
                      help='extra blrax.ivon keywords as JSON, e.g. '
                      '\'{"hess_init_steps": null}\'')
  parser.add_argument("--ivon-early-stopping", action="store_true",
                      help="IVON keeps the epoch (params and state) with the "
                      "best validation NLL of its mean, as AdamW does")
  parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                      help="only combine the .json results of earlier runs "
                      "(e.g. tasks run in parallel processes) into --out")
  parser.add_argument("--smoke", action="store_true",
                      help="a tiny run (2 tasks, 1 seed, 60 steps) for CI")
  args = parser.parse_args(argv)
  if args.smoke:
    args.tasks, args.seeds, args.steps = ["wine"], [0], 60
    args.family = []
  IVON_OPTIONS.update(args.ivon_options)
  CALIBRATION["selection"] = args.selection
  IVON_EARLY_STOPPING["on"] = args.ivon_early_stopping
  if args.wide_grids:
    global ADAMW_GRID, IVON_GRID, IVON_REGRESSION_GRID
    ADAMW_GRID, IVON_GRID = WIDE_ADAMW_GRID, WIDE_IVON_GRID
    IVON_REGRESSION_GRID = WIDE_IVON_REGRESSION_GRID
  log = lambda msg: print(msg, flush=True)
  results = {}
  if args.merge:
    options = None
    for path in args.merge:
      with open(path) as f:
        saved = json.load(f)
      results.update(saved["results"])
      run = {k: saved["args"].get(k, getattr(args, k)) for k in RUN_OPTIONS}
      if options not in (None, run):
        raise ValueError(f"{path} is a different run: {run} vs {options}")
      options = run
    for name, value in options.items():
      setattr(args, name, value)
    results = {t: results[t] for t in TASKS if t in results}
  for name in [] if args.merge else args.tasks:
    start = time.perf_counter()
    log(f"{name} ...")
    results[name] = run_task(name, args.seeds, args.steps, args.family, log)
    log(f"  {time.perf_counter() - start:.0f}s")
  summary = summarise(results)
  flags = "".join(
      [" --wide-grids" if args.wide_grids else "",
       f" --selection {args.selection}" if args.selection != "minimum" else "",
       " --ivon-early-stopping" if args.ivon_early_stopping else "",
       f" --ivon-options '{json.dumps(args.ivon_options)}'"
       if args.ivon_options else "",
       " --family" + "".join(f" {m}" for m in args.family)
       if list(args.family) != list(FAMILY) else ""])
  text = (f"seeds {args.seeds}, {args.steps} steps, jax {jax.__version__}"
          + (f"; options{flags}" if flags else "") + "\n"
          "\n### Test NLL (mean of the seeds)\n\n" + compact(summary)
          + "\n" + table(summary) + "\n" + verdict(summary))
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
      f.write(text + "\n")
    with open(args.out + ".json", "w") as f:
      json.dump({"args": vars(args), "results": results}, f, indent=1)
    plot(summary, args.out + ".png")
  return summary


if __name__ == "__main__":
  main()
