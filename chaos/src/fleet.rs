//! The fleet under test: the real `ingest`, two `dispatcher`s and `workers`
//! binaries as child processes of this one, each with its own listen port and
//! log file. The fault injector kills and restarts them through this type;
//! dropping it kills every child, also on an error or a panic.
//!
//! Ports are picked by binding port 0 and releasing it, so another process
//! (a parallel test) may take one before the child binds it. Dispatchers and
//! workers therefore get a fresh port at every start, and a service that
//! exits because its port is taken (exit status `EXIT_CANNOT_LISTEN`) is
//! started again on a fresh port instead of being counted as an exit of its
//! own. Ingest keeps its port across the injector's restarts, and moves only
//! after such a bind failure: the load reads its URL from [`IngestUrl`],
//! which the fleet keeps current.

use std::{
    fs::OpenOptions,
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use crate::Error;

/// The binaries the fleet needs, looked up in the binary directory.
pub const BINARIES: [&str; 3] = ["ingest", "dispatcher", "workers"];

/// Where and how the services run.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub bin_dir: PathBuf,
    pub database_url: String,
    pub amqp_url: String,
    /// The `ENTRIP_CONFIG` file (webhook subscribers).
    pub config_file: PathBuf,
    pub log_dir: PathBuf,
    /// Extra `ENTRIP__…` settings for every service.
    pub env: Vec<(String, String)>,
}

/// The binary directory: `explicit`, else the running executable's
/// directory or its parent (`target/release` for the CLI, `target/debug` for
/// an integration test under `target/debug/deps`). Fails naming the missing
/// file.
pub fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(dir) => vec![dir.to_path_buf()],
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            let parent = dir.parent().map(Path::to_path_buf);
            std::iter::once(dir).chain(parent).collect()
        }
    };
    for dir in &candidates {
        if BINARIES.iter().all(|b| dir.join(b).is_file()) {
            return Ok(dir.clone());
        }
    }
    let first = candidates.first().cloned().unwrap_or_default();
    let missing = BINARIES
        .iter()
        .map(|b| first.join(b))
        .find(|p| !p.is_file())
        .unwrap_or_else(|| first.clone());
    Err(Error::Setup(format!(
        "missing fleet binary {} (looked in {}); build them first: cargo build --workspace --bins (add --release for target/release)",
        missing.display(),
        candidates
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    )))
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child).
pub fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One service slot: which binary, where it listens, and its process when
/// it runs.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub binary: &'static str,
    listen_key: &'static str,
    pub port: u16,
    health_path: &'static str,
    pub log_path: PathBuf,
    child: Option<Child>,
    pub starts: u32,
    /// Restarts on a fresh port after a bind failure.
    pub bind_retries: u32,
}

/// How many times a slot is restarted on a fresh port after a bind failure
/// before such an exit counts as its own.
const MAX_BIND_RETRIES: u32 = 5;

/// Whether a service exited because it could not bind its listen port
/// (another process had it).
fn is_bind_failure(status: std::process::ExitStatus) -> bool {
    status.code() == Some(entrip_common::service::EXIT_CANNOT_LISTEN)
}

impl Service {
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}{}", self.port, self.health_path)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// Ingest's base URL as it is now, shared with the load: ingest moves to a
/// fresh port when its own was taken while it was down (see the module
/// documentation).
#[derive(Debug, Clone)]
pub struct IngestUrl(Arc<RwLock<String>>);

impl IngestUrl {
    pub fn new(url: String) -> Self {
        Self(Arc::new(RwLock::new(url)))
    }

    pub fn get(&self) -> String {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, url: String) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = url;
    }
}

/// The running fleet: slot 0 ingest, 1 and 2 dispatchers, 3 workers.
#[derive(Debug)]
pub struct Fleet {
    cfg: FleetConfig,
    pub services: Vec<Service>,
    /// Services that exited without being killed by the injector.
    pub unexpected_exits: Vec<String>,
    shared_url: IngestUrl,
}

pub const INGEST: usize = 0;
pub const DISPATCHERS: [usize; 2] = [1, 2];
pub const WORKERS: usize = 3;

impl Fleet {
    pub fn new(cfg: FleetConfig) -> Result<Self, Error> {
        let slots = [
            ("ingest", "ingest", "ENTRIP__INGEST__LISTEN", "/readyz"),
            (
                "dispatcher-1",
                "dispatcher",
                "ENTRIP__DISPATCHER__LISTEN",
                "/healthz",
            ),
            (
                "dispatcher-2",
                "dispatcher",
                "ENTRIP__DISPATCHER__LISTEN",
                "/healthz",
            ),
            ("workers", "workers", "ENTRIP__WORKERS__LISTEN", "/healthz"),
        ];
        let mut services = Vec::new();
        for (name, binary, listen_key, health_path) in slots {
            services.push(Service {
                name: name.to_owned(),
                binary,
                listen_key,
                port: free_port()?,
                health_path,
                log_path: cfg.log_dir.join(format!("{name}.log")),
                child: None,
                starts: 0,
                bind_retries: 0,
            });
        }
        let shared_url = IngestUrl::new(format!("http://127.0.0.1:{}", services[INGEST].port));
        Ok(Self {
            cfg,
            services,
            unexpected_exits: Vec::new(),
            shared_url,
        })
    }

    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.services[INGEST].port)
    }

    /// Ingest's URL, kept current when it moves to a fresh port.
    pub fn shared_ingest_url(&self) -> IngestUrl {
        self.shared_url.clone()
    }

    /// A command for one of the fleet's binaries with the fleet's
    /// environment (and nothing else from ours but `PATH`).
    pub fn command(&self, binary: &str) -> Command {
        let mut cmd = Command::new(self.cfg.bin_dir.join(binary));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.cfg.database_url)
            .env("AMQP_URL", &self.cfg.amqp_url)
            .env("ENTRIP_CONFIG", &self.cfg.config_file);
        for (k, v) in &self.cfg.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the slot's process unless it runs; output appends to its log.
    /// Dispatchers and workers get a fresh port at every start (see the
    /// module documentation).
    pub fn start(&mut self, slot: usize) -> Result<(), Error> {
        if self.services[slot].child.is_some() {
            return Ok(());
        }
        if slot != INGEST && self.services[slot].starts > 0 {
            self.services[slot].port = free_port()?;
        }
        let svc = &self.services[slot];
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&svc.log_path)?;
        writeln!(
            log,
            "==== chaos: start #{} of {} at {} ====",
            svc.starts + 1,
            svc.name,
            chrono::Utc::now().to_rfc3339()
        )?;
        let child = self
            .command(svc.binary)
            .env(svc.listen_key, format!("127.0.0.1:{}", svc.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                Error::Setup(format!(
                    "cannot start {}: {e}",
                    self.cfg.bin_dir.join(svc.binary).display()
                ))
            })?;
        let svc = &mut self.services[slot];
        svc.child = Some(child);
        svc.starts += 1;
        Ok(())
    }

    /// SIGKILLs the slot's process and reaps it; false when it was not running.
    pub fn kill(&mut self, slot: usize) -> bool {
        let svc = &mut self.services[slot];
        let Some(mut child) = svc.child.take() else {
            return false;
        };
        let _ = child.kill();
        let _ = child.wait();
        if let Ok(mut log) = OpenOptions::new().append(true).open(&svc.log_path) {
            let _ = writeln!(
                log,
                "==== chaos: SIGKILL {} at {} ====",
                svc.name,
                chrono::Utc::now().to_rfc3339()
            );
        }
        true
    }

    /// Notes (and forgets) processes that exited on their own and returns
    /// their slots. A process that exited because its listen port was taken
    /// meanwhile is started again at once on a fresh port, and not counted
    /// (at most `MAX_BIND_RETRIES` times per slot).
    pub fn reap_exited(&mut self) -> Vec<usize> {
        let mut exited = Vec::new();
        for slot in 0..self.services.len() {
            let status = match self.services[slot].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => status,
                _ => continue,
            };
            self.services[slot].child = None;
            let name = self.services[slot].name.clone();
            if self.services[slot].bind_retries < MAX_BIND_RETRIES && is_bind_failure(status) {
                let old = self.services[slot].port;
                self.services[slot].bind_retries += 1;
                // `start` picks a fresh port for every slot but ingest.
                let fresh = if slot == INGEST { free_port() } else { Ok(old) };
                match fresh.and_then(|port| {
                    self.services[slot].port = port;
                    if slot == INGEST {
                        self.shared_url.set(self.ingest_url());
                    }
                    self.start(slot)
                }) {
                    Ok(()) => {
                        tracing::warn!(
                            "{name} could not bind port {old} (taken meanwhile); started again on port {}",
                            self.services[slot].port
                        );
                        continue;
                    }
                    Err(e) => tracing::warn!("restarting {name} on a fresh port: {e}"),
                }
            }
            let what = format!(
                "{name} exited by itself ({status}) at {}",
                chrono::Utc::now().to_rfc3339()
            );
            tracing::warn!("{what}");
            self.unexpected_exits.push(what);
            exited.push(slot);
        }
        exited
    }

    /// Starts every slot that does not run.
    pub fn start_all(&mut self) -> Result<(), Error> {
        self.reap_exited();
        for slot in 0..self.services.len() {
            self.start(slot)?;
        }
        Ok(())
    }

    /// SIGTERM to every process, then SIGKILL to what still runs after
    /// `grace`.
    pub fn stop_all(&mut self, grace: Duration) {
        for svc in &self.services {
            if let Some(child) = &svc.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + grace;
        for svc in &mut self.services {
            if let Some(mut child) = svc.child.take() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// The last `lines` lines of every service's log, for failure output.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for svc in &self.services {
            let text = std::fs::read_to_string(&svc.log_path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!(
                "---- {} ({}) last {} lines ----\n",
                svc.name,
                svc.log_path.display(),
                all.len() - from
            ));
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for svc in &mut self.services {
            if let Some(mut child) = svc.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_bind_failure_restarts_on_a_fresh_port_other_exits_count() {
        let dir = std::env::temp_dir().join(format!(
            "entrip-chaos-fleet-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("ran-once");
        // "workers" fails like the services do when their port is taken, on
        // its first run only; the others exit with another error.
        let workers = format!(
            "#!/bin/sh\nif [ ! -e '{m}' ]; then\n  touch '{m}'\n  echo \"workers: cannot listen on $ENTRIP__WORKERS__LISTEN (key workers.listen)\"\n  exit 3\nfi\nexec sleep 30\n",
            m = marker.display()
        );
        let other = "#!/bin/sh\necho 'Error: database: connection refused'\nexit 1\n";
        for (name, text) in [
            ("workers", workers.as_str()),
            ("dispatcher", other),
            ("ingest", other),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut fleet = Fleet::new(FleetConfig {
            bin_dir: dir.clone(),
            database_url: String::new(),
            amqp_url: String::new(),
            config_file: dir.join("entrip-chaos.toml"),
            log_dir: dir.clone(),
            env: Vec::new(),
        })
        .unwrap();
        fleet.start(WORKERS).unwrap();
        fleet.start(DISPATCHERS[0]).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let exited = fleet.reap_exited();
        assert_eq!(exited, vec![DISPATCHERS[0]], "{:?}", fleet.unexpected_exits);
        assert_eq!(fleet.unexpected_exits.len(), 1);
        let w = &fleet.services[WORKERS];
        assert!(w.is_running(), "workers not started again");
        assert_eq!((w.bind_retries, w.starts), (1, 2));
        // Its second run (sleeping) is not taken for a bind failure again.
        std::thread::sleep(Duration::from_millis(500));
        assert!(fleet.reap_exited().is_empty());
        drop(fleet);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
