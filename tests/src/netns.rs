//! Network namespace plumbing for the lab. Commands run through `ip netns
//! exec`; sockets are opened on a dedicated thread that enters the namespace
//! with `setns` (a namespace belongs to a thread, never to a tokio task), and
//! keep belonging to that namespace after the thread ends.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs a command to completion, failing with its stderr on a non-zero exit.
pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `CMD ARGS` inside namespace `ns` and returns its output (any exit status).
pub fn exec_output(ns: &str, cmd: &str, args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd} in {ns}"))
}

/// Runs a CNI plugin inside `ns` with exactly the environment `env` (as a
/// runtime does: nothing inherited) and `stdin` as its network configuration.
pub fn run_cni(ns: &str, plugin: &Path, env: &[(&str, &str)], stdin: &str) -> Result<Output> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(plugin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} in {ns}", plugin.display()))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin may refuse its environment before it reads the config;
        // like Go's os/exec (which containerd and cnitool use), a closed pipe
        // is not an error of the caller's.
        match input.write_all(stdin.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
    }
    Ok(child.wait_with_output()?)
}

/// Whether a command succeeded, and all it printed (stdout, then stderr).
pub fn said(out: &Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `CMD ARGS` inside `ns`, failing on a non-zero exit.
pub fn exec(ns: &str, cmd: &str, args: &[&str]) -> Result<String> {
    let out = exec_output(ns, cmd, args)?;
    if !out.status.success() {
        bail!(
            "{cmd} {} in {ns}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `CMD ARGS` in `ns` in the background, output to `log`, in its own
/// process group (so a Ctrl-C at the terminal reaches only the lab, which
/// then stops it in order). `ip netns exec` execs, so the child's PID is the
/// command's.
pub fn spawn(
    ns: &str,
    cmd: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    // Appended, not truncated: a router handing over to a new one started
    // with the same log goes on writing to it for a moment.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn()
        .with_context(|| format!("starting {} in {ns}", cmd.display()))
}

pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

pub fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

/// Creates namespace `ns` with loopback up.
pub fn add_netns(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// Deletes namespace `ns` if it exists.
pub fn del_netns(ns: &str) {
    if netns_exists(ns) {
        let _ = ip(&["netns", "del", ns]);
    }
}

/// Namespaces whose names start with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A veth pair with one end in each namespace; the names never exist in
/// the caller's namespace, so labs cannot collide on them.
pub fn veth(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) -> Result<()> {
    ip(&[
        "link", "add", "name", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b,
        "netns", ns_b,
    ])
}

/// Gives `dev` in `ns` the address `cidr` and brings it up.
pub fn addr_up(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    ip(&["-n", ns, "addr", "add", cidr, "dev", dev])?;
    ip(&["-n", ns, "link", "set", dev, "up"])
}

/// Writes a sysctl inside `ns`.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    exec(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
}

/// Runs `f` on a new thread that has entered namespace `ns`; sockets made
/// there stay in `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = netns_path(ns);
    let handle = std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on a valid namespace fd; affects only this thread,
        // which ends when `f` returns.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a process we started: SIGTERM, then SIGKILL after `grace`; returns
/// once it has exited completely (see `exited`).
pub fn stop_pid(pid: u32, grace: Duration) {
    if exited(pid) {
        return;
    }
    // SAFETY: kill with a PID we started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    if wait_exit(pid, grace).is_none() {
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let _ = wait_exit(pid, Duration::from_secs(2));
    }
}

/// Whether `pid` has exited completely. Our own child is reaped here: wait
/// reports a thread-group leader only once every one of its threads is
/// gone, and with them its sockets and devices (a SIGKILLed process's
/// leader shows as a zombie while its other threads still hold them).
/// Another process counts as exited once it no longer runs.
pub fn exited(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a specific pid.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    match r {
        r if r == pid as libc::pid_t => true,
        0 => false,
        // ECHILD: not our child, or reaped already.
        _ => !is_running(pid),
    }
}

/// Waits up to `timeout` for `pid` to exit completely; the moment it was
/// seen gone.
pub fn wait_exit(pid: u32, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if exited(pid) {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// True when `pid` exists but has exited (zombie).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// True when `pid` is running (not exited).
pub fn is_running(pid: u32) -> bool {
    // SAFETY: signal 0 only probes.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) == 0 };
    exists && !is_zombie(pid)
}

/// Removes ad-hoc namespaces, processes and files when dropped (for tests
/// that build their own topology instead of a `Lab`).
#[derive(Default)]
pub struct Cleanup {
    pub children: Vec<Child>,
    pub pids: Vec<u32>,
    pub netns: Vec<String>,
    pub files: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for mut child in self.children.drain(..) {
            stop_pid(child.id(), Duration::from_secs(3));
            let _ = child.wait();
        }
        for pid in self.pids.drain(..) {
            stop_pid(pid, Duration::from_secs(3));
        }
        for ns in self.netns.drain(..) {
            del_netns(&ns);
        }
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(&f).or_else(|_| std::fs::remove_dir_all(&f));
        }
    }
}

/// A short random hex id for names that must not collide between runs.
pub fn run_id() -> String {
    let mut b = [0u8; 3];
    let _ = File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    format!(
        "{:02x}{:02x}{:02x}{:x}",
        b[0],
        b[1],
        b[2],
        std::process::id() % 16
    )
}

/// Stops every process inside the namespaces named `prefix*` and deletes
/// those namespaces (pods first: longest names first).
pub fn purge_prefix(prefix: &str) {
    for ns in list_netns(prefix) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
            {
                stop_pid(pid, Duration::from_secs(2));
            }
        }
    }
    let mut all = list_netns(prefix);
    all.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in all {
        del_netns(&ns);
    }
}

static PURGE_ON_SIGNAL: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Names the namespace prefix a Ctrl-C handler should purge (`None`: nothing).
pub fn set_purge_on_signal(prefix: Option<String>) {
    if let Ok(mut p) = PURGE_ON_SIGNAL.lock() {
        *p = prefix;
    }
}

pub fn purge_on_signal() -> Option<String> {
    PURGE_ON_SIGNAL.lock().map(|p| p.clone()).unwrap_or(None)
}
