#!/usr/bin/env bash
# Give the ingest service a new InfluxDB token and revoke the old one, in this order:
#
#   1. create a new authorization that can only write the bucket, and store its token on
#      the influx-tokens volume: the same influxdb/init/20-ingest-token.sh that made the
#      first one, run in the influxdb container (docker compose exec);
#   2. restart ingest, which reads the token file when it starts;
#   3. wait until ingest is healthy again, then delete the previous authorization.
#
# If ingest does not turn healthy in time, the old authorization is kept (step 3 is
# skipped) and the command to delete it by hand is printed. Batches that fail meanwhile
# wait in ingest's spool and are written once it can. Neither token is ever printed.
#
# Also the way to give ingest its own token on a stack that was set up before it had
# one (there is no previous authorization to delete then; the operator token stays).
#
# Usage: scripts/rotate-influx-token.sh [--timeout SECONDS]    (default 180)
# Run it from anywhere on the docker host; it uses the compose project of this checkout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INIT_SCRIPT=/docker-entrypoint-initdb.d/20-ingest-token.sh

die() {
    printf '%s: %s\n' "$(basename "$0")" "$*" >&2
    exit 1
}

usage() {
    echo "usage: $(basename "$0") [--timeout SECONDS]" >&2
    exit 2
}

timeout=180
while (($#)); do
    case "$1" in
        --timeout)
            (($# >= 2)) || usage
            timeout="$2"
            shift
            ;;
        -h | --help) usage ;;
        *) usage ;;
    esac
    shift
done
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout takes a number of seconds, not '$timeout'"

# docker compose finds docker-compose.yml and .env in the current directory.
cd "$REPO"
compose() {
    docker compose "$@"
}

# The ID of the authorization whose token is in the file now (empty when none is).
current_id() {
    # shellcheck disable=SC2016  # expanded by the shell in the container
    compose exec -T influxdb sh -c 'cat "$INGEST_TOKEN_DIR/ingest.id" 2>/dev/null || true' \
        | tr -d '[:space:]'
}

# Wait until the ingest container reports healthy (its image has a HEALTHCHECK; a
# restart resets the status to "starting").
wait_healthy() {
    local deadline=$((SECONDS + timeout)) container status
    container="$(compose ps -q ingest)"
    [[ -n "$container" ]] || return 1
    while :; do
        status="$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' \
            "$container" 2>/dev/null || true)"
        [[ "$status" == healthy ]] && return 0
        ((SECONDS < deadline)) || return 1
        sleep 5
    done
}

old_id="$(current_id)" || die "cannot reach the influxdb service; is the stack up (docker compose up -d)?"
[[ -z "$old_id" || "$old_id" =~ ^[0-9a-f]{16}$ ]] || die "unexpected authorization ID in ingest.id: '$old_id'"

compose exec -T influxdb "$INIT_SCRIPT" || die "creating the new token failed; nothing changed"
new_id="$(current_id)"
[[ "$new_id" =~ ^[0-9a-f]{16}$ && "$new_id" != "$old_id" ]] \
    || die "the token file was not replaced (authorization ID '$new_id'); nothing revoked"
echo "new write-only authorization $new_id stored; restarting ingest"

compose restart ingest
if ! wait_healthy; then
    echo "ingest is not healthy after ${timeout}s: see docker compose logs ingest" >&2
    if [[ -n "$old_id" ]]; then
        echo "the previous authorization $old_id was kept; once ingest runs, revoke it with:" >&2
        echo "  docker compose exec influxdb influx auth delete --id $old_id" >&2
    fi
    exit 1
fi
echo "ingest is healthy with the new token"

if [[ -z "$old_id" ]]; then
    echo "no previous ingest authorization was recorded: nothing to revoke"
    exit 0
fi
# Both commands print the authorization, token included: not to the terminal.
if ! compose exec -T influxdb influx auth list --id "$old_id" >/dev/null 2>&1; then
    # E.g. after restoring a backup that predates it.
    echo "the previous authorization $old_id does not exist (any more): nothing to revoke"
    exit 0
fi
if compose exec -T influxdb influx auth delete --id "$old_id" >/dev/null; then
    echo "revoked the previous authorization $old_id"
else
    echo "could not delete the previous authorization $old_id; revoke it with:" >&2
    echo "  docker compose exec influxdb influx auth delete --id $old_id" >&2
    exit 1
fi
