//! The CNI specification's shapes: versions, the error object with its
//! well-known codes, and results as each version lays them out.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{json, Value};

/// Spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// What VERSION answers with when asked without a version.
pub const LATEST: &str = "1.1.0";

/// Well-known error codes (CNI spec, "Well-known Error Codes"), and ours
/// from 100 up.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot take ADDs now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// No free address left in the node's pod CIDR.
    pub const RANGE_EXHAUSTED: u32 = 100;
    /// CHECK found the container's network different from `prevResult`.
    pub const CHECK_MISMATCH: u32 = 101;
    /// Creating or configuring links, addresses or routes failed.
    pub const NETWORK_SETUP: u32 = 102;
}

/// A CNI error: printed as the spec's error object on stdout, exit 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", details.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn with(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: Some(details.into()),
        }
    }

    /// The spec's error object, in `version` (the request's, when known).
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if let Some(d) = &self.details {
            v["details"] = json!(d);
        }
        v
    }
}

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Checks a request's version, returning the incompatible-version error.
pub fn check_version(version: &str) -> Result<(), CniError> {
    if is_supported(version) {
        Ok(())
    } else {
        Err(CniError::with(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {version:?}"),
            format!("tunmesh-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        ))
    }
}

/// The VERSION command's answer.
pub fn version_result(version: &str) -> Value {
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// One interface in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for the container side; `None` for the host side.
    pub sandbox: Option<String>,
    pub mtu: Option<u32>,
}

/// One address in a result, on `interface` (an index into `interfaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub interface: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
}

/// An ADD result, independent of version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
}

/// Whether `version` is older than 1.0.0 (results carry `ips[].version`).
fn pre_1_0(version: &str) -> bool {
    version.starts_with("0.")
}

impl AddResult {
    /// The result exactly as spec `version` shapes it: 0.3.x/0.4.0 give each
    /// IP a `version`; 1.0.0 drops it; 1.1.0 adds the interface MTU.
    pub fn to_json(&self, version: &str) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({ "name": i.name, "mac": i.mac });
                if let Some(s) = &i.sandbox {
                    v["sandbox"] = json!(s);
                }
                if let (Some(m), "1.1.0") = (i.mtu, version) {
                    v["mtu"] = json!(m);
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({ "address": ip.address.to_string(), "interface": ip.interface });
                if let Some(g) = ip.gateway {
                    v["gateway"] = json!(g.to_string());
                }
                if pre_1_0(version) {
                    v["version"] = json!(if ip.address.is_ipv4() { "4" } else { "6" });
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({ "dst": r.dst.to_string() });
                if let Some(g) = r.gw {
                    v["gw"] = json!(g.to_string());
                }
                v
            })
            .collect();
        json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }

    /// Reads a `prevResult` (any supported version) back, for CHECK.
    pub fn from_json(v: &Value) -> Result<AddResult, BadPrevResult> {
        let interfaces = v["interfaces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| Interface {
                        name: i["name"].as_str().unwrap_or_default().to_string(),
                        mac: i["mac"].as_str().unwrap_or_default().to_string(),
                        sandbox: i["sandbox"].as_str().map(str::to_string),
                        mtu: i["mtu"].as_u64().map(|m| m as u32),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut ips = Vec::new();
        for (n, ip) in v["ips"].as_array().into_iter().flatten().enumerate() {
            let address = ip["address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| {
                    BadPrevResult(format!("prevResult.ips[{n}].address missing or not a CIDR"))
                })?;
            let gateway = match ip["gateway"].as_str() {
                Some(g) => Some(g.parse().map_err(|_| {
                    BadPrevResult(format!("prevResult.ips[{n}].gateway {g:?} is not an IP"))
                })?),
                None => None,
            };
            ips.push(IpConfig {
                address,
                gateway,
                interface: ip["interface"].as_u64().unwrap_or(0) as usize,
            });
        }
        let mut routes = Vec::new();
        for (n, r) in v["routes"].as_array().into_iter().flatten().enumerate() {
            let dst = r["dst"]
                .as_str()
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| {
                    BadPrevResult(format!("prevResult.routes[{n}].dst missing or not a CIDR"))
                })?;
            routes.push(Route {
                dst,
                gw: r["gw"].as_str().and_then(|g| g.parse().ok()),
            });
        }
        Ok(AddResult {
            interfaces,
            ips,
            routes,
        })
    }
}

/// A `prevResult` that cannot be read back: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadPrevResult(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "tm0123".into(),
                    mac: "aa:bb:cc:dd:ee:01".into(),
                    sandbox: None,
                    mtu: Some(1420),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:02".into(),
                    sandbox: Some("/var/run/netns/x".into()),
                    mtu: Some(1420),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/32".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: 1,
                },
                IpConfig {
                    address: "fd00::5/128".parse().unwrap(),
                    gateway: Some("fe80::1".parse().unwrap()),
                    interface: 1,
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
            }],
        }
    }

    #[test]
    fn shapes_per_version() {
        let r = sample();
        let old = r.to_json("0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert!(old["interfaces"][1].get("mtu").is_none());
        let v1 = r.to_json("1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert!(v1["interfaces"][1].get("mtu").is_none());
        let v11 = r.to_json("1.1.0");
        assert_eq!(v11["interfaces"][1]["mtu"], 1420);
        assert_eq!(v11["interfaces"][1]["sandbox"], "/var/run/netns/x");
        assert!(v11["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v11["cniVersion"], "1.1.0");
        for v in SUPPORTED_VERSIONS {
            let back = AddResult::from_json(&r.to_json(v)).unwrap();
            assert_eq!(back.ips, r.ips, "{v}");
            assert_eq!(back.routes, r.routes, "{v}");
        }
    }

    #[test]
    fn errors() {
        assert!(check_version("1.0.0").is_ok());
        let e = check_version("2.0.0").unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let j = e.to_json("1.0.0");
        assert_eq!(j["code"], 1);
        assert!(j["details"].as_str().unwrap().contains("1.1.0"));
        assert_eq!(version_result("0.4.0")["supportedVersions"][4], "1.1.0");
    }
}
