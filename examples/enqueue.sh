#!/usr/bin/env bash
# Route one prompt through llm-router with nothing but bash and redis-cli.
#
#   examples/enqueue.sh [--schema FILE] [--chain NAME] [--context LABEL] [--timeout SECONDS] PROMPT
#
# Enqueues the request to the Redis and queue named by LLM_ROUTER_REDIS_URL
# (default redis://127.0.0.1:6379/0) and LLM_ROUTER_QUEUE_NAME (default
# llm_router:queue), waits on its own reply list, and prints the result JSON.
# It writes only the job, the queue and the wake-up list (no Lua, no hand-over
# to a waiting worker), and reads only its own reply list.
#
# Exit status: 0 ok; 1 failed or invalid_request (the result is printed all the
# same); 2 usage; 3 Redis unreachable; 4 no result within --timeout (default 120).
set -euo pipefail

url=${LLM_ROUTER_REDIS_URL:-redis://127.0.0.1:6379/0}
queue=${LLM_ROUTER_QUEUE_NAME:-llm_router:queue}
schema="" chain="" context="" timeout=120

usage() { echo "usage: $0 [--schema FILE] [--chain NAME] [--context LABEL] [--timeout SECONDS] PROMPT" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --schema) [[ $# -ge 2 ]] || usage; schema=$2; shift 2 ;;
    --chain) [[ $# -ge 2 ]] || usage; chain=$2; shift 2 ;;
    --context) [[ $# -ge 2 ]] || usage; context=$2; shift 2 ;;
    --timeout) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || usage; timeout=$2; shift 2 ;;
    --) shift; break ;;
    -*) usage ;;
    *) break ;;
  esac
done
[[ $# -eq 1 ]] || usage
prompt=$1

# A JSON string: backslash, quote and every control character escaped.
json_string() {
  local s=$1 n c escaped
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  for ((n = 1; n < 32; n++)); do   # byte by byte, whatever the locale's collation
    printf -v c "\\x$(printf %02x "$n")"
    printf -v escaped '\\u%04x' "$n"
    s=${s//"$c"/$escaped}
  done
  printf '"%s"' "$s"
}

request="{\"messages\":[{\"role\":\"user\",\"content\":$(json_string "$prompt")}]"
if [[ -n $schema ]]; then
  [[ -r $schema ]] || { echo "$0: cannot read schema $schema" >&2; exit 2; }
  body=$(<"$schema")
  request+=",\"schema\":${body//$'\n'/ }"   # JSON allows a space wherever it allows a newline
fi
[[ -z $chain ]] || request+=",\"chain\":$(json_string "$chain")"
[[ -z $context ]] || request+=",\"context\":$(json_string "$context")"
request+="}"

id=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
now=$(( ${EPOCHREALTIME/./} / 1000 ))   # Unix ms
reply="llm_router:reply:sh-$id"
blob="{\"t\":1,\"f\":\"route\",\"a\":[$request],\"k\":{\"reply_to\":\"$reply\"},\"et\":$now}"

# redis-cli reads each line as arguments: inside double quotes, \\ and \" are literal.
quoted=${blob//\\/\\\\}
quoted=${quoted//\"/\\\"}
cli=(redis-cli --no-auth-warning -u "$url")
if ! out=$(printf 'MULTI\nSET "arq:job:%s" "%s" PX 86400000\nZADD "%s" %s "%s"\nLPUSH "%s:wake" 1\nLTRIM "%s:wake" 0 99\nEXEC\n' \
    "$id" "$quoted" "$queue" "$now" "$id" "$queue" "$queue" | "${cli[@]}" 2>&1) \
    || [[ $out == *ERR* || $out == *NOPERM* || $out == *"Could not connect"* ]]; then
  echo "$0: cannot enqueue: ${out//$'\n'/ }" >&2
  exit 3
fi

if ! answer=$("${cli[@]}" --raw BLPOP "$reply" "$timeout" 2>&1); then
  echo "$0: cannot wait for the result: ${answer//$'\n'/ }" >&2
  exit 3
fi
if [[ -z $answer ]]; then
  echo "$0: no result for job $id within ${timeout}s" >&2
  exit 4
fi
value=${answer#*$'\n'}            # BLPOP answers the list's name, then the element
result=${value#*\"r\":}            # the result blob: {..., "r": <result>, "st": ...}
result=${result%,\"st\":*}
printf '%s\n' "$result"
head=${result%%,\"content\":*}     # {"v":1,"status":"..."
[[ $head == *'"status":"ok"'* ]]
