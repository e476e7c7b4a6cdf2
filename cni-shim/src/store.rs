//! The address allocation store: one JSON file per network under the data
//! directory, changed only under an exclusive `flock` and replaced
//! atomically (temporary file, fsync, rename), so concurrent invocations
//! never hand out one address twice, and a crash or reboot loses nothing.
//! Allocations are keyed by container ID and interface name; a repeated
//! ADD gets the same addresses back.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::spec::{code, CniError};
use tunmesh_contract::nodestate::write_atomic;

const FILE: &str = "allocations.json";
/// How many IPv6 candidates one ADD looks at before calling the range full
/// (a /64 never gets there; a tiny IPv6 range does).
const V6_SCAN_LIMIT: u128 = 1 << 16;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Allocations {
    /// `containerID/ifname` -> its addresses.
    pub allocations: BTreeMap<String, Vec<IpAddr>>,
    /// The last address handed out per family, so the next ADD starts after
    /// it and a freed address is not reused at once.
    #[serde(default)]
    pub last: BTreeMap<String, IpAddr>,
}

/// The key of one attachment.
pub fn key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

pub struct Store {
    dir: PathBuf,
}

/// Held while the store is in use; dropping it unlocks.
struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking a descriptor this value owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::with(code::IO_FAILURE, what, e.to_string())
}

impl Store {
    /// The store of network `network` under `data_dir` (created 0700).
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, CniError> {
        let dir = data_dir.join(network);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("creating {}", dir.display())))?;
        Ok(Store { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn lock(&self) -> Result<Lock, CniError> {
        let path = self.dir.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        loop {
            // SAFETY: flock on a descriptor we own; blocks until exclusive.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io(format!("locking {}", path.display()))(e));
            }
        }
    }

    /// Reads the allocations. A missing file is an empty store; a file that
    /// does not parse is an error naming it, and is never overwritten.
    pub fn read(&self) -> Result<Allocations, CniError> {
        let path = self.path();
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::default()),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
            Ok(text) => serde_json::from_slice(&text).map_err(|e| {
                CniError::with(
                    code::IO_FAILURE,
                    format!("the allocation store {} is damaged; fix or move it aside (no address was changed)", path.display()),
                    e.to_string(),
                )
            }),
        }
    }

    fn write(&self, a: &Allocations) -> Result<(), CniError> {
        let json = serde_json::to_vec_pretty(a)
            .map_err(|e| CniError::with(code::IO_FAILURE, "encoding allocations", e.to_string()))?;
        write_atomic(&self.path(), &json).map_err(io(format!("writing {}", self.path().display())))
    }

    /// The addresses of attachment `key`, one from each of `cidrs`: its
    /// existing ones if it has them there, else the next free ones (never a
    /// network, gateway or broadcast address). Returns them and whether
    /// they are new (so a failed ADD can give them back).
    pub fn allocate(
        &self,
        key: &str,
        cidrs: &[IpNetwork],
        gateways: &[IpAddr],
    ) -> Result<(Vec<IpAddr>, bool), CniError> {
        let _lock = self.lock()?;
        let mut a = self.read()?;
        if let Some(have) = a.allocations.get(key) {
            let fits = have.len() == cidrs.len()
                && cidrs.iter().all(|c| have.iter().any(|ip| c.contains(*ip)));
            if fits {
                let ordered = cidrs
                    .iter()
                    .filter_map(|c| have.iter().find(|ip| c.contains(**ip)).copied())
                    .collect();
                return Ok((ordered, false));
            }
        }
        let in_use: std::collections::HashSet<IpAddr> =
            a.allocations.values().flatten().copied().collect();
        let mut picked = Vec::new();
        for cidr in cidrs {
            let family = if cidr.is_ipv4() { "v4" } else { "v6" };
            let ip = next_free(*cidr, gateways, &in_use, a.last.get(family).copied()).ok_or_else(|| {
                let used = in_use.iter().filter(|ip| cidr.contains(**ip)).count();
                CniError::with(
                    code::RANGE_EXHAUSTED,
                    format!("no free address left in pod CIDR {cidr}"),
                    format!("{used} addresses are allocated (store {}); delete pods or give the node a larger podCIDR", self.path().display()),
                )
            })?;
            a.last.insert(family.to_string(), ip);
            picked.push(ip);
        }
        a.allocations.insert(key.to_string(), picked.clone());
        self.write(&a)?;
        Ok((picked, true))
    }

    /// Frees attachment `key`; returns its addresses (none if unknown).
    pub fn release(&self, key: &str) -> Result<Vec<IpAddr>, CniError> {
        let _lock = self.lock()?;
        let mut a = self.read()?;
        let freed = a.allocations.remove(key).unwrap_or_default();
        if !freed.is_empty() {
            self.write(&a)?;
        }
        Ok(freed)
    }

    /// Frees every attachment not in `valid` (GC); returns the freed keys.
    pub fn retain(
        &self,
        valid: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<String>, CniError> {
        let _lock = self.lock()?;
        let mut a = self.read()?;
        let stale: Vec<String> = a
            .allocations
            .keys()
            .filter(|k| !valid.contains(*k))
            .cloned()
            .collect();
        for k in &stale {
            a.allocations.remove(k);
        }
        if !stale.is_empty() {
            self.write(&a)?;
        }
        Ok(stale)
    }
}

/// The first address after `last` (wrapping) in `cidr` that is not the
/// network address, a gateway, the IPv4 broadcast address or in use.
fn next_free(
    cidr: IpNetwork,
    gateways: &[IpAddr],
    in_use: &std::collections::HashSet<IpAddr>,
    last: Option<IpAddr>,
) -> Option<IpAddr> {
    let (base, size): (u128, u128) = match cidr {
        IpNetwork::V4(n) => (u32::from(n.network()) as u128, 1u128 << (32 - n.prefix())),
        IpNetwork::V6(n) => (
            u128::from(n.network()),
            if n.prefix() == 0 {
                u128::MAX
            } else {
                1u128 << (128 - n.prefix()).min(127)
            },
        ),
    };
    let to_ip = |off: u128| -> IpAddr {
        match cidr {
            IpNetwork::V4(_) => IpAddr::V4(((base + off) as u32).into()),
            IpNetwork::V6(_) => IpAddr::V6((base + off).into()),
        }
    };
    let start = match last {
        Some(ip) if cidr.contains(ip) => {
            let off = match ip {
                IpAddr::V4(a) => u32::from(a) as u128 - base,
                IpAddr::V6(a) => u128::from(a) - base,
            };
            (off + 1) % size
        }
        _ => 0,
    };
    let limit = if cidr.is_ipv4() {
        size
    } else {
        size.min(V6_SCAN_LIMIT)
    };
    (0..limit)
        .map(|i| (start + i) % size)
        .filter(|&off| off != 0 && !(cidr.is_ipv4() && off == size - 1 && size > 2))
        .map(to_ip)
        .find(|ip| !gateways.contains(ip) && !in_use.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tunmesh-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn allocates_skips_reserved_and_exhausts() {
        let d = tmp("exhaust");
        let s = Store::open(&d, "net").unwrap();
        let cidr: IpNetwork = "10.0.0.0/29".parse().unwrap();
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        let mut got = Vec::new();
        for i in 0..5 {
            let (ips, new) = s
                .allocate(&key(&format!("c{i}"), "eth0"), &[cidr], &[gw])
                .unwrap();
            assert!(new);
            got.push(ips[0].to_string());
        }
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        let e = s.allocate("c9/eth0", &[cidr], &[gw]).unwrap_err();
        assert_eq!(e.code, code::RANGE_EXHAUSTED);
        assert!(e.msg.contains("10.0.0.0/29"), "{e}");
        // Same key again: same address, not new.
        let (again, new) = s.allocate("c2/eth0", &[cidr], &[gw]).unwrap();
        assert_eq!((again[0].to_string().as_str(), new), ("10.0.0.4", false));
        // Freed addresses come back, after the last one handed out.
        assert_eq!(s.release("c1/eth0").unwrap().len(), 1);
        assert!(s.release("c1/eth0").unwrap().is_empty());
        let (ips, _) = s.allocate("c7/eth0", &[cidr], &[gw]).unwrap();
        assert_eq!(ips[0].to_string(), "10.0.0.3");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dual_stack_gc_and_damaged_file() {
        let d = tmp("dual");
        let s = Store::open(&d, "net").unwrap();
        let cidrs: Vec<IpNetwork> = vec![
            "10.1.0.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ];
        let gws: Vec<IpAddr> = vec!["10.1.0.1".parse().unwrap(), "fd00:1::1".parse().unwrap()];
        let (a, _) = s.allocate("a/eth0", &cidrs, &gws).unwrap();
        assert_eq!(
            a,
            vec![
                "10.1.0.2".parse::<IpAddr>().unwrap(),
                "fd00:1::2".parse().unwrap()
            ]
        );
        s.allocate("b/eth0", &cidrs, &gws).unwrap();
        let valid = ["b/eth0".to_string()].into_iter().collect();
        assert_eq!(s.retain(&valid).unwrap(), vec!["a/eth0".to_string()]);
        assert_eq!(s.read().unwrap().allocations.len(), 1);
        std::fs::write(s.path(), "{oops").unwrap();
        let e = s.allocate("c/eth0", &cidrs, &gws).unwrap_err();
        assert!(e.msg.contains("damaged"), "{e}");
        assert_eq!(std::fs::read_to_string(s.path()).unwrap(), "{oops");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let d = tmp("conc");
        let cidr: IpNetwork = "10.2.0.0/24".parse().unwrap();
        let gw: IpAddr = "10.2.0.1".parse().unwrap();
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let s = Store::open(&d, "net").unwrap();
                    s.allocate(&format!("c{i}/eth0"), &[cidr], &[gw]).unwrap().0[0]
                })
            })
            .collect();
        let mut ips: Vec<IpAddr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 32);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
