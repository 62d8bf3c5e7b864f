"""The example scripts run end to end (tiny settings) and report what they say."""

import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "examples", script), *args],
      capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_quickstart():
  out = run("quickstart.py", "--epochs", "2", "--samples", "4")
  for row in ("AdamW", "IVON (mean)", "IVON (BMA, 4 samples)"):
    assert row in out


def test_digits(tmp_path):
  png = tmp_path / "rel.png"
  out = run("digits.py", "--seeds", "0", "--epochs", "1", "--samples", "4",
            "--out", str(png))
  assert "| IVON (BMA, 4)" in out and png.stat().st_size > 0


def test_regression_1d(tmp_path):
  png = tmp_path / "reg.png"
  out = run("regression_1d.py", "--samples", "100", "--out", str(png))
  assert png.stat().st_size > 0
  # "...predictive std: A on the data, B in the gap, C beyond |x| > 4"
  numbers = re.search(r"predictive std: ([\d.]+) on the data, ([\d.]+) in the gap",
                      out)
  on_data, in_gap = float(numbers.group(1)), float(numbers.group(2))
  # The posterior is uncertain where there is no data: the bands widen there
  # (measured 0.18 vs 0.34), and on the data they stay near the noise (0.1).
  assert in_gap > 1.5 * on_data
  assert 0.1 <= on_data < 0.3


def test_equinox_mlp():
  pytest.importorskip("equinox")
  out = run("equinox_mlp.py", "--epochs", "2", "--samples", "4")
  acc = float(re.search(r"\| IVON \(BMA, 4\) \| acc ([\d.]+)", out).group(1))
  assert acc > 0.5  # 10 classes: chance is 0.1 (measured 0.90 after 2 epochs)
  assert "model 'mlp', activation relu" in out


def test_partial_posterior():
  out = run("partial_posterior.py", "--epochs", "1", "--samples", "4")
  # the frozen layers get no noise at all; the last layer does
  assert "layer0: max |sample - mean| = 0.0000, median stddev = 0.0000" in out
  assert "layer1: max |sample - mean| = 0.0000, median stddev = 0.0000" in out
  assert "layer2: max |sample - mean| = 0.0000" not in out


@pytest.mark.parametrize("script", ["step_time.py", "bsam_step_time.py",
                                    "full_von_step.py"])
def test_benchmark_runs(script):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", script), "--sizes",
       "8,16,4", "--batch", "4", "--inner", "2", "--rounds", "1"],
      capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| blrax.ivon |" in result.stdout


def _module(folder, name):
  """``folder/name.py`` of the repo, imported (it may import its siblings)."""
  sys.path.insert(0, os.path.join(ROOT, folder))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


def _char_gpt():
  return _module("examples", "char_gpt")


def test_char_gpt_tiny_bf16_two_devices_accumulate(tmp_path):
  out = run("char_gpt.py", "--tiny", "--bf16", "--devices", "2",
            "--accumulate", "2", "--ess", "10N", "--seed", "3",
            "--curves", str(tmp_path))
  assert "2 device(s)" in out and "(bfloat16)" in out
  assert "30 updates of 2 x 8 x 32 chars; seed 3" in out
  for row in ("| AdamW |", "| IVON (mean) |", "| IVON (BMA, 2) |"):
    assert row in out
  # mixed precision: params bf16, curvature float32
  assert "IVON curvature (float32)" in out and "params bfloat16" in out
  # --ess 10N reaches the optimizer: ten times the 90,000 training chars,
  # and the noise cost is params / (2 ess)
  n_params = int(re.search(r"model: ([\d,]+) params", out).group(1)
                 .replace(",", ""))
  assert "train 90,000 / val 10,000" in out
  cost = float(re.search(r"ess 10N = 9e\+05: .* params/\(2 ess\) = ([\d.]+)",
                         out).group(1))
  assert cost == pytest.approx(n_params / (2 * 900_000), abs=1e-4)
  curves = json.loads((tmp_path / "curves.json").read_text())
  assert sorted(curves) == ["AdamW", "IVON"]
  assert curves["IVON"]["step"] == list(range(1, 31))
  assert len(curves["AdamW"]["train_loss"]) == 30
  assert curves["AdamW"]["val_step"] == [3 * i for i in range(1, 11)]
  assert (tmp_path / "curves.png").stat().st_size > 0


def test_char_gpt_ess_parsing():
  char_gpt = _char_gpt()
  assert char_gpt.parse_ess("N", 90_000) == 90_000
  assert char_gpt.parse_ess("10N", 90_000) == 900_000
  assert char_gpt.parse_ess("0.5n", 90_000) == 45_000
  assert char_gpt.parse_ess("cold", 90_000) == 1e9
  assert char_gpt.parse_ess("2.5e6", 90_000) == 2.5e6
  for bad in ("-3", "0N", "xN", "nan", "inf", "ten"):
    with pytest.raises(ValueError, match="ess"):
      char_gpt.parse_ess(bad, 90_000)
  with pytest.raises(ValueError, match="ess"):
    char_gpt.parse_args(["--ess=-1N"])
  with pytest.raises(ValueError, match="--accumulate"):
    char_gpt.parse_args(["--accumulate", "0"])
  with pytest.raises(ValueError, match="--warmup"):
    char_gpt.parse_args(["--steps", "10", "--warmup", "10"])
  with pytest.raises(ValueError, match="'sgd'"):
    char_gpt.parse_args(["--optimizers", "adamw,sgd"])


def test_char_gpt_decay_skips_biases_and_layernorm():
  """One update from zero gradients is the weight decay alone: AdamW moves
  p by -lr wd p, IVON by -lr (h0 + d) d p / (h1 + d) with
  h1 = b2 h0 + (1-b2)^2 h0^2 / (2 (h0 + d)) (the Price estimate is 0);
  biases and LayerNorm params must not move at all, in all three. EVON
  (official defaults) only starts its bases at the first call; its second
  moves every decayed tensor by a whitened step of length about lr."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  char_gpt = _char_gpt()
  args = char_gpt.parse_args(["--tiny", "--warmup", "0", "--grad-clip", "1.0",
                              "--wd-ivon", "0.5", "--hess-init", "1.0",
                              "--clip-radius", "1e9", "--b2", "0.9"])
  _, params = nnx.split(char_gpt.GPT(args, jnp.float32, nnx.Rngs(0)),
                        nnx.Param)
  params = nnx.as_pure(params)
  named = {jax.tree_util.keystr(path): leaf for path, leaf in
           jax.tree_util.tree_leaves_with_path(params)}
  no_decay = [k for k in named if k.endswith(("['bias']", "['scale']"))]
  assert any("attn" in k for k in no_decay)  # 2-D attention biases too
  assert any("norm" in k for k in no_decay) and len(no_decay) < len(named)
  zeros = jax.tree.map(jnp.zeros_like, params)
  lr, h0, d, b2 = 0.01, 1.0, 0.5, 0.9
  h1 = b2 * h0 + 0.5 * (1 - b2) ** 2 * h0 ** 2 / (h0 + d)
  expect = {"AdamW": lambda p: -lr * args.wd_adamw * p,
            "IVON": lambda p: -lr * (h0 + d) * d * p / (h1 + d)}
  for name in ("AdamW", "IVON", "EVON"):
    opt = char_gpt.make_optimizer(name, args, params, lr, ess=100.0,
                                  key=jax.random.key(0))
    update = jax.jit(opt.update)
    state = jax.jit(opt.init)(params)
    updates, state = update(zeros, state, params)
    if name == "EVON":
      assert all(float(jnp.max(jnp.abs(u))) == 0.0
                 for u in jax.tree.leaves(updates))
      updates, _ = update(zeros, state, params)
    updates = {jax.tree_util.keystr(path): leaf for path, leaf in
               jax.tree_util.tree_leaves_with_path(updates)}
    for k, p in named.items():
      if k in no_decay:
        assert float(jnp.max(jnp.abs(updates[k]))) == 0.0, (name, k)
      elif name == "EVON":  # length lr (vectors), about lr (tensors)
        u = np.asarray(updates[k], np.float64)
        u = u.reshape(-1, u.shape[-1]) if u.ndim >= 2 else u[None]
        length = np.linalg.norm(u, 2)
        assert 0.5 * lr < length < 1.5 * lr, (k, length)
      else:
        assert jnp.allclose(updates[k], expect[name](p), rtol=1e-4,
                            atol=1e-9), (name, k)
        assert float(jnp.max(jnp.abs(updates[k]))) > 0, (name, k)


def test_char_gpt_sweep_table(tmp_path):
  """The table's mean and sample std over seeds, against numpy."""
  char_gpt = _char_gpt()
  base = {"n_params": 1000, "train_chars": 25_000, "val_chars": 3000,
          "val_predictions": 512, "steps": 10, "accumulate": 1, "batch": 4,
          "seq_len": 8, "warmup": 1, "grad_clip": 1.0, "model": "d8 x1 h1",
          "seconds": 1.0}
  rows = []
  for seed, loss in enumerate((1.5, 1.7, 1.6)):
    metrics = {"loss": loss, "ppl": float(np.exp(loss)), "acc": 0.5,
               "ece": 0.01 * (seed + 1)}
    rows.append({**base, "optimizer": "AdamW", "lr": 3e-3, "ess": None,
                 "seed": seed, "mean": metrics})
    bma = {**metrics, "loss": loss - 0.1}
    rows.append({**base, "optimizer": "IVON", "lr": 3e3, "ess": "N",
                 "peak_step": 3e-3, "seed": seed, "mean": metrics, "bma": bma,
                 "sigma_over_w": 0.1 * (seed + 1), "noise_cost": 0.02})
  path = tmp_path / "sweep.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  text = char_gpt.write_table(str(path))
  assert text == (tmp_path / "sweep.md").read_text()
  std = np.std([1.5, 1.7, 1.6], ddof=1)
  assert f"| AdamW | 0.003 | - | 3 | 1.6000 ± {std:.4f} |" in text
  assert f"| 1.5000 ± {std:.4f} |" in text  # IVON's BMA loss
  assert "| 0.2000 ± 0.1000 | 0.0200 |" in text  # sigma/|w|, params/(2 ess)
  assert "(25.0 per param)" in text


def test_gpu_check_script_dry_run_on_cpu(tmp_path):
  # The script calls `python`: this interpreter, venv activated or not.
  path = os.pathsep.join([os.path.dirname(sys.executable),
                          os.environ.get("PATH", "")])
  env = dict(os.environ, OUT=str(tmp_path), BLRAX_CHECK_PLATFORM="cpu",
             BLRAX_CHECK_NO_INSTALL="1", PATH=path)
  result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks",
                                                "gpu_check.sh")],
                          capture_output=True, text=True, env=env,
                          cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  report = (tmp_path / "results.md").read_text()
  for section in ("## step time", "| blrax.ivon |", "## scaling",
                  "## scaling (transformer)", "transformer, cpu",
                  "## char_gpt", "| IVON (mean) |"):
    assert section in report, report
  assert (tmp_path / "scaling.png").stat().st_size > 0
  assert (tmp_path / "scaling_transformer.png").stat().st_size > 0
  assert "4 updates of 2 x 8 x 16 chars" in report  # accumulation on
  curves = json.loads((tmp_path / "char_gpt" / "curves.json").read_text())
  assert sorted(curves) == ["AdamW", "IVON"]
  assert len(curves["IVON"]["train_loss"]) == 4
  assert (tmp_path / "char_gpt" / "curves.png").stat().st_size > 0


def test_device_scaling_benchmark_runs(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "device_scaling.py"),
       "--devices", "1,2", "--sizes", "8,16,4", "--batch", "8", "--rounds", "1",
       "--inner", "2", "--out", str(tmp_path / "devices.png")],
      capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| 2 |" in result.stdout
  assert (tmp_path / "devices.png").stat().st_size > 0


def _headroom():
  return _module("benchmarks", "posterior_headroom")


def test_posterior_headroom_curvatures_against_explicit_loops():
  import jax
  import jax.numpy as jnp
  import optax

  import blrax
  headroom = _headroom()
  apply = lambda p, x: x @ p["w"] + p["b"]
  params = {"w": jnp.array([[0.5, -1.0, 0.2], [0.3, 0.1, -0.4]]),
            "b": jnp.array([0.1, 0.0, -0.2])}
  x = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0], [2.0, 1.0]])
  y = jnp.array([0, 2, 1, 1])
  settings = headroom.quickstart.IVON_SETTINGS
  state = blrax.ivon(0.1, ess=4.0, **settings).init(params)
  h = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([0.2, 0.9, 1.3])}
  state = headroom.with_curvature(state, h)
  np.testing.assert_array_equal(blrax.find_posteriors(state)[0].curvature["b"],
                                h["b"])
  steps = 7
  got = headroom.curvatures(apply, params, state, x, y, steps, seed=0)
  w = settings["b2"] ** steps
  for leaf in ("w", "b"):
    np.testing.assert_allclose(
        got["data"][leaf],
        np.maximum((np.asarray(h[leaf]) - settings["hess_init"] * w) / (1 - w),
                   0.0), rtol=1e-5)
  # The empirical Fisher: per-example gradients, one example at a time.
  loss = lambda p, xi, yi: optax.softmax_cross_entropy_with_integer_labels(
      apply(p, xi[None]), yi[None]).sum()
  grads = [jax.grad(loss)(params, x[i], y[i]) for i in range(len(y))]
  for leaf in ("w", "b"):
    expected = np.mean([np.asarray(g[leaf]) ** 2 for g in grads], axis=0)
    np.testing.assert_allclose(got["empirical_fisher"][leaf], expected,
                               rtol=1e-5, atol=1e-8)
  # The Monte Carlo Fisher: the same 8 label draws, one example at a time.
  logits = apply(params, x)
  draws = [jax.random.categorical(jax.random.key(i), logits) for i in range(8)]
  for leaf in ("w", "b"):
    expected = np.mean(
        [np.asarray(jax.grad(loss)(params, x[i], labels[i])[leaf]) ** 2
         for labels in draws for i in range(len(y))], axis=0)
    np.testing.assert_allclose(got["fisher"][leaf], expected, rtol=1e-5,
                               atol=1e-8)


def test_posterior_headroom_runs():
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks",
                                    "posterior_headroom.py"),
       "--epochs", "1", "--seeds", "0", "--samples", "4", "--prior-scales",
       "1"],
      capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [r.split("|")[1:-1] for r in result.stdout.splitlines()
          if r.startswith("| ") and "curvature" not in r]
  assert len(rows) == 8, result.stdout
  mean = float(re.search(r"test NLL of the mean: ([0-9.]+)",
                         result.stdout).group(1))
  # The oracle's search includes tau = 0 (the mean) on the test split itself.
  for row in rows:
    assert float(row[3]) <= mean + 1e-4, row
