#!/usr/bin/env bash
# One-shot accelerator check: install, then run the step-time benchmark, the
# scaling tables (MLP, transformer) and the language-model example on the
# default JAX backend, writing everything to ${OUT:-gpu_check_out}/results.md.
# Budget: < 10 min (sections capped at 90 + 150 + 150 + 150 s after the
# install; on the accelerator a section that times out is noted and skipped;
# the CPU dry run has no time caps: it must not depend on the machine's load).
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
if [ -z "${BLRAX_CHECK_NO_INSTALL:-}" ]; then  # the tests skip the install
  python3 -m venv "$out/venv"
  . "$out/venv/bin/activate"
  pip install -q --upgrade pip
  pip install -q "$extra" -e '.[examples]'
fi
{
  echo "# blrax accelerator check ($(date -u +%FT%TZ))"
  python -c "import jax; print('devices:', jax.devices())"
  echo
  echo "## step time (MLP 256-1024-1024-10)"
  if [ "$platform" = "cpu" ]; then
    python benchmarks/step_time.py --no-vogn --sizes 16,32,32,4 --rounds 2 --inner 2
  else
    timeout 90 python benchmarks/step_time.py || echo "(this section failed or timed out: rc $?)"
  fi
  echo
  echo "## scaling"
  if [ "$platform" = "cpu" ]; then
    python benchmarks/scaling.py --widths 16 --rounds 1 --out "$out/scaling.png"
  else
    timeout 150 python benchmarks/scaling.py --widths 32,256,900,3000,6000 --out "$out/scaling.png" || echo "(this section failed or timed out: rc $?)"
  fi
  echo
  echo "## scaling (transformer)"
  if [ "$platform" = "cpu" ]; then
    python benchmarks/scaling.py --model transformer --configs 16:1 --rounds 1 --out "$out/scaling_transformer.png"
  else
    timeout 150 python benchmarks/scaling.py --model transformer --configs 16:1,64:2,192:4,384:6 --batch 16 --out "$out/scaling_transformer.png" || echo "(this section failed or timed out: rc $?)"
  fi
  echo
  echo "## char_gpt"
  if [ "$platform" = "cpu" ]; then
    python examples/char_gpt.py --tiny 2>/dev/null
  else
    timeout 150 python examples/char_gpt.py --steps 2000 --bf16 2>/dev/null || echo "(this section failed or timed out: rc $?)"
  fi
} > "$out/results.md" 2> "$out/stderr.txt"
echo "wrote $out/results.md"
