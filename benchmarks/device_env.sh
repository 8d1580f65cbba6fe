# Sourced by the device scripts (gpu_check.sh, speed.sh, profile.sh): `device_run NAME SCRIPT [FILTER]
# ARGS...` runs benchmarks/SCRIPT on the GPU machine with its output in $OUT (default NAME_out): it
# installs the carried wheels (.whl, made here by prepare_wheels.sh) into /tmp/site, links the
# carried fixtures, records the card, then runs the script under `timeout ${TIMEOUT:-500}` with its
# log in $OUT/NAME.log (lines matching the extended regex FILTER dropped; "" keeps all).
device_run() {
  local name="$1" script="$2" filter="$3"
  shift 3
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
  OUT="${OUT:-${name}_out}"
  mkdir -p "$OUT"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || { echo "wheel install failed"; exit 1; }
  # ../shared does not travel with the working tree: prepare_wheels.sh copies the fixtures into .shared.
  [ -e ../shared ] || [ ! -d .shared ] || ln -s "$PWD/.shared" ../shared
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
  PYTHONUNBUFFERED=1 timeout "${TIMEOUT:-500}" python3 "benchmarks/$script" --out "$OUT" "$@" 2>&1 \
    | { if [ -n "$filter" ]; then grep -v -i -E "$filter"; else cat; fi; } | tee "$OUT/$name.log"
}
