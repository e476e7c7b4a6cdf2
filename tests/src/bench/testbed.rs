//! The bench's configurations: two namespaces joined by a veth (raw), and
//! a tunnel between them for each implementation measured, its daemons
//! and the CPU they use; the iperf3 arguments of each test.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use tunmesh_keygen::PrivateKey;

use super::*;
use crate::netns::{self, add_netns, exec, veth, Cleanup};
use crate::peers::{self, Side};

pub(super) struct Testbed {
    pub(super) a: String,
    pub(super) b: String,
    pub(super) id: String,
    pub(super) dir: PathBuf,
    pub(super) clean: Cleanup,
}

impl Drop for Testbed {
    /// Whatever still runs in the testbed's namespaces goes with them.
    fn drop(&mut self) {
        netns::purge_prefix(&format!("tm{}-", self.id));
        netns::set_purge_on_signal(None);
    }
}

/// A running tunnel: its daemons, the address iperf3 targets (B's) and
/// A's own, its TUN names.
pub(super) struct Tunnel {
    pub(super) children: Vec<std::process::Child>,
    pub(super) target: String,
    pub(super) source: String,
    pub(super) tuns: [String; 2],
}

impl Testbed {
    pub(super) fn new() -> Result<Self> {
        let id = netns::run_id();
        let mut clean = Cleanup::default();
        let (a, b) = (format!("tm{id}-ba"), format!("tm{id}-bb"));
        netns::set_purge_on_signal(Some(format!("tm{id}-")));
        let dir = std::env::temp_dir().join(format!("tunmesh-bench-{id}"));
        std::fs::create_dir_all(&dir)?;
        clean.files.push(dir.clone());
        for ns in [&a, &b] {
            add_netns(ns)?;
            clean.netns.push(ns.clone());
        }
        veth(&a, "eth0", &b, "eth0")?;
        for (ns, addr) in [(&a, UNDERLAY_A), (&b, UNDERLAY_B)] {
            netns::addr_up(ns, "eth0", &format!("{addr}/24"))?;
        }
        Ok(Testbed {
            a,
            b,
            id,
            dir,
            clean,
        })
    }

    pub(super) fn keys(&self) -> Result<[(PrivateKey, PathBuf); 2]> {
        let mk = |n: &str| -> Result<(PrivateKey, PathBuf)> {
            let k = PrivateKey::generate();
            let p = self.dir.join(format!("{n}.key"));
            k.write_file(&p)?;
            Ok((k, p))
        };
        Ok([mk("a")?, mk("b")?])
    }

    /// The two sides of a tunnel: (A, B) with fresh keys; `a_own`/`b_own`
    /// are each side's address, `a_peer`/`b_peer` what each routes to the other.
    pub(super) fn sides<'a>(
        &'a self,
        keys: &'a [(PrivateKey, PathBuf); 2],
        own: [&'a str; 2],
        peer: [&'a str; 2],
    ) -> [Side<'a>; 2] {
        let [(ka, pa), (kb, pb)] = keys;
        [
            Side {
                ns: &self.a,
                key_file: pa,
                own: own[0],
                peer_key: kb.public_key(),
                peer_endpoint: ENDPOINT_B,
                peer_cidr: peer[0],
            },
            Side {
                ns: &self.b,
                key_file: pb,
                own: own[1],
                peer_key: ka.public_key(),
                peer_endpoint: ENDPOINT_A,
                peer_cidr: peer[1],
            },
        ]
    }

    pub(super) fn start_tunmesh(&mut self) -> Result<Tunnel> {
        let keys = self.keys()?;
        let sides = self.sides(
            &keys,
            ["10.99.1.0/24", "10.99.2.0/24"],
            ["10.99.2.0/24", "10.99.1.0/24"],
        );
        let dir = self.dir.clone();
        let tuns = ["tunmesh0".into(), "tunmesh0".into()];
        self.start_pair(&sides, ["10.99.1.1", "10.99.2.1"], tuns, |i, side| {
            peers::start_router(side, &dir, ["a", "b"][i], &["--mtu", MTU]).map(|(child, _)| child)
        })
    }

    /// wireguard-go or boringtun-cli in both namespaces, configured with `wg`.
    pub(super) fn start_wg(&mut self, bin: &Path, extra: &[&str]) -> Result<Tunnel> {
        let keys = self.keys()?;
        let ifs = [format!("tmw{}a", self.id), format!("tmw{}b", self.id)];
        for ifn in &ifs {
            self.clean
                .files
                .push(Path::new("/var/run/wireguard").join(format!("{ifn}.sock")));
        }
        let sides = self.sides(
            &keys,
            ["10.99.0.1/24", "10.99.0.2/24"],
            ["10.99.0.2/32", "10.99.0.1/32"],
        );
        let dir = self.dir.clone();
        let names = ifs.clone();
        self.start_pair(&sides, ["10.99.0.1", "10.99.0.2"], ifs, |i, side| {
            peers::start_wg(
                side,
                bin,
                extra,
                &names[i],
                &dir.join(format!("{}.log", names[i])),
            )
        })
    }

    /// Starts both ends with `start`, then checks that traffic crosses the
    /// tunnel (which also completes the handshake). Whatever was started is
    /// stopped again if any step fails.
    pub(super) fn start_pair(
        &self,
        sides: &[Side; 2],
        [source, target]: [&str; 2],
        tuns: [String; 2],
        mut start: impl FnMut(usize, &Side) -> Result<std::process::Child>,
    ) -> Result<Tunnel> {
        let mut t = Tunnel {
            children: Vec::new(),
            target: target.into(),
            source: source.into(),
            tuns,
        };
        for (i, side) in sides.iter().enumerate() {
            match start(i, side) {
                Ok(child) => t.children.push(child),
                Err(e) => {
                    stop(t);
                    return Err(e);
                }
            }
        }
        match self.handshake(&t) {
            Ok(()) => Ok(t),
            Err(e) => {
                stop(t);
                Err(e)
            }
        }
    }

    pub(super) fn handshake(&self, t: &Tunnel) -> Result<()> {
        if !crate::checks::ping(&self.a, t.target.parse()?, 10) {
            bail!("no traffic through the tunnel to {}", t.target);
        }
        Ok(())
    }

    /// (UDP RcvbufErrors of both namespaces, TUN tx_dropped of both).
    pub(super) fn drops(&self, tuns: &[String; 2]) -> (u64, u64) {
        let mut rcv = 0;
        let mut tun = 0;
        for (ns, ifn) in [(&self.a, &tuns[0]), (&self.b, &tuns[1])] {
            if let Ok(snmp) = exec(ns, "cat", &["/proc/net/snmp"]) {
                let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
                if let [names, values] = udp[..] {
                    let col = names.split_whitespace().position(|n| n == "RcvbufErrors");
                    rcv += col
                        .and_then(|c| values.split_whitespace().nth(c))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
            if !ifn.is_empty() {
                tun += exec(
                    ns,
                    "cat",
                    &[&format!("/sys/class/net/{ifn}/statistics/tx_dropped")],
                )
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            }
        }
        (rcv, tun)
    }
}

/// Stops a tunnel's daemons.
pub(super) fn stop(t: Tunnel) {
    for mut c in t.children {
        netns::stop_pid(c.id(), Duration::from_secs(3));
        let _ = c.wait();
    }
}

pub(super) fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// (idle, total) jiffies of all CPUs from /proc/stat; idle counts iowait.
pub(super) fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let total = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (idle, total)
}

/// Percent of `(idle, total)` between two `machine_ticks` readings.
pub(super) fn idle_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    100.0 * after.0.saturating_sub(before.0) as f64 / total as f64
}

pub(super) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The iperf3 client arguments of a test.
pub(super) fn test_args(test: &str) -> Result<&'static [&'static str]> {
    Ok(match test {
        "tcp1" => &[],
        "tcp4" => &["-P", "4"],
        "udp" => &["-u", "-b", "0", "-l", "1392"],
        other => bail!("unknown test {other} (have: {})", ALL_TESTS.join(", ")),
    })
}
