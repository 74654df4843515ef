#!/usr/bin/env bash
# The prepared GPU measurement (run on the device machine from the repository root, after
# bench/gpu-prepare.sh here): fused-kernel checks, our bench (components in both kernel modes,
# G2, G3, peak memory) and diffusers' on the same SD 1.5 shapes, same card, same run; sessions
# sharing the device (1 to 16 at SD 1.5 512²); then an end-to-end generation through the
# server. Everything lands in $OUT (or ./gpu-out).
# A dry run on a CPU machine: STEPSTREAM_BIN=target/release/stepstream DEVICE=cpu DTYPE=f32
# PYDEV=cpu PYTHON=/path/to/python-with-torch SIZE=64 G3SIZE=64 STEPS=2 RUNS=1 bash bench/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"; mkdir -p "$OUT"
SIZE="${SIZE:-512}" STEPS="${STEPS:-30}" RUNS="${RUNS:-10}"
G3SIZE="${G3SIZE:-512}" DEVICE="${DEVICE:-cuda:0}" DTYPE="${DTYPE:-f16}" PYDEV="${PYDEV:-cuda}" PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -n "${STEPSTREAM_BIN:-}" ]; then  # a dry run elsewhere: a ready binary, no GPU runner
  SS="$STEPSTREAM_BIN"
else
  BIN=/tmp/stepstream
  xz -dc .gpu/stepstream.xz > "$BIN" && chmod +x "$BIN"
  SS="bash .gpu/gpu-run.sh $BIN"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1

echo "== ours: SD 1.5 shapes (zero weights), $DEVICE $DTYPE, ${SIZE}x${SIZE}, ${STEPS} steps"
timeout 300 $SS bench --random-weights sd15 --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" \
  --steps "$STEPS" --runs "$RUNS" --g3-size "$G3SIZE" --kernels both --skip-concurrency \
  2>"$OUT/ours.log" | tee "$OUT/ours.txt"

echo "== diffusers: same shapes (random weights), $PYDEV $DTYPE"
# COMPILE=1 also times diffusers' UNet under torch.compile (the stretch goal; about a minute more).
timeout 300 $PYTHON bench/diffusers_bench.py --device "$PYDEV" --dtype "$DTYPE" --size "$SIZE" --steps "$STEPS" \
  --runs "$RUNS" ${COMPILE:+--compile} 2>"$OUT/diffusers.log" | tee "$OUT/diffusers.txt"

echo "== G1: ours / diffusers"
$PYTHON bench/compare.py "$OUT/ours.txt" "$OUT/diffusers.txt" | tee "$OUT/g1.txt"

echo "== sessions sharing the device: SD 1.5 shapes, ${SIZE}x${SIZE}, 1 to 16 sessions"
timeout 240 $SS bench --random-weights sd15 --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" \
  --steps "${CSTEPS:-10}" --skip-components --skip-g2 --skip-g3 --sessions 1,2,4,8,16 \
  --concurrency-rounds 1 2>"$OUT/sessions.log" | tee "$OUT/sessions.txt"

echo "== end to end: embedded tiny model served on $DEVICE $DTYPE, generate with a CFG cutoff"
$SS serve --addr 127.0.0.1:50077 --device "$DEVICE" --dtype "$DTYPE" >"$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do grep -q "listening" "$OUT/serve.log" && break; sleep 0.2; done
timeout 60 $SS generate --addr 127.0.0.1:50077 --prompt "an astronaut riding a horse" --seed 1 \
  --steps 10 --cfg-cutoff 0.4 --out "$OUT/tiny.png" 2>&1 | tail -3
kill "$pid"; wait "$pid" 2>/dev/null
grep -E "fused kernel|kernels checked" "$OUT/serve.log" | head -20
echo done
