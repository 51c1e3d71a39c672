#!/usr/bin/env bash
# Steps of the H100 benchmark, run on a CUDA machine from the repository root:
#   bash bench/run_h100.sh install   # wheels carried in .whl1/.whl2/.whl3 (see docs/benchmarks.md)
#   bash bench/run_h100.sh prepare   # random-weight Mistral-7B-shaped checkpoint + synthetic data
#   bash bench/run_h100.sh stock     # the stock TRL baseline, 25 steps (DATA=/tmp/bench-long: long-tailed data)
#   bash bench/run_h100.sh stock-long 32768  # the stock stack at that length (one document a micro-batch), 8 steps
#   bash bench/run_h100.sh tokens    # our data layer's token ids of the first 4,000 examples, as JSON
#   bash bench/run_h100.sh unsloth-install  # Unsloth's own environment (.whlu, .devsite-unsloth) in $USITE
#   bash bench/run_h100.sh unsloth   # Unsloth on those token ids, LoRA dropout 0.05 and 0, 30 steps each
#   bash bench/run_h100.sh ablation [ablation.py args...]  # speed levers one at a time (+ profile)
#   bash bench/run_h100.sh liger       # the Liger kernels one at a time
#   bash bench/run_h100.sh loss-match  # stock vs optimized loss and gradients on one fixed batch
#   bash bench/run_h100.sh loss-match-long  # the same at LENGTHS (32768 8192): 2 documents packed a row
#   bash bench/run_h100.sh whole       # the shipped config through `qlora train`, 100 steps
#   bash bench/run_h100.sh versions    # library versions, for the results file
#   bash bench/run_h100.sh dropout-kernels  # torch's LoRA dropout vs the Triton kernels, one projection; GPU smoke tests
#   bash bench/run_h100.sh curve-stock|curve-ours|curve-compare   # 300-step loss curves, stock vs ours
#   bash bench/run_h100.sh plan [qlora plan args...]     # the planner on the same config
#   bash bench/run_h100.sh train [qlora train args...]   # the real `qlora train` path
#   bash bench/run_h100.sh after-training  # generate (4-bit, bf16) and merge (bf16) times and memory (~3 min)
#   bash bench/run_h100.sh gpus N [--set k=v ...]  # the shipped config on N GPUs (`qlora train --gpus N`), 150 steps
#   bash bench/run_h100.sh gpus-collect  # those runs into one results file, a row per GPU count
#   bash bench/run_h100.sh long-prepare  # synthetic long documents (1K to 32K tokens) in /tmp/bench-doc
#   bash bench/run_h100.sh long 32768    # at that length: `qlora plan`, then STEPS (20) steps of `qlora train`
#   bash bench/run_h100.sh fast-start    # time to the first step: caches off, on and empty, on and filled
#   bash bench/run_h100.sh dpo [--set k=v ...]  # configs/dpo_h100.yaml, 20 steps on ~650-token pairs (plan + summary);
#                                        # TAG=name suffixes the result files
#   bash bench/run_h100.sh long-all      # one call: checkpoint, documents, then `long N` for each of LENGTHS
#   bash bench/run_h100.sh long-tokens 32768    # our data layer's ids of the documents at that length, as JSON
#   bash bench/run_h100.sh unsloth-long 32768   # Unsloth at that length, our config's layout (after unsloth-install)
#   bash bench/run_h100.sh unsloth-long-all     # unsloth-long N for each of LENGTHS
#   bash bench/run_h100.sh long-compare 32768   # `long N` then `unsloth-long N`, back to back
#   bash bench/run_h100.sh data-at-scale # 1M conversations prepared cold then warm on all cores (no GPU used)
# On a machine with the H100 stack installed (make setup-h100), only prepare/stock/train are needed.
set -euo pipefail
SITE=${SITE:-/tmp/site}
USITE=${USITE:-/tmp/site-unsloth}  # Unsloth pins transformers <= 5.17 and trl <= 1.15: its own folder
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/python_packages:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

data_wheels() {  # WHEELS=dir: the data layer's wheels (mistral-common, pydantic, ...) into $SITE, for steps needing no more
  if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  fi
}

case "${1:-}" in
  install)
    mkdir -p "$SITE"
    for d in .whl1 .whl2; do
      if compgen -G "$d/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $d/*.whl
      fi
    done
    [ -d .devsite ] && cp -r .devsite/* "$SITE"/
    if [ -f .whl3/cu12.tar.xz ]; then
      # The cu12 wheel's files (92 MB as a wheel; aarch64 stubs dropped), re-packed as tar.xz to fit one
      # 64 MiB transfer: `python -m zipfile -e <wheel> d && tar cf - -C d . | xz -9 > .whl3/cu12.tar.xz`.
      # Unpacked, not pip-installed: pip --target would skip (or, with --upgrade, replace) the
      # nvidia_cutlass_dsl folder that the base and core wheels share with this one.
      $PY -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" .whl3/cu12.tar.xz "$SITE"
    fi
    $PY - <<'PY'
import importlib, importlib.metadata as md
for name in ["torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "liger-kernel",
             "mistral-common", "flash-attn-4", "nvidia-cutlass-dsl-libs-cu12"]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PY
    ;;
  prepare)
    $PY bench/make_checkpoint.py /tmp/mistral-7b-random
    [ -f /tmp/bench-data/train.jsonl ] || $PY bench/make_chat_data.py --kind chat --train 15000 --val 300 --out /tmp/bench-data
    [ -f /tmp/bench-long/train.jsonl ] || $PY bench/make_chat_data.py --kind long --train 3000 --val 100 --out /tmp/bench-long
    $PY -m commands data stats /tmp/bench-long/train.jsonl --platform h100 --json > /tmp/bench-long/stats.json
    $PY -m commands data stats /tmp/bench-data/train.jsonl --platform h100 --json > /tmp/bench-data/stats.json
    mkdir -p "$OUT"
    cp /tmp/bench-data/stats.json "$OUT/chat-stats.json"
    cp /tmp/bench-long/stats.json "$OUT/long-stats.json"
    cat /tmp/bench-data/stats.json
    ;;
  tokens)  # DATA=/tmp/bench-long: the long-tailed data's (default /tmp/bench-data), into $DATA/tokens.json
    d=${DATA:-/tmp/bench-data}
    $PY bench/export_tokens.py --config bench/h100_bench.yaml --set "data.train_file=$d/train.jsonl" \
      --set "data.val_file=$d/val.jsonl" --out "$d/tokens.json"
    ;;
  unsloth-install)  # .whlu: unsloth-zoo + what Unsloth imports (trl 1.15, datasets 4.8, torchao, tyro, cut-cross-entropy,
    # msgspec, ...) and transformers 5.17 (Unsloth's highest), peft, accelerate; numpy, pyarrow, tokenizers, ... come
    # from the machine. No xformers: PyPI's 0.0.35 is built for torch 2.10 and does not load under 2.11.
    # .devsite-unsloth: the unsloth wheel unpacked without its 82 MB `studio` web app (never imported), and
    # bitsandbytes 0.50.2 unpacked with only its cuda130 and cpu libraries (docs/benchmarks.md "Reproduce").
    mkdir -p "$USITE"
    if compgen -G ".whlu/*.whl" >/dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$USITE" .whlu/*.whl
    fi
    [ -d .devsite-unsloth ] && cp -r .devsite-unsloth/* "$USITE"/
    PYTHONPATH="$USITE" $PY -c "import importlib.metadata as md, transformers, trl, peft, datasets, bitsandbytes
print({n: md.version(n) for n in ('unsloth', 'unsloth_zoo', 'transformers', 'trl', 'peft', 'accelerate',
       'datasets', 'bitsandbytes', 'torchao', 'torch')}, transformers.__file__)"
    ;;
  unsloth)  # each dropout in its own process (Unsloth patches classes on import); PYTHONPATH without $SITE.
    # DATA=/tmp/bench-long (after `DATA=/tmp/bench-long tokens`): the long-tailed data; DROPOUTS="0.05": one run;
    # TAG=name suffixes the result files
    for dropout in ${DROPOUTS:-0.05 0}; do
      PYTHONPATH="$USITE" $PY bench/unsloth_baseline.py --model /tmp/mistral-7b-random \
        --tokens "${DATA:-/tmp/bench-data}/tokens.json" --rows 4 --accumulation 1 --dropout $dropout \
        --steps "${STEPS:-30}" --warmup "${WARMUP:-10}" --out "$OUT/unsloth-dropout-$dropout${TAG:+-$TAG}.json" || echo "unsloth dropout $dropout failed"
    done
    ;;
  stock)  # DATA=/tmp/bench-long: the long-tailed data (default /tmp/bench-data); TAG=name suffixes the result file
    $PY bench/stock_baseline.py --model /tmp/mistral-7b-random --data "${DATA:-/tmp/bench-data}" --steps "${STEPS:-25}" \
      --out "$OUT/stock${TAG:+-$TAG}.json"
    ;;
  stock-long)  # after long-prepare: the stock stack on the documents at length N: one document a micro-batch
    # (so no padding; no packing), the first 200 documents, the `long N` config's accumulation (8K 2, 16K 1, 32K 1), STEPS (8) steps; $OUT/stock-long-N.json
    n=${2:?"stock-long N: 8192, 16384 or 32768"}
    acc=$([ "$n" -le 8192 ] && echo 2 || echo 1)
    $PY bench/stock_baseline.py --model /tmp/mistral-7b-random --data /tmp/bench-doc --steps "${STEPS:-8}" \
      --logging-steps 1 --batch 1 --accumulation "$acc" --max-length "$n" --examples 200 --out "$OUT/stock-long-$n.json" \
      || echo "stock at $n failed"
    ;;
  ablation)
    shift
    if [ $# -eq 0 ]; then  # the levers one at a time (no-Liger variants first), then long-tailed data
      FOUR="training.batch_size=4 training.gradient_accumulation_steps=1"
      $PY bench/ablation.py --config bench/h100_bench.yaml --out "$OUT/ablation.json" --profile shipped \
        --variant "packed-fa=$FOUR cuda.use_liger=false cuda.fused_lora=false cuda.checkpointed_layers=all" \
        --variant "+liger=$FOUR cuda.fused_lora=false cuda.checkpointed_layers=all" \
        --variant "+fused-lora=$FOUR cuda.checkpointed_layers=all cuda.replay_dropout=false" \
        --variant "+24-checkpointed=$FOUR cuda.checkpointed_layers=24 cuda.replay_dropout=false" \
        --variant "+masks-replayed=$FOUR cuda.checkpointed_layers=24" \
        --variant "2x2-none-checkpointed=cuda.checkpointed_layers=all training.gradient_checkpointing=false" \
        --variant "shipped="
      $PY bench/ablation.py --config bench/h100_bench.yaml --out "$OUT/ablation-long.json" \
        --data-dir /tmp/bench-long --variant "shipped-long-data="
    else
      $PY bench/ablation.py --config bench/h100_bench.yaml --out "$OUT/ablation.json" "$@"
    fi
    ;;
  liger)  # the Liger kernels one at a time at the shipped checkpointing; in each process every variant
    # is a superset of the one before (Liger patches model classes and functions for the rest of a process).
    # RoPE runs on Liger's Triton kernel (the backend sets LIGER_KERNEL_IMPL_ROPE; common/config/schema.py says why)
    $PY bench/ablation.py --config bench/h100_bench.yaml --out "$OUT/ablation-liger-a.json" \
      --variant "no-liger=cuda.use_liger=false" \
      --variant "rms_norm=cuda.liger_kernels=[rms_norm]" \
      --variant "rms_norm+swiglu=cuda.liger_kernels=[rms_norm,swiglu]" \
      --variant "rope+rms_norm+swiglu=cuda.liger_kernels=[rope,rms_norm,swiglu]"
    $PY bench/ablation.py --config bench/h100_bench.yaml --out "$OUT/ablation-liger-b.json" \
      --variant "rope=cuda.liger_kernels=[rope]" \
      --variant "rope+swiglu=cuda.liger_kernels=[rope,swiglu]"
    ;;
  whole)  # ~8 min: 300 steps of the real `qlora train` path, evaluations and checkpoint saves every 100
    run="whole-$(date +%Y%m%d-%H%M%S)"
    $PY -m commands train --config bench/h100_bench.yaml --set training.max_steps=300 --set eval.eval_steps=100 \
      --set eval.save_steps=100 --set eval.logging_steps=5 --set tracking.run_name="$run"
    cp "/tmp/adapters/$run/metrics.jsonl" "$OUT/train-metrics.jsonl"
    cp "/tmp/adapters/$run/summary.json" "$OUT/train-summary.json"
    ;;
  dropout-kernels)  # one projection's dropout path, torch vs the Triton kernels, and the GPU smoke tests (~1 min)
    $PY bench/dropout_kernels.py --out "$OUT/dropout-kernels.json"
    $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_smoke.py 2>&1 | tail -15
    ;;
  versions)
    $PY - > "$OUT/versions.json" <<'PY'
import json, importlib.metadata as md, platform, torch
names = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel", "flash-attn-4",
         "nvidia-cutlass-dsl", "datasets", "mistral-common"]
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
versions["python"] = platform.python_version()
versions["cuda"] = torch.version.cuda
print(json.dumps(versions, indent=2))
PY
    ;;
  loss-match)
    $PY bench/loss_match.py --model /tmp/mistral-7b-random --data /tmp/bench-data/train.jsonl \
      --config bench/h100_bench.yaml --out "$OUT/loss-match.json"
    ;;
  loss-match-long)  # after long-prepare: the fixed-batch check at LENGTHS (default 32768 8192): 4 documents, 2 a
    # micro-batch packed into one row of up to N tokens (a document boundary mid-row), the config of that length
    for n in ${LENGTHS:-32768 8192}; do
      $PY bench/loss_match.py --model /tmp/mistral-7b-random --data /tmp/bench-doc/train.jsonl \
        --config "configs/training_config_h100_$((n / 1024))k.yaml" --examples 4 --micro 2 --longest "$n" --scan 100 \
        --out "$OUT/loss-match-$n.json" || echo "loss-match $n failed"
    done
    ;;
  gpus)  # `bash bench/run_h100.sh gpus 1`, then `gpus 2`: the shipped config on that many GPUs through
    # `qlora train --gpus N`, STEPS (default 150) steps with an evaluation and a checkpoint save halfway and
    # at the end; run folder /tmp/adapters/gpus-N. ~5 min on one H100, ~3 on two.
    n=${2:?"gpus N: how many GPUs"}; steps=${STEPS:-150}
    $PY -m commands train --config bench/h100_bench.yaml --gpus "$n" --run-name "gpus-$n" \
      --set training.max_steps="$steps" --set eval.eval_steps=$((steps / 2)) --set eval.save_steps=$((steps / 2)) \
      --set eval.logging_steps=5 --set tracking.report_to=none "${@:3}"  # more --set after N: every count alike
    ;;
  gpus-collect)  # the runs of `gpus N` into one results file, a row per GPU count (MACHINE: in words)
    runs=(); for d in /tmp/adapters/gpus-*; do runs+=(--run "${d##*gpus-}=$d"); done
    $PY bench/multi_gpu.py "${runs[@]}" --machine "${MACHINE:-$(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)}" \
      --out "$OUT/multi-gpu.json"
    ;;
  curve-stock)  # ~14 min on an H100: longer than one 10-minute call of our lent machines, so there it
    # runs detached (setsid nohup bash bench/run_h100.sh curve-stock > /tmp/curve-stock.log 2>&1 &)
    # and later calls poll for the file. Half the reference configuration's examples a step (4 x 2) at max length 3072,
    # to fit: ours matches it below (2 packed rows of 3072 ~ 8 examples, ~6.0K real tokens a step).
    $PY bench/stock_baseline.py --model /tmp/mistral-7b-random --data /tmp/bench-data --steps 300 \
      --logging-steps 10 --eval-steps 100 --accumulation 2 --max-length 3072 --out "$OUT/stock-300.json"
    ;;
  curve-ours)   # ~4 min: the same tokens per step as curve-stock, 300 steps, the shipped kernels
    $PY -m commands train --config bench/h100_bench.yaml --set training.batch_size=2 \
      --set data.max_seq_length=3072 --set tracking.run_name=curve --set eval.logging_steps=10
    cp /tmp/adapters/curve/metrics.jsonl "$OUT/curve-ours-metrics.jsonl"
    ;;
  curve-compare)
    $PY bench/compare_curves.py --stock "$OUT/stock-300.json" --ours "$OUT/curve-ours-metrics.jsonl" \
      --out "$OUT/curve.json" --plot "$OUT/curve-vs-stock.png"
    ;;
  long-prepare)
    [ -f /tmp/bench-doc/train.jsonl ] || $PY bench/make_chat_data.py --kind document --train 1200 --val 8 --out /tmp/bench-doc
    ;;
  long)  # configs/training_config_h100_{8k,16k,32k}.yaml on the random checkpoint and the documents;
    # $OUT/long-N.json: the plan's prediction, the run's summary, steady rate and time to the first step
    n=${2:?"long N: 8192, 16384 or 32768"}
    args=(--config "configs/training_config_h100_$((n / 1024))k.yaml" --set model.name_or_path=/tmp/mistral-7b-random
          --set data.train_file=/tmp/bench-doc/train.jsonl --set data.val_file=/tmp/bench-doc/val.jsonl
          --set tracking.output_dir=/tmp/adapters --set tracking.report_to=none)
    $PY -m commands plan "${args[@]}" --json > "/tmp/long-$n-plan.json" || echo "plan at $n failed"
    rm -rf "/tmp/adapters/long-$n"  # a rerun on a warm machine would be refused and report the old run
    start=$(date +%s.%N)
    $PY -m commands train "${args[@]}" --set training.max_steps="${STEPS:-20}" --set eval.logging_steps=1 \
      --set eval.eval_steps=100000 --set eval.save_steps=100000 --run-name "long-$n" || echo "train at $n failed"
    $PY bench/long_context.py --length "$n" --start "$start" --plan "/tmp/long-$n-plan.json" \
      --run "/tmp/adapters/long-$n" --out "$OUT/long-$n.json"
    ;;
  long-all)  # after `install`: the random checkpoint (kept if there), the documents, then each length in
    # LENGTHS (default 8192 16384 32768), each writing $OUT/long-N.json as soon as it ends (~8-9 min on an
    # H100 for all three, an ESTIMATE; a 10-minute call that stops early keeps the lengths already done)
    $PY bench/make_checkpoint.py /tmp/mistral-7b-random
    bash "$0" long-prepare
    for n in ${LENGTHS:-8192 16384 32768}; do bash "$0" long "$n"; done
    ;;
  long-tokens)  # /tmp/bench-doc/tokens-N.json: our data layer's ids and loss masks of the documents at length N
    # (the `long N` config's truncation), the first that hold 1.5x the tokens of STEPS (20) steps, and the config's
    # layout (micro-batch, accumulation, LoRA, optimizer) for bench/unsloth_baseline.py. Needs our `install`, or
    # only the data layer's wheels: WHEELS=.whl/data (18 MB).
    n=${2:?"long-tokens N: 8192, 16384 or 32768"}
    [ -d "$SITE/mistral_common" ] || data_wheels
    bash "$0" long-prepare
    $PY bench/export_tokens.py --config "configs/training_config_h100_$((n / 1024))k.yaml" \
      --set data.train_file=/tmp/bench-doc/train.jsonl --set data.val_file=/tmp/bench-doc/val.jsonl \
      --steps "${STEPS:-20}" --out "/tmp/bench-doc/tokens-$n.json"
    ;;
  unsloth-long)  # after unsloth-install: Unsloth on `long-tokens N` (made first when missing, with our environment),
    # the config's micro-batch x accumulation and LoRA, STEPS (20) steps, steady rate after step 5 as `long N`;
    # $OUT/unsloth-long-N.json (rate, peak memory, the attention kernel Unsloth picked). Its own process and PYTHONPATH.
    n=${2:?"unsloth-long N: 8192, 16384 or 32768"}
    [ -f "/tmp/bench-doc/tokens-$n.json" ] || bash "$0" long-tokens "$n"  # first: it brings the data layer's wheels
    [ -f /tmp/mistral-7b-random/config.json ] || $PY bench/make_checkpoint.py /tmp/mistral-7b-random
    PYTHONPATH="$USITE" $PY bench/unsloth_baseline.py --model /tmp/mistral-7b-random \
      --tokens "/tmp/bench-doc/tokens-$n.json" --steps "${STEPS:-20}" --warmup 5 --logging-steps 1 \
      --out "$OUT/unsloth-long-$n.json" || echo "unsloth at $n failed"
    ;;
  unsloth-long-all)  # unsloth-long N for each of LENGTHS (default 8192 16384 32768); ~7-8 min on an H100 (an ESTIMATE)
    for n in ${LENGTHS:-8192 16384 32768}; do bash "$0" unsloth-long "$n"; done
    ;;
  long-compare)  # ours (`long N`) then Unsloth (`unsloth-long N`) at one length, back to back on this machine:
    # $OUT/long-N.json and $OUT/unsloth-long-N.json. After `install` and `unsloth-install` (~3-6 min, an ESTIMATE)
    n=${2:?"long-compare N: 8192, 16384 or 32768"}
    [ -f /tmp/mistral-7b-random/config.json ] || $PY bench/make_checkpoint.py /tmp/mistral-7b-random
    bash "$0" long-prepare
    bash "$0" long "$n"
    bash "$0" unsloth-long "$n"
    ;;
  fast-start)  # after long-prepare: time to the first step of the 8K config, 2 steps each, on a fresh cache
    # folder: both caches off (before), on and empty (writes the 4-bit copy, compiles), on and filled (after).
    # Order bias: the first run fills the OS page cache (the base's files) and Triton's kernel cache for the
    # two after it, so "off" is a cold start and the other two are warm-disk starts.
    cache=/tmp/qlora-cache-fast-start; rm -rf "$cache" /tmp/adapters/fast-start-*; mkdir -p "$OUT"
    args=(--config configs/training_config_h100_8k.yaml --set model.name_or_path=/tmp/mistral-7b-random
          --set data.train_file=/tmp/bench-doc/train.jsonl --set data.val_file=/tmp/bench-doc/val.jsonl
          --set tracking.output_dir=/tmp/adapters --set tracking.report_to=none --set training.max_steps=2
          --set eval.eval_steps=100000 --set eval.save_steps=100000 --set cuda.cache_dir=$cache)
    for run in off:false cold:true warm:true; do
      name=${run%%:*}; on=${run#*:}
      $PY -m commands train "${args[@]}" --set cuda.quantized_cache=$on --set cuda.compile_cache=$on \
        --run-name "fast-start-$name" 2>&1 | tail -4 || echo "fast-start $name failed"
      cp "/tmp/adapters/fast-start-$name/summary.json" "$OUT/fast-start-$name.json" || echo "no summary for $name"
    done
    ;;
  dpo)  # configs/dpo_h100.yaml on the random checkpoint, ~650-token pairs, STEPS (20) steps: $OUT/dpo-plan.json
    # (the planner's prediction) and $OUT/dpo-summary.json (tokens/s of both rows of every pair, peak memory)
    $PY bench/make_checkpoint.py /tmp/mistral-7b-random
    [ -f /tmp/bench-dpo/src/train.jsonl ] || $PY bench/make_chat_data.py --kind chat --train 400 --val 16 --out /tmp/bench-dpo/src
    for split in train val; do
      [ -f /tmp/bench-dpo/$split.jsonl ] || $PY bench/make_pairs.py /tmp/bench-dpo/src/$split.jsonl /tmp/bench-dpo/$split.jsonl
    done
    args=(--config configs/dpo_h100.yaml --set model.name_or_path=/tmp/mistral-7b-random
          --set data.train_file=/tmp/bench-dpo/train.jsonl --set data.val_file=/tmp/bench-dpo/val.jsonl
          --set tracking.output_dir=/tmp/adapters --set tracking.report_to=none
          --set data.overlong=drop "${@:2}")  # 4 of the 400 generated prompts pass 2,048 tokens on their own
    tag=dpo${TAG:+-$TAG}
    mkdir -p "$OUT"
    $PY -m commands plan "${args[@]}" --json > "$OUT/$tag-plan.json" || echo "dpo plan failed"
    rm -rf "/tmp/adapters/$tag-bench"
    $PY -m commands train "${args[@]}" --set training.max_steps="${STEPS:-20}" --set eval.logging_steps=1 \
      --set eval.eval_steps=100000 --set eval.save_steps=100000 --run-name "$tag-bench" || echo "dpo train failed"
    cp "/tmp/adapters/$tag-bench/summary.json" "$OUT/$tag-summary.json" || true
    cp "/tmp/adapters/$tag-bench/metrics.jsonl" "$OUT/$tag-metrics.jsonl" || true
    ;;
  data-at-scale)  # $OUT/data-at-scale-h100.json: bench/data_at_scale.py (prepare_data cold, then warm) on 1,000,000
    # `--kind short` conversations (125,000 generated, written 8 times over, as docs/data-at-scale.md), one worker a
    # core. Needs only the data layer's packages (mistral-common, pydantic: `install` or WHEELS=dir of wheels).
    # PHASE=cold|warm runs one phase (two calls when one would pass 10 minutes); PHASE unset runs both.
    data_wheels
    d=/tmp/data-1m
    if [ ! -f $d/train.jsonl ]; then
      $PY bench/make_chat_data.py --kind short --train 125000 --val 0 --out $d/part
      for _ in 1 2 3 4 5 6 7 8; do cat $d/part/train.jsonl; done > $d/train.tmp && mv $d/train.tmp $d/train.jsonl
    fi
    mkdir -p "$OUT"
    $PY bench/data_at_scale.py --data $d/train.jsonl --cache /tmp/data-1m-cache ${PHASE:+--only "$PHASE"} \
      --out "$OUT/data-at-scale-h100${PHASE:+-$PHASE}.json"
    ;;
  plan)
    shift
    exec $PY -m commands plan --config bench/h100_bench.yaml "$@"
    ;;
  train)
    shift
    exec $PY -m commands train --config bench/h100_bench.yaml "$@"  # exec: signals reach Python
    ;;
  after-training)  # after prepare: a random r16 adapter (or ADAPTER=dir, e.g. the whole step's run folder)
    $PY bench/after_training.py --model /tmp/mistral-7b-random ${ADAPTER:+--adapter "$ADAPTER"} \
      --out "$OUT/after-training.json"
    ;;
  *)
    sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 2 ;;
esac
