# Sourced by the launch scripts: run_torchrun CMD... runs a torchrun command so that a SIGTERM,
# SIGUSR1 or SIGINT (Ctrl-C) to the launcher reaches the training processes, not the agent.
#
# Forwarded to the workers (SIGINT as SIGTERM), every rank finishes its step, saves a
# checkpoint, writes status.json ("preempted") and exits 0, and the agent then exits 0 too.
# The agent runs under pretrain.launch, so a signal sent to the agent itself also reaches the
# workers (they save the same way); the agent then exits 128 + the signal, without a traceback. A signal that comes before the workers exist is delivered once they do. A SIGKILL
# cannot be passed on: to kill a run outright, kill the agent's session (its pid is the
# session id) rather than only this script. Workers that torchrun restarted (--max-restarts) are
# the agent's children too, so a signal after a restart reaches them the same way.

run_torchrun() {
  # Its own session, so that Ctrl-C at a terminal reaches this script only (torchrun would
  # turn a SIGINT into a traceback too); the script passes it on as a SIGTERM.
  if command -v setsid >/dev/null; then setsid "$@" & else "$@" & fi
  _agent=$!
  _pending=""
  trap '_pending=TERM; _deliver' TERM INT
  trap '_pending=USR1; _deliver' USR1
  local rc
  while :; do
    wait "$_agent" && rc=0 || rc=$?  # a trapped signal interrupts wait; the agent runs on
    kill -0 "$_agent" 2>/dev/null || break
    if [ -n "$_pending" ]; then sleep 1; _deliver; fi
  done
  trap - TERM INT USR1
  return "$rc"
}

_deliver() {
  # torchrun starts each rank as a child process of the agent
  if [ -n "$_pending" ] && pkill "-$_pending" -P "$_agent"; then
    _pending=""
  fi
}
