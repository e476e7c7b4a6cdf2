//! A CNI invocation: the `CNI_*` environment variables and the network
//! configuration on stdin, parsed and checked before anything is touched.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::spec::{self, code, CniError};
use tunmesh_contract::PluginSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::with(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not a CNI command"),
                    "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
                ))
            }
        })
    }
}

/// The variables an ADD needs (DEL and CHECK need the same but a netns).
pub const ADD_VARIABLES: [&str; 5] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_PATH",
];

/// The environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty for DEL of a container whose namespace is gone.
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAME` and friends); keys
    /// this plugin does not know are accepted and ignored.
    pub args: BTreeMap<String, String>,
}

/// Reads the environment through `get` (std::env::var in the binary).
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let command = match get("CNI_COMMAND") {
        Some(c) if !c.is_empty() => Command::parse(&c)?,
        _ => {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set (this is a CNI plugin, run by a container runtime)",
            ))
        }
    };
    let needs = |name: &str| -> Result<String, CniError> {
        match get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set (required for {command:?})"),
            )),
        }
    };
    let attachment = matches!(command, Command::Add | Command::Del | Command::Check);
    let (container_id, ifname) = if attachment {
        (needs("CNI_CONTAINERID")?, needs("CNI_IFNAME")?)
    } else {
        (String::new(), String::new())
    };
    if attachment {
        if !container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID {container_id:?} has characters other than letters, digits, '-', '_' and '.'"),
            ));
        }
        if ifname.len() > 15
            || ifname.contains('/')
            || ifname.contains(char::is_whitespace)
            || ifname == "."
            || ifname == ".."
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name (at most 15 characters, no '/' or spaces)"),
            ));
        }
    }
    let netns = match command {
        Command::Add | Command::Check => needs("CNI_NETNS")?,
        _ => get("CNI_NETNS").unwrap_or_default(),
    };
    if attachment {
        needs("CNI_PATH")?;
    }
    let mut args = BTreeMap::new();
    for pair in get("CNI_ARGS").unwrap_or_default().split(';') {
        if pair.is_empty() {
            continue;
        }
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                args.insert(k.to_string(), v.to_string());
            }
            _ => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                ))
            }
        }
    }
    Ok(Env {
        command,
        container_id,
        netns,
        ifname,
        args,
    })
}

/// One entry of GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration on stdin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub settings: PluginSettings,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// Parses stdin. Decoding failures and invalid values get their spec codes;
/// fields this plugin does not know (runtimeConfig, args, capabilities...)
/// are accepted.
pub fn parse_conf(stdin: &[u8], command: Command) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::with(
            code::DECODING_FAILURE,
            "the network configuration on stdin is not valid JSON",
            e.to_string(),
        )
    })?;
    let Some(obj) = v.as_object() else {
        return Err(CniError::new(
            code::DECODING_FAILURE,
            "the network configuration on stdin is not a JSON object",
        ));
    };
    let cni_version = match obj.get("cniVersion") {
        Some(Value::String(s)) => s.clone(),
        // VERSION may come without one; everything else must say it.
        None if command == Command::Version => "0.1.0".into(),
        None => return Err(invalid("cniVersion is missing")),
        Some(other) => return Err(invalid(format!("cniVersion {other} is not a string"))),
    };
    if command != Command::Version {
        spec::check_version(&cni_version)?;
        if command == Command::Check && cni_version.starts_with("0.3") {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "CHECK needs CNI version 0.4.0 or later, the configuration says {cni_version}"
                ),
            ));
        }
        if matches!(command, Command::Status | Command::Gc) && cni_version != "1.1.0" {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{command:?} needs CNI version 1.1.0, the configuration says {cni_version}"
                ),
            ));
        }
    }
    let name = match obj.get("name") {
        Some(Value::String(s)) if valid_name(s) => s.clone(),
        Some(Value::String(s)) => {
            return Err(invalid(format!("name {s:?} is not a valid network name (letters, digits, '_', '.', '-', starting with a letter or digit)")))
        }
        None if command == Command::Version => String::new(),
        _ => return Err(invalid("name is missing or not a string")),
    };
    if command != Command::Version {
        match obj.get("type") {
            Some(Value::String(_)) => {}
            _ => return Err(invalid("type is missing or not a string")),
        }
    }
    let default = PluginSettings {
        router_state_dir: PathBuf::from("/var/lib/tunmesh"),
        data_dir: PathBuf::from("/var/lib/tunmesh/cni"),
        log_file: None,
    };
    let path_field = |key: &str, dflt: &PathBuf| -> Result<PathBuf, CniError> {
        match obj.get(key) {
            None => Ok(dflt.clone()),
            Some(Value::String(s)) if s.starts_with('/') => Ok(PathBuf::from(s)),
            Some(other) => Err(invalid(format!("{key} {other} must be an absolute path"))),
        }
    };
    let settings = PluginSettings {
        router_state_dir: path_field("routerStateDir", &default.router_state_dir)?,
        data_dir: path_field("dataDir", &default.data_dir)?,
        log_file: match obj.get("logFile") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.starts_with('/') => Some(PathBuf::from(s)),
            Some(other) => {
                return Err(invalid(format!("logFile {other} must be an absolute path")))
            }
        },
    };
    let valid_attachments = match obj
        .get("cni.dev/valid-attachments")
        .or_else(|| obj.get("cni.dev/attachments"))
    {
        None => None,
        Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
            CniError::with(
                code::DECODING_FAILURE,
                "cni.dev/valid-attachments is not a list of {containerID, ifname}",
                e.to_string(),
            )
        })?),
    };
    Ok(NetConf {
        cni_version,
        name,
        settings,
        prev_result: obj.get("prevResult").cloned(),
        valid_attachments,
    })
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_env(|k| m.get(k).cloned())
    }

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn environment() {
        let e = env(&ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        let mut with_args = ADD.to_vec();
        with_args.push((
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;SOMETHING=else",
        ));
        assert_eq!(env(&with_args).unwrap().args["K8S_POD_NAME"], "web-0");
        for missing in ADD_VARIABLES {
            let pairs: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != missing).collect();
            let err = env(&pairs).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV, "{missing}");
            assert!(err.msg.contains(missing), "{missing}: {}", err.msg);
        }
        let mut bad = ADD.to_vec();
        bad[0] = ("CNI_COMMAND", "FROB");
        assert_eq!(env(&bad).unwrap_err().code, code::INVALID_ENV);
        bad = ADD.to_vec();
        bad[3] = ("CNI_IFNAME", "a-very-long-interface-name");
        assert_eq!(env(&bad).unwrap_err().code, code::INVALID_ENV);
        bad = ADD.to_vec();
        bad[1] = ("CNI_CONTAINERID", "../../etc");
        assert_eq!(env(&bad).unwrap_err().code, code::INVALID_ENV);
        // DEL without a netns is fine.
        let del: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .map(|(k, v)| {
                if k == "CNI_COMMAND" {
                    (k, "DEL")
                } else {
                    (k, v)
                }
            })
            .collect();
        assert_eq!(env(&del).unwrap().netns, "");
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }

    #[test]
    fn configuration() {
        let ok = br#"{"cniVersion":"1.0.0","name":"tunmesh","type":"tunmesh-cni","routerStateDir":"/r","dataDir":"/d","runtimeConfig":{"x":1},"args":{"a":"b"}}"#;
        let c = parse_conf(ok, Command::Add).unwrap();
        assert_eq!(c.settings.router_state_dir, PathBuf::from("/r"));
        assert_eq!(
            parse_conf(b"{not json", Command::Add).unwrap_err().code,
            code::DECODING_FAILURE
        );
        assert_eq!(
            parse_conf(b"[]", Command::Add).unwrap_err().code,
            code::DECODING_FAILURE
        );
        let bad_version = br#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#;
        assert_eq!(
            parse_conf(bad_version, Command::Add).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        let old_check = br#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#;
        assert_eq!(
            parse_conf(old_check, Command::Check).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        let old_gc = br#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#;
        assert_eq!(
            parse_conf(old_gc, Command::Gc).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        let rel = br#"{"cniVersion":"1.0.0","name":"n","type":"t","dataDir":"relative"}"#;
        assert_eq!(
            parse_conf(rel, Command::Add).unwrap_err().code,
            code::INVALID_CONFIG
        );
        let badname = br#"{"cniVersion":"1.0.0","name":"-x","type":"t"}"#;
        assert_eq!(
            parse_conf(badname, Command::Add).unwrap_err().code,
            code::INVALID_CONFIG
        );
        let gc = br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#;
        assert_eq!(
            parse_conf(gc, Command::Gc)
                .unwrap()
                .valid_attachments
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_conf(b"{}", Command::Version).unwrap().cni_version,
            "0.1.0"
        );
    }
}
