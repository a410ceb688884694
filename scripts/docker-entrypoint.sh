#!/bin/sh
# Entrypoint of the image: picks the user a service runs as, then execs it without privileges.
# Files written to a mounted folder then belong to whoever owns that folder on the host, whatever
# its uid (1000, another, root), with nothing to export first:
#   metric           runs as the owner of LOG_DIR (./logs in compose)
#   trainer          runs as the owner of /app/models (./models): its window and the promoted models
#   model train, model rollback   run as the owner of /app/models, where they write the artifact
#   everything else  runs as 1000:1000
# Started as another user than root (`docker run --user`), it runs the command as that user.
set -eu

if [ "$#" -eq 0 ]; then
  set -- features --help
fi
# Compose cannot leave a variable out, only set it empty (`MODEL_PATH: ${MODEL_PATH:-}`); an empty
# optional setting means "not set", which the binaries spell by its absence.
for name in MODEL_PATH TARGET_COLUMN SEED AMQP_CA_FILE AMQP_CLIENT_CERT_FILE AMQP_CLIENT_KEY_FILE; do
  eval "value=\${$name-}"
  if [ -z "$value" ]; then unset "$name"; fi
done

if [ "$(id -u)" != 0 ]; then
  exec "$@"
fi

user=1000:1000
why="default"
case "$1" in
  metric)
    log_dir="${LOG_DIR:-logs}"
    if [ -d "$log_dir" ]; then
      user="$(stat -c '%u:%g' "$log_dir")"
      why="owner of $log_dir"
    fi
    ;;
  model)
    if { [ "${2:-}" = train ] || [ "${2:-}" = rollback ]; } && [ -d /app/models ]; then
      user="$(stat -c '%u:%g' /app/models)"
      why="owner of /app/models"
    fi
    ;;
  trainer)
    if [ -d /app/models ]; then
      user="$(stat -c '%u:%g' /app/models)"
      why="owner of /app/models"
    fi
    ;;
esac

echo "docker-entrypoint: running $1 as $user ($why)" >&2
exec setpriv --reuid="${user%%:*}" --regid="${user##*:}" --clear-groups -- "$@"
