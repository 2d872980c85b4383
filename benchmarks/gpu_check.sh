if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; fi
# ----------------------------------------------------------------------------------------------------------------
# GPU check for compile_olss_pipeline, the fused Triton OLSS step, whole-program compilation and the flow-matching
# pipelines. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh                                   # everything, within GPU_CHECK_BUDGET_S
#     GPU_STAGES="tests latency" bash benchmarks/gpu_check.sh        # first call of a split run
#     GPU_STAGES="flow extras" bash benchmarks/gpu_check.sh          # second call
#
# 1. makes olss_fast importable from this checkout without installing it: the checkout on PYTHONPATH (its
#    olss_fast/kernels and olss_fast/export packages link to kernels/ and export/, whose lack of __init__.py keeps
#    them from shadowing installed packages of those names);
# 2. tests: the GPU-marked tests (pytest -m gpu, without the kernel file; OLSS_FAST_TEST_COMPILE=1 runs the
#    whole-program compiled runner inside a CUDA graph), then the whole kernel test file (interpreted + compiled);
# 3. latency: benchmarks/latency.py --quick on the SD1.5 architecture: diffusers DPM-Solver++ / DDIM, OLSS eager /
#    cuda_graph / cuda_graph + compile=True at 5/10/20 steps, the floor, cold and warm first-image times of the
#    compiled runner in fresh processes, peak memory (compiled sections only if >= 120 s of the budget are left);
# 4. flow: latency.py --model sd3-medium and --model flux-dev (random weights, real shapes, bf16, 1024x1024): the
#    diffusers pipeline at 28 steps vs OLSS 8 steps eager / cuda_graph, the per-step floor, peak memory;
# 5. extras: the demo on CUDA, the re-fit programme per state vs batched layers (batched_layers.py, SD1.5 shapes)
#    and the search-speed benchmark on CUDA;
# 6. prints a short summary and the latency tables last.
#
# The device image lacks diffusers and pytest: carry their wheels in .whl/ (git-ignored; line 1 installs them), e.g.
#     pip download --no-deps -d .whl diffusers==0.42.1 pytest pluggy iniconfig   (then run(carry=[".whl"]))
#
# Logs, JUnit XML, latency*.json and latency*_table.txt go to $OUT (or /tmp/olss_gpu_check). Environment knobs:
#   GPU_CHECK_BUDGET_S (default 560: the whole script), GPU_TESTS (default "tests"), PYTHON (default python3),
#   GPU_STAGES (default "tests latency flow extras"), BENCH_ARGS (extra arguments for latency.py, e.g.
#   "--skip-compile"), FLOW_MODELS (default "sd3-medium flux-dev").
# Without CUDA the GPU tests skip and the benchmarks are not run (a CPU dry run of everything else).
# ----------------------------------------------------------------------------------------------------------------
set -u
START=$(date +%s)
REPO=$(pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/olss_gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-560}
GPU_TESTS=${GPU_TESTS:-tests}
mkdir -p "$OUTDIR"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(date +%s) + START )); }

# ---- 1. olss_fast from this checkout --------------------------------------------------------------------------
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

{
  echo "== environment"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L
  $PY - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for mod in ("torch", "triton", "diffusers", "transformers", "pytest"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}  ({m.__file__})")
    except Exception as exc:  # noqa: BLE001
        print(f"{mod} NOT IMPORTABLE: {exc!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import olss_fast, olss_fast.kernels.fused_step as fs, olss_fast.serve.cuda_graph as cg, olss_fast.serve.runner as rt
print("olss_fast from", olss_fast.__file__, "| kernels", fs.__file__, "| triton in kernels:", fs.HAS_TRITON)
EOF
} > "$OUTDIR/env.txt" 2>&1
SHIM_OK=$?
cat "$OUTDIR/env.txt"
if [ $SHIM_OK -ne 0 ]; then
  echo "FATAL: olss_fast (with olss_fast.kernels / olss_fast.export) does not import from this checkout; see above"
  exit 2
fi
HAVE_PYTEST=1
$PY -c "import pytest" >/dev/null 2>&1 || HAVE_PYTEST=0
[ $HAVE_PYTEST -eq 1 ] || echo "WARNING: pytest is not importable: put pytest/pluggy/iniconfig/packaging wheels in .whl/; tests skipped"
HAVE_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

PYTEST_COMMON=(-q -rfEs -p no:cacheprovider --color=no)
run_pytest() {  # name, timeout, args...
  local name=$1 tmo=$2; shift 2
  echo "== $name (timeout ${tmo}s, $(left)s of budget left)"
  timeout --kill-after=10 "$tmo" $PY -m pytest "${PYTEST_COMMON[@]}" --junitxml="$OUTDIR/$name.xml" "$@" \
    > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "   TIMED OUT after ${tmo}s"
  tail -n 25 "$OUTDIR/$name.log" | grep -E "passed|failed|error|FAILED|ERROR|skipped|no tests ran" | tail -n 12
  return $rc
}

# ---- 2. tests -----------------------------------------------------------------------------------------------
STAGES=" ${GPU_STAGES:-tests latency flow extras} "
has_stage() { case "$STAGES" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
GPU_RC=skipped; KERNEL_RC=skipped
if [ $HAVE_PYTEST -eq 1 ] && has_stage tests; then
  OLSS_FAST_TEST_COMPILE=1 run_pytest gpu_tests 200 -m gpu $GPU_TESTS --ignore=tests/test_kernels.py; GPU_RC=$?
  run_pytest kernel_tests 120 tests/test_kernels.py; KERNEL_RC=$?
fi

# ---- 3. latency benchmark -----------------------------------------------------------------------------------
BENCH_RC=skipped
if [ "$HAVE_CUDA" = "1" ] && has_stage latency; then
  REM=$(( $(left) - 10 ))
  if [ $REM -lt 60 ]; then
    echo "== latency benchmark skipped: only ${REM}s of the budget left"
  else
    echo "== latency benchmark (--time-budget $((REM - 15))s)"
    timeout --kill-after=10 "$REM" $PY benchmarks/latency.py "$OUTDIR/latency.json" --quick \
      --time-budget $((REM - 15)) --table-out "$OUTDIR/latency_table.txt" ${BENCH_ARGS:-} \
      > "$OUTDIR/latency.log" 2>&1
    BENCH_RC=$?
    [ $BENCH_RC -eq 124 ] && echo "   benchmark TIMED OUT (partial results are in latency.json)"
    grep -E "ERROR|Traceback|skipping" "$OUTDIR/latency.log" | head -n 8
  fi
else
  echo "== latency benchmark skipped: no CUDA device (CPU dry run)"
fi

# ---- 4. flow-matching pipelines at their real shapes ------------------------------------------------------------
FLOW_RC=skipped
if [ "$HAVE_CUDA" = "1" ] && has_stage flow; then
  FLOW_RC=0
  for model in ${FLOW_MODELS:-sd3-medium flux-dev}; do
    REM=$(( $(left) - 10 ))
    if [ $REM -lt 90 ]; then
      echo "== $model benchmark skipped: only ${REM}s of the budget left"; FLOW_RC=partial; continue
    fi
    echo "== $model benchmark (--time-budget $((REM - 15))s)"
    timeout --kill-after=10 "$REM" $PY benchmarks/latency.py "$OUTDIR/latency_$model.json" --model "$model" --quick \
      --skip-compile --time-budget $((REM - 15)) --table-out "$OUTDIR/latency_${model}_table.txt" \
      > "$OUTDIR/latency_$model.log" 2>&1 || FLOW_RC=1
    grep -E "ERROR|Traceback|skipping" "$OUTDIR/latency_$model.log" | head -n 8
  done
fi

# ---- 5. extras: the demo, batched programme layers and the search-speed benchmark, on CUDA -----------------------
EXTRA_RC=skipped
if [ "$HAVE_CUDA" = "1" ] && has_stage extras; then
  REM=$(( $(left) - 10 ))
  echo "== extras: olss-fast demo --device cuda, search_speed.py --device cuda --quick (${REM}s left)"
  timeout --kill-after=10 $(( REM / 2 )) $PY -m olss_fast demo --device cuda --out "$OUTDIR/demo" --quiet \
    > "$OUTDIR/demo.log" 2>&1
  EXTRA_RC=$?
  tail -n 45 "$OUTDIR/demo.log"
  REM=$(( $(left) - 10 ))
  if [ $REM -gt 90 ]; then  # the re-fit programme per state vs batched layers, SD1.5 shapes (random weights)
    timeout --kill-after=10 $(( REM / 2 )) $PY benchmarks/batched_layers.py --models sd15 --device cuda \
      --dtype float16 --samples 8 --repeats 1 --out "$OUTDIR/batched_layers_cuda.json" \
      > "$OUTDIR/batched_layers.log" 2>&1 || EXTRA_RC=1
    grep -E "^sd15|Error|Traceback" "$OUTDIR/batched_layers.log" | head -n 5
  fi
  REM=$(( $(left) - 10 ))
  if [ $REM -gt 30 ]; then
    timeout --kill-after=10 "$REM" $PY benchmarks/search_speed.py --device cuda --quick \
      --wall-budget $(( REM - 20 )) --out "$OUTDIR/search_speed_cuda.json" --md "$OUTDIR/search_speed_cuda.md" \
      > "$OUTDIR/search_speed.log" 2>&1
    [ $? -eq 0 ] || EXTRA_RC=1
    cat "$OUTDIR/search_speed_cuda.md" 2>/dev/null | head -n 30
  fi
fi

# ---- 6. summary ---------------------------------------------------------------------------------------------
echo
echo "== summary ($(elapsed)s; outputs in $OUTDIR)"
echo "gpu tests rc=$GPU_RC | kernel tests rc=$KERNEL_RC | latency benchmark rc=$BENCH_RC | flow rc=$FLOW_RC | extras rc=$EXTRA_RC"
for model in ${FLOW_MODELS:-sd3-medium flux-dev}; do
  [ -f "$OUTDIR/latency_${model}_table.txt" ] && cat "$OUTDIR/latency_${model}_table.txt"
done
if [ -f "$OUTDIR/latency_table.txt" ]; then
  cat "$OUTDIR/latency_table.txt"
elif [ -f "$OUTDIR/latency.json" ]; then
  echo "(no table: partial latency.json follows)"; head -c 3000 "$OUTDIR/latency.json"; echo
fi
[ "$GPU_RC" = "0" ] || [ "$GPU_RC" = "skipped" ] || [ "$GPU_RC" = "5" ] || exit 1
[ "$KERNEL_RC" = "0" ] || [ "$KERNEL_RC" = "skipped" ] || exit 1
exit 0
