//! The one shutdown primitive: a component makes a [`Shutdown`], hands a
//! [`Stopping`] to each of its loops (async tasks and blocking threads
//! alike), and triggers it once to stop them all. A loop waits on
//! [`Stopping::wait`] beside its work, or checks [`Stopping::is_set`]
//! between steps; both see a trigger that happened before they looked.

use tokio::sync::watch;

/// The trigger.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

/// A loop's view of the trigger (cheap to clone).
#[derive(Debug, Clone)]
pub struct Stopping(watch::Receiver<bool>);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown(watch::channel(false).0)
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn subscribe(&self) -> Stopping {
        Stopping(self.0.subscribe())
    }
    /// Stops every loop holding a [`Stopping`] of this one (idempotent).
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Stopping {
    /// Returns once the shutdown is triggered (at once if it already was,
    /// or if the trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_trigger_before_or_after_the_wait_is_seen() {
        let s = Shutdown::new();
        let mut early = s.subscribe();
        assert!(!early.is_set());
        let waiter = tokio::spawn(async move { early.wait().await });
        s.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        let mut late = s.subscribe();
        assert!(late.is_set());
        tokio::time::timeout(std::time::Duration::from_secs(5), late.wait())
            .await
            .expect("already triggered");
        s.trigger();
        assert!(s.subscribe().is_set(), "triggering twice is harmless");
    }
}
