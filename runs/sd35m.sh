#!/usr/bin/env bash
# The paper's run on Stable Diffusion 3.5 Medium: released Flow-GRPO teachers -> exact merge (cold
# start) -> multi-teacher OPD with MAR -> evaluation, on 8 GPUs per node.
#
#   bash runs/sd35m.sh --dry-run      # check GPUs, data, model, teachers, servers; print the plan
#   bash runs/sd35m.sh                # run it (every node runs this same script when NNODES > 1)
#
# Settings (environment variables):
#   MODEL              stabilityai/stable-diffusion-3.5-medium
#   DATA_ROOT          dataset                          Flow-GRPO's dataset/ folder (geneval, ocr, pickscore)
#                      from git clone https://github.com/yifan123/flow_grpo (docs/paper_run.md)
#   OUT                out/sd35m                        on a shared filesystem when NNODES > 1
#   GENEVAL_TEACHER    jieliu/SD3.5M-FlowGRPO-GenEval   hub id or local LoRA folder, likewise:
#   OCR_TEACHER        jieliu/SD3.5M-FlowGRPO-Text
#   PICKSCORE_TEACHER  jieliu/SD3.5M-FlowGRPO-PickScore
#   DEQA_TEACHER       out/teacher-deqa/final           the MAR anchor, a local folder you train first (see below)
#   GENEVAL_URL, DEQA_URL                               reward servers for the evaluation (README, rewards.py)
#   NPROC_PER_NODE 8, NNODES 1, MASTER_ADDR, MASTER_PORT 29500, RDZV_ID sd35m   torchrun rendezvous
#   MAX_RESTARTS 3     torchrun restarts a job whose process died (OOM, a lost GPU); --resume auto continues it
#   PYTHON python
#   CHECK_GPUS 1       0: skip the check that CUDA sees NPROC_PER_NODE GPUs (e.g. on a login node)
#
# Before anything runs, every problem found is listed at once: data files, local folders, CUDA's
# GPUs, each hub id (in the local cache, or answering on the hub: gated, missing, offline), and each
# reward server (it must score one image). The plan passes 128 T5 tokens explicitly (the released
# setting); LoRA targets, precision (fp16 on GPU) and shift are the stages' defaults.
#
# Expected (the Flow-OPD model card, SD3.5-M; DeQA 1-5, PickScore the raw logit):
#   Model                   GenEval  OCR   DeQA  PickScore  Average
#   SD-3.5-M (base)         0.63     0.59  4.07  21.64      0.72
#   Flow-OPD (Merge Init)   0.92     0.94  4.35  23.08      0.90
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "runs/sd35m.sh: unknown argument $arg (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
DATA_ROOT=${DATA_ROOT:-dataset}
OUT=${OUT:-out/sd35m}
GENEVAL_TEACHER=${GENEVAL_TEACHER:-jieliu/SD3.5M-FlowGRPO-GenEval}
OCR_TEACHER=${OCR_TEACHER:-jieliu/SD3.5M-FlowGRPO-Text}
PICKSCORE_TEACHER=${PICKSCORE_TEACHER:-jieliu/SD3.5M-FlowGRPO-PickScore}
DEQA_TEACHER=${DEQA_TEACHER:-out/teacher-deqa/final}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-sd35m}
MAX_RESTARTS=${MAX_RESTARTS:-3}
PYTHON=${PYTHON:-python}
TEACHERS="geneval=$GENEVAL_TEACHER,ocr=$OCR_TEACHER,pickscore=$PICKSCORE_TEACHER"

if [ "$NNODES" -gt 1 ]; then
    LAUNCH=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d
            --rdzv_endpoint "${MASTER_ADDR:-}:$MASTER_PORT" --rdzv_id "$RDZV_ID" --max-restarts "$MAX_RESTARTS")
else
    LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
fi
# single-process steps (the merge, the table) run once, on the node with NODE_RANK 0
FIRST_NODE=$([ "${NODE_RANK:-0}" = 0 ] && echo 1 || echo 0)

# ---- checks: everything a multi-hour run needs, before it starts

problems=()
DATASET_HINT="Flow-GRPO's dataset/ folder: git clone https://github.com/yifan123/flow_grpo"
for f in geneval/train_metadata.jsonl geneval/test_metadata.jsonl ocr/train.txt ocr/test.txt pickscore/train.txt pickscore/test.txt; do
    [ -f "$DATA_ROOT/$f" ] || problems+=("DATA_ROOT: $DATA_ROOT/$f is missing ($DATASET_HINT)")
done
is_hub_id() {  # owner/name that is not a local path
    [[ ! -e "$1" && "$1" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ && "$1" != .* ]]
}
is_lora() {
    [ -f "$1/adapter_config.json" ] || [ -f "$1/pytorch_lora_weights.safetensors" ] || [[ -f "$1" && "$1" == *.safetensors ]]
}
if ! is_hub_id "$MODEL" && [ ! -f "$MODEL/model_index.json" ]; then
    problems+=("MODEL: $MODEL is neither a hub id nor a diffusers folder (model_index.json)")
fi
for var in GENEVAL_TEACHER OCR_TEACHER PICKSCORE_TEACHER; do
    path=${!var}
    if ! is_hub_id "$path" && ! is_lora "$path"; then
        problems+=("$var: $path is neither a hub id nor a LoRA folder (adapter_config.json or pytorch_lora_weights.safetensors)")
    fi
done
if ! is_lora "$DEQA_TEACHER"; then
    problems+=("DEQA_TEACHER: $DEQA_TEACHER is not a LoRA folder. Train the aesthetic teacher (the MAR anchor) first,
      on all prompts with DeQA:PickScore 4:6 (it writes <out>/final; DEQA_TEACHER=out/teacher-deqa/final by default):
      ${LAUNCH[*]} teacher_grpo.py --model $MODEL --data-root $DATA_ROOT --tasks all \
--reward deqa:0.4,pickscore:0.6 --max-sequence-length 128 --out out/teacher-deqa")
fi
for var in GENEVAL_URL DEQA_URL; do
    [ -n "${!var:-}" ] || problems+=("$var is not set: the evaluation needs its reward server (see README)")
done
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    problems+=("MASTER_ADDR is not set: with NNODES=$NNODES every node needs the rendezvous host")
fi
# what needs Python: CUDA's GPUs, hub ids (cache or hub), one scored image per reward server
hub=()
for var in MODEL GENEVAL_TEACHER OCR_TEACHER PICKSCORE_TEACHER; do
    if is_hub_id "${!var}"; then hub+=(--hub "$var=${!var}"); fi
done
gpus=$NPROC_PER_NODE
[ "${CHECK_GPUS:-1}" = 0 ] && gpus=0
if found=$("$PYTHON" runs/preflight.py --gpus "$gpus" "${hub[@]}" --geneval-url "${GENEVAL_URL:-}" \
           --deqa-url "${DEQA_URL:-}" --data-root "$DATA_ROOT"); then
    while IFS= read -r line; do [ -z "$line" ] || problems+=("$line"); done <<< "$found"
else
    problems+=("runs/preflight.py failed (its error is above): has $PYTHON requirements.txt?")
fi
if [ ${#problems[@]} -gt 0 ]; then
    printf 'runs/sd35m.sh: %s\n' "${problems[@]}" >&2
    exit 1
fi

# ---- the plan

step() {  # print a command, and run it unless --dry-run
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}
describe() {
    if is_hub_id "$1"; then echo "$1 (hub)"; else echo "$1 (local)"; fi
}

echo "model $MODEL, data $DATA_ROOT, out $OUT, $NNODES node(s) x $NPROC_PER_NODE GPUs"
echo "teachers: geneval $(describe "$GENEVAL_TEACHER"), ocr $(describe "$OCR_TEACHER"), pickscore $(describe "$PICKSCORE_TEACHER")"
echo "MAR anchor: $DEQA_TEACHER (local)"
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"

echo "# stage 2: cold start, the exact merge of the three teachers (evaluated as merge-init)"
if [ "$FIRST_NODE" = 1 ] && [ ! -d "$OUT/merge-init/final" ]; then
    step "$PYTHON" cold_start.py --model "$MODEL" --init merge --teachers "$TEACHERS" --out "$OUT/merge-init"
fi

echo "# stage 3: multi-teacher OPD from the merge init, MAR to the aesthetic teacher (opd.py merges in-process)"
if [ ! -d "$OUT/opd/final" ]; then
    step "${LAUNCH[@]}" opd.py --model "$MODEL" --data-root "$DATA_ROOT" --teachers "$TEACHERS" \
        --mar-teacher "$DEQA_TEACHER" --init merge --mar 0.1 --max-sequence-length 128 \
        --out "$OUT/opd" --resume auto
fi

echo "# evaluation: 40 ODE steps, CFG 4.5, the test splits; resumable, rows in $OUT/eval/table.md"
EVAL=(evaluate.py --model "$MODEL" --data-root "$DATA_ROOT" --max-sequence-length 128
      --out "$OUT/eval")
step "${LAUNCH[@]}" "${EVAL[@]}" --name base
step "${LAUNCH[@]}" "${EVAL[@]}" --name merge-init --adapters "$OUT/merge-init/final"
step "${LAUNCH[@]}" "${EVAL[@]}" --name flow-opd --adapters "$OUT/opd/final"

echo "# expected (model card):  base 0.63 / 0.59 / 4.07 / 21.64, Average 0.72;  Flow-OPD 0.92 / 0.94 / 4.35 / 23.08, Average 0.90"
if [ "$DRY_RUN" = 0 ] && [ "$FIRST_NODE" = 1 ]; then
    cat "$OUT/eval/table.md"
fi
