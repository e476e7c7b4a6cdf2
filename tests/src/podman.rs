//! Debian's podman as the tests' container runtime: its own storage,
//! configuration and state under the lab's directory (nothing else on the
//! machine changes), run in a node's network namespace with
//! `nsenter --net`, so it keeps the host's /sys and cgroups, which
//! `ip netns exec` would hide. runc, not crun (crun refuses this machine's
//! hybrid cgroups); CNI networks from the node's tunmesh conflist, with
//! the reference portmap chained (as the DaemonSet installs it).

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::lab::{find_binary, Lab, NodeInfo};

pub struct Podman {
    ns: String,
    dir: PathBuf,
}

impl Podman {
    /// A podman for `node` of `lab`, with its files in the lab's directory.
    pub fn new(lab: &Lab, node: &NodeInfo) -> Podman {
        let dir = lab.state.dir.join(format!("podman-{}", node.name));
        for d in ["root", "run", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).expect("podman directories");
        }
        let plugin_dir = find_binary("tunmesh-cni", "TUNMESH_CNI_BIN")
            .expect("tunmesh-cni")
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        // portmap under tunmesh's name, as the DaemonSet installs it.
        let chained = dir.join("cni-bin");
        std::fs::create_dir_all(&chained).expect("podman's CNI directory");
        let link = chained.join(tunmesh_contract::nodestate::PORTMAP_TYPE);
        if !link.exists() {
            let portmap = crate::portmap_bin().expect("portmap");
            std::os::unix::fs::symlink(portmap, &link).expect("linking portmap");
        }
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"{}\"]\nnetwork_config_dir = \"{}\"\n\
             [containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\n",
            plugin_dir.display(),
            chained.display(),
            node.state_dir.with_file_name("cni-conf").display(),
            dir.join("events.log").display(),
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("containers.conf");
        Podman {
            ns: node.ns.clone(),
            dir,
        }
    }

    /// `podman ARGS` in the node's network namespace.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg("podman")
            .arg(format!("--root={}", self.dir.join("root").display()))
            .arg(format!("--runroot={}", self.dir.join("run").display()))
            .arg(format!("--tmpdir={}", self.dir.join("tmp").display()))
            .arg("--storage-driver=vfs")
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .expect("running podman")
    }

    /// `podman run --rm` of `cmd` on the tunmesh network, root file system `root`.
    pub fn run_once(&self, root: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--network", "tunmesh", "--rootfs", root];
        args.extend_from_slice(cmd);
        self.run(&args)
    }

    /// `podman ARGS`, which must succeed; its trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers live in namespaces of their own that the lab's
        // teardown does not know; remove them here whatever happened.
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
    }
}
