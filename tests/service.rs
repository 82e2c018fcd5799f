//! The shipped systemd unit: hardened as the README says, and valid for systemd.

mod common;

use std::process::Command;

const UNIT: &str = include_str!("../scripts/backstop.service");

#[test]
fn the_unit_runs_unprivileged_and_sandboxed() {
    for line in [
        "User=backstop",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "PrivateTmp=true",
        "ReadWritePaths=/var/lib/backstop /var/log/backstop /var/cache/backstop",
        "CacheDirectory=backstop",
        "Environment=BACKSTOP_CACHE_DIR=/var/cache/backstop/prompts",
        "Restart=on-failure",
        "LimitNOFILE=65536",
        "CapabilityBoundingSet=",
    ] {
        assert!(UNIT.lines().any(|l| l.trim() == line), "missing `{line}`");
    }
}

#[test]
fn systemd_accepts_the_unit_when_it_is_installed() {
    // Only machines with systemd can check the unit; the rules above hold everywhere.
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed; unit syntax not checked");
        return;
    };
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("backstop-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("backstop.service");
    std::fs::write(
        &unit,
        UNIT.replace("/usr/local/bin/backstop", env!("CARGO_BIN_EXE_backstop")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_check_timer_and_service_are_valid() {
    let service = include_str!("../scripts/backstop-check.service");
    let timer = include_str!("../scripts/backstop-check.timer");
    assert!(service.contains("backstop check") && service.contains("--on-change"));
    assert!(timer.contains("OnUnitActiveSec="));
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        return;
    };
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("backstop-check-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("backstop-check.service"), service).unwrap();
    std::fs::write(dir.join("backstop-check.timer"), timer).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("backstop-check.timer"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Every metric the Grafana dashboard draws is one backstop exports (no typos, no renames
/// left behind).
#[test]
fn the_dashboard_only_uses_metrics_backstop_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../scripts/grafana-dashboard.json")).unwrap();
    let mut sources = String::new();
    for dir in [
        "src",
        "src/engine",
        "src/models",
        "src/router",
        "src/security",
        "src/ops",
        "src/api",
    ] {
        for e in std::fs::read_dir(common::checkout().join(dir))
            .unwrap()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "rs") {
                sources.push_str(&std::fs::read_to_string(e.path()).unwrap());
            }
        }
    }
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("backstop_") {
                    let base = ["_bucket", "_count", "_sum"]
                        .iter()
                        .fold(name.to_owned(), |n, s| {
                            n.strip_suffix(s).map_or(n.clone(), str::to_owned)
                        });
                    assert!(
                        sources.contains(&format!("\"backstop_{base}\"")),
                        "backstop_{base} is not exported"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20);
}
