//! Links, addresses and routes over netlink, on the node's side and inside
//! a container's network namespace. A netlink socket belongs to the
//! namespace it was opened in, so the container-side handle is opened after
//! switching this thread into the container's namespace, and the thread
//! switches straight back.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};

use futures_util::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::spec::{code, CniError};

/// The IPv6 gateway pods use: a link-local address on the node's end of
/// every pod veth (IPv6 neighbour discovery only answers for addresses on
/// the receiving interface, unlike ARP for IPv4).
pub const V6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

fn setup_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> CniError {
    let what = what.into();
    move |e| CniError::with(code::NETWORK_SETUP, what, e.to_string())
}

fn setns(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns on a namespace descriptor we hold open; affects only
    // this thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A netlink handle in this thread's current namespace (runs in tokio).
pub fn host_handle() -> Result<Handle, CniError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::with(code::IO_FAILURE, "opening a netlink socket", e.to_string()))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink handle whose socket lives in namespace `ns`.
pub fn handle_in(ns: &File) -> Result<Handle, CniError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| CniError::with(code::IO_FAILURE, what, e.to_string())
    };
    let home = File::open("/proc/thread-self/ns/net")
        .map_err(io("opening this thread's network namespace"))?;
    setns(ns.as_raw_fd()).map_err(io("entering the container's network namespace"))?;
    let made = rtnetlink::new_connection();
    if let Err(e) = setns(home.as_raw_fd()) {
        // Every later step would act on the wrong namespace: stop here.
        eprintln!("tunmesh-cni: cannot return to the node's network namespace: {e}");
        std::process::exit(1);
    }
    let (conn, handle, _) =
        made.map_err(io("opening a netlink socket in the container's namespace"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The link named `name`, if any.
pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(setup_err(format!("looking up link {name}"))(e)),
    }
}

pub fn mac_of(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

pub fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// Deletes link `name` if it exists; true if it did.
pub async fn delete_link(h: &Handle, name: &str) -> Result<bool, CniError> {
    match link(h, name).await? {
        None => Ok(false),
        Some(l) => match h.link().del(l.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(false),
            Err(e) => Err(setup_err(format!("deleting link {name}"))(e)),
        },
    }
}

async fn add_address(h: &Handle, index: u32, net: IpNetwork, ifname: &str) -> Result<(), CniError> {
    let mut req = h.address().add(index, net.ip(), net.prefix()).replace();
    if net.is_ipv6() {
        // No duplicate address detection: the address is ours alone, and
        // DAD would hold it back for a second or more.
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .map_err(setup_err(format!("adding {net} to {ifname}")))
}

fn route(
    dst: IpNetwork,
    gw: Option<IpAddr>,
    index: u32,
    scope_link: bool,
) -> Result<RouteMessage, CniError> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix())
        .map_err(|e| CniError::with(code::NETWORK_SETUP, format!("route {dst}"), e.to_string()))?
        .output_interface(index);
    if let Some(gw) = gw {
        b = b.gateway(gw).map_err(|e| {
            CniError::with(
                code::NETWORK_SETUP,
                format!("route {dst} via {gw}"),
                e.to_string(),
            )
        })?;
    }
    if scope_link {
        b = b.scope(RouteScope::Link);
    }
    Ok(b.build())
}

async fn add_route(h: &Handle, msg: RouteMessage, what: String) -> Result<(), CniError> {
    h.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(setup_err(what))
}

/// What ADD creates.
pub struct Setup<'a> {
    pub netns: &'a File,
    pub ifname: &'a str,
    pub host_if: &'a str,
    /// A name for the container end while it is still on the node's side.
    pub temp_if: &'a str,
    /// The pod's addresses, one per family.
    pub addrs: &'a [IpAddr],
    /// The node's gateway per family (IPv4 is used; IPv6 goes via V6_GATEWAY).
    pub gateway_v4: Option<Ipv4Addr>,
    pub mtu: u32,
}

/// MACs of the node's end and the container's end.
pub struct Made {
    pub host_mac: String,
    pub container_mac: String,
}

/// Creates the veth pair, moves one end into the container as `ifname`
/// with the addresses, MTU and default routes, and gives the node's end its
/// routes to the pod. On failure the caller deletes `host_if` (which takes
/// the whole pair with it).
pub async fn setup(host: &Handle, cont: &Handle, s: &Setup<'_>) -> Result<Made, CniError> {
    if link(cont, s.ifname).await?.is_some() {
        return Err(CniError::new(
            code::NETWORK_SETUP,
            format!("interface {} already exists in the container's namespace and was not made by tunmesh-cni", s.ifname),
        ));
    }
    // A leftover temporary end from a crashed earlier attempt.
    delete_link(host, s.temp_if).await?;
    host.link()
        .add(LinkVeth::new(s.host_if, s.temp_if).mtu(s.mtu).build())
        .execute()
        .await
        .map_err(setup_err(format!(
            "creating veth pair {} / {}",
            s.host_if, s.temp_if
        )))?;
    host.link()
        .set(
            LinkUnspec::new_with_name(s.temp_if)
                .setns_by_fd(s.netns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(setup_err(format!(
            "moving {} into the container's namespace",
            s.temp_if
        )))?;

    // Container side.
    let inside = link(cont, s.temp_if).await?.ok_or_else(|| {
        CniError::new(
            code::NETWORK_SETUP,
            format!("{} did not arrive in the container's namespace", s.temp_if),
        )
    })?;
    let ci = inside.header.index;
    cont.link()
        .set(
            LinkUnspec::new_with_index(ci)
                .name(s.ifname.to_string())
                .mtu(s.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(setup_err(format!(
            "renaming {} to {} and bringing it up",
            s.temp_if, s.ifname
        )))?;
    for ip in s.addrs {
        let net = IpNetwork::new(*ip, if ip.is_ipv4() { 32 } else { 128 }).map_err(|e| {
            CniError::with(code::NETWORK_SETUP, format!("address {ip}"), e.to_string())
        })?;
        add_address(cont, ci, net, s.ifname).await?;
    }
    if s.addrs.iter().any(|a| a.is_ipv4()) {
        let gw = s.gateway_v4.ok_or_else(|| {
            CniError::new(code::NETWORK_SETUP, "an IPv4 address but no IPv4 gateway")
        })?;
        let gw_net = IpNetwork::new(IpAddr::V4(gw), 32)
            .map_err(|e| CniError::with(code::NETWORK_SETUP, "gateway", e.to_string()))?;
        add_route(
            cont,
            route(gw_net, None, ci, true)?,
            format!("route to gateway {gw} in the container"),
        )
        .await?;
        let default: IpNetwork = IpNetwork::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
            .map_err(|e| CniError::with(code::NETWORK_SETUP, "default route", e.to_string()))?;
        add_route(
            cont,
            route(default, Some(IpAddr::V4(gw)), ci, false)?,
            format!("default route via {gw} in the container"),
        )
        .await?;
    }
    if s.addrs.iter().any(|a| a.is_ipv6()) {
        let default: IpNetwork = IpNetwork::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
            .map_err(|e| CniError::with(code::NETWORK_SETUP, "default route", e.to_string()))?;
        add_route(
            cont,
            route(default, Some(IpAddr::V6(V6_GATEWAY)), ci, false)?,
            format!("IPv6 default route via {V6_GATEWAY} in the container"),
        )
        .await?;
    }
    let container_mac = link(cont, s.ifname)
        .await?
        .map(|l| mac_of(&l))
        .unwrap_or_default();

    // Node side.
    let hl = link(host, s.host_if).await?.ok_or_else(|| {
        CniError::new(
            code::NETWORK_SETUP,
            format!("{} vanished while being set up", s.host_if),
        )
    })?;
    let hi = hl.header.index;
    host.link()
        .set(LinkUnspec::new_with_index(hi).mtu(s.mtu).up().build())
        .execute()
        .await
        .map_err(setup_err(format!("bringing {} up", s.host_if)))?;
    if s.addrs.iter().any(|a| a.is_ipv6()) {
        let gw = IpNetwork::new(IpAddr::V6(V6_GATEWAY), 64)
            .map_err(|e| CniError::with(code::NETWORK_SETUP, "IPv6 gateway", e.to_string()))?;
        add_address(host, hi, gw, s.host_if).await?;
    }
    for ip in s.addrs {
        let net = IpNetwork::new(*ip, if ip.is_ipv4() { 32 } else { 128 }).map_err(|e| {
            CniError::with(code::NETWORK_SETUP, format!("address {ip}"), e.to_string())
        })?;
        add_route(
            host,
            route(net, None, hi, true)?,
            format!("route to the pod {net} via {}", s.host_if),
        )
        .await?;
    }
    Ok(Made {
        host_mac: mac_of(&hl),
        container_mac,
    })
}

/// Addresses on link `index`.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<IpNetwork>, CniError> {
    let mut out = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(setup_err("listing addresses"))?
    {
        let len = msg.header.prefix_len;
        for a in &msg.attributes {
            if let AddressAttribute::Address(ip) = a {
                if let Ok(n) = IpNetwork::new(*ip, len) {
                    out.push(n);
                }
            }
        }
    }
    Ok(out)
}

/// Routes through link `index` in the main table: (destination, gateway).
pub async fn routes(h: &Handle, index: u32) -> Result<Vec<(IpNetwork, Option<IpAddr>)>, CniError> {
    let mut out = Vec::new();
    for family in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut rs = h.route().get(family).execute();
        while let Some(r) = rs.try_next().await.map_err(setup_err("listing routes"))? {
            if !r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
            {
                continue;
            }
            let ip = |a: &RouteAddress| match a {
                RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
                RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
                _ => None,
            };
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => ip(d),
                _ => None,
            });
            let dst = dst.unwrap_or(
                if r.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                },
            );
            let gw = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => ip(g),
                _ => None,
            });
            if let Ok(n) = IpNetwork::new(dst, r.header.destination_prefix_length) {
                out.push((n, gw));
            }
        }
    }
    Ok(out)
}
