#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests and for CI.
#
#   .ci/slurm_cluster.sh start    install the Debian packages if missing, write the
#                                 configuration into the state folder, start munge,
#                                 MariaDB + slurmdbd (accounting), slurmctld and slurmd as
#                                 root, wait until the node is idle; prints `export ...`
#                                 lines on stdout (use: eval "$(.ci/slurm_cluster.sh start)")
#   .ci/slurm_cluster.sh stop     cancel the cluster's jobs, stop (by PID) what `start` started
#   .ci/slurm_cluster.sh status   exit 0 when the cluster answers and the node is usable
#   .ci/slurm_cluster.sh env      print the `export ...` lines for clients (sinfo, sbatch, tests)
#
# Everything lives in the state folder (default /tmp/finepose-slurm): slurm.conf,
# cgroup.conf, slurmdbd.conf, the munge key and socket, MariaDB's data, spool folders,
# logs (log/*.log) and PID files (pid/*.pid). All daemons listen on 127.0.0.1 only.
# `start` is idempotent: when the cluster is already up it only prints the env lines.
#
# Environment:
#   FINEPOSE_SLURM_STATE          state folder                        [/tmp/finepose-slurm]
#   FINEPOSE_SLURM_ACCOUNTING     1: MariaDB + slurmdbd (sacct works); 0: no accounting  [1]
#   FINEPOSE_SLURM_PORT_BASE      slurmctld port; slurmd, slurmdbd, MariaDB use +1, +2, +3  [16817]
#   FINEPOSE_SLURM_START_TIMEOUT  seconds to wait for each daemon and for the idle node  [60]
set -euo pipefail

STATE=${FINEPOSE_SLURM_STATE:-/tmp/finepose-slurm}
ACCOUNTING=${FINEPOSE_SLURM_ACCOUNTING:-1}
PORT_BASE=${FINEPOSE_SLURM_PORT_BASE:-16817}
TIMEOUT=${FINEPOSE_SLURM_START_TIMEOUT:-60}
CLUSTER=finepose
NODE=localhost
PARTITION=debug

CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))

CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
DB_SOCKET=$STATE/mysql.sock
export SLURM_CONF=$CONF

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --------------------------------------------------------------------------- helpers
pidfile() { echo "$STATE/pid/$1.pid"; }

# alive NAME: the recorded PID runs and is the program we started (guards against PID reuse)
alive() {
    local file pid
    file=$(pidfile "$1")
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

# name -> pattern its command line must contain
declare -A PATTERN=(
    [munged]="munged"
    [mariadbd]="mariadbd"
    [slurmdbd]="slurmdbd"
    [slurmctld]="slurmctld"
    [slurmd]="slurmd"
)

tail_logs() {
    local f
    for f in "$STATE"/log/*.log; do
        [[ -s $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# wait_for DESCRIPTION COMMAND...: poll until COMMAND succeeds, bounded by $TIMEOUT
wait_for() {
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            tail_logs
            die "$what did not come up within ${TIMEOUT}s (logs above, all in $STATE/log/)"
        fi
        sleep 0.5
    done
}

# spawn NAME COMMAND...: run a foreground daemon detached (own session, no tty, no pipes),
# record its PID
spawn() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$(pidfile "$name")"
}

# ----------------------------------------------------------------------- packages
need_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v munged >/dev/null || missing+=(munge)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    if [[ $ACCOUNTING == 1 ]]; then
        command -v slurmdbd >/dev/null || missing+=(slurmdbd)
        command -v mariadbd >/dev/null || missing+=(mariadb-server)
        command -v mariadb >/dev/null || missing+=(mariadb-client)
    fi
    echo "${missing[@]}"
}

install_packages() {
    local missing
    missing=$(need_packages)
    [[ -z $missing ]] && return 0
    [[ $(id -u) == 0 ]] || die "missing Debian packages ($missing); run as root or: sudo apt-get install $missing"
    command -v apt-get >/dev/null || die "missing packages ($missing) and no apt-get to install them"
    log "installing $missing"
    # Keep the packages' maintainer scripts from starting system-wide daemons: we run our own.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $missing
    } >"${TMPDIR:-/tmp}/finepose-slurm-apt.log" 2>&1 || rc=$?
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        tail -n 30 "${TMPDIR:-/tmp}/finepose-slurm-apt.log" >&2
        die "apt-get install $missing failed (exit $rc; full log ${TMPDIR:-/tmp}/finepose-slurm-apt.log)"
    fi
    missing=$(need_packages)
    [[ -z $missing ]] || die "still missing after apt-get install: $missing"
}

# ------------------------------------------------------------------ configuration
write_configs() {
    local cpus mem_mb slurm_user
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd detects, or the node is drained ("Low RealMemory").
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mem_mb=$((mem_mb * 95 / 100))
    slurm_user=$(id -un)

    cat >"$CONF.tmp" <<EOF
# Written by .ci/slurm_cluster.sh: a single-node test cluster on 127.0.0.1.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$slurm_user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
MailProg=/bin/true
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/pid/slurmctld.daemon.pid
SlurmdPidFile=$STATE/pid/slurmd.daemon.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
# Memory is a consumable resource, so --mem is a limit; jobacct_gather/linux samples the
# RSS every second and OverMemoryKill kills a step over its limit (state OUT_OF_MEMORY).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2048
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
# Short timeouts so failures, cancellations and requeues show within seconds.
KillWait=5
MinJobAge=600
MaxJobCount=10000
SlurmdTimeout=60
SlurmctldTimeout=60
MessageTimeout=10
InactiveLimit=0
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
EOF
    if [[ $ACCOUNTING == 1 ]]; then
        cat >>"$CONF.tmp" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# For slurmdbd connections the munge socket is given here, not by AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
EOF
    else
        cat >>"$CONF.tmp" <<EOF
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
EOF
    fi
    cat >>"$CONF.tmp" <<EOF
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"

    cat >"$STATE/cgroup.conf" <<EOF
# Written by .ci/slurm_cluster.sh. The cluster uses proctrack/linuxproc and task/none,
# so no cgroup plugin is loaded; this file only keeps slurmd from looking elsewhere.
CgroupPlugin=autodetect
EOF

    if [[ $ACCOUNTING == 1 ]]; then
        (
            umask 077
            cat >"$STATE/slurmdbd.conf" <<EOF
# Written by .ci/slurm_cluster.sh (mode 600: holds the database password).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=$slurm_user
PidFile=$STATE/pid/slurmdbd.daemon.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(<"$STATE/db.pass")
StorageLoc=slurm_acct_db
EOF
        )
    fi
}

# ----------------------------------------------------------------------- daemons
start_munge() {
    alive munged "${PATTERN[munged]}" && return 0
    if [[ ! -s $STATE/munge/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$STATE/munge/munge.key")
    fi
    chmod 600 "$STATE/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    spawn munged munged --foreground --force --socket="$MUNGE_SOCKET" \
        --key-file="$STATE/munge/munge.key" --pid-file="$STATE/pid/munged.daemon.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_for "munged" bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"
}

db() { mariadb --no-defaults --socket="$DB_SOCKET" -u root "$@"; }

start_database() {
    if [[ ! -s $STATE/db.pass ]]; then
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/db.pass")
    fi
    if ! alive mariadbd "${PATTERN[mariadbd]}"; then
        if [[ ! -d $STATE/mysql/mysql ]]; then
            rm -rf "$STATE/mysql"
            mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user="$(id -un)" \
                --auth-root-authentication-method=socket --skip-test-db \
                >"$STATE/log/mariadb-install.log" 2>&1 ||
                { tail -n 30 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
        fi
        rm -f "$DB_SOCKET"
        spawn mariadbd mariadbd --no-defaults --datadir="$STATE/mysql" --socket="$DB_SOCKET" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --user="$(id -un)" \
            --pid-file="$STATE/pid/mariadbd.daemon.pid" --log-error="$STATE/log/mariadb.log" \
            --skip-name-resolve --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=64M
        wait_for "MariaDB" db -e "SELECT 1"
    fi
    local pass
    pass=$(<"$STATE/db.pass")
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
           ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
           CREATE DATABASE IF NOT EXISTS slurm_acct_db;
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
           FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    alive slurmdbd "${PATTERN[slurmdbd]}" && return 0
    spawn slurmdbd slurmdbd -D
    wait_for "slurmdbd" sacctmgr -n list cluster
    if [[ -z $(sacctmgr -n -P list cluster format=cluster where cluster=$CLUSTER 2>/dev/null) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

node_usable() {
    local state
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null) || return 1
    case $state in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

start_slurm() {
    alive slurmctld "${PATTERN[slurmctld]}" || spawn slurmctld slurmctld -D -f "$CONF"
    wait_for "slurmctld" scontrol ping
    alive slurmd "${PATTERN[slurmd]}" || spawn slurmd slurmd -D -f "$CONF" -N "$NODE"
    local deadline=$((SECONDS + TIMEOUT)) state=""
    until node_usable; do
        state=$(sinfo -h -N -n "$NODE" -o "%T %E" 2>/dev/null || true)
        # a node left down/drained by an earlier, unclean stop: give it back to service
        case $state in
            down* | drain* | fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        if ((SECONDS >= deadline)); then
            tail_logs
            die "node $NODE not idle within ${TIMEOUT}s (sinfo: ${state:-no answer}; logs in $STATE/log/)"
        fi
        sleep 0.5
    done
}

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export FINEPOSE_SLURM_STATE=$STATE"
}

cluster_up() {
    alive munged "${PATTERN[munged]}" && alive slurmctld "${PATTERN[slurmctld]}" &&
        alive slurmd "${PATTERN[slurmd]}" || return 1
    if [[ $(accounting_of_running) == 1 ]]; then
        alive slurmdbd "${PATTERN[slurmdbd]}" && alive mariadbd "${PATTERN[mariadbd]}" || return 1
    fi
    node_usable
}

# accounting mode of the configuration on disk (the running cluster's)
accounting_of_running() {
    if [[ -f $CONF ]] && grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF"; then
        echo 1
    else
        echo 0
    fi
}

# stop_daemon NAME: SIGTERM, then SIGKILL after 15 s, only the PID we recorded
stop_daemon() {
    local name=$1 pid i
    if alive "$name" "${PATTERN[$name]}"; then
        pid=$(<"$(pidfile "$name")")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [[ -d /proc/$pid ]] || break
            # a zombie (no longer running) is gone as far as we are concerned
            [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]] && alive "$name" "${PATTERN[$name]}"; then
            log "$name (PID $pid) ignored SIGTERM for 15 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (PID $pid)"
    fi
    rm -f "$(pidfile "$name")"
}

cmd_start() {
    mkdir -p "$STATE"
    STATE=$(cd "$STATE" && pwd -P)
    CONF=$STATE/slurm.conf MUNGE_SOCKET=$STATE/munge/munge.socket DB_SOCKET=$STATE/mysql.sock
    export SLURM_CONF=$CONF
    if [[ -f $CONF ]] && cluster_up; then
        if [[ $(accounting_of_running) == "$ACCOUNTING" ]]; then
            log "already running (state $STATE)"
            print_env
            return 0
        fi
        log "running with FINEPOSE_SLURM_ACCOUNTING=$(accounting_of_running); restarting with $ACCOUNTING"
    fi
    # A partly running cluster (crash, half-finished start): stop our leftovers first.
    cmd_stop_quiet
    install_packages
    [[ $(id -u) == 0 ]] || die "start the test cluster as root (slurmd must run as root)"
    mkdir -p "$STATE"/{munge,log,pid,spool/ctld,spool/d}
    chmod 755 "$STATE" "$STATE/munge"
    local t0=$SECONDS
    start_munge
    [[ $ACCOUNTING == 1 ]] && start_database
    write_configs
    [[ $ACCOUNTING == 1 ]] && start_slurmdbd
    start_slurm
    log "cluster up in $((SECONDS - t0)) s: partition $PARTITION, node $NODE ($(nproc) CPUs)," \
        "accounting $([[ $ACCOUNTING == 1 ]] && echo slurmdbd || echo none), state $STATE"
    print_env
}

cmd_stop_quiet() {
    local name
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        stop_daemon "$name"
    done
}

cmd_stop() {
    [[ -d $STATE ]] || { log "nothing to stop ($STATE does not exist)"; return 0; }
    if alive slurmctld "${PATTERN[slurmctld]}" && [[ -f $CONF ]]; then
        # Cancel this cluster's jobs so that no job step outlives the daemons.
        local jobs i
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                [[ -z $(squeue -h -o %A 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    cmd_stop_quiet
}

cmd_status() {
    if [[ -f $CONF ]] && cluster_up; then
        log "up: $(sinfo -h -N -n "$NODE" -o '%N %T %c CPUs %m MB') (state $STATE)"
        return 0
    fi
    local name
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        alive "$name" "${PATTERN[$name]}" && log "$name running (PID $(<"$(pidfile "$name")"))"
    done
    log "not up (state $STATE)"
    return 1
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) print_env ;;
    *)
        echo "usage: $0 start|stop|status|env   (state folder: \$FINEPOSE_SLURM_STATE, default /tmp/finepose-slurm)" >&2
        exit 2
        ;;
esac
