//! Each node's router: its command line and environment, starting and
//! stopping it, and waiting for it to be up and ready.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::*;
use crate::netns::{self};

impl Lab {
    /// Waits until node `i`'s router has its pod CIDRs and published its
    /// key; records the key.
    pub fn wait_node_ready(&mut self, i: usize) -> Result<()> {
        let n = self.state.nodes[i].clone();
        let key = netns::wait_for(Duration::from_secs(60), || {
            let st = tunmesh_contract::NodeState::read(&n.state_dir).ok()?;
            if !st.pod_cidrs.iter().any(|c| c.to_string() == n.pod_cidr_v4) {
                return None;
            }
            let status = tunmesh_router::status::Status::read(&n.state_dir).ok()?;
            // The status snapshot too, so that what `up` prints and what
            // `tunmesh-ctl status` shows right after agree.
            status
                .pod_cidrs
                .contains(&n.pod_cidr_v4)
                .then_some(status.public_key)
        })
        .with_context(|| {
            format!(
                "{}'s router did not take its podCIDR {} within 60 s; its log: {}",
                n.name,
                n.pod_cidr_v4,
                n.log.display()
            )
        })?;
        self.state.nodes[i].public_key = key;
        self.save()
    }

    /// The mesh file of node `i` (0-based): every other node is a peer,
    /// except `without` (for tests that remove a peer).
    pub fn mesh_file_text(&self, i: usize, without: Option<usize>) -> String {
        let n = &self.state.nodes[i];
        let mut s = format!(
            "# tunmesh lab {id}, {name}\n[node]\nprivate_key_file = \"{key}\"\nlisten_port = {WG_PORT}\n\
             pod_cidrs = [\"{v4}\", \"{v6}\"]\ncluster_cidrs = [\"{CLUSTER_V4}\", \"{CLUSTER_V6}\"]\n",
            id = self.state.id,
            name = n.name,
            key = n.mesh_file.with_file_name("private.key").display(),
            v4 = n.pod_cidr_v4,
            v6 = n.pod_cidr_v6,
        );
        for (k, p) in self.state.nodes.iter().enumerate() {
            if k == i || Some(k) == without {
                continue;
            }
            s += &format!(
                "\n[[peer]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}:{WG_PORT}\"\nallowed_ips = [\"{}\", \"{}\"]\nnode_addresses = [\"{}\"]\n",
                p.name, p.public_key, p.underlay_ip, p.pod_cidr_v4, p.pod_cidr_v6, p.underlay_ip
            );
        }
        s
    }

    /// Starts node `i`'s router (0-based) with the lab's router binary and
    /// arguments, and records its PID.
    pub fn start_router(&mut self, i: usize) -> Result<()> {
        let extra = self.state.router_args.clone();
        self.start_router_with(i, &extra)
    }

    /// Starts node `i`'s router with `extra` arguments instead of the lab's.
    pub fn start_router_with(&mut self, i: usize, extra: &[String]) -> Result<()> {
        let invocation = self.router_invocation(i, extra)?;
        self.spawn_router(i, &invocation)
    }

    /// Starts node `i`'s router with an invocation made beforehand by
    /// `router_invocation` (a restart measured from a fault spawns at once,
    /// without reading the ConfigMap first).
    pub fn spawn_router(&mut self, i: usize, invocation: &(Vec<String>, Env)) -> Result<()> {
        let bin = self.state.router_bin.clone();
        self.spawn_router_as(i, &bin, invocation, &[])
    }

    /// Starts `bin` as node `i`'s router (the test build with faults, say)
    /// with `invocation` and `extra_env` besides; records its PID.
    pub fn spawn_router_as(
        &mut self,
        i: usize,
        bin: &std::path::Path,
        (args, env): &(Vec<String>, Env),
        extra_env: &[(&str, &str)],
    ) -> Result<()> {
        let n = &self.state.nodes[i];
        // A previous run's status would look like this one's.
        let _ = std::fs::remove_file(n.state_dir.join(tunmesh_router::status::STATUS_FILE));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut env: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.extend_from_slice(extra_env);
        let child = netns::spawn(&n.ns, bin, &args, &env, &n.log)?;
        self.state.nodes[i].router_pid = Some(child.id());
        self.save()
    }

    /// The router built for tests with handover faults
    /// (`tunmesh-router-faults`), next to the lab's router.
    pub fn faults_bin(&self) -> std::path::PathBuf {
        self.state
            .router_bin
            .with_file_name("tunmesh-router-faults")
    }

    /// The arguments and environment node `i`'s router runs with: its own
    /// paths and names, then `extra`. Every path in them is under the lab's
    /// directory.
    pub fn router_invocation(&self, i: usize, extra: &[String]) -> Result<(Vec<String>, Env)> {
        let n = &self.state.nodes[i];
        let state = n.state_dir.display().to_string();
        let cni_conf = n.state_dir.with_file_name("cni-conf").display().to_string();
        // Per-node paths and names (many nodes share this machine); the
        // interface overrides the ConfigMap's, which every node would share.
        let mut args: Vec<String> = vec![
            "--interface".into(),
            n.interface.clone(),
            "--state-dir".into(),
            state,
            "--cni-conf-dir".into(),
            cni_conf,
        ];
        // In a Kubernetes lab, the rest comes as the DaemonSet gives it:
        // NODE_NAME and the ConfigMap from deploy/ as environment.
        let mut env: Env = Vec::new();
        match (&n.kubeconfig, &self.state.control_plane) {
            (Some(kc), Some(cp)) => {
                env = cp.router_env()?;
                env.push(("NODE_NAME".into(), n.name.clone()));
                args.extend(["--kubeconfig".into(), kc.display().to_string()]);
            }
            _ => args.extend([
                "--mtu".into(),
                MTU.to_string(),
                "--mesh-file".into(),
                n.mesh_file.display().to_string(),
            ]),
        }
        args.extend(extra.iter().cloned());
        Ok((args, env))
    }

    /// Stops node `i`'s router (SIGTERM) and waits for it to exit.
    pub fn stop_router(&mut self, i: usize) -> Result<()> {
        if let Some(pid) = self.state.nodes[i].router_pid.take() {
            netns::stop_pid(pid, Duration::from_secs(5));
        }
        self.save()
    }

    /// SIGKILLs node `i`'s router (a crash) and waits until it is gone.
    pub fn kill_router(&mut self, i: usize) -> Result<()> {
        let pid = self.state.nodes[i]
            .router_pid
            .take()
            .context("no router running")?;
        // SAFETY: signalling a router this lab started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        netns::wait_exit(pid, Duration::from_secs(5))
            .with_context(|| format!("router {pid} still there 5 s after SIGKILL"))?;
        self.save()
    }

    /// Waits until node `i`'s router has written its first status.
    pub fn wait_router(&self, i: usize) -> Result<()> {
        let n = &self.state.nodes[i];
        crate::peers::wait_router(&n.name, n.router_pid.unwrap_or(0), &n.state_dir, &n.log)
    }

    /// The current status snapshot of a node's router.
    pub fn router_status(&self, node: &str) -> Result<tunmesh_router::status::Status> {
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        Ok(tunmesh_router::status::Status::read(&n.state_dir)?)
    }

    /// A status snapshot taken after now (they are written every second),
    /// so counters read from it include everything done so far.
    pub fn fresh_status(&self, node: &str) -> Result<tunmesh_router::status::Status> {
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        let path = n.state_dir.join(tunmesh_router::status::STATUS_FILE);
        let modified = || std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        // Twice: the first rewrite may have begun before the call.
        for _ in 0..2 {
            let before = modified();
            netns::wait_for(Duration::from_secs(5), || {
                (modified() != before).then_some(())
            })
            .with_context(|| format!("{}: not rewritten within 5 s", path.display()))?;
        }
        self.router_status(node)
    }

    pub fn wait_status(
        &self,
        node: &str,
        timeout: Duration,
        mut pred: impl FnMut(&tunmesh_router::status::Status) -> bool,
    ) -> Option<tunmesh_router::status::Status> {
        netns::wait_for(timeout, || {
            self.router_status(node).ok().filter(|s| pred(s))
        })
    }

    /// Sends SIGHUP to node `node`'s router (reload its mesh file).
    pub fn reload(&self, node: &str) -> Result<()> {
        let pid = self
            .node(node)
            .and_then(|n| n.router_pid)
            .context("router not running")?;
        // SAFETY: signalling a process this lab started.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) } != 0 {
            bail!(
                "signalling router of {node}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}
