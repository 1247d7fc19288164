//! The processes `up` started, and stopping all of them.
//!
//! Every child runs in its own process group, so (1) a Ctrl-C in the terminal reaches only
//! sinewctl, which then stops the mesh in order, and (2) signalling the group also reaches
//! whatever the child started itself (a shell script's children, say): no grandchild outlives
//! the mesh. Each child is reaped by its own task, which reports the exit on a channel.

use std::io;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::{ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};

/// One child has exited (and been reaped).
#[derive(Debug)]
pub struct Exit {
    pub name: String,
    pub status: io::Result<ExitStatus>,
}

struct Proc {
    name: String,
    /// The child's pid, which is also its process group id.
    pgid: i32,
    exited: bool,
    /// How it ended, once reaped.
    status: Option<ExitStatus>,
}

pub struct Children {
    procs: Vec<Proc>,
    exits: mpsc::UnboundedSender<Exit>,
}

impl Children {
    pub fn new() -> (Children, mpsc::UnboundedReceiver<Exit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Children {
                procs: Vec::new(),
                exits: tx,
            },
            rx,
        )
    }

    /// Starts `cmd` in a new process group; returns its pid and its stdout when piped.
    pub fn spawn(
        &mut self,
        name: &str,
        mut cmd: Command,
    ) -> io::Result<(u32, Option<ChildStdout>)> {
        cmd.process_group(0).stdin(std::process::Stdio::null());
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or_default();
        self.procs.push(Proc {
            name: name.to_string(),
            pgid: i32::try_from(pid).unwrap_or_default(),
            exited: false,
            status: None,
        });
        let stdout = child.stdout.take();
        let tx = self.exits.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Exit { name, status });
        });
        Ok((pid, stdout))
    }

    /// Records an exit received from the channel.
    pub fn mark_exited(&mut self, exit: &Exit) {
        for p in self.procs.iter_mut().filter(|p| p.name == exit.name) {
            p.exited = true;
            p.status = exit.status.as_ref().ok().copied();
        }
    }

    /// How the child named `name` ended, once it has been reaped (by [`Children::stop_all`]
    /// or an exit passed to [`Children::mark_exited`]).
    pub fn status(&self, name: &str) -> Option<ExitStatus> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.status)
    }

    /// SIGTERM to every group, up to `grace` for them to go, then SIGKILL to what is left.
    pub async fn stop_all(&mut self, exits: &mut mpsc::UnboundedReceiver<Exit>, grace: Duration) {
        // Apps first, control plane last: reverse start order.
        for p in self.procs.iter().rev() {
            signal_group(p.pgid, Signal::Term);
        }
        if !self.wait_gone(exits, grace).await {
            let left: Vec<&str> = self
                .procs
                .iter()
                .filter(|p| !p.exited || group_exists(p.pgid))
                .map(|p| p.name.as_str())
                .collect();
            eprintln!(
                "still running after {grace:?}, killing: {}",
                left.join(", ")
            );
            for p in &self.procs {
                signal_group(p.pgid, Signal::Kill);
            }
            self.wait_gone(exits, Duration::from_secs(2)).await;
        }
    }

    /// Waits until every child is reaped and every group is empty; false on timeout.
    async fn wait_gone(
        &mut self,
        exits: &mut mpsc::UnboundedReceiver<Exit>,
        limit: Duration,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            while let Ok(exit) = exits.try_recv() {
                self.mark_exited(&exit);
            }
            if self.procs.iter().all(|p| p.exited && !group_exists(p.pgid)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

#[derive(Clone, Copy)]
enum Signal {
    Term,
    Kill,
}

/// Sends a signal to a whole process group. Never to pgid 0 or 1 (that would be our own group
/// or every process we may signal).
fn signal_group(pgid: i32, signal: Signal) {
    let signal = match signal {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    if pgid > 1 {
        kill(-pgid, signal);
    }
}

/// Whether a process group still has members (a zombie counts until it is reaped).
fn group_exists(pgid: i32) -> bool {
    pgid > 1 && (kill(-pgid, 0) || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

#[allow(unsafe_code)]
fn kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) takes two integers and touches no memory of this process; callers never
    // pass -1 or 0 (see `signal_group`).
    unsafe { libc::kill(pid, signal) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_all_ends_children_and_grandchildren() {
        let (mut children, mut exits) = Children::new();
        // A shell that starts a grandchild which ignores SIGTERM, then waits.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sh -c 'trap \"\" TERM; sleep 30' & sleep 30"]);
        let (pid, _) = children.spawn("grand", cmd).unwrap();
        let mut quick = Command::new("sleep");
        quick.arg("30");
        children.spawn("quick", quick).unwrap();
        sleep(Duration::from_millis(200)).await;
        let pgid = i32::try_from(pid).unwrap();
        assert!(group_exists(pgid));
        children
            .stop_all(&mut exits, Duration::from_millis(500))
            .await;
        assert!(!group_exists(pgid));
        assert!(children.procs.iter().all(|p| p.exited));
    }
}
