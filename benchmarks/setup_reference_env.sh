#!/usr/bin/env bash
# Creates the reference virtualenv of the PPO-iteration benchmark (trl 0.7.4 on torch 2.13.0 CPU), idempotently.
#
#   bash benchmarks/setup_reference_env.sh          # -> .bench_venv/ in the repository (git-ignored)
#   RRE_BENCH_VENV=/path/to/venv bash benchmarks/setup_reference_env.sh
#   PYTHON=python3.11 bash benchmarks/setup_reference_env.sh
#
# The pins are the only combination that runs trl 0.7.4's PPOTrainer here (docs/design.md section 6): transformers
# newer than 4.37 lacks `top_k_top_p_filtering` (4.38.x also makes `generate` ~9x slower); numpy, pyarrow and
# datasets are capped so trl's imports still load. A second run with the pins satisfied installs nothing.
# Prints the venv's python path on its last line.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RRE_BENCH_VENV:-${repo}/.bench_venv}"
python="${PYTHON:-python3}"
pins=(torch==2.13.0 transformers==4.37.2 trl==0.7.4 peft==0.7.1 accelerate==0.25.0 "numpy<2" "pyarrow<16"
  "datasets<2.17")

check_pins() {
  "${venv}/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md
want = {"torch": "2.13.0", "transformers": "4.37.2", "trl": "0.7.4", "peft": "0.7.1", "accelerate": "0.25.0"}
have = {name: md.version(name).split("+")[0] for name in want}
assert have == want, have
assert int(md.version("numpy").split(".")[0]) < 2
EOF
}

if [[ ! -x "${venv}/bin/python" ]]; then
  echo "creating ${venv}" >&2
  "${python}" -m venv "${venv}"
  touch "${venv}/.rre_bench_reference"
fi
if check_pins; then
  echo "reference venv up to date: ${venv}" >&2
elif [[ ! -e "${venv}/.rre_bench_reference" ]]; then
  echo "error: ${venv} exists, was not made by this script and lacks the pins; refusing to change its packages." >&2
  echo "       Point RRE_BENCH_VENV at a new path (or delete ${venv})." >&2
  exit 1
else
  echo "installing ${pins[*]} into ${venv}" >&2
  "${venv}/bin/pip" install --quiet "${pins[@]}"
  check_pins || { echo "error: ${venv} does not hold the pinned versions after install; see pip's output" >&2; exit 1; }
fi
"${venv}/bin/python" -c "import trl, peft, transformers, torch" 2>/dev/null \
  || { echo "error: trl/peft/transformers/torch do not import in ${venv}; delete it and rerun" >&2; exit 1; }
echo "${venv}/bin/python"
