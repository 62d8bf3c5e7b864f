"""Continual learning on permuted digits: the posterior of one task is the next prior.

Three tasks: scikit-learn's digits with the 64 pixels in a fixed random order
per task (task 1 unpermuted). One small MLP learns them in sequence, each task
starting from the previous task's weights, with

- **IVON, posterior as prior**: after each task, ``blrax.posterior_as_prior``
  turns the posterior :math:`N(m, 1/(\\lambda(h+\\delta)))` into the next
  optimizer's ``prior_mean`` :math:`m` and per-element ``weight_decay``
  :math:`\\lambda(h+\\delta)/\\lambda'` (Bayes' rule, one task at a time:
  variational continual learning);
- **IVON, no carry-over**: a fresh IVON per task (plain weight decay);
- **AdamW**: a fresh AdamW per task.

It prints the accuracy on every task seen so far after each task, the final
average accuracy, and the forgetting (mean over earlier tasks of the drop from
the accuracy right after learning the task to the final one).

    python examples/continual_digits.py [--epochs 20] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import blrax


def init_mlp(key, sizes):
  params = []
  for a, b in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (a, b)) / np.sqrt(a),
                   "b": jnp.zeros(b)})
  return params


def apply_mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
  logits = apply_mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y):
  return float(jnp.mean(jnp.argmax(apply_mlp(params, x), -1) == y))


def make_tasks(seed, num_tasks):
  x, y = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(
      (x / 16.0).astype(np.float32), y.astype(np.int32), test_size=0.25,
      random_state=seed, stratify=y)
  rng = np.random.default_rng(seed)
  perms = [np.arange(64)] + [rng.permutation(64) for _ in range(num_tasks - 1)]
  return [(jnp.asarray(x_tr[:, p]), jnp.asarray(y_tr), jnp.asarray(x_te[:, p]),
           jnp.asarray(y_te)) for p in perms]


def train(params, opt, x, y, epochs, batch, seed, variational):
  """``epochs`` passes of minibatch training, one jitted scan per epoch."""
  state = opt.init(params)
  steps = len(x) // batch

  def step(carry, idx):
    params, state = carry
    theta = blrax.sample_params(params, state) if variational else params
    grads = jax.grad(loss_fn)(theta, x[idx], y[idx])
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  @jax.jit
  def epoch(params, state, key):
    order = jax.random.permutation(key, len(x))[:steps * batch]
    (params, state), _ = jax.lax.scan(step, (params, state),
                                      order.reshape(steps, batch))
    return params, state

  key = jax.random.key(seed)
  for _ in range(epochs):
    key, sub = jax.random.split(key)
    params, state = epoch(params, state, sub)
  return params, state


def run(method, tasks, args, seed):
  """Accuracy matrix: acc[t][j] = accuracy on task j after learning task t."""
  params = init_mlp(jax.random.key(seed), [64, args.hidden, 10])
  n = len(tasks[0][0])
  steps = args.epochs * (n // args.batch)
  prior = {}  # IVON with carry-over: prior_mean / weight_decay of the next task
  acc = []
  for t, (x, y, _, _) in enumerate(tasks):
    lr = optax.cosine_decay_schedule(
        args.lr if method != "AdamW" else args.adam_lr, steps)
    if method == "AdamW":
      opt = optax.adamw(lr, weight_decay=1e-4)
    else:
      opt = blrax.ivon(lr, ess=float(n), hess_init=args.hess_init, b2=args.b2,
                       weight_decay=prior.get("weight_decay", args.decay),
                       prior_mean=prior.get("prior_mean"), key=seed + t)
    params, state = train(params, opt, x, y, args.epochs, args.batch,
                          seed + t, method != "AdamW")
    if method == "IVON, posterior as prior":
      mean, decay = blrax.posterior_as_prior(params, state, ess=float(n))
      prior = {"prior_mean": mean, "weight_decay": decay}
    acc.append([accuracy(params, xt, yt) for (_, _, xt, yt) in tasks[:t + 1]])
  return acc


METHODS = ("IVON, posterior as prior", "IVON, no carry-over", "AdamW")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--tasks", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=100)
  parser.add_argument("--lr", type=float, default=0.2)
  parser.add_argument("--adam-lr", type=float, default=3e-3)
  parser.add_argument("--hess-init", type=float, default=0.05)
  parser.add_argument("--b2", type=float, default=0.99)
  parser.add_argument("--decay", type=float, default=1e-3)
  args = parser.parse_args()

  results = {m: [] for m in METHODS}
  for seed in args.seeds:
    tasks = make_tasks(seed, args.tasks)
    for method in METHODS:
      results[method].append(run(method, tasks, args, seed))

  num = args.tasks
  print(f"\npermuted digits, {num} tasks, {args.epochs} epochs each, MLP "
        f"64-{args.hidden}-10, seeds {args.seeds} (mean over seeds)")
  print("test accuracy on each task after learning task t")
  header = " | ".join(f"after {t + 1}: " + " ".join(
      f"T{j + 1}" for j in range(t + 1)) for t in range(num))
  print(f"| {'method':<25} | {header} | final avg | forgetting |")
  print("|---" * (num + 3) + "|")
  for method in METHODS:
    runs = results[method]
    cells = []
    for t in range(num):
      mean = np.mean([r[t] for r in runs], axis=0)
      cells.append(" ".join(f"{a:.3f}" for a in mean))
    final = np.array([r[-1] for r in runs])  # (seeds, tasks)
    learned = np.array([[r[j][j] for j in range(num)] for r in runs])
    forgetting = np.mean(learned[:, :-1] - final[:, :-1]) if num > 1 else 0.0
    print(f"| {method:<25} | " + " | ".join(cells) +
          f" | {final.mean():.3f} | {forgetting:.3f} |")


if __name__ == "__main__":
  main()
