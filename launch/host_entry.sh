#!/usr/bin/env bash
# Per-host entry point of an rre_jax run on a TPU VM (launch/tpu_vm.sh calls it on every worker).
#
#   host_entry.sh setup [options]                       create the venv and install rre_jax when needed
#   host_entry.sh train --config CFG --workdir DIR [options] [-- OVERRIDES]
#                                                       setup, then exec rre-train in the foreground
#   host_entry.sh start  (same arguments as train)      train, detached, output appended to
#                                                       logs/worker-<N>.log; a no-op while one is running
#   host_entry.sh fingerprint [options]                 print the install fingerprint (see below)
#
# Install idempotency: the package is installed editable (pip install -e), so code changes need no
# reinstall; pip (with constraints.txt, the tested versions) runs only when the fingerprint of what the
# install depends on (setup.cfg, pyproject.toml, constraints.txt, extras, --no-deps packages, repository
# path) differs from the one stamped in the venv.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/host_entry.sh {setup|train|start|fingerprint} [options] [-- TRAINER_OVERRIDES ...]

Options (environment variable in brackets):
  --config CFG        trainer config, e.g. configs/alpacafarm_rer.py:rer,v4-32 (train/start)
  --workdir DIR       run directory, e.g. gs://bucket/rre/rer (train/start)
  --venv DIR          virtual environment [RRE_VENV; ~/rre_venv]
  --python PY         interpreter the venv is created from [RRE_PYTHON; python3]
  --extras LIST       pip extras of rre_jax to install [RRE_PIP_EXTRAS; tpu]; '' for none
  --nodeps-pkg SPEC   extra package installed with --no-deps, repeatable [RRE_NODEPS_PKGS, space separated]
  --env KEY=VALUE     environment variable for the trainer, repeatable
  --log-dir DIR       start: where worker-<N>.log and train.pid go [RRE_LOG_DIR; <repo>/logs]
  --worker-id N       start: this host's worker number [RRE_WORKER_ID; from the TPU metadata server]
  --dry-run           print the commands (one per line, shell-quoted) and run nothing [DRY_RUN=1]
  -h, --help          show this help

The trainer runs as: rre-train --config CFG --workdir DIR --config.distributed.initialize=True OVERRIDES...
from the repository root, so relative config paths resolve against it.
EOF
}

die() {
  printf 'host_entry.sh: error: %s\n' "$*" >&2
  exit 2
}

info() { printf 'host_entry.sh: %s\n' "$*" >&2; }

shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s != *"'"* ]]; then
    printf "'%s'" "$s"
  elif [[ $s != *[\$\`\\\"!]* ]]; then
    printf '"%s"' "$s"
  else
    s=${s//"'"/"'\\''"}
    printf "'%s'" "$s"
  fi
}

quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="$(shquote "$word") "
  done
  printf '%s' "${out% }"
}

run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

# ---------------------------------------------------------------------------------------------- settings
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
DRY_RUN=${DRY_RUN:-0}
VENV=${RRE_VENV:-$HOME/rre_venv}
PYTHON=${RRE_PYTHON:-python3}
EXTRAS=${RRE_PIP_EXTRAS-tpu}
LOG_DIR=${RRE_LOG_DIR:-$REPO_ROOT/logs}
WORKER_ID=${RRE_WORKER_ID:-}
CONFIG=""
WORKDIR=""
read -r -a NODEPS_PKGS <<<"${RRE_NODEPS_PKGS:-}"
TRAIN_ENV=()
OVERRIDES=()

[[ $# -gt 0 ]] || { usage >&2; die "no subcommand given (expected setup, train, start or fingerprint)"; }
case $1 in
  -h | --help) usage; exit 0 ;;
  setup | train | start | fingerprint) MODE=$1; shift ;;
  *) die "unknown subcommand '$1' (expected setup, train, start or fingerprint)" ;;
esac
ARGS=()  # start hands these to train unchanged
for arg in "$@"; do
  [[ $arg == --dry-run ]] || ARGS+=("$arg")
done

need_value() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --extras) [[ $# -ge 2 ]] || die "option --extras needs a value"; EXTRAS=$2; shift 2 ;;
    --nodeps-pkg) need_value "$@"; NODEPS_PKGS+=("$2"); shift 2 ;;
    --env) need_value "$@"; TRAIN_ENV+=("$2"); shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
    --worker-id) need_value "$@"; WORKER_ID=$2; shift 2 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (trainer overrides go after '--')" ;;
  esac
done

for kv in "${TRAIN_ENV[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
done
for ovr in "${OVERRIDES[@]}"; do
  [[ $ovr == --?* ]] || die "trainer override '$ovr' must be a flag such as --config.ppo.learning_rate=1e-5"
done
if [[ $MODE == train || $MODE == start ]]; then
  [[ -n $CONFIG ]] || die "$MODE needs --config (e.g. configs/alpacafarm_rer.py:rer,v4-32)"
  [[ -n $WORKDIR ]] || die "$MODE needs --workdir (e.g. gs://bucket/rre/run1)"
fi

# ------------------------------------------------------------------------------------------------ setup
fingerprint() {
  local sum=sha256sum
  command -v sha256sum >/dev/null || sum="shasum -a 256"
  {
    printf 'repo=%s\nextras=%s\nnodeps=%s\n' "$REPO_ROOT" "$EXTRAS" "${NODEPS_PKGS[*]}"
    cat "$REPO_ROOT/setup.cfg" "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/constraints.txt"
  } | $sum | cut -d' ' -f1
}

make_venv() {
  run_cmd "$PYTHON" -m venv "$VENV" && return 0
  # Ubuntu images ship python3 without ensurepip; python3-venv adds it.
  rm -rf "$VENV"
  sudo -n true 2>/dev/null || die "'$PYTHON -m venv' failed; install the venv module (sudo apt-get install -y python3-venv) and rerun"
  info "installing python3-venv (apt) and retrying"
  run_cmd sudo -n apt-get -o DPkg::Lock::Timeout=600 update -qq
  run_cmd sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv
  run_cmd "$PYTHON" -m venv "$VENV"
}

do_setup() {
  local stamp=$VENV/.rre_jax_install want have="" target=$REPO_ROOT
  want=$(fingerprint)
  [[ -f $stamp ]] && have=$(<"$stamp")
  if [[ -x $VENV/bin/python && $have == "$want" ]]; then
    info "environment $VENV is up to date (install fingerprint ${want:0:12})"
    return 0
  fi
  [[ -x $VENV/bin/python ]] || make_venv
  [[ -z $EXTRAS ]] || target="${REPO_ROOT}[${EXTRAS}]"
  run_cmd "$VENV/bin/python" -m pip install --quiet --upgrade pip
  run_cmd "$VENV/bin/python" -m pip install --quiet -c "$REPO_ROOT/constraints.txt" -e "$target"
  if ((${#NODEPS_PKGS[@]} > 0)); then
    run_cmd "$VENV/bin/python" -m pip install --quiet --no-deps "${NODEPS_PKGS[@]}"
  fi
  if [[ $DRY_RUN == 1 ]]; then
    info "(dry run) would stamp $stamp with ${want:0:12}"
  else
    printf '%s\n' "$want" >"$stamp"
  fi
}

# ------------------------------------------------------------------------------------------------ train
trainer_cmd() {
  local -a cmd=(env PYTHONUNBUFFERED=1 "TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}"
    "TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}" "${TRAIN_ENV[@]}")
  if [[ -x $VENV/bin/rre-train || $DRY_RUN == 1 ]]; then
    cmd+=("$VENV/bin/rre-train")
  else
    cmd+=("$VENV/bin/python" -m rre_jax.cli.train)
  fi
  cmd+=(--config "$CONFIG" --workdir "$WORKDIR" --config.distributed.initialize=True "${OVERRIDES[@]}")
  printf '%s\0' "${cmd[@]}"
}

do_train() {
  do_setup
  cd "$REPO_ROOT"
  if [[ ! -f ${CONFIG%%:*} ]]; then
    [[ $DRY_RUN == 1 ]] || die "config file '${CONFIG%%:*}' not found (relative paths resolve against $REPO_ROOT)"
    info "warning: config file '${CONFIG%%:*}' not found under $REPO_ROOT"
  fi
  # JAX_PLATFORMS is left unset so that JAX picks the TPU; a stray 'cpu' would silently train on the host.
  [[ ${JAX_PLATFORMS:-} != cpu ]] || info "warning: JAX_PLATFORMS=cpu is set; the TPU will not be used"
  local -a cmd
  mapfile -d '' -t cmd < <(trainer_cmd)
  if [[ $DRY_RUN == 1 ]]; then
    run_cmd "${cmd[@]}"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "${cmd[@]}")" >&2
  exec "${cmd[@]}"
}

# ------------------------------------------------------------------------------------------------ start
worker_id() {
  if [[ -n $WORKER_ID ]]; then
    printf '%s' "$WORKER_ID"
    return 0
  fi
  # The TPU VM metadata server knows this host's index in the slice (what jax.distributed uses too).
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
    hostname
}

# True when pid file names a live trainer (a recycled pid of some other program does not count).
is_running() {
  local pid args
  [[ -f $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
  [[ $args == *rre-train* || $args == *rre_jax.cli.train* || $args == *host_entry.sh* ]]
}

do_start() {
  local wid log pidfile pid
  wid=$(worker_id)
  log=$LOG_DIR/worker-$wid.log
  pidfile=$LOG_DIR/train.pid
  if is_running "$pidfile"; then
    info "training already running on worker $wid (pid $(<"$pidfile")); log: $log. Stop it with: launch/tpu_vm.sh ... kill"
    return 0
  fi
  if [[ $DRY_RUN == 1 ]]; then
    run_cmd setsid nohup bash "$SELF" train "${ARGS[@]}"
    info "(dry run) detached, output appended to $log, pid in $pidfile"
    return 0
  fi
  mkdir -p "$LOG_DIR"
  printf '=== %s: starting on %s (worker %s)\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)" "$wid" >>"$log"
  setsid nohup bash "$SELF" train "${ARGS[@]}" >>"$log" 2>&1 </dev/null &
  pid=$!
  printf '%s\n' "$pid" >"$pidfile"
  info "started worker $wid: pid $pid, log $log"
}

case $MODE in
  setup) do_setup ;;
  train) do_train ;;
  start) do_start ;;
  fingerprint) fingerprint ;;
esac
