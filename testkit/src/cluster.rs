//! A 3-node RabbitMQ cluster of one test's own (`scripts/rabbit-cluster`
//! with a directory, node names and free ports of its own, beside the
//! broker on 5672), removed when dropped whatever the test's outcome.

use std::{path::Path, process::Command};

/// A running cluster; `down` runs on drop.
pub struct Cluster {
    env: Vec<(&'static str, String)>,
    /// The nodes' AMQP URLs, node 1 first.
    pub urls: Vec<String>,
}

impl Cluster {
    /// Starts three nodes and joins them; `Err` with the script's output
    /// when the cluster cannot start on this machine.
    pub fn up() -> Result<Self, String> {
        let port = free_ports();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let env = vec![
            (
                "ENTRIP_RABBIT_CLUSTER_DIR",
                std::env::temp_dir()
                    .join(format!("entrip-rc-test-{tag}"))
                    .display()
                    .to_string(),
            ),
            (
                "ENTRIP_RABBIT_CLUSTER_NAME",
                format!("entrip-rc-{}", &tag[..8]),
            ),
            ("ENTRIP_RABBIT_CLUSTER_PORT", port.to_string()),
        ];
        let mut cluster = Self {
            env,
            urls: Vec::new(),
        };
        let (ok, out) = cluster.script(&["up"]);
        if !ok {
            return Err(format!("scripts/rabbit-cluster up failed:\n{out}"));
        }
        let (ok, urls) = cluster.script(&["urls"]);
        if !ok {
            return Err(format!("scripts/rabbit-cluster urls failed:\n{urls}"));
        }
        cluster.urls = urls.trim().split(',').map(str::to_owned).collect();
        Ok(cluster)
    }

    /// The script with this cluster's settings: whether it succeeded, and
    /// its stdout and stderr.
    pub fn script(&self, args: &[&str]) -> (bool, String) {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let out = Command::new("bash")
            .arg(repo.join("scripts/rabbit-cluster"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The nodes' URLs comma-separated, as `AMQP_URL` takes them.
    pub fn amqp_url(&self) -> String {
        self.urls.join(",")
    }

    /// The cluster's data directory (gone after `down`).
    pub fn dir(&self) -> &str {
        &self.env[0].1
    }

    /// SIGKILLs node `n` (1-based).
    pub fn kill(&self, n: usize) {
        let (ok, out) = self.script(&["kill", &n.to_string()]);
        assert!(ok, "kill {n}: {out}");
    }

    /// Starts node `n` again; it rejoins.
    pub fn start(&self, n: usize) {
        let (ok, out) = self.script(&["start", &n.to_string()]);
        assert!(ok, "start {n}: {out}");
    }

    /// `status`'s output (fails the test when the script fails).
    pub fn status(&self) -> String {
        let (ok, out) = self.script(&["status"]);
        assert!(ok, "status: {out}");
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

/// How many nodes `status` shows running.
pub fn running(status: &str) -> usize {
    status
        .lines()
        .filter(|l| l.contains(" running amqp://"))
        .count()
}

/// The cluster's running members as `status` prints them (the view of the
/// first node that runs): a node that came back on its own, outside the
/// cluster, is not one.
pub fn members(status: &str) -> usize {
    status
        .lines()
        .find_map(|l| l.strip_prefix("running nodes as "))
        .and_then(|l| l.split_once(": "))
        .map_or(0, |(_, m)| m.split_whitespace().count())
}

/// A first AMQP port whose three ports and their distribution ports
/// (+20000) are free now.
fn free_ports() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    // Aligned on 3 from a random start: two tests never pick overlapping
    // triples, unless both land on the same one.
    let start = 30_000 + 3 * (uuid::Uuid::new_v4().as_u128() % 2_500) as u16;
    (start..start + 2_000)
        .step_by(3)
        .find(|p| (0..3).all(|i| free(p + i) && free(p + i + 20_000)))
        .unwrap()
}
