//! A recording HTTP/1.1 upstream standing in for Synapse: it keeps the exact
//! bytes of every request head it receives and how much body arrived.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request line exactly as received, without CRLF.
    pub request_line: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    /// The first bytes of the body.
    pub body_start: Vec<u8>,
    /// The body ended cleanly (full length or terminating chunk).
    pub body_complete: bool,
}

impl Recorded {
    pub fn target(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or("")
    }

    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

pub struct RecordingUpstream {
    pub addr: SocketAddr,
    /// Every open connection, so dropping the upstream kills them like a crashed process.
    connections: Arc<Mutex<Vec<TcpStream>>>,
    records: Arc<Mutex<Vec<Recorded>>>,
    /// Requests whose head arrived, before their body is read.
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl RecordingUpstream {
    pub fn start() -> RecordingUpstream {
        Self::start_named("recording", 0)
    }

    /// An upstream that names itself in every JSON answer, on a given port (0: any).
    pub fn start_named(name: &str, port: u16) -> RecordingUpstream {
        Self::start_at(name, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// On a given loopback address (127.0.0.x) and port.
    pub fn start_at(name: &str, address: SocketAddr) -> RecordingUpstream {
        let listener = TcpListener::bind(address).unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let name = Arc::new(name.to_string());
        let conns = connections.clone();
        let records = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, h, s) = (records.clone(), heads.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(clone) = stream.try_clone() {
                    conns.lock().unwrap().push(clone);
                }
                let (r, h, n) = (r.clone(), h.clone(), name.clone());
                std::thread::spawn(move || serve(stream, r, h, n));
            }
        });
        RecordingUpstream { addr, connections, records, heads, stop }
    }

    /// How many TCP connections reached this upstream.
    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    pub fn records(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }

    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.records.lock().unwrap().clear();
        self.heads.lock().unwrap().clear();
    }

    /// Waits up to 5 s for `n` complete records.
    pub fn wait_for(&self, n: usize) -> Vec<Recorded> {
        for _ in 0..500 {
            let records = self.records();
            if records.len() >= n {
                return records;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.records()
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
        // Wait until the port is closed, as after a real crash.
        for _ in 0..100 {
            if TcpStream::connect(self.addr).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve(stream: TcpStream, records: Arc<Mutex<Vec<Recorded>>>, heads: Arc<Mutex<Vec<String>>>, name: Arc<String>) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let request_line = request_line.trim_end_matches(['\r', '\n']).to_string();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        heads.lock().unwrap().push(request_line.clone());
        let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
        let mut body_start = Vec::new();
        let mut body_len = 0u64;
        let mut body_complete = true;
        let mut buf = vec![0u8; 65536];
        if get("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            body_complete = false;
            loop {
                let mut size_line = String::new();
                if reader.read_line(&mut size_line).unwrap_or(0) == 0 {
                    break;
                }
                let Ok(size) = u64::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16) else {
                    break;
                };
                if size == 0 {
                    let mut end = String::new();
                    let _ = reader.read_line(&mut end);
                    body_complete = true;
                    break;
                }
                let read = read_counted(&mut reader, size, &mut buf, &mut body_start);
                body_len += read;
                if read < size {
                    break;
                }
                let mut crlf = String::new();
                let _ = reader.read_line(&mut crlf);
            }
        } else if let Some(length) = get("Content-Length").and_then(|v| v.parse::<u64>().ok()) {
            body_len = read_counted(&mut reader, length, &mut buf, &mut body_start);
            body_complete = body_len == length;
        }
        let target = request_line.split(' ').nth(1).unwrap_or("").to_string();
        records.lock().unwrap().push(Recorded { request_line, headers, body_len, body_start, body_complete });
        if !body_complete {
            return;
        }
        if respond(&mut writer, &target, body_len, &name).is_err() {
            return;
        }
    }
}

/// `/json/N` and `/json-gzipped/N` anywhere in the target: (labelled gzip, N).
fn json_route(target: &str) -> Option<(bool, usize)> {
    let (encoded, rest) = match target.split_once("/json-gzipped/") {
        Some((_, rest)) => (true, rest),
        None => (false, target.split_once("/json/")?.1),
    };
    Some((encoded, rest.split(['?', '/']).next()?.parse().ok()?))
}

/// Reads up to `length` body bytes, keeping the first 64 KiB; returns how many arrived.
fn read_counted(reader: &mut impl Read, length: u64, buf: &mut [u8], body_start: &mut Vec<u8>) -> u64 {
    let mut read = 0;
    while read < length {
        let want = (length - read).min(buf.len() as u64) as usize;
        match reader.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = 65536usize.saturating_sub(body_start.len()).min(n);
                body_start.extend_from_slice(&buf[..room]);
                read += n as u64;
            }
        }
    }
    read
}

/// Answers by path: `/slow-stream` sends half its body, waits, then the
/// rest; `/big-download/N` sends N bytes; `/json/N` a JSON document of
/// about N bytes (`/json-gzipped/N`: labelled gzip already, as a server
/// that compressed it would); anything else echoes a small JSON,
/// after `hold_ms=N` milliseconds when the query says so (a long-poll).
fn respond(writer: &mut TcpStream, target: &str, body_len: u64, name: &str) -> std::io::Result<()> {
    let hold = target.split("hold_ms=").nth(1).and_then(|rest| rest.split('&').next()?.parse::<u64>().ok());
    if let Some(ms) = hold {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if target.contains("/slow-stream") {
        writer.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 200000\r\n\r\n",
        )?;
        writer.write_all(&vec![b'a'; 100_000])?;
        writer.flush()?;
        std::thread::sleep(Duration::from_millis(1500));
        writer.write_all(&vec![b'b'; 100_000])?;
        return writer.flush();
    }
    if let Some(size) = target.split("/big-download/").nth(1).and_then(|s| s.parse::<usize>().ok()) {
        write!(writer, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n")?;
        let block = vec![b'x'; 65536];
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len());
            writer.write_all(&block[..n])?;
            left -= n;
        }
        return writer.flush();
    }
    if let Some((encoded, size)) = json_route(target) {
        let events: Vec<String> =
            (0..size / 60 + 1).map(|i| format!("{{\"type\":\"m.room.message\",\"event\":{i}}}")).collect();
        let body = format!("{{\"events\":[{}]}}", events.join(","));
        let encoding = if encoded { "Content-Encoding: gzip\r\n" } else { "" };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{encoding}Content-Length: {}\r\n\r\n",
            body.len()
        );
        return writer.write_all([head.as_bytes(), body.as_bytes()].concat().as_slice());
    }
    let body = format!("{{\"upstream\":\"{name}\",\"body_len\":{body_len}}}");
    // One write: `write!` on a socket sends each piece of the format string
    // separately, and Nagle's algorithm then holds the last one for the
    // edge's delayed ACK (40 ms a response).
    let response =
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    writer.write_all(response.as_bytes())
}
