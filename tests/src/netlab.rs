//! A network lab on one machine, for tests of what real networks do to the
//! collector (`tests/tests/network_faults.rs`): a server namespace
//! ([`SERVER_NS`]) with a bridge at [`SERVER_IP`], and one namespace per host
//! ([`host_ns`]) with a veth link to that bridge and an nftables table
//! ([`set_fault`]) that loses, black-holes or refuses its packets. No
//! namespace has a route anywhere else, so nothing leaves the machine, and
//! the host's own network is never touched. [`DelayProxy`] gives a slow link
//! in userspace (the kernels this runs on may lack netem).
//!
//! It needs root, iproute2 and nftables. `scripts/netfault-clean` removes
//! every namespace it builds (and with it every link and rule); [`Lab`] runs
//! it before building and when dropped, and `scripts/test` on every exit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The namespace where the servers run.
pub const SERVER_NS: &str = "rcnf-srv";
/// The server namespace's address on the bridge.
pub const SERVER_IP: &str = "10.77.0.1";

/// The namespaces, bridge and veth links; [`Drop`] removes them all.
pub struct Lab;

impl Lab {
    /// Builds the server namespace and `hosts` host namespaces, each with
    /// no fault set.
    pub fn build(hosts: usize) -> Lab {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test builds network namespaces: run it as root (scripts/test does)"
        );
        clean();
        let lab = Lab;
        run(&["ip", "netns", "add", SERVER_NS]);
        in_ns(SERVER_NS, &["ip", "link", "set", "lo", "up"]);
        in_ns(
            SERVER_NS,
            &["ip", "link", "add", "rcnf-br", "type", "bridge"],
        );
        in_ns(
            SERVER_NS,
            &[
                "ip",
                "addr",
                "add",
                &format!("{SERVER_IP}/24"),
                "dev",
                "rcnf-br",
            ],
        );
        in_ns(SERVER_NS, &["ip", "link", "set", "rcnf-br", "up"]);
        for i in 0..hosts {
            let ns = host_ns(i);
            let port = format!("rcnf-v{i:02}");
            run(&["ip", "netns", "add", &ns]);
            run(&[
                "ip", "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name",
                &port, "netns", SERVER_NS,
            ]);
            in_ns(
                SERVER_NS,
                &["ip", "link", "set", &port, "master", "rcnf-br", "up"],
            );
            in_ns(&ns, &["ip", "link", "set", "lo", "up"]);
            in_ns(
                &ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", host_ip(i)),
                    "dev",
                    "eth0",
                ],
            );
            in_ns(&ns, &["ip", "link", "set", "eth0", "up"]);
            nft(
                &ns,
                "table inet rcnf {\n\
                 chain in { type filter hook input priority 0; policy accept; }\n\
                 chain out { type filter hook output priority 0; policy accept; }\n}\n",
            );
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        clean();
    }
}

fn clean() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netfault-clean");
    let status = Command::new(&script).status();
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "{} failed: {status:?}",
        script.display()
    );
}

/// Host `i`'s namespace, for `ip netns exec`.
pub fn host_ns(i: usize) -> String {
    format!("rcnf-c{i:02}")
}

/// Host `i`'s address on the bridge.
pub fn host_ip(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (install iproute2 and nftables)",
                args[0]
            )
        });
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full);
}

fn nft(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft (install nftables)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .expect("write the nft script");
    let output = child.wait_with_output().expect("nft");
    assert!(
        output.status.success(),
        "nft in {ns} refused:\n{script}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What host `i`'s link does to its packets ([`set_fault`]).
pub enum Fault {
    Clear,
    /// Drops a random share of the packets in each direction.
    Loss(u32),
    /// Drops everything: a dead Wi-Fi access point, a pulled cable upstream.
    BlackHole,
    /// Answers every packet out with "host unreachable": the local network
    /// is gone and the kernel says so at once (a VPN down, no route).
    Refused,
}

/// Replaces host `i`'s fault with `fault`.
pub fn set_fault(i: usize, fault: Fault) {
    let rules = match fault {
        Fault::Clear => String::new(),
        Fault::Loss(percent) => format!(
            "add rule inet rcnf in iifname \"eth0\" numgen random mod 100 < {percent} drop\n\
             add rule inet rcnf out oifname \"eth0\" numgen random mod 100 < {percent} drop\n"
        ),
        Fault::BlackHole => "add rule inet rcnf in iifname \"eth0\" drop\n\
                             add rule inet rcnf out oifname \"eth0\" drop\n"
            .into(),
        Fault::Refused => "add rule inet rcnf in iifname \"eth0\" drop\n\
                           add rule inet rcnf out oifname \"eth0\" reject with icmpx type host-unreachable\n"
            .into(),
    };
    nft(
        &host_ns(i),
        &format!("flush chain inet rcnf in\nflush chain inet rcnf out\n{rules}"),
    );
}

/// Moves this thread (and whatever it starts later) into namespace `name`.
pub fn enter_netns(name: &str) {
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("open namespace {name}: {e}"));
    // SAFETY: setns on a valid descriptor; it changes only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// A TCP proxy that holds each chunk for a while before passing it on: the
/// slow link and the slow ingest, in userspace.
pub struct DelayProxy {
    pub addr: SocketAddr,
}

impl DelayProxy {
    /// Listens beside `upstream` (same address, another port) and passes
    /// each chunk on after `to_upstream` one way and `to_client` the other.
    pub fn start(upstream: SocketAddr, to_upstream: Duration, to_client: Duration) -> DelayProxy {
        let listener = TcpListener::bind((upstream.ip(), 0)).expect("bind the delay proxy");
        let addr = listener.local_addr().expect("proxy address");
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (client_read, server_read) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => (c, s),
                    _ => continue,
                };
                delayed_pipe(client_read, server, to_upstream);
                delayed_pipe(server_read, client, to_client);
            }
        });
        DelayProxy { addr }
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
fn delayed_pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = from.read(&mut buffer).unwrap_or(0);
            if chunks
                .send((Instant::now() + delay, buffer[..read].to_vec()))
                .is_err()
                || read == 0
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (at, chunk) in due {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if chunk.is_empty() || to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
