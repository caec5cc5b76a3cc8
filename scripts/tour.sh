#!/usr/bin/env bash
# The README tour, typed into a real terminal: tmux runs `nex up` in one window and the tour's
# commands in another, then the screens are captured to OUTFILE so people (and
# crates/nex-cli/tests/tour.rs) can see what a user sees: aligned tables and readable errors.
#
#   scripts/tour.sh OUTFILE
#
# Environment:
#   NEX              the nex binary (default target/release/nex; nex-agent must sit next to it)
#   ECHO             the echo service (default target/x86_64-unknown-linux-musl/release/echoservice)
#   NEX_NATS_SERVER  the nats-server that `nex up` starts (see `nex up --help`)
#   TOUR_TIMEOUT     seconds to wait for any one step (default 30)
#
# Exits non-zero with a message when a step times out or a command's exit status is not the
# expected one; OUTFILE then holds the screens as far as the tour got.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTFILE" >&2
    exit 2
fi
command -v tmux >/dev/null || { echo "tour: tmux is not installed" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "$1")
NEX=$(realpath -m "${NEX:-$ROOT/target/release/nex}")
ECHO=$(cd "$ROOT" && realpath -m "${ECHO:-target/x86_64-unknown-linux-musl/release/echoservice}")
TIMEOUT=${TOUR_TIMEOUT:-30}
cd "$ROOT"

[[ -x $NEX ]] || { echo "tour: $NEX is missing: run \`make build\`" >&2; exit 1; }
[[ -x $(dirname "$NEX")/nex-agent ]] || { echo "tour: nex-agent is missing next to $NEX" >&2; exit 1; }
[[ -f $ECHO ]] || { echo "tour: $ECHO is missing: run \`make build\`" >&2; exit 1; }

# Emoji and box drawing need a UTF-8 locale in tmux (its character widths come from it).
export LC_CTYPE=${LC_CTYPE:-C.UTF-8}

WORK=$(mktemp -d -t nex-tour.XXXXXX)
SOCK=$WORK/tmux.sock
SESSION=tour
T() { tmux -u -S "$SOCK" -f "$WORK/tmux.conf" "$@"; }

cleanup() {
    T kill-server >/dev/null 2>&1 || true
    # The shells may still be exiting; never let the clean-up decide the tour's status.
    rm -rf "$WORK" 2>/dev/null || { sleep 0.5; rm -rf "$WORK" || true; }
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The screens of both windows, trailing blank lines dropped.
write_out() {
    T has-session -t "$SESSION" 2>/dev/null || return 0
    mkdir -p "$(dirname "$OUT")"
    {
        echo "═══ window 0: nex up ═══"
        capture "$SESSION:up" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}'
        echo
        echo "═══ window 1: the tour ═══"
        capture "$SESSION:tour" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}'
    } >"$OUT"
}

die() {
    echo "tour: $*" >&2
    if write_out && [[ -s $OUT ]]; then echo "tour: the screens so far are in $OUT" >&2; fi
    exit 1
}

cat >"$WORK/tmux.conf" <<EOF
set -g default-size 200x50
set -g history-limit 50000
set -g remain-on-exit off
EOF

mkdir -p "$WORK/home"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Each window runs a plain bash whose PROMPT_COMMAND appends the last exit status to a file, so
# the script knows when a typed command has finished (and how) without printing markers.
# `nex` is found on PATH, so the typed commands read like the README's.
shell() { # window-name
    # HISTFILE= : a shell killed with the tmux server must not write a history file into $WORK.
    printf "env -u NATS_URL -u NEX_NAMESPACE HOME=%q PATH=%q HISTFILE= PS1='\$ ' PROMPT_COMMAND=%q bash --noprofile --norc -i" \
        "$WORK/home" "$(dirname "$NEX"):$PATH" "echo \$? >>$WORK/$1.status"
}
status_lines() { # window-name
    if [[ -f $WORK/$1.status ]]; then wc -l <"$WORK/$1.status"; else echo 0; fi
}
wait_prompt() { # window-name count timeout what
    local deadline=$((SECONDS + $3))
    while (($(status_lines "$1") < $2)); do
        ((SECONDS < deadline)) || die "timed out after $3 s waiting for: $4"
        sleep 0.2
    done
}
last_status() { # window-name
    tail -n 1 "$WORK/$1.status"
}
capture() { # target
    T capture-pane -p -J -S - -t "$1"
}

T new-session -d -s "$SESSION" -x 200 -y 50 -n up -c "$ROOT" "$(shell up)"
T new-window -d -t "$SESSION:1" -n tour -c "$ROOT" "$(shell tour)"
wait_prompt up 1 "$TIMEOUT" "a shell in the nex up window"
wait_prompt tour 1 "$TIMEOUT" "a shell in the tour window"

# Window 0: nex up (NATS_URL points at the free port, so `nex up` starts its own NATS there).
T send-keys -t "$SESSION:up" -l "export NATS_URL=nats://127.0.0.1:$PORT"
T send-keys -t "$SESSION:up" Enter
wait_prompt up 2 "$TIMEOUT" "export NATS_URL"
T send-keys -t "$SESSION:up" -l "nex up --port $PORT"
T send-keys -t "$SESSION:up" Enter
deadline=$((SECONDS + TIMEOUT))
until capture "$SESSION:up" | grep -q '^Ctrl-C stops the node and NATS\.'; do
    if (($(status_lines up) >= 3)); then
        capture "$SESSION:up" >&2
        die "nex up exited (status $(last_status up)) before it was ready"
    fi
    ((SECONDS < deadline)) || { capture "$SESSION:up" >&2; die "timed out after $TIMEOUT s waiting for nex up"; }
    sleep 0.2
done
URL=$(capture "$SESSION:up" | sed -n 's/^NATS URL: \(nats:[^ ]*\).*/\1/p' | head -n 1)
[[ -n $URL ]] || die "nex up printed no NATS URL"

# Window 1: the tour. Every command's exit status is checked against the expected one.
n=1
failures=()
tour() { # expected-status timeout command...
    local want=$1 secs=$2
    shift 2
    local cmd="$*"
    T send-keys -t "$SESSION:tour" -l "$cmd"
    T send-keys -t "$SESSION:tour" Enter
    n=$((n + 1))
    wait_prompt tour "$n" "$secs" "$cmd"
    local got
    got=$(last_status tour)
    case $want in
        0) [[ $got == 0 ]] || failures+=("\`$cmd\` exited with $got, expected success") ;;
        fail) [[ $got != 0 ]] || failures+=("\`$cmd\` succeeded, expected an error") ;;
    esac
}
quiet_nex() {
    NATS_URL=$URL HOME=$WORK/home NO_COLOR=1 "$NEX" "$@"
}

ECHO_SHOWN=$(realpath --relative-base="$ROOT" "$ECHO")
tour 0 "$TIMEOUT" "export NATS_URL=$URL"
tour 0 "$TIMEOUT" nex node ls
NODE=$(quiet_nex node ls --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["node_id"])') ||
    die "no node answers at $URL"
tour 0 $((TIMEOUT * 2)) nex devrun "$ECHO_SHOWN" "NATS_URL=$URL"
# A person takes a moment to type the next command; the service needs one to subscribe.
deadline=$((SECONDS + TIMEOUT))
until quiet_nex --timeout 500ms call svc.echo ping >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after $TIMEOUT s waiting for svc.echo to answer"
    sleep 0.2
done
tour 0 "$TIMEOUT" nex call svc.echo hello
tour 0 "$TIMEOUT" nex node probe
tour 0 "$TIMEOUT" nex node info "$NODE"
tour fail "$TIMEOUT" nex stop "$NODE" cq2v3n6d0b3e1ftrs4ng --name echoservice --issuer '~/.nex/issuer.nk'
tour fail "$TIMEOUT" nex node info NOSUCHNODE --timeout 500ms

# Stop `nex up` the way a person does, and wait for it to finish.
T send-keys -t "$SESSION:up" C-c
wait_prompt up 3 "$TIMEOUT" "nex up to stop after Ctrl-C"
up_status=$(last_status up)
[[ $up_status == 0 ]] || failures+=("\`nex up\` exited with $up_status after Ctrl-C, expected 0")

write_out

if ((${#failures[@]})); then
    printf 'tour: %s\n' "${failures[@]}" >&2
    echo "tour: the transcript is in $OUT" >&2
    exit 1
fi
echo "tour: transcript written to $OUT"
