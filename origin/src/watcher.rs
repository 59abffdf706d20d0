//! The file-alteration monitor half: inotify (via `notify`) on the content
//! directory, recursively. Events trigger a scan of the paths they name;
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

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
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

    fn apply(&self, ev: &notify::Event) {
        if let Ok(mut s) = self.state.lock() {
            if ev.need_rescan() {
                s.overflow = true;
            }
            for p in &ev.paths {
                s.add(p.clone());
            }
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

    /// Applies one event.
    fn apply(&self, ev: &notify::Event) {
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                ev.paths.iter().for_each(|p| self.finished(p));
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                ev.paths.iter().for_each(|p| self.finished(p));
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let [from, to] = ev.paths.as_slice() {
                    self.gone(from);
                    self.finished(to);
                }
            }
            EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => {
                ev.paths.iter().for_each(|p| self.gone(p));
            }
            EventKind::Create(CreateKind::Folder) => {}
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                ev.paths.iter().for_each(|p| self.written(p));
            }
            _ => {}
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

/// Starts watching; the watcher stops when the returned value is dropped.
pub(crate) fn watch(
    dir: &Path,
    signal: Arc<ChangeSignal>,
) -> notify::Result<notify::RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            signal.closes.apply(&ev);
            // Opens and reads change nothing; a close after writing does.
            let close_write = matches!(
                ev.kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
            );
            if !ev.kind.is_access() || close_write || ev.need_rescan() {
                signal.changed.apply(&ev);
                signal.poke();
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watcher error; rescanning everything");
            signal.changed.everything();
            signal.poke();
        }
    };
    // Never through a symlink: a symlinked directory is published as the
    // symlink it is, and one pointing outside the content must not bring
    // in events (and paths) from there.
    let mut w = notify::RecommendedWatcher::new(
        handler,
        notify::Config::default().with_follow_symlinks(false),
    )?;
    w.watch(dir, RecursiveMode::Recursive)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::Event;

    fn ev(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn a_file_is_finished_when_closed_or_renamed_in_and_not_once_written_again() {
        let c = Closes::default();
        let data = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        c.apply(&ev(EventKind::Create(CreateKind::File), &["/c/a"]));
        c.apply(&ev(data, &["/c/a"]));
        assert!(
            c.any_writing(std::time::Duration::from_secs(60))
                && c.finished_at(Path::new("/c/a")).is_none()
        );
        c.apply(&ev(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/c/a"],
        ));
        assert!(
            !c.any_writing(std::time::Duration::from_secs(60))
                && c.finished_at(Path::new("/c/a")).is_some()
        );
        c.apply(&ev(data, &["/c/a"]));
        assert!(
            c.any_writing(std::time::Duration::from_secs(60))
                && c.finished_at(Path::new("/c/a")).is_none()
        );
        c.apply(&ev(
            EventKind::Remove(notify::event::RemoveKind::File),
            &["/c/a"],
        ));
        assert!(!c.any_writing(std::time::Duration::from_secs(60)));
        c.apply(&ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &["/c/.tmp", "/c/b"],
        ));
        assert!(c.finished_at(Path::new("/c/b")).is_some());
        c.forget_before(SystemTime::now() + std::time::Duration::from_secs(1));
        assert!(c.finished_at(Path::new("/c/b")).is_none());
    }
}
