# Shared by the experiment scripts: flags -> runs of posterior_sample.py, nothing else.
# Usage (from a script): run_experiment <exp name> <usage text> <allowed counts> -- <fixed overrides...> :: "$@"
#   --1 / --10 / --100   first 1 / 10 / 100 images (in order, several flags run one after another)
#   --imagenet / --ffhq  dataset (exp 5; default imagenet)
#   anything else        extra Hydra overrides appended to every run, e.g. data=demo model=toy
# Paths (environment): TREEDAPS_IMAGENET_DIR (default dataset/test-imagenet), TREEDAPS_FFHQ_DIR
# (dataset/test-ffhq), TREEDAPS_IMAGENET_LDM (checkpoints/ldm_imagenet256.pt), TREEDAPS_FFHQ_LDM
# (checkpoints/ldm_ffhq256.pt), TREEDAPS_SAVE_DIR (results), PYTHON (python).
# TREEDAPS_PRINT_ONLY=1 prints each run's command (shell-quoted, one line) instead of running it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

run_experiment() {
  local exp="$1" usage="$2" allowed="$3"; shift 3
  [[ "$1" == "--" ]] && shift
  local fixed=() counts=() datasets=() extra=()
  while [[ $# -gt 0 && "$1" != "::" ]]; do fixed+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  for arg in "$@"; do
    case "$arg" in
      --1|--10|--100)
        if [[ " $allowed " != *" ${arg#--} "* ]]; then
          echo "error: $exp does not take $arg: ${REFUSE_REASON:-not offered}" >&2; exit 2; fi
        counts+=("${arg#--}") ;;
      --imagenet|--ffhq) datasets+=("${arg#--}") ;;
      --*) echo "error: unknown flag $arg" >&2; echo "$usage" >&2; exit 2 ;;
      *) extra+=("$arg") ;;
    esac
  done
  if [[ ${#counts[@]} -eq 0 ]]; then echo "$usage" >&2; exit 2; fi
  [[ ${#datasets[@]} -eq 0 ]] && datasets=(imagenet)
  local label_override=""
  for arg in "${extra[@]}"; do [[ "$arg" == data=* ]] && label_override="${arg#data=}"; done
  for ds in "${datasets[@]}"; do
    local label="${label_override:-$ds}"
    for n in "${counts[@]}"; do
      local data="data=test-$ds" model="model=${ds}256ldm"
      [[ "$ds" == ffhq ]] && model="model=ffhq256ldm"
      [[ "$ds" == imagenet ]] && model="model=imagenet256ldm"
      echo ">>> $exp $label --$n (name=${exp}_${label}_n$n)" >&2   # the data actually used
      local cmd=("$PYTHON" posterior_sample.py "$data" "$model" "${fixed[@]}" \
        "data.start_id=0" "data.end_id=$n" "name=${exp}_${label}_n$n" \
        "save_dir=${TREEDAPS_SAVE_DIR:-results}" ${EXTRA_OVERRIDES:-} "${extra[@]}")
      if [[ "${TREEDAPS_PRINT_ONLY:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; continue; fi
      (cd "$ROOT" && "${cmd[@]}")
    done
  done
}
