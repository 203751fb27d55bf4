#!/usr/bin/env bash
# First-time secrets for docker-compose.yml:
#
#   .env               from .env.example, every empty *_PASSWORD and *_TOKEN filled with
#                      a fresh random value (mode 0600)
#   mosquitto/passwd   the MQTT logins ingest, simulator and healthcheck, hashed by
#                      mosquitto_passwd, with the passwords from .env
#
# Refuses to overwrite either file: they belong together, and the InfluxDB and Grafana
# volumes keep the credentials of their first start. To start over, remove both files
# and the volumes (docker compose down -v). Prints no secret.
#
# Usage: scripts/init-secrets.sh    (MOSQUITTO_PASSWD=local|docker|auto, see lib-secrets.sh)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib-secrets.sh
source "$REPO/scripts/lib-secrets.sh"

EXAMPLE="$REPO/.env.example"
ENV_FILE="$REPO/.env"
PASSWD_DIR="$REPO/mosquitto"
PASSWD_FILE="$PASSWD_DIR/passwd"

[[ -f "$EXAMPLE" ]] || die "missing $EXAMPLE"
[[ -e "$ENV_FILE" ]] && die ".env already exists; not overwriting it (remove it to start over)"
[[ -e "$PASSWD_FILE" ]] && die "mosquitto/passwd already exists; not overwriting it (add devices with scripts/add-device.sh)"
passwd_tool >/dev/null  # fail before writing anything when no tool is available

umask 077
env_tmp="$(mktemp "$REPO/.env.tmp.XXXXXX")"
passwd_tmp="$(mktemp "$PASSWD_DIR/passwd.tmp.XXXXXX")"
trap 'rm -f "$env_tmp" "$passwd_tmp"' EXIT

generated=()
while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ ^([A-Z][A-Z0-9_]*_(PASSWORD|TOKEN))=$ ]]; then
        name="${BASH_REMATCH[1]}"
        secret="$(random_secret)"
        printf '%s=%s\n' "$name" "$secret"
        generated+=("$name")
    else
        printf '%s\n' "$line"
    fi
done <"$EXAMPLE" >"$env_tmp"

# MQTT login -> the .env variable that holds its password.
declare -A LOGINS=(
    [ingest]=INGEST_MQTT_PASSWORD
    [simulator]=SIMULATOR_MQTT_PASSWORD
    [healthcheck]=MQTT_HEALTHCHECK_PASSWORD
)
create=create
for user in "${RESERVED_USERS[@]}"; do
    password="$(env_value "$env_tmp" "${LOGINS[$user]}")"
    [[ -n "$password" ]] || die "${LOGINS[$user]} is not empty in .env.example; cannot hash it"
    passwd_set "$PASSWD_DIR" "$(basename "$passwd_tmp")" "$user" "$password" "$create"
    create=""
done

# The broker in the container runs as its own user (uid 1883) and reads the file after
# dropping root, so it must be readable by others. It holds salted PBKDF2-SHA512
# hashes, no passwords. .env, which holds the passwords, stays 0600.
chmod 0644 "$passwd_tmp"
chmod 0600 "$env_tmp"
# Hard links never replace an existing file: one that appeared meanwhile is kept, and
# this run fails. The EXIT trap removes the temporary names.
ln -- "$passwd_tmp" "$PASSWD_FILE" 2>/dev/null \
    || die "mosquitto/passwd appeared while this ran; left it alone"
if ! ln -- "$env_tmp" "$ENV_FILE" 2>/dev/null; then
    rm -f -- "$PASSWD_FILE"
    die ".env appeared while this ran; left it alone"
fi

echo "wrote .env (mode 0600; generated: ${generated[*]})"
echo "wrote mosquitto/passwd (logins: ingest, simulator, healthcheck)"
echo "next: docker compose up -d --build; add devices with scripts/add-device.sh DEVICE_ID"
