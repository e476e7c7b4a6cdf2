//! What runs on the real nodes: tunmesh installed as operators install
//! it (`kubectl apply -k deploy/`), CoreDNS, the test pods, and the
//! connectivity matrix over them.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::controlplane;
use crate::lab::*;

const COREDNS_YAML: &str = include_str!("../../../manifests/coredns.yaml");
const WEB_YAML: &str = include_str!("../../../manifests/web.yaml");

impl Lab {
    /// `kubectl apply -k deploy/`, then the DaemonSet's rollout.
    pub fn install_tunmesh(&self) -> Result<()> {
        let deploy = controlplane::deploy_dir();
        self.kubectl(&["apply", "-k", &deploy.to_string_lossy()])?;
        self.rollout("tunmesh", "daemonset/tunmesh", Duration::from_secs(180))
    }

    pub(super) fn install_coredns(&self) -> Result<()> {
        let cp = self.control_plane()?;
        cp.kubectl_stdin(&["apply", "-f", "-"], COREDNS_YAML)
            .context("applying tests/manifests/coredns.yaml")?;
        Ok(())
    }

    /// `kubectl rollout status` with a deadline; on failure, what the
    /// pods say.
    pub fn rollout(&self, namespace: &str, what: &str, timeout: Duration) -> Result<()> {
        let t = format!("--timeout={}s", timeout.as_secs());
        if let Err(e) = self.kubectl(&["rollout", "status", "-n", namespace, what, &t]) {
            let pods = self
                .kubectl(&["get", "pods", "-n", namespace, "-o", "wide"])
                .unwrap_or_default();
            let events = self
                .kubectl(&["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"])
                .unwrap_or_default();
            let tail: Vec<&str> = events.lines().rev().take(15).collect();
            bail!(
                "{what} in {namespace} did not roll out: {e}\n{pods}\nlast events:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// The test pods: `replicas` agnhost netexec pods spread over the nodes
    /// by the scheduler.
    pub fn start_web(&self, replicas: usize) -> Result<()> {
        let cp = self.control_plane()?;
        cp.kubectl_stdin(
            &["apply", "-f", "-"],
            &WEB_YAML.replace("REPLICAS", &replicas.to_string()),
        )
        .context("applying tests/manifests/web.yaml")?;
        self.rollout("default", "deployment/web", Duration::from_secs(180))
    }

    /// The running pods of label `selector` in `namespace`: (name, node,
    /// IPs).
    pub fn kube_pods(&self, namespace: &str, selector: &str) -> Result<Vec<KubePod>> {
        let out = self.kubectl(&["get", "pods", "-n", namespace, "-l", selector, "-o", "json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("parsing kubectl's pod list")?;
        let mut pods = Vec::new();
        for p in v["items"].as_array().context("no items in the pod list")? {
            if p["status"]["phase"] != "Running" {
                continue;
            }
            pods.push(KubePod {
                name: p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                node: p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ips: p["status"]["podIPs"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|i| i["ip"].as_str()?.parse::<IpAddr>().ok())
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Ok(pods)
    }
}

/// A pod as the API server reports it.
#[derive(Debug, Clone)]
pub struct KubePod {
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
}

impl KubePod {
    /// The pod's address of the same family as `other`.
    pub fn ip_like(&self, other: &IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|i| i.is_ipv4() == other.is_ipv4())
    }
}

/// One HTTP request of the connectivity matrix: from a pod (by
/// `kubectl exec`) or a node (from its namespace) to a pod's address,
/// and the client address netexec saw (`None`: no answer).
#[derive(Debug, Clone)]
pub struct KubePath {
    pub from: String,
    /// The sender's own address of the target's family, for a pod sender.
    pub from_ip: Option<IpAddr>,
    pub to: String,
    pub ip: IpAddr,
    pub seen: Option<IpAddr>,
}

impl KubePath {
    /// Answered, and (from a pod) with the pod's own address: no NAT.
    pub fn ok(&self) -> bool {
        match (self.seen, self.from_ip) {
            (Some(seen), Some(own)) => seen == own,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

fn url(ip: &IpAddr, port: u16, path: &str) -> String {
    match ip {
        IpAddr::V4(a) => format!("http://{a}:{port}{path}"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}{path}"),
    }
}

/// A shell loop asking every address for `/clientip`: one line per
/// target, `TARGET SEEN` (SEEN empty when nothing answered).
fn clientip_script(targets: &[IpAddr]) -> String {
    let mut s = String::new();
    for t in targets {
        s += &format!(
            "printf '%s %s\\n' {t} \"$(curl -s -m 3 {})\"; ",
            url(t, 8080, "/clientip")
        );
    }
    s
}

/// Parses `TARGET SEEN` lines; SEEN is `ip:port` or `[ip]:port`.
fn parse_clientip(out: &str) -> Vec<(IpAddr, Option<IpAddr>)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let target: IpAddr = w.next()?.parse().ok()?;
            let seen = w.next().and_then(|s| {
                let host = s.rsplit_once(':')?.0;
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            });
            Some((target, seen))
        })
        .collect()
}

impl Lab {
    /// `kubectl exec POD -- sh -c SCRIPT` in the default namespace.
    pub fn kube_exec(&self, pod: &str, script: &str) -> Result<String> {
        self.kubectl(&["exec", pod, "--", "sh", "-c", script])
    }

    /// Every pod to every other pod's every address, and every node to
    /// every pod's every address, over HTTP.
    pub fn kube_matrix(&self, pods: &[KubePod]) -> Result<Vec<KubePath>> {
        let mut paths = Vec::new();
        let name_of = |ip: &IpAddr| {
            pods.iter()
                .find(|p| p.ips.contains(ip))
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        for src in pods {
            let targets: Vec<IpAddr> = pods
                .iter()
                .filter(|p| p.name != src.name)
                .flat_map(|p| p.ips.clone())
                .collect();
            let out = self.kube_exec(&src.name, &clientip_script(&targets))?;
            let got = parse_clientip(&out);
            for t in targets {
                paths.push(KubePath {
                    from: src.name.clone(),
                    from_ip: src.ip_like(&t),
                    to: name_of(&t),
                    ip: t,
                    seen: got.iter().find(|(g, _)| *g == t).and_then(|(_, s)| *s),
                });
            }
        }
        let all: Vec<IpAddr> = pods.iter().flat_map(|p| p.ips.clone()).collect();
        for n in &self.state.nodes {
            let out = netns::exec(&n.ns, "sh", &["-c", &clientip_script(&all)])?;
            let got = parse_clientip(&out);
            for t in &all {
                paths.push(KubePath {
                    from: n.name.clone(),
                    from_ip: None,
                    to: name_of(t),
                    ip: *t,
                    seen: got.iter().find(|(g, _)| g == t).and_then(|(_, s)| *s),
                });
            }
        }
        Ok(paths)
    }
}

/// The failed paths of a matrix, one per line.
pub fn failed_paths(paths: &[KubePath]) -> String {
    paths
        .iter()
        .filter(|p| !p.ok())
        .map(|p| {
            format!(
                "{} -> {} {}: {}",
                p.from,
                p.to,
                p.ip,
                match p.seen {
                    None => "no answer".to_string(),
                    Some(s) => format!("seen from {s}, not {:?} (NAT)", p.from_ip),
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clientip_lines_parse_for_both_families_and_no_answer() {
        let out =
            "10.244.1.3 10.244.0.3:40112\nfd00:10:244:1::3 [fd00:10:244::3]:51000\n10.244.2.3 \n";
        let got = parse_clientip(out);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].1, Some("10.244.0.3".parse().unwrap()));
        assert_eq!(got[1].1, Some("fd00:10:244::3".parse().unwrap()));
        assert_eq!(got[2].1, None);
        let script = clientip_script(&["fd00::1".parse().unwrap()]);
        assert!(
            script.contains("http://[fd00::1]:8080/clientip"),
            "{script}"
        );
    }
}
