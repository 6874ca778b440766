# shellcheck shell=bash
# Shared helpers for scripts/run, scripts/test, scripts/services and .ci/run.
# Source it; it defines functions only (plus a few defaults) and runs nothing.
#
# entrip_ensure_services makes sure that, on a Debian machine, PostgreSQL and
# RabbitMQ are installed, running, reachable the way the fleet's defaults
# expect (postgres over TCP at 127.0.0.1:5432 without a password, guest/guest
# at 127.0.0.1:5672) and that the database `entrip` exists. It is idempotent
# and takes about a second when everything is already up.

# Daemon tools (rabbitmq-server, rabbitmqctl) live in sbin.
case ":$PATH:" in
*:/usr/sbin:*) ;;
*) PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;;
esac
export PATH

ENTRIP_PG_HOST=${ENTRIP_PG_HOST:-127.0.0.1}
ENTRIP_PG_PORT=${ENTRIP_PG_PORT:-5432}
ENTRIP_PG_CLUSTER=${ENTRIP_PG_CLUSTER:-main}
ENTRIP_PG_DB=${ENTRIP_PG_DB:-entrip}
ENTRIP_PG_MIN_CONNECTIONS=${ENTRIP_PG_MIN_CONNECTIONS:-300}
ENTRIP_AMQP_HOST=${ENTRIP_AMQP_HOST:-127.0.0.1}
ENTRIP_AMQP_PORT=${ENTRIP_AMQP_PORT:-5672}
# Seconds to wait for a service to come up before giving up.
ENTRIP_WAIT_SECONDS=${ENTRIP_WAIT_SECONDS:-60}

entrip_log() {
	printf '[entrip] %s\n' "$*" >&2
}

entrip_die() {
	printf '[entrip] error: %s\n' "$*" >&2
	exit 1
}

# The repository root (the parent of the scripts/ directory).
entrip_repo_root() {
	(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# Runs a command as root: directly when we are root, else through sudo.
entrip_as_root() {
	if [[ $(id -u) -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo "$@"
	else
		entrip_die "need root (or sudo) to run: $*"
	fi
}

_entrip_apt_updated=0
entrip_apt_install() {
	if [[ $_entrip_apt_updated -eq 0 ]]; then
		entrip_log "apt-get update"
		entrip_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
			entrip_die "apt-get update failed"
		_entrip_apt_updated=1
	fi
	entrip_log "apt-get install $*"
	entrip_as_root env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
		entrip_die "apt-get install $* failed"
}

# psql as the postgres superuser over TCP, never prompting for a password.
entrip_psql() {
	PGCONNECT_TIMEOUT=5 psql -X -w -q -v ON_ERROR_STOP=1 \
		-h "$ENTRIP_PG_HOST" -p "$ENTRIP_PG_PORT" -U postgres "$@"
}

# ---------------------------------------------------------------- PostgreSQL

# The newest installed major version (a directory under /etc/postgresql).
_entrip_pg_version() {
	local v
	v=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
	[[ -n $v ]] || return 1
	printf '%s\n' "$v"
}

_entrip_pg_ready() {
	pg_isready -q -h "$ENTRIP_PG_HOST" -p "$ENTRIP_PG_PORT" -t 3 >/dev/null 2>&1
}

_entrip_pg_wait() {
	local deadline=$((SECONDS + ENTRIP_WAIT_SECONDS))
	until _entrip_pg_ready; do
		if ((SECONDS >= deadline)); then
			entrip_die "PostgreSQL is not accepting connections at $ENTRIP_PG_HOST:$ENTRIP_PG_PORT after ${ENTRIP_WAIT_SECONDS}s (see /var/log/postgresql/)"
		fi
		sleep 1
	done
}

_entrip_pg_ctl() {
	# $1: start|restart|reload
	local ver
	ver=$(_entrip_pg_version) || entrip_die "no PostgreSQL cluster under /etc/postgresql"
	entrip_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$ENTRIP_PG_CLUSTER" "$1" ||
		entrip_die "pg_ctlcluster $ver $ENTRIP_PG_CLUSTER $1 failed (see /var/log/postgresql/postgresql-$ver-$ENTRIP_PG_CLUSTER.log)"
}

entrip_ensure_postgres() {
	if ! command -v psql >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null 2>&1; then
		entrip_log "installing PostgreSQL"
		entrip_apt_install postgresql postgresql-contrib
	fi

	local ver
	if ! ver=$(_entrip_pg_version); then
		entrip_die "PostgreSQL is installed but /etc/postgresql has no cluster"
	fi
	if [[ ! -d /etc/postgresql/$ver/$ENTRIP_PG_CLUSTER ]]; then
		entrip_log "creating PostgreSQL $ver cluster $ENTRIP_PG_CLUSTER on port $ENTRIP_PG_PORT"
		entrip_as_root pg_createcluster -p "$ENTRIP_PG_PORT" "$ver" "$ENTRIP_PG_CLUSTER" >/dev/null ||
			entrip_die "pg_createcluster $ver $ENTRIP_PG_CLUSTER failed"
	fi

	if ! _entrip_pg_ready; then
		local status
		status=$(pg_lsclusters --no-header 2>/dev/null | awk -v v="$ver" -v c="$ENTRIP_PG_CLUSTER" '$1 == v && $2 == c { print $4 }') || true
		if [[ $status == online* ]]; then
			entrip_log "PostgreSQL $ver is online but not yet accepting connections; waiting"
		else
			entrip_log "starting PostgreSQL $ver"
			_entrip_pg_ctl start
		fi
		_entrip_pg_wait
	fi

	# postgres over TCP without a password.
	if ! entrip_psql -tAc 'select 1' >/dev/null 2>&1; then
		local hba=/etc/postgresql/$ver/$ENTRIP_PG_CLUSTER/pg_hba.conf
		[[ -f $hba ]] || entrip_die "cannot find $hba"
		entrip_log "allowing trust auth from 127.0.0.1 and ::1 in $hba"
		entrip_as_root sed -i \
			-e '1i host all all 127.0.0.1/32 trust' \
			-e '1i host all all ::1/128 trust' "$hba" ||
			entrip_die "could not edit $hba"
		_entrip_pg_ctl reload
		sleep 1
		entrip_psql -tAc 'select 1' >/dev/null ||
			entrip_die "psql -h $ENTRIP_PG_HOST -U postgres still fails after editing $hba"
	fi

	# Parallel tests each open pools: make room for them.
	local maxconn
	maxconn=$(entrip_psql -tAc 'show max_connections') || entrip_die "cannot read max_connections"
	if ((maxconn < ENTRIP_PG_MIN_CONNECTIONS)); then
		entrip_log "raising PostgreSQL max_connections from $maxconn to $ENTRIP_PG_MIN_CONNECTIONS (restart)"
		entrip_psql -c "alter system set max_connections = $ENTRIP_PG_MIN_CONNECTIONS" >/dev/null ||
			entrip_die "alter system set max_connections failed"
		_entrip_pg_ctl restart
		_entrip_pg_wait
	fi
	entrip_log "PostgreSQL ready at $ENTRIP_PG_HOST:$ENTRIP_PG_PORT"
}

entrip_ensure_database() {
	local db=${1:-$ENTRIP_PG_DB}
	local exists
	exists=$(entrip_psql -d postgres -tAc "select 1 from pg_database where datname = '$db'") ||
		entrip_die "cannot list databases"
	if [[ $exists != 1 ]]; then
		entrip_log "creating database $db"
		# Another process may create it at the same moment: check again on failure.
		if ! createdb -w -h "$ENTRIP_PG_HOST" -p "$ENTRIP_PG_PORT" -U postgres "$db" 2>/dev/null; then
			exists=$(entrip_psql -d postgres -tAc "select 1 from pg_database where datname = '$db'") || true
			[[ $exists == 1 ]] || entrip_die "createdb $db failed"
		fi
	fi
}

# ------------------------------------------------------------------ RabbitMQ

_entrip_tcp_open() {
	# $1 host, $2 port
	# shellcheck disable=SC2016 # expanded by the inner bash
	timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

entrip_ensure_rabbitmq() {
	if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
		entrip_log "installing RabbitMQ"
		entrip_apt_install rabbitmq-server
	fi

	if ! _entrip_tcp_open "$ENTRIP_AMQP_HOST" "$ENTRIP_AMQP_PORT"; then
		if entrip_as_root timeout 15 rabbitmqctl -q ping >/dev/null 2>&1; then
			entrip_log "RabbitMQ node is up but not listening yet; waiting"
		else
			entrip_log "starting RabbitMQ"
			entrip_as_root rabbitmq-server -detached >/dev/null 2>&1 ||
				entrip_die "rabbitmq-server -detached failed (see /var/log/rabbitmq/)"
		fi
		local deadline=$((SECONDS + ENTRIP_WAIT_SECONDS))
		# await_startup fails at once while the Erlang node is not up yet: retry.
		until entrip_as_root timeout 20 rabbitmqctl -q await_startup --timeout 15 >/dev/null 2>&1; do
			if ((SECONDS >= deadline)); then
				entrip_die "RabbitMQ did not start within ${ENTRIP_WAIT_SECONDS}s (see /var/log/rabbitmq/)"
			fi
			sleep 2
		done
		until _entrip_tcp_open "$ENTRIP_AMQP_HOST" "$ENTRIP_AMQP_PORT"; do
			if ((SECONDS >= deadline)); then
				entrip_die "RabbitMQ is running but nothing listens at $ENTRIP_AMQP_HOST:$ENTRIP_AMQP_PORT"
			fi
			sleep 1
		done
	fi

	# guest/guest is allowed from loopback by default; make sure it exists.
	if ! entrip_as_root timeout 30 rabbitmqctl -q authenticate_user guest guest >/dev/null 2>&1; then
		entrip_log "creating RabbitMQ user guest"
		entrip_as_root rabbitmqctl -q add_user guest guest >/dev/null 2>&1 ||
			entrip_as_root rabbitmqctl -q change_password guest guest >/dev/null ||
			entrip_die "could not create RabbitMQ user guest"
		entrip_as_root rabbitmqctl -q set_user_tags guest administrator >/dev/null
		entrip_as_root rabbitmqctl -q set_permissions -p / guest '.*' '.*' '.*' >/dev/null ||
			entrip_die "could not grant guest permissions on vhost /"
	fi
	entrip_log "RabbitMQ ready at $ENTRIP_AMQP_HOST:$ENTRIP_AMQP_PORT"
}

# ------------------------------------------------------------------ promtool

# promtool checks /metrics output and the alert rules; Debian's prometheus
# package ships it as /usr/bin/promtool.
entrip_ensure_promtool() {
	if ! command -v promtool >/dev/null 2>&1; then
		entrip_log "installing promtool (Debian package prometheus)"
		entrip_apt_install prometheus
		command -v promtool >/dev/null 2>&1 || entrip_die "promtool still missing after installing prometheus"
	fi
}

# ----------------------------------------------------------------------- all

entrip_ensure_services() {
	entrip_ensure_postgres
	entrip_ensure_database "$ENTRIP_PG_DB"
	entrip_ensure_rabbitmq
}

# Benchmarks: records one figure for scripts/bench's report (a no-op when the
# part runs alone) and prints nothing.
entrip_metric() { # <name> <value>
	if [[ -n ${ENTRIP_BENCH_METRICS:-} ]]; then
		printf '%s %s\n' "$1" "$2" >>"$ENTRIP_BENCH_METRICS"
	fi
}

# Benchmarks: peak resident memory (VmHWM, kB) of a running process.
entrip_peak_rss_kb() { # <pid>
	awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

# Waits until a command succeeds, polling every 0.2 s; dies after <seconds>.
entrip_wait_until() { # <seconds> <what> <command...>
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@"; do
		((SECONDS < deadline)) || entrip_die "timed out waiting for $what"
		sleep 0.2
	done
}
