//! Fixed-rate HTTP/1.1 latency probe for `bench/sidecar`: `latency-bench ADDR RATE SECONDS
//! CONNECTIONS` keeps CONNECTIONS keep-alive connections to ADDR, each sending `GET /` on its own
//! fixed schedule so that together they send RATE requests per second, and prints one line:
//! `p50_us=<n> p99_us=<n> p999_us=<n> max_us=<n> requests=<n> late=<n>`.
//!
//! `hey`, used before, reports latencies in 0.1 ms steps, the size of the figure it measured
//! (added p99 ≤ 0.5 ms). Here each request is timed in nanoseconds from its write to the last
//! byte of its response. A request is sent at its scheduled time, or at once when the previous
//! one ended later than that (counted as `late`); its latency is measured from when it was sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn arg(args: &[String], i: usize, what: &str) -> Result<String, String> {
    args.get(i)
        .cloned()
        .ok_or_else(|| format!("missing {what}: latency-bench ADDR RATE SECONDS CONNECTIONS"))
}

fn number(s: &str, what: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{what} {s:?}: expected a positive integer"))
}

/// One `GET /` on `conn`; returns when the whole response has been read.
fn get(conn: &mut BufReader<TcpStream>, host: &str, line: &mut String) -> Result<(), String> {
    write!(
        conn.get_mut(),
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: latency-bench\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut length = None;
    let mut first = true;
    loop {
        line.clear();
        let n = conn.read_line(line).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before the response ended".into());
        }
        if first {
            if !line.starts_with("HTTP/1.1 200") {
                return Err(format!("unexpected status line {:?}", line.trim_end()));
            }
            first = false;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or("response without Content-Length")?;
    let mut body = vec![0; length];
    conn.read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    Ok(())
}

fn run() -> Result<String, String> {
    let args: Vec<String> = std::env::args().collect();
    let addr = arg(&args, 1, "ADDR")?;
    let rate = number(&arg(&args, 2, "RATE")?, "RATE")?;
    let secs = number(&arg(&args, 3, "SECONDS")?, "SECONDS")?;
    let conns = number(&arg(&args, 4, "CONNECTIONS")?, "CONNECTIONS")?;
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(secs);
    let mut threads = Vec::new();
    for c in 0..conns {
        let addr = addr.clone();
        threads.push(std::thread::spawn(
            move || -> Result<(Vec<u64>, u64), String> {
                let stream = TcpStream::connect(&addr).map_err(|e| format!("{addr}: {e}"))?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut conn = BufReader::new(stream);
                let mut line = String::new();
                // One request to open the path (TLS handshakes between the proxies), untimed.
                get(&mut conn, &addr, &mut line)?;
                // Spread the connections' schedules over one interval.
                let mut next = start + interval.mul_f64(c as f64 / conns as f64);
                let (mut lat, mut late) = (Vec::new(), 0);
                while next < end {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_micros(100) {
                        late += 1;
                    }
                    let t = Instant::now();
                    get(&mut conn, &addr, &mut line)?;
                    lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    next += interval;
                }
                Ok((lat, late))
            },
        ));
    }
    let (mut all, mut late) = (Vec::new(), 0);
    for t in threads {
        let (l, n) = t.join().map_err(|_| "a connection thread panicked")??;
        all.extend(l);
        late += n;
    }
    if all.is_empty() {
        return Err("no request completed".into());
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1] / 1000;
    Ok(format!(
        "p50_us={} p99_us={} p999_us={} max_us={} requests={} late={late}",
        pct(0.5),
        pct(0.99),
        pct(0.999),
        all[all.len() - 1] / 1000,
        all.len()
    ))
}

fn main() {
    match run() {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("latency-bench: {e}");
            std::process::exit(1);
        }
    }
}
