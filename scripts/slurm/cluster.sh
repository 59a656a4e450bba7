#!/usr/bin/env bash
# A real single-node Slurm (munged, slurmctld, slurmd) under a temp state dir, for tests and laptops.
#
#   scripts/slurm/cluster.sh up [STATE_DIR]   # as root; prints STATE_DIR=, SLURM_CONF=, PIDS= lines
#   scripts/slurm/cluster.sh down STATE_DIR   # stops exactly the daemons `up` started, by pid
#
# `up` apt-get installs slurm-wlm and munge where they are missing, generates a munge key, writes
# slurm.conf from slurm.conf.in (one node: `hostname -s`, CPUs = nproc, free ports), starts the three
# daemons and waits until `srun hostname` works. Clients find the cluster through SLURM_CONF.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
action="${1:-}"

die() { echo "cluster.sh: $*" >&2; exit 1; }

stop() {
  local state="$1" pidfile pid name
  [[ -d "$state" ]] || die "no state dir $state"
  # Jobs first: a job step (slurmstepd and the job's processes) outlives slurmd.
  if [[ -f "$state/slurm.conf" && -f "$state/slurmctld.pid" ]]; then
    local jobs
    jobs="$(SLURM_CONF="$state/slurm.conf" timeout 10 squeue --noheader --format=%i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086
      SLURM_CONF="$state/slurm.conf" timeout 10 scancel $jobs 2>/dev/null || true
      for _ in $(seq 150); do
        [[ -z "$(SLURM_CONF="$state/slurm.conf" timeout 10 squeue --noheader --format=%i 2>/dev/null || true)" ]] && break
        sleep 0.1
      done
    fi
  fi
  # slurmd first (it ends its job steps), then slurmctld, munged last (the others authenticate through it).
  for name in slurmd slurmctld munged; do
    pidfile="$state/$name.pid"
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    # Only the process this script started: its command line must name the daemon and our state dir's config.
    if [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do [[ -d "/proc/$pid" ]] || break; sleep 0.1; done
      if [[ -d "/proc/$pid" ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  local state="${1:-}"
  [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd starts job steps as their users)"
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
     || ! command -v srun >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
  fi
  [[ -n "$state" ]] || state="$(mktemp -d /tmp/amp-slurm.XXXXXX)"
  mkdir -p "$state"/{munge,ctld,slurmd,log}
  chmod 700 "$state" "$state/munge"
  local host cpus
  host="$(hostname -s)"
  cpus="$(nproc)"
  # munge: a fresh key and its own socket, so a system munged (if any) is neither used nor disturbed.
  mungekey --create --keyfile="$state/munge/munge.key" --force 2>/dev/null \
    || dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$state/munge/munge.key"
  munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
    --pid-file="$state/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/munged.seed"
  sed -e "s|@STATE@|$state|g" -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@USER@|$(id -un)|g" \
      -e "s|@CTLD_PORT@|$(free_port)|g" -e "s|@SLURMD_PORT@|$(free_port)|g" \
      "$HERE/slurm.conf.in" >"$state/slurm.conf"
  export SLURM_CONF="$state/slurm.conf"
  # Daemonised: each writes its pid file (named in slurm.conf) before `up` returns.
  slurmctld -f "$SLURM_CONF" -i
  slurmd -f "$SLURM_CONF"
  local ok=""
  for _ in $(seq 150); do
    if timeout 5 srun --quiet --time=1 hostname >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  if [[ -z "$ok" ]]; then
    tail -n 20 "$state"/log/*.log >&2 || true
    stop "$state"
    die "srun hostname did not work within 30 s (logs above)"
  fi
  echo "STATE_DIR=$state"
  echo "SLURM_CONF=$SLURM_CONF"
  echo "PIDS=$(cat "$state/munged.pid") $(cat "$state/slurmctld.pid") $(cat "$state/slurmd.pid")"
}

case "$action" in
  up) start "${2:-}" ;;
  down) [[ -n "${2:-}" ]] || die "usage: $0 down STATE_DIR"; stop "$2" ;;
  *) die "usage: $0 up [STATE_DIR] | down STATE_DIR" ;;
esac
