//! TLS on the main listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`), on a real node with
//! certificates from a CA made here with openssl: curl speaks HTTP/2 to it and plain HTTP is
//! refused; replacing the certificate files and sending SIGHUP changes the certificate new
//! connections see while a download that began before goes on to its last byte; a broken
//! replacement leaves the working certificate in use; with a client CA, only clients holding a
//! certificate it issued are served.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::certs::make_certs;
use common::{digest_of, gen_bytes, pier_cli_env, send_signal, Launch, Pier, MIB};
use futures::StreamExt;

/// `curl` with `args`; returns what `-w` wrote (an empty string if curl could not connect).
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subject of the certificate a new TLS connection to `port` is shown.
fn served_subject(dir: &Path, port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -CAfile ca.pem </dev/null 2>/dev/null \
             | openssl x509 -noout -subject"
        ))
        .current_dir(dir)
        .output()
        .expect("run openssl s_client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start_tls(dir: &Path, extra: &[&str]) -> Pier {
    let mut args: Vec<String> = [
        "--hosted",
        "**",
        "--tls-cert",
        "served.pem",
        "--tls-key",
        "served.key",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for a in &mut args {
        if a.starts_with("served.") {
            *a = dir.join(&*a).display().to_string();
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let ca = dir.join("ca.pem").display().to_string();
    let client = [
        dir.join("one.pem").display().to_string(),
        dir.join("one.key").display().to_string(),
    ];
    Launch::in_dir(dir)
        .args(&args)
        .ready(move |port| {
            let url = format!("https://127.0.0.1:{port}/healthz");
            curl(&[
                "-w",
                "%{http_code}",
                "--cacert",
                &ca,
                "--cert",
                &client[0],
                "--key",
                &client[1],
                &url,
            ]) == "200"
        })
        .start()
}

fn have_tools() -> bool {
    for tool in ["openssl", "curl"] {
        if common::find_on_path(tool).is_none() {
            println!("SKIPPED: {tool} is not on PATH (scripts/test.sh installs it)");
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_speaks_http2_and_reloads_its_certificate_without_dropping_a_download() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_certs(dir, &["one", "two"]);
    std::fs::copy(dir.join("one.pem"), dir.join("served.pem")).unwrap();
    std::fs::copy(dir.join("one.key"), dir.join("served.key")).unwrap();
    let pier = start_tls(dir, &[]);
    let port = pier.port();
    let base = format!("https://127.0.0.1:{port}");
    let ca = dir.join("ca.pem").display().to_string();

    // HTTP/2 by ALPN, and the certificate the files hold.
    let version = curl(&[
        "--http2",
        "-w",
        "%{http_version} %{http_code}",
        "--cacert",
        &ca,
        &format!("{base}/v2/"),
    ]);
    assert_eq!(version, "2 200", "curl --http2 over TLS");
    let version = curl(&[
        "--http1.1",
        "-w",
        "%{http_version} %{http_code}",
        "--cacert",
        &ca,
        &format!("{base}/v2/"),
    ]);
    assert_eq!(version, "1.1 200", "curl --http1.1 over TLS");
    assert_eq!(
        curl(&[
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/v2/")
        ]),
        "000",
        "plain HTTP on the TLS port gets no HTTP answer"
    );
    assert_eq!(served_subject(dir, port), "subject=CN = one");

    // The CLI over https, trusting the test CA through SSL_CERT_FILE.
    let status = pier_cli_env(&["status", "--url", &base], &[("SSL_CERT_FILE", &ca)]);
    assert!(
        status.status.success(),
        "pier status --url {base}: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    // A 32 MiB blob, pushed over TLS by a client that trusts only the test CA.
    let http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap(),
        )
        .tls_built_in_native_certs(false)
        .build()
        .unwrap();
    let blob = gen_bytes(7, 32 * MIB);
    let digest = digest_of(&blob);
    let resp = http
        .post(format!("{base}/v2/team/big/blobs/uploads/?digest={digest}"))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "monolithic push over TLS");

    // A download that begins now, read slowly across the reload.
    let resp = http
        .get(format!("{base}/v2/team/big/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::with_capacity(blob.len());
    got.extend_from_slice(&body.next().await.expect("a first chunk").unwrap());

    // The renewed certificate: written over the files, then SIGHUP.
    std::fs::copy(dir.join("two.key"), dir.join("served.key")).unwrap();
    std::fs::copy(dir.join("two.pem"), dir.join("served.pem")).unwrap();
    send_signal(pier.child(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_subject(dir, port) != "subject=CN = two" {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 10 s of SIGHUP:\n{}",
            pier.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.expect("the download goes on across the reload"));
    }
    assert_eq!(got.len(), blob.len(), "the whole blob arrived");
    assert_eq!(digest_of(&got), digest, "the blob's bytes");
    assert!(
        pier.log().contains("TLS certificate reloaded"),
        "the reload is logged"
    );

    // A broken replacement (a key of another certificate) is refused; the working one stays.
    std::fs::copy(dir.join("one.key"), dir.join("served.key")).unwrap();
    send_signal(pier.child(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pier.log().contains("TLS certificate not reloaded") {
        assert!(
            Instant::now() < deadline,
            "a mismatched key was not reported:\n{}",
            pier.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served_subject(dir, port), "subject=CN = two");
    assert_eq!(
        curl(&[
            "-w",
            "%{http_code}",
            "--cacert",
            &ca,
            &format!("{base}/v2/")
        ]),
        "200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_admits_only_clients_with_its_certificates() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_certs(dir, &["one", "client"]);
    std::fs::copy(dir.join("one.pem"), dir.join("served.pem")).unwrap();
    std::fs::copy(dir.join("one.key"), dir.join("served.key")).unwrap();
    let ca = dir.join("ca.pem").display().to_string();
    let pier = start_tls(dir, &["--tls-client-ca", &ca]);
    let url = format!("https://127.0.0.1:{}/v2/", pier.port());
    let file = |n: &str| dir.join(n).display().to_string();
    let with_cert = |name: &str| {
        curl(&[
            "-w",
            "%{http_code}",
            "--cacert",
            &ca,
            "--cert",
            &file(&format!("{name}.pem")),
            "--key",
            &file(&format!("{name}.key")),
            &url,
        ])
    };
    assert_eq!(with_cert("client"), "200", "a certificate the CA issued");
    assert_eq!(
        with_cert("stranger"),
        "000",
        "a certificate of another CA is refused in the handshake"
    );
    assert_eq!(
        curl(&["-w", "%{http_code}", "--cacert", &ca, &url]),
        "000",
        "no client certificate is refused in the handshake"
    );
}
