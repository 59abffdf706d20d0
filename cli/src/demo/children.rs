//! The demo's child processes: started from the same binary with their
//! output in a log file each, watched, restarted after a crash, and stopped
//! with the demo.

use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One part of the network, as started.
struct Kid {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Child,
}

/// Every part started, supervised: see [`Children::supervise`].
#[derive(Default)]
pub(super) struct Children(Vec<Kid>);

fn start_child(name: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .env("NO_COLOR", "1")
        .spawn()
        .with_context(|| format!("cannot start {name}"))
}

impl Children {
    pub(super) fn spawn(
        &mut self,
        name: &str,
        args: &[String],
        logs: &Path,
    ) -> anyhow::Result<PathBuf> {
        let log = logs.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&log);
        let child = start_child(name, args, &log)?;
        self.0.push(Kid {
            name: name.to_owned(),
            args: args.to_vec(),
            log: log.clone(),
            child,
        });
        Ok(log)
    }

    pub(super) fn pids(&self) -> BTreeMap<String, u32> {
        self.0
            .iter()
            .map(|k| (k.name.clone(), k.child.id()))
            .collect()
    }

    /// Waits for `what listening on ADDR` in a child's log.
    pub(super) fn wait_listening(
        &mut self,
        name: &str,
        log: &Path,
        what: &str,
    ) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .filter_map(|l| {
                    l.split_once(&format!("{what} listening on "))
                        .map(|(_, r)| r)
                })
                .filter(|r| !r.starts_with("https"))
                .filter_map(|r| r.split_whitespace().next()?.parse().ok())
                .next()
            {
                return Ok(addr);
            }
            if let Some(k) = self.0.iter_mut().find(|k| k.name == name)
                && let Ok(Some(status)) = k.child.try_wait()
            {
                bail!(
                    "{name} exited ({status}) before listening; its log ({}) ends with:\n{}",
                    log.display(),
                    tail(&text, 8)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not start listening within 60 s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reports every part that exited since the last call, and restarts
    /// the ones due (`restart_after` after their death; never for zero).
    /// Returns whether any pid changed.
    pub(super) fn supervise(
        &mut self,
        dead: &mut BTreeMap<String, Instant>,
        restart_after: Duration,
    ) -> bool {
        let mut changed = false;
        for k in &mut self.0 {
            if dead.contains_key(&k.name) {
                continue;
            }
            if let Ok(Some(status)) = k.child.try_wait() {
                let tail_of_log = tail(&std::fs::read_to_string(&k.log).unwrap_or_default(), 3);
                if restart_after.is_zero() {
                    eprintln!(
                        "demo: {} (pid {}) exited ({status}); not restarting it (--restart-after 0s). Its log, {}, ends with:\n{tail_of_log}\nStart it again with: {} {}",
                        k.name,
                        k.child.id(),
                        k.log.display(),
                        std::env::current_exe()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        k.args.join(" ")
                    );
                } else {
                    eprintln!(
                        "demo: {} (pid {}) exited ({status}); restarting it in {}. Its log, {}, ends with:\n{tail_of_log}",
                        k.name,
                        k.child.id(),
                        humantime::format_duration(restart_after),
                        k.log.display()
                    );
                }
                dead.insert(k.name.clone(), Instant::now() + restart_after);
            }
        }
        if restart_after.is_zero() {
            return false;
        }
        let now = Instant::now();
        for k in &mut self.0 {
            if dead.get(&k.name).is_some_and(|due| *due <= now) {
                match start_child(&k.name, &k.args, &k.log) {
                    Ok(c) => {
                        eprintln!("demo: restarted {} (pid {})", k.name, c.id());
                        k.child = c;
                        dead.remove(&k.name);
                        changed = true;
                    }
                    Err(e) => {
                        eprintln!(
                            "demo: cannot restart {}: {e:#}; trying again in {}",
                            k.name,
                            humantime::format_duration(restart_after)
                        );
                        dead.insert(k.name.clone(), now + restart_after);
                    }
                }
            }
        }
        changed
    }

    pub(super) fn stop(&mut self) {
        for k in &self.0 {
            if let Some(pid) = rustix::process::Pid::from_raw(k.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for k in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = k.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = k.child.try_wait() {
                eprintln!("{} did not stop in time; killing it", k.name);
                let _ = k.child.kill();
                let _ = k.child.wait();
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
