#!/usr/bin/env bash
# Tried as a new user would: a fresh clone of this checkout's HEAD, a fresh venv, and the
# README's quick start step by step. `sluicegate demo`, the curl line its banner prints,
# `events` for that request id, `keys usage` (which must show the key's spending), and then
# the README's test command (collected whole, and its README tests run). .ci/run runs it after the tests.
#
#   bash tests/new_user.sh            # SKIP_TESTS=1 leaves out the second quick-start command
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluicegate-new-user.XXXXXX")
DEMO_PID=
cleanup() {
  if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
    kill -INT "$DEMO_PID"
    for _ in $(seq 1 50); do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$DEMO_PID" 2>/dev/null && kill -KILL "$DEMO_PID"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
quiet_pip() { python3 -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
fail() { printf 'NEW USER FAILED: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "a fresh clone and a fresh venv"
git clone -q "$HERE" "$WORK/sluicegate"
cd "$WORK/sluicegate"
python3 -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"

step "quick start, first command: python3 -m pip install -e . && sluicegate demo"
quiet_pip -e .
PORT=$(free_port)
MOCK_PORT=$(free_port)
sluicegate demo --bind "127.0.0.1:$PORT" --mock-bind "127.0.0.1:$MOCK_PORT" >"$WORK/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 1 150); do
  grep -q "curl " "$WORK/demo.log" 2>/dev/null && break
  kill -0 "$DEMO_PID" 2>/dev/null || { cat "$WORK/demo.log"; fail "the demo exited"; }
  sleep 0.2
done
sed -n '1,20p' "$WORK/demo.log"
CURL=$(grep -m1 "^ *curl " "$WORK/demo.log" | sed 's/^ *//') || fail "no curl line in the banner"
EVENTS=$(grep -m1 "^ *sluicegate events " "$WORK/demo.log" | sed 's/^ *//') || fail "no events command in the banner"
USAGE=$(grep -m1 "^ *sluicegate keys usage " "$WORK/demo.log" | sed 's/^ *//') || fail "no keys usage command in the banner"

step "the banner's curl line"
ANSWER=$(bash -c "$CURL") || fail "the curl line failed"
printf '%s\n' "$ANSWER" | tail -3
printf '%s' "$ANSWER" | grep -q 'data: \[DONE\]' || fail "the stream did not end with [DONE]"

step "the banner's events command"
FOUND=
for _ in $(seq 1 50); do  # the record is written within moments of the answer
  if OUT=$(bash -c "$EVENTS" 2>&1) && printf '%s' "$OUT" | grep -q '"request_id"'; then FOUND=1; break; fi
  sleep 0.2
done
[ -n "$FOUND" ] || { printf '%s\n' "$OUT"; fail "events found no record for the curl's request id"; }
printf '%s\n' "$OUT" | head -c 600; echo

step "the banner's keys usage command"
OUT=$(bash -c "$USAGE") || { printf '%s\n' "$OUT"; fail "keys usage failed"; }
printf '%s\n' "$OUT"
SPENT=$(printf '%s\n' "$OUT" | awk '$1 == "demo" { print $3 }')
[ -n "$SPENT" ] || fail "keys usage does not show the demo key"
[ "$SPENT" -gt 0 ] 2>/dev/null || fail "keys usage says the demo key spent $SPENT tokens after the curl"

kill -INT "$DEMO_PID"; wait "$DEMO_PID" || true; DEMO_PID=

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # .ci/run has just run the whole suite on this same commit: here the second command is checked
  # for what a fresh venv adds, that every test file imports and collects, and the README's own
  # test (its snippets, its quick start against the demo), not run whole a second time.
  step "quick start, second command: python3 -m pip install -e '.[test]' && python3 -m pytest"
  quiet_pip -e '.[test]'
  COLLECTED=$(python3 -m pytest -q --collect-only -n 0 -p no:cacheprovider | tail -1)
  printf '%s\n' "$COLLECTED"
  case "$COLLECTED" in *error*|*"no tests"*) fail "the test command does not collect: $COLLECTED" ;; esac
  python3 -m pytest -q -x -n 0 -p no:cacheprovider tests/test_readme.py
fi
step "the quick start works for a new user"
