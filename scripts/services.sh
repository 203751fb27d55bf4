#!/usr/bin/env bash
# Real test services for factory-ingest: InfluxDB 1.6 (v1 HTTP API), VictoriaMetrics
# and Mosquitto, all on 127.0.0.1.
#
#   scripts/services.sh start    install missing Debian packages, start what is not answering
#   scripts/services.sh stop     stop only the daemons this script started (.services/*.pid)
#   scripts/services.sh status   print what answers; exit 1 if anything is down
#
# Ports: INFLUX_PORT (8086), INFLUX_RPC_PORT (8088), VM_PORT (8428), MQTT_PORT (1883; must match
# the listener in MOSQUITTO_CONF, default /etc/mosquitto/mosquitto.conf).
# SERVICES_WAIT bounds the readiness wait in seconds (60).
# Runs as root without systemd (policy-rc.d denies service starts), with no stdin.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$REPO/.services"
INFLUX_PORT="${INFLUX_PORT:-8086}"
INFLUX_RPC_PORT="${INFLUX_RPC_PORT:-8088}"
VM_PORT="${VM_PORT:-8428}"
MQTT_PORT="${MQTT_PORT:-1883}"
WAIT_SECONDS="${SERVICES_WAIT:-60}"
MOSQUITTO_CONF="${MOSQUITTO_CONF:-/etc/mosquitto/mosquitto.conf}"

log() { printf '%s\n' "$*"; }
die() { printf 'services.sh: %s\n' "$*" >&2; exit 1; }

# --- probes (bash /dev/tcp only: no curl needed on a fresh machine) -----------------

tcp_open() { # host port
    # shellcheck disable=SC2016  # expanded by the inner bash, from its arguments
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

http_status() { # port path -> prints the HTTP status code, or nothing
    # shellcheck disable=SC2016  # expanded by the inner bash, from its arguments
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" "$2" >&3
        IFS=" " read -r _ code _ <&3 && printf "%s" "$code"
    ' _ "$1" "$2" 2>/dev/null || true
}

influx_up() { [[ "$(http_status "$INFLUX_PORT" /ping)" == 204 ]]; }
vm_up() { [[ "$(http_status "$VM_PORT" /health)" == 200 ]]; }
mqtt_up() { tcp_open 127.0.0.1 "$MQTT_PORT"; }

# --- pid files ----------------------------------------------------------------------

pid_alive() { # name binary -> true if .services/<name>.pid is a live <binary> process
    local pidfile="$STATE/$1.pid" pid exe
    [[ -f "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    [[ "$(basename "${exe% (deleted)}")" == "$2" ]]
}

# --- install ------------------------------------------------------------------------

ensure_packages() {
    local pkgs=()
    command -v influxd >/dev/null 2>&1 || pkgs+=(influxdb)
    command -v victoria-metrics >/dev/null 2>&1 || pkgs+=(victoria-metrics)
    command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || pkgs+=(mosquitto)
    # mosquitto_passwd / mosquitto_sub (auth and healthcheck tests), openssl (TLS test)
    command -v mosquitto_sub >/dev/null 2>&1 || pkgs+=(mosquitto-clients)
    command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)
    ((${#pkgs[@]})) || return 0
    log "installing: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" </dev/null
}

# --- start --------------------------------------------------------------------------

write_influx_config() {
    local dir="$STATE/influxdb"
    mkdir -p "$dir/meta" "$dir/data" "$dir/wal"
    sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|127.0.0.1|g" -e "s|@HTTP_PORT@|$INFLUX_PORT|g" \
        -e "s|@RPC_PORT@|$INFLUX_RPC_PORT|g" -e "s|@LOG_LEVEL@|info|g" \
        "$REPO/scripts/influxdb.conf.template" >"$dir/influxdb.conf"
}

spawn() { # name cmd... : start detached, logs to .services/<name>.log, pid to .services/<name>.pid
    local name="$1"
    shift
    # setsid without -f execs in place (a background child is never a group leader), so $! is
    # the daemon itself; the new session keeps it alive after the calling shell goes away.
    setsid "$@" >>"$STATE/$name.log" 2>&1 </dev/null &
    echo "$!" >"$STATE/$name.pid"
}

start_influx() {
    if influx_up; then log "influxdb: already answering on 127.0.0.1:$INFLUX_PORT"; return; fi
    if pid_alive influxdb influxd; then log "influxdb: pid $(<"$STATE/influxdb.pid") still starting"; return; fi
    write_influx_config
    spawn influxdb influxd -config "$STATE/influxdb/influxdb.conf"
}

start_vm() {
    if vm_up; then log "victoria-metrics: already answering on 127.0.0.1:$VM_PORT"; return; fi
    if pid_alive victoria-metrics victoria-metrics; then
        log "victoria-metrics: pid $(<"$STATE/victoria-metrics.pid") still starting"
        return
    fi
    mkdir -p "$STATE/vm"
    spawn victoria-metrics victoria-metrics \
        -storageDataPath="$STATE/vm" \
        -httpListenAddr="127.0.0.1:$VM_PORT" \
        -retentionPeriod=100y
}

conf_value() { # key file -> value of the first "key value" line, if any
    awk -v k="$1" '$1 == k { print $2; exit }' "$2" 2>/dev/null || true
}

start_mosquitto() {
    if mqtt_up; then log "mosquitto: already answering on 127.0.0.1:$MQTT_PORT"; return; fi
    if pid_alive mosquitto mosquitto; then log "mosquitto: pid $(<"$STATE/mosquitto.pid") still starting"; return; fi
    local pid_file dir i
    pid_file="$(conf_value pid_file "$MOSQUITTO_CONF")"
    # Without systemd nobody creates the runtime dir that the Debian config's pid_file needs;
    # the daemon drops to user mosquitto, so it must own its pid and log dirs. Only dirs made
    # here or named .../mosquitto are chowned (never a shared dir such as /tmp).
    for dir in ${pid_file:+"$(dirname "$pid_file")"} "$(dirname "$(mosquitto_log)")"; do
        if [[ ! -d "$dir" || "$(basename "$dir")" == mosquitto ]]; then
            mkdir -p "$dir"
            if id mosquitto >/dev/null 2>&1; then chown mosquitto:mosquitto "$dir"; fi
        fi
    done
    [[ -z "$pid_file" ]] || rm -f "$pid_file"
    mosquitto -d -c "$MOSQUITTO_CONF" </dev/null
    # -d forks, so take the daemon's pid from the pid_file the config names.
    for ((i = 0; i < 50; i++)); do
        if [[ -n "$pid_file" && -s "$pid_file" ]]; then
            printf '%s\n' "$(<"$pid_file")" >"$STATE/mosquitto.pid"
            return
        fi
        sleep 0.1
    done
    log "mosquitto: started, but no pid file (pid_file ${pid_file:-unset} in $MOSQUITTO_CONF)"
}

wait_ready() { # name binary check logfile
    local name="$1" bin="$2" check="$3" logfile="$4" deadline=$((SECONDS + WAIT_SECONDS)) why
    until "$check"; do
        why=""
        if [[ -f "$STATE/$name.pid" ]] && ! pid_alive "$name" "$bin"; then
            why="exited"
        elif ((SECONDS >= deadline)); then
            why="did not answer within ${WAIT_SECONDS}s"
        fi
        if [[ -n "$why" ]]; then
            printf 'services.sh: %s %s; last log lines (%s):\n' "$name" "$why" "$logfile" >&2
            tail -n 30 "$logfile" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.5
    done
}

mosquitto_log() {
    local dest
    dest="$(awk '$1 == "log_dest" && $2 == "file" { print $3; exit }' "$MOSQUITTO_CONF" 2>/dev/null || true)"
    printf '%s' "${dest:-/var/log/mosquitto/mosquitto.log}"
}

cmd_start() {
    ensure_packages
    mkdir -p "$STATE"
    start_influx
    start_vm
    start_mosquitto
    local failed=0
    wait_ready influxdb influxd influx_up "$STATE/influxdb.log" || failed=1
    wait_ready victoria-metrics victoria-metrics vm_up "$STATE/victoria-metrics.log" || failed=1
    wait_ready mosquitto mosquitto mqtt_up "$(mosquitto_log)" || failed=1
    ((failed == 0)) || exit 1
    log "influxdb: http://127.0.0.1:$INFLUX_PORT (ping 204)"
    log "victoria-metrics: http://127.0.0.1:$VM_PORT (health 200)"
    log "mosquitto: mqtt://127.0.0.1:$MQTT_PORT (tcp open)"
}

# --- stop / status ------------------------------------------------------------------

stop_one() { # name binary
    local name="$1" bin="$2" pidfile="$STATE/$1.pid" pid i
    if ! pid_alive "$name" "$bin"; then
        [[ -f "$pidfile" ]] && log "$name: not running (stale pid file removed)"
        rm -f "$pidfile"
        return
    fi
    pid="$(<"$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        log "$name: pid $pid killed"
    else
        log "$name: pid $pid stopped"
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    stop_one influxdb influxd
    stop_one victoria-metrics victoria-metrics
    stop_one mosquitto mosquitto
}

cmd_status() {
    local down=0
    if influx_up; then log "influxdb: up http://127.0.0.1:$INFLUX_PORT"; else log "influxdb: down"; down=1; fi
    if vm_up; then log "victoria-metrics: up http://127.0.0.1:$VM_PORT"; else log "victoria-metrics: down"; down=1; fi
    if mqtt_up; then log "mosquitto: up 127.0.0.1:$MQTT_PORT"; else log "mosquitto: down"; down=1; fi
    return "$down"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
