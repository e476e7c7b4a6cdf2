//! `tunmesh-lab bench` end to end, briefly: raw veth, tunmesh and the newer
//! wireguard-go for one second each. Speed is for the benchmark, not for
//! tests: what is checked is the bench's own arithmetic and honesty (the
//! headline is the median of the per-repetition ratios its rows give, UDP
//! goodput is what arrived, a missing peer makes the headline n/a and the
//! exit status 1). Needs root, iperf3 and the peers `scripts/test.sh`
//! installs (scripts/install-anchors.sh).

use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

/// One bench at a time: each checks that it left no namespace behind,
/// which another running beside it would have.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn bench(json: &std::path::Path, configs: &str, tests: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tunmesh-lab"))
        .args([
            "bench",
            "--seconds",
            "1",
            "--reps",
            "2",
            "--configs",
            configs,
            "--tests",
            tests,
            "--json",
        ])
        .arg(json)
        .args(extra)
        .output()
        .unwrap()
}

/// The row of repetition `rep`, config `cfg` and test `test`.
fn row<'a>(rows: &'a [Value], rep: u64, cfg: &str, test: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["rep"] == rep && r["config"] == cfg && r["test"] == test)
        .unwrap_or_else(|| panic!("no row rep {rep} {cfg} {test}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[test]
fn bench_reports_per_repetition_ratios_and_receiver_goodput() {
    if !tunmesh_lab::require_root("bench_reports_per_repetition_ratios_and_receiver_goodput") {
        return;
    }
    let _one = one_at_a_time();
    let json =
        std::env::temp_dir().join(format!("tunmesh-bench-smoke-{}.json", std::process::id()));
    let out = bench(&json, "raw,tunmesh,wggo_new", "tcp1,udp", &["--no-install"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed (is the newer wireguard-go installed? scripts/install-anchors.sh):\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 12, "3 configs x 2 tests x 2 reps");

    // The order rotated between the two repetitions.
    let orders = report["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 2);
    assert_ne!(orders[0], orders[1], "order rotates: {orders:?}");

    // Recompute the headline from the rows: tunmesh / wggo_new inside each
    // repetition, then the median.
    let gbps =
        |rep: u64, cfg: &str, test: &str| row(rows, rep, cfg, test)["gbps"].as_f64().unwrap();
    let ratios: Vec<f64> = (1..=2)
        .map(|rep| gbps(rep, "tunmesh", "tcp1") / gbps(rep, "wggo_new", "tcp1"))
        .collect();
    let want = median(ratios.clone());
    let h = &report["headline"];
    assert_eq!(h["result"], "measured", "{h}");
    assert!(
        (h["median"].as_f64().unwrap() - want).abs() < 1e-9,
        "headline {h} is not the median of {ratios:?}"
    );
    let last = stdout.lines().last().unwrap_or("");
    assert!(
        last.starts_with(&format!(
            "bench: tunmesh/wireguard-go = {want:.2} (tcp1 median of 2"
        )),
        "last line {last:?}, expected {want:.2}"
    );
    for r in rows {
        let (cfg, rep, test) = (
            r["config"].as_str().unwrap(),
            r["rep"].as_u64().unwrap(),
            r["test"].as_str().unwrap(),
        );
        let raw = gbps(rep, "raw", test);
        let ratio = r["ratio"].as_f64().unwrap();
        assert!(
            (ratio - r["gbps"].as_f64().unwrap() / raw).abs() < 1e-9,
            "{r}: ratio to raw of its own repetition"
        );
        if cfg != "raw" {
            assert!(
                r["cpu_s_per_gbit"].as_f64().is_some_and(|c| c > 0.0),
                "{r}: a tunnel's daemons use CPU"
            );
        }
        // UDP goodput is what arrived: with loss, less than what was sent.
        let (got, sent, loss) = (
            r["gbps"].as_f64().unwrap(),
            r["sent_gbps"].as_f64().unwrap(),
            r["retr_or_loss"].as_f64().unwrap(),
        );
        if test == "udp" && loss > 1.0 {
            assert!(
                got < sent * (1.0 - loss / 200.0),
                "{r}: UDP goodput {got} with {loss}% loss must be below the {sent} sent"
            );
        }
    }
    for cfg in ["raw", "tunmesh", "wggo_new"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(cfg) && l.contains("tcp1")),
            "{cfg} row missing:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("wggo_new: Debian package wireguard-go"),
        "the newer wireguard-go's package version:\n{stdout}"
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

#[test]
fn a_missing_peer_makes_the_headline_na_and_the_bench_fail() {
    if !tunmesh_lab::require_root("a_missing_peer_makes_the_headline_na_and_the_bench_fail") {
        return;
    }
    let _one = one_at_a_time();
    let json =
        std::env::temp_dir().join(format!("tunmesh-bench-missing-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_tunmesh-lab"))
        .args([
            "bench",
            "--seconds",
            "1",
            "--reps",
            "1",
            "--configs",
            "raw,tunmesh,wggo,wggo_new",
            "--tests",
            "tcp1",
            "--no-install",
            "--anchors",
            "/nonexistent/tunmesh-anchors",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_file(&json);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some("bench: tunmesh/wireguard-go = n/a (newer wireguard-go missing)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("missing: wggo_new: /nonexistent/tunmesh-anchors/wireguard-go-new not found; install with `scripts/install-anchors.sh`"),
        "{stdout}"
    );
    // The old wireguard-go was there and measured: it is in the table, and
    // it did not stand in for the missing one.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("wggo ") && l.contains("tcp1")),
        "{stdout}"
    );
}

#[test]
fn latency_figures_are_per_repetition_ratios_of_what_was_measured() {
    if !tunmesh_lab::require_root("latency_figures_are_per_repetition_ratios_of_what_was_measured")
    {
        return;
    }
    let _one = one_at_a_time();
    let json =
        std::env::temp_dir().join(format!("tunmesh-bench-latency-{}.json", std::process::id()));
    let out = bench(
        &json,
        "raw,tunmesh,wggo_new",
        "tcp1,rr_udp,crr1,pps64",
        &["--no-install"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed (sockperf and the newer wireguard-go installed? scripts/install-deps.sh, scripts/install-anchors.sh):\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let rows = report["latency"].as_array().unwrap();
    assert_eq!(rows.len(), 18, "3 configs x 3 latency tests x 2 reps");
    let row = |rep: u64, cfg: &str, test: &str| row(rows, rep, cfg, test);
    for r in rows {
        let test = r["test"].as_str().unwrap();
        let rate = r["rate"].as_f64().unwrap_or(0.0);
        assert!(rate > 0.0, "{r}: something was measured");
        if test == "rr_udp" {
            let (p50, p99, p999) = (
                r["p50_us"].as_f64().unwrap(),
                r["p99_us"].as_f64().unwrap(),
                r["p999_us"].as_f64().unwrap(),
            );
            assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{r}");
            let raw = row(r["rep"].as_u64().unwrap(), "raw", "rr_udp");
            let added = r["added_p50_us"].as_f64().unwrap();
            assert!(
                (added - (p50 - raw["p50_us"].as_f64().unwrap())).abs() < 1e-9,
                "{r}: added over raw veth of its own repetition"
            );
        }
        if test == "pps64" {
            assert!(r["loss_pct"].as_f64().is_some(), "{r}: loss reported");
        }
    }
    // The script's lines are the medians of per-repetition ratios, before
    // the headline.
    let lines: Vec<&str> = stdout.lines().collect();
    let last = lines.len() - 1;
    for (label, test, field) in [
        ("rr-p50", "rr_udp", "p50_us"),
        ("rr-p99", "rr_udp", "p99_us"),
        ("crr", "crr1", "rate"),
        ("pps64", "pps64", "rate"),
    ] {
        let ratios: Vec<f64> = (1..=2)
            .map(|rep| {
                row(rep, "tunmesh", test)[field].as_f64().unwrap()
                    / row(rep, "wggo_new", test)[field].as_f64().unwrap()
            })
            .collect();
        let (lo, hi) = (ratios[0].min(ratios[1]), ratios[0].max(ratios[1]));
        let want = format!(
            "bench: {label} tunmesh/wireguard-go = {:.2} [{lo:.2}-{hi:.2}]",
            median(ratios.clone())
        );
        let at = lines
            .iter()
            .position(|l| *l == want)
            .unwrap_or_else(|| panic!("no line {want:?}:\n{stdout}"));
        assert!(at < last, "{label}'s line comes before the headline");
    }
    assert!(lines[last].starts_with("bench: tunmesh/wireguard-go = "));
    assert!(
        stdout.contains("Latency and small packets"),
        "the latency table:\n{stdout}"
    );
}
