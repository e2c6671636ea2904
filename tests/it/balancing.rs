//! Balancing through the real binary, with stand-in workers that stall (stop
//! answering anything, `/health` included, as a process under SIGSTOP or a
//! long GC does) or serve one request at a time: a stalled worker must not
//! stall its clients, and an overloaded one sheds what it cannot take in
//! time with a 503 its clients can read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use support::client::read_response;
use support::{free_port, EdgeProcess};

/// A worker that answers `200 {"worker": name}` to every request, can be
/// stalled (every request, health checks included, waits until it is
/// resumed) and can serve one request at a time for `service_time`.
struct StandInWorker {
    addr: SocketAddr,
    stalled: Arc<(Mutex<bool>, Condvar)>,
    /// Requests answered (health checks apart).
    served: Arc<AtomicUsize>,
}

impl StandInWorker {
    fn start(name: &'static str, service_time: Option<Duration>) -> StandInWorker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new((Mutex::new(false), Condvar::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let one_at_a_time = Arc::new(Mutex::new(()));
        let (st, sv) = (stalled.clone(), served.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (st, sv, lock) = (st.clone(), sv.clone(), one_at_a_time.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    loop {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line.trim_end().is_empty() {
                                break;
                            }
                        }
                        let (flag, resumed) = &*st;
                        let mut stalled = flag.lock().unwrap();
                        while *stalled {
                            stalled = resumed.wait(stalled).unwrap();
                        }
                        drop(stalled);
                        let health = request_line.starts_with("GET /health ");
                        if let (Some(time), false) = (service_time, health) {
                            let _one = lock.lock().unwrap();
                            std::thread::sleep(time);
                        }
                        if !health {
                            sv.fetch_add(1, Ordering::Relaxed);
                        }
                        let body = format!("{{\"worker\":\"{name}\"}}");
                        let response = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if writer.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        StandInWorker { addr, stalled, served }
    }

    fn stall(&self, stalled: bool) {
        let (flag, resumed) = &*self.stalled;
        *flag.lock().unwrap() = stalled;
        resumed.notify_all();
    }
}

impl Drop for StandInWorker {
    fn drop(&mut self) {
        self.stall(false);
    }
}

struct Outcome {
    issued: Instant,
    took: Duration,
    status: u16,
    retry_after: bool,
    matrix_json: bool,
}

/// `clients` threads, each on its own keep-alive connection, GET `target`
/// until `stop`; a 503 makes a client pause `after_503` like a client
/// reading Retry-After would (shorter, to keep the pressure on).
fn load(
    edge: SocketAddr,
    target: &'static str,
    clients: usize,
    after_503: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<Outcome>>> {
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let connect = || {
                    let stream = TcpStream::connect(edge).unwrap();
                    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    stream.set_nodelay(true).unwrap();
                    BufReader::new(stream)
                };
                let mut reader = connect();
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let issued = Instant::now();
                    let request = format!("GET {target} HTTP/1.1\r\nHost: matrix.example.com\r\n\r\n");
                    let response = match reader.get_mut().write_all(request.as_bytes()) {
                        Ok(()) => read_response(&mut reader, false),
                        Err(_) => None,
                    };
                    let took = issued.elapsed();
                    let Some(response) = response else {
                        outcomes.push(Outcome { issued, took, status: 0, retry_after: false, matrix_json: false });
                        reader = connect();
                        continue;
                    };
                    let matrix_json = serde_json::from_slice::<serde_json::Value>(&response.body)
                        .is_ok_and(|v| v["errcode"].is_string() || v["worker"].is_string());
                    let retry_after = response.header("retry-after").is_some();
                    let closing = response.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    outcomes.push(Outcome { issued, took, status: response.status, retry_after, matrix_json });
                    if closing {
                        reader = connect();
                    }
                    if response.status == 503 {
                        std::thread::sleep(after_503);
                    }
                }
                outcomes
            })
        })
        .collect()
}

fn metrics_text(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
    text
}

#[test]
fn a_stalled_worker_does_not_stall_its_clients() {
    let main = StandInWorker::start("main", None);
    let first = StandInWorker::start("first", None);
    let second = StandInWorker::start("second", None);
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Health checks every second bring the worker back soon after it
    // resumes; finding the stall is the stall watch's work (after 2 s), so
    // a check waits 5 s for its answer: with the default 2 s the two raced,
    // and on a loaded machine the check sometimes took the worker out
    // first. A short slow start lets the test see it serve again.
    let config = format!(
        r#"server_name: example.com
listeners: [{{ address: "{edge_addr}", serves: [client] }}]
synapse:
  main: "{}"
  workers:
    client_reader: ["{}", "{}"]
  health_check: {{ interval: 1s, timeout: 5s }}
  balancing: {{ slow_start: 2s }}
process: {{ threads: 2 }}
metrics: {{ address: "{metrics_addr}" }}
"#,
        main.addr, first.addr, second.addr
    );
    let edge = EdgeProcess::start(&config, None, &[edge_addr]);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(edge_addr, "/_matrix/client/v3/publicRooms", 16, Duration::ZERO, stop.clone());
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let stalled_at = Instant::now();
    first.stall(true);
    std::thread::sleep(Duration::from_secs(10));
    let resumed_at = Instant::now();
    first.stall(false);
    let served_when_resumed = first.served.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    let outcomes: Vec<Outcome> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();

    let before: Vec<&Outcome> =
        outcomes.iter().filter(|o| o.issued >= started + Duration::from_millis(500) && o.issued < stalled_at).collect();
    let during: Vec<&Outcome> = outcomes.iter().filter(|o| o.issued >= stalled_at && o.issued < resumed_at).collect();
    let in_time = during.iter().filter(|o| o.status == 200 && o.took <= Duration::from_secs(2)).count();
    let share = in_time as f64 / during.len() as f64;
    let rate_before = before.len() as f64 / (stalled_at - started - Duration::from_millis(500)).as_secs_f64();
    let rate_during = during.len() as f64 / (resumed_at - stalled_at).as_secs_f64();
    let slowest = during.iter().map(|o| o.took).max().unwrap_or_default();
    eprintln!(
        "stall: {in_time} of {} requests issued during the stall answered 200 within 2 s ({:.3} %), \
         slowest {slowest:?}; {rate_before:.0}/s before, {rate_during:.0}/s during",
        during.len(),
        share * 100.0
    );
    assert!(during.len() > 1000, "too little load to judge: {}", during.len());
    assert!(share >= 0.99, "only {:.2} % within 2 s", share * 100.0);
    assert!(rate_during >= rate_before / 2.0, "throughput fell from {rate_before:.0}/s to {rate_during:.0}/s");
    let failed: Vec<u16> = outcomes.iter().filter(|o| o.status != 200).map(|o| o.status).collect();
    assert!(failed.is_empty(), "requests failed with {failed:?}: {}", edge.log_text());
    let log = edge.log_text();
    assert!(log.contains("stalled: taken out"), "{log}");
    // Back after its health check and slow start: it serves again.
    let served_after = first.served.load(Ordering::Relaxed);
    assert!(served_after > served_when_resumed + 100, "the resumed worker got little: {served_after}");
    let metrics = metrics_text(metrics_addr);
    assert!(metrics.contains("matrix_edge_ejections_total{group=\"client_reader\""), "{metrics}");
}

#[test]
fn an_overloaded_worker_sheds_what_it_cannot_take_in_time() {
    let main = StandInWorker::start("main", None);
    let slow = StandInWorker::start("slow", Some(Duration::from_millis(200)));
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"server_name: example.com
listeners: [{{ address: "{edge_addr}", serves: [client] }}]
synapse:
  main: "{}"
  workers:
    client_reader: ["{}"]
  balancing:
    max_in_flight: 2
    queue: {{ size: 8, timeout: 1s }}
process: {{ threads: 2 }}
"#,
        main.addr, slow.addr
    );
    let edge = EdgeProcess::start(&config, None, &[edge_addr]);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(edge_addr, "/_matrix/client/v3/publicRooms", 48, Duration::from_millis(100), stop.clone());
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    let outcomes: Vec<Outcome> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let mut admitted: Vec<Duration> = outcomes.iter().filter(|o| o.status == 200).map(|o| o.took).collect();
    admitted.sort();
    let shed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == 503).collect();
    let p99 = admitted[admitted.len() * 99 / 100];
    let slowest_shed = shed.iter().map(|o| o.took).max().unwrap_or_default();
    eprintln!(
        "overload: {} admitted (p99 {p99:?}), {} shed (slowest {slowest_shed:?}), {} other",
        admitted.len(),
        shed.len(),
        outcomes.len() - admitted.len() - shed.len()
    );
    assert!(admitted.len() >= 30 && !shed.is_empty(), "nothing to judge");
    assert!(p99 < Duration::from_millis(2500), "admitted p99 {p99:?}");
    assert!(slowest_shed <= Duration::from_millis(1500), "a shed request took {slowest_shed:?}");
    assert!(shed.iter().all(|o| o.retry_after && o.matrix_json), "a 503 without Retry-After or Matrix JSON");
    assert_eq!(admitted.len() + shed.len(), outcomes.len(), "other outcomes than 200 and 503");
    // Shed, and said so: the access log names the queue's refusal, not a
    // missing worker or a restart.
    let log = edge.log_with("edge_reason=queue_", Duration::from_secs(2));
    assert!(log.contains("edge_reason=queue_full") || log.contains("edge_reason=queue_timeout"), "{log}");
    assert!(!log.contains("edge_reason=no_usable_worker") && !log.contains("edge_reason=hold_"), "{log}");
    // Nothing shed reached the worker; nothing admitted reached it twice.
    assert_eq!(slow.served.load(Ordering::Relaxed), admitted.len());
}
