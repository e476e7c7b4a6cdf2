//! The commands: ADD, DEL, CHECK, STATUS and GC as functions over a parsed
//! request. The binary prints what they return.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::net::{self, Setup, V6_GATEWAY};
use crate::request::{Command, Env, NetConf};
use crate::spec::{self, code, AddResult, CniError, Interface, IpConfig, Route};
use crate::store::{self, Store};
use tunmesh_contract::NodeState;

/// The node-side interface name of an attachment: stable for a container
/// and interface (so DEL and GC find it without any other state), unique
/// enough, and within the kernel's 15 characters.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let h = Sha256::digest(store::key(container_id, ifname).as_bytes());
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("tm{}", &hex[..13])
}

fn temp_ifname(host_if: &str) -> String {
    format!("tp{}", &host_if[2..])
}

fn not_ready(e: tunmesh_contract::NodeStateError) -> CniError {
    CniError::with(
        code::TRY_AGAIN_LATER,
        "the tunmesh router on this node is not ready (its node state is missing or has no pod CIDR yet); try again later",
        e.to_string(),
    )
}

fn open_netns(path: &str) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::with(
            code::UNKNOWN_CONTAINER,
            format!("cannot open the container's network namespace {path:?}"),
            e.to_string(),
        )
    })
}

/// Runs one command. `Ok(Some(json))` is printed on stdout; `Ok(None)`
/// prints nothing (DEL, CHECK, STATUS and GC succeed silently).
pub async fn run(env: &Env, conf: &NetConf) -> Result<Option<Value>, CniError> {
    match env.command {
        Command::Version => Ok(Some(spec::version_result(
            if spec::is_supported(&conf.cni_version) {
                &conf.cni_version
            } else {
                spec::LATEST
            },
        ))),
        Command::Add => add(env, conf)
            .await
            .map(|r| Some(r.to_json(&conf.cni_version))),
        Command::Del => del(env, conf).await.map(|_| None),
        Command::Check => check(env, conf).await.map(|_| None),
        Command::Status => NodeState::read(&conf.settings.router_state_dir)
            .map(|_| None)
            .map_err(|e| {
                CniError::with(
                    code::NOT_AVAILABLE,
                    "tunmesh is not ready on this node: the router has not written its node state",
                    e.to_string(),
                )
            }),
        Command::Gc => gc(conf).await.map(|_| None),
    }
}

async fn add(env: &Env, conf: &NetConf) -> Result<AddResult, CniError> {
    let node = NodeState::read(&conf.settings.router_state_dir).map_err(not_ready)?;
    let netns = open_netns(&env.netns)?;
    let store = Store::open(&conf.settings.data_dir, &conf.name)?;
    let key = store::key(&env.container_id, &env.ifname);
    let (ips, fresh) = store.allocate(&key, &node.pod_cidrs, &node.gateways)?;
    let host_if = host_ifname(&env.container_id, &env.ifname);
    let temp_if = temp_ifname(&host_if);
    let gateway_v4 = node.gateways.iter().find_map(|g| match g {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let host = net::host_handle()?;
    let result = async {
        // A repeated ADD for the same attachment: start again from clean.
        net::delete_link(&host, &host_if).await?;
        let cont = net::handle_in(&netns)?;
        let made = net::setup(
            &host,
            &cont,
            &Setup {
                netns: &netns,
                ifname: &env.ifname,
                host_if: &host_if,
                temp_if: &temp_if,
                addrs: &ips,
                gateway_v4,
                mtu: u32::from(node.mtu),
            },
        )
        .await?;
        Ok::<_, CniError>(made)
    }
    .await;
    let made = match result {
        Ok(m) => m,
        Err(e) => {
            // Roll back: the node's end takes the pair with it; give the
            // addresses back if this call took them.
            let _ = net::delete_link(&host, &host_if).await;
            let _ = net::delete_link(&host, &temp_if).await;
            if fresh {
                let _ = store.release(&key);
            }
            return Err(e);
        }
    };
    let mtu = Some(u32::from(node.mtu));
    let mut out = AddResult {
        interfaces: vec![
            Interface {
                name: host_if,
                mac: made.host_mac,
                sandbox: None,
                mtu,
            },
            Interface {
                name: env.ifname.clone(),
                mac: made.container_mac,
                sandbox: Some(env.netns.clone()),
                mtu,
            },
        ],
        ips: Vec::new(),
        routes: Vec::new(),
    };
    for ip in &ips {
        let (len, gw, default): (u8, IpAddr, &str) = match ip {
            IpAddr::V4(_) => (32, gateway_v4.map(IpAddr::V4).unwrap_or(*ip), "0.0.0.0/0"),
            IpAddr::V6(_) => (128, IpAddr::V6(V6_GATEWAY), "::/0"),
        };
        let address = IpNetwork::new(*ip, len).map_err(|e| {
            CniError::with(code::NETWORK_SETUP, format!("address {ip}"), e.to_string())
        })?;
        out.ips.push(IpConfig {
            address,
            gateway: Some(gw),
            interface: 1,
        });
        let dst = default
            .parse()
            .map_err(|_| CniError::new(code::NETWORK_SETUP, "default route"))?;
        out.routes.push(Route { dst, gw: Some(gw) });
    }
    Ok(out)
}

async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let host = net::host_handle()?;
    let host_if = host_ifname(&env.container_id, &env.ifname);
    // The node's end first: if that fails the address stays allocated
    // (and the error says why), so nothing is handed out twice.
    net::delete_link(&host, &host_if).await?;
    net::delete_link(&host, &temp_ifname(&host_if)).await?;
    let store = Store::open(&conf.settings.data_dir, &conf.name)?;
    store.release(&store::key(&env.container_id, &env.ifname))?;
    Ok(())
}

fn mismatch(what: String) -> CniError {
    CniError::new(code::CHECK_MISMATCH, what)
}

async fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult (the result of the ADD)",
        )
    })?;
    let prev = AddResult::from_json(prev)
        .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?;
    let store = Store::open(&conf.settings.data_dir, &conf.name)?;
    let key = store::key(&env.container_id, &env.ifname);
    let allocated = store
        .read()?
        .allocations
        .get(&key)
        .cloned()
        .unwrap_or_default();
    let netns = open_netns(&env.netns)?;
    let cont = net::handle_in(&netns)?;
    let Some(cl) = net::link(&cont, &env.ifname).await? else {
        return Err(mismatch(format!(
            "interface {} is missing from {}",
            env.ifname, env.netns
        )));
    };
    let have = net::addresses(&cont, cl.header.index).await?;
    let routes = net::routes(&cont, cl.header.index).await?;
    for ip in &prev.ips {
        if !have.contains(&ip.address) {
            return Err(mismatch(format!(
                "{} has no address {} (has {:?})",
                env.ifname,
                ip.address,
                have.iter().map(|n| n.to_string()).collect::<Vec<_>>()
            )));
        }
        if !allocated.contains(&ip.address.ip()) {
            return Err(mismatch(format!(
                "{} is not allocated to {key} in {}",
                ip.address.ip(),
                store.path().display()
            )));
        }
    }
    for r in &prev.routes {
        if !routes
            .iter()
            .any(|(dst, gw)| *dst == r.dst && (r.gw.is_none() || *gw == r.gw))
        {
            return Err(mismatch(format!(
                "{} has no route {}{}",
                env.ifname,
                r.dst,
                r.gw.map(|g| format!(" via {g}")).unwrap_or_default()
            )));
        }
    }
    if let Some(mtu) = prev
        .interfaces
        .iter()
        .find(|i| i.name == env.ifname)
        .and_then(|i| i.mtu)
    {
        if net::mtu_of(&cl) != Some(mtu) {
            return Err(mismatch(format!(
                "{} has MTU {:?}, the ADD set {mtu}",
                env.ifname,
                net::mtu_of(&cl)
            )));
        }
    }
    let host = net::host_handle()?;
    let host_if = host_ifname(&env.container_id, &env.ifname);
    let Some(hl) = net::link(&host, &host_if).await? else {
        return Err(mismatch(format!("the node's end {host_if} is missing")));
    };
    let host_routes = net::routes(&host, hl.header.index).await?;
    for ip in &prev.ips {
        if !host_routes.iter().any(|(dst, _)| *dst == ip.address) {
            return Err(mismatch(format!(
                "the node has no route to {} via {host_if}",
                ip.address
            )));
        }
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: BTreeSet<String> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| store::key(&a.container_id, &a.ifname))
        .collect();
    let store = Store::open(&conf.settings.data_dir, &conf.name)?;
    let host = net::host_handle()?;
    // Links first, as DEL does; then the store.
    let mut failed = Vec::new();
    let mut keep = valid.clone();
    for k in store.read()?.allocations.keys() {
        if valid.contains(k) {
            continue;
        }
        if let Some((cid, ifname)) = k.rsplit_once('/') {
            if let Err(e) = net::delete_link(&host, &host_ifname(cid, ifname)).await {
                // Its address stays allocated until its link is gone.
                failed.push(format!("{k}: {e}"));
                keep.insert(k.clone());
            }
        }
    }
    store.retain(&keep)?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CniError::with(
            code::NETWORK_SETUP,
            "GC could not remove some links",
            failed.join("; "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
        assert_eq!(a.len(), 15);
        assert_eq!(temp_ifname(&a).len(), 15);
        assert!(temp_ifname(&a).starts_with("tp"));
    }
}
