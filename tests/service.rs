//! The shipped systemd unit: hardened as the README says, and valid for systemd.

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
        "ReadWritePaths=/var/lib/backstop /var/log/backstop",
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
