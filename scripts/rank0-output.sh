#!/usr/bin/env bash
# Run a command on every MPI rank, showing only rank 0's output: with every rank
# printing, pytest's summary lines interleave. Another rank's output is shown
# only when it fails.
rank=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}}
if [ "$rank" = 0 ]; then
    exec "$@"
fi
log=$(mktemp)
"$@" > "$log" 2>&1
status=$?
if [ "$status" != 0 ]; then
    echo "rank $rank failed with exit status $status; its output follows" >&2
    cat "$log" >&2
fi
rm -f "$log"
exit "$status"
