# shellcheck shell=bash
# Shared helpers for scripts/run, scripts/test, scripts/services, the
# benchmarks, scripts/chaos and .ci/run. Source it; it defines functions only
# (plus a few defaults) and runs nothing.
#
# entrip_ensure_services makes sure that, on a Debian machine, PostgreSQL and
# RabbitMQ are installed and running, and that PostgreSQL has
#   - the role entrip (LOGIN, no superuser, no CREATEDB, no CREATEROLE) that
#     the services connect as, owning the database entrip and its schema
#     public (with every object in it, also those an older script created
#     as postgres);
#   - the role entrip_test (LOGIN SUPERUSER: #[sqlx::test] creates a database
#     per test) owning the database entrip_test, the tests' DATABASE_URL;
#   - max_connections of at least ENTRIP_PG_MIN_CONNECTIONS.
# Each role's password is generated (256 bits, hex) into
# ${XDG_CONFIG_HOME:-$HOME/.config}/entrip/postgres-<role>.password (mode
# 0600, directory 0700) and set on the role; an existing file is kept and
# the role's password made to match it. The set-up runs as the OS user
# postgres over the Unix socket (peer authentication, Debian's default; as
# root through runuser, else through sudo); the services and tests then log
# in over TCP with the passwords (scram-sha-256 by Debian's default). No
# script edits pg_hba.conf or otherwise loosens the host's authentication.
# RabbitMQ: guest/guest at 127.0.0.1:5672. It is idempotent and takes about
# a second when everything is already up.

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
# Roles and the tests' master database (see the header).
ENTRIP_PG_ROLE=entrip
ENTRIP_PG_TEST_ROLE=entrip_test
ENTRIP_PG_TEST_DB=entrip_test
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

	_entrip_pg_warn_old_trust "$ver"

	# Parallel tests each open pools: make room for them.
	local maxconn
	maxconn=$(entrip_pg_admin -d postgres -tAc 'show max_connections') || entrip_die "cannot read max_connections"
	if ((maxconn < ENTRIP_PG_MIN_CONNECTIONS)); then
		entrip_log "raising PostgreSQL max_connections from $maxconn to $ENTRIP_PG_MIN_CONNECTIONS (restart)"
		entrip_pg_admin -d postgres -c "alter system set max_connections = $ENTRIP_PG_MIN_CONNECTIONS" >/dev/null ||
			entrip_die "alter system set max_connections failed"
		_entrip_pg_ctl restart
		_entrip_pg_wait
	fi
	entrip_log "PostgreSQL ready at $ENTRIP_PG_HOST:$ENTRIP_PG_PORT"
}

# Versions of these scripts before the roles inserted these two lines at the
# top of pg_hba.conf; they are no longer needed. Only says how to remove
# them: the host's authentication is its owner's to change.
_entrip_pg_warn_old_trust() { # <version>
	local hba=/etc/postgresql/$1/$ENTRIP_PG_CLUSTER/pg_hba.conf head
	head=$(entrip_as_root head -n 2 "$hba" 2>/dev/null) || return 0
	if [[ $head == $'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' ]]; then
		entrip_log "warning: $hba starts with the two trust lines an earlier entrip version added; the services no longer need them. Remove them: sudo sed -i 1,2d $hba && sudo pg_ctlcluster $1 $ENTRIP_PG_CLUSTER reload"
	fi
}

# psql as the PostgreSQL superuser postgres over the local Unix socket (peer
# authentication): as root through runuser, else through sudo. For set-up
# only; the fleet and the tests log in as their own roles.
entrip_pg_admin() {
	# The caller's libpq variables must not send this psql over TCP or as
	# another user; / because postgres may not read the working directory.
	local psql_cmd=(env -u PGHOST -u PGHOSTADDR -u PGUSER -u PGPASSWORD -u PGPASSFILE -u PGSERVICE -u PGDATABASE
		psql -X -q -v ON_ERROR_STOP=1 -p "$ENTRIP_PG_PORT")
	if [[ -n ${ENTRIP_PG_SOCKET_DIR:-} ]]; then
		psql_cmd+=(-h "$ENTRIP_PG_SOCKET_DIR")
	fi
	if [[ $(id -u) -eq 0 ]]; then
		(cd / && runuser -u postgres -- "${psql_cmd[@]}" "$@")
	elif [[ $(id -un) == postgres ]]; then
		(cd / && "${psql_cmd[@]}" "$@")
	elif command -v sudo >/dev/null 2>&1; then
		(cd / && sudo -u postgres -- "${psql_cmd[@]}" "$@")
	else
		entrip_die "need root or sudo to run psql as the PostgreSQL user postgres"
	fi
}

# The file that keeps a role's generated password.
entrip_pg_password_file() { # <role>
	printf '%s/entrip/postgres-%s.password\n' "${XDG_CONFIG_HOME:-$HOME/.config}" "$1"
}

# Prints a role's password from its file (trimmed); dies when there is none
# or it holds characters a URL would need escaped.
entrip_pg_password() { # <role>
	local file pw
	file=$(entrip_pg_password_file "$1")
	[[ -f $file ]] || entrip_die "no password file $file for PostgreSQL role $1 (scripts/services writes it)"
	pw=$(<"$file") || entrip_die "cannot read $file"
	pw=${pw#"${pw%%[![:space:]]*}"}
	pw=${pw%"${pw##*[![:space:]]}"}
	[[ $pw =~ ^[A-Za-z0-9._~-]+$ ]] ||
		entrip_die "$file: a password of letters, digits and ._~- only, please (remove the file and run scripts/services for a new one)"
	printf '%s\n' "$pw"
}

# Generates a role's password file unless it exists, and makes sure that only
# its owner can read it.
_entrip_pg_password_ensure() { # <role>
	local file dir tmp pw
	file=$(entrip_pg_password_file "$1")
	dir=${file%/*}
	(
		umask 077
		mkdir -p "$dir" || exit 1
		chmod 700 "$dir" || exit 1
		if [[ ! -e $file ]]; then
			pw=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n') || exit 1
			[[ ${#pw} -eq 64 ]] || exit 1
			tmp=$(mktemp "$dir/.postgres-$1.XXXXXX") || exit 1
			printf '%s\n' "$pw" >"$tmp" || exit 1
			# ln fails when another run created the file meanwhile: keep that one.
			if ln "$tmp" "$file" 2>/dev/null; then
				printf '[entrip] generated the password of PostgreSQL role %s in %s\n' "$1" "$file" >&2
			fi
			rm -f "$tmp"
		fi
		chmod 600 "$file"
	) || entrip_die "cannot write the password file $file"
}

# Creates the role if missing and sets its attributes and its password (the
# one in its file, generated first if missing): the file is the truth.
_entrip_pg_ensure_role() { # <role> <attributes>
	local role=$1 attrs=$2 pw
	_entrip_pg_password_ensure "$role"
	pw=$(entrip_pg_password "$role") || exit 1
	# On stdin, so that the password is not on a command line; and this
	# session logs no statement, so that it is not in the server log either
	# (log_statement = ddl, or an error with log_min_error_statement).
	entrip_pg_admin -d postgres >/dev/null <<-SQL || entrip_die "cannot create or alter PostgreSQL role $role"
		SET log_statement = 'none';
		SET log_min_error_statement = 'panic';
		SELECT format('CREATE ROLE %I', '$role') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') \gexec
		ALTER ROLE "$role" WITH $attrs PASSWORD '$pw';
	SQL
}

# Creates the database if missing and gives it, its schema public and every
# object in it to <owner> (scripts/sql/give-schema-public.sql).
entrip_ensure_database() { # <database> <owner>
	local db=$1 owner=$2 exists
	exists=$(entrip_pg_admin -d postgres -tAc "select 1 from pg_database where datname = '$db'") ||
		entrip_die "cannot list databases"
	if [[ $exists != 1 ]]; then
		entrip_log "creating database $db owned by $owner"
		# Another process may create it at the same moment: check again on failure.
		if ! entrip_pg_admin -d postgres -c "CREATE DATABASE \"$db\" OWNER \"$owner\"" 2>/dev/null; then
			exists=$(entrip_pg_admin -d postgres -tAc "select 1 from pg_database where datname = '$db'") || true
			[[ $exists == 1 ]] || entrip_die "CREATE DATABASE $db failed"
		fi
	fi
	entrip_pg_admin -d postgres >/dev/null <<-SQL || entrip_die "cannot give database $db to $owner"
		SELECT format('ALTER DATABASE %I OWNER TO %I', '$db', '$owner')
		 WHERE (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '$db') <> '$owner' \gexec
	SQL
	{
		printf "BEGIN;\nSET LOCAL entrip.new_owner = '%s';\n" "$owner"
		cat "$(entrip_repo_root)/scripts/sql/give-schema-public.sql"
		printf 'COMMIT;\n'
	} | entrip_pg_admin -d "$db" >/dev/null ||
		entrip_die "cannot give schema public of database $db to $owner"
}

# Checks that a role logs in over TCP with the password of its file, as the
# fleet and the tests will.
_entrip_pg_check_login() { # <role> <database>
	local pw out
	pw=$(entrip_pg_password "$1") || exit 1
	if ! out=$(PGPASSWORD=$pw PGCONNECT_TIMEOUT=5 psql -X -w -q -At -h "$ENTRIP_PG_HOST" -p "$ENTRIP_PG_PORT" \
		-U "$1" -d "$2" -c 'select 1' 2>&1); then
		entrip_die "role $1 cannot log in to $ENTRIP_PG_HOST:$ENTRIP_PG_PORT/$2 with its password: $out (pg_hba.conf must allow scram-sha-256 or md5 for host connections; no script edits it)"
	fi
}

# The roles and databases of the fleet and of the tests (see the header).
entrip_ensure_pg_roles() {
	_entrip_pg_ensure_role "$ENTRIP_PG_ROLE" 'LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS'
	entrip_ensure_database "$ENTRIP_PG_DB" "$ENTRIP_PG_ROLE"
	_entrip_pg_check_login "$ENTRIP_PG_ROLE" "$ENTRIP_PG_DB"
	_entrip_pg_ensure_role "$ENTRIP_PG_TEST_ROLE" 'LOGIN SUPERUSER'
	entrip_ensure_database "$ENTRIP_PG_TEST_DB" "$ENTRIP_PG_TEST_ROLE"
	_entrip_pg_check_login "$ENTRIP_PG_TEST_ROLE" "$ENTRIP_PG_TEST_DB"
	entrip_log "PostgreSQL roles $ENTRIP_PG_ROLE and $ENTRIP_PG_TEST_ROLE ready (passwords in $(dirname "$(entrip_pg_password_file x)")/)"
}

# postgres://<role>:<password>@host:port/<database>, for the fleet's binaries
# (which otherwise read the entrip role's password from its file themselves).
entrip_pg_url() { # <role> <database>
	local pw
	pw=$(entrip_pg_password "$1") || exit 1
	printf 'postgres://%s:%s@%s:%s/%s\n' "$1" "$pw" "$ENTRIP_PG_HOST" "$ENTRIP_PG_PORT" "$2"
}

# psql over TCP as the test superuser entrip_test: what the benchmarks and
# scripts/chaos use to create, inspect and drop their own databases.
entrip_psql() {
	local pw
	pw=$(entrip_pg_password "$ENTRIP_PG_TEST_ROLE") || exit 1
	PGPASSWORD=$pw PGCONNECT_TIMEOUT=5 psql -X -w -q -v ON_ERROR_STOP=1 \
		-h "$ENTRIP_PG_HOST" -p "$ENTRIP_PG_PORT" -U "$ENTRIP_PG_TEST_ROLE" "$@"
}

# A URL with its password shown as ***, for logs.
entrip_redact_url() { # <url>
	sed -E 's#^([a-z]+://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"
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

# schemathesis (PyPI), pinned, in a virtual environment of its own under the
# user's cache (shared by every clone); prints the path of its `st`.
ENTRIP_SCHEMATHESIS_VERSION=4.32.5
entrip_ensure_schemathesis() {
	local venv=${ENTRIP_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/entrip/tools}/schemathesis-$ENTRIP_SCHEMATHESIS_VERSION
	mkdir -p "$(dirname "$venv")"
	# One install at a time (clones share the cache); `.done` marks a
	# finished one, so that an interrupted install is redone.
	(
		flock 9
		if [[ ! -e $venv/.done ]]; then
			command -v python3 >/dev/null 2>&1 || entrip_apt_install python3 python3-venv
			# Debian's python3 has venv but not ensurepip without python3-venv.
			python3 -c 'import ensurepip' 2>/dev/null || entrip_apt_install python3-venv
			entrip_log "installing schemathesis $ENTRIP_SCHEMATHESIS_VERSION into $venv"
			rm -rf "$venv"
			python3 -m venv "$venv" >&2 || entrip_die "cannot create a virtual environment in $venv"
			"$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ENTRIP_SCHEMATHESIS_VERSION" >&2 ||
				entrip_die "pip install schemathesis==$ENTRIP_SCHEMATHESIS_VERSION failed"
			touch "$venv/.done"
		fi
	) 9>"$venv.lock" || exit 1
	printf '%s\n' "$venv/bin/st"
}

# ----------------------------------------------------------------------- all

entrip_ensure_services() {
	entrip_ensure_postgres
	entrip_ensure_pg_roles
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

# Benchmarks: CPU time (user + system, in clock ticks) spent so far by
# the given processes together, with their children that have exited (so
# PostgreSQL's postmaster carries its finished backends); a process that is
# gone counts 0.
entrip_cpu_ticks() { # <pid>...
	local total=0 pid stat fields
	for pid in "$@"; do
		# A builtin read, not cat: a snapshot reads every postgres process.
		{ stat=$(<"/proc/$pid/stat"); } 2>/dev/null || continue
		# Fields after "pid (comm) ": utime, stime, cutime and cstime are
		# the 12th to the 15th.
		read -r -a fields <<<"${stat##*) }"
		total=$((total + fields[11] + fields[12] + fields[13] + fields[14]))
	done
	echo "$total"
}

# Benchmarks: the CPU profile of a run by process, as ticks spent so far,
# and when: "<broker> <postgres> <given pids> <whole machine busy> <epoch
# seconds>". Two snapshots' difference tells where a run's CPU went, and
# over how long (entrip_cpu_report).
entrip_cpu_snapshot() { # <pid>...
	local broker pg busy
	# shellcheck disable=SC2046 # one pid per word
	broker=$(entrip_cpu_ticks $(pgrep -x beam.smp))
	# shellcheck disable=SC2046
	pg=$(entrip_cpu_ticks $(pgrep -x postgres))
	busy=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)
	echo "$broker $pg $(entrip_cpu_ticks "$@") $busy $EPOCHREALTIME"
}

# Benchmarks: where the CPU went between two snapshots, per event, and the
# cores used, as "broker <us>/event, PostgreSQL <us>/event, [<label>
# <us>/event, ]the rest <us>/event; <busy> of <n> cores busy" (the label's
# part only when one is given; the rest: every other process, the load
# generator's included, and the kernel's network work).
entrip_cpu_report() { # <before> <after> <events> [label]
	python3 - "$1" "$2" "$3" "${4:-}" "$(getconf CLK_TCK)" "$(nproc)" <<'PY'
import sys
before, after, events, label, tck, cores = sys.argv[1:]
*ticks, secs = [float(a) - float(b) for a, b in zip(after.split(), before.split())]
d = [t / int(tck) for t in ticks]
per = lambda x: x * 1e6 / max(int(events), 1)
own = f"{label} {per(d[2]):.0f} us/event, " if label else ""
print(f"broker {per(d[0]):.0f} us/event, PostgreSQL {per(d[1]):.0f} us/event, {own}"
      f"the rest {per(d[3] - d[0] - d[1] - d[2]):.0f} us/event; "
      f"{d[3] / secs:.2f} of {cores} cores busy")
PY
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
