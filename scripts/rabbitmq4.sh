#!/usr/bin/env bash
# A RabbitMQ 4.x node without Docker: a Debian trixie root made once with
# debootstrap in a cache directory outside the repository, rabbitmq-server
# installed in it with apt, and nodes started from it on free ports.
#
#   scripts/rabbitmq4.sh build            make the root (once; minutes the first time)
#   scripts/rabbitmq4.sh start [ID]       build if needed, start node ID (default "default"),
#                                         print its AMQP URL; stop it with `stop ID`
#   scripts/rabbitmq4.sh stop [ID]        stop node ID and unmount when no node is left
#   scripts/rabbitmq4.sh env [ID]         NOBS_AMQP_URL=... and NOBS_AMQP_MANAGEMENT_URL=... of node ID
#   scripts/rabbitmq4.sh run -- CMD...    start a node of its own, run CMD with NOBS_AMQP_URL and
#                                         NOBS_AMQP_MANAGEMENT_URL pointing at it, stop it (always);
#                                         exits with CMD's status; CMD also gets
#                                         NOBS_AMQP_NODE_GENERATION=4 and NOBS_AMQP_RABBITMQ4_ROOT, so
#                                         the tests' throwaway nodes (tests/nodes.py) run 4.x too
#   scripts/rabbitmq4.sh exec-node ID     run node ID in the foreground from the dir the caller made,
#                                         ROOT/var/lib/nobs-nodes/ID: node.env (NODENAME, AMQP_PORT,
#                                         DIST_PORT, EPMD_PORT; optional ERL_ARGS, ADVANCED_CONFIG: the
#                                         server's RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS and
#                                         RABBITMQ_ADVANCED_CONFIG_FILE, a path inside the root),
#                                         rabbitmq.conf, enabled_plugins; mounts as needed; the data
#                                         there survives a restart. Nodes whose node.env give the same
#                                         EPMD_PORT share one epmd (a cluster's nodes find each other)
#   scripts/rabbitmq4.sh ctl ID ARGS...   rabbitmqctl -n <node ID> ARGS in the root (its cookie, epmd)
#
# Every node has its own name, ports (free ones, picked at start), epmd, data and logs,
# so several can run at once (exec-node nodes may share an epmd); none of them touches a
# broker that runs on the host.
# Needs root on Debian (debootstrap, chroot, mounting /proc).
#
# Environment:
#   NOBS_AMQP_RABBITMQ4_ROOT   the root; default ${XDG_CACHE_HOME:-$HOME/.cache}/nobs-amqp/trixie
#   NOBS_AMQP_DEBIAN_MIRROR    the Debian mirror for debootstrap; default: the first non-security
#                              Debian URI in this machine's apt sources
#   NOBS_AMQP_DEBIAN_SUITE     default trixie (its rabbitmq-server is 4.0.x)
#   NOBS_AMQP_RABBITMQ4_NOFILE open-files limit for the node; default 65536
set -euo pipefail

say() { echo "rabbitmq4: $*" >&2; }
die() { echo "rabbitmq4: error: $*" >&2; exit 1; }

SUITE=${NOBS_AMQP_DEBIAN_SUITE:-trixie}
ROOT=${NOBS_AMQP_RABBITMQ4_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/nobs-amqp/$SUITE}
ROOT=${ROOT%/}
NOFILE=${NOBS_AMQP_RABBITMQ4_NOFILE:-65536}
READY=$ROOT/.nobs-ready
LOCK=$ROOT.lock
NODES=/var/lib/nobs-nodes          # inside the root
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/$(basename "${BASH_SOURCE[0]}")

need_root() { [[ $(id -u) == 0 ]] || die "needs root (debootstrap, chroot and mount do); run it as root"; }

# --- the mirror ----------------------------------------------------------------------------
host_mirror() {
    # deb822 .sources files: the URIs of a stanza whose URIs are not a security archive.
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) print $i }' "$f"
    done
    # One-line format.
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($i !~ /security/) print $i; break } }' "$f"
    done
}

mirror() {
    if [[ -n ${NOBS_AMQP_DEBIAN_MIRROR:-} ]]; then echo "$NOBS_AMQP_DEBIAN_MIRROR"; return; fi
    grep -qs '^ID=debian' /etc/os-release \
        || die "not a Debian host, so its apt sources name no Debian mirror; set NOBS_AMQP_DEBIAN_MIRROR"
    local m
    m=$(host_mirror | grep -E '/debian/?$' | head -n 1 || true)
    [[ -n $m ]] || m=$(host_mirror | head -n 1 || true)
    [[ -n $m ]] || die "no Debian mirror in /etc/apt/sources.list(.d); set NOBS_AMQP_DEBIAN_MIRROR"
    echo "$m"
}

# --- mounts --------------------------------------------------------------------------------
is_mounted() { findmnt -rn --mountpoint "$1" >/dev/null 2>&1; }

mount_into() {   # mount_into DIR: /proc and /dev for the root at DIR
    local dir=$1
    mkdir -p "$dir/proc" "$dir/dev"
    is_mounted "$dir/proc" || mount -t proc proc "$dir/proc"
    is_mounted "$dir/dev" || mount --bind /dev "$dir/dev"
}

unmount_from() {   # unmount_from DIR: whatever is mounted below DIR, deepest first
    local dir=$1 target
    [[ -d $dir ]] || return 0
    dir=$(cd "$dir" && pwd -P)
    while read -r target; do
        [[ -n $target ]] || continue
        umount "$target" 2>/dev/null || umount -l "$target" || say "could not unmount $target"
    done < <(findmnt -rn -o TARGET | awk -v d="$dir" 'index($0, d "/") == 1' | sort -r)
}

# --- build ---------------------------------------------------------------------------------
build() {
    need_root
    [[ -f $READY ]] && return 0
    mkdir -p "$(dirname "$ROOT")"
    exec 8>"$LOCK"
    timeout 3000 flock 8 || die "another build of $ROOT still holds $LOCK"
    if [[ -f $READY ]]; then exec 8>&-; return 0; fi      # built by whoever held the lock

    if ! command -v debootstrap >/dev/null 2>&1; then
        [[ -f /etc/debian_version ]] || die "debootstrap is missing; install it and rerun"
        say "installing debootstrap with apt-get"
        timeout 600 apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q debootstrap >&2
    fi
    local partial=$ROOT.partial m
    m=$(mirror)
    unmount_from "$partial"
    rm -rf --one-file-system "$partial" "$ROOT"
    say "debootstrap $SUITE into $ROOT (a few minutes, once)"
    timeout 1800 debootstrap --variant=minbase "$SUITE" "$partial" "$m" >&2 \
        || { unmount_from "$partial"; die "debootstrap failed (mirror from NOBS_AMQP_DEBIAN_MIRROR or apt sources)"; }
    grep -qs localhost "$partial/etc/hosts" || printf '127.0.0.1 localhost\n::1 localhost\n' >>"$partial/etc/hosts"
    # Packages must not start services in the root.
    printf '#!/bin/sh\nexit 101\n' >"$partial/usr/sbin/policy-rc.d"
    chmod 755 "$partial/usr/sbin/policy-rc.d"
    mount_into "$partial"
    local ok=1
    say "installing rabbitmq-server in the root"
    timeout 900 chroot "$partial" apt-get update -q >&2 \
        && DEBIAN_FRONTEND=noninteractive timeout 1200 chroot "$partial" \
            apt-get install -y -q --no-install-recommends rabbitmq-server >&2 \
        || ok=0
    chroot "$partial" apt-get clean >/dev/null 2>&1 || true
    unmount_from "$partial"
    [[ $ok == 1 ]] || die "apt-get install rabbitmq-server in the $SUITE root failed"
    local version
    version=$(chroot "$partial" dpkg-query -W -f='${Version}' rabbitmq-server)
    mv "$partial" "$ROOT"
    echo "$version" >"$READY"
    exec 8>&-     # the build lock
    say "rabbitmq-server $version installed in $ROOT"
}

# --- nodes ---------------------------------------------------------------------------------
free_ports() {   # free_ports N: N free loopback TCP ports, one a line
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
PY
}

state() { echo "$ROOT$NODES/$1"; }

load() {   # load ID: the node's settings into the shell
    local file
    file=$(state "$1")/node.env
    [[ -f $file ]] || return 1
    unset ERL_ARGS ADVANCED_CONFIG     # optional: not from another node's file or the caller
    # shellcheck disable=SC1090
    source "$file"
}

rabbitmq_ids() { awk -F: '$1 == "rabbitmq" { print $3 ":" $4 }' "$ROOT/etc/passwd"; }

in_root() {   # in_root ID CMD...: CMD in the root as rabbitmq, with the node's environment
    local id=$1; shift
    load "$id"
    local optional=()
    [[ -z ${ERL_ARGS:-} ]] || optional+=("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=$ERL_ARGS")
    [[ -z ${ADVANCED_CONFIG:-} ]] || optional+=("RABBITMQ_ADVANCED_CONFIG_FILE=$ADVANCED_CONFIG")
    chroot --userspec="$(rabbitmq_ids)" "$ROOT" /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8 \
        NOBS_AMQP_NODE_ID="$id" \
        NOBS_AMQP_NODE_OWNER="${NOBS_AMQP_NODE_OWNER:-}" \
        ERL_EPMD_PORT="$EPMD_PORT" \
        RABBITMQ_NODENAME="$NODENAME" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$AMQP_PORT" \
        RABBITMQ_DIST_PORT="$DIST_PORT" \
        RABBITMQ_MNESIA_BASE="$NODES/$id/mnesia" \
        RABBITMQ_LOG_BASE="$NODES/$id/log" \
        RABBITMQ_CONFIG_FILE="$NODES/$id/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$NODES/$id/enabled_plugins" \
        RABBITMQ_PID_FILE="$NODES/$id/pid" \
        ${optional[@]+"${optional[@]}"} \
        "$@"
}

amqp_up() { timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null; }

mgmt_up() {
    [[ $(curl -s --max-time 3 -o /dev/null -w '%{http_code}' -u guest:guest \
        "http://127.0.0.1:$1/api/overview" || true) == 200 ]]
}

# Processes that carry the node's marker in their environment: the node, its epmd, helpers.
node_pids() {
    local id=$1 p
    for p in /proc/[0-9]*; do
        tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qx "NOBS_AMQP_NODE_ID=$id" && echo "${p#/proc/}"
    done
    return 0
}

# node_pids without the epmd the node may have started (an epmd it shares with other nodes).
node_pids_but_epmd() {
    local p
    for p in $(node_pids "$1"); do
        [[ $(cat "/proc/$p/comm" 2>/dev/null) == epmd ]] || echo "$p"
    done
    return 0
}

# Whether another node that runs shares node ID's epmd (the same EPMD_PORT in its node.env).
epmd_shared() {
    local id=$1 port other
    port=$(sed -n 's/^EPMD_PORT=//p' "$(state "$id")/node.env" 2>/dev/null)
    [[ -n $port ]] || return 1
    for other in "$ROOT$NODES"/*/; do
        [[ -d $other && $(basename "$other") != "$id" ]] || continue
        grep -qsx "EPMD_PORT=$port" "$other/node.env" || continue
        [[ -z $(node_pids_but_epmd "$(basename "$other")") ]] || return 0
    done
    return 1
}

# Nodes of `run`s that were killed before their trap could stop them (run-<pid>-...).
reap_stale() {
    local dir id pid
    for dir in "$ROOT$NODES"/run-*/; do
        [[ -d $dir ]] || continue
        id=$(basename "$dir")
        pid=${id#run-}; pid=${pid%%-*}
        # Alive and not a zombie: that run still owns its node.
        [[ -r /proc/$pid/status ]] && ! grep -qs '^State:.*Z' "/proc/$pid/status" && continue
        say "stopping node $id, left behind by a run that is gone"
        (stop "$id") || true
    done
}

start() {
    local id=${1:-default}
    [[ $id =~ ^[A-Za-z0-9_-]+$ ]] || die "node id must be letters, digits, - and _"
    build
    reap_stale
    local dir
    dir=$(state "$id")
    if load "$id" 2>/dev/null && [[ -n $(node_pids "$id") ]]; then
        amqp_up "$AMQP_PORT" || die "node $id runs but does not answer on $AMQP_PORT; stop it with: $0 stop $id"
        echo "amqp://guest:guest@127.0.0.1:$AMQP_PORT/"
        return 0
    fi
    exec 9>"$LOCK"
    timeout 120 flock 9 || die "$LOCK is held too long"
    mount_into "$ROOT"
    rm -rf --one-file-system "$dir"
    mkdir -p "$dir/mnesia" "$dir/log"
    local ports
    mapfile -t ports < <(free_ports 4)
    cat >"$dir/node.env" <<EOF
NODENAME=nobs4-$id-$$@localhost
AMQP_PORT=${ports[0]}
MGMT_PORT=${ports[1]}
DIST_PORT=${ports[2]}
EPMD_PORT=${ports[3]}
EOF
    load "$id"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
loopback_users = none
log.file.level = info
log.console = false
EOF
    echo '[rabbitmq_management].' >"$dir/enabled_plugins"
    touch "$dir/starting"     # keeps the mounts while the node is not running yet (see stop)
    chown -R "$(rabbitmq_ids)" "$dir"
    chown "$(rabbitmq_ids)" "$ROOT$NODES"
    flock -u 9
    say "starting node $NODENAME (AMQP $AMQP_PORT, management $MGMT_PORT)"
    (
        # As high as allowed: RabbitMQ needs a few handles per queue and connection.
        ulimit -n "$NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        exec setsid bash "$SELF" _exec-server "$id" </dev/null >"$dir/log/console.log" 2>&1
    ) &
    local launcher=$! i
    for ((i = 0; i < 120; i++)); do
        amqp_up "$AMQP_PORT" && mgmt_up "$MGMT_PORT" && break
        kill -0 "$launcher" 2>/dev/null || break
        sleep 1
    done
    rm -f "$dir/starting"
    if ! amqp_up "$AMQP_PORT" || ! mgmt_up "$MGMT_PORT"; then
        tail -n 40 "$dir/log/console.log" >&2 || true
        stop "$id"
        die "node $id did not answer within 120 s (log above)"
    fi
    say "rabbitmq-server $(cat "$READY") answers: amqp://guest:guest@127.0.0.1:$AMQP_PORT/ management http://127.0.0.1:$MGMT_PORT"
    echo "amqp://guest:guest@127.0.0.1:$AMQP_PORT/"
}

exec_server() {   # the node's foreground process (run detached by start)
    in_root "$1" /usr/lib/rabbitmq/bin/rabbitmq-server
}

exec_node() {   # exec-node ID: node ID in the foreground, from the dir its caller made
    local id=${1:-} dir
    [[ $id =~ ^[A-Za-z0-9_-]+$ ]] || die "usage: $0 exec-node ID (letters, digits, - and _)"
    need_root
    [[ -f $READY ]] || die "no RabbitMQ 4 root at $ROOT; make it with: $0 build"
    dir=$(state "$id")
    load "$id" || die "no $dir/node.env; write NODENAME, AMQP_PORT, DIST_PORT and EPMD_PORT there first"
    # Carry the marker from the start, so that `stop` (of any node) sees this one busy and keeps
    # the mounts, and node_pids finds every process of it.
    [[ ${NOBS_AMQP_NODE_ID:-} == "$id" ]] || NOBS_AMQP_NODE_ID=$id exec bash "$SELF" exec-node "$id"
    exec 9>"$LOCK"
    timeout 120 flock 9 || die "$LOCK is held too long"
    mount_into "$ROOT"
    chown -R "$(rabbitmq_ids)" "$dir"
    chown "$(rabbitmq_ids)" "$ROOT$NODES"
    exec 9>&-
    ulimit -n "$NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    in_root "$id" /usr/lib/rabbitmq/bin/rabbitmq-server
}

ctl() {   # ctl ID ARGS...: rabbitmqctl of the root against node ID
    local id=${1:-}
    shift || true
    need_root
    load "$id" 2>/dev/null || die "no node $id"
    in_root "$id" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODENAME" "$@"
}

stop() {
    local id=${1:-default} pids i procs=node_pids
    if ! load "$id" 2>/dev/null; then
        say "no node $id"
    else
        # An epmd that other running nodes share (a cluster's) stays: they are registered there.
        ! epmd_shared "$id" || procs=node_pids_but_epmd
        if [[ -n $($procs "$id") ]]; then
            say "stopping node $NODENAME"
            timeout 60 bash "$SELF" _in-root "$id" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODENAME" stop >/dev/null 2>&1 || true
            [[ $procs != node_pids ]] || timeout 10 bash "$SELF" _in-root "$id" epmd -kill >/dev/null 2>&1 || true
        fi
        for ((i = 0; i < 30; i++)); do
            pids=$($procs "$id")
            [[ -n $pids ]] || break
            ((i < 20)) || kill -9 $pids 2>/dev/null || true
            ((i != 10)) || kill $pids 2>/dev/null || true
            sleep 1
        done
        [[ -z $($procs "$id") ]] || say "node $id left processes: $($procs "$id" | tr '\n' ' ')"
        rm -rf --one-file-system "$(state "$id")"
    fi
    # Unmount once no node of any id runs from the root.
    exec 9>"$LOCK"
    timeout 120 flock 9 || return 0
    local other busy=0
    for other in "$ROOT$NODES"/*/; do
        [[ -d $other ]] || continue
        [[ -f $other/starting ]] && busy=1
        [[ -n $(node_pids "$(basename "$other")") ]] && busy=1
    done
    [[ $busy == 1 ]] || unmount_from "$ROOT"
}

print_env() {
    local id=${1:-default}
    load "$id" || die "no node $id (start it with: $0 start $id)"
    echo "NOBS_AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT/"
    echo "NOBS_AMQP_MANAGEMENT_URL=http://127.0.0.1:$MGMT_PORT"
}

run() {
    [[ ${1:-} == -- ]] && shift
    (($#)) || die "usage: $0 run -- COMMAND..."
    RUN_ID=run-$$-$RANDOM     # global: the EXIT trap runs after this function has returned
    trap 'stop "$RUN_ID"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    start "$RUN_ID" >/dev/null
    load "$RUN_ID"
    local status=0
    NOBS_AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/" \
        NOBS_AMQP_MANAGEMENT_URL="http://127.0.0.1:$MGMT_PORT" \
        NOBS_AMQP_RABBITMQ_VERSION="$(cat "$READY")" \
        NOBS_AMQP_NODE_GENERATION=4 \
        NOBS_AMQP_RABBITMQ4_ROOT="$ROOT" \
        "$@" || status=$?
    return "$status"
}

cmd=${1:-}
shift || true
case $cmd in
    build) build ;;
    start) start "$@" ;;
    stop) stop "$@" ;;
    env) print_env "$@" ;;
    run) run "$@" ;;
    exec-node) exec_node "$@" ;;
    ctl) ctl "$@" ;;
    _exec-server) exec_server "$@" ;;
    _in-root) in_root "$@" ;;
    *) die "usage: $0 build | start [ID] | stop [ID] | env [ID] | run -- COMMAND... | exec-node ID | ctl ID ARGS..." ;;
esac
