//! Mutual TLS between peers (`--peer-tls-cert`, `--peer-tls-key`, `--peer-tls-ca`), on two real
//! nodes on 127.0.0.1: with certificates from one CA (made with openssl, common/certs.rs) they join and
//! a hosted image pushed to one is pulled from the other through the peer listener; the peer
//! port then refuses plain HTTP, a TLS client without a certificate, and one whose certificate
//! another CA issued, before any request is read.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::certs::make_certs;
use common::{free_port, one_image, push_image, Launch, LayerSpec, Pier, Upload, MIB};

fn curl_status(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .args(args)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn peers_with_certificates_from_one_ca_share_content_and_others_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs, &["n1", "n2"]);
    let secret = common::cluster_secret(tmp.path());
    let c = |f: &str| certs.join(f).display().to_string();
    let peer_ports = [free_port(), free_port()];
    let node = |i: usize| -> Pier {
        let name = format!("n{}", i + 1);
        let join = (i > 0).then_some(peer_ports[0]);
        Launch::new(
            &tmp.path().join(&name),
            &tmp.path().join(format!("{name}.log")),
        )
        .args([
            "--hosted",
            "**",
            "--peer-tls-cert",
            &c(&format!("{name}.pem")),
            "--peer-tls-key",
            &c(&format!("{name}.key")),
            "--peer-tls-ca",
            &c("ca.pem"),
        ])
        .member(&name, peer_ports[i], &secret, join)
        .start()
    };
    let n1 = node(0);
    let n2 = node(1);
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let status: serde_json::Value =
            common::get_json(&http, &format!("{}/api/v1/status", n2.url())).await;
        let alive = status["members"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["state"] == "alive").count());
        if alive == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "n2 does not see both nodes alive: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Content pushed to n1 is read on n2 from n1's peer listener, over TLS.
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("srv/data.bin", 3 * MIB, 77)],
    );
    let image = layout.image("v1");
    push_image(
        &http,
        &n1.url(),
        "team/tls",
        "v1",
        &layout,
        image,
        Upload::Monolithic,
    )
    .await;
    for digest in image.blob_digests() {
        let body = http
            .get(format!("{}/v2/team/tls/blobs/{digest}", n2.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(body.status(), 200, "blob {digest} from n2");
        let bytes = body.bytes().await.unwrap();
        assert_eq!(common::digest_of(&bytes), digest, "n2 served other bytes");
    }
    let m = n2.metrics(&http).await;
    assert!(
        m.sum("pier_blob_served_bytes_total", &[("source", "peer")]) >= 3.0 * MIB as f64,
        "n2 should have served the layer from its peer:\n{}",
        m.0
    );

    // The peer port speaks only TLS with a certificate from the cluster's CA.
    let peer = format!("127.0.0.1:{}", peer_ports[0]);
    let pull = format!("/peer/v1/blobs/{}", image.blob_digests()[0]);
    assert_eq!(
        curl_status(&[&format!("http://{peer}{pull}")]),
        "000",
        "plain HTTP"
    );
    assert_eq!(
        curl_status(&["--cacert", &c("ca.pem"), &format!("https://{peer}{pull}")]),
        "000",
        "TLS without a client certificate"
    );
    assert_eq!(
        curl_status(&[
            "--cacert",
            &c("ca.pem"),
            "--cert",
            &c("stranger.pem"),
            "--key",
            &c("stranger.key"),
            &format!("https://{peer}{pull}"),
        ]),
        "000",
        "a certificate from another CA"
    );
    // A cluster certificate gets through TLS, and still needs the secret's signature.
    assert_eq!(
        curl_status(&[
            "--cacert",
            &c("ca.pem"),
            "--cert",
            &c("n2.pem"),
            "--key",
            &c("n2.key"),
            &format!("https://{peer}{pull}"),
        ]),
        "401",
        "a cluster certificate without a signed request"
    );
    drop(n2);
    drop(n1);
}
