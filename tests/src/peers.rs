//! Tunnel endpoints started inside a namespace, for tests and the bench: a
//! tunmesh router with a one-peer mesh file, or a userspace WireGuard daemon
//! (wireguard-go, boringtun-cli) configured with `wg` as an operator would.
//! Each returns its running process; on failure it stops what it started.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tunmesh_keygen::PublicKey;

use crate::lab::find_binary;
use crate::netns::{self, exec, ip};

/// WireGuard port of every endpoint started here.
pub const WG_PORT: u16 = 51820;

/// One side of a two-node tunnel.
pub struct Side<'a> {
    pub ns: &'a str,
    pub key_file: &'a Path,
    /// Address (CIDR) of this side: tunmesh's pod CIDR, or the address put
    /// on the daemon's interface.
    pub own: &'a str,
    pub peer_key: PublicKey,
    pub peer_endpoint: &'a str,
    /// The peer's allowed IPs (and, for a daemon, a route through it).
    pub peer_cidr: &'a str,
}

/// Waits until the router `pid` has written its first status to
/// `state_dir`; on failure the error carries the end of its log.
pub fn wait_router(name: &str, pid: u32, state_dir: &Path, log: &Path) -> Result<()> {
    let ready = netns::wait_for(Duration::from_secs(20), || {
        if !netns::is_running(pid) {
            return Some(false);
        }
        state_dir
            .join(tunmesh_router::status::STATUS_FILE)
            .exists()
            .then_some(true)
    });
    if ready != Some(true) {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        bail!(
            "router of {name} did not come up; last log lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

fn stop(mut child: Child) {
    netns::stop_pid(child.id(), Duration::from_secs(3));
    let _ = child.wait();
}

/// Starts a tunmesh router for `side` with its files under `dir/<tag>-*`
/// and waits until it is up. Returns it and its state directory.
pub fn start_router(
    side: &Side,
    dir: &Path,
    tag: &str,
    extra: &[&str],
) -> Result<(Child, PathBuf)> {
    let mesh = dir.join(format!("{tag}-mesh.toml"));
    std::fs::write(
        &mesh,
        format!(
            "[node]\nprivate_key_file = \"{}\"\nlisten_port = {WG_PORT}\npod_cidrs = [\"{}\"]\n\n\
             [[peer]]\nname = \"peer\"\npublic_key = \"{}\"\nendpoint = \"{}\"\nallowed_ips = [\"{}\"]\n",
            side.key_file.display(),
            side.own,
            side.peer_key,
            side.peer_endpoint,
            side.peer_cidr
        ),
    )?;
    let state = dir.join(format!("{tag}-state"));
    let _ = std::fs::remove_dir_all(&state);
    let log = dir.join(format!("{tag}-router.log"));
    let mut args = vec![
        "--mesh-file".to_string(),
        mesh.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        // Its own API socket directory: /var/run/wireguard is shared by all
        // namespaces, and both ends call their device tunmesh0.
        "--uapi-dir".into(),
        dir.join(format!("{tag}-uapi")).display().to_string(),
        // Never the host's /etc/cni/net.d: a runtime there would pick it up.
        "--cni-conf-dir".into(),
        String::new(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let router = find_binary("tunmesh-router", "TUNMESH_ROUTER_BIN")?;
    let child = netns::spawn(side.ns, &router, &args, &[("RUST_LOG", "info")], &log)?;
    match wait_router(side.ns, child.id(), &state, &log) {
        Ok(()) => Ok((child, state)),
        Err(e) => {
            stop(child);
            Err(e)
        }
    }
}

/// Starts `bin ARGS... IFNAME` (wireguard-go or boringtun-cli) in
/// `side.ns`, then configures it with `wg set`, puts `side.own` on the
/// interface with MTU 1420 and routes `side.peer_cidr` through it.
pub fn start_wg(side: &Side, bin: &Path, args: &[&str], ifname: &str, log: &Path) -> Result<Child> {
    let sock = Path::new("/var/run/wireguard").join(format!("{ifname}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut argv = args.to_vec();
    argv.push(ifname);
    let child = netns::spawn(side.ns, bin, &argv, &[("LOG_LEVEL", "error")], log)
        .with_context(|| format!("starting {}", bin.display()))?;
    let configured = (|| -> Result<()> {
        if netns::wait_for(Duration::from_secs(10), || sock.exists().then_some(())).is_none() {
            bail!("{} did not create {}", bin.display(), sock.display());
        }
        let key = side.key_file.display().to_string();
        let port = WG_PORT.to_string();
        let peer = side.peer_key.to_base64();
        exec(
            side.ns,
            "wg",
            &[
                "set",
                ifname,
                "listen-port",
                &port,
                "private-key",
                &key,
                "peer",
                &peer,
                "allowed-ips",
                side.peer_cidr,
                "endpoint",
                side.peer_endpoint,
            ],
        )?;
        ip(&["-n", side.ns, "addr", "add", side.own, "dev", ifname])?;
        ip(&["-n", side.ns, "link", "set", ifname, "mtu", "1420", "up"])?;
        // NB: `replace`: the interface address may already make this route.
        ip(&[
            "-n",
            side.ns,
            "route",
            "replace",
            side.peer_cidr,
            "dev",
            ifname,
        ])
    })();
    match configured {
        Ok(()) => Ok(child),
        Err(e) => {
            stop(child);
            Err(e)
        }
    }
}
