//! Downloads over HTTP(S): connect and read timeouts, a resumable `.part` file, a retry or two, and
//! progress (a bar on a terminal, log lines otherwise).
//!
//! A download writes into `<dest>.part`. When that file already holds bytes (an earlier attempt or
//! run was cut off), the request asks for the rest with a `Range` header; a `206` answer is appended,
//! a `200` answer restarts the file from its first byte. Only a complete body is renamed to `dest`.
//! Checking the content is the caller's business: this module knows nothing about checksums.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{info, warn};
use ureq::config::AutoHeaderValue;
use ureq::Agent;

use crate::progress;

/// A download helper with one agent (connection pool) and fixed timeouts.
#[derive(Debug, Clone)]
pub struct Downloader {
    agent: Agent,
    timeout: Duration,
    retries: u32,
    max_bytes: u64,
}

/// What one download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    /// True when some of the bytes came from an earlier, interrupted attempt.
    pub resumed: bool,
}

/// Why an attempt failed, and whether another attempt may help.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt: a timeout, a dropped connection, a server error.
    Transient(anyhow::Error),
    /// No use retrying: a missing file, a refused request, a full disk.
    Permanent(anyhow::Error),
}

/// The `.part` file beside `dest` that holds an incomplete download.
pub fn part_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!("{name}.part"))
}

impl Downloader {
    /// A downloader whose connect, response and per-read waits each give up after `timeout`.
    pub fn new(timeout: Duration) -> Downloader {
        let config = Agent::config_builder()
            .timeout_resolve(Some(timeout))
            .timeout_connect(Some(timeout))
            .timeout_send_request(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            // Statuses are handled here (206, 416), so they must not become errors inside ureq.
            .http_status_as_error(false)
            // The files are already compressed; a transfer encoding would also break byte ranges.
            .accept_encoding(AutoHeaderValue::None)
            .user_agent(format!("layerlab-fetch-data/{}", layerlab_pipeline::VERSION))
            .build();
        Downloader { agent: config.into(), timeout, retries: 2, max_bytes: 1 << 30 }
    }

    /// How many times a failed attempt is repeated (default 2). An attempt that received nothing
    /// (the server never answered) is repeated at most once, so a dead server costs little time.
    pub fn with_retries(mut self, retries: u32) -> Downloader {
        self.retries = retries;
        self
    }

    /// Refuses bodies longer than `max_bytes` (default 1 GiB).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Downloader {
        self.max_bytes = max_bytes;
        self
    }

    /// Downloads `url` into `dest`, continuing `<dest>.part` if an earlier attempt left one. On
    /// failure the `.part` file stays (when it holds bytes) so that a later call can resume it.
    pub fn download(&self, url: &str, dest: &Path) -> Result<Downloaded> {
        let part = part_path(dest);
        let resumed_from = file_len(&part);
        let mut idle_failures = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let before = file_len(&part);
            match self.attempt(url, &part) {
                Ok(bytes) => {
                    fs::rename(&part, dest).with_context(|| format!("cannot move {} into place", dest.display()))?;
                    return Ok(Downloaded {
                        path: dest.to_path_buf(),
                        bytes,
                        resumed: resumed_from > 0 || attempt > 1,
                    });
                }
                Err(Failure::Permanent(e)) => {
                    remove_if_empty(&part);
                    return Err(e);
                }
                Err(Failure::Transient(e)) => {
                    if file_len(&part) <= before {
                        idle_failures += 1;
                    }
                    if attempt > self.retries || idle_failures > 1 {
                        remove_if_empty(&part);
                        let kept = file_len(&part);
                        let e = e.context(format!("gave up after {attempt} attempts"));
                        if kept > 0 {
                            return Err(e.context(format!(
                                "{kept} bytes kept in {} for a later run to resume",
                                part.display()
                            )));
                        }
                        return Err(e);
                    }
                    let wait = Duration::from_millis(500 * attempt as u64);
                    warn!(
                        "{url}: {e:#}; retrying in {:.1} s (attempt {} of {})",
                        wait.as_secs_f64(),
                        attempt + 1,
                        self.retries + 1
                    );
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// One request: resumes `part` when it holds bytes and the server honours the range.
    fn attempt(&self, url: &str, part: &Path) -> Result<u64, Failure> {
        let have = file_len(part);
        let mut request = self.agent.get(url);
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = request.call().map_err(|e| classify(e, self.timeout))?;
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let encoded = header("content-encoding").is_some_and(|v| !v.eq_ignore_ascii_case("identity"));
        let (start, total) = match status {
            206 if have > 0 => {
                let range = header("content-range").unwrap_or_default();
                match parse_content_range(&range) {
                    Some((start, total)) if start == have => (have, total),
                    _ => {
                        // A range other than the one asked for cannot be appended: start over.
                        let _ = fs::remove_file(part);
                        return Err(Failure::Transient(anyhow!(
                            "server answered range '{range}' to a request from byte {have}"
                        )));
                    }
                }
            }
            200 => (0, header("content-length").and_then(|v| v.parse::<u64>().ok())),
            416 if have > 0 => {
                // The partial file is not a prefix of what the server holds now: start over.
                let _ = fs::remove_file(part);
                return Err(Failure::Transient(anyhow!("server refused to resume from byte {have}")));
            }
            500..=599 | 408 | 429 => return Err(Failure::Transient(anyhow!("HTTP status {status}"))),
            _ => return Err(Failure::Permanent(anyhow!("HTTP status {status}"))),
        };
        if start == 0 && have > 0 {
            info!("{url}: server ignored the range request; restarting from the first byte");
        } else if start > 0 {
            info!("{url}: resuming from byte {start}");
        }
        // A content-encoded body arrives decoded, so its length cannot be checked against the header.
        let total = if encoded { None } else { total };
        if let Some(t) = total {
            if t > self.max_bytes {
                return Err(Failure::Permanent(anyhow!(
                    "body of {t} bytes exceeds the limit of {} bytes",
                    self.max_bytes
                )));
            }
        }
        let mut file = if start == 0 { File::create(part) } else { OpenOptions::new().append(true).open(part) }
            .with_context(|| format!("cannot write {}", part.display()))
            .map_err(Failure::Permanent)?;

        let progress = Progress::new(url, start, total);
        let mut body = response.into_body().into_reader();
        let mut written = start;
        let mut buf = vec![0u8; 1 << 16];
        let outcome = loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    break Err(Failure::Transient(anyhow!(e).context(format!("connection lost after {written} bytes"))))
                }
            };
            if written + n as u64 > self.max_bytes {
                break Err(Failure::Permanent(anyhow!("body exceeds the limit of {} bytes", self.max_bytes)));
            }
            if let Err(e) = file.write_all(&buf[..n]) {
                break Err(Failure::Permanent(anyhow!(e).context(format!("cannot write {}", part.display()))));
            }
            written += n as u64;
            progress.set(written);
        };
        let flushed = file.flush().with_context(|| format!("cannot write {}", part.display()));
        progress.finish(written, outcome.is_ok());
        outcome?;
        flushed.map_err(Failure::Permanent)?;
        if let Some(t) = total {
            if written != t {
                return Err(Failure::Transient(anyhow!("connection closed after {written} of {t} bytes")));
            }
        }
        Ok(written)
    }
}

/// Sorts ureq's errors into those worth retrying and those not.
fn classify(e: ureq::Error, timeout: Duration) -> Failure {
    match e {
        ureq::Error::Timeout(which) => {
            Failure::Transient(anyhow!("no progress within {} s (timeout: {which})", timeout.as_secs_f64()))
        }
        ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::InvalidProxyUrl | ureq::Error::Tls(_) => {
            Failure::Permanent(e.into())
        }
        ureq::Error::HostNotFound => Failure::Permanent(anyhow!("host not found")),
        other => Failure::Transient(other.into()),
    }
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`) into the start and the total.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn remove_if_empty(path: &Path) {
    if path.exists() && file_len(path) == 0 {
        let _ = fs::remove_file(path);
    }
}

/// A byte-count bar on a terminal; otherwise a log line at the start, every ten seconds, and at the end.
struct Progress {
    bar: Option<ProgressBar>,
    url: String,
    started: Instant,
    last_log: std::cell::Cell<Instant>,
    total: Option<u64>,
}

impl Progress {
    fn new(url: &str, start: u64, total: Option<u64>) -> Progress {
        let name = url.rsplit('/').next().unwrap_or(url).to_string();
        let bar = progress::interactive().then(|| {
            let bar = total.map(ProgressBar::new).unwrap_or_else(ProgressBar::no_length);
            let style =
                ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name);
            bar.set_position(start);
            bar
        });
        if bar.is_none() {
            let size = total.map(|t| format!(" ({t} bytes)")).unwrap_or_default();
            info!("downloading {url}{size}");
        }
        let now = Instant::now();
        Progress { bar, url: url.to_string(), started: now, last_log: std::cell::Cell::new(now), total }
    }

    fn set(&self, written: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(written);
        } else if self.last_log.get().elapsed() >= Duration::from_secs(10) {
            self.last_log.set(Instant::now());
            let of = self.total.map(|t| format!(" of {t}")).unwrap_or_default();
            info!("{}: {written}{of} bytes", self.url);
        }
    }

    fn finish(&self, written: u64, ok: bool) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if ok {
            info!("downloaded {} ({written} bytes, {:.1} s)", self.url, self.started.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes x-2/3"), None);
        assert_eq!(parse_content_range(""), None);
    }

    /// Serves `body` once per connection: the first answer is cut off halfway, later ones honour
    /// a range; a path other than `/file` gets a 404. Returns the base URL and the request heads.
    fn server(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let heads = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                while !head.ends_with("\r\n\r\n") && reader.read_line(&mut head).unwrap_or(0) > 0 {}
                let first = heads.lock().unwrap().is_empty();
                heads.lock().unwrap().push(head.clone());
                if !head.starts_with("GET /file ") {
                    let _ =
                        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                let start = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(|r| r.trim_end_matches('-').to_string())
                    })
                    .and_then(|r| r.parse::<usize>().ok())
                    .unwrap_or(0);
                let (status, range) = match start {
                    0 => ("200 OK", String::new()),
                    s => (
                        "206 Partial Content",
                        format!("Content-Range: bytes {s}-{}/{}\r\n", body.len() - 1, body.len()),
                    ),
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{range}Connection: close\r\n\r\n",
                    body.len() - start
                );
                let _ = stream.write_all(header.as_bytes());
                let end = if first { body.len() / 2 } else { body.len() };
                let _ = stream.write_all(&body[start..end]);
            }
        });
        (url, log)
    }

    #[test]
    fn a_cut_off_body_is_resumed_and_a_missing_file_is_not_retried() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (url, log) = server(body.clone());
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("file");
        let got = Downloader::new(Duration::from_secs(5)).download(&format!("{url}/file"), &dest).unwrap();
        assert_eq!((got.bytes, got.resumed), (100_000, true));
        assert_eq!(fs::read(&dest).unwrap(), body);
        assert!(!part_path(&dest).exists());
        assert!(
            log.lock().unwrap()[1].to_ascii_lowercase().contains("range: bytes=50000-"),
            "{:?}",
            log.lock().unwrap()
        );

        let missing = dir.path().join("missing");
        let err = Downloader::new(Duration::from_secs(5)).download(&format!("{url}/missing"), &missing).unwrap_err();
        assert_eq!(err.to_string(), "HTTP status 404");
        assert_eq!(log.lock().unwrap().len(), 3, "a 404 is not retried");
        assert!(!missing.exists() && !part_path(&missing).exists());
    }

    #[test]
    fn part_files_sit_beside_the_destination() {
        assert_eq!(part_path(Path::new("/a/b/file.gz")), Path::new("/a/b/file.gz.part"));
    }
}
