//! The lab's record on disk (`lab.json`), lookups by short name, and
//! teardown of everything a lab made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::*;
use crate::netns::{self, exec};

impl Lab {
    pub(super) fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.state)?;
        let path = self.state.dir.join("lab.json");
        let tmp = self.state.dir.join("lab.json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Loads lab `id`, or the newest lab under `root` when `id` is `None`.
    pub fn load(root: &Path, id: Option<&str>) -> Result<Lab> {
        let dir = match id {
            Some(id) => root.join(id),
            None => {
                let mut labs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(root)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .filter(|e| e.path().join("lab.json").exists())
                            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                            .collect()
                    })
                    .unwrap_or_default();
                labs.sort();
                match labs.pop() {
                    Some((_, d)) => d,
                    None => bail!(
                        "no lab is running (none under {}); start one with `tunmesh-lab up`",
                        root.display()
                    ),
                }
            }
        };
        let path = dir.join("lab.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let state: LabState =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Lab { state, keep: true })
    }

    /// All labs under `root`.
    pub fn list(root: &Path) -> Vec<String> {
        std::fs::read_dir(root)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("lab.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Leave the lab running when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The namespace behind a short name (`node-1`, `node-1-pod-2`, `underlay`).
    pub fn resolve(&self, name: &str) -> Result<String> {
        if name == "underlay" {
            return Ok(self.state.underlay_ns.clone());
        }
        if let Some(n) = self.state.nodes.iter().find(|n| n.name == name) {
            return Ok(n.ns.clone());
        }
        if let Some(p) = self.state.pods.iter().find(|p| p.name == name) {
            return Ok(p.ns.clone());
        }
        if let (Some(cp), "control-plane") = (&self.state.control_plane, name) {
            return Ok(cp.ns.clone());
        }
        let mut names: Vec<&str> = self.state.nodes.iter().map(|n| n.name.as_str()).collect();
        names.extend(self.state.pods.iter().map(|p| p.name.as_str()));
        if self.state.control_plane.is_some() {
            names.push("control-plane");
        }
        bail!(
            "no node or pod named {name:?} in lab {} (have: underlay, {})",
            self.state.id,
            names.join(", ")
        )
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.state.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, name: &str) -> Option<&PodInfo> {
        self.state.pods.iter().find(|p| p.name == name)
    }

    /// Runs a command in a node's or pod's namespace.
    pub fn exec(&self, name: &str, cmd: &str, args: &[&str]) -> Result<String> {
        exec(&self.resolve(name)?, cmd, args)
    }

    /// Removes everything: routers, namespaces, the lab's files.
    pub fn down(mut self) -> Result<()> {
        self.keep = true;
        teardown(&self.state.dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            let _ = teardown(&self.state.dir);
        }
    }
}

/// Removes the lab recorded in `dir`: stops its routers, deletes every
/// namespace carrying its id, removes `dir`. Safe to call twice, and on a
/// lab that was only partly built.
pub fn teardown(dir: &Path) -> Result<()> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("lab directory has no name")?;
    if let Ok(text) = std::fs::read(dir.join("lab.json")) {
        if let Ok(state) = serde_json::from_slice::<LabState>(&text) {
            for n in &state.nodes {
                if let Some(pid) = n.router_pid {
                    netns::stop_pid(pid, Duration::from_secs(3));
                }
                if let Some(kn) = &n.kubelet {
                    super::kubelet::stop_node(kn);
                }
            }
        }
    }
    // Anything else still running inside the lab's namespaces (iperf3,
    // tcpdump...), then the namespaces themselves.
    netns::purge_prefix(&format!("tm{id}-"));
    // API sockets of routers that could not remove their own.
    if let Ok(d) = std::fs::read_dir(tunmesh_router::uapi::SOCKET_DIR) {
        for e in d.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("tm{id}n"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Mounts a container runtime left under the lab's files (podman's
    // shm), deepest first, so the directory can go.
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(dir))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = netns::run("umount", &["-l", m]);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    if current() == Some(dir.to_path_buf()) {
        set_current(None);
    }
    Ok(())
}

static CURRENT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The lab being built or run by this process, for the Ctrl-C handler.
pub fn current() -> Option<PathBuf> {
    CURRENT.lock().map(|c| c.clone()).unwrap_or(None)
}

pub fn set_current(dir: Option<PathBuf>) {
    if let Ok(mut c) = CURRENT.lock() {
        *c = dir;
    }
}
