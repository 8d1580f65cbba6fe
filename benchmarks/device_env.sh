# Sourced by the device scripts (gpu_check.sh, speed.sh): install the carried wheels (.whl, made
# here by prepare_wheels.sh) into /tmp/site and record the card. Needs OUT set; exits on failure.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD" || { echo "wheel install failed"; exit 1; }
# ../shared does not travel with the working tree: prepare_wheels.sh copies the fixtures into .shared.
[ -e ../shared ] || [ ! -d .shared ] || ln -s "$PWD/.shared" ../shared
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
