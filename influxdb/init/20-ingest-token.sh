#!/bin/bash
# The InfluxDB token of the ingest service: it may write the bucket, and nothing else.
#
# InfluxDB 2 generates a token's value itself (it cannot be given one), so this script
# creates the authorization and hands the value to ingest through a file on the named
# volume influx-tokens (docker-compose.yml), which ingest mounts read-only:
#
#   $INGEST_TOKEN_DIR/ingest      the token; owner $INGEST_UID (the user of the ingest
#                                 image, see ARG INGEST_UID in ./Dockerfile), mode 0400
#   $INGEST_TOKEN_DIR/ingest.id   the authorization's ID (not secret), so that
#                                 scripts/rotate-influx-token.sh can delete it later
#
# Both files are replaced atomically (rename), so a reader sees the old or the new
# token, never half of one.
#
# Two callers:
#   - the influxdb:2.x image, once, right after the initial setup (an empty data volume),
#     as root, with the influx CLI holding the operator token and
#     DOCKER_INFLUXDB_INIT_BUCKET_ID exported. It runs before the server listens on
#     8086, so the container turns healthy only after this script has succeeded; when
#     it fails, the image wipes the half-made setup and the next start tries again;
#   - scripts/rotate-influx-token.sh, through `docker compose exec influxdb`: also root,
#     with the CLI configuration the setup left in the container. The bucket ID is then
#     looked up by name.
# The previous authorization is left alone: the rotation deletes it once ingest runs
# with the new token.
set -euo pipefail

die() {
    printf '20-ingest-token.sh: %s\n' "$*" >&2
    exit 1
}

: "${DOCKER_INFLUXDB_INIT_ORG:?expected from the environment of the influxdb service}"
: "${DOCKER_INFLUXDB_INIT_BUCKET:?expected from the environment of the influxdb service}"
: "${DOCKER_INFLUXDB_INIT_USERNAME:?expected from the environment of the influxdb service}"
: "${INGEST_TOKEN_DIR:?INGEST_TOKEN_DIR is not set (the mount point of the influx-tokens volume)}"
: "${INGEST_UID:?INGEST_UID is not set (the uid of the ingest image user)}"
[[ "$INGEST_UID" =~ ^[0-9]+$ ]] || die "INGEST_UID must be a numeric uid, not '$INGEST_UID'"
[[ -d "$INGEST_TOKEN_DIR" ]] || die "$INGEST_TOKEN_DIR does not exist (is the influx-tokens volume mounted?)"

org="$DOCKER_INFLUXDB_INIT_ORG"
bucket="$DOCKER_INFLUXDB_INIT_BUCKET"
bucket_id="${DOCKER_INFLUXDB_INIT_BUCKET_ID:-}"
if [[ -z "$bucket_id" ]]; then
    # The same lookup the image's entrypoint does for DOCKER_INFLUXDB_INIT_BUCKET_ID.
    bucket_id="$(influx bucket list --org "$org" --name "$bucket" --hide-headers | cut -f 1)"
fi
[[ "$bucket_id" =~ ^[0-9a-f]{16}$ ]] || die "no ID found for bucket '$bucket' in org '$org'"

# One permission: write to this bucket. No read, no other bucket, no other resource.
# The output holds the token: it stays in this shell's memory and goes to the file only.
created="$(
    influx auth create \
        --org "$org" \
        --user "$DOCKER_INFLUXDB_INIT_USERNAME" \
        --write-bucket "$bucket_id" \
        --description "factory-ingest: write-only, bucket $bucket ($(date -u +%Y-%m-%dT%H:%M:%SZ))" \
        --json
)"
# The CLI prints one flat JSON object: {"id": ..., "description": ..., "token": ...,
# "status": ..., "userName": ..., "userID": ..., "permissions": [...]}; the first "id"
# is the authorization's. The image has no JSON tool, hence bash's own matching.
token_re='"token":[[:space:]]*"([^"[:space:]]+)"'
id_re='"id":[[:space:]]*"([0-9a-f]{16})"'
[[ "$created" =~ $token_re ]] || die "no token in the output of influx auth create"
token="${BASH_REMATCH[1]}"
[[ "$created" =~ $id_re ]] || die "no authorization ID in the output of influx auth create"
auth_id="${BASH_REMATCH[1]}"

# The directory: root and the ingest group only (ingest needs to traverse it, the
# influxd user does not). Files are created private and handed over before the rename.
chown "0:$INGEST_UID" "$INGEST_TOKEN_DIR"
chmod 0750 "$INGEST_TOKEN_DIR"
umask 077
token_tmp="$(mktemp "$INGEST_TOKEN_DIR/.ingest.XXXXXX")"
id_tmp="$(mktemp "$INGEST_TOKEN_DIR/.ingest.id.XXXXXX")"
trap 'rm -f -- "$token_tmp" "$id_tmp"' EXIT
printf '%s\n' "$token" >"$token_tmp"
chown "$INGEST_UID:$INGEST_UID" "$token_tmp"
chmod 0400 "$token_tmp"
printf '%s\n' "$auth_id" >"$id_tmp"
chmod 0644 "$id_tmp"
mv -f -- "$token_tmp" "$INGEST_TOKEN_DIR/ingest"
mv -f -- "$id_tmp" "$INGEST_TOKEN_DIR/ingest.id"

echo "20-ingest-token.sh: write-only token for bucket $bucket (authorization $auth_id) stored in $INGEST_TOKEN_DIR/ingest"
