#!/usr/bin/env bash
# One-shot accelerator check: install, then run the step-time benchmark, the
# scaling tables (MLP, transformer) and the language-model comparison (IVON vs
# AdamW, a 14.5M-param char GPT with gradient accumulation) on the default
# JAX backend, writing everything to ${OUT:-gpu_check_out}/results.md and the
# loss curves to ${OUT}/char_gpt/curves.{json,png}.
# Budget: < 10 min (sections capped at 90 + 120 + 120 + 210 s after the
# install; on the accelerator a section that times out is noted and skipped,
# and char_gpt writes its curves after each optimizer, so a timeout keeps
# AdamW's). The CPU dry run has no time caps (it must not depend on the
# machine's load) and is kept cheap: all sections in one Python process,
# adamw/floor/ivon (+flip) only, tiny sizes, and a persistent XLA cache in
# $OUT/xla_cache that lets the MLP scaling section reuse the step-time
# section's compiled steps (same MLP 256-16-16-10, same 20-step scan).
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh          # on a GPU machine
#   BLRAX_CHECK_PLATFORM=cpu bash benchmarks/gpu_check.sh  # dry run on CPU
# BLRAX_CHECK_NO_INSTALL=1 uses the current environment (what the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
platform="${BLRAX_CHECK_PLATFORM:-cuda}"
if [ "$platform" = "cuda" ]; then
  extra="jax[cuda12]>=0.6,<0.11"
else
  extra="jax>=0.6,<0.11"
fi
if [ "$platform" = "cpu" ]; then
  export JAX_COMPILATION_CACHE_DIR="$out/xla_cache"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
  export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
fi
if [ -z "${BLRAX_CHECK_NO_INSTALL:-}" ]; then  # the tests skip the install
  python3 -m venv "$out/venv"
  . "$out/venv/bin/activate"
  pip install -q --upgrade pip
  pip install -q "$extra" -e '.[examples]'
fi
{
  echo "# blrax accelerator check ($(date -u +%FT%TZ))"
  python -c "import jax; print('devices:', jax.devices())"
  if [ "$platform" = "cpu" ]; then
    # Dry run: every section's script, in one process (one import of jax),
    # timing adamw, the floor and blrax.ivon (normal and flip noise) only (the
    # other variants run the same code path), at tiny sizes.
    python - "$out" <<'PY'
import sys
out = sys.argv[1]
sys.path[:0] = ["benchmarks", "examples"]
import char_gpt  # noqa: E402
import scaling  # noqa: E402
import step_time  # noqa: E402

every = step_time.default_variants
kept = ("blrax.ivon", "blrax.ivon (flip noise)")  # scaling's memory columns
step_time.default_variants = lambda *a, **k: {
    name: v for name, v in every(*a, **k).items() if name in kept}


def section(title, main, argv):
  print(f"\n## {title}", flush=True)
  sys.argv = ["dry-run"] + argv
  main()
  sys.stdout.flush()


section("step time (MLP 256-1024-1024-10)", step_time.main,
        ["--no-vogn", "--sizes", "256,16,16,10", "--batch", "128", "--inner",
         "20", "--rounds", "1"])  # the MLP of --widths 16 below: its cache
section("scaling", scaling.main,
        ["--widths", "16", "--rounds", "1", "--out", f"{out}/scaling.png"])
section("scaling (transformer)", scaling.main,
        ["--model", "transformer", "--configs", "16:1", "--rounds", "1",
         "--out", f"{out}/scaling_transformer.png"])
section("char_gpt (IVON vs AdamW, curves in char_gpt/)",
        lambda: char_gpt.main(char_gpt.parse_args(
            ["--tiny", "--steps", "4", "--accumulate", "2", "--d-model", "16",
             "--heads", "1", "--seq-len", "16", "--val-windows", "4",
             "--curves", f"{out}/char_gpt"])), [])
PY
  else
    echo
    echo "## step time (MLP 256-1024-1024-10)"
    timeout 90 python benchmarks/step_time.py || echo "(this section failed or timed out: rc $?)"
    echo
    echo "## scaling"
    timeout 120 python benchmarks/scaling.py --widths 32,256,900,3000,6000 --out "$out/scaling.png" || echo "(this section failed or timed out: rc $?)"
    echo
    echo "## scaling (transformer)"
    timeout 120 python benchmarks/scaling.py --model transformer --configs 16:1,64:2,192:4,384:6 --batch 16 --out "$out/scaling_transformer.png" || echo "(this section failed or timed out: rc $?)"
    echo
    echo "## char_gpt (IVON vs AdamW, curves in char_gpt/)"
    timeout 210 python examples/char_gpt.py --d-model 384 --layers 8 --heads 6 --seq-len 256 --batch 32 --accumulate 2 --steps 600 --lr-adamw 1e-3 --lr-ivon 1e3 --corpus-chars 13000000 --val-windows 256 --bf16 --curves "$out/char_gpt" 2>/dev/null || echo "(this section failed or timed out: rc $?)"
  fi
} > "$out/results.md" 2> "$out/stderr.txt"
echo "wrote $out/results.md"
