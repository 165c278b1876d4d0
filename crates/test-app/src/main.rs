//! The app container of the real-node tier (tests/node). It stands for a team's backend behind the
//! sidecar:
//! - `POST <any path>`: records the body and answers 200, as an app that takes Apple's notification would;
//! - `GET /received`: what it recorded, as `{"bodies": ["<hex>", ...]}` (hex: byte-exact, no JSON escaping);
//! - `GET /healthz`: 200.
//!
//! On SIGTERM it behaves like an app that drains for a second: it then asks the sidecar's `/healthz`
//! (`SIDECAR_ADMIN`, default `127.0.0.1:9089`) and exits 0 only if the sidecar still answered. Kubernetes
//! stops a pod's containers before its native sidecars, so exit code 0 shows that order held.
//!
//! Standard library only (a thread per connection), so its static binary builds in seconds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static TERMINATING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATING.store(true, Ordering::SeqCst);
}

fn main() {
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let sidecar = std::env::var("SIDECAR_ADMIN").unwrap_or_else(|_| "127.0.0.1:9089".into());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t) };
    let listener = match TcpListener::bind(&listen) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("storerelay-test-app: cannot listen on {listen}: {error}");
            std::process::exit(2);
        }
    };
    println!("storerelay-test-app: listening on {listen}");
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let received = received.clone();
            std::thread::spawn(move || {
                let _ = serve(stream, &received);
            });
        }
    });
    while !TERMINATING.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("storerelay-test-app: SIGTERM; draining for 1s");
    std::thread::sleep(Duration::from_secs(1));
    match sidecar_health(&sidecar) {
        Ok(status) if status == "200" => {
            println!("storerelay-test-app: the sidecar still answered /healthz 200 after my drain; exiting 0");
            std::process::exit(0);
        }
        other => {
            println!("storerelay-test-app: the sidecar did not answer /healthz after my drain ({other:?}); exiting 3");
            std::process::exit(3);
        }
    }
}

fn serve(stream: TcpStream, received: &Mutex<Vec<Vec<u8>>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let answer = match (method, path) {
            ("GET", "/healthz") => "ok".to_string(),
            ("GET", "/received") => {
                let bodies = received.lock().unwrap_or_else(|e| e.into_inner());
                let hex: Vec<String> = bodies.iter().map(|b| format!("\"{}\"", to_hex(b))).collect();
                format!("{{\"bodies\":[{}]}}", hex.join(","))
            }
            ("POST", _) => {
                received.lock().unwrap_or_else(|e| e.into_inner()).push(body);
                "ok".to_string()
            }
            _ => {
                write!(stream, "HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")?;
                continue;
            }
        };
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        )?;
        if close {
            return Ok(());
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The status code the sidecar's `/healthz` answers, over a plain HTTP/1.0 request.
fn sidecar_health(address: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /healthz HTTP/1.0\r\nhost: sidecar\r\n\r\n")?;
    let mut status_line = String::new();
    BufReader::new(stream).read_line(&mut status_line)?;
    Ok(status_line.split_whitespace().nth(1).unwrap_or("").to_string())
}
