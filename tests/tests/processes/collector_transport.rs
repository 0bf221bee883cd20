//! What the collector's signed request may travel over: never a redirect
//! (which would re-send the signed body and headers to another host), and
//! plain http:// only to this machine unless the operator says otherwise.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rollcall_tests::Stack;

/// A server that answers every request with `answer`, counting requests.
fn serve(answer: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buffer = [0u8; 65536];
            let _ = stream.read(&mut buffer);
            count.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    (url, seen)
}

fn once(stack: &Stack, endpoint: &str, extra: &[&str]) -> Output {
    stack
        .collector("transport")
        .env("ROLLCALL_ENDPOINT", endpoint)
        .args(["once", "--skip-cpu-usage"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_redirect_is_not_followed_with_the_signed_request() {
    let stack = Stack::start();
    let (elsewhere, elsewhere_seen) =
        serve("HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".into());
    let (redirector, redirector_seen) = serve(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {elsewhere}/v1/heartbeats\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ));
    let output = once(&stack, &redirector, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("ingest answered 307"), "{stderr}");
    assert_eq!(redirector_seen.load(Ordering::SeqCst), 1);
    assert_eq!(
        elsewhere_seen.load(Ordering::SeqCst),
        0,
        "the signed heartbeat followed the redirect"
    );
}

#[test]
fn plain_http_to_another_host_needs_the_insecure_flag() {
    let stack = Stack::start();
    // 0.0.0.0 is not a loopback address, yet Linux keeps a connection to it
    // on this machine, so even a broken check sends nothing elsewhere.
    let output = once(&stack, "http://0.0.0.0:9", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("--insecure-plain-http"), "{stderr}");
    assert!(
        !stderr.contains("cannot reach ingest"),
        "it tried to connect: {stderr}"
    );
    // Loopback over http:// is fine.
    assert!(once(&stack, &stack.ingest.url(), &[]).status.success());
}
