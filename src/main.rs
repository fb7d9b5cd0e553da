//! The `tollgate` binary: command line and server bootstrap only.
//!
//! `tollgate -c FILE` runs; `-t` validates FILE and exits; `-d` (daemon) and
//! `-u` (take over the listeners of a running instance) keep their Pingora
//! meaning.

use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::protocols::ALPN;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tollgate::admin::AdminApp;
use tollgate::auth::jwt::remote::RefreshService;
use tollgate::config::file::ServerSection;
use tollgate::downstream::drain::{DrainService, DEFAULT_DRAIN_IDLE};
use tollgate::downstream::tls::SniCallbacks;
use tollgate::downstream::{ConnectionGauge, KeepaliveSettings, LeanKeepalive};
use tollgate::limit::gcra::SweepService;
use tollgate::limit::redis::ConnectService;
use tollgate::memory::ReturnMemory;
use tollgate::observe::access_log::ReopenService;
use tollgate::proxy::Gateway;
use tollgate::reload::ReloadService;
use tollgate::snapshot::TlsVersion;
use tollgate::store::ConfigStore;
use tollgate::upstream::health::HealthService;

/// jemalloc serves the proxy's many small, short-lived allocations with
/// fewer instructions than glibc's malloc (docs/performance.md,
/// "Allocator"); the feature is on by default.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const DEFAULT_CONFIG: &str = "/etc/tollgate/tollgate.yaml";

/// Client connections read straight into the HTTP parser's own buffer.
/// Pingora's default puts a 64 KiB read buffer in front of every
/// connection. For plain HTTP it costs 64 KiB of memory per idle keepalive
/// client and saves nothing: the parser reads into its own buffer.
const PLAIN_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: None,
};
/// Under TLS the buffer is kept: OpenSSL reads each record's 5-byte header
/// and then its body, two system calls per record without it
/// (docs/performance.md, "TLS and HTTP/2").
const TLS_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: None,
    write: None,
};
/// Pingora waits out the whole grace period on a graceful stop, busy or not;
/// its 300 s default makes every restart take five minutes.
const DEFAULT_GRACE_SECONDS: u64 = 30;
const DEFAULT_KEEPALIVE_SECONDS: u64 = 60;

/// Where the PID file and the upgrade socket go unless the file says
/// otherwise: root-owned, unlike /tmp, where another user could plant a
/// socket for the next upgrade to hand the listeners to.
const RUN_DIR: &str = "/run/tollgate";

fn main() -> ExitCode {
    // SIGHUP's default action ends the process. Until the reload service
    // installs its handler, a reload sent early (systemd's ExecReload right
    // after start) would kill the gateway; ignored, it is just missed.
    ignore_hangups_until_ready();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    // `tollgate explain ...` is tollgate's own command, not Pingora's.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("explain") {
        return tollgate::explain::run(&args[2..], DEFAULT_CONFIG);
    }
    let mut opt = Opt::parse_args();
    // `-c` names tollgate's file; Pingora must not read it as its own.
    let path = PathBuf::from(opt.conf.take().unwrap_or_else(|| DEFAULT_CONFIG.to_owned()));

    let store = match ConfigStore::open(&path) {
        Ok(store) => store,
        Err(errors) => {
            eprintln!("tollgate: configuration errors in {}:", path.display());
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    if opt.test {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }

    let snapshot = store.current();
    if let Err(e) = ensure_run_dir(store.server()) {
        eprintln!("tollgate: {e}");
        return ExitCode::FAILURE;
    }
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(store.server()));
    // Bootstrap (with `-u`: receiving the listening sockets from the old
    // process) runs as a service, after Pingora daemonizes: only then does
    // it know the parent to tell, with `-d`, that the daemon is up, so the
    // parent (systemd's ExecStart/ExecReload) returns. Done here, before
    // the fork, the parent would wait for its whole timeout.
    let bootstrap = server.bootstrap_as_a_service();
    let store = Arc::new(store);

    let proxy = pingora::proxy::http_proxy(&server.configuration, Gateway::new(Arc::clone(&store)));
    let connections = Arc::new(ConnectionGauge::default());
    let mut proxy = Service::new(
        "tollgate".to_owned(),
        LeanKeepalive::new(
            proxy,
            keepalive(store.server()),
            Arc::clone(&connections),
            Arc::clone(&store) as Arc<dyn tollgate::downstream::LimitsSource>,
        )
        .with_h2c(
            snapshot
                .listeners
                .iter()
                .filter(|l| l.h2c)
                .map(|l| l.addr)
                .collect(),
        ),
    );
    for listener in &snapshot.listeners {
        let buffers = match listener.tls {
            Some(_) => TLS_BUFFERS,
            None => PLAIN_BUFFERS,
        };
        let mut config = ListenerConfig::tcp(listener.addr.to_string()).l4_buffer(buffers);
        if let Some(tls) = &listener.tls {
            match tls_settings(&store, listener.addr, tls) {
                Ok(settings) => config = config.tls(settings),
                Err(e) => {
                    eprintln!("tollgate: TLS on {}: {e}", listener.addr);
                    return ExitCode::FAILURE;
                }
            }
        }
        proxy.add_listener(config);
    }
    server.add_service(proxy).add_dependency(&bootstrap);

    if let Some(admin) = snapshot.admin {
        let mut service = Service::new(
            "tollgate admin".to_owned(),
            AdminApp::new(Arc::clone(&store)).with_connections(Arc::clone(&connections)),
        );
        service.add_tcp(&admin.to_string());
        server.add_service(service).add_dependency(&bootstrap);
    }
    server.add_service(background_service(
        "health checks",
        HealthService::new(Arc::clone(&store.pools().health)),
    ));
    server.add_service(background_service(
        "drain",
        DrainService::new(Arc::clone(&connections)),
    ));
    server.add_service(background_service("access log reopen", ReopenService));
    server.add_service(background_service(
        "redis connect",
        ConnectService::new(Arc::clone(&store.pools().redis)),
    ));
    server.add_service(background_service(
        "rate limit sweep",
        SweepService::new(Arc::clone(&store.pools().rate_limiters)),
    ));
    server.add_service(background_service(
        "JWKS refresh",
        RefreshService::new(Arc::clone(&store.pools().jwks)),
    ));
    server.add_service(background_service(
        "return memory",
        ReturnMemory::new(connections),
    ));
    server.add_service(background_service(
        "config reload",
        ReloadService::new(Arc::clone(&store)),
    ));

    log::info!(
        "tollgate serving {} with config {}",
        listen_list(&snapshot.listen),
        path.display()
    );
    drop(snapshot);
    server.run_forever();
}

/// A TLS listener's OpenSSL settings: Mozilla's "intermediate" profile
/// (TLS 1.2 and up, its ciphers), the certificate chosen per handshake by
/// SNI from the running config, and the ALPN protocols offered.
fn tls_settings(
    store: &Arc<ConfigStore>,
    addr: std::net::SocketAddr,
    tls: &tollgate::snapshot::TlsListener,
) -> Result<TlsSettings, String> {
    let callbacks = SniCallbacks {
        certificates: Arc::clone(store),
        addr,
        started_with: Arc::clone(&tls.certificates),
    };
    let mut settings =
        TlsSettings::with_callbacks(Box::new(callbacks)).map_err(|e| e.to_string())?;
    if tls.min_version == TlsVersion::V1_3 {
        settings
            .set_min_proto_version(Some(pingora::tls::ssl::SslVersion::TLS1_3))
            .map_err(|e| e.to_string())?;
    }
    settings.set_alpn(match (tls.h2, tls.http1) {
        (true, true) => ALPN::H2H1,
        (true, false) => ALPN::H2,
        _ => ALPN::H1,
    });
    Ok(settings)
}

fn listen_list(addrs: &[std::net::SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Client keepalive: Pingora's 60 s idle timeout and no request limit
/// unless the file says otherwise; 0 s turns keepalive off.
fn keepalive(s: &ServerSection) -> KeepaliveSettings {
    let seconds = s
        .keepalive_timeout_seconds
        .unwrap_or(DEFAULT_KEEPALIVE_SECONDS);
    KeepaliveSettings {
        idle_timeout: (seconds > 0).then(|| Duration::from_secs(seconds)),
        request_limit: s.keepalive_request_limit,
        // Checked by `-t`; a file that reached here parses.
        drain_idle: s
            .drain_idle_timeout
            .as_ref()
            .and_then(|d| tollgate::config::values::parse_duration(&d.0).ok())
            .unwrap_or(DEFAULT_DRAIN_IDLE),
    }
}

/// Pingora's server settings from the `server:` section, with tollgate's
/// defaults where the file is silent.
fn server_conf(s: &ServerSection) -> ServerConf {
    let defaults = ServerConf::default();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    ServerConf {
        threads: s.threads.unwrap_or(cores),
        pid_file: s
            .pid_file
            .clone()
            .unwrap_or_else(|| format!("{RUN_DIR}/tollgate.pid")),
        upgrade_sock: s
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| format!("{RUN_DIR}/upgrade.sock")),
        error_log: s.error_log.clone(),
        daemon: s.daemon.unwrap_or(false),
        // With `-d`, the starting process exits only once the daemon is
        // serving, so systemd (Type=forking) knows when a start or an
        // upgrade is done.
        daemon_wait_for_ready: s.daemon_wait_for_ready.unwrap_or(true),
        user: s.user.clone(),
        group: s.group.clone(),
        work_stealing: s.work_stealing.unwrap_or(defaults.work_stealing),
        listener_tasks_per_fd: s
            .listener_tasks_per_fd
            .unwrap_or(defaults.listener_tasks_per_fd),
        upstream_keepalive_pool_size: s
            .upstream_keepalive_pool_size
            .unwrap_or(defaults.upstream_keepalive_pool_size),
        grace_period_seconds: Some(s.grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS)),
        graceful_shutdown_timeout_seconds: s
            .graceful_shutdown_timeout_seconds
            .or(defaults.graceful_shutdown_timeout_seconds),
        ..defaults
    }
}

fn ignore_hangups_until_ready() {
    // SAFETY: setting a signal's disposition to SIG_IGN runs no handler
    // code; tokio's handler for SIGHUP, installed later, replaces it.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// Creates the default run directory when the PID file or upgrade socket
/// lives there and it is missing (systemd's RuntimeDirectory= usually
/// makes it first).
fn ensure_run_dir(s: &ServerSection) -> Result<(), String> {
    if s.pid_file.is_some() && s.upgrade_sock.is_some() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o755).create(RUN_DIR) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!(
            "cannot create {RUN_DIR} for the PID file and upgrade socket ({e}); create it or set server.pid_file and server.upgrade_sock"
        )),
    }
}
