# Sourced by the interop scripts (tests/gpu/megatron_lm_interop.sh,
# tests/interop/megatron_lm_save_cpu.sh); needs WORK and FAILS set.
# step LOG_NAME DESCRIPTION COMMAND...: run it, say PASS or FAIL, show the log's end on FAIL.
step() {
    local log="$WORK/$1.log" what="$2"
    shift 2
    if "$@" >"$log" 2>&1; then
        echo "PASS $what"
    else
        echo "FAIL $what (exit $?; end of $log:)"
        tail -n 25 "$log" | sed 's/^/    /'
        FAILS=$((FAILS + 1))
        return 1
    fi
}
