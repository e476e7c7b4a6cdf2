//! `tunmesh-lab bench` end to end, briefly: raw veth, tunmesh and Debian's
//! wireguard-go for one second each; the table, the JSON and the last line
//! are checked, figures are not (speed is for the benchmark, not tests).
//! Needs root, iperf3 and wireguard-go; CI has them.

use std::process::Command;

#[test]
fn bench_runs_and_reports_the_ratio() {
    if !tunmesh_lab::require_root("bench_runs_and_reports_the_ratio") {
        return;
    }
    let json =
        std::env::temp_dir().join(format!("tunmesh-bench-smoke-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_tunmesh-lab"))
        .args([
            "bench",
            "--seconds",
            "1",
            "--reps",
            "1",
            "--configs",
            "raw,tunmesh,wggo",
            "--tests",
            "tcp1,udp",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    let ratio: f64 = last
        .strip_prefix("bench: tunmesh/wireguard-go = ")
        .and_then(|r| r.strip_suffix(" (tcp1 median)"))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("last line {last:?}"));
    assert!(ratio > 0.0);
    for cfg in ["raw", "tunmesh", "wggo"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(cfg) && l.contains("tcp1")),
            "{cfg} row missing:\n{stdout}"
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "3 configs x 2 tests");
    assert!(
        rows.iter().all(|r| r["ratio"].as_f64().is_some()),
        "every row has a ratio to raw of its rep"
    );
    assert!(
        rows.iter().all(|r| r["machine_idle"]
            .as_f64()
            .is_some_and(|v| (0.0..=100.0).contains(&v))),
        "every row has the machine's idle share"
    );
    // Nothing left behind.
    let left = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with("-ba"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "bench namespaces removed");
}
