#!/usr/bin/env bash
# Make sure a RabbitMQ broker (with the management plugin) answers at
# NOBS_AMQP_URL. Uses a running broker if there is one, otherwise starts one
# with Docker Compose, otherwise (Debian/Ubuntu as root) installs and starts
# rabbitmq-server. Never stops or restarts an existing broker.
#
# Environment:
#   NOBS_AMQP_URL                default amqp://guest:guest@localhost:5672/
#   NOBS_AMQP_MANAGEMENT_URL     default http://<host>:15672
#   NOBS_AMQP_NO_BROKER_INSTALL  set to 1 to never apt-get install a broker
set -euo pipefail

say() { echo "ensure-broker: $*"; }
die() { echo "ensure-broker: error: $*" >&2; exit 1; }

# Percent-decode (backslashes are escaped first so printf %b only sees \xHH).
urldecode() { local s=${1//\\/\\\\}; printf '%b' "${s//%/\\x}"; }

# --- parse NOBS_AMQP_URL: scheme://[user[:pass]@]host[:port][/vhost] -------
url=${NOBS_AMQP_URL:-amqp://guest:guest@localhost:5672/}
scheme=${url%%://*}
[[ $scheme == amqp || $scheme == amqps ]] || die "NOBS_AMQP_URL must start with amqp:// or amqps://"
authority=${url#*://}
authority=${authority%%[/?#]*}
user=guest pass=guest
if [[ $authority == *@* ]]; then
    userinfo=${authority%@*}
    authority=${authority##*@}
    user=$(urldecode "${userinfo%%:*}")
    [[ $userinfo == *:* ]] && pass=$(urldecode "${userinfo#*:}")
fi
if [[ $authority == \[* ]]; then          # IPv6 literal: [::1]:5672
    host=${authority#[}; host=${host%%]*}
    port=${authority#*]}; port=${port#:}
else
    host=${authority%%:*}
    port=; [[ $authority == *:* ]] && port=${authority#*:}
fi
host=${host:-localhost}
if [[ -z $port ]]; then
    if [[ $scheme == amqps ]]; then port=5671; else port=5672; fi
fi
[[ $host == *:* ]] && url_host="[$host]" || url_host=$host
mgmt_url=${NOBS_AMQP_MANAGEMENT_URL:-http://$url_host:15672}
mgmt_url=${mgmt_url%/}
# For messages: never show credentials.
target="$scheme://$url_host:$port"
mgmt_shown=$(sed -E 's#//[^/@]*@#//***@#' <<<"$mgmt_url")

case $host in localhost|127.0.0.1|::1) is_local=1 ;; *) is_local=0 ;; esac

# --- checks -----------------------------------------------------------------
amqp_up() {
    # The /dev/tcp connect can hang on filtered ports, hence timeout + subshell.
    # shellcheck disable=SC2016  # $1/$2 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
}

# Print the HTTP status of GET /api/overview ("000" when nothing answers).
mgmt_status() {
    if command -v curl >/dev/null 2>&1; then
        curl -s --max-time 3 -o /dev/null -w '%{http_code}' -u "$user:$pass" "$mgmt_url/api/overview" || true
    else
        MGMT_URL=$mgmt_url MGMT_USER=$user MGMT_PASS=$pass python3 - <<'PY' 2>/dev/null || echo 000
import base64, os, urllib.error, urllib.request
req = urllib.request.Request(os.environ["MGMT_URL"] + "/api/overview")
token = base64.b64encode(f'{os.environ["MGMT_USER"]}:{os.environ["MGMT_PASS"]}'.encode()).decode()
req.add_header("Authorization", "Basic " + token)
try:
    print(urllib.request.urlopen(req, timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
    fi
}
# shellcheck disable=SC2317  # called indirectly through wait_for
mgmt_up() { [[ $(mgmt_status) == 200 ]]; }

# wait_for <check-function> <seconds> <what>: poll once a second, bounded.
wait_for() {
    local check=$1 secs=$2 what=$3 deadline=$((SECONDS + $2)) i
    say "waiting up to ${secs}s for $what"
    for ((i = 0; i < secs; i++)); do
        "$check" && return 0
        ((SECONDS < deadline)) || break
        sleep 1
    done
    "$check"
}

# The local node answers its CLI (it may still be booting) / has finished booting.
# shellcheck disable=SC2317  # called indirectly through wait_for
node_answers() { timeout 30 rabbitmq-diagnostics -q ping >/dev/null 2>&1; }
# shellcheck disable=SC2317
node_booted() { timeout 30 rabbitmq-diagnostics -q check_running >/dev/null 2>&1; }

# Best effort: needs root or the rabbitmq user; failure is ignored.
enable_mgmt_plugin() {
    if [[ $is_local == 1 ]] && command -v rabbitmq-plugins >/dev/null 2>&1; then
        say "enabling rabbitmq_management (best effort)"
        timeout 120 rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || true
    fi
}

ensure_mgmt() {
    case $(mgmt_status) in
        200) say "management API answers at $mgmt_shown"; return 0 ;;
        401) die "the management API at $mgmt_shown refused the user/password from NOBS_AMQP_URL (HTTP 401)" ;;
    esac
    enable_mgmt_plugin
    wait_for mgmt_up 60 "the management API at $mgmt_shown" && { say "management API answers"; return 0; }
    die "no RabbitMQ management API at $mgmt_shown (AMQP at $target is up).
  Enable it on the broker host with:  rabbitmq-plugins enable rabbitmq_management
  or set NOBS_AMQP_MANAGEMENT_URL to where it listens."
}

# --- 1. a broker already answers -------------------------------------------
if amqp_up; then
    say "AMQP broker answers at $target"
    ensure_mgmt
    exit 0
fi
say "no AMQP broker answers at $target"

# Docker Compose and the Debian package both listen on localhost:5672, so only
# try to start a broker when that is where NOBS_AMQP_URL points.
starts_here=0
[[ $is_local == 1 && $port == 5672 ]] && starts_here=1

# --- 2. Docker engine available --------------------------------------------
docker_ok=0
timeout 20 docker info >/dev/null 2>&1 && docker_ok=1
if [[ $starts_here == 1 && $docker_ok == 1 ]]; then
    say "starting RabbitMQ with docker compose"
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    # Compose v2 plugin, or the older standalone docker-compose (>= 2.1 has --wait).
    if docker compose version >/dev/null 2>&1; then compose=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)
    else die "Docker runs but Docker Compose is missing; install the compose plugin and rerun"
    fi
    "${compose[@]}" -f docker-compose.rabbitmq.yml up -d --wait
    wait_for amqp_up 90 "AMQP at $target" || die "RabbitMQ container started but AMQP at $target does not answer"
    ensure_mgmt
    exit 0
fi

# --- 3. Debian/Ubuntu as root: install / start rabbitmq-server ---------------
debian_root=0
[[ -f /etc/debian_version && $(id -u) == 0 ]] && debian_root=1
if [[ $starts_here == 1 && $debian_root == 1 && ${NOBS_AMQP_NO_BROKER_INSTALL:-0} != 1 ]]; then
    if ! dpkg -s rabbitmq-server >/dev/null 2>&1; then
        say "installing rabbitmq-server with apt-get"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server
    fi
    # Without systemd the package may or may not have started the node; never
    # start a second node next to one that runs. A node that runs may still be
    # booting (its AMQP listener comes last), so give it time before judging.
    if ! amqp_up && node_answers; then
        wait_for amqp_up 90 "the running RabbitMQ node to open AMQP at $target" \
            || die "a local RabbitMQ node runs but AMQP at $target does not answer; check its listeners or NOBS_AMQP_URL"
    fi
    if ! amqp_up; then
        say "starting rabbitmq-server (detached)"
        rabbitmq-server -detached
        # `rabbitmqctl await_startup` fails at once while the new node has not yet
        # registered with epmd, so poll until the node says it has booted.
        wait_for node_booted 120 "rabbitmq-server to boot" \
            || die "rabbitmq-server did not finish starting within 120s; its log is in /var/log/rabbitmq/"
    fi
    enable_mgmt_plugin
    wait_for amqp_up 90 "AMQP at $target" || die "rabbitmq-server runs but AMQP at $target does not answer"
    ensure_mgmt
    exit 0
fi

# --- 4. nothing worked: explain why ----------------------------------------
reasons=
[[ $starts_here == 1 ]] || reasons+=$'\n    - a broker is only started for localhost:5672, not for '"$target"
[[ $docker_ok == 1 ]] || reasons+=$'\n    - no Docker engine is running (docker info failed)'
if [[ $debian_root == 0 ]]; then
    reasons+=$'\n    - not Debian/Ubuntu as root, so rabbitmq-server is not installed automatically'
elif [[ ${NOBS_AMQP_NO_BROKER_INSTALL:-0} == 1 ]]; then
    reasons+=$'\n    - NOBS_AMQP_NO_BROKER_INSTALL=1, so rabbitmq-server is not installed automatically'
fi
die "no RabbitMQ broker answers at $target and none could be started:$reasons
  Do one of:
    - set NOBS_AMQP_URL to a running broker, e.g. amqp://user:pass@host:5672/
    - start Docker and rerun this script (it runs docker-compose.rabbitmq.yml)
    - install and start rabbitmq-server (Debian/Ubuntu: apt-get install rabbitmq-server)"
