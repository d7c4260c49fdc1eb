#!/usr/bin/env bash
# The runs that need a GPU, on the device machine (4 GPUs), in steps that fit 10-minute calls:
#
#   benchmarks/gpu_block.sh setup            # wheels from .whl/, decode CIFAR-10 once
#   benchmarks/gpu_block.sh launch           # four training queues, one per GPU, in the background
#   benchmarks/gpu_block.sh launch-mnist GPUS EPOCHS  # MNIST/Fashion-MNIST SBP runs, one queue per listed GPU
#   benchmarks/gpu_block.sh launch-dense RUN..   # the dense nets of these runs, the n-th on GPU n, in the background
#   benchmarks/gpu_block.sh launch-plan FILE  # the queues a plan file lists (e.g. benchmarks/plans/sbp-variants.txt)
#   benchmarks/gpu_block.sh launch-plan-measure FILE  # launch-plan, then launch-measure of every spec it lists
#   benchmarks/gpu_block.sh launch-measure Q@G SPEC [Q@G SPEC]..  # measure each run once queue Q is done (CUDA on GPU G)
#   benchmarks/gpu_block.sh launch-zoo GPU [ARGS..]  # python -m benchmarks.methods_zoo on CUDA in the background (packed)
#   benchmarks/gpu_block.sh wait SECONDS     # keep the machine busy until the queues and measurers end; progress
#   benchmarks/gpu_block.sh measure [SPEC..] # errors, MACs, units, ORT CPU (2 threads) and CUDA latency
#   benchmarks/gpu_block.sh measure-cuda     # only the CUDA latency, added to the results of measure
#   benchmarks/gpu_block.sh measure-cuda-dir DIR  # CUDA latency of runs trained elsewhere (their models carried in DIR)
#   benchmarks/gpu_block.sh latency [MODELS] [BATCHES]  # the --target ort-cuda table (python -m benchmarks.latency_targets)
#   benchmarks/gpu_block.sh pack             # result files to $OUT
#
# docs/experiments.md says which plan reruns which experiment, and how a lease goes from the first call to `pack`.
# Results land flat in $RESULTS (RUN.json, as `--results` names an experiment's folder): move each into its
# experiment's folder under benchmarks/results/ when they come back.
# A path carried in one call and not named in a later call's carry is removed on the machine, so
# setup copies the data out of the tree (to /tmp/gpu-data): later calls may carry other things (the
# staged parts of onnxruntime-gpu). torch.compile of a whole SBP step takes minutes when several runs
# compile at once (329 s for VGG beside 7 others).
# The machine is given back after 30 s without a call, and all of it is lost (work folders, results
# not yet packed): keep the calls coming (wait, or the staging calls), do local work during a long
# `wait`, and `pack` as soon as a batch of runs has ended. Two queues that fail at one moment leave
# their work folders resumable: launch a plan of the same specs again and each skips what it has.
# Data travels in .gpu-data/ (ignored): cifar10-jpeg/ and pretrained/resnet-cifar10/ from
# ../shared/data, mnist/. onnxruntime-gpu is staged to /tmp/site with ../shared/tools/device-stage.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}
export ONNXPRUNE_DATA=/tmp/gpu-data
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
LOG=/tmp/gpu_runs
RUN="python3 -m benchmarks.paper_table"
# Results go outside the repository copy: each device call syncs the tree to the local checkout,
# which would delete result folders the checkout does not have yet.
RESULTS=${PAPER_RESULTS:-/tmp/paper-results}

queue() {  # queue INDEX GPU "RUN METHOD [flags]" ...
  local i=$1 gpu=$2; shift 2
  {
    for spec in "$@"; do
      echo "=== $spec $(date +%T)"
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$gpu $RUN $spec --device cuda --stage train --quiet 2>&1 | grep -v Warning | tail -4
    done
    echo "=== queue $i done $(date +%T)"
    touch "$LOG/q$i.done"
  } > "$LOG/q$i.log" 2>&1
}

case "${1:-}" in
  setup)
    mkdir -p "$ONNXPRUNE_DATA" && cp -r .gpu-data/. "$ONNXPRUNE_DATA"/ || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    python3 - <<'PY'
import time
from onnxprune.data import load_dataset
t = time.time()
for split in ("train", "test"):
    x, y = load_dataset("cifar10", split=split, as_uint8=True)
    print(split, x.shape, y.shape)
print(f"CIFAR-10 decoded in {time.time() - t:.1f} s")
PY
    nvidia-smi -L
    python3 -c "import torch, onnxruntime as o; print(torch.__version__, torch.cuda.device_count(), o.__version__, o.get_available_providers())"
    ;;
  launch)
    rm -rf "$LOG"; mkdir -p "$LOG"
    export -f queue; export RUN LOG
    setsid nohup bash -c 'queue 0 0 "cifar-vgg15 --method sbp"' >/dev/null 2>&1 &
    setsid nohup bash -c 'queue 1 1 "cifar-vgg --method sbp" "cifar-vgg --method rbp --no-baseline" "cifar-vgg --method turbo-vbi --no-baseline"' >/dev/null 2>&1 &
    setsid nohup bash -c 'queue 2 2 "cifar-resnet56 --method sbp" "mnist-lenet300 --method sbp" "mnist-lenet300 --method rbp --no-baseline" "mnist-lenet300 --method turbo-vbi --no-baseline"' >/dev/null 2>&1 &
    setsid nohup bash -c 'queue 3 3 "mnist-lenet500 --method sbp" "mnist-lenet5 --method sbp" "mnist-lenet5 --method rbp --no-baseline" "mnist-lenet5 --method turbo-vbi --no-baseline"' >/dev/null 2>&1 &
    sleep 5; echo launched; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    ;;
  launch-mnist)
    # e.g. launch-mnist "1 2 3 0" 100: the four MNIST-family SBP runs at 100 epochs, the n-th on the n-th GPU;
    # a GPU listed as "0+" starts after the file $LOG/go0 appears (when the GPU is busy with timing first)
    mkdir -p "$LOG"; rm -f "$LOG"/q*.done
    export -f queue; export RUN LOG
    read -r -a gpus <<< "${2:-0 1 2 3}"; e=${3:-100}; i=0
    for spec in mnist-lenet5 mnist-lenet500 fmnist-lenet5 fmnist-lenet500; do
      g=${gpus[$i]}
      if [[ $g == *+ ]]; then g=${g%+}; pre="while [ ! -e $LOG/go$g ]; do sleep 2; done;"; else pre=""; fi
      setsid nohup bash -c "$pre queue $i $g '$spec --method sbp --epochs $e'" >/dev/null 2>&1 &
      i=$((i + 1))
    done
    sleep 3; echo "launched ($e epochs)"
    ;;
  launch-dense)
    shift; mkdir -p "$LOG"; g=0
    for run in "$@"; do
      CUDA_VISIBLE_DEVICES=$g setsid nohup $RUN "$run" --device cuda --stage dense --quiet > "$LOG/dense-$run.log" 2>&1 &
      g=$((g + 1))
    done
    sleep 2; echo "dense nets launched: $*"
    ;;
  launch-plan)
    # launch-plan FILE: lines "QUEUE GPU SPEC..." (# comments); the specs of one queue run in turn,
    # queues run at once (several may share a GPU). Lines "dense GPU SPEC" run first, in order.
    # GPU may be "G:FILE": the queue starts on GPU G once FILE exists (e.g. a dense net trained elsewhere).
    # A second plan launched while the first runs adds its queues (numbered apart): wait waits for all of them.
    mkdir -p "$LOG"
    export -f queue; export RUN LOG
    grep -E '^dense ' "$2" | while read -r _ g spec; do
      echo "=== dense: $spec"
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$g $RUN $spec --device cuda --stage dense --quiet 2>&1 | grep -v Warning | tail -2
    done
    queues=$(grep -vE '^(#|dense |$)' "$2" | awk '{print $1}' | sort -u)
    for q in $queues; do rm -f "$LOG/q$q.done"; echo "$q" >> "$LOG/queues"; done
    sort -u -o "$LOG/queues" "$LOG/queues"; wc -l < "$LOG/queues" > "$LOG/nqueues"
    for q in $queues; do
      g=$(grep -E "^$q " "$2" | head -1 | awk '{print $2}')
      after=""; if [[ $g == *:* ]]; then after=${g#*:}; g=${g%%:*}; fi
      specs=()
      while read -r _ _ spec; do specs+=("$spec"); done < <(grep -E "^$q " "$2")
      setsid nohup bash -c "while [ -n '$after' ] && [ ! -e '$after' ]; do sleep 5; done; queue $q $g $(printf "'%s' " "${specs[@]}")" >/dev/null 2>&1 &
    done
    sleep 3; echo "launched $(echo "$queues" | wc -l) queues ($(cat "$LOG/nqueues") in all)"; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    ;;
  launch-plan-measure)
    bash "$0" launch-plan "$2" || exit 1
    measured=()
    while read -r q g spec; do measured+=("$q@${g%%:*}" "$spec"); done < <(grep -vE '^(#|dense |$)' "$2")
    bash "$0" launch-measure "${measured[@]}"
    ;;
  launch-measure)
    # launch-measure Q@G SPEC [Q@G SPEC]..: once $LOG/qQ.done exists, measure SPEC (errors, MACs, CPU latency,
    # then CUDA latency, on GPU G), each run in its own background process; logs in $LOG/m*.log, then $LOG/mQ.done
    # (a plan's queue on "G:/tmp/gpu_runs/mQ.done" starts after it: latency not timed beside its training)
    shift; mkdir -p "$LOG" "$RESULTS"; export RESULTS
    while [ $# -ge 2 ]; do
      q=${1%@*} g=${1#*@} spec=$2; shift 2
      CUDA_VISIBLE_DEVICES=$g setsid nohup bash -c "while [ ! -e $LOG/q$q.done ]; do sleep 5; done; echo \"=== \$(date +%T) $spec\";
        $RUN $spec --stage measure --rounds 15 --quiet --results $RESULTS 2>&1 | tail -2;
        $RUN $spec --stage measure-cuda --rounds 20 --quiet --results $RESULTS 2>&1 | tail -2; echo \"=== done \$(date +%T)\";
        touch $LOG/m$q.done" \
        > "$LOG/m$q-$(echo "$spec" | tr -c 'A-Za-z0-9.\n-' _ | cut -c1-120).log" 2>&1 &
    done
    sleep 1; echo "measurers waiting: $(ls "$LOG"/m*.log | wc -l)"
    ;;
  launch-zoo)
    # launch-zoo GPU [ARGS..]: every MNIST/CIFAR-10 architecture through RBP and Turbo-VBI (methods_zoo ARGS);
    # ZOO=NAME (default methods-zoo) runs another zoo beside it: results in $RESULTS/NAME.json, log $LOG/NAME.log
    g=$2; shift 2; z=${ZOO:-methods-zoo}; tag=${z#methods-}; mkdir -p "$LOG" "$RESULTS"
    CUDA_VISIBLE_DEVICES=$g setsid nohup bash -c "python3 -m benchmarks.methods_zoo --device cuda \
      --work benchmarks/work/$z --results $RESULTS --run $z $* 2>&1 | grep -v Warning; touch $LOG/$tag.done" \
      > "$LOG/$tag.log" 2>&1 &
    sleep 1; echo "methods zoo $z launched on GPU $g"
    ;;
  wait)
    limit=${2:-540}; start=$(date +%s); want=$(cat "$LOG/nqueues" 2>/dev/null || echo 4)
    while [ $(( $(date +%s) - start )) -lt "$limit" ]; do
      n=$(ls "$LOG"/q*.done 2>/dev/null | wc -l)
      m=$(ls "$LOG"/m*.log 2>/dev/null | wc -l); md=$(grep -l "=== done" "$LOG"/m*.log 2>/dev/null | wc -l)
      zoo_busy=0  # every zoo launched (ZOO=NAME: log $LOG/zoo-*.log) until its .done appears
      for zl in "$LOG"/zoo*.log; do [ -e "$zl" ] && [ ! -e "${zl%.log}.done" ] && zoo_busy=1; done
      [ "$n" -ge "$want" ] && [ "$md" -ge "$m" ] && [ "$zoo_busy" = 0 ] && break
      sleep 15
    done
    for f in "$LOG"/q*.log "$LOG"/m*.log "$LOG"/zoo*.log; do [ -e "$f" ] && { echo "--- $f"; tail -6 "$f"; }; done
    ls "$LOG"/q*.done 2>/dev/null
    for d in benchmarks/work/*/; do
      python3 - "$d" <<'PY'
import sys, json, pathlib, torch
d = pathlib.Path(sys.argv[1])
for ck in sorted(d.rglob("*.pt")):
    if ck.name.endswith("_final.pt"):
        continue
    try:
        s = torch.load(ck, map_location="cpu", weights_only=False)
        h = s["history"][-1]
        print(f"{ck}: epoch {s['epoch']} acc {h['accuracy']:.4f} kept {h['kept_fraction']:.3f} {h['seconds']:.1f}s/epoch")
    except Exception as e:
        print(ck, type(e).__name__)
PY
    done
    ;;
  measure|measure-cuda)
    # measure: errors, MACs, ORT CPU latency, then CUDA latency; measure-cuda: only the CUDA latency
    # (or only the runs named after it: measure "mnist-lenet5 --method sbp" ...)
    W=benchmarks/work
    mode=$1; shift
    specs=("$@")
    [ ${#specs[@]} -gt 0 ] || specs=("cifar-vgg15 --method sbp" "cifar-vgg --method sbp" "cifar-vgg --method rbp" "cifar-vgg --method turbo-vbi" \
                "mnist-lenet500 --method sbp" "mnist-lenet5 --method sbp" "mnist-lenet5 --method rbp --work $W/l5-rbp" \
                "mnist-lenet5 --method turbo-vbi --work $W/l5-tvbi" "mnist-lenet300 --method sbp" \
                "mnist-lenet300 --method rbp --work $W/l300-rbp" "mnist-lenet300 --method turbo-vbi --work $W/l300-tvbi" \
                ${EXTRA_SPEC:+"$EXTRA_SPEC"})
    for spec in "${specs[@]}"; do
      if [ "$mode" = measure ]; then
        # shellcheck disable=SC2086
        $RUN $spec --stage measure --rounds 15 --quiet --results "$RESULTS" 2>&1 | tail -1
      fi
      # shellcheck disable=SC2086
      $RUN $spec --stage measure-cuda --rounds 20 --quiet --results "$RESULTS" 2>&1 | tail -1
    done
    ;;
  measure-cuda-dir)
    # measure-cuda-dir DIR: adds CUDA latency to results of runs trained elsewhere (e.g. on a CPU):
    # DIR/results/LABEL.json and DIR/work/LABEL/ holding dense.onnx, tp.onnx if any, and pruned.onnx
    # (in a subfolder named after the method for rbp and turbo-vbi, as paper_table lays out its work folders)
    mkdir -p "$RESULTS"
    for res in "$2"/results/*.json; do
      label=$(basename "$res" .json); cp "$res" "$RESULTS/"
      read -r run method tag < <(python3 - "$res" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
method, tag = d["method"], d["config"].get("tag") or ""
suffix = "-" + method.replace("-", "") + (f"-{tag}" if tag else "")
print(d["run"][: -len(suffix)], method, tag or "-")
PY
)
      tagged=(); [ "$tag" != "-" ] && tagged=(--tag "$tag")
      echo "=== $label ($run --method $method ${tagged[*]})"
      $RUN "$run" --method "$method" "${tagged[@]}" --work "$2/work/$label" --stage measure-cuda --rounds 20 --quiet \
        --results "$RESULTS" 2>&1 | grep -v Warning | tail -3
    done
    ;;
  latency)
    python3 -m benchmarks.latency_targets --target ort-cuda --batch ${3:-1 64} --models ${2:-mobilenetv2 mnasnet resnet50} \
      --skip-cli --rounds 20 --budget 30 --results "$RESULTS" 2>&1 | grep -v Warning | tail -12
    ;;
  pack)
    mkdir -p "$OUT"
    [ -d "$RESULTS" ] && tar czf "$OUT/results.tgz" -C "$RESULTS" .
    # the trained models and stage times of every run (ONNX files, final states, json), for measuring elsewhere
    # (not the methods zoos' nets: their result.json holds what the report shows)
    (cd benchmarks/work && find . -path './methods-zoo*' -prune -o \( -name '*.onnx' -o -name '*_final.pt' -o -name '*.json' \) \
      -size -4M -print0 | \
      tar czf "$OUT/work.tgz" --null -T -)
    # work.tgz outgrows what comes back (16 MiB a file) once several runs train: the dense nets alone, so a later
    # lease can start from the same one (a run's --dense-dir holding dense_final.pt trains no dense net)
    # (a seed's work folder holds its own dense.onnx, the same net exported: only the folders that trained one)
    (cd benchmarks/work && find . -maxdepth 2 -name 'dense_final.pt' -size -6M -printf '%h\n' | while read -r d; do
      printf '%s\0' "$d/dense_final.pt"; [ -e "$d/dense.onnx" ] && printf '%s\0' "$d/dense.onnx"; done | \
      tar czf "$OUT/dense.tgz" --null -T -)
    cp "$LOG"/q*.log "$OUT/" 2>/dev/null; tar czf "$OUT/logs.tgz" -C "$LOG" . 2>/dev/null; rm -f "$OUT"/q*.log
    ls -la "$OUT"
    ;;
  *)
    sed -n 2,17p "$0"; exit 2 ;;
esac
