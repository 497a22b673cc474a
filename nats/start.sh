#!/bin/sh
# Starts nats-server with the node config given as $1 (the compose entrypoint:
# `sh /etc/nats/start.sh /etc/nats/nats-1.conf`; tests/test_nats_deploy.py runs it too).
#
# The configs next to this script read the passwords from the environment
# (`password: $ITAP_..._PASSWORD`). nats-server takes such a value as a piece of its config
# language, not as a string (checked with 2.9.10): `a;b` or `a,b` becomes the password `a`,
# `-x`, `1k` or `true` stop it with a parse error, and an EMPTY variable is a login without
# password. So every variable the configs name must be set and non-empty here, and goes to
# nats-server in double quotes: then it is exactly the characters given. A password
# holding `"` or `\` is refused (choose another; `itap passwd` makes none).
set -eu
conf="$1"
shift
here=$(dirname "$0")
for var in $(sed -e '/^[[:space:]]*#/d' -n -e 's/.*password:[[:space:]]*\$\([A-Za-z_][A-Za-z0-9_]*\).*/\1/p' \
             "$here"/*.conf | sort -u); do
  eval "value=\${$var-}"
  case "$value" in
    "")
      echo "nats: $var is not set: put it in .env next to docker-compose.yml (see nats/README.md)" >&2
      exit 1 ;;
    *\"* | *\\*)
      echo "nats: $var holds a \" or a \\, which the server's config language cannot take: choose another" >&2
      exit 1 ;;
  esac
  export "$var=\"$value\""
done
exec nats-server --config "$conf" "$@"
