//! Kubernetes' own end-to-end tests (`e2e.test` from the pinned release,
//! built by `scripts/control-plane.sh`) against a lab of real nodes, and
//! the summary of ginkgo's JSON report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::lab::Lab;

/// Every `[sig-network]` test the pinned release tags `[Conformance]`,
/// selected by the tag (a new release's come in by themselves): 47 in
/// v1.37.2.
pub const SIG_NETWORK_CONFORMANCE: &str = r"\[sig-network\].*\[Conformance\]";

/// What CI runs: the four `[Conformance]` tests of "Networking Granular
/// Checks: Pods" (pod-pod and node-pod over HTTP and UDP) and the
/// `[Conformance]` HostPort test (hostPort with different hostIPs and
/// protocols, through the chained portmap).
pub const CI: &[&str] = &[
    r"\[sig-network\] Networking Granular Checks: Pods .*\[Conformance\]",
    r"\[sig-network\] HostPort .*\[Conformance\]",
];

/// The network tests run besides the `[Conformance]` ones by default, by
/// their v1.37.2 names.
pub const NETWORK: &[&str] = &[
    r"\[sig-network\] Networking Granular Checks: Pods",
    r"\[sig-network\] NoSNAT",
    r"\[sig-network\] Services should be able to create a functioning NodePort service",
    r"\[sig-network\] Services should serve a basic endpoint from pods",
    r"\[sig-network\] Services should serve multiport endpoints from pods",
    r"\[Feature:IPv6DualStack\]",
    r"\[sig-network\] Networking IPerf2",
];

/// Tests of the focus that cannot apply on this machine, each with the
/// reason (docs/testing.md repeats it). They are skipped, and counted apart.
pub const NOT_HERE: &[(&str, &str)] = &[(
    "SCTP",
    "the kernel here has no SCTP support and no module can be loaded",
)];

/// What one run gave: test names by outcome (only the specs the focus
/// selected, not the thousands it filtered out).
#[derive(Debug, Default)]
pub struct Summary {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    /// Skipped while running (the test itself decided), with its reason.
    pub skipped: Vec<(String, String)>,
}

impl Summary {
    /// Of `wanted`, those that did not pass (not run, failed or skipped).
    pub fn missing<'a>(&self, wanted: &'a [String]) -> Vec<&'a String> {
        wanted.iter().filter(|w| !self.passed.contains(w)).collect()
    }

    pub fn line(&self) -> String {
        format!(
            "conformance: {} passed, {} failed, {} skipped",
            self.passed.len(),
            self.failed.len(),
            self.skipped.len()
        )
    }
}

/// Reads ginkgo's JSON report (`--ginkgo.json-report`). A spec the focus
/// filtered out is "skipped" with no failure record; one that skipped
/// itself carries its reason there.
pub fn summarize(report: &Path) -> Result<Summary> {
    let text = std::fs::read_to_string(report)
        .with_context(|| format!("reading the e2e report {}", report.display()))?;
    let suites: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing the e2e report {}", report.display()))?;
    let mut s = Summary::default();
    let suites = suites
        .as_array()
        .with_context(|| format!("{}: not a list of suites", report.display()))?;
    for suite in suites {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                continue;
            }
            let mut name: Vec<String> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(String::from))
                .collect();
            name.push(spec["LeafNodeText"].as_str().unwrap_or("?").to_string());
            let name = name.join(" ");
            let why = spec["Failure"]["Message"].as_str().unwrap_or("");
            match spec["State"].as_str().unwrap_or("") {
                "passed" => s.passed.push(name),
                "skipped" if why.is_empty() => {}
                "skipped" => s
                    .skipped
                    .push((name, why.lines().next().unwrap_or("").into())),
                "pending" => {}
                other => s.failed.push(format!("{name} ({other})")),
            }
        }
    }
    Ok(s)
}

pub struct Options {
    /// Regular expressions, any of which selects a test.
    pub focus: Vec<String>,
    /// Where the log and reports go.
    pub out: PathBuf,
}

/// The names of the tests `focus` selects (less `NOT_HERE`), as ginkgo's
/// dry run lists them: what a run of that focus must have run.
pub fn select(lab: &Lab, focus: &[String], out: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(out)?;
    let report = out.join("dry-run.json");
    let _ = std::fs::remove_file(&report);
    let mut c = e2e(lab, focus, out, &report)?;
    c.arg("--ginkgo.dry-run");
    let log = out.join("dry-run.log");
    let status = c
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::null())
        .status()
        .context("running e2e.test --ginkgo.dry-run")?;
    if !report.exists() {
        bail!(
            "e2e.test --ginkgo.dry-run ({status}) wrote no report; its log: {}",
            log.display()
        );
    }
    // A dry run reports every selected spec as passed.
    Ok(summarize(&report)?.passed)
}

/// e2e.test from the control plane's namespace against `lab`, with `focus`
/// and `NOT_HERE` skipped, writing its JSON report to `report`.
fn e2e(lab: &Lab, focus: &[String], out: &Path, report: &Path) -> Result<Command> {
    let cp = lab.control_plane()?;
    let skip: Vec<&str> = NOT_HERE.iter().map(|(re, _)| *re).collect();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &cp.ns])
        .arg(cp.bin.join("e2e.test"))
        .arg("--provider=skeleton")
        .arg(format!("--kubeconfig={}", cp.admin_kubeconfig().display()))
        .arg(format!(
            "--kubectl-path={}",
            cp.bin.join("kubectl").display()
        ))
        .arg(format!("--report-dir={}", out.display()))
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .arg(format!("--ginkgo.skip={}", skip.join("|")))
        .args([
            "--ginkgo.no-color",
            "--ginkgo.timeout=3h",
            "--disable-log-dump",
        ]);
    for f in focus {
        c.arg(format!("--ginkgo.focus={f}"));
    }
    c.current_dir(out);
    Ok(c)
}

/// Runs e2e.test from the control plane's namespace against `lab`, its
/// output to `out/e2e.log`.
pub fn run(lab: &Lab, opts: &Options) -> Result<Summary> {
    std::fs::create_dir_all(&opts.out)?;
    let report = opts.out.join("report.json");
    let _ = std::fs::remove_file(&report);
    let mut c = e2e(lab, &opts.focus, &opts.out, &report)?;
    let log = std::fs::File::create(opts.out.join("e2e.log"))?;
    let status = c
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running e2e.test")?;
    if !report.exists() {
        bail!(
            "e2e.test ({status}) wrote no report; its log: {}",
            opts.out.join("e2e.log").display()
        );
    }
    summarize(&report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtered_specs_are_not_counted_and_self_skips_are() {
        let dir = std::env::temp_dir().join(format!("tunmesh-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let report = dir.join("report.json");
        let spec = |state: &str, text: &str, why: Option<&str>| {
            let mut v = serde_json::json!({
                "LeafNodeType": "It", "State": state, "LeafNodeText": text,
                "ContainerHierarchyTexts": ["[sig-network] Networking", "Granular Checks: Pods"],
            });
            if let Some(w) = why {
                v["Failure"] = serde_json::json!({"Message": w});
            }
            v
        };
        let suites = serde_json::json!([{ "SpecReports": [
            {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
            spec("passed", "http", None),
            spec("failed", "udp", Some("timed out")),
            spec("skipped", "filtered out", None),
            spec("skipped", "sctp", Some("Skipping SCTP node to pod test\nmore")),
        ]}]);
        std::fs::write(&report, suites.to_string()).unwrap();
        let s = summarize(&report).unwrap();
        assert_eq!(
            s.passed,
            ["[sig-network] Networking Granular Checks: Pods http"]
        );
        assert_eq!(s.failed.len(), 1);
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].1, "Skipping SCTP node to pod test");
        assert_eq!(s.line(), "conformance: 1 passed, 1 failed, 1 skipped");
        std::fs::write(&report, "{").unwrap();
        assert!(summarize(&report)
            .unwrap_err()
            .to_string()
            .contains("parsing"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
