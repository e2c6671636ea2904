//! A TCP relay between the edge and an upstream that can record what the
//! upstream sends back, to compare with what the client received.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Tee {
    pub address: SocketAddr,
    recording: Arc<AtomicBool>,
    /// What each connection brought back while recording, by connection.
    recorded: Arc<Mutex<HashMap<usize, Vec<u8>>>>,
}

impl Tee {
    pub fn start(upstream: SocketAddr) -> Tee {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let recording = Arc::new(AtomicBool::new(false));
        let recorded: Arc<Mutex<HashMap<usize, Vec<u8>>>> = Arc::default();
        let (on, kept) = (Arc::clone(&recording), Arc::clone(&recorded));
        std::thread::spawn(move || {
            for (connection, client) in listener.incoming().flatten().enumerate() {
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let (mut to_server, mut from_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_client, &mut to_server);
                    let _ = to_server.shutdown(std::net::Shutdown::Write);
                });
                let (on, kept) = (Arc::clone(&on), Arc::clone(&kept));
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if on.load(Ordering::SeqCst) {
                            kept.lock().unwrap().entry(connection).or_default().extend_from_slice(&buffer[..n]);
                        }
                        if client.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Tee { address, recording, recorded }
    }

    /// Records what the upstream sends from now on, forgetting what came before.
    pub fn record(&self) {
        self.recorded.lock().unwrap().clear();
        self.recording.store(true, Ordering::SeqCst);
    }

    /// Stops recording; returns the body of the largest response recorded
    /// (alone on its connection: a health check may answer on another), by
    /// Content-Length or chunked, or `None` if it is not whole.
    pub fn recorded_body(&self) -> Option<Vec<u8>> {
        self.recording.store(false, Ordering::SeqCst);
        let bytes = self.recorded.lock().unwrap().values().max_by_key(|bytes| bytes.len())?.clone();
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let body = &bytes[end + 4..];
        let length = head.lines().find_map(|l| l.strip_prefix("content-length:")?.trim().parse::<usize>().ok());
        if let Some(length) = length {
            return (body.len() == length).then(|| body.to_vec());
        }
        if !head.contains("transfer-encoding: chunked") {
            return None;
        }
        let (mut rest, mut whole) = (body, Vec::new());
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).ok()?.split(';').next()?.trim(), 16)
                    .ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                return Some(whole);
            }
            whole.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
    }
}
