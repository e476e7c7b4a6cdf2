//! The peers the bench compares against (`scripts/install-anchors.sh`):
//! where they are, which are missing, and their versions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

/// The first line a command prints, or "" if it cannot run.
pub(super) fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The installed Debian package's version (`dpkg-query`), or "".
pub(super) fn deb_version(package: &str) -> String {
    first_line("dpkg-query", &["-W", "-f", "${Version}", package])
}

/// What to say about each peer's version: the package a binary came from,
/// not what it prints of itself (wireguard-go says v0.0.20230223 for code
/// of 2023-12).
pub(super) fn versions(anchors: &Path, bins: &BTreeMap<&str, PathBuf>) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let or_unknown = |s: String, what: &str| {
        if s.is_empty() {
            format!("unknown ({what})")
        } else {
            s
        }
    };
    v.insert(
        "iperf3".into(),
        or_unknown(
            format!(
                "Debian package {} ({})",
                deb_version("iperf3"),
                first_line("iperf3", &["--version"])
            ),
            "iperf3",
        ),
    );
    v.insert(
        "wggo".into(),
        match deb_version("wireguard-go") {
            s if s.is_empty() => "unknown (no Debian package wireguard-go)".into(),
            s => format!("Debian package wireguard-go {s}"),
        },
    );
    if bins.get("wggo_new").is_some_and(|b| b.exists()) {
        let recorded =
            std::fs::read_to_string(anchors.join("wireguard-go-new.version")).unwrap_or_default();
        v.insert(
            "wggo_new".into(),
            match recorded.trim() {
                "" => format!(
                    "unknown (no {}; reinstall with {INSTALL_COMMAND})",
                    anchors.join("wireguard-go-new.version").display()
                ),
                s => format!("Debian package wireguard-go {s} (trixie)"),
            },
        );
    }
    if bins.get("boringtun").is_some_and(|b| b.exists()) {
        // cargo install's own record of what it installed.
        let crates =
            std::fs::read_to_string(anchors.join("boringtun/.crates.toml")).unwrap_or_default();
        let crate_version = crates
            .lines()
            .find_map(|l| l.trim().strip_prefix("\"boringtun-cli "))
            .and_then(|r| r.split_whitespace().next())
            .map(|s| format!("crate boringtun-cli {s}"));
        v.insert(
            "boringtun".into(),
            crate_version.unwrap_or_else(|| "unknown (no cargo install record)".into()),
        );
    }
    v.insert(
        "tunmesh".into(),
        format!("tunmesh-router {}", env!("CARGO_PKG_VERSION")),
    );
    v
}

/// The peers' binaries, by config.
pub(super) fn peer_bins(anchors: &Path) -> BTreeMap<&'static str, PathBuf> {
    [
        ("wggo", PathBuf::from("/usr/bin/wireguard-go")),
        ("wggo_new", anchors.join("wireguard-go-new")),
        ("boringtun", anchors.join("boringtun-cli")),
    ]
    .into_iter()
    .collect()
}

/// The requested peers whose binaries are not there.
pub(super) fn absent<'a>(configs: &'a [String], bins: &BTreeMap<&str, PathBuf>) -> Vec<&'a str> {
    configs
        .iter()
        .map(String::as_str)
        .filter(|c| bins.get(c).is_some_and(|b| !b.exists()))
        .collect()
}

/// The checkout's install script, if this binary was built from one.
pub(super) fn install_script() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join(INSTALL_COMMAND);
    p.is_file().then_some(p)
}

/// Installs missing peers with the checkout's script (when asked and it is
/// there); what is still missing afterwards is returned with why.
pub(super) fn resolve_peers(opts: &BenchOptions) -> BTreeMap<String, String> {
    let bins = peer_bins(&opts.anchors);
    let mut need = absent(&opts.configs, &bins);
    if !need.is_empty() && opts.install {
        match install_script() {
            Some(script) => {
                eprintln!(
                    "bench: {} missing; installing with {}",
                    need.join(", "),
                    script.display()
                );
                let ok = std::process::Command::new(&script)
                    .env("TUNMESH_ANCHORS", &opts.anchors)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    eprintln!("bench: {} failed", script.display());
                }
            }
            None => eprintln!(
                "bench: {} missing and no checkout to install from: run {INSTALL_COMMAND} from a tunmesh checkout (as root)",
                need.join(", ")
            ),
        }
        need = absent(&opts.configs, &bins);
    }
    need.into_iter()
        .map(|c| {
            (
                c.to_string(),
                format!(
                    "{} not found; install with `{INSTALL_COMMAND}` (as root, from the tunmesh checkout){}",
                    bins[c].display(),
                    if opts.install { "" } else { ", or drop --no-install" }
                ),
            )
        })
        .collect()
}
