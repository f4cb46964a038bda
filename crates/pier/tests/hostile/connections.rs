//! Hostile tier: connections. Slowloris, idle floods beyond `max_connections`, an upload chunk
//! that stops mid-body, a client opening upload sessions without end, and the open-file limit.
//! Each pier gets short timeouts through a `--config` file so the cuts happen within seconds.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::common::{digest_of, gen_bytes, http_status, Pier};

/// Tests that change this process's open-file limit (children inherit it) take turns.
static FD_LIMIT: Mutex<()> = Mutex::new(());

/// pier with `toml` as its config, every repository hosted (the tests push under plain names).
fn start(dir: &Path, toml: &str) -> Pier {
    Pier::with_config(dir, toml, &["--hosted", "**"])
}

fn connect(pier: &Pier) -> TcpStream {
    let addr: SocketAddr = pier.host().parse().expect("address");
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect")
}

/// Whether pier has closed `s`: a read sees end-of-file or a reset (after any bytes pier sent
/// first), rather than waiting out `wait`.
fn closed_by_peer(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("read timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn metric(pier: &Pier, name: &str, labels: &[(&str, &str)]) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        pier.metrics(&reqwest::Client::new())
            .await
            .sum(name, labels)
    })
}

#[test]
fn slowloris_is_cut_at_the_header_timeout_while_others_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pier = start(
        dir.path(),
        "[server]\nheader_timeout = 2\nidle_timeout = 30\n",
    );
    let port: u16 = pier.host().rsplit(':').next().unwrap().parse().unwrap();
    let mut s = connect(&pier);
    let head = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n";
    let started = Instant::now();
    let mut cut_after = None;
    for &byte in head.iter() {
        if s.write_all(&[byte]).is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        // The pause between bytes doubles as the check whether pier hung up.
        if closed_by_peer(&mut s, Duration::from_secs(1)) {
            cut_after = Some(started.elapsed());
            break;
        }
        assert_eq!(
            http_status(port, "/v2/"),
            Some(200),
            "GET /v2/ on another connection while the slowloris trickles"
        );
    }
    let cut_after = cut_after.expect("pier never closed a connection trickling its header");
    // The whole head would take over 50 s at this pace; the 2 s timeout must cut it long before.
    assert!(
        cut_after < Duration::from_secs(2 + 6),
        "slowloris cut only after {cut_after:?} with header_timeout = 2"
    );
    assert_eq!(http_status(port, "/v2/"), Some(200));
    assert!(metric(&pier, "pier_http_timeouts_total", &[("kind", "header")]) >= 1.0);
}

#[test]
fn idle_flood_beyond_max_connections_is_refused_then_cut() {
    let _turn = FD_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(1 << 20);
    // The flood needs more descriptors than the common soft limit of 1024.
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: lim.maximum,
        },
    )
    .expect("raise this test's open-file limit");
    let flood = 2000usize.min(hard.saturating_sub(200) as usize);
    if flood < 2000 {
        println!("note: hard open-file limit {hard}, flooding with {flood} connections");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pier = start(
        dir.path(),
        "[server]\nheader_timeout = 5\nidle_timeout = 5\nmax_connections = 500\n",
    );
    let port: u16 = pier.host().rsplit(':').next().unwrap().parse().unwrap();
    // Fill the cap first and probe at once: pier accepts in order, so the probe comes after the
    // flood has taken every slot (and long before a 5 s timeout frees one).
    let mut conns: Vec<TcpStream> = (0..520).map(|_| connect(&pier)).collect();
    let opened = Instant::now();
    let during = http_status(port, "/v2/");
    assert_ne!(
        during,
        Some(200),
        "a connection beyond max_connections was served"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(4),
        "refusal took {:?}",
        opened.elapsed()
    );
    conns.extend((520..flood).map(|_| connect(&pier)));
    // Once the timeouts cut the flood, fresh clients are served again.
    let bound = Duration::from_secs(5 + 15);
    loop {
        if http_status(port, "/v2/") == Some(200) {
            break;
        }
        assert!(
            opened.elapsed() < bound,
            "no 200 for a fresh client {bound:?} after an idle flood (timeouts 5 s)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every flood connection is closed by pier: refused ones at once, held ones at the timeout.
    // Connections the kernel queued while the cap was full reach pier later and may be held
    // for one more timeout, hence the second round in the bound.
    let bound = Duration::from_secs(2 * 5 + 20);
    loop {
        conns.retain_mut(|c| !closed_by_peer(c, Duration::from_millis(1)));
        if conns.is_empty() {
            break;
        }
        assert!(
            opened.elapsed() < bound,
            "{} flood connections still open {bound:?} after the flood (timeouts 5 s)",
            conns.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Each flood connection was either refused at the cap or held and cut by a timeout (how
    // many of each depends on how fast the kernel hands them over).
    let rejected = metric(&pier, "pier_http_connections_rejected_total", &[]);
    let cut = metric(&pier, "pier_http_timeouts_total", &[("kind", "header")])
        + metric(&pier, "pier_http_timeouts_total", &[("kind", "idle")]);
    assert!(
        rejected >= 1.0,
        "the probe beyond the cap was not counted as refused"
    );
    assert!(
        rejected + cut >= flood as f64,
        "{rejected} refused + {cut} cut by a timeout, for a flood of {flood}"
    );
    setrlimit(Resource::Nofile, lim).expect("restore the open-file limit");
}

#[tokio::test]
async fn stalled_patch_fails_keeps_acknowledged_bytes_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pier = start(
        dir.path(),
        "[server]\nbody_stall_timeout = 2\nidle_timeout = 30\n",
    );
    let http = reqwest::Client::new();
    let blob = gen_bytes(7, 1500);
    let digest = digest_of(&blob);
    let resp = http
        .post(format!("{}/v2/team/app/blobs/uploads/", pier.url()))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let upload = format!("{}{location}", pier.url());
    let resp = http
        .patch(&upload)
        .header("content-range", "0-499")
        .header("content-type", "application/octet-stream")
        .body(blob[..500].to_vec())
        .send()
        .await
        .expect("first PATCH");
    assert_eq!(resp.status(), 202);

    // The second chunk announces 1000 bytes, sends 10, and stops.
    let stalled = {
        let host = pier.host();
        let location = location.clone();
        let part = blob[500..510].to_vec();
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&host).expect("connect");
            write!(
                s,
                "PATCH {location} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Range: 500-1499\r\nContent-Length: 1000\r\n\r\n"
            )
            .expect("write head");
            s.write_all(&part).expect("write 10 bytes");
            let started = Instant::now();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        panic!("pier left a stalled PATCH hanging for 15 s")
                    }
                    Err(_) => break,
                }
            }
            (
                started.elapsed(),
                String::from_utf8_lossy(&answer).into_owned(),
            )
        })
    };
    let (took, answer) = stalled.await.expect("stalled client");
    assert!(
        took < Duration::from_secs(2 + 8),
        "stalled PATCH ended only after {took:?} with body_stall_timeout = 2"
    );
    // pier answers the stall with an OCI error before closing, when the client is still there.
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("BLOB_UPLOAD_INVALID"), "{answer}");
        assert!(answer.contains("stalled"), "{answer}");
    }

    // Only the acknowledged first chunk counts.
    let resp = http.get(&upload).send().await.expect("upload status");
    assert_eq!(resp.status(), 204);
    assert_eq!(resp.headers()["range"], "0-499");

    // The client resumes from there and finishes.
    let resp = http
        .patch(&upload)
        .header("content-range", "500-1499")
        .header("content-type", "application/octet-stream")
        .body(blob[500..].to_vec())
        .send()
        .await
        .expect("resumed PATCH");
    assert_eq!(resp.status(), 202);
    let resp = http
        .put(format!("{upload}?digest={digest}"))
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), 201);
    let got = http
        .get(format!("{}/v2/team/app/blobs/{digest}", pier.url()))
        .send()
        .await
        .expect("GET blob")
        .bytes()
        .await
        .expect("blob body");
    assert_eq!(got.as_ref(), blob.as_slice(), "the pulled blob differs");
    let m = pier.metrics(&http).await;
    assert!(m.sum("pier_http_timeouts_total", &[("kind", "body")]) >= 1.0);
}

#[tokio::test]
async fn upload_sessions_per_client_are_capped_and_freed_by_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pier = start(
        dir.path(),
        "[registry]\nmax_upload_sessions_per_client = 5\n",
    );
    let http = reqwest::Client::new();
    let post = format!("{}/v2/team/app/blobs/uploads/", pier.url());
    let mut sessions = Vec::new();
    for i in 0..5 {
        let resp = http.post(&post).send().await.expect("POST");
        assert_eq!(resp.status(), 202, "session {i}");
        sessions.push(resp.headers()["location"].to_str().unwrap().to_string());
    }
    let resp = http.post(&post).send().await.expect("6th POST");
    assert_eq!(resp.status(), 429);
    let body: serde_json::Value = resp.json().await.expect("OCI error JSON");
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("max_upload_sessions_per_client"),
        "{message}"
    );

    let resp = http
        .delete(format!("{}{}", pier.url(), sessions[0]))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 204);
    let resp = http.post(&post).send().await.expect("POST after DELETE");
    assert_eq!(resp.status(), 202);
}

#[test]
fn soft_open_file_limit_is_raised_to_the_hard_limit() {
    let _turn = FD_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum;
    // Start pier with the common low soft limit, so the check shows pier raising it.
    let low = hard.map_or(1024, |h| h.min(1024));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(low),
            maximum: hard,
        },
    )
    .expect("lower this test's soft open-file limit");
    let dir = tempfile::tempdir().expect("tempdir");
    let pier = start(dir.path(), "");
    setrlimit(Resource::Nofile, lim).expect("restore the open-file limit");
    if hard == Some(low) {
        println!("note: the hard open-file limit is {low}; pier has nothing to raise");
    }
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", pier.pid())).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let want = hard.map_or("unlimited".to_string(), |h| h.to_string());
    assert_eq!(nums, vec![want.as_str(), want.as_str()], "{line}");
}

#[tokio::test]
async fn h2c_still_works_through_the_accept_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pier = start(dir.path(), "[server]\nidle_timeout = 2\n");
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = http
        .get(format!("{}/v2/", pier.url()))
        .send()
        .await
        .expect("GET /v2/ over h2c");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    // The idle timeout closes an HTTP/2 connection too (with GOAWAY); the client reconnects.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let m = pier.metrics(&http).await;
    assert!(m.sum("pier_http_timeouts_total", &[("kind", "idle")]) >= 1.0);
}

#[tokio::test]
async fn a_download_the_client_stops_reading_is_dropped_at_the_write_stall_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pier = start(
        dir.path(),
        "[server]\nwrite_stall_timeout = 2\nidle_timeout = 30\n",
    );
    let http = reqwest::Client::new();
    // Larger than what the socket buffers on both sides can take in.
    let blob = gen_bytes(11, 64 << 20);
    let digest = digest_of(&blob);
    let resp = http
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={digest}",
            pier.url()
        ))
        .body(blob.clone())
        .send()
        .await
        .expect("monolithic push");
    assert_eq!(resp.status(), 201);
    let host = pier.host();
    let got = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&host).expect("connect");
        write!(
            s,
            "GET /v2/team/app/blobs/{digest} HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        .expect("write request");
        // Read nothing for well past the timeout, then take whatever pier sent.
        std::thread::sleep(Duration::from_secs(2 + 4));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    })
    .await
    .expect("reader");
    assert!(
        got < blob.len(),
        "the stalled download received all {got} bytes: pier kept the connection"
    );
    let m = pier.metrics(&http).await;
    assert!(m.sum("pier_http_timeouts_total", &[("kind", "write")]) >= 1.0);
}
