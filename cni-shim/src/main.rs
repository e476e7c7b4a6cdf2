//! `tunmesh-cni`: reads the CNI environment and stdin, runs the command,
//! prints the result or the spec's error object on stdout (and nothing else
//! there), logs to stderr or the configured log file.

use std::io::{Read, Write};
use std::process::ExitCode;

use tunmesh_cni::request::{self, Command};
use tunmesh_cni::spec::{self, code, CniError};

fn main() -> ExitCode {
    let env = match request::parse_env(|k| std::env::var(k).ok()) {
        Ok(env) => env,
        Err(e) => return fail(&e, spec::LATEST, None),
    };
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let e = CniError::with(
            code::IO_FAILURE,
            "reading the network configuration from stdin",
            e.to_string(),
        );
        return fail(&e, spec::LATEST, None);
    }
    if env.command == Command::Version && stdin.iter().all(u8::is_ascii_whitespace) {
        stdin = b"{}".to_vec();
    }
    let conf = match request::parse_conf(&stdin, env.command) {
        Ok(c) => c,
        Err(e) => {
            // Answer in the request's version when it is one we speak.
            let v = serde_json::from_slice::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
                .filter(|v| spec::is_supported(v))
                .unwrap_or_else(|| spec::LATEST.to_string());
            return fail(&e, &v, None);
        }
    };
    let log = conf.settings.log_file.clone();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = CniError::with(code::IO_FAILURE, "starting the runtime", e.to_string());
            return fail(&e, &conf.cni_version, log.as_deref());
        }
    };
    match rt.block_on(tunmesh_cni::plugin::run(&env, &conf)) {
        Ok(out) => {
            if let Some(v) = &out {
                let mut stdout = std::io::stdout().lock();
                let _ = serde_json::to_writer(&mut stdout, v);
                let _ = stdout.write_all(b"\n");
            }
            if env.command != Command::Version {
                logln(
                    log.as_deref(),
                    &format!(
                        "{:?} container={} ifname={} netns={} ok{}",
                        env.command,
                        env.container_id,
                        env.ifname,
                        env.netns,
                        out.as_ref()
                            .map(|v| format!(": {}", v["ips"]))
                            .unwrap_or_default()
                    ),
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            logln(
                log.as_deref(),
                &format!(
                    "{:?} container={} ifname={} netns={} failed: {e}",
                    env.command, env.container_id, env.ifname, env.netns
                ),
            );
            fail(&e, &conf.cni_version, None)
        }
    }
}

/// One log line to the log file (appended) or stderr; never stdout.
fn logln(file: Option<&std::path::Path>, line: &str) {
    let line = format!("tunmesh-cni[{}]: {line}\n", std::process::id());
    let written = file.is_some_and(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .is_ok()
    });
    if !written {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

fn fail(e: &CniError, version: &str, log: Option<&std::path::Path>) -> ExitCode {
    if let Some(p) = log {
        logln(Some(p), &format!("error: {e}"));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut stdout, &e.to_json(version));
    let _ = stdout.write_all(b"\n");
    ExitCode::FAILURE
}
