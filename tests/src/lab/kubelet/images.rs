//! The images every real node holds (no registry is reachable): the
//! node images `scripts/node-images.sh` builds and tunmesh's from
//! `scripts/build-image.sh`, imported into each node's containerd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::node::node_run;
use super::*;
use crate::lab::*;

/// Imports an image archive into the node's containerd, where the CRI
/// finds it (namespace k8s.io).
pub(super) fn import_image(ns: &str, kn: &KubeletNode, archive: &Path) -> Result<()> {
    let sock = "/run/containerd/containerd.sock";
    let archive = archive.to_string_lossy();
    node_run(
        ns,
        kn,
        &[
            "ctr", "-a", sock, "-n", "k8s.io", "images", "import", &archive,
        ],
    )?;
    Ok(())
}

impl Lab {
    /// The node images (from `scripts/node-images.sh`) and the tunmesh
    /// image (from `scripts/build-image.sh`, with the binaries this lab
    /// runs), as archive paths.
    pub(super) fn build_images(&self, bin: &Path) -> Result<Vec<PathBuf>> {
        let scripts = controlplane::deploy_dir().join("../scripts");
        let out = Command::new("bash")
            .arg(scripts.join("node-images.sh"))
            .arg(bin)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/node-images.sh")?;
        if !out.status.success() {
            bail!("scripts/node-images.sh failed (see its messages above)");
        }
        let set = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let mut images: Vec<PathBuf> = NODE_IMAGES.iter().map(|n| set.join(n)).collect();
        let tunmesh = self.state.dir.join(TUNMESH_IMAGE_FILE);
        let bin_dir = self
            .state
            .router_bin
            .parent()
            .context("the router binary has no directory")?;
        build_image(&tunmesh_image()?, &tunmesh, bin_dir)?;
        images.push(tunmesh);
        for p in &images {
            if !p.is_file() {
                bail!("image archive {} is missing", p.display());
            }
        }
        Ok(images)
    }

    /// Builds a tunmesh image named `tag` from the binaries in `bin_dir`
    /// (`scripts/build-image.sh`) and imports it into every real node's
    /// containerd: another version to roll out to.
    pub fn add_tunmesh_image(&self, tag: &str, bin_dir: &Path) -> Result<()> {
        let file = self.state.dir.join(format!(
            "tunmesh-image-{}.tar",
            tag.replace([':', '/'], "-")
        ));
        build_image(tag, &file, bin_dir)?;
        for n in &self.state.nodes {
            if let Some(kn) = &n.kubelet {
                import_image(&n.ns, kn, &file)
                    .with_context(|| format!("importing {tag} into {}", n.name))?;
            }
        }
        Ok(())
    }
}

/// `scripts/build-image.sh`: the tunmesh image named `tag` from the
/// binaries in `bin_dir`, written as an archive to `out`.
fn build_image(tag: &str, out: &Path, bin_dir: &Path) -> Result<()> {
    let scripts = controlplane::deploy_dir().join("../scripts");
    let status = Command::new("bash")
        .arg(scripts.join("build-image.sh"))
        .args(["--tag", tag, "--output"])
        .arg(out)
        .arg("--bin-dir")
        .arg(bin_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running scripts/build-image.sh")?;
    if !status.success() {
        bail!("scripts/build-image.sh --tag {tag} failed (see its messages above)");
    }
    Ok(())
}
