#!/bin/sh
# A command skill: JSON on stdin, JSON on stdout, errors on stderr with a non-zero exit.
# Extracts the "text" string with sed (no JSON escapes beyond \n and \" are decoded) and
# counts it with wc.
set -eu
input=$(cat)
text=$(printf '%s' "$input" | sed -n 's/.*"text"[[:space:]]*:[[:space:]]*"\(\([^"\\]\|\\.\)*\)".*/\1/p')
if [ -z "$text" ] && ! printf '%s' "$input" | grep -q '"text"'; then
    echo 'wc: input needs a "text" string' >&2
    exit 2
fi
decoded=$(printf '%s' "$text" | sed 's/\\n/\n/g; s/\\"/"/g')
set -- $(printf '%s\n' "$decoded" | wc -l -w -c)
printf '{"lines": %d, "words": %d, "bytes": %d}\n' "$1" "$2" "$(( $3 - 1 ))"
