#!/bin/sh
# An exec grain: its input (JSON) arrives on stdin, its result document leaves on stdout.
# It upper-cases a JSON string and hands it to the Python grain `count`, with the name of the
# host it ran on. Anything but a string is refused with an error document.
set -eu
input=$(cat)
case "$input" in
    \"*\") ;;
    *)
        printf '{"error": "shout takes a JSON string, not %s"}\n' "$(printf '%s' "$input" | tr -d '"\\\n\r\t')"
        exit 1
        ;;
esac
shouted=$(printf '%s' "$input" | tr 'a-z' 'A-Z')
printf '{"next": ["count", {"text": %s, "host": "%s"}]}\n' "$shouted" "$(hostname)"
