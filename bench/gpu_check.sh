#!/usr/bin/env bash
# The checks no CPU test reaches, in one go on a CUDA machine (under 8 minutes on an H200):
#
#   1. attention: on every tiny family in bf16, the attention rows the probe reads through
#      prunelab's SDPA wrapper (and FlashAttention-2's, when flash_attn is installed) against
#      eager attention of the same model; LLaVA's CLS attention against the eager vision tower;
#   2. timing: CUDA-event timing (prunelab.workers.timing.Timer) against a synchronised wall
#      clock, and a toy-llava trial on the GPU in bf16 reporting prefill/latency and peak memory;
#   3. bench/prefill_speedup.py on the 7B shapes: LLaVA-1.5-7B must reach >= 90% of the
#      FLOPs-predicted speedup at 64/576 kept tokens (--min-ratio 90); Qwen2-VL-7B is printed;
#   4. bench/method_overhead.py --strict: each method's own work <= 2% of the unpruned prefill;
#   5. bench/eval_throughput.py, when it exists.
#
# Usage (repository root, on a machine with CUDA):  bash bench/gpu_check.sh
# Python: $PYTHON, else .venv/bin/python, else python3. Each section prints its output, its
# exit status and time; a section past its time limit fails, and all of them together get
# $GPU_CHECK_DEADLINE_S seconds (default 450). Exit status: 0 when every check passed, 1 when
# one failed, 2 when CUDA is not available.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"  # tests/tiny_models.py

if ! "$PY" - <<'EOF'
import sys

try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu_check: cannot import torch with {sys.executable}: {exc}")
if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: CUDA is not available (torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda or 'none'}, {sys.executable}): these checks need a GPU"
    )
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}")
EOF
then
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader

failed=()
started=$SECONDS
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-450}  # all sections together (under 8 minutes)

# section NAME LIMIT_S COMMAND...: run it (stdin passes through) for at most LIMIT_S seconds
# and what is left of DEADLINE_S; print its status and time
section() {
    local name=$1 limit=$2 begin=$SECONDS status left
    shift 2
    left=$((DEADLINE_S - (SECONDS - started)))
    ((left < limit)) && limit=$left
    echo
    if ((limit < 10)); then
        echo "=== $name: not run, the ${DEADLINE_S} s deadline is spent ==="
        failed+=("$name (not run: deadline)")
        return
    fi
    echo "=== $name (limit ${limit} s) ==="
    timeout --kill-after=10 "$limit" "$@"
    status=$?
    if ((status == 124 || status == 137)); then
        echo "--- $name: TIMED OUT after $((SECONDS - begin)) s"
        failed+=("$name (timed out)")
    elif ((status != 0)); then
        echo "--- $name: FAILED (exit $status) after $((SECONDS - begin)) s"
        failed+=("$name (exit $status)")
    else
        echo "--- $name: ok in $((SECONDS - begin)) s"
    fi
}

section "attention rows vs eager, bf16" 120 "$PY" - <<'EOF'
import importlib.util
import sys

import torch
from tiny_models import TINY_MODELS, model_config

from prunelab.workers.adapters import adapter_for
from prunelab.workers.attention import AttentionProbe, probe_attention
from prunelab.workers.benchmarks.shapes import ShapesBenchmark
from prunelab.workers.models import load_model

TOL = 2e-2  # max |probe row - eager row|: bf16 kernels round differently (fp32 tests: 1e-5)
impls = ["sdpa"]
if importlib.util.find_spec("flash_attn") is not None:
    impls.append("flash_attention_2")
else:
    print("flash_attn not installed: flash_attention_2 not checked")
failures = []


@torch.inference_mode()
def llm_rows(adapter):
    """Max |difference| of the probe's rows (3 queries, every layer) against eager's."""
    prepared = adapter.prepare(ShapesBenchmark().sample(0))
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    llm_input = adapter.llm_input(prepared, tokens)
    length = llm_input.inputs_embeds.shape[1]
    queries = torch.tensor([0, int(prepared.visual_positions[3]), length - 1])
    layers = len(adapter.layers)
    probe = AttentionProbe(
        modules=adapter.attention_modules, queries=dict.fromkeys(range(layers), queries)
    )
    kwargs = {"inputs_embeds": llm_input.inputs_embeds}
    if llm_input.position_ids is not None:
        kwargs["position_ids"] = llm_input.position_ids
    with probe_attention(probe):
        adapter.model(**kwargs)
    with adapter.attention_implementation("eager"):
        eager = adapter.model(**kwargs, output_attentions=True).attentions
    worst = 0.0
    for layer in range(layers):
        expected = eager[layer][0][:, queries.to(eager[layer].device)].float()
        worst = max(worst, float((probe.rows[layer].float() - expected).abs().max()))
    return worst


@torch.inference_mode()
def llava_cls(adapter):
    """Max |difference| of the CLS attention signal against the eager vision tower's."""
    prepared = adapter.prepare(ShapesBenchmark().sample(0))
    signals = adapter.vision_signals(prepared, frozenset({"cls_attention"}))
    with adapter.attention_implementation("eager"):
        out = adapter.model.model.vision_tower(prepared.pixel_values, output_attentions=True)
    layer = adapter.model.config.vision_feature_layer
    expected = out.attentions[layer][0, :, 0, 1:].mean(dim=0).float()
    return float((signals.cls_attention.float() - expected).abs().max())


for impl in impls:
    for name in TINY_MODELS:
        config = {
            **model_config(name),
            "dtype": "bfloat16",
            "device": "cuda",
            "attn_implementation": impl,
        }
        checks = [("LLM rows", llm_rows)] + ([("CLS", llava_cls)] if name == "tiny-llava" else [])
        try:
            loaded = load_model(config)
            adapter = adapter_for(loaded)
            if loaded.device.type != "cuda":
                raise RuntimeError(f"loaded on {loaded.device}")
            for label, check in checks:
                worst = check(adapter)
                ok = worst <= TOL
                print(f"{impl:18} {name:18} {label:9} max |diff| {worst:.2e} {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append(f"{impl} {name} {label}")
        except Exception as exc:
            print(f"{impl:18} {name:18} ERROR {type(exc).__name__}: {str(exc).splitlines()[0]}")
            failures.append(f"{impl} {name}")
        finally:
            loaded = adapter = None
            torch.cuda.empty_cache()
print(f"tolerance {TOL:g}; " + (f"FAILED: {', '.join(failures)}" if failures else "all ok"))
sys.exit(1 if failures else 0)
EOF

section "CUDA-event timing and peak memory" 120 "$PY" - <<'EOF'
import sys
import time

import torch

from prunelab.sweeps import group_config
from prunelab.trial import Trial
from prunelab.workers.actor import Worker
from prunelab.workers.timing import Timer

failures = []
device = torch.device("cuda")
timer = Timer(device)
a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
for _ in range(3):
    a @ a  # warm-up
ratios = []
for _ in range(5):
    torch.cuda.synchronize()
    wall = time.perf_counter()
    start = timer.mark()
    for _ in range(50):
        a @ a
    end = timer.mark()
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    ratios.append(timer.seconds(start, end) / wall)
ratio = sorted(ratios)[len(ratios) // 2]
ok = 0.8 <= ratio <= 1.05
print(f"Timer (CUDA events) / synchronised wall clock, 50 bf16 matmuls: {ratio:.3f} "
      f"{'ok' if ok else 'FAIL (expected 0.8-1.05)'}")
if not ok:
    failures.append("CUDA-event timer")

model = {**group_config("model", "toy-llava"), "device": "cuda", "dtype": "bfloat16"}
config = {
    "model": "toy-llava",
    "model_config": model,
    "benchmark": "shapes",
    "benchmark_config": {"name": "shapes", "kind": "shapes", "split": "test"},
    "method": "fastv",
    "hparams": {},
    "keep_ratio": 0.5,
    "prune_layer": 2,
    "eval": {"limit": 8, "sample_seed": 0, "max_new_tokens": 4, "warmup": 1,
             "fidelity": True, "flops_convention": "pdrop", "heatmaps": 0},
}
result = Worker("gpu-check", threads=1).run(Trial.from_dict(config))
metrics = result.metrics
print(f"toy-llava fastv trial on {result.environment.get('device')} "
      f"({result.environment.get('dtype')}, {result.environment.get('attn_implementation')}): "
      + ", ".join(f"{k}={metrics.get(k)}" for k in
                  ("score", "prefill_ms", "decode_ms_per_token", "latency_ms", "peak_mem_mb")))
if not str(result.environment.get("device", "")).startswith("cuda"):
    failures.append("the trial did not run on CUDA")
for name in ("prefill_ms", "latency_ms", "peak_mem_mb"):
    value = metrics.get(name)
    if value is None or not value > 0:
        failures.append(f"{name} = {value}")
print("FAILED: " + ", ".join(failures) if failures else "all ok")
sys.exit(1 if failures else 0)
EOF

section "prefill_speedup: LLaVA-1.5-7B shape, >= 90% of predicted at 64/576" 150 \
    "$PY" bench/prefill_speedup.py --models llava --min-ratio 90
section "prefill_speedup: Qwen2-VL-7B shape (printed, not checked)" 90 \
    "$PY" bench/prefill_speedup.py --models qwen2_vl --repeats 5
section "method_overhead: each method <= 2% of the unpruned 7B prefill" 120 \
    "$PY" bench/method_overhead.py --strict --repeats 10
if [[ -f bench/eval_throughput.py ]]; then
    section "eval_throughput" 150 "$PY" bench/eval_throughput.py
else
    echo
    echo "=== eval_throughput: skipped, bench/eval_throughput.py does not exist ==="
fi

echo
echo "gpu_check: $((SECONDS - started)) s in all"
if ((${#failed[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: all checks passed"
