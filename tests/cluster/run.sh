#!/usr/bin/env bash
# The kdray image and its compose stack (compose.yaml), built and tested for real with podman: two
# Ray workers in two containers, S3 in a third, the Prefect server and a Prefect worker, and faults.
#
#   bash tests/cluster/run.sh            # as root (or with passwordless sudo), Debian/Ubuntu with apt
#
# In order, it:
#   1. installs podman, buildah, debootstrap, runc and podman-compose with apt (if missing);
#   2. writes its own containers.conf, storage.conf and registries.conf under $KDRAY_CLUSTER_DIR and
#      points podman at them (CONTAINERS_CONF, ...): nothing of the machine's container setup changes;
#   3. gets the base image: python:3.11-slim-bookworm with the machine's own registry settings, else a
#      stand-in made by debootstrap from the machine's apt mirror, with the machine's apt settings and
#      CA certificates (all found at run time; cached as a tar file between runs);
#   4. builds the kdray image from this checkout, with the machine's pip configuration (and the local
#      package folders it names, mounted read-only for the build only);
#   5. starts compose.yaml (a copy, with a fresh env file of random keys) under its own project name;
#   6. runs the checks below, printing one line with the time of each;
#   7. removes every container, network and volume it made, even on failure, and the images and
#      podman storage too unless KDRAY_CLUSTER_KEEP_IMAGES=1 (the base stand-in's tar file stays).
#
# It ends with the line "N passed, M failed" and exits 1 if M > 0. It exits 0 with a SKIP line and no
# count only when podman cannot be installed.
#
# Environment: KDRAY_CLUSTER_DIR (state folder, default /var/tmp/kdray-cluster), KDRAY_CLUSTER_KEEP_IMAGES=1,
# KDRAY_BASE_IMAGE (a base image to use instead of steps 3's), KDRAY_CLUSTER_PROJECT (project name).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/cluster
STATE=${KDRAY_CLUSTER_DIR:-/var/tmp/kdray-cluster}
RUNDIR=/run/kdray-cluster          # podman's run-time state: tmpfs on most machines
PROJECT=${KDRAY_CLUSTER_PROJECT:-kdraycheck}
IMAGE=localhost/kdray:cluster-check
STANDIN=localhost/kdray-base:python3.11-bookworm
BUCKET=kdray
WORK=$STATE/work                   # this run's files: logs, the compose project, outputs of checks
T_START=$SECONDS

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- root, packages
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    exec sudo -n --preserve-env bash "$0" "$@"
  fi
  echo "SKIP: tests/cluster/run.sh needs root (or passwordless sudo) to install and run podman"
  exit 0
fi

install_packages() {
  local missing=()
  for cmd in podman buildah debootstrap runc podman-compose; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  [ ${#missing[@]} = 0 ] && return 0
  log "installing ${missing[*]} (apt)"
  command -v apt-get >/dev/null || return 1
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc podman-compose \
    >"$STATE/apt.log" 2>&1 || { tail -5 "$STATE/apt.log" >&2; return 1; }
}

mkdir -p "$STATE" || die "cannot create $STATE"
if ! install_packages; then
  echo "SKIP: podman could not be installed on this machine (apt-get install podman buildah debootstrap runc podman-compose failed)"
  exit 0
fi

# ---------------------------------------------------------------- podman, set up apart from the machine
rm -rf "$WORK"
mkdir -p "$STATE/conf" "$STATE/networks" "$RUNDIR" "$WORK/logs"
cat >"$STATE/conf/containers.conf" <<EOF
# Written by tests/cluster/run.sh: podman for the cluster checks only.
[containers]
# root cannot raise the hard limits on every machine; podman's defaults for root would make runc fail
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
# crun refuses hybrid cgroup v1/v2 layouts; runc runs there and everywhere else
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$RUNDIR/events.log"
tmp_dir = "$RUNDIR/libpod"

[network]
network_config_dir = "$STATE/networks"
EOF
cat >"$STATE/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$RUNDIR/storage"
EOF
cat >"$STATE/conf/registries.conf" <<EOF
# No short name is ever resolved against a registry: images are built here or named in full.
unqualified-search-registries = []
EOF
MACHINE_REGISTRIES_CONF=${CONTAINERS_REGISTRIES_CONF:-}
export CONTAINERS_CONF=$STATE/conf/containers.conf
export CONTAINERS_STORAGE_CONF=$STATE/conf/storage.conf
export CONTAINERS_REGISTRIES_CONF=$STATE/conf/registries.conf

# ---------------------------------------------------------------- clean-up (also of a crashed earlier run)
project_ids() {  # project_ids KIND: the ids of this project's containers, volumes or networks
  case $1 in
    container) podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null
               podman ps -aq --filter "label=kdray.cluster-check=$PROJECT" 2>/dev/null ;;
    volume) podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null ;;
    network) podman network ls -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null ;;
  esac
}

remove_project() {
  local ids
  ids=$(project_ids container | sort -u)
  [ -n "$ids" ] && podman rm -f -t 3 $ids >/dev/null 2>&1
  ids=$(project_ids volume)
  [ -n "$ids" ] && podman volume rm -f $ids >/dev/null 2>&1
  ids=$(project_ids network)
  [ -n "$ids" ] && podman network rm -f $ids >/dev/null 2>&1
  return 0
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [ -n "${DISK_SAMPLER:-}" ] && kill "$DISK_SAMPLER" 2>/dev/null
  log "cleaning up: containers, volumes and networks of project $PROJECT"
  remove_project
  local left
  left=$( (project_ids container; project_ids volume; project_ids network) | wc -l)
  [ "$left" = 0 ] || log "WARNING: $left containers, volumes or networks of $PROJECT are left"
  if [ "${KDRAY_CLUSTER_KEEP_IMAGES:-0}" != 1 ]; then
    log "removing the images and podman storage under $STATE (the base stand-in's tar file stays)"
    podman system reset --force >/dev/null 2>&1
    rm -rf "$STATE/storage" "$STATE/networks" "$RUNDIR"
  fi
  rm -f "$WORK/project/compose.env"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
remove_project

# ---------------------------------------------------------------- checks: bookkeeping
PASSED=0
FAILED=0
declare -A DONE=()
check() {  # check NAME FUNCTION [ARGS]: run the function in a subshell (set -e), time it, count it
  local name=$1 t0=$SECONDS rc
  shift
  log "check $name ..."
  [ "$name" = image ] || [ "$name" = stack-up ] || restart_stopped >"$WORK/logs/$name.restart.log" 2>&1
  # (never call check in a condition: errexit would be off inside it)
  ( set -eEuo pipefail; shopt -s inherit_errexit
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT   # background submits of a failed check
    "$@" ) >"$WORK/logs/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then
    PASSED=$((PASSED + 1)); DONE[$name]=1
    echo "check $name: passed in $((SECONDS - t0)) s"
  else
    FAILED=$((FAILED + 1))
    echo "check $name: FAILED in $((SECONDS - t0)) s; last lines of its log:"
    tail -n 25 "$WORK/logs/$name.log" | sed 's/^/    /'
  fi
  return "$rc"
}
skip_check() {  # a check that cannot run because an earlier one failed counts as failed
  FAILED=$((FAILED + 1))
  echo "check $1: FAILED in 0 s (not run: $2)"
}
finish() {
  echo "disk: at most $(disk_peak_mib) MiB under $STATE (sampled every 20 s)"
  echo "cluster checks took $((SECONDS - T_START)) s in all"
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
  exit $?
}

# Containers of the stack that a failed check left stopped (a killed worker, a stopped S3) are
# started again before the next check, so that one failure does not fail every later check.
restart_stopped() {
  local c
  for c in $(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" --filter status=exited); do
    [ "$(podman inspect -f '{{index .Config.Labels "com.docker.compose.service"}}' "$c")" != s3-bucket ] || continue
    echo "starting $c again"; podman start "$c"
  done
  return 0
}

# A container of the project by service (and replica number), under any compose's naming.
ctr() {
  podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" \
    --filter "label=com.docker.compose.container-number=${2:-1}" --format '{{.Names}}' | head -1
}
PROBE_SRC=$(cat "$HERE/probe.py")
probe() {  # probe CONTAINER COMMAND [ARGS]: tests/cluster/probe.py inside the container
  local c=$1; shift
  if [ "$1" = s3-put ]; then
    podman exec -i "$c" python -c "$PROBE_SRC" "$@"   # the object comes on standard input
  else
    podman exec "$c" python -c "$PROBE_SRC" "$@" </dev/null
  fi
}
wait_until() {  # wait_until SECONDS WHAT COMMAND...: retry every 2 s
  local limit=$1 what=$2 t0=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt "$limit" ] || { echo "timed out after $limit s waiting for $what"; return 1; }
    sleep 2
  done
  echo "$what after $((SECONDS - t0)) s"
}
json() {  # json EXPR: evaluate a Python expression over the JSON document on stdin (as `d`)
  python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"
}
# Disk used under $STATE (-x: not the containers' mounted views), sampled every 20 s in the background.
disk_used_kib() { du -skx "$STATE" 2>/dev/null | cut -f1; }
start_disk_sampler() {
  ( while :; do disk_used_kib >>"$WORK/disk-kib.txt"; sleep 20; done ) >/dev/null 2>&1 &
  DISK_SAMPLER=$!
}
disk_peak_mib() { disk_used_kib >>"$WORK/disk-kib.txt"; echo $(( $(sort -n "$WORK/disk-kib.txt" | tail -1) / 1024 )); }

# ---------------------------------------------------------------- base image
# The first Debian mirror of the machine's apt sources that serves the given suite.
apt_mirror() {
  python3 - "$1" <<'EOF'
import glob, re, sys
suite = sys.argv[1]
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
            print(parts[1]); sys.exit(0)
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for block in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in block.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", []) and suite in fields.get("suites", []) and fields.get("uris"):
            print(fields["uris"][0]); sys.exit(0)
sys.exit(1)
EOF
}

# Files that make apt inside the image behave as on this machine: sources, their keyrings, and the
# Acquire settings (proxies, checks of snapshot mirrors); and the extra CA certificates it trusts.
machine_apt_files() {
  local f k
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    echo "$f"
    for k in $(grep -hoiE '(signed-by[=:][[:space:]]*)[^] ,]+' "$f" | sed -E 's/^[Ss]igned-[Bb]y[=:][[:space:]]*//'); do
      [ -f "$k" ] && echo "$k"
    done
  done
  for f in /etc/apt/apt.conf.d/*; do
    [ -f "$f" ] && grep -q 'Acquire::' "$f" && echo "$f"
  done
  find /usr/local/share/ca-certificates -type f 2>/dev/null
  return 0
}

make_standin() {  # a python:3.11-slim-bookworm stand-in from the machine's apt mirror
  local mirror files key cache rootfs
  mirror=$(apt_mirror bookworm) || { echo "no apt source of this machine serves Debian bookworm"; return 1; }
  files=$(machine_apt_files | sort -u)
  key=$( { echo "standin-v1 $mirror"; for f in $files; do echo "$f"; cat "$f"; done; } | sha256sum | cut -c1-16)
  cache=$STATE/base-$key.tar
  if [ ! -s "$cache" ]; then
    echo "debootstrap bookworm from the machine's mirror (cache $cache)"
    rootfs=$STATE/base-rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$WORK/logs/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/logs/debootstrap.log"; return 1; }
    rm -f "$rootfs/etc/apt/sources.list"
    for f in $files; do
      mkdir -p "$rootfs$(dirname "$f")"
      cp -p "$f" "$rootfs$f"
    done
    chroot "$rootfs" update-ca-certificates >/dev/null
    ln -sf python3 "$rootfs/usr/bin/python"
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
    rm -f "$STATE"/base-*.tar
    tar -C "$rootfs" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
    rm -rf "$rootfs"
  fi
  podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$cache" "$STANDIN" >/dev/null
}

with_machine_registries() {  # a command with the machine's own registry settings instead of ours
  if [ -n "$MACHINE_REGISTRIES_CONF" ]; then
    CONTAINERS_REGISTRIES_CONF=$MACHINE_REGISTRIES_CONF "$@"
  else
    env -u CONTAINERS_REGISTRIES_CONF "$@"
  fi
}

BASE=""
get_base_image() {
  if [ -n "${KDRAY_BASE_IMAGE:-}" ]; then
    BASE=$KDRAY_BASE_IMAGE
    podman image exists "$BASE" || with_machine_registries podman pull -q "$BASE"
    return
  fi
  if podman image exists "$STANDIN"; then BASE=$STANDIN; return; fi
  # The real base, with the machine's own registry settings; where none is set this fails at once.
  if with_machine_registries timeout 300 podman pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
    BASE=python:3.11-slim-bookworm
    echo "base image: pulled"
    return
  fi
  echo "base image: no registry reachable; making the stand-in"
  make_standin
  BASE=$STANDIN
}

# ---------------------------------------------------------------- image
# The machine's pip configuration as one pip.conf, and the local folders and files it names (wheel
# folders, file:// indexes, constraint files), mounted read-only into the build's RUN steps only.
BUILD_MOUNTS=()
pip_settings() {
  python3 - "$WORK/pip.conf" <<'EOF' || true
import os, re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
found, env = {}, {}
for line in out.splitlines():
    m = re.match(r"^([^.]*)\.([A-Za-z0-9_-]+)='(.*)'$", line)
    if m:
        (env if m.group(1) == ":env:" else found)[m.group(2)] = m.group(3)
found.update(env)  # pip's order: the environment wins over files
found.pop("cert", None)  # the image trusts the machine's CA certificates itself
mounts = set()
for key, value in found.items():
    for token in value.split():
        path = token[len("file://"):] if token.startswith("file://") else token
        if not path.startswith("/") or not os.path.exists(path):
            continue
        if key in ("index-url", "extra-index-url") and os.path.basename(path.rstrip("/")) == "simple":
            path = os.path.dirname(path.rstrip("/"))  # an index's links point next to its simple/ folder
        mounts.add(path.rstrip("/") or "/")
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(found.items())))
for m in sorted(mounts):
    print(m)
EOF
}

build_image() {
  local m args=()
  BUILD_MOUNTS=()
  for m in $(pip_settings); do BUILD_MOUNTS+=(-v "$m:$m:ro"); done
  [ -s "$WORK/pip.conf" ] && args+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
  echo "build mounts: ${BUILD_MOUNTS[*]:-none}"
  podman build --layers --pull=never -f "$ROOT/Dockerfile" -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE" \
    "${args[@]}" "${BUILD_MOUNTS[@]}" "$ROOT" >"$WORK/logs/build-output.log" 2>&1 \
    || { tail -40 "$WORK/logs/build-output.log"; return 1; }
}

check_image() {
  local t0=$SECONDS size
  get_base_image
  echo "base image $BASE ready after $((SECONDS - t0)) s"
  t0=$SECONDS
  build_image
  size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
  echo "image $IMAGE built in $((SECONDS - t0)) s; size $((size / 1000000)) MB"
  echo "build_s=$((SECONDS - t0)) size_mb=$((size / 1000000))" >"$WORK/image.txt"
  [ "$(podman image inspect -f '{{.Config.User}}' "$IMAGE")" = "1000:1000" ]
  podman run --rm --label "kdray.cluster-check=$PROJECT" "$IMAGE" kdray --help >/dev/null
}

# ---------------------------------------------------------------- the stack
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

check_stack_up() {
  mkdir -p "$WORK/project"
  cp "$ROOT/compose.yaml" "$WORK/project/compose.yaml"
  ( umask 077
    printf 'AWS_ACCESS_KEY_ID=kdray%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$(hex 8)" "$(hex 20)" >"$WORK/project/compose.env" )
  export KDRAY_IMAGE=$IMAGE KDRAY_PREFECT_PORT=$(free_port) KDRAY_RAY_DASHBOARD_PORT=$(free_port) \
         KDRAY_S3_PORT=$(free_port)
  echo "KDRAY_PREFECT_PORT=$KDRAY_PREFECT_PORT KDRAY_RAY_DASHBOARD_PORT=$KDRAY_RAY_DASHBOARD_PORT KDRAY_S3_PORT=$KDRAY_S3_PORT" \
    >"$WORK/ports.env"
  (cd "$WORK/project" && podman-compose -p "$PROJECT" -f compose.yaml up -d)
  local s3 head worker
  s3=$(ctr s3); head=$(ctr ray-head); worker=$(ctr prefect-worker)
  [ -n "$s3" ]
  [ -n "$head" ]
  [ -n "$worker" ]
  [ "$(timeout 180 podman wait "$(ctr s3-bucket)")" = 0 ] || { podman logs "$(ctr s3-bucket)" | tail; return 1; }
  wait_until 120 "S3 bucket answers" probe "$worker" s3-ready
  wait_until 240 "Ray: head and 2 workers of 1 CPU" ray_ready 2
  wait_until 240 "Prefect API and work pool" podman exec "$worker" prefect work-pool inspect kdray-local
  # what compose.yaml publishes on the host's loopback
  curl -fsS "http://127.0.0.1:$KDRAY_PREFECT_PORT/api/health" && echo
  curl -fsS "http://127.0.0.1:$KDRAY_RAY_DASHBOARD_PORT/api/version" && echo
  curl -sS -o /dev/null -w 'S3 answers an unsigned request with HTTP %{http_code}\n' "http://127.0.0.1:$KDRAY_S3_PORT/"
}

ray_ready() {  # ray_ready N: the head (0 CPUs) and N alive workers of 1 CPU each
  probe "$(ctr ray-head)" ray-nodes | json "sorted((n['head'], n['cpu']) for n in d) == sorted([(True, 0.0)] + [(False, 1.0)] * $1)" | grep -qx True
}

# ---------------------------------------------------------------- checks
P_WORKER() { ctr prefect-worker; }
copy_spec() {  # the checks' spec into the client container
  podman exec -i "$(P_WORKER)" sh -c 'cat > /tmp/cluster.yaml' <"$HERE/cluster.yaml"
}
submit() {  # submit OUTFILE [OVERRIDES...]: kdray submit --launcher ray from the Prefect worker container
  local out=$1; shift
  timeout 900 podman exec "$(P_WORKER)" kdray submit /tmp/cluster.yaml "$@" --launcher ray >"$out" 2>"$out.log"
}
artifact_key() {  # artifact_key OUTFILE STAGE: the S3 key of the stage's artifact, from submit's output
  awk -v s="$2" '$1 == s {print $NF}' "$1" | sed -E "s#^s3://$BUCKET/##"
}
manifest() {  # manifest KEY: the artifact's manifest.json, read from S3 by an independent client
  probe "$(P_WORKER)" s3-get "$1/manifest.json"
}

check_non_root() {
  local c user procs
  for c in $(podman ps -q --filter "label=io.podman.compose.project=$PROJECT"); do
    user=$(podman inspect -f '{{.Config.User}}' "$c")
    procs=$(podman top "$c" user 2>/dev/null | tail -n +2 | sort | uniq -c | tr -s ' ' | tr '\n' ';')
    echo "$(podman inspect -f '{{.Name}}' "$c"): user $user; processes by user: $procs; id -u: $(podman exec "$c" id -u)"
    [ "${user%%:*}" = 1000 ]
    [ "$(podman exec "$c" id -u)" = 1000 ]
    if podman top "$c" user | tail -n +2 | grep -vqxE '[[:space:]]*(1000|kdray)[[:space:]]*'; then
      echo "a process of $c runs as another user"; return 1
    fi
  done
  # and the image itself, with no user given
  [ "$(podman run --rm --label "kdray.cluster-check=$PROJECT" "$IMAGE" id -u)" = 1000 ]
}

check_submit() {
  copy_spec
  submit "$WORK/submit.out" run.seed=1
  cat "$WORK/submit.out"
  grep -E '^teacher +train' "$WORK/submit.out"
  grep -E '^report +evaluate' "$WORK/submit.out"
  # the stage ran as a Ray job through the head's Job Submission API, and succeeded
  probe "$(ctr ray-head)" ray-jobs kdray-cluster-check-teacher- | tee "$WORK/jobs-submit.json"
  json "[j['status'] for j in d]" <"$WORK/jobs-submit.json" | grep -q SUCCEEDED
}

check_two_containers() {
  [ -n "${DONE[submit-ray-job-api]:-}" ] || { echo "needs check submit-ray-job-api"; return 1; }
  local key w1 w2 ips placement
  key=$(artifact_key "$WORK/submit.out" teacher)
  # both Ray Train workers (ranks) ran in the two Ray worker containers, one in each
  w1=$(podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(ctr ray-worker 1)")
  w2=$(podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(ctr ray-worker 2)")
  placement=$(probe "$(ctr ray-head)" ray-placement "kdray-cluster-check-teacher-$(basename "$key")")
  echo "worker containers: $w1 $w2; Ray Train workers: $placement"
  ips=$(echo "$placement" | json "' '.join(sorted(w['ip'] for w in d['workers']))")
  [ "$ips" = "$(printf '%s\n' "$w1" "$w2" | sort | tr '\n' ' ' | sed 's/ $//')" ]
  # no volume is shared: the Ray containers have none at all
  for c in "$(ctr ray-head)" "$(ctr ray-worker 1)" "$(ctr ray-worker 2)"; do
    [ "$(podman inspect -f '{{len .Mounts}}' "$c")" = 0 ] || { podman inspect -f '{{json .Mounts}}' "$c"; return 1; }
  done
  # the artifact and Ray's checkpoints are objects in the S3 container
  probe "$(P_WORKER)" s3-ls "$key/" | tee "$WORK/artifact-keys.json"
  json "all(any(k.endswith(f) for k in d) for f in ['/manifest.json', '/model.safetensors'])" \
    <"$WORK/artifact-keys.json" | grep -qx True
  manifest "$key" >"$WORK/manifest-2.json"
  local run
  run=$(json "d['ray_run']" <"$WORK/manifest-2.json")
  echo "Ray run folder: $run"
  probe "$(P_WORKER)" s3-ls "${run#"$BUCKET"/}/" | json "sorted({k.split('/')[-2] for k in d if '/checkpoint_' in k})"
  probe "$(P_WORKER)" s3-ls "${run#"$BUCKET"/}/" | json "any('/checkpoint_' in k for k in d)" | grep -qx True
  json "len(d['history'])" <"$WORK/manifest-2.json" | grep -qx 3
}

last_accuracy() {  # the last epoch's held-out accuracy in a manifest on stdin (validation, else test)
  json "(lambda h: h['val_acc'] if h.get('val_acc') is not None else h['test_acc'])(d['history'][-1])"
}

check_accuracy() {
  [ -n "${DONE[submit-ray-job-api]:-}" ] || { echo "needs check submit-ray-job-api"; return 1; }
  # the same stage in one process (no Ray workers), in the client container, on its local disk
  timeout 600 podman exec "$(P_WORKER)" kdray run /tmp/cluster.yaml run.seed=1 run.launcher=local run.workers=0 \
    storage.uri=file:///tmp/single --only teacher --json >"$WORK/single.json"
  local uri a b
  uri=$(json "d[0]['uri']" <"$WORK/single.json")
  podman exec "$(P_WORKER)" cat "${uri#file://}/manifest.json" >"$WORK/manifest-1.json"
  a=$(last_accuracy <"$WORK/manifest-1.json")
  b=$(last_accuracy <"$WORK/manifest-2.json")
  echo "accuracy after the last epoch: one process $a, two ranks in two containers $b"
  python3 -c "import sys; a, b = $a, $b; sys.exit(0 if abs(a - b) <= 0.03 and b > 0.7 else 1)"
}

succeeded_jobs() {  # the number of the checks' Ray jobs that succeeded
  probe "$(ctr ray-head)" ray-jobs kdray-cluster-check- | json "len([j for j in d if j['status'] == 'SUCCEEDED'])"
}

check_prefect_deployment() {
  local worker before run_id
  worker=$(P_WORKER)
  before=$(succeeded_jobs)
  # the spec goes to S3; the deployment of prefect.yaml on the process work pool kdray-local reads it
  # there, and the flow run (in the Prefect worker container) sends its training stage to the Ray head
  probe "$worker" s3-put specs/cluster.yaml <"$HERE/cluster.yaml"
  podman exec -w /opt/kdray "$worker" prefect --no-prompt deploy --name fmnist-cnn-to-mlp-local
  podman exec "$worker" prefect deployment schedule clear kdray-pipeline/fmnist-cnn-to-mlp-local -y  # no nightly run
  timeout 900 podman exec "$worker" prefect deployment run kdray-pipeline/fmnist-cnn-to-mlp-local \
    --params "{\"spec_uri\": \"s3://$BUCKET/specs/cluster.yaml\", \"overrides\": [\"run.seed=2\"]}" \
    --watch --watch-timeout 840 >"$WORK/prefect-run.log" 2>&1 || { tail -40 "$WORK/prefect-run.log"; return 1; }
  grep -vE '^●' "$WORK/prefect-run.log" | head -8
  tail -3 "$WORK/prefect-run.log"
  grep -q "finished successfully in 'Completed'" "$WORK/prefect-run.log"
  run_id=$(grep -oE 'UUID: [0-9a-f-]+' "$WORK/prefect-run.log" | head -1 | cut -d' ' -f2)
  # the report is a Prefect artifact of that flow run
  podman exec "$worker" prefect artifact inspect cluster-check-report >"$WORK/prefect-artifact.log"
  head -12 "$WORK/prefect-artifact.log"
  grep -q "'flow_run_id': '$run_id'" "$WORK/prefect-artifact.log"
  grep -q "teacher | train | cnn_small" "$WORK/prefect-artifact.log"
  # and the training stage was one more Ray job on the head
  [ "$(succeeded_jobs)" = $((before + 1)) ]
}

ray_checkpoints() {  # the checkpoint folders under the checks' _ray/ prefix, one a line
  probe "$(P_WORKER)" s3-ls cluster-check/_ray/ \
    | json "'\\n'.join(sorted({'/'.join(k.split('/')[:4]) for k in d if '/checkpoint_' in k}))"
}
new_checkpoints() {  # new_checkpoints BEFORE_FILE: checkpoint folders not listed before
  ray_checkpoints | grep -vxF -f "$1" || true
}
has_new_checkpoint() { [ -n "$(new_checkpoints "$1")" ]; }
complete_checkpoint() {  # complete_checkpoint BEFORE_FILE: the newest new checkpoint with all its files
  probe "$(P_WORKER)" s3-ls cluster-check/_ray/ | python3 -c '
import collections, json, sys
before = set(open(sys.argv[1]).read().split())
files = collections.defaultdict(set)
for k in json.load(sys.stdin):
    parts = k.split("/")
    if len(parts) > 4 and parts[3].startswith("checkpoint_"):
        files["/".join(parts[:4])].add(parts[4])
done = [f for f, names in files.items() if f not in before
        and {"history.json", "method.safetensors", "train_state.pt"} <= names]
print(max(done) if done else "")' "$1"
}
has_complete_checkpoint() { [ -n "$(complete_checkpoint "$1")" ]; }

check_worker_killed() {
  local before=$WORK/ckpt-before-kill.txt w2 pid key newest at_kill resumed_from epochs=4
  { ray_checkpoints; echo; } >"$before"
  submit "$WORK/killed.out" run.seed=3 stages.teacher.optim.epochs=$epochs --only teacher &
  pid=$!
  # once a first checkpoint of this run is complete in S3, a Ray worker container is killed (SIGKILL)
  wait_until 400 "the run's first complete checkpoint" has_complete_checkpoint "$before"
  sleep 1
  w2=$(ctr ray-worker 2)
  podman kill "$w2"
  newest=$(complete_checkpoint "$before")
  at_kill=$(probe "$(P_WORKER)" s3-get "$newest/history.json" | json "len(d)")
  echo "killed $w2; the newest complete checkpoint then held $at_kill epoch(s) of $epochs"
  [ "$at_kill" -ge 1 ]
  [ "$at_kill" -lt "$epochs" ]
  sleep 5
  podman start "$w2"   # the container is back
  wait "$pid"
  cat "$WORK/killed.out"
  key=$(artifact_key "$WORK/killed.out" teacher)
  manifest "$key" >"$WORK/manifest-killed.json"
  json "[(h['epoch'], h['resumed']) for h in d['history']]" <"$WORK/manifest-killed.json"
  json "[h['epoch'] for h in d['history']] == list(range(1, $epochs + 1))" <"$WORK/manifest-killed.json" | grep -qx True
  # it resumed once, after epoch r: resumed is 0 for epochs 1..r, then 1
  resumed_from=$(json "[h['resumed'] for h in d['history']].count(0)" <"$WORK/manifest-killed.json")
  json "[h['resumed'] for h in d['history']] == [0] * $resumed_from + [1] * ($epochs - $resumed_from)" \
    <"$WORK/manifest-killed.json" | grep -qx True
  # from a checkpoint (not from scratch), and at most one epoch trained again: epochs 1..at_kill were
  # done at the kill (the last one's checkpoint possibly not yet registered), the next one in progress
  echo "resumed after epoch $resumed_from; epochs trained again: at most $((at_kill + 1 - resumed_from))"
  [ "$resumed_from" -ge 1 ]
  [ "$resumed_from" -ge $((at_kill - 1)) ]
}

check_s3_outage() {
  local s3 pid before=$WORK/ckpt-before-outage.txt rc stage
  s3=$(ctr s3)
  { ray_checkpoints; echo; } >"$before"
  submit "$WORK/outage.out" run.seed=4 --only teacher &
  pid=$!
  # the S3 container is killed as soon as the run's first checkpoint starts to appear in it
  wait_until 400 "the run's first checkpoint" has_new_checkpoint "$before"
  podman kill "$s3"
  echo "killed $s3 while the stage trains and uploads its checkpoints"
  rc=0; wait "$pid" || rc=$?
  echo "the submit ended with exit code $rc:"; grep -vE '^\s*$' "$WORK/outage.out.log" | tail -3 | cut -c1-300
  [ "$rc" != 0 ]
  podman start "$s3"
  wait_until 120 "S3 back" probe "$(P_WORKER)" s3-ready
  # no manifest was published for the broken stage; a rerun completes and publishes it
  stage=$(grep -oE "s3://$BUCKET/cluster-check/cluster-check/teacher/[0-9a-f]+" "$WORK/outage.out.log" | head -1)
  stage=${stage#"s3://$BUCKET/"}
  [ -n "$stage" ]
  probe "$(P_WORKER)" s3-ls "$stage/" | tee "$WORK/outage-keys.json"; echo
  json "any(k.endswith('/manifest.json') for k in d)" <"$WORK/outage-keys.json" | grep -qx False
  submit "$WORK/outage-rerun.out" run.seed=4 --only teacher
  cat "$WORK/outage-rerun.out"
  [ "$(artifact_key "$WORK/outage-rerun.out" teacher)" = "$stage" ]
  probe "$(P_WORKER)" s3-ls "$stage/" | json "any(k.endswith('/manifest.json') for k in d)" | grep -qx True
}

check_head_restart() {
  local head
  head=$(ctr ray-head)
  podman restart "$head"
  wait_until 300 "the head and both workers back" ray_ready 2
  submit "$WORK/after-restart.out" run.seed=5 stages.teacher.optim.epochs=1 --only teacher
  cat "$WORK/after-restart.out"
  grep -E '^teacher +train' "$WORK/after-restart.out"
}

check_no_secrets_in_logs() {
  local c id secret n=0
  id=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' "$WORK/project/compose.env")
  secret=$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' "$WORK/project/compose.env")
  [ -n "$id" ]
  [ -n "$secret" ]
  for c in $(project_ids container | sort -u); do
    n=$((n + 1))
    if podman logs "$c" 2>&1 | grep -qF -e "$id" -e "$secret"; then
      echo "a key appears in the log of $(podman inspect -f '{{.Name}}' "$c")"
      return 1
    fi
  done
  echo "no key in the logs of $n containers"
  [ "$n" -ge 7 ]
}

# ---------------------------------------------------------------- main
case "${1:-all}" in
  all|build) ;;
  *) die "usage: $0 [build]   (build: only the image, kept, for a look at it)" ;;
esac
start_disk_sampler
check image check_image
[ -n "${DONE[image]:-}" ] || finish
if [ "${1:-all}" = build ]; then KDRAY_CLUSTER_KEEP_IMAGES=1; finish; fi
check stack-up check_stack_up
[ -n "${DONE[stack-up]:-}" ] || finish
check non-root check_non_root
check submit-ray-job-api check_submit
check two-ranks-two-containers check_two_containers
check accuracy-matches-one-process check_accuracy
check prefect-deployment check_prefect_deployment
check worker-killed-mid-epoch check_worker_killed
check s3-stopped-mid-upload check_s3_outage
check head-restarted check_head_restart
check no-secrets-in-logs check_no_secrets_in_logs
finish
