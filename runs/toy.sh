#!/usr/bin/env bash
# The whole Flow-OPD recipe on the toy world, on a CPU, ending in the paper's table.
#
#   bash runs/toy.sh [--all] [--quick] [OUT_DIR]   # OUT_DIR defaults to out/toy (--quick: out/toy-quick)
#
# The recipe: toy world -> stage 1 teachers (geneval, ocr, pickscore, deqa = DeQA:PickScore 4:6 on
# all prompts, the MAR anchor) -> stage 2 merge cold start -> stage 3 OPD (opd-merge), its fast
# recipe (opd-fast) and the mixed-reward GRPO baseline given the same training time (grpo-mix) ->
# evaluate.py on every model, in distribution and on the out-of-distribution split ->
# <OUT>/table.md, table.json and claims.md (the paper's claims as paired comparisons,
# runs/toy_claims.py).
# --all then adds the claim's second seed (OPD and grpo-mix with --seed 1) and the ablations (MAR 0
# and 2, one teacher for every prompt, the SFT cold start, the unguided student) to the same table;
# `bash runs/toy.sh --all` after `bash runs/toy.sh` reuses the recipe's stages. Times:
# docs/toy_results.md.
# Two jobs run side by side with one thread each (2-core machines). A stage is reused only when it
# finished from the same world with the same flags (runs/stage_stamp.py), and an unfinished one
# resumes (--resume auto), so a rerun continues where it died. --quick is a smoke test of every
# stage (it implies --all) on a tiny world, not a result: its table says so.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
ALL=0
OUT=
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1; ALL=1 ;;
    --all) ALL=1 ;;
    -*) echo "unknown option $arg; usage: bash runs/toy.sh [--all] [--quick] [OUT_DIR]" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || { [ "$QUICK" = 1 ] && OUT=out/toy-quick || OUT=out/toy; }

if [ "$QUICK" = 1 ]; then
  WORLD=(--quick)
  GRPO=(--batch-size 2 --group-size 4 --max-steps 2 --sde-window trained)
  OPD=(--batch-size 2 --group-size 4 --max-steps 2)
  FAST=(--states 1)
  MIX_STEPS=2
  SFT=(--max-prompts 8 --max-steps 4 --batch-size 8 --caption-dropout 0.1 --sample-batch 16)
  EVAL=(--limit 8 --steps 10)
else
  WORLD=()
  # Why these settings (each measured, with its command, in docs/toy_results.md). GRPO: lr 1e-3:
  # the paper's 3e-4 does not move the toy's rewards in 40 steps, larger ones collapse them.
  # --timestep-fraction 0.5: train on the high-noise half of each rollout, where composition is
  # decided (more gain per second than all steps). --sde-window trained: noise only on the trained
  # steps and the ODE after them (MixGRPO): the toy's VAE is the identity, so the noise of late SDE
  # steps would stay in the rewarded pixels (python runs/sde_window_probe.py). 16 prompts per step:
  # 8 left the GenEval teacher level. --sample-batch: a step's whole batch sampled and decoded in
  # one pass, as the table was made (other chunk sizes need not give bit-identical floats on a CPU).
  GRPO=(--batch-size 16 --group-size 8 --max-steps 40 --lr 1e-3 --updates-per-step 1
        --timestep-fraction 0.5 --sde-window trained --sample-batch 128)
  # OPD: 60 steps of 8 prompts x 4 samples, supervised on every step of the rollout but the last:
  # the low-noise steps carry OCR's glyphs, the longer run with fewer samples PickScore's detail
  OPD=(--batch-size 8 --group-size 4 --max-steps 60 --lr 3e-3 --updates-per-step 1
       --timestep-fraction 0.99 --sample-batch 32)
  # the fast recipe: K low-noise states per rollout supervised instead of every trained step
  FAST=(--states 2)
  # grpo-mix gets opd-merge's training time as a step count: 32 GRPO steps take what 60 OPD steps
  # take on a 2-core machine (summed step times; claims.md prints both, as measured in the run).
  # A count, not --max-minutes, so that the table does not depend on the machine's load.
  MIX_STEPS=32
  # caption dropout 0.1 keeps more of the base's quality than none
  SFT=(--max-prompts 96 --max-steps 150 --batch-size 16 --caption-dropout 0.1 --sample-batch 16)
  EVAL=(--steps 20 --batch-size 64)
fi
COMMON=(--model "$OUT/base" --data-root "$OUT/data" --threads 1 --seed 0)
# the out-of-distribution split (toy.py: combinations no training prompt has), as extra columns
D="$OUT/data"
OOD=(--extra-tasks "geneval_ood=$D/geneval/ood_metadata.jsonl,ocr_ood=$D/ocr/ood.txt,pickscore_ood=$D/pickscore/ood.txt"
     --metrics "geneval_ood=toy:reward_geneval,ocr_ood=toy:reward_ocr,pickscore_ood=toy:reward_pickscore")
TRAIN=(--steps 10 --save-every 10 --eval-every 10 --micro-batch 32 --resume auto)
start=$SECONDS
elapsed() { echo "$(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"; }
wait_all() {  # wait for every background job; fail if any failed (plain `wait` would hide it)
  local rc=0 pid
  for pid in $(jobs -p); do wait "$pid" || rc=1; done
  return $rc
}

python toy.py --out "$OUT" --threads 2 "${WORLD[@]}"  # alone on the machine: both cores
# evaluations of another world (cached images and table rows) must not mix into this one's table
world=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['config'])" "$OUT/world.json")
if [ "$(cat "$OUT/world.stamp" 2>/dev/null)" != "$world" ]; then
  rm -rf "$OUT/cache" "$OUT/grids" "$OUT/table.md" "$OUT/table.json"
  echo "$world" > "$OUT/world.stamp"
fi

stage() {  # stage NAME SCRIPT ARGS...: reused only when it finished from this world with these flags
  local name=$1 state
  local cmd=("$2" "${COMMON[@]}" --out "$OUT/$name" "${@:3}")
  state=$(python runs/stage_stamp.py "$OUT/world.json" "$OUT/$name" -- "${cmd[@]}")
  if [ "$state" = reuse ]; then echo "== $name: done"; return; fi
  if [ "$state" = resume ]; then echo "== $name (resuming)"; else echo "== $name"; fi
  python "${cmd[@]}" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed; see $OUT/$name.log" >&2; tail -5 "$OUT/$name.log" >&2; return 1; }
  python runs/stage_stamp.py "$OUT/world.json" "$OUT/$name" --done -- "${cmd[@]}"
}
evaluate() {  # evaluate NAME [--in-domain] [EXTRA...]: the base model, or the LoRA in OUT/NAME/final
  local name=$1 adapter=() ood=("${OOD[@]}"); shift  # same prompts and noise for every model
  [ "$name" = base ] || adapter=(--adapters "$OUT/$name/final")
  if [ "${1:-}" = --in-domain ]; then ood=(); shift; fi  # without the out-of-distribution columns
  echo "== eval $name"
  python evaluate.py "${COMMON[@]}" --out "$OUT" --name "$name" "${adapter[@]}" "${EVAL[@]}" "${ood[@]}" "$@" \
    > "$OUT/eval-$name.log" 2>&1 || { echo "eval $name failed; see $OUT/eval-$name.log" >&2; return 1; }
}

# stage 1: one teacher per task, two at a time
stage teacher-geneval teacher_grpo.py --tasks geneval --reward toy:reward_geneval "${GRPO[@]}" "${TRAIN[@]}" &
stage teacher-ocr teacher_grpo.py --tasks ocr --reward toy:reward_ocr "${GRPO[@]}" "${TRAIN[@]}" &
wait_all
stage teacher-pickscore teacher_grpo.py --tasks pickscore --reward toy:reward_pickscore "${GRPO[@]}" "${TRAIN[@]}" &
# the aesthetic teacher (MAR anchor): DeQA:PickScore 4:6 on all prompts; the toy preference rule is
# defined on pickscore prompts only, so the other tasks' prompts get the quality score alone.
# toy:reward_deqa is on DeQA's raw 1-5 scale and the real `deqa` reward is DeQA / 5: weight 0.08 = 0.4 / 5.
stage teacher-deqa teacher_grpo.py --tasks all \
  --reward "geneval=toy:reward_deqa;ocr=toy:reward_deqa;pickscore=toy:reward_deqa:0.08,toy:reward_pickscore:0.6" \
  "${GRPO[@]}" "${TRAIN[@]}" &
wait_all

TEACHERS="geneval=$OUT/teacher-geneval/final,ocr=$OUT/teacher-ocr/final,pickscore=$OUT/teacher-pickscore/final"
ANCHOR="$OUT/teacher-deqa/final"

# stage 2: the merge cold start; then two queues, one per core (a row is evaluated after it trained)
stage merge-init cold_start.py --init merge --teachers "$TEACHERS"
opd() {  # opd NAME FLAGS...: stage 3, OPD with the recipe's settings and FLAGS
  stage "$1" opd.py --teachers "$TEACHERS" "${OPD[@]}" "${TRAIN[@]}" "${@:2}"
}
MIX=(--tasks all --reward "geneval=toy:reward_geneval;ocr=toy:reward_ocr;pickscore=toy:reward_pickscore"
     "${GRPO[@]}" "${TRAIN[@]}" --max-steps "$MIX_STEPS")
RECIPE=(--init merge --mar-teacher "$ANCHOR" --mar 0.1)
# stage 3 and the evaluations, in two queues, one per core (a row is evaluated after it trained):
# the recipe, the mixed-reward GRPO baseline, the fast recipe (K low-noise states per rollout)
{ opd opd-merge "${RECIPE[@]}"
  stage grpo-mix teacher_grpo.py "${MIX[@]}"
  evaluate opd-merge
  evaluate grpo-mix; } &
{ for row in base teacher-geneval teacher-ocr teacher-pickscore teacher-deqa merge-init; do
    evaluate "$row"
  done
  opd opd-fast "${RECIPE[@]}" "${FAST[@]}"
  evaluate opd-fast; } &
wait_all
python runs/toy_claims.py "$OUT" > /dev/null  # the paper's claims, paired: $OUT/claims.md
echo "the recipe finished in $(elapsed)"

if [ "$ALL" = 1 ]; then
  # the claim's second seed (OPD and its GRPO baseline with --seed 1); ablations: MAR off, MAR 2
  # (the paper's 0.1 is set for SD3.5-M's KL scale), one teacher for every prompt, the SFT cold
  # start, the unguided (CFG-absorbed) student. Ablations are evaluated in distribution only.
  { opd opd-merge-seed1 "${RECIPE[@]}" --seed 1
    stage grpo-mix-seed1 teacher_grpo.py "${MIX[@]}" --seed 1
    evaluate opd-merge-seed1
    evaluate grpo-mix-seed1
    opd opd-merge-no-mar --init merge --mar 0
    evaluate opd-merge-no-mar --in-domain
    opd opd-unguided "${RECIPE[@]}" --student-cfg 1
    evaluate opd-unguided --in-domain --cfg 1; } &
  { opd opd-merge-no-routing "${RECIPE[@]}" --route single --single-teacher geneval
    stage sft-init cold_start.py --init sft --teachers "$TEACHERS" --steps 20 --resume auto "${SFT[@]}"
    opd opd-sft --init "$OUT/sft-init/final" --mar-teacher "$ANCHOR" --mar 0.1
    opd opd-merge-mar2 --init merge --mar-teacher "$ANCHOR" --mar 2
    for row in opd-merge-no-routing sft-init opd-sft opd-merge-mar2; do evaluate "$row" --in-domain; done; } &
  wait_all
  python runs/toy_claims.py "$OUT" > /dev/null
fi

if [ "$QUICK" = 1 ]; then  # say it in the table itself, where a reader of the file looks
  { echo "**Smoke test** (\`bash runs/toy.sh --quick\`): every stage for a few steps on a tiny world."
    echo "These numbers check that the recipe runs; they are not results."; echo; cat "$OUT/table.md"; } \
    > "$OUT/table.md.tmp" && mv "$OUT/table.md.tmp" "$OUT/table.md"
fi
cat "$OUT/table.md" "$OUT/claims.md"
echo "runs/toy.sh finished in $(elapsed); table: $OUT/table.json"
