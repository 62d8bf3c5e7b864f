"""benchmarks/posterior_benchmark.py: its metrics by hand, and a smoke run."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import posterior_benchmark as pb  # noqa: E402


def test_classification_metrics_by_hand():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
  y = np.array([0, 1, 1])
  ood = np.log(np.array([[0.5, 0.5], [0.55, 0.45]]))
  out = pb.classification_metrics(np.log(probs), y, ood)
  assert out["acc"] == pytest.approx(2 / 3)
  assert out["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.8)
                                       + math.log(0.4)) / 3)
  # Entropies: in-distribution 0.325, 0.500, 0.673; OOD 0.693, 0.688: every
  # OOD input is more uncertain than every test input.
  assert out["auroc"] == pytest.approx(1.0)


def test_regression_metrics_by_hand():
  mean, var, y = np.zeros(4), np.ones(4), np.array([0.5, -1.0, 2.0, 1.7])
  out = pb.regression_metrics(mean, var, y)
  assert out["coverage90"] == pytest.approx(0.5)  # |y| <= 1.645 twice
  assert out["nll"] == pytest.approx(np.mean(0.5 * np.log(2 * np.pi)
                                             + 0.5 * y ** 2))
  assert out["rmse"] == pytest.approx(np.sqrt(np.mean(y ** 2)))


def test_splits_are_disjoint_and_stratified():
  task = pb.load_task("digits10", 0)
  assert task["x_train"].shape == (107, 64) and task["x_test"].shape[0] == 360
  train = {row.tobytes() for row in task["x_train"]}
  assert not train & {row.tobytes() for row in task["x_test"]}
  assert set(np.unique(task["y_train"])) == set(range(10))


@pytest.mark.slow
def test_smoke_run(tmp_path):
  summary = pb.main(["--smoke", "--out", str(tmp_path / "bench")])
  per = summary["wine"]
  for method in ("adamw", "adamw+ts", "ensemble", "ivon/mean", "ivon/bma",
                 "ivon/cal", "ivon/lin"):
    assert np.isfinite(per[method]["nll"]), method
  assert per["ensemble"]["cost"] == pytest.approx(5.0)
  text = (tmp_path / "bench.md").read_text()
  assert "| ivon/cal |" in text and "Targets" in text
  assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.slow
def test_early_stopping_keeps_the_params_and_state_of_one_epoch():
  import jax
  stacked, (task,) = pb.stack_tasks("wine", [0])
  per_epoch = task["x_train"].shape[0] // pb.BATCH
  steps = 40 * per_epoch  # wine overfits well before
  config = [(0.3, 1e-3)]
  best, best_state, _ = pb.train(stacked, "ivon", config, steps, [0], True)
  final, final_state, _ = pb.train(stacked, "ivon", config, steps, [0],
                                   False)
  best, final = pb.index(best, 0, 0), pb.index(final, 0, 0)
  count = int(best_state[0].count[0, 0])
  # The kept state is the one the kept params were trained with: its step
  # count ends an epoch, and its validation NLL is the lowest seen (so no
  # higher than the last epoch's).
  assert count % per_epoch == 0 and 0 < count < steps
  assert int(final_state[0].count[0, 0]) == steps
  assert pb.val_nll(task, best) <= pb.val_nll(task, final)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(best),
                                                       jax.tree.leaves(final)))


@pytest.mark.slow
def test_ivon_early_stopping_flag_reaches_ivon_training(tmp_path, monkeypatch):
  calls = []
  real_train = pb.train

  def recording(task, method, configs, steps, seeds, early_stopping=False):
    calls.append((method, early_stopping))
    return real_train(task, method, configs, steps, seeds, early_stopping)

  monkeypatch.setattr(pb, "train", recording)
  pb.main(["--smoke", "--ivon-early-stopping", "--out", str(tmp_path / "b")])
  assert ("ivon", True) in calls and ("ivon", False) not in calls
  assert ("adamw", True) in calls
  first_line = (tmp_path / "b.md").read_text().splitlines()[0]
  assert "--ivon-early-stopping" in first_line
