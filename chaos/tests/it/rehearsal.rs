//! The restore rehearsal in its short form (`scripts/restore-rehearsal
//! --short`): a PostgreSQL cluster of its own on another port, WAL archived
//! to a pgBackRest repository of its own, a few seconds of bookings, a full
//! backup while they go on, the cluster lost and restored to the latest
//! archived point, the fleet started again. The script's own checks must
//! pass, and the report must hold figures that show the rehearsal did what
//! it says (bookings lost inside the RPO window and sent again, a backlog
//! published after the restore). The binaries are target/debug's (this
//! test's siblings: `cargo build --bins` first when running it alone).

use std::{path::Path, process::Command};

use serde_json::Value;

#[test]
fn a_restore_rehearsal_meets_its_rpo_and_rto_and_loses_nothing_acknowledged_outside_them() {
    let rehearsal = Path::new(env!("CARGO_BIN_EXE_rehearsal"));
    let bin_dir = rehearsal.parent().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let work = tempfile_dir();
    let prefix = work.join("report");
    let out = Command::new("bash")
        .arg(repo.join("scripts/restore-rehearsal"))
        .args(["--short", "--bin-dir"])
        .arg(bin_dir)
        .arg("--report")
        .arg(&prefix)
        .output()
        .unwrap();
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "rehearsal failed ({}):\n{log}",
        out.status
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(work.join("report.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(work.join("report.md")).unwrap();
    assert!(md.starts_with("# Entrip restore rehearsal: PASSED"), "{md}");
    assert_eq!(report["passed"], true, "{report:#}");
    let f = |path: &str| report.pointer(path).and_then(Value::as_f64).unwrap();
    // The targets, and figures that show each path was taken.
    assert!(f("/rpo/seconds") <= 60.0, "{report:#}");
    assert!(f("/rto/seconds") <= 300.0, "{report:#}");
    assert!(
        f("/rto/seconds") >= f("/rto/restore_hook_seconds"),
        "{report:#}"
    );
    assert!(f("/rpo/acknowledged") > 0.0, "{report:#}");
    assert!(f("/outbox/unpublished_restored") > 0.0, "{report:#}");
    assert!(
        f("/outbox/published_after_restore") >= f("/outbox/unpublished_restored"),
        "{report:#}"
    );
    assert_eq!(f("/outbox/never_published"), 0.0, "{report:#}");
    assert_eq!(f("/outbox/unexplained_duplicates"), 0.0, "{report:#}");
    assert_eq!(report["integrity_exit"], 0, "{report:#}");
    assert!(f("/idempotency/resent_restored") > 0.0, "{report:#}");
    // The short form's last seconds are never archived: some acknowledged
    // requests are lost, and resent.
    assert!(f("/idempotency/resent_lost") > 0.0, "{report:#}");
    assert_eq!(
        f("/idempotency/replayed"),
        f("/idempotency/resent_restored"),
        "{report:#}"
    );
    assert_eq!(
        f("/idempotency/created_again"),
        f("/idempotency/resent_lost"),
        "{report:#}"
    );
    assert_eq!(report["point_in_time"]["before_kept"], true, "{report:#}");
    assert_eq!(report["point_in_time"]["after_kept"], false, "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    for name in [
        "acknowledged_before_loss_minus_rpo_present",
        "rpo_within_target",
        "rto_within_target",
        "new_booking_accepted",
        "outbox_published_after_restore",
        "no_event_lost",
        "duplicates_only_as_at_least_once_allows",
        "integrity_once_exits_0",
        "idempotency_after_restore",
        "approved_payments_settled",
        "webhooks_delivered",
        "verify_hook_passes",
        "point_in_time_restore",
    ] {
        let c = checks.iter().find(|c| c["name"] == name);
        assert!(
            c.is_some_and(|c| c["passed"] == true),
            "{name}: {c:?}\n{report:#}"
        );
    }
    // The script drops its cluster: nothing left behind.
    let cluster = log
        .split_whitespace()
        .find(|w| w.contains("/entrip-rehearsal-"))
        .and_then(|w| w.split('/').nth(1))
        .unwrap_or_else(|| panic!("no cluster named in the log:\n{log}"))
        .to_owned();
    let clusters = Command::new("pg_lsclusters").output().unwrap();
    let listed = String::from_utf8_lossy(&clusters.stdout);
    assert!(
        !listed
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&cluster)),
        "{cluster} still there:\n{listed}"
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// A fresh directory under the system temp dir.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("entrip-rehearsal-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
