# shellcheck shell=bash
# Helpers shared by scripts/init-secrets.sh and scripts/add-device.sh (sourced, not run).
#
# MOSQUITTO_PASSWD picks the tool that writes mosquitto/passwd:
#   local   the mosquitto_passwd on this host
#   docker  mosquitto_passwd inside $MOSQUITTO_IMAGE (the broker image of
#           docker-compose.yml), as the calling user, without network
#   auto    (default) local when installed, else docker
# `mosquitto_passwd -b` takes the password as an argument, so it is briefly visible in
# the process list of this host: run these scripts on a machine you trust.

MOSQUITTO_IMAGE="${MOSQUITTO_IMAGE:-eclipse-mosquitto:2.0}"
# Usernames with a fixed role in mosquitto/acl; never device ids.
# shellcheck disable=SC2034  # used by the scripts that source this file
RESERVED_USERS=(ingest simulator healthcheck)

die() {
    printf '%s: %s\n' "$(basename "$0")" "$*" >&2
    exit 1
}

# A random secret: 24 bytes as 48 hex characters (URL-safe, so it can sit in mqtt:// URLs).
random_secret() {
    local value=""
    if command -v openssl >/dev/null 2>&1; then
        value="$(openssl rand -hex 24)"
    elif command -v python3 >/dev/null 2>&1; then
        value="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
    else
        value="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
    fi
    [[ "$value" =~ ^[0-9a-f]{48}$ ]] || die "could not generate a random secret"
    printf '%s' "$value"
}

passwd_tool() {
    local choice="${MOSQUITTO_PASSWD:-auto}"
    case "$choice" in
        local)
            command -v mosquitto_passwd >/dev/null 2>&1 \
                || die "MOSQUITTO_PASSWD=local but mosquitto_passwd is not installed"
            echo local
            ;;
        docker)
            echo docker
            ;;
        auto)
            if command -v mosquitto_passwd >/dev/null 2>&1; then
                echo local
            elif command -v docker >/dev/null 2>&1; then
                echo docker
            else
                die "need mosquitto_passwd (package mosquitto) or docker to write the password file"
            fi
            ;;
        *)
            die "MOSQUITTO_PASSWD must be local, docker or auto, not '$choice'"
            ;;
    esac
}

# passwd_set DIR FILE USER PASSWORD [create]: add USER (or replace its password) in
# DIR/FILE; with "create", start a new file. The file is rewritten in place, so its
# owner and mode stay as they are.
passwd_set() {
    local dir="$1" file="$2" user="$3" password="$4" create="${5:-}"
    local flags=(-b) tool
    [[ "$create" == create ]] && flags=(-c -b)
    tool="$(passwd_tool)" || exit 1
    case "$tool" in
        local)
            mosquitto_passwd "${flags[@]}" "$dir/$file" "$user" "$password"
            ;;
        docker)
            docker run --rm --network none --user "$(id -u):$(id -g)" \
                --volume "$dir:/passwd-dir" --entrypoint mosquitto_passwd \
                "$MOSQUITTO_IMAGE" "${flags[@]}" "/passwd-dir/$file" "$user" "$password"
            ;;
    esac
}

# env_value FILE NAME: the value of NAME=... in a .env file (the last one wins, as in
# docker compose); empty when absent.
env_value() {
    local file="$1" name="$2" line value=""
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" == "$name="* ]]; then
            value="${line#"$name="}"
        fi
    done <"$file"
    printf '%s' "$value"
}
