//! Test helpers shared by the crates' integration tests: the messaging
//! contract as an oracle ([`asyncapi`]), a 3-node RabbitMQ cluster of a
//! test's own ([`cluster`]), a TCP proxy that
//! cuts real connections, a RabbitMQ vhost per test, database URLs, a
//! non-superuser role per test database and a look at the binaries'
//! sessions ([`pg`]), service processes, waits bounded by progress rather
//! than by a deadline, and the load generators' API key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod asyncapi;
pub mod cluster;
pub mod pg;

use std::{
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{ConnectOptions as _, postgres::PgConnectOptions};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};

/// A TCP proxy in front of a real server that a test can cut (every open
/// connection is closed and new ones are refused) and restore.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_now: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_now = Arc::new(Notify::new());
        let task = tokio::spawn({
            let cut = cut.clone();
            let cut_now = cut_now.clone();
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let cut_now = cut_now.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut_now.notified() => {}
                        }
                    });
                }
            }
        });
        Self {
            addr,
            cut,
            cut_now,
            task,
        }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_now.notify_waiters();
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The broker every test uses (`AMQP_URL`'s host and port).
pub fn amqp_addr() -> SocketAddr {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, rest)| rest);
    let host_port = after_at.split('/').next().unwrap_or("127.0.0.1:5672");
    host_port
        .parse()
        .unwrap_or_else(|_| "127.0.0.1:5672".parse().unwrap())
}

/// A RabbitMQ vhost of the test's own, deleted when dropped, so tests can
/// declare the real topology side by side.
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn new() -> Self {
        let name = format!("entrip-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self { name }
    }

    /// The AMQP URL of this vhost on `addr` (the broker, or a proxy to it).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        format!("amqp://guest:guest@{addr}/{}", self.name)
    }

    pub fn url(&self) -> String {
        self.url_via(amqp_addr())
    }

    /// Sets the permissions of user `guest` on this vhost (regexes, as
    /// `rabbitmqctl set_permissions`); they apply to new connections.
    /// `Vhost::new` gives `.*` for all three.
    pub fn set_permissions(&self, configure: &str, write: &str, read: &str) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.name,
            "guest",
            configure,
            write,
            read,
        ]);
    }
}

impl Vhost {
    /// Applies a policy to this vhost's queues whose names match `pattern`
    /// (`definition` as JSON, as `rabbitmqctl set_policy`).
    pub fn set_queue_policy(&self, name: &str, pattern: &str, definition: &str) {
        rabbitmqctl(&[
            "set_policy",
            "-p",
            &self.name,
            "--apply-to",
            "queues",
            name,
            pattern,
            definition,
        ]);
    }

    /// The client ports of the connections open on this vhost now (one per
    /// connection, as the broker sees them).
    pub fn connections(&self) -> Vec<String> {
        rabbitmqctl_rows(&[
            "-q",
            "list_connections",
            "--no-table-headers",
            "vhost",
            "peer_port",
        ])
        .into_iter()
        .filter(|(v, _)| *v == self.name)
        .map(|(_, port)| port)
        .collect()
    }

    /// The bytes the broker received so far on the connection from client
    /// port `port` (one of [`Vhost::connections`]).
    pub fn received_bytes(&self, port: &str) -> u64 {
        rabbitmqctl_rows(&[
            "-q",
            "list_connections",
            "--no-table-headers",
            "peer_port",
            "recv_oct",
        ])
        .into_iter()
        .find(|(p, _)| p == port)
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no connection from port {port}"))
    }

    /// How many of `queue`'s messages are delivered and not yet acknowledged,
    /// as the broker counts them.
    pub fn unacked(&self, queue: &str) -> u64 {
        rabbitmqctl_rows(&[
            "-q",
            "list_queues",
            "-p",
            &self.name,
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .into_iter()
        .find(|(name, _)| name == queue)
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("queue {queue} not listed on vhost {}", self.name))
    }
}

impl Default for Vhost {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.name]);
    }
}

/// Runs `rabbitmqctl` (it must succeed) and returns what it printed.
fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is installed with RabbitMQ");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rows of a two-column `rabbitmqctl list_…`, trimmed.
fn rabbitmqctl_rows(args: &[&str]) -> Vec<(String, String)> {
    rabbitmqctl(args)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
        .collect()
}

/// A `postgres://user:password@host:port/database` URL for these options
/// (e.g. the ones `#[sqlx::test]` made), password included, so that a child
/// process can use it.
pub fn database_url(opts: &PgConnectOptions) -> String {
    let mut url = opts.to_url_lossy();
    url.set_query(None);
    if opts.get_database().is_none() {
        url.set_path("postgres");
    }
    url.to_string()
}

/// Runs `promtool check metrics` on an exposition text; `Err` carries its
/// findings. `PROMTOOL` names the binary (scripts/test installs it).
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {promtool} (scripts/test installs it): {e}"))?;
    check
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = check.wait_with_output().map_err(|e| e.to_string())?;
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && findings.trim().is_empty() {
        Ok(())
    } else {
        Err(findings)
    }
}

/// How long a wait may see no progress before the test fails. A busy
/// machine slows the work a test waits for; it does not stop it. So waits
/// are bounded by a lack of progress, not by a deadline sized for an idle
/// machine. Below nextest's 60 s limit (`.config/nextest.toml`), so that a
/// stuck test fails with its own message saying what it waited for.
pub const STALL: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(100);

/// Waits until `cond` holds, checked every 100 ms: for one event with no
/// count to watch (a consumer connected, a process ready). Panics naming
/// `what` when it has not happened after [`STALL`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STALL;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {STALL:?} waiting for: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `probe` says done, checked every 100 ms. The probe returns
/// its progress (rows published, messages received, …) and whether the work
/// is done; the wait panics naming `what` only when the progress stands still
/// for [`STALL`], so a backlog that drains slowly on a busy machine passes
/// and one that stopped moving fails.
pub async fn progress<F, Fut, P>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (P, bool)>,
    P: PartialEq + std::fmt::Debug,
{
    let (mut last, mut done) = probe().await;
    let mut moved_at = tokio::time::Instant::now();
    while !done {
        assert!(
            moved_at.elapsed() < STALL,
            "no progress for {STALL:?} waiting for: {what} (stuck at {last:?})"
        );
        tokio::time::sleep(POLL).await;
        let (now, finished) = probe().await;
        if now != last {
            moved_at = tokio::time::Instant::now();
            last = now;
        }
        done = finished;
    }
}

/// A port that was free a moment ago, for a service under test to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A service binary run by a test: killed when dropped, so that a failing
/// test leaves no process behind.
pub struct Process(pub Child);

impl Process {
    /// Starts `cmd` with its output discarded.
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the binary starts"),
        )
    }

    /// Sends `signal` (`-TERM`, `-KILL`, …) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill {signal} {}", self.0.id());
    }

    /// Waits for the process to exit (at most [`STALL`]) and reaps it.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        eventually("the process exits", || {
            status = self.0.try_wait().expect("waitpid");
            std::future::ready(status.is_some())
        })
        .await;
        status.expect("exited")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `Authorization: Bearer $ENTRIP_API_KEY` when that is set and not empty,
/// for the load generators (ingest refuses requests without a key unless
/// `ingest.auth_enabled` is false).
pub fn bearer_from_env() -> Result<reqwest::header::HeaderMap, reqwest::header::InvalidHeaderValue>
{
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = std::env::var("ENTRIP_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.trim()))?,
        );
    }
    Ok(headers)
}
