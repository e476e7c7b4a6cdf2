//! The host side: the TUN link's MTU, state and gateway addresses, the
//! routes through it, and the sysctls routing needs, all over netlink
//! (rtnetlink) and /proc/sys. Every operation is idempotent: applying the
//! same desired state twice changes nothing the second time.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{info, warn};

use crate::{Error, Result};

/// Routing protocol number tunmesh stamps on its routes, so that a sync
/// touches only routes it made (`ip route` shows it as `proto 116`).
pub const RTPROT_TUNMESH: u8 = 116;

fn nl(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let context = context.into();
    move |e| Error::Netlink {
        context,
        message: e.to_string(),
    }
}

/// WireGuard's overhead over an IPv4 underlay (IP 20, UDP 8, WireGuard 32).
pub const WG_OVERHEAD_V4: u32 = 60;
/// Over IPv6 (IP 40).
pub const WG_OVERHEAD_V6: u32 = 80;

/// The largest inner packet a link (or path) of `mtu` bytes carries in
/// WireGuard over IPv4 (`ipv4`) or IPv6, never under IPv4's 576.
pub fn inner_mtu(mtu: u32, ipv4: bool) -> u16 {
    let overhead = if ipv4 { WG_OVERHEAD_V4 } else { WG_OVERHEAD_V6 };
    u16::try_from(mtu.saturating_sub(overhead).clamp(576, 65535)).unwrap_or(u16::MAX)
}

/// What a route lookup says of the MTU on the way.
enum RouteMtu {
    /// The route's own, or a path MTU the kernel learned.
    Mtu(u32),
    /// None of its own: the device's (by index).
    Device(u32),
    NoRoute,
}

/// A netlink handle for the current network namespace (clones share the
/// connection).
#[derive(Clone)]
pub struct HostNet {
    handle: Handle,
}

/// The host side of the TUN device, as the reconciler drives it: its
/// routes and addresses (`TunLink`, and a fake in the reconciler's tests).
pub trait HostApplier {
    /// Makes tunmesh's routes through the TUN device exactly `routes`.
    fn sync_routes(&self, routes: &[IpNetwork]) -> impl Future<Output = Result<RouteDiff>> + Send;
    /// Brings the device up with its MTU and exactly `gateways` as addresses.
    fn configure_link(&self, gateways: &[IpAddr]) -> impl Future<Output = Result<()>> + Send;
}

/// Routes added and removed by a sync.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    pub added: Vec<IpNetwork>,
    pub removed: Vec<IpNetwork>,
}

impl HostNet {
    /// Opens a netlink connection; must run inside a tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("opening netlink socket", e))?;
        tokio::spawn(conn);
        Ok(HostNet { handle })
    }

    pub async fn link_index(&self, name: &str) -> Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links
            .try_next()
            .await
            .map_err(nl(format!("looking up link {name}")))?
        {
            Some(l) => Ok(l.header.index),
            None => Err(Error::Netlink {
                context: format!("looking up link {name}"),
                message: "no such link".into(),
            }),
        }
    }

    /// Every link's MTU and whether it is up, by index.
    async fn link_mtus(&self) -> Result<std::collections::HashMap<u32, (String, u32, bool)>> {
        use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
        let mut out = std::collections::HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links.try_next().await.map_err(nl("listing links"))? {
            let mut name = String::new();
            let mut mtu = 0;
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => name.clone_from(n),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            let up = l.header.flags.contains(LinkFlags::Up);
            out.insert(l.header.index, (name, mtu, up));
        }
        Ok(out)
    }

    /// The MTU of the route to each of `dsts` (`ip route get`): the
    /// route's own or a learned path MTU if it has one, else its device's.
    /// `None`: no route. The links are listed once for all of them.
    pub async fn route_mtus(&self, dsts: &[IpAddr]) -> Result<Vec<Option<u32>>> {
        let mut links = None;
        let mut out = Vec::with_capacity(dsts.len());
        for dst in dsts {
            let mtu = match self.route_mtu_or_oif(*dst).await? {
                RouteMtu::Mtu(m) => Some(m),
                RouteMtu::Device(oif) => {
                    if links.is_none() {
                        links = Some(self.link_mtus().await?);
                    }
                    links
                        .as_ref()
                        .and_then(|l| l.get(&oif))
                        .map(|(_, mtu, _)| *mtu)
                }
                RouteMtu::NoRoute => None,
            };
            out.push(mtu);
        }
        Ok(out)
    }

    async fn route_mtu_or_oif(&self, dst: IpAddr) -> Result<RouteMtu> {
        use rtnetlink::packet_route::route::RouteMetric;
        let msg = match dst {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut routes = self.handle.route().get(msg).execute();
        let route = match routes.try_next().await {
            Ok(Some(r)) => r,
            // Unreachable: no route, not an error of ours.
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Ok(RouteMtu::NoRoute),
            Err(e) => return Err(nl(format!("looking up the route to {dst}"))(e)),
        };
        let mut oif = None;
        for a in &route.attributes {
            match a {
                RouteAttribute::Metrics(m) => {
                    if let Some(mtu) = m.iter().find_map(|x| match x {
                        RouteMetric::Mtu(v) if *v > 0 => Some(*v),
                        _ => None,
                    }) {
                        return Ok(RouteMtu::Mtu(mtu));
                    }
                }
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        Ok(oif.map_or(RouteMtu::NoRoute, RouteMtu::Device))
    }

    /// The underlay's MTU: the smallest among links that are up and hold a
    /// global address (not loopback, not `except`: the TUN device), and
    /// whether one of them has an IPv4 address (WireGuard over IPv4 costs
    /// 60 bytes, over IPv6 80). `None`: no such link.
    pub async fn underlay_mtu(&self, except: &str) -> Result<Option<(u32, bool)>> {
        use rtnetlink::packet_route::address::AddressScope;
        let links = self.link_mtus().await?;
        let mut best: Option<(u32, bool)> = None;
        let mut addrs = self.handle.address().get().execute();
        while let Some(a) = addrs.try_next().await.map_err(nl("listing addresses"))? {
            if a.header.scope != AddressScope::Universe {
                continue;
            }
            let Some((name, mtu, up)) = links.get(&a.header.index) else {
                continue;
            };
            if !*up || name == except || name == "lo" {
                continue;
            }
            let v4 = a
                .attributes
                .iter()
                .any(|x| matches!(x, AddressAttribute::Address(IpAddr::V4(_))));
            best = Some(match best {
                None => (*mtu, v4),
                Some((m, b4)) if *mtu < m => (*mtu, v4 || (b4 && *mtu == m)),
                Some((m, b4)) => (m, b4 || (v4 && *mtu == m)),
            });
        }
        Ok(best)
    }

    /// Deletes the link `name` (its routes go with it); false if there was
    /// no such link.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let index = match self.link_index(name).await {
            Ok(i) => i,
            // An empty answer, or the kernel's ENODEV for the name.
            Err(Error::Netlink { message, .. })
                if message == "no such link" || message.contains("No such device") =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl(format!("deleting link {name}")))?;
        Ok(true)
    }

    /// Sets the link's MTU, brings it up and makes its addresses exactly
    /// `gateways` (as /32 and /128: a gateway address, not a subnet, so no
    /// connected route competes with the per-pod routes).
    pub async fn configure_link(
        &self,
        index: u32,
        name: &str,
        mtu: u32,
        gateways: &[IpAddr],
    ) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {name} up with MTU {mtu}")))?;
        let mut present = BTreeSet::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(nl(format!("listing addresses of {name}")))?
        {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            match addr {
                Some(ip) if gateways.contains(&ip) => {
                    present.insert(ip);
                }
                Some(ip) if !is_link_local(ip) => {
                    info!(link = name, address = %ip, "removing address not in the desired state");
                    self.handle
                        .address()
                        .del(msg)
                        .execute()
                        .await
                        .map_err(nl(format!("removing {ip} from {name}")))?;
                }
                _ => {}
            }
        }
        for gw in gateways {
            if present.contains(gw) {
                continue;
            }
            let prefix = if gw.is_ipv4() { 32 } else { 128 };
            self.handle
                .address()
                .add(index, *gw, prefix)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding {gw}/{prefix} to {name}")))?;
        }
        Ok(())
    }

    /// The routes through link `index` that tunmesh made.
    pub async fn routes(&self, index: u32) -> Result<BTreeSet<IpNetwork>> {
        let mut out = BTreeSet::new();
        for family in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(family).execute();
            while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
                if r.header.protocol != RouteProtocol::Other(RTPROT_TUNMESH) {
                    continue;
                }
                if !r
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
                {
                    continue;
                }
                let len = r.header.destination_prefix_length;
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                    _ => None,
                });
                if let Some(net) = dst.and_then(|ip| IpNetwork::new(ip, len).ok()) {
                    out.insert(net);
                }
            }
        }
        Ok(out)
    }

    /// Makes the tunmesh routes through link `index` exactly `desired`.
    pub async fn sync_routes(&self, index: u32, desired: &[IpNetwork]) -> Result<RouteDiff> {
        let have = self.routes(index).await?;
        let want: BTreeSet<IpNetwork> = desired.iter().copied().collect();
        let mut diff = RouteDiff::default();
        for net in want.difference(&have) {
            let msg = route_message(*net, index)?;
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding route {net}")))?;
            diff.added.push(*net);
        }
        for net in have.difference(&want) {
            let msg = route_message(*net, index)?;
            self.handle
                .route()
                .del(msg)
                .execute()
                .await
                .map_err(nl(format!("removing route {net}")))?;
            diff.removed.push(*net);
        }
        Ok(diff)
    }
}

/// The TUN device as the reconciler sees it: its routes and addresses,
/// through `HostNet`.
pub struct TunLink {
    pub host: HostNet,
    pub index: u32,
    pub name: String,
    pub mtu: u32,
}

impl HostApplier for TunLink {
    async fn sync_routes(&self, routes: &[IpNetwork]) -> Result<RouteDiff> {
        self.host.sync_routes(self.index, routes).await
    }

    async fn configure_link(&self, gateways: &[IpAddr]) -> Result<()> {
        self.host
            .configure_link(self.index, &self.name, self.mtu, gateways)
            .await
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn route_message(
    net: IpNetwork,
    index: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.network(), net.prefix())
        .map_err(|e| Error::Netlink {
            context: format!("route {net}"),
            message: e.to_string(),
        })?
        .output_interface(index)
        .protocol(RouteProtocol::Other(RTPROT_TUNMESH))
        .scope(RouteScope::Link)
        .build())
}

/// Where sysctls are read and written when nothing says otherwise.
pub const PROC_SYS: &str = "/proc/sys";

/// Writes sysctl `key` (dotted, as `sysctl` names it) under `proc_sys` if
/// its value differs. Returns whether it changed. A read-only /proc/sys
/// (every unprivileged container has one) is named as such in the error.
pub fn set_sysctl(proc_sys: &std::path::Path, key: &str, value: &str) -> Result<bool> {
    let path = proc_sys.join(key.replace('.', "/"));
    let what = |doing: &str| format!("{doing} ({})", path.display());
    let cur = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(what(&format!("reading {key}")), e))?;
    if cur.trim() == value {
        return Ok(false);
    }
    std::fs::write(&path, value).map_err(|e| {
        let e = if e.raw_os_error() == Some(libc::EROFS) {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{e}: /proc/sys is read-only in a container; mount the host's \
                     /proc/sys/net at <dir>/net and pass --proc-sys <dir> (TUNMESH_PROC_SYS)"
                ),
            )
        } else {
            e
        };
        Error::io(what(&format!("setting {key} to {value}")), e)
    })?;
    Ok(true)
}

/// Turns on IPv4/IPv6 forwarding (nodes route between pod veths and the
/// TUN) and loose reverse-path filtering on the TUN device: a pod's request
/// to another node's own address leaves over the underlay, and the reply
/// comes back through the mesh, which strict rp_filter would drop. Returns
/// what could not be set, one line each (logged here as well), for the
/// status an operator reads. `recheck`: called again later, when a setting
/// found changed means something on the host turned it back (logged as a
/// warning).
pub fn prepare_sysctls(proc_sys: &std::path::Path, tun: &str, recheck: bool) -> Vec<String> {
    let wanted = [
        ("net.ipv4.ip_forward".to_string(), "1"),
        ("net.ipv6.conf.all.forwarding".to_string(), "1"),
        (format!("net.ipv4.conf.{tun}.rp_filter"), "2"),
        // The ICMP "fragmentation needed" the router writes to the TUN
        // comes from the pod's gateway, an address of this host: without
        // this the kernel drops it as a martian source.
        (format!("net.ipv4.conf.{tun}.accept_local"), "1"),
    ];
    let mut problems = Vec::new();
    for (key, value) in wanted {
        match set_sysctl(proc_sys, &key, value) {
            Ok(true) if recheck => {
                warn!(%key, value, "sysctl had been changed on the host; set back")
            }
            Ok(true) => info!(%key, value, "sysctl set"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "pod traffic may not be forwarded");
                problems.push(e.to_string());
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A throwaway directory shaped like /proc/sys, removed on drop.
    struct FakeProcSys(PathBuf);

    impl FakeProcSys {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("tunmesh-sysctl-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("net/ipv4/conf/tm0")).unwrap();
            std::fs::create_dir_all(dir.join("net/ipv6/conf/all")).unwrap();
            std::fs::write(dir.join("net/ipv4/ip_forward"), "0\n").unwrap();
            std::fs::write(dir.join("net/ipv6/conf/all/forwarding"), "1\n").unwrap();
            std::fs::write(dir.join("net/ipv4/conf/tm0/rp_filter"), "1\n").unwrap();
            std::fs::write(dir.join("net/ipv4/conf/tm0/accept_local"), "0\n").unwrap();
            FakeProcSys(dir)
        }

        fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.0.join(rel))
                .unwrap()
                .trim()
                .to_string()
        }
    }

    impl Drop for FakeProcSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn inner_mtu_is_the_link_less_wireguards_overhead() {
        assert_eq!(inner_mtu(1500, true), 1440);
        assert_eq!(inner_mtu(1500, false), 1420);
        assert_eq!(inner_mtu(1380, true), 1320);
        assert_eq!(inner_mtu(600, true), 576, "never under IPv4's minimum");
        assert_eq!(inner_mtu(70000, true), u16::MAX);
    }

    #[test]
    fn sysctls_are_written_under_the_given_root_only_when_they_differ() {
        let root = FakeProcSys::new("write");
        assert!(set_sysctl(&root.0, "net.ipv4.ip_forward", "1").unwrap());
        assert_eq!(root.read("net/ipv4/ip_forward"), "1");
        assert!(
            !set_sysctl(&root.0, "net.ipv4.ip_forward", "1").unwrap(),
            "unchanged the second time"
        );
        let problems = prepare_sysctls(&root.0, "tm0", false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(root.read("net/ipv4/conf/tm0/rp_filter"), "2");
        assert_eq!(root.read("net/ipv4/conf/tm0/accept_local"), "1");
        assert_eq!(root.read("net/ipv6/conf/all/forwarding"), "1");
    }

    #[test]
    fn a_missing_sysctl_is_reported_with_its_key_and_path() {
        let root = FakeProcSys::new("missing");
        let problems = prepare_sysctls(&root.0, "nosuch0", false);
        assert_eq!(
            problems.len(),
            2,
            "rp_filter and accept_local: {problems:?}"
        );
        assert!(
            problems[0].contains("net.ipv4.conf.nosuch0.rp_filter"),
            "{}",
            problems[0]
        );
        assert!(
            problems[0].contains(&root.0.display().to_string()),
            "{}",
            problems[0]
        );
        assert_eq!(
            root.read("net/ipv4/ip_forward"),
            "1",
            "the others are still set"
        );
    }
}
