//! The file-alteration monitor half: inotify on the content directory,
//! recursively (a watch on every directory, added as directories appear).
//! Events trigger a scan of the paths they name;
//! the scan itself decides what changed at each (a `lstat`, and a hash
//! only if the stat cache does not know the file). A lost event (inotify
//! queue overflow) makes the next scan a full one; the periodic full
//! rescan backs up what inotify never reports (mmap writes, another
//! host's NFS writes).
//!
//! The paths it reports are kept ([`Changed`]) so that a publish looks at
//! those only; an overflowed queue or a watcher error makes the next scan
//! a full one.
//!
//! It also tells finished files from files still being written, so a
//! finished one is published at once rather than after the quiet period:
//! a file is *finished* when it was closed after writing (`IN_CLOSE_WRITE`)
//! or renamed into place (`IN_MOVED_TO`) and has not been written since;
//! it is *being written* from a create or a write until then
//! ([`Closes`]).

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::Notify;

/// Counts change events and wakes the publish loop.
#[derive(Debug, Default)]
pub(crate) struct ChangeSignal {
    pub events: AtomicU64,
    pub wake: Notify,
    pub closes: Arc<Closes>,
    pub changed: Arc<Changed>,
}

/// The paths inotify reported changed since the last scan took them, so
/// that a publish re-examines only those ([`crate::scan::scan_paths`]).
/// When the kernel's event queue overflowed, the watcher failed, or more
/// paths changed than [`MAX_CHANGED`], it says so instead: the next scan
/// is a full one.
#[derive(Debug, Default)]
pub struct Changed {
    state: Mutex<ChangedState>,
}

#[derive(Debug, Default)]
struct ChangedState {
    paths: std::collections::HashSet<PathBuf>,
    overflow: bool,
}

/// Changed paths kept at most between two scans; past it, the next scan
/// walks the whole tree (which is then cheaper than a lookup per path).
pub const MAX_CHANGED: usize = 100_000;

/// What changed since the last scan.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// These absolute paths (and, for a directory, everything below it).
    Paths(Vec<PathBuf>),
    /// Unknown: look at everything.
    Everything,
}

impl Changed {
    /// Takes what changed since the last call.
    pub fn take(&self) -> Changes {
        let Ok(mut s) = self.state.lock() else {
            return Changes::Everything;
        };
        let s = std::mem::take(&mut *s);
        if s.overflow {
            Changes::Everything
        } else {
            Changes::Paths(s.paths.into_iter().collect())
        }
    }

    /// Makes the next [`Changed::take`] say everything (a scan that failed
    /// gives its paths back this way).
    pub fn everything(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.overflow = true;
            s.paths = Default::default();
        }
    }

    /// Adds paths a scan must look at again (files still settling).
    pub fn again(&self, paths: impl IntoIterator<Item = PathBuf>) {
        if let Ok(mut s) = self.state.lock() {
            for p in paths {
                s.add(p);
            }
        }
    }

    fn add(&self, p: PathBuf) {
        if let Ok(mut s) = self.state.lock() {
            s.add(p);
        }
    }
}

impl ChangedState {
    fn add(&mut self, p: PathBuf) {
        if self.overflow {
            return;
        }
        if self.paths.len() >= MAX_CHANGED {
            self.overflow = true;
            self.paths = Default::default();
            return;
        }
        self.paths.insert(p);
    }
}

/// Which files were finished when, and which are being written.
#[derive(Debug, Default)]
pub struct Closes {
    state: Mutex<CloseState>,
}

#[derive(Debug, Default)]
struct CloseState {
    /// Finished files (absolute paths), with when the event was seen: a
    /// file whose mtime and ctime are not later is published at once.
    finished: HashMap<PathBuf, SystemTime>,
    /// Files created or written and not closed since, with their last
    /// write event.
    writing: HashMap<PathBuf, SystemTime>,
    /// The newest finish and the newest write event: the publish loop asks
    /// after every event, so its questions are O(1).
    last_finished: Option<SystemTime>,
    last_write: Option<SystemTime>,
}

/// Files kept in the finished map at most: past it (more files finished
/// within one quiet period), the rest wait for the quiet period, as
/// without events. Entries leave it after each publish.
const MAX_FINISHED: usize = 100_000;

impl Closes {
    /// When `path` was finished, if it was and has not been written since.
    pub fn finished_at(&self, path: &Path) -> Option<SystemTime> {
        let s = self.state.lock().ok()?;
        if s.finished.is_empty() {
            return None;
        }
        // The watcher reports absolute paths; a relative content
        // directory is made absolute the same way.
        if path.is_relative() {
            let abs = std::path::absolute(path).ok()?;
            return s.finished.get(&abs).copied();
        }
        s.finished.get(path).copied()
    }

    /// Whether any file was written within `quiet` and not closed since
    /// (the publish then waits for the quiet period). A write whose close
    /// was lost (an overflowed event queue) stops counting after `quiet`.
    pub fn any_writing(&self, quiet: std::time::Duration) -> bool {
        let since = SystemTime::now() - quiet;
        self.state
            .lock()
            .is_ok_and(|s| !s.writing.is_empty() && s.last_write.is_some_and(|t| t >= since))
    }

    /// Whether a file was finished at or after `t` (a publish that started
    /// before then has not taken it yet).
    pub fn finished_since(&self, t: SystemTime) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.last_finished.is_some_and(|f| f >= t))
    }

    /// Whether the newest finish is within `d` of now: files are still
    /// arriving finished (a copy or an rsync into the content directory).
    pub fn finishing(&self, d: std::time::Duration) -> bool {
        let since = SystemTime::now() - d;
        self.state
            .lock()
            .is_ok_and(|s| s.last_finished.is_some_and(|f| f >= since))
    }

    /// Forgets finished files seen before `before` (the quiet rule covers
    /// them by then).
    pub fn forget_before(&self, before: SystemTime) {
        if let Ok(mut s) = self.state.lock() {
            s.finished.retain(|_, t| *t >= before);
            s.writing.retain(|_, t| *t >= before);
        }
    }

    fn written(&self, p: &Path) {
        if let Ok(mut s) = self.state.lock() {
            s.finished.remove(p);
            let now = SystemTime::now();
            s.writing.insert(p.to_path_buf(), now);
            s.last_write = Some(now);
        }
    }

    fn finished(&self, p: &Path) {
        if let Ok(mut s) = self.state.lock() {
            s.writing.remove(p);
            if s.finished.len() < MAX_FINISHED || s.finished.contains_key(p) {
                let now = SystemTime::now();
                s.finished.insert(p.to_path_buf(), now);
                s.last_finished = Some(now);
            }
        }
    }

    fn gone(&self, p: &Path) {
        if let Ok(mut s) = self.state.lock() {
            s.finished.remove(p);
            // A directory removed or renamed away takes what was being
            // written below it.
            s.writing.retain(|w, _| !w.starts_with(p));
        }
    }
}

impl ChangeSignal {
    pub(crate) fn poke(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }
    pub(crate) fn count(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// What is asked of inotify on each directory: changes only. Not opens,
/// reads or closes without writing (`IN_OPEN`, `IN_ACCESS`,
/// `IN_CLOSE_NOWRITE`): every download of a linked file and every
/// directory the scan lists would be an event, and a full scan of a big
/// tree would overflow the kernel's queue by itself. Never through a
/// symlink (`IN_DONT_FOLLOW`, `IN_ONLYDIR`): a symlinked directory is
/// published as the symlink it is.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::MOVE_SELF
        | WatchMask::DONT_FOLLOW
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// The watches: one per directory, by descriptor.
struct Watches {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// The content directory (absolute).
    top: PathBuf,
    /// Directories that could not be watched (and were said so), so that
    /// each is warned about once.
    refused: std::collections::HashSet<PathBuf>,
}

impl Watches {
    /// Watches `dir` and every directory below it (not through symlinks).
    /// Only the content directory itself failing is an error: below it, a
    /// directory that cannot be watched (unreadable, or past the kernel's
    /// watch limit) is logged, and the scans (which report it, and the
    /// periodic full rescan) cover it.
    fn add_tree(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            match self.inotify.watches().add(&d, mask()) {
                Ok(wd) => {
                    self.refused.remove(&d);
                    self.dirs.insert(wd, d.clone());
                }
                Err(e) if d == self.top => return Err(e),
                Err(e) => {
                    if self.refused.insert(d.clone()) {
                        let fix = if e.raw_os_error()
                            == Some(rustix::io::Errno::NOSPC.raw_os_error())
                        {
                            "raise fs.inotify.max_user_watches (sysctl); until then the periodic rescan finds its changes"
                        } else {
                            "its changes are found by the periodic rescan"
                        };
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory; {fix}");
                    }
                    continue;
                }
            }
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for dent in rd.flatten() {
                if dent.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(dent.path());
                }
            }
        }
        Ok(())
    }

    /// A watched directory left the tree: its watches (and those below
    /// it) go.
    fn left(&mut self, from: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, p)| p.starts_with(from))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.watches().remove(wd);
        }
    }

    /// Applies the events of one read: each path to `signal`, and the
    /// watches kept in step with directories created, moved and removed.
    fn apply(
        &mut self,
        events: Vec<(WatchDescriptor, EventMask, u32, Option<std::ffi::OsString>)>,
        signal: &ChangeSignal,
    ) {
        // A directory moved away: its move-in (same cookie) comes in the
        // same read when it stays in the tree.
        let mut moved_from: HashMap<u32, PathBuf> = HashMap::new();
        let mut any = false;
        for (wd, mask, cookie, name) in events {
            if mask.contains(EventMask::Q_OVERFLOW) {
                signal.changed.everything();
                any = true;
                continue;
            }
            if mask.contains(EventMask::IGNORED) {
                self.dirs.remove(&wd);
                continue;
            }
            let Some(dir) = self.dirs.get(&wd) else {
                continue;
            };
            let Some(name) = name else {
                // About the watched directory itself: its parent's event
                // says what happened, except for the top.
                if dir == &self.top
                    && mask.intersects(
                        EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT,
                    )
                {
                    tracing::warn!(dir = %dir.display(), "the content directory itself was moved or removed; scanning everything");
                    signal.changed.everything();
                    any = true;
                }
                continue;
            };
            let path = dir.join(name);
            let is_dir = mask.contains(EventMask::ISDIR);
            let closes = &signal.closes;
            if mask.contains(EventMask::CLOSE_WRITE) {
                closes.finished(&path);
            } else if mask.contains(EventMask::MOVED_TO) {
                if is_dir {
                    // Moved in from outside, or within: watch what is
                    // there. Watches already there (a move within) are
                    // the same descriptors, now named by the new paths.
                    moved_from.remove(&cookie);
                    let _ = self.add_tree(&path);
                } else {
                    closes.finished(&path);
                }
            } else if mask.intersects(EventMask::MOVED_FROM | EventMask::DELETE) {
                closes.gone(&path);
                if is_dir && mask.contains(EventMask::MOVED_FROM) {
                    moved_from.insert(cookie, path.clone());
                }
            } else if mask.contains(EventMask::CREATE) {
                if is_dir {
                    let _ = self.add_tree(&path);
                } else {
                    closes.written(&path);
                }
            } else if mask.contains(EventMask::MODIFY) {
                closes.written(&path);
            }
            signal.changed.add(path);
            any = true;
        }
        for from in moved_from.into_values() {
            self.left(&from);
        }
        if any {
            signal.poke();
        }
    }
}

/// The running watch; it stops when dropped.
pub(crate) struct Watch {
    stop: rustix::fd::OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts watching `dir` (every directory below it, on a thread of its
/// own). Fails only if `dir` itself cannot be watched.
pub(crate) fn watch(dir: &Path, signal: Arc<ChangeSignal>) -> std::io::Result<Watch> {
    let top = std::path::absolute(dir)?;
    let mut w = Watches {
        inotify: Inotify::init()?,
        dirs: HashMap::new(),
        top: top.clone(),
        refused: Default::default(),
    };
    w.add_tree(&top)?;
    let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
    let stop2 = stop.try_clone()?;
    let thread = std::thread::Builder::new()
        .name("inotify".into())
        .spawn(move || run(w, stop2, signal))?;
    Ok(Watch {
        stop,
        thread: Some(thread),
    })
}

/// The watch thread: waits for events (or the stop), applies them.
fn run(mut w: Watches, stop: rustix::fd::OwnedFd, signal: Arc<ChangeSignal>) {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let ready = {
            let mut fds = [
                PollFd::new(&w.inotify, PollFlags::IN),
                PollFd::new(&stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => (!fds[0].revents().is_empty(), !fds[1].revents().is_empty()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "file watcher failed; from now on changes are found only by the periodic rescan (restart the origin to watch again)");
                    signal.changed.everything();
                    signal.poke();
                    return;
                }
            }
        };
        if ready.1 {
            return;
        }
        if !ready.0 {
            continue;
        }
        let events: Vec<_> = match w.inotify.read_events(&mut buf) {
            Ok(evs) => evs
                .map(|e| (e.wd, e.mask, e.cookie, e.name.map(|n| n.to_os_string())))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "file watcher error; rescanning everything");
                signal.changed.everything();
                signal.poke();
                continue;
            }
        };
        w.apply(events, &signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    /// Takes what changed until `want` is among it (deadline 10 s).
    fn until(signal: &ChangeSignal, want: &Path) -> HashSet<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = HashSet::new();
        loop {
            match signal.changed.take() {
                Changes::Paths(p) => seen.extend(p),
                Changes::Everything => panic!("the watcher lost events"),
            }
            if seen.contains(want) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{} not reported: {seen:?}",
                want.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until `path` is finished (its close may come in a later read
    /// than its create; deadline 10 s).
    fn until_finished(signal: &ChangeSignal, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while signal.closes.finished_at(path).is_none() {
            assert!(
                Instant::now() < deadline,
                "{} never finished",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn changes_below_new_and_moved_directories_are_reported_and_reads_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = dir.path().join("c");
        std::fs::create_dir_all(c.join("sub")).expect("mkdir");
        std::fs::write(c.join("sub/old"), b"x").expect("write");
        let signal = Arc::new(ChangeSignal::default());
        let _w = watch(&c, signal.clone()).expect("watch");

        // Written and closed: finished, and changed.
        std::fs::write(c.join("sub/a"), b"a").expect("write");
        until(&signal, &c.join("sub/a"));
        until_finished(&signal, &c.join("sub/a"));

        // Reads are no events: after a read, the next change is alone.
        std::fs::read(c.join("sub/old")).expect("read");
        let _ = std::fs::read_dir(c.join("sub")).expect("list").count();
        std::fs::write(c.join("marker"), b"m").expect("write");
        let seen = until(&signal, &c.join("marker"));
        assert_eq!(seen, HashSet::from([c.join("marker")]));

        // A new directory is watched before it is reported.
        std::fs::create_dir(c.join("new")).expect("mkdir");
        until(&signal, &c.join("new"));
        std::fs::write(c.join("new/f"), b"f").expect("write");
        until(&signal, &c.join("new/f"));
        until_finished(&signal, &c.join("new/f"));

        // Moved within the tree: its watch names the new path.
        std::fs::rename(c.join("new"), c.join("moved")).expect("rename");
        let seen = until(&signal, &c.join("moved"));
        assert!(seen.contains(&c.join("new")), "{seen:?}");
        std::fs::write(c.join("moved/g"), b"g").expect("write");
        let seen = until(&signal, &c.join("moved/g"));
        assert!(!seen.contains(&c.join("new/g")), "{seen:?}");

        // Moved out of the tree: nothing from there any more.
        std::fs::rename(c.join("moved"), dir.path().join("outside")).expect("rename");
        until(&signal, &c.join("moved"));
        std::fs::write(dir.path().join("outside/h"), b"h").expect("write");
        std::fs::write(c.join("marker2"), b"m").expect("write");
        let seen = until(&signal, &c.join("marker2"));
        assert_eq!(seen, HashSet::from([c.join("marker2")]));

        // Removed: gone, and reported.
        std::fs::remove_file(c.join("sub/a")).expect("rm");
        until(&signal, &c.join("sub/a"));
        assert!(signal.closes.finished_at(&c.join("sub/a")).is_none());
    }
}
