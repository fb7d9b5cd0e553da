//! The running configuration: an immutable [`Snapshot`] behind an atomic
//! pointer, and the [`ConfigStore`] that loads and swaps it.
//!
//! A request takes one reference to the snapshot when it starts and uses it
//! to the end, so a reload never changes a request halfway: in-flight
//! requests finish on the old snapshot, new ones see the new one.

use crate::config::file::ServerSection;
use crate::config::{self, compile, ConfigError, ConfigErrors};
use crate::downstream::{Limits, SharedLimits};
use crate::router::{Route, RouteIndex};
use crate::upstream::health::HealthPool;
use crate::upstream::Cluster;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// One compiled, validated configuration.
#[derive(Debug)]
pub struct Snapshot {
    /// What clients may send.
    pub limits: Limits,
    /// Whether a sane client `X-Request-Id` is kept.
    pub trust_request_id: bool,
    pub index: RouteIndex,
    /// Routes in file order; the index refers to them by position.
    pub routes: Vec<Route>,
    /// Upstreams in name order; routes refer to them by position.
    pub clusters: Vec<Arc<Cluster>>,
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Upstreams that must have a healthy target for `/readyz` to pass.
    pub readyz_requires: Vec<String>,
    pub server: ServerSection,
}

impl Snapshot {
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// Owns the config file path, the current snapshot, and the state that must
/// outlive any one snapshot (health probes).
pub struct ConfigStore {
    path: PathBuf,
    current: ArcSwap<Snapshot>,
    /// The running snapshot's client limits, for the connection loop.
    limits: Arc<SharedLimits>,
    health: HealthPool,
    /// Serializes reloads and records how they went; requests never take it.
    status: Mutex<ReloadStatus>,
}

/// The history an operator asks about: how many configs were loaded, how many
/// reloads were tried, and why the last one failed, if it did.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// 1 for the config loaded at start, +1 per successful reload.
    pub generation: u64,
    pub reload_attempts: u64,
    pub last_reload_error: Option<String>,
}

impl ConfigStore {
    /// Loads and compiles the file; the store starts serving that snapshot.
    pub fn open(path: &Path) -> Result<ConfigStore, ConfigErrors> {
        let health = HealthPool::default();
        let snapshot = load(path, None, &health)?;
        Ok(ConfigStore {
            path: path.to_owned(),
            limits: Arc::new(SharedLimits::new(snapshot.limits)),
            current: ArcSwap::from_pointee(snapshot),
            health,
            status: Mutex::new(ReloadStatus {
                generation: 1,
                ..ReloadStatus::default()
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The running configuration's client limits, kept current across
    /// reloads.
    pub fn limits(&self) -> Arc<SharedLimits> {
        Arc::clone(&self.limits)
    }

    /// The snapshot new requests should use.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads the file and, if it is valid, swaps it in. On any error the
    /// running snapshot stays as it was. Blocks on file I/O and DNS: call it
    /// off the request path.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.reload_attempts += 1;
        let old = self.current();
        let new = match load(&self.path, Some(&old), &self.health) {
            Ok(new) => new,
            Err(e) => {
                status.last_reload_error = Some(e.to_string());
                return Err(e);
            }
        };
        if new.listen != old.listen || new.admin != old.admin || new.server != old.server {
            log::warn!(
                "listen, admin and server changes in {} take effect only after a process upgrade",
                self.path.display()
            );
        }
        self.limits.publish(new.limits);
        self.current.store(Arc::new(new));
        status.generation += 1;
        status.last_reload_error = None;
        Ok(())
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Reads, parses and compiles the file; on success the health pool keeps
/// exactly the probes the new snapshot uses.
fn load(
    path: &Path,
    previous: Option<&Snapshot>,
    health: &HealthPool,
) -> Result<Snapshot, ConfigErrors> {
    // Checked before reading, so a wrong path to a huge file costs nothing.
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.len() > config::MAX_FILE_BYTES {
            return Err(ConfigErrors(vec![ConfigError::new(
                "",
                format!(
                    "{} is {} bytes; at most {} are read",
                    path.display(),
                    meta.len(),
                    config::MAX_FILE_BYTES
                ),
            )]));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )])
    })?;
    // A bug in the compiler must cost a reload, never the process: a panic
    // is reported like any invalid file and the running snapshot stays.
    let compiled = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let (file, parse_errors) = config::parse_partial(&text)?;
        compile::compile(file, parse_errors, previous, health)
    }));
    let (snapshot, probes) = match compiled {
        Ok(result) => result?,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            return Err(ConfigErrors(vec![ConfigError::new(
                "",
                format!("internal error while compiling {}: {what}", path.display()),
            )]));
        }
    };
    health.retain(probes);
    Ok(snapshot)
}
