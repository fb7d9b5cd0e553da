//! The store: the running [`Snapshot`] behind an atomic pointer, reloads,
//! and what must outlive any one snapshot (the state pools, the `server:`
//! settings the process started with).
//!
//! A reload publishes by one swap of one value: the proxy, the connection
//! loops (their client limits, [`LimitsSource`]) and the access log
//! ([`access_log::follow`]) all read the same snapshot, so there is no
//! moment at which some of them see the new configuration and others the
//! old.

use crate::config::file::ServerSection;
use crate::config::{self, compile, ConfigError, ConfigErrors};
use crate::downstream::{Limits, LimitsSource};
use crate::observe::access_log;
use crate::snapshot::{Draws, Listener, Pools, Snapshot};
use arc_swap::ArcSwap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Owns the config file path, the current snapshot, and the state that must
/// outlive any one snapshot.
pub struct ConfigStore {
    path: PathBuf,
    /// Shared with the access log, which writes to its sink.
    current: Arc<ArcSwap<Snapshot>>,
    pools: Pools,
    /// The `server:` section the process started with; changing it takes
    /// a restart or upgrade.
    server: ServerSection,
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
        let pools = Pools::default();
        let loaded = load(path, None, &pools)?;
        pools.commit(loaded.draws);
        let current = Arc::new(ArcSwap::from_pointee(loaded.snapshot));
        access_log::follow(Arc::clone(&current));
        Ok(ConfigStore {
            path: path.to_owned(),
            current,
            pools,
            server: loaded.server,
            status: Mutex::new(ReloadStatus {
                generation: 1,
                ..ReloadStatus::default()
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The snapshot new requests should use, for the start of a request:
    /// no reference count is taken, so hold it only briefly.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
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
        let loaded = match load(&self.path, Some(&old), &self.pools) {
            Ok(loaded) => loaded,
            Err(e) => {
                status.last_reload_error = Some(e.to_string());
                count_reload("error");
                return Err(e);
            }
        };
        let new = loaded.snapshot;
        let shapes = |s: &Snapshot| s.listeners.iter().map(Listener::shape).collect::<Vec<_>>();
        if new.listen != old.listen
            || shapes(&new) != shapes(&old)
            || new.admin != old.admin
            || loaded.server != self.server
        {
            log::warn!(
                "listen (but certificates), admin and server changes in {} take effect only after a process upgrade",
                self.path.display()
            );
        }
        // The one step that publishes: everything reads this snapshot.
        self.current.store(Arc::new(new));
        // Only now, with the new snapshot running, do the pools drop what
        // it no longer uses.
        self.pools.commit(loaded.draws);
        status.generation += 1;
        status.last_reload_error = None;
        count_reload("ok");
        Ok(())
    }

    /// The `server:` settings the process started with.
    pub fn server(&self) -> &ServerSection {
        &self.server
    }

    /// The pools, for the services that work on their states.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A compiled file, not yet running.
struct Loaded {
    snapshot: Snapshot,
    server: ServerSection,
    draws: Draws,
}

/// Reads, parses and compiles the file. The pools are only drawn from: the
/// caller commits the draws once the snapshot runs.
fn load(path: &Path, previous: Option<&Snapshot>, pools: &Pools) -> Result<Loaded, ConfigErrors> {
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
        let base = path.parent().unwrap_or(Path::new("."));
        compile::compile(file, parse_errors, previous, pools, base)
    }));
    match compiled {
        Ok(result) => {
            let compiled = result?;
            Ok(Loaded {
                snapshot: compiled.snapshot,
                server: compiled.server,
                draws: compiled.draws,
            })
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(ConfigErrors(vec![ConfigError::new(
                "",
                format!("internal error while compiling {}: {what}", path.display()),
            )]))
        }
    }
}

fn count_reload(result: &str) {
    if let Some(m) = crate::observe::metrics::metrics() {
        m.config_reloads.with_label_values(&[result]).inc();
    }
}

/// The connection loops' client limits are the running snapshot's.
impl LimitsSource for ConfigStore {
    fn limits(&self) -> Limits {
        self.current.load().limits
    }
}

/// A TLS listener's certificates are the running snapshot's: a reload's
/// new certificates serve the next handshake.
impl crate::downstream::tls::Certificates for ConfigStore {
    fn for_listener(
        &self,
        addr: std::net::SocketAddr,
    ) -> Option<Arc<crate::downstream::tls::CertificateSet>> {
        let snapshot = self.load();
        let tls = snapshot.listener(addr)?.tls.as_ref()?;
        Some(Arc::clone(&tls.certificates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::downstream::LimitsSource;

    /// A config whose limits say which write of the file it is.
    fn write(path: &Path, max_headers: usize) {
        let text = format!(
            "listen: [\"127.0.0.1:1\"]\nlimits: {{ max_headers: {max_headers} }}\nupstreams:\n  app: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app }}\n"
        );
        std::fs::write(path, text).unwrap();
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tollgate-store-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("tollgate.yaml")
    }

    #[test]
    fn the_connection_loops_read_the_limits_of_the_running_snapshot() {
        let path = scratch("limits");
        write(&path, 50);
        let store = ConfigStore::open(&path).unwrap();
        assert_eq!(LimitsSource::limits(&store).max_headers, 50);
        write(&path, 60);
        store.reload().unwrap();
        assert_eq!(LimitsSource::limits(&store).max_headers, 60);
        assert_eq!(store.current().limits, LimitsSource::limits(&store));
        // A file that fails changes nothing anywhere.
        std::fs::write(&path, "routes: [").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(LimitsSource::limits(&store).max_headers, 60);
        assert_eq!(store.status().generation, 2);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn no_reader_sees_new_limits_beside_an_old_snapshot() {
        let path = scratch("swap");
        write(&path, 100);
        let store = ConfigStore::open(&path).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    // Limits first, then the snapshot: were they published
                    // apart (limits first), the snapshot read second could
                    // still be the one before.
                    let limits = LimitsSource::limits(&store).max_headers;
                    let snapshot = store.load().limits.max_headers;
                    assert!(
                        snapshot >= limits,
                        "limits of write {limits}, snapshot of write {snapshot}"
                    );
                    reads += 1;
                }
                reads
            });
            for n in 101..=140 {
                write(&path, n);
                store.reload().unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
