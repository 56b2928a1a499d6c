#!/usr/bin/env bash
# Start a throw-away one-node SLURM cluster on loopback (munged + slurmctld + slurmd),
# for the submitit pre-emption/requeue tests. Idempotent. Must run as root.
#
#   eval "$(bash tests/slurm/start_cluster.sh)"   # exports SLURM_CONF and PATH (sacct stand-in)
#
# stdout: only `export ...` lines (safe to eval; also written to $DIR/env.sh);
# progress and errors go to stderr.
# On failure: one line "start_cluster.sh: ERROR: <why> (see <log>)" and a non-zero exit.
#
# Environment knobs (all optional):
#   SSL_XCIT_SLURM_DIR      state/log/spool/config folder   [/tmp/ssl-xcit-slurm]
#   SSL_XCIT_SLURM_TIMEOUT  seconds to wait for the node     [60]
#   SSL_XCIT_SLURM_PORT     slurmctld port (slurmd uses +1)  [6817]
#   SSL_XCIT_SLURM_CRED_EXPIRE  AuthInfo cred_expire = hold of a requeued job, s (min 5) [10]
#   SSL_XCIT_SLURM_NO_INSTALL=1  never call apt-get
#   SSL_XCIT_SLURM_SHOW_LOG=1    on failure, also print the last 20 lines of the log
set -uo pipefail

DIR="${SSL_XCIT_SLURM_DIR:-/tmp/ssl-xcit-slurm}"
TIMEOUT="${SSL_XCIT_SLURM_TIMEOUT:-60}"
CTLD_PORT="${SSL_XCIT_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
CRED_EXPIRE="${SSL_XCIT_SLURM_CRED_EXPIRE:-10}"
PARTITION=debug
CONF="$DIR/slurm.conf"
LOG="$DIR/log"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
PKGS=(slurmd slurmctld slurm-client munge)

log() { echo "start_cluster.sh: $*" >&2; }
STARTED=0
die() { # die <why> [log file]
    # Do not leave half a cluster behind: stop the daemons this run started (logs are kept).
    if [ "$STARTED" = 1 ]; then
        for pf in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$MUNGE_DIR/munged.pid"; do
            [ -s "$pf" ] && [ "$(cat "/proc/$(cat "$pf")/comm" 2>/dev/null)" = "$(basename "$pf" .pid)" ] \
                && kill "$(cat "$pf")" 2>/dev/null
        done
    fi
    if [ -n "${2:-}" ]; then
        echo "start_cluster.sh: ERROR: $1 (see $2)" >&2
        if [ "${SSL_XCIT_SLURM_SHOW_LOG:-0}" = 1 ] && [ -f "$2" ]; then tail -n 20 "$2" | sed 's/^/    | /' >&2; fi
    else
        echo "start_cluster.sh: ERROR: $1" >&2
    fi
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (SlurmUser=root, daemons and apt-get need it)"

# Our folder: created here, marked so stop_cluster.sh only ever deletes a folder we made.
if [ -d "$DIR" ] && [ ! -f "$DIR/.ssl-xcit-slurm" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    die "$DIR exists, is not empty and was not made by this script (set SSL_XCIT_SLURM_DIR)"
fi
{ mkdir -p "$DIR" "$LOG" && touch "$DIR/.ssl-xcit-slurm"; } || die "cannot create $DIR"

# ---------------------------------------------------------------- 1. packages
export PATH="$PATH:/usr/sbin:/sbin"
missing=0
for b in munged munge slurmctld slurmd sbatch sinfo squeue scontrol scancel; do
    command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    [ "${SSL_XCIT_SLURM_NO_INSTALL:-0}" = 1 ] && die "slurm/munge not installed and SSL_XCIT_SLURM_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 || die "slurm/munge not installed and no apt-get to install them"
    log "installing ${PKGS[*]} with apt-get (log: $LOG/apt.log)"
    # policy-rc.d / no systemd: postinst cannot start the services, which is what we want.
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends "${PKGS[@]}"; } >"$LOG/apt.log" 2>&1; then
        die "apt-get install ${PKGS[*]} failed" "$LOG/apt.log"
    fi
fi

# ---------------------------------------------------------------- helpers
pid_alive() { # pid_alive <pidfile>: the pid in it is alive AND is the daemon named like the file
    local pid name
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)"; name="$(basename "$1" .pid)"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}
node_state() { # prints the node state (idle, mix, alloc, down*, ...) or nothing
    SLURM_CONF="$CONF" timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1
}
wait_node_up() { # wait_node_up <seconds>
    local start=$SECONDS st="" resumed=0
    while [ $((SECONDS - start)) -lt "$1" ]; do
        st="$(node_state)"
        case "$st" in
            idle|mixed|allocated|completing) return 0 ;;
            down*|drain*|fail*|inval*)
                # ReturnToService=2 should bring it back by itself; nudge once if not.
                if [ "$resumed" = 0 ] && [ $((SECONDS - start)) -ge 3 ]; then
                    SLURM_CONF="$CONF" scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1
                    resumed=1
                fi ;;
        esac
        if [ $((SECONDS - start)) -ge 2 ]; then   # give the daemons time to write their pid files
            pid_alive "$DIR/slurmctld.pid" || die "slurmctld died during start-up" "$LOG/slurmctld.log"
            pid_alive "$DIR/slurmd.pid" || die "slurmd died during start-up" "$LOG/slurmd.log"
        fi
        sleep 0.5
    done
    st="$(SLURM_CONF="$CONF" timeout 10 sinfo -h -N -n "$NODE" -o '%T, reason: %E' 2>/dev/null | head -n 1)"
    die "node $NODE not idle after ${1}s (state: ${st:-no answer from slurmctld})" "$LOG/slurmd.log"
}
print_env() {
    # PATH: $DIR/bin holds the sacct stand-in (no slurmdbd here; submitit polls sacct).
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$DIR/bin:\$PATH"
}

# ---------------------------------------------------------------- 2. node facts
NODE="$(hostname -s 2>/dev/null || true)"
case "$NODE" in ''|*[!A-Za-z0-9_-]*) NODE=localhost ;; esac

# Already running (our three daemons alive, node answering)? Nothing to do.
if [ -f "$CONF" ] && grep -q "^NodeName=$NODE " "$CONF" &&
   pid_alive "$MUNGE_DIR/munged.pid" && pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
    log "cluster already running (SLURM_CONF=$CONF)"
    wait_node_up "$TIMEOUT"
    print_env
    exit 0
fi

# Half-started or stale cluster: stop what is left of ours, then start clean.
for pf in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$MUNGE_DIR/munged.pid"; do
    if pid_alive "$pf"; then
        pid="$(cat "$pf")"
        log "stopping stale daemon pid $pid ($pf)"
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
done

for p in "$CTLD_PORT" "$SLURMD_PORT"; do
    if command -v ss >/dev/null 2>&1 && ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
        die "TCP port $p is already in use (another slurm? set SSL_XCIT_SLURM_PORT)"
    fi
done

# What slurmd itself detects; the config must not claim more or the node is drained.
HW="$(slurmd -C 2>/dev/null | head -n 1)"
get() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$HW"; }
CPUS="$(get CPUs)"; SOCKETS="$(get SocketsPerBoard)"; CORES="$(get CoresPerSocket)"; THREADS="$(get ThreadsPerCore)"
MEM_TOTAL="$(get RealMemory)"
[ -n "$CPUS" ] || CPUS="$(nproc)"
if [ -z "$SOCKETS" ] || [ -z "$CORES" ] || [ -z "$THREADS" ] || [ $((SOCKETS * CORES * THREADS)) != "$CPUS" ]; then
    SOCKETS=1; CORES="$CPUS"; THREADS=1
fi
MEM_AVAIL=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) / 1024 ))
[ -n "$MEM_TOTAL" ] || MEM_TOTAL="$MEM_AVAIL"
REALMEM=$(( MEM_AVAIL * 9 / 10 ))
[ "$REALMEM" -le "$MEM_TOTAL" ] || REALMEM="$MEM_TOTAL"
[ "$REALMEM" -ge 1 ] || REALMEM=1

# ---------------------------------------------------------------- 3. files
rm -rf "$DIR/ctld" "$DIR/slurmd"   # job/node state of a previous run is garbage
mkdir -p "$DIR/ctld" "$DIR/slurmd" "$MUNGE_DIR" || die "cannot create folders in $DIR"
chmod 755 "$DIR" "$MUNGE_DIR"       # munged wants its socket folder searchable by all
rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"

if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_DIR/munge.key" >/dev/null 2>&1
    fi
    [ -s "$MUNGE_DIR/munge.key" ] || head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key"
fi
chown root:root "$MUNGE_DIR/munge.key"; chmod 400 "$MUNGE_DIR/munge.key"

cat >"$CONF" <<EOF
# Generated by tests/slurm/start_cluster.sh -- one node on loopback, everything as root.
ClusterName=sslxcit
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# Private munged socket; cred_expire is also how long a requeued job is held
# (Reason=BeginTime) before it may start again (Slurm default: 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Re-test pending jobs every second (default 60 s / 30 s), so a requeued job restarts quickly.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$REALMEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# sacct stand-in, see print_env.
mkdir -p "$DIR/bin"
cat >"$DIR/bin/sacct" <<'SACCT_EOF'
#!/usr/bin/env bash
# sacct stand-in for the ssl_xcit test cluster (no slurmdbd, so the real sacct only says
# "Slurm accounting storage is disabled"). Answers from slurmctld's memory via
# `scontrol -o show job` (jobs stay there MinJobAge seconds after they end).
# Supports what submitit uses: -o/--format, -j/--jobs, -P/--parsable2, -p/--parsable,
# -n/--noheader; other options are ignored. Output is always '|'-separated.
fields="JobID,JobName,Partition,State,ExitCode,NodeList"; jobs=(); header=1; trail=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o|--format) fields="$2"; shift ;;
        --format=*) fields="${1#*=}" ;;
        -o*) fields="${1#-o}" ;;
        -j|--jobs) IFS=, read -ra v <<<"$2"; jobs+=("${v[@]}"); shift ;;
        --jobs=*) IFS=, read -ra v <<<"${1#*=}"; jobs+=("${v[@]}") ;;
        -j*) IFS=, read -ra v <<<"${1#-j}"; jobs+=("${v[@]}") ;;
        -n|--noheader) header=0 ;;
        -p|--parsable) trail="|" ;;
        -S|-E|-u|-A|-s|-r|-M|--starttime|--endtime|--user|--accounts|--state|--partition|--clusters) shift ;;
    esac
    shift
done
if [ ${#jobs[@]} -eq 0 ]; then
    out="$(scontrol -o show job 2>/dev/null)"
else
    out="$(for j in "${jobs[@]}"; do scontrol -o show job "${j%%.*}" 2>/dev/null; done)"
fi
printf '%s\n' "$out" | awk -v fields="$fields" -v header="$header" -v trail="$trail" '
BEGIN { n = split(fields, f, ","); for (i = 1; i <= n; i++) sub(/%.*/, "", f[i]) }
NR == 1 && header { line = ""; for (i = 1; i <= n; i++) line = line (i > 1 ? "|" : "") f[i]; print line trail }
/JobId=/ {
    delete kv
    for (i = 1; i <= NF; i++) { p = index($i, "="); if (p) kv[substr($i, 1, p - 1)] = substr($i, p + 1) }
    id = kv["JobId"]
    if (("ArrayJobId" in kv) && ("ArrayTaskId" in kv)) {
        t = kv["ArrayTaskId"]; sub(/%.*/, "", t)
        id = kv["ArrayJobId"] "_" (t ~ /[-,]/ ? "[" t "]" : t)
    }
    line = ""
    for (i = 1; i <= n; i++) {
        k = tolower(f[i]); v = ""
        if (k == "jobid" || k == "jobidraw") v = id
        else if (k == "state") v = kv["JobState"]
        else if (k == "nodelist") v = (kv["NodeList"] == "(null)" || kv["NodeList"] == "") ? "None assigned" : kv["NodeList"]
        else if (k == "jobname") v = kv["JobName"]
        else if (k == "partition") v = kv["Partition"]
        else if (k == "exitcode") v = kv["ExitCode"]
        else if (k == "restarts") v = kv["Restarts"]
        else if (k == "reason") v = kv["Reason"]
        else if (k == "start") v = kv["StartTime"]
        else if (k == "end") v = kv["EndTime"]
        else if (k == "elapsed") v = kv["RunTime"]
        else if (k == "timelimit") v = kv["TimeLimit"]
        else if (k == "ncpus" || k == "alloccpus") v = kv["NumCPUs"]
        else if (k == "nnodes") v = kv["NumNodes"]
        line = line (i > 1 ? "|" : "") v
    }
    print line trail
}'
SACCT_EOF
chmod 755 "$DIR/bin/sacct"
{ echo "# source me: environment for the ssl_xcit test SLURM cluster"; print_env; } >"$DIR/env.sh"

# ---------------------------------------------------------------- 4. daemons
export SLURM_CONF="$CONF"
STARTED=1
: >"$LOG/munged.log"
munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
    --log-file="$LOG/munged.log" >>"$LOG/munged.log" 2>&1 || die "munged failed to start" "$LOG/munged.log"
for _ in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && break; sleep 0.1; done
munge -n -S "$MUNGE_SOCKET" </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 \
    || die "munge credential round-trip failed" "$LOG/munged.log"

: >"$LOG/slurmctld.log"
# -c: clean start, no jobs from an earlier run; -i: ignore missing state files.
slurmctld -c -i >>"$LOG/slurmctld.log" 2>&1 || die "slurmctld failed to start" "$LOG/slurmctld.log"
for _ in $(seq 100); do
    SLURM_CONF="$CONF" timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
    pid_alive "$DIR/slurmctld.pid" || { sleep 0.2; pid_alive "$DIR/slurmctld.pid"; } \
        || die "slurmctld exited during start-up" "$LOG/slurmctld.log"
    sleep 0.2
done
SLURM_CONF="$CONF" timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' \
    || die "slurmctld does not answer 'scontrol ping'" "$LOG/slurmctld.log"

: >"$LOG/slurmd.log"
slurmd -N "$NODE" >>"$LOG/slurmd.log" 2>&1 || die "slurmd failed to start" "$LOG/slurmd.log"

wait_node_up "$TIMEOUT"
log "cluster up: node $NODE ($CPUS CPUs, RealMemory=$REALMEM MB), partition $PARTITION, logs in $LOG"
print_env
