//! Test harness: starts the real `tollgate` binary on ephemeral ports of
//! 127.0.0.1 with a config the test writes, and talks to it over real sockets.

#![allow(dead_code)]

pub mod grpc;
pub mod http;
pub mod load;
pub mod matrix;
pub mod pki;
pub mod upstream;

use http::{buffered, read_body, read_head, Head};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Generous bound for anything a test waits on; tests poll, never sleep-and-assert.
pub const WAIT: Duration = Duration::from_secs(15);

/// A response as the client saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// For echo-upstream answers: the first value of a header the upstream received.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0] == name)
            .and_then(|h| h[1].as_str().map(str::to_owned))
    }

    /// Asserts the gateway's own JSON error shape and returns its code.
    pub fn assert_gateway_error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        let e = &v["error"];
        assert_eq!(e["status"], status, "{v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        let id = e["request_id"].as_str().expect("request_id");
        assert!(!id.is_empty());
        assert_eq!(self.header("x-request-id"), Some(id));
        e["code"].as_str().expect("code").to_owned()
    }
}

/// A port on 127.0.0.1 where nothing accepts connections, reserved for as
/// long as this lives: the socket is bound but never listens, so a connect
/// is refused, and no other test can start a server on the port meanwhile
/// (a port merely found free can be taken by another test at once).
pub struct DeadPort {
    fd: i32,
    pub addr: SocketAddr,
}

impl DeadPort {
    pub fn new() -> DeadPort {
        // SAFETY: plain socket calls on a descriptor this value owns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket");
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len),
                0,
                "bind"
            );
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut bound_len = len;
            assert_eq!(
                libc::getsockname(
                    fd,
                    (&mut bound as *mut libc::sockaddr_in).cast(),
                    &mut bound_len
                ),
                0
            );
            let port = u16::from_be(bound.sin_port);
            DeadPort {
                fd,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            }
        }
    }
}

impl Default for DeadPort {
    fn default() -> Self {
        DeadPort::new()
    }
}

impl Drop for DeadPort {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned and closed once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// An ephemeral port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Sends raw bytes on a fresh connection and reads one response.
pub fn send_raw(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut conn = Connection::open(addr);
    conn.send_raw(raw);
    conn.read_response()
}

/// `GET path` with a Host header.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Response {
    request(addr, "GET", host, path, &[], b"")
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut conn = Connection::open(addr);
    conn.send(method, host, path, headers, body);
    conn.read_response()
}

/// One client connection, for keepalive sequences.
pub struct Connection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(addr: SocketAddr) -> Connection {
        let stream = TcpStream::connect(addr).expect("connect to gateway");
        let _ = stream.set_nodelay(true);
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        Connection {
            writer: stream.try_clone().expect("clone"),
            reader: buffered(stream),
        }
    }

    pub fn send_raw(&mut self, raw: &[u8]) {
        self.writer.write_all(raw).expect("write request");
    }

    /// Another handle on the client's sending side, for a thread that
    /// keeps writing while the test reads.
    pub fn writer(&self) -> TcpStream {
        self.writer.try_clone().expect("clone")
    }

    /// Reads exactly `n` raw bytes (a tunnel's traffic).
    pub fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        use std::io::Read;
        let mut buf = vec![0; n];
        self.reader.read_exact(&mut buf).expect("read bytes");
        buf
    }

    /// Closes the client's sending side; the response can still be read.
    pub fn shutdown_write(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }

    pub fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        let mut bytes = raw.into_bytes();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes);
    }

    /// Reads only a response head (for HEAD requests, which have no body).
    pub fn read_response_head(&mut self) -> Head {
        read_head(&mut self.reader)
            .expect("read response head")
            .expect("connection closed before a response")
    }

    /// Whether the server closes the connection (end of stream or reset)
    /// rather than sending anything, within [`WAIT`].
    pub fn closed_by_server(&mut self) -> bool {
        use std::io::Read;
        let mut byte = [0u8; 1];
        match self.reader.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
        }
    }

    /// Reads responses until a final one, skipping interim (1xx) heads,
    /// and returns the final response with how many interim ones came.
    pub fn read_final_response(&mut self) -> (Response, usize) {
        let mut interim = 0;
        loop {
            let head = self.read_response_head();
            if head
                .start_line
                .split(' ')
                .nth(1)
                .is_some_and(|s| s.starts_with('1'))
            {
                interim += 1;
                continue;
            }
            return (self.finish_response(head), interim);
        }
    }

    pub fn read_response(&mut self) -> Response {
        let head = self.read_response_head();
        self.finish_response(head)
    }

    fn finish_response(&mut self, head: Head) -> Response {
        let status = head
            .start_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {:?}", head.start_line));
        let body = read_body(&mut self.reader, &head, true).expect("read response body");
        Response { status, head, body }
    }
}

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// A running gateway process, killed when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// Extra `server:` lines this gateway was started with, kept for reloads.
    server_extra: String,
    listen_extra: String,
    child: Child,
}

/// The test's own scratch directory.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tollgate-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The binary under test: this build's, or another one named by
/// `TOLLGATE_BIN` (to check that a test fails on a build without a fix).
pub fn binary() -> String {
    std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_owned())
}

impl Gateway {
    /// Starts the gateway with `body` (the upstreams and routes sections);
    /// the harness adds server, listen and admin.
    pub fn start(body: &str) -> Gateway {
        Gateway::start_with_server("", body)
    }

    /// As [`Gateway::start`], with extra `server:` keys, one `key: value`
    /// per line.
    pub fn start_with_server(server_extra: &str, body: &str) -> Gateway {
        Gateway::start_with_env(&[], server_extra, body)
    }

    /// As [`Gateway::start_with_server`], with environment variables set
    /// for the gateway process only.
    pub fn start_with_env(env: &[(&str, &str)], server_extra: &str, body: &str) -> Gateway {
        Gateway::start_with_listeners(env, server_extra, "", body)
    }

    /// Also listens on `listen_extra`: YAML list items (`  - {...}`)
    /// appended to the harness's own plain listener.
    pub fn start_with_listeners(
        env: &[(&str, &str)],
        server_extra: &str,
        listen_extra: &str,
        body: &str,
    ) -> Gateway {
        // The ports were free when chosen, but another test may take one
        // before the gateway binds it: a gateway that exits while starting
        // is started again on new ports.
        let mut last_log = String::new();
        for _ in 0..3 {
            match Gateway::try_start(env, server_extra, listen_extra, body) {
                Ok(gw) => return gw,
                Err(log) => last_log = log,
            }
        }
        panic!("the gateway exited while starting, three times; last log:\n{last_log}");
    }

    fn try_start(
        env: &[(&str, &str)],
        server_extra: &str,
        listen_extra: &str,
        body: &str,
    ) -> Result<Gateway, String> {
        let dir = scratch_dir("gw");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config_path = dir.join("tollgate.yaml");
        let gateway_dir = dir.clone();
        write_config(
            &config_path,
            &gateway_dir,
            (addr, listen_extra),
            admin,
            server_extra,
            body,
        );
        let log = std::fs::File::create(dir.join("gateway.log")).expect("log file");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("TOLLGATE_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start tollgate");
        let mut gw = Gateway {
            addr,
            admin,
            dir,
            config_path,
            server_extra: server_extra.to_owned(),
            listen_extra: listen_extra.to_owned(),
            child,
        };
        let deadline = Instant::now() + WAIT;
        let pid = gw.child.id();
        loop {
            // Answering is not enough: another test's server may hold a
            // port chosen here, and Pingora keeps retrying a port in use.
            let up = listens_on(pid, gw.admin)
                && listens_on(pid, gw.addr)
                && admin_get(gw.admin, "/healthz").status == 200;
            if up {
                return Ok(gw);
            }
            if let Ok(Some(status)) = gw.child.try_wait() {
                return Err(format!("exit {status}:\n{}", gw.log()));
            }
            if gw.log().contains("is in use") {
                let _ = gw.child.kill();
                let _ = gw.child.wait();
                return Err(format!("a port was taken:\n{}", gw.log()));
            }
            if Instant::now() > deadline {
                panic!("the gateway did not come up; log:\n{}", gw.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// Polls `check` until it holds; panics with the gateway log after WAIT.
    pub fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "timed out waiting until {what}; gateway log:\n{}",
            self.log()
        );
    }

    pub fn get(&self, host: &str, path: &str) -> Response {
        get(self.addr, host, path)
    }

    pub fn admin_get(&self, path: &str) -> Response {
        admin_get(self.admin, path)
    }

    /// Replaces the config body, sends SIGHUP and waits for the reload to be
    /// attempted (whether or not it succeeded).
    pub fn reload_with(&self, body: &str) -> serde_json::Value {
        let before = self.admin_get("/config").json()["reload_attempts"]
            .as_u64()
            .unwrap();
        write_config(
            &self.config_path,
            &self.dir,
            (self.addr, &self.listen_extra),
            self.admin,
            &self.server_extra,
            body,
        );
        self.signal("HUP");
        let mut status = serde_json::Value::Null;
        self.wait_until("the reload is attempted", || {
            status = self.admin_get("/config").json();
            status["reload_attempts"].as_u64().unwrap() > before
        });
        status
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// A binary upgrade: starts a new process with `-u` on the same
    /// config, waits until it listens on the upgrade socket, then sends
    /// `SIGQUIT` to the running one. The new process becomes this gateway;
    /// the old one is returned for the test to wait on.
    pub fn upgrade(&mut self) -> Child {
        use std::os::unix::fs::MetadataExt;
        let sock = self.dir.join("upgrade.sock");
        let before = std::fs::metadata(&sock).ok().map(|m| m.ino());
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("gateway.log"))
            .expect("log file");
        let child = Command::new(binary())
            .arg("-u")
            .arg("-c")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("TOLLGATE_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the new tollgate");
        self.wait_until("the new process waits for the sockets", || {
            std::fs::metadata(&sock)
                .ok()
                .map(|m| m.ino())
                .is_some_and(|ino| Some(ino) != before)
        });
        self.signal("QUIT");
        std::mem::replace(&mut self.child, child)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to exit, after a signal to stop.
    pub fn exited_within(&mut self, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(
    path: &Path,
    dir: &Path,
    (addr, listen_extra): (SocketAddr, &str),
    admin: SocketAddr,
    server_extra: &str,
    body: &str,
) {
    let mut server = format!(
        "server:\n  threads: 2\n  pid_file: {dir}/tollgate.pid\n  upgrade_sock: {dir}/upgrade.sock\n  graceful_shutdown_timeout_seconds: 1\n",
        dir = dir.display()
    );
    if !server_extra.contains("grace_period_seconds") {
        server.push_str("  grace_period_seconds: 0\n");
    }
    for line in server_extra.lines().filter(|l| !l.trim().is_empty()) {
        server.push_str(&format!("  {}\n", line.trim()));
    }
    // A body with its own `admin:` mapping (on this same address) wins.
    let admin_line = if body.lines().any(|l| l.starts_with("admin:")) {
        String::new()
    } else {
        format!("admin: \"{admin}\"\n")
    };
    let text = format!("{server}listen:\n  - \"{addr}\"\n{listen_extra}{admin_line}{body}");
    std::fs::write(path, text).expect("write config");
}

pub fn admin_get(admin: SocketAddr, path: &str) -> Response {
    get(admin, "admin", path)
}

/// Runs `tollgate -t -c FILE` on `text` and returns (exit code, stdout, stderr).
pub fn check_config(text: &str) -> (i32, String, String) {
    let dir = scratch_dir("check");
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(binary())
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run tollgate -t");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A KiB figure from /proc/PID/status (`VmRSS:`, `VmHWM:` for the peak).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("status field")
}

/// Whether process `pid` has a listening TCP socket on `addr` (IPv4), read
/// from /proc: the socket's inode in /proc/net/tcp among the process's
/// descriptors.
pub fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        return false;
    };
    // /proc/net/tcp writes the address as the raw u32 in host order, hex.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        addr.port()
    );
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // state 0A is LISTEN
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| fields.get(9).map(|s| (*s).to_owned()))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| target == format!("socket:[{inode}]"))
        })
    })
}

/// Waits (bounded) for a process to exit: how long it took, or `None`
/// (then it is killed).
pub fn exits_within(mut child: Child, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(Some(_)) = child.try_wait() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
