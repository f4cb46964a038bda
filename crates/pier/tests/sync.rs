//! Sync interop tier: the real `pier` binary replicating to the CNCF distribution registry
//! (Debian's `docker-registry`) as a remote site, and pulling tags from one by rule. Images are
//! put in by pier's own push path or by skopeo, and checked at the other end with skopeo and
//! the registry's API and access log.
//!
//! Runs only with `PIER_INTEROP=1` (then a missing tool is a failure, not a skip). Every
//! process listens on 127.0.0.1 and keeps its files in the test's tempdir. Retry delays are
//! short through the rules' own `retry_initial` setting.

mod common;
mod mirror_support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::clients::{oci_ref, Skopeo};
use common::{
    assert_same_blobs, interop_tempdir, one_image, pier_cli, push_image, write_layout, Entry,
    ImageSpec, LayerSpec, Pier, Upload, MIB,
};
use mirror_support::{http_client, upstream_table, FaultyProxy, Registry, SigningKey, TokenIssuer};
use serde_json::Value;

/// A pier config made of `tables`: no upstreams unless the tables add them.
fn config(tables: &str) -> String {
    format!("[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n\n{tables}")
}

/// pier configured by [`config`] of `tables`, every repository hosted; its config, data and log
/// in `tmp/pier`.
fn start_pier(tmp: &Path, tables: &str) -> Pier {
    Pier::with_config(&tmp.join("pier"), &config(tables), &["--hosted", "**"])
}

/// A `[[replicate]]` rule sending `team/**` to `url`, then `more`, retrying quickly unless
/// `more` says how.
fn replicate_rule(name: &str, url: &str, more: &str) -> String {
    let retry = if more.contains("retry_initial") {
        ""
    } else {
        "retry_initial = \"500ms\"\nretry_max = \"2s\"\n"
    };
    format!(
        "[[replicate]]\nname = \"{name}\"\nrepositories = [\"team/**\"]\ntarget = \"{url}\"\n\
         retries = 20\n{retry}{more}\n"
    )
}

/// The rows of `GET /api/v1/sync/jobs`.
async fn jobs(http: &reqwest::Client, pier: &Pier) -> Vec<Value> {
    let body = common::get_json(http, &format!("{}/api/v1/sync/jobs", pier.url())).await;
    body["jobs"].as_array().cloned().unwrap_or_default()
}

/// Poll the jobs until `done` holds for them (at most `limit`); returns them.
async fn wait_jobs(
    http: &reqwest::Client,
    pier: &Pier,
    limit: Duration,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let rows = jobs(http, pier).await;
        if done(&rows) {
            return rows;
        }
        if started.elapsed() > limit {
            panic!("{what}: not within {limit:?}; jobs:\n{rows:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn of_kind<'a>(rows: &'a [Value], kind: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["kind"] == kind).collect()
}

fn all_succeeded(rows: &[&Value]) -> bool {
    !rows.is_empty() && rows.iter().all(|r| r["state"] == "succeeded")
}

/// `GET` a manifest from a registry by reference; returns Docker-Content-Digest.
async fn remote_digest(http: &reqwest::Client, base: &str, repo: &str, reference: &str) -> String {
    let resp = http
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(reqwest::header::ACCEPT, mirror_support::MANIFEST_ACCEPT)
        .send()
        .await
        .expect("GET manifest");
    assert!(
        resp.status().is_success(),
        "{repo}:{reference} at {base}: {}",
        resp.status()
    );
    resp.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// `pier sync ARGS --url URL`: exit code and stdout.
fn pier_sync(pier: &Pier, args: &[&str]) -> (i32, String) {
    let url = pier.url();
    let out = pier_cli(&[&["sync"], args, &["--url", &url]].concat());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_pier_appears_at_the_remote_registry() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let http = http_client();
    let remote = Registry::start_in(tmp.path());
    let pier = start_pier(tmp.path(), &replicate_rule("dc2", &remote.url(), ""));
    let skopeo = Skopeo::new(tmp.path());

    // An image and a two-platform index sharing a layer, pushed by skopeo into pier.
    let shared = LayerSpec::new("shared.bin", 3 * MIB + 1, 1);
    let layout = write_layout(
        &tmp.path().join("src"),
        vec![
            (
                "app",
                Entry::Image(ImageSpec::linux(
                    "amd64",
                    vec![shared.clone(), LayerSpec::new("app.bin", MIB, 2)],
                )),
            ),
            (
                "multi",
                Entry::Index(vec![
                    ImageSpec::linux("amd64", vec![shared.clone()]),
                    ImageSpec::linux("arm64", vec![LayerSpec::new("arm.bin", 2 * MIB, 3)]),
                ]),
            ),
        ],
    );
    let app = layout.image("app").clone();
    let multi = layout.index("multi").clone();
    skopeo
        .copy(
            &oci_ref(&layout.dir, "app"),
            &format!("docker://{}/team/app:1", pier.host()),
        )
        .await;
    // The first image is at the remote before the second comes: its layer can be mounted.
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the first image",
        |rows| all_succeeded(&of_kind(rows, "replicate")),
    )
    .await;
    skopeo
        .copy_all(
            &oci_ref(&layout.dir, "multi"),
            &format!("docker://{}/team/multi:2", pier.host()),
        )
        .await;
    // Not matched by the rule: stays here.
    skopeo
        .copy(
            &oci_ref(&layout.dir, "app"),
            &format!("docker://{}/other/app:1", pier.host()),
        )
        .await;

    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "replication",
        |rows| {
            let pushes = of_kind(rows, "replicate");
            all_succeeded(&pushes)
                && pushes.iter().any(|r| r["image"] == "team/app:1")
                && pushes.iter().any(|r| r["image"] == "team/multi:2")
        },
    )
    .await;
    assert!(
        of_kind(&rows, "replicate")
            .iter()
            .all(|r| r["target"] == remote.url().as_str() && r["rule"] == "dc2"),
        "{rows:#?}"
    );
    assert!(
        !rows
            .iter()
            .any(|r| r["image"].as_str().unwrap_or("").starts_with("other/")),
        "a repository the rule does not match is not replicated: {rows:#?}"
    );

    // The remote serves both under the same digests, every platform of the index included.
    assert_eq!(
        remote_digest(&http, &remote.url(), "team/app", "1").await,
        app.manifest.digest
    );
    let raw = skopeo
        .inspect_raw(&format!("docker://{}/team/multi:2", remote.host()))
        .await;
    assert_eq!(
        raw, multi.index_bytes,
        "the index's exact bytes at the remote"
    );
    for image in &multi.images {
        assert_eq!(
            remote_digest(&http, &remote.url(), "team/multi", &image.manifest.digest).await,
            image.manifest.digest
        );
    }
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo
        .copy_all(
            &format!("docker://{}/team/multi:2", remote.host()),
            &oci_ref(&back, "multi"),
        )
        .await;
    assert_same_blobs(&layout, &back, &multi.digests());

    // The shared layer was sent once and mounted (or found) for the second repository.
    let shared_digest = &app.layers[0].blob.digest;
    let uploads = remote
        .accesses()
        .into_iter()
        .filter(|a| a.method == "PUT" && a.path.contains("/blobs/uploads/") && a.status == 201)
        .count();
    let blob_count =
        app.blobs().len() + multi.images.iter().map(|i| i.blobs().len()).sum::<usize>();
    assert!(
        uploads < blob_count,
        "{uploads} uploads for {blob_count} blob references: the shared layer {shared_digest} was sent twice"
    );
    assert!(
        remote.log().contains("mount="),
        "no cross-repository mount was asked for"
    );

    // The metrics say the same: succeeded jobs, bytes sent by the rule, no lag left.
    let m = pier.metrics(&http).await;
    let succeeded = m.sum("pier_sync_jobs", &[("state", "succeeded")]);
    assert!(
        succeeded >= 2.0,
        "pier_sync_jobs{{state=succeeded}} = {succeeded}"
    );
    assert_eq!(m.sum("pier_sync_jobs", &[("state", "failed")]), 0.0);
    let sent = m.sum("pier_sync_bytes_total", &[("rule", "dc2")]);
    let layers: u64 = app.blobs().iter().map(|b| b.size).sum();
    assert!(
        sent >= layers as f64,
        "pier_sync_bytes_total{{rule=dc2}} = {sent}, under {layers}"
    );
    assert_eq!(m.sum("pier_sync_lag_seconds", &[("rule", "dc2")]), 0.0);

    // The CLI shows the same rows and exits 0 when nothing failed.
    let (code, out) = pier_sync(&pier, &["status", "--json"]);
    assert_eq!(code, 0, "{out}");
    let cli: Value = serde_json::from_str(&out).expect("pier sync status --json");
    assert_eq!(cli["jobs"].as_array().map(Vec::len), Some(rows.len()));
    let (code, table) = pier_sync(&pier, &["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("team/app:1") && table.contains("succeeded"),
        "{table}"
    );

    // A pushed tag that moves is replicated again, to what it points at now.
    skopeo
        .copy(
            &oci_ref(&layout.dir, "app"),
            &format!("docker://{}/team/multi:2", pier.host()),
        )
        .await;
    let started = Instant::now();
    while remote_digest(&http, &remote.url(), "team/multi", "2").await != app.manifest.digest {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the moved tag did not reach the remote"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Unknown rules are refused with exit 1; a known push rule runs and queues its images.
    assert_eq!(pier_sync(&pier, &["run", "nope"]).0, 1);
    let (code, out) = pier_sync(&pier, &["run", "dc2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 job(s) queued"), "{out}");
    assert_eq!(
        pier_sync(&pier, &["retry", "999"]).0,
        1,
        "no such failed job"
    );
}

/// Push a referrer of `subject` (an artifact with one small layer) into `repo` at `base`;
/// returns its digest.
async fn push_referrer(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    dir: &Path,
    subject: &common::Descriptor,
) -> String {
    let empty = dir.join("empty.json");
    std::fs::write(&empty, b"{}").expect("write the empty config");
    let sig = dir.join("sig.bin");
    std::fs::write(&sig, b"a signature, as far as anyone here can tell").expect("write sig");
    let empty_digest = common::digest_of(b"{}");
    let sig_bytes = std::fs::read(&sig).expect("read sig");
    let sig_digest = common::digest_of(&sig_bytes);
    common::push_blob(http, base, repo, &empty, &empty_digest, Upload::Monolithic).await;
    common::push_blob(http, base, repo, &sig, &sig_digest, Upload::Monolithic).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": common::OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sig_digest, "size": sig_bytes.len()}],
        "subject": subject.to_json(),
    });
    let bytes = serde_json::to_vec(&manifest).expect("referrer JSON");
    let digest = common::digest_of(&bytes);
    common::put_manifest(http, base, repo, &digest, common::OCI_MANIFEST, &bytes).await
}

/// Whether the registry at `base` has `repo@reference` (a manifest).
async fn remote_has(http: &reqwest::Client, base: &str, repo: &str, reference: &str) -> bool {
    http.head(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(reqwest::header::ACCEPT, mirror_support::MANIFEST_ACCEPT)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_go_along_and_deletes_follow_when_the_rule_says_so() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let http = http_client();
    let remote = Registry::start_in(tmp.path());
    let pier = start_pier(
        tmp.path(),
        &replicate_rule(
            "dc2",
            &remote.url(),
            "deletes = true\nprefix = \"site-a/\"\n",
        ),
    );
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("a.bin", 300 * 1024, 5)],
    );
    let image = layout.image("v1").clone();
    // The referrer is pushed first, so that the image's job finds it and sends it along.
    let referrer = push_referrer(&http, &pier.url(), "team/app", tmp.path(), &image.manifest).await;
    push_image(
        &http,
        &pier.url(),
        "team/app",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the image and its referrer",
        |rows| {
            let pushes = of_kind(rows, "replicate");
            pushes.iter().any(|r| r["image"] == "team/app:1") && all_succeeded(&pushes)
        },
    )
    .await;
    // Under the rule's prefix: the image, and its referrer by digest.
    assert_eq!(
        remote_digest(&http, &remote.url(), "site-a/team/app", "1").await,
        image.manifest.digest
    );
    assert!(remote_has(&http, &remote.url(), "site-a/team/app", &referrer).await);
    assert!(
        !remote_has(&http, &remote.url(), "team/app", "1").await,
        "no copy without the prefix"
    );

    // A delete by digest here is a delete there.
    let resp = http
        .delete(format!("{}/v2/team/app/manifests/{referrer}", pier.url()))
        .send()
        .await
        .expect("DELETE the referrer");
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(30),
        "the delete",
        |rows| all_succeeded(&of_kind(rows, "replicate-delete")),
    )
    .await;
    assert_eq!(of_kind(&rows, "replicate-delete").len(), 1, "{rows:#?}");
    assert!(!remote_has(&http, &remote.url(), "site-a/team/app", &referrer).await);
    assert!(
        remote_has(
            &http,
            &remote.url(),
            "site-a/team/app",
            &image.manifest.digest
        )
        .await,
        "the image itself stays"
    );

    // A tag deleted here is deleted there; the image and its other tag stay. (The remote is
    // the CNCF distribution registry, which deletes by digest only: the tag is moved to a
    // placeholder that is then deleted.)
    common::put_manifest(
        &http,
        &pier.url(),
        "team/app",
        "2",
        common::OCI_MANIFEST,
        &image.manifest_bytes,
    )
    .await;
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the second tag",
        |rows| {
            let pushes = of_kind(rows, "replicate");
            pushes.iter().any(|r| r["image"] == "team/app:2") && all_succeeded(&pushes)
        },
    )
    .await;
    assert!(remote_has(&http, &remote.url(), "site-a/team/app", "2").await);
    let resp = http
        .delete(format!("{}/v2/team/app/manifests/1", pier.url()))
        .send()
        .await
        .expect("DELETE tag 1");
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(30),
        "the tag's delete",
        |rows| {
            let deletes = of_kind(rows, "replicate-delete");
            deletes.len() == 2 && all_succeeded(&deletes)
        },
    )
    .await;
    assert!(
        of_kind(&rows, "replicate-delete")
            .iter()
            .any(|r| r["image"] == "team/app:1"),
        "{rows:#?}"
    );
    assert!(
        !remote_has(&http, &remote.url(), "site-a/team/app", "1").await,
        "tag 1 is gone at the remote"
    );
    assert_eq!(
        remote_digest(&http, &remote.url(), "site-a/team/app", "2").await,
        image.manifest.digest,
        "tag 2 still names the image"
    );
    let tags: Value = http
        .get(format!("{}/v2/site-a/team/app/tags/list", remote.url()))
        .send()
        .await
        .expect("GET the remote's tags")
        .json()
        .await
        .expect("tags JSON");
    assert_eq!(tags["tags"], serde_json::json!(["2"]), "{tags}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_bearer_tokens_gets_push_scoped_tokens_for_the_rules_credentials() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "openssl"]) else {
        return;
    };
    let http = http_client();
    let key = SigningKey::generate(&tmp.path().join("key"));
    let issuer = TokenIssuer::start(&key, "robot", "s3cret", &[]).await;
    let remote = Registry::start(
        &tmp.path().join("registry"),
        &tmp.path().join("storage"),
        &issuer.registry_auth(&key),
    );
    let pier = start_pier(
        tmp.path(),
        &replicate_rule(
            "dc2",
            &remote.url(),
            "username = \"robot\"\npassword = \"s3cret\"\n",
        ),
    );
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("a.bin", 700 * 1024, 21)],
    );
    let image = layout.image("v1").clone();
    for repo in ["team/one", "team/two"] {
        push_image(
            &http,
            &pier.url(),
            repo,
            "1",
            &layout,
            &image,
            Upload::Monolithic,
        )
        .await;
        wait_jobs(&http, &pier, Duration::from_secs(60), repo, |rows| {
            let pushes = of_kind(rows, "replicate");
            pushes.iter().any(|r| r["image"] == format!("{repo}:1")) && all_succeeded(&pushes)
        })
        .await;
    }
    let scopes = issuer
        .stats
        .scopes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert!(
        scopes.contains(&"repository:team/one:pull,push".to_string()),
        "{scopes:?}"
    );
    // The second repository's layers were mounted from the first: a token for both.
    assert!(
        scopes.contains(&"repository:team/one:pull".to_string())
            && scopes.contains(&"repository:team/two:pull,push".to_string()),
        "{scopes:?}"
    );
    assert!(remote.log().contains("mount="), "no mount was asked for");
    assert!(
        issuer
            .stats
            .authenticated
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert_eq!(
        issuer
            .stats
            .anonymous
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_is_retried_with_backoff_until_it_returns() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let http = http_client();
    let reg_dir = tmp.path().join("registry");
    let storage = tmp.path().join("storage");
    let mut remote = Registry::start(&reg_dir, &storage, "");
    let addr: std::net::SocketAddr = remote.host().parse().expect("registry address");
    remote.kill();
    let pier = start_pier(
        tmp.path(),
        &replicate_rule(
            "dc2",
            &remote.url(),
            "retry_initial = \"1s\"\nretry_max = \"4s\"\n",
        ),
    );
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("a.bin", MIB, 7)],
    );
    let image = layout.image("v1").clone();
    push_image(
        &http,
        &pier.url(),
        "team/app",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;

    // The job fails against the closed port, again and again, further apart each time.
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(30),
        "three failed attempts",
        |rows| {
            of_kind(rows, "replicate").first().is_some_and(|r| {
                r["attempts"].as_u64().unwrap_or(0) >= 3 && r["state"] == "retrying"
            })
        },
    )
    .await;
    let row = of_kind(&rows, "replicate")[0].clone();
    assert_eq!(row["state"], "retrying", "{row:#}");
    let error = row["last_error"].as_str().unwrap_or("");
    assert!(
        error.contains("refused") || error.contains("unavailable"),
        "{error}"
    );
    let attempts = row["attempts"].as_u64().unwrap_or(0);
    let wait = row["next_at_ms"].as_u64().unwrap_or(0) - row["updated_ms"].as_u64().unwrap_or(0);
    let expected = (1000u64 << (attempts - 1)).min(4000);
    assert!(
        wait >= expected * 9 / 10 && wait <= expected * 11 / 10 + 10,
        "after {attempts} failures the next attempt waits {wait} ms, not about {expected} ms"
    );
    let (code, _) = pier_sync(&pier, &["status"]);
    assert_eq!(code, 0, "retrying is not failed");

    // The registry returns on its address: the next attempt succeeds.
    let remote =
        Registry::start_on(&reg_dir, &storage, addr).expect("the registry's address is free");
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(30),
        "replication after the return",
        |rows| all_succeeded(&of_kind(rows, "replicate")),
    )
    .await;
    assert_eq!(
        remote_digest(&http, &remote.url(), "team/app", "1").await,
        image.manifest.digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_replicated_before_a_restart_is_mounted_after_it_not_sent_again() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let http = http_client();
    let remote = Registry::start_in(tmp.path());
    let mut pier = start_pier(tmp.path(), &replicate_rule("dc2", &remote.url(), ""));
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("a.bin", 2 * MIB, 11)],
    );
    let image = layout.image("v1").clone();
    push_image(
        &http,
        &pier.url(),
        "team/app",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the first image",
        |rows| all_succeeded(&of_kind(rows, "replicate")),
    )
    .await;
    pier.stop();

    // After the restart the process remembers nothing; the finished job says where the
    // blobs went.
    pier.restart();
    push_image(
        &http,
        &pier.url(),
        "team/other",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the same image in another repository",
        |rows| {
            let pushes = of_kind(rows, "replicate");
            pushes.iter().any(|r| r["image"] == "team/other:1") && all_succeeded(&pushes)
        },
    )
    .await;
    assert_eq!(
        remote_digest(&http, &remote.url(), "team/other", "1").await,
        image.manifest.digest
    );
    let accesses = remote.accesses();
    let mounted = accesses
        .iter()
        .filter(|a| {
            a.method == "POST" && a.path == "/v2/team/other/blobs/uploads/" && a.status == 201
        })
        .count();
    let uploaded = accesses
        .iter()
        .filter(|a| a.method == "PUT" && a.path.starts_with("/v2/team/other/blobs/uploads/"))
        .count();
    assert_eq!(
        (mounted, uploaded),
        (2, 0),
        "the layer and the config are mounted from team/app, not uploaded again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_upload_finishes_after_restart_without_sending_twice() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let http = http_client();
    let remote = Registry::start_in(tmp.path());
    // 4 MiB/s makes the 24 MiB layer take about six seconds: long enough to kill pier in it.
    let mut pier = start_pier(
        tmp.path(),
        &replicate_rule("dc2", &remote.url(), "bandwidth = \"4MiB\"\n"),
    );
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![
            LayerSpec::new("small.bin", 64 * 1024, 1),
            LayerSpec::new("big.bin", 24 * MIB, 2),
            LayerSpec::new("after.bin", 2 * MIB, 3),
        ],
    );
    let image = layout.image("v1").clone();
    push_image(
        &http,
        &pier.url(),
        "team/app",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    let big = image.layers[1].blob.digest.clone();

    // Wait until the big layer's upload session is open, then kill pier in the middle of it.
    let started = Instant::now();
    while !remote
        .accesses()
        .iter()
        .any(|a| a.method == "POST" && a.path.ends_with("/blobs/uploads/"))
        || started.elapsed() < Duration::from_secs(2)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no upload began"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        remote_missing(&http, &remote, "team/app", &big).await,
        "the big layer finished before the kill; the test proves nothing"
    );
    pier.kill();

    pier.restart();
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the job after the restart",
        |rows| all_succeeded(&of_kind(rows, "replicate")),
    )
    .await;
    assert_eq!(
        of_kind(&rows, "replicate").len(),
        1,
        "one job, not two: {rows:#?}"
    );
    assert!(
        pier.log().contains("queued again"),
        "the interrupted job was not recovered as such"
    );

    // Every blob arrived once: a blob whose upload completed before the kill was not sent
    // again, and the manifest was put once, after its blobs.
    let accesses = remote.accesses();
    let manifest_puts = accesses
        .iter()
        .filter(|a| a.method == "PUT" && a.path == "/v2/team/app/manifests/1" && a.status == 201)
        .count();
    assert_eq!(
        manifest_puts, 1,
        "the manifest was put {manifest_puts} times"
    );
    let uploads_done = accesses
        .iter()
        .filter(|a| a.method == "PUT" && a.path.contains("/blobs/uploads/") && a.status == 201)
        .count();
    assert_eq!(
        uploads_done,
        image.blobs().len(),
        "each blob completed exactly one upload"
    );

    // Nothing is corrupt: the image copies out of the remote byte for byte.
    let skopeo = Skopeo::new(tmp.path());
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo
        .copy(
            &format!("docker://{}/team/app:1", remote.host()),
            &oci_ref(&back, "v1"),
        )
        .await;
    assert_same_blobs(&layout, &back, &image.digests());
}

/// `GET /api/v1/sync/pins` as (repository, digest, holder), one per holder.
async fn pins(http: &reqwest::Client, pier: &Pier) -> Vec<(String, String, String)> {
    let body = common::get_json(http, &format!("{}/api/v1/sync/pins", pier.url())).await;
    let mut out = Vec::new();
    for p in body["pins"].as_array().cloned().unwrap_or_default() {
        for by in p["by"].as_array().cloned().unwrap_or_default() {
            out.push((
                p["repo"].as_str().unwrap_or("").to_string(),
                p["digest"].as_str().unwrap_or("").to_string(),
                by.as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

/// Whether the remote lacks blob `digest` in `repo`.
async fn remote_missing(
    http: &reqwest::Client,
    remote: &Registry,
    repo: &str,
    digest: &str,
) -> bool {
    let resp = http
        .head(format!("{}/v2/{repo}/blobs/{digest}", remote.url()))
        .send()
        .await
        .expect("HEAD blob");
    resp.status() == reqwest::StatusCode::NOT_FOUND
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_rule_copies_exactly_the_tags_its_filter_selects() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let http = http_client();
    let mut upstream = Registry::start_in(tmp.path());
    let skopeo = Skopeo::new(tmp.path());
    let tags = ["1.0", "1.1", "1.2", "2.0", "2.1-rc.1", "latest", "v3"];
    let entries: Vec<(&str, Entry)> = tags
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                *t,
                Entry::Image(ImageSpec::linux(
                    "amd64",
                    vec![LayerSpec::new(
                        "l.bin",
                        256 * 1024 + i as u64,
                        100 + i as u64,
                    )],
                )),
            )
        })
        .collect();
    let layout = write_layout(&tmp.path().join("src"), entries);
    for t in tags {
        skopeo
            .copy(
                &oci_ref(&layout.dir, t),
                &format!("docker://{}/team/app:{t}", upstream.host()),
            )
            .await;
    }

    let rule = format!(
        "{}\n[[sync]]\nname = \"app\"\nupstream = \"up.test\"\nrepository = \"team/app\"\n\
         semver = \">=1.1, <3\"\nexclude = [\"rc\"]\nnewest = 2\ninterval = \"1h\"\n\
         retry_initial = \"500ms\"\n",
        upstream_table("up.test", &[upstream.url()], "")
    );
    let before = upstream.accesses().len();
    let mut pier = start_pier(tmp.path(), &rule);
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the pull rule's jobs",
        |rows| {
            let pulls = of_kind(rows, "sync");
            pulls.len() >= 2 && all_succeeded(&pulls)
        },
    )
    .await;
    let mut images: Vec<String> = of_kind(&rows, "sync")
        .iter()
        .map(|r| r["image"].as_str().unwrap_or("").to_string())
        .collect();
    images.sort();
    assert_eq!(images, ["up.test/team/app:1.2", "up.test/team/app:2.0"]);

    // Only the selected tags' manifests were asked of the upstream (by HEAD or GET).
    let fetched: Vec<String> = upstream
        .accesses()
        .into_iter()
        .skip(before)
        .filter(|a| a.path.contains("/manifests/"))
        .map(|a| a.path)
        .collect();
    for t in tags {
        let asked = fetched
            .iter()
            .any(|p| p.ends_with(&format!("/manifests/{t}")));
        assert_eq!(
            asked,
            t == "1.2" || t == "2.0",
            "manifest {t} fetched: {asked}; {fetched:?}"
        );
    }

    // Each selected tag pins its image in the cache.
    let held = pins(&http, &pier).await;
    for t in ["1.2", "2.0"] {
        let want = (
            "up.test/team/app".to_string(),
            layout.image(t).manifest.digest.clone(),
            format!("sync:app:team/app:{t}"),
        );
        assert!(held.contains(&want), "{want:?} not in {held:?}");
    }
    assert_eq!(held.len(), 2, "{held:?}");

    // Narrowed to the newest tag, the rule's next run lets go of 1.2 and keeps 2.0.
    pier.stop();
    pier.set_config(&config(&rule.replace("newest = 2", "newest = 1")));
    pier.restart();
    let started = Instant::now();
    loop {
        let held = pins(&http, &pier).await;
        if held.len() == 1 {
            assert_eq!(held[0].2, "sync:app:team/app:2.0", "{held:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "1.2 still pinned: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The copies are in the cache: with the upstream gone, pier still serves them whole.
    upstream.kill();
    for t in ["1.2", "2.0"] {
        let image = layout.image(t);
        let got = remote_digest(&http, &pier.url(), "up.test/team/app", t).await;
        assert_eq!(got, image.manifest.digest, "{t} from the cache");
        for blob in image.blobs() {
            let resp = http
                .get(format!(
                    "{}/v2/up.test/team/app/blobs/{}",
                    pier.url(),
                    blob.digest
                ))
                .send()
                .await
                .expect("GET blob");
            assert_eq!(
                resp.status(),
                reqwest::StatusCode::OK,
                "{t} blob {}",
                blob.digest
            );
        }
    }

    // A run now, with the upstream down, fails visibly.
    let (code, _) = pier_sync(&pier, &["run", "app"]);
    assert_eq!(code, 1, "a run whose upstream cannot be listed exits 1");
}

/// A pull rule's `bandwidth` holds what its fills read from the upstream; a client's pull of
/// another blob meanwhile is not held to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_rules_bandwidth_caps_its_fills_and_not_the_clients() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let http = http_client();
    let upstream = Registry::start_in(tmp.path());
    let skopeo = Skopeo::new(tmp.path());
    // Two images of one 8 MiB layer each: one the rule copies, one a client pulls.
    let image = |seed: u64| {
        Entry::Image(ImageSpec::linux(
            "amd64",
            vec![LayerSpec::new("big.bin", 8 * MIB, seed)],
        ))
    };
    let layout = write_layout(
        &tmp.path().join("src"),
        vec![("ruled", image(41)), ("pulled", image(42))],
    );
    for (tag, repo) in [("ruled", "team/app"), ("pulled", "team/other")] {
        skopeo
            .copy(
                &oci_ref(&layout.dir, tag),
                &format!("docker://{}/{repo}:1", upstream.host()),
            )
            .await;
    }

    // 2 MiB/s with a bucket that starts empty: the 8 MiB layer takes four seconds.
    let rule = format!(
        "{}\n[[sync]]\nname = \"app\"\nupstream = \"up.test\"\nrepository = \"team/app\"\n\
         interval = \"1h\"\nbandwidth = \"2MiB\"\nretry_initial = \"500ms\"\n",
        upstream_table("up.test", &[upstream.url()], "")
    );
    let pier = start_pier(tmp.path(), &rule);
    let started = Instant::now();
    let running = |rows: &[Value]| {
        let pulls = of_kind(rows, "sync");
        !pulls.is_empty() && !all_succeeded(&pulls)
    };
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(20),
        "the rule's job",
        |rows| !of_kind(rows, "sync").is_empty(),
    )
    .await;

    // While the rule's job is held to its cap, a client pulls the other layer whole.
    let other = layout.image("pulled").layers[0].blob.clone();
    let resp = http
        .get(format!(
            "{}/v2/up.test/team/other/blobs/{}",
            pier.url(),
            other.digest
        ))
        .send()
        .await
        .expect("GET the other layer");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let body = resp.bytes().await.expect("the other layer's body");
    assert_eq!(common::digest_of(&body), other.digest);
    let rows = jobs(&http, &pier).await;
    assert!(
        running(&rows),
        "the client's 8 MiB arrived only after the rule's job ended: the rule's cap slowed \
         the client (or did not hold the job); jobs:\n{rows:#?}"
    );

    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the rule's job to succeed",
        |rows| all_succeeded(&of_kind(rows, "sync")),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3500),
        "8 MiB at 2 MiB/s was copied in {took:?}: the rule's bandwidth did not hold"
    );
    let ruled = layout.image("ruled").layers[0].blob.clone();
    let resp = http
        .get(format!(
            "{}/v2/up.test/team/app/blobs/{}",
            pier.url(),
            ruled.digest
        ))
        .send()
        .await
        .expect("GET the rule's layer");
    let body = resp.bytes().await.expect("the rule's layer");
    assert_eq!(
        common::digest_of(&body),
        ruled.digest,
        "the copied layer whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_rules_by_prefix_by_platform_and_into_a_hosted_repository() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let http = http_client();
    let mut upstream = Registry::start_in(tmp.path());
    let skopeo = Skopeo::new(tmp.path());
    let layout = write_layout(
        &tmp.path().join("src"),
        vec![
            (
                "multi",
                Entry::Index(vec![
                    ImageSpec::linux("amd64", vec![LayerSpec::new("amd.bin", 300 * 1024, 61)]),
                    ImageSpec::linux("arm64", vec![LayerSpec::new("arm.bin", 200 * 1024, 62)]),
                ]),
            ),
            (
                "plain",
                Entry::Image(ImageSpec::linux(
                    "arm64",
                    vec![LayerSpec::new("p.bin", 100 * 1024, 63)],
                )),
            ),
        ],
    );
    let multi = layout.index("multi").clone();
    let plain = layout.image("plain").clone();
    let host = upstream.host();
    skopeo
        .copy_all(
            &oci_ref(&layout.dir, "multi"),
            &format!("docker://{host}/team/a:1.0"),
        )
        .await;
    skopeo
        .copy(
            &oci_ref(&layout.dir, "plain"),
            &format!("docker://{host}/team/b:2.0"),
        )
        .await;
    skopeo
        .copy(
            &oci_ref(&layout.dir, "plain"),
            &format!("docker://{host}/other/c:1.0"),
        )
        .await;
    let before = upstream.accesses().len();

    let rules = format!(
        "{}\n[[sync]]\nname = \"team\"\nupstream = \"up.test\"\nprefix = \"team/\"\n\
         platforms = [\"linux/arm64\"]\ninterval = \"1h\"\nretry_initial = \"500ms\"\n\n\
         [[sync]]\nname = \"c\"\nupstream = \"up.test\"\nrepository = \"other/c\"\n\
         into = \"hosted/c\"\ninterval = \"1h\"\nretry_initial = \"500ms\"\n",
        upstream_table("up.test", &[upstream.url()], "")
    );
    let pier = start_pier(tmp.path(), &rules);
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(60),
        "the pull rules' jobs",
        |rows| {
            let pulls = of_kind(rows, "sync");
            pulls.len() >= 3 && all_succeeded(&pulls)
        },
    )
    .await;
    let mut images: Vec<(String, String)> = of_kind(&rows, "sync")
        .iter()
        .map(|r| {
            (
                r["image"].as_str().unwrap_or("").to_string(),
                r["target"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    images.sort();
    assert_eq!(
        images,
        [
            ("up.test/other/c:1.0".to_string(), "hosted/c".to_string()),
            (
                "up.test/team/a:1.0".to_string(),
                "up.test/team/a".to_string()
            ),
            (
                "up.test/team/b:2.0".to_string(),
                "up.test/team/b".to_string()
            ),
        ],
        "the prefix found team/a and team/b in the catalog, not other/c"
    );

    // Of the index, only the arm64 image's blobs were fetched.
    let gets: Vec<String> = upstream
        .accesses()
        .into_iter()
        .skip(before)
        .filter(|a| a.method == "GET" && a.path.contains("/blobs/"))
        .map(|a| a.path)
        .collect();
    let (amd, arm) = (&multi.images[0], &multi.images[1]);
    assert_eq!(arm.arch, "arm64");
    for blob in arm.blobs() {
        assert!(
            gets.iter().any(|p| p.ends_with(&blob.digest)),
            "arm64 blob {} fetched: {gets:?}",
            blob.digest
        );
    }
    for blob in amd.layers.iter().map(|l| &l.blob) {
        assert!(
            !gets.iter().any(|p| p.ends_with(&blob.digest)),
            "amd64 layer {} fetched",
            blob.digest
        );
    }

    // The hosted copy is a repository of its own, served with the upstream gone.
    upstream.kill();
    assert_eq!(
        remote_digest(&http, &pier.url(), "hosted/c", "1.0").await,
        plain.manifest.digest
    );
    for blob in plain.blobs() {
        let resp = http
            .get(format!("{}/v2/hosted/c/blobs/{}", pier.url(), blob.digest))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(
            resp.status(),
            reqwest::StatusCode::OK,
            "hosted/c blob {}",
            blob.digest
        );
    }
    assert_eq!(
        remote_digest(&http, &pier.url(), "up.test/team/a", "1.0").await,
        multi.index.digest,
        "the index itself is kept whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_through_a_faulty_link_ends_with_every_job_succeeded() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let http = http_client();
    let remote = Registry::start_in(tmp.path());
    let proxy = FaultyProxy::start(&remote.url(), 0.2, 0x5eed).await;
    let pier = start_pier(
        tmp.path(),
        &replicate_rule("dc2", &proxy.url(), "concurrency = 4\n"),
    );
    let images = 12;
    let mut pushed = Vec::new();
    for i in 0..images {
        let layout = one_image(
            &tmp.path().join(format!("src{i}")),
            "v1",
            vec![
                LayerSpec::new("base.bin", 512 * 1024, 1),
                LayerSpec::new("own.bin", 256 * 1024 + i, 1000 + i),
            ],
        );
        let image = layout.image("v1").clone();
        let repo = format!("team/app{i}");
        push_image(
            &http,
            &pier.url(),
            &repo,
            "1",
            &layout,
            &image,
            Upload::Monolithic,
        )
        .await;
        pushed.push((repo, image));
    }
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(120),
        "every job through the faults",
        |rows| {
            let pushes = of_kind(rows, "replicate");
            pushes.len() == images as usize
                && pushes
                    .iter()
                    .all(|r| r["state"] == "succeeded" || r["state"] == "failed")
        },
    )
    .await;
    let pushes = of_kind(&rows, "replicate");
    let failed: Vec<_> = pushes.iter().filter(|r| r["state"] == "failed").collect();
    assert!(failed.is_empty(), "jobs failed for good: {failed:#?}");
    let attempts: u64 = pushes
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "fault run: {} requests through the proxy, {} failed on purpose; {} jobs succeeded in {} attempts",
        proxy.requests.load(std::sync::atomic::Ordering::Relaxed),
        proxy.failed.load(std::sync::atomic::Ordering::Relaxed),
        pushes.len(),
        attempts
    );
    assert!(
        proxy.failed.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no fault was injected"
    );
    for (repo, image) in &pushed {
        assert_eq!(
            remote_digest(&http, &remote.url(), repo, "1").await,
            image.manifest.digest,
            "{repo}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The sync benchmark (PIER_SYNC_BENCH=1; scripts/sync-bench.sh)
// ---------------------------------------------------------------------------------------------

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Print a result line, and append it to `PIER_SYNC_BENCH_OUT` when set.
fn bench_line(text: String) {
    common::bench_line("PIER_SYNC_BENCH_OUT", &text);
}

/// Replication throughput to one docker-registry (a fresh image, then the same layer into a
/// second repository, which is mounted), and a fault run: many images through a proxy that
/// fails a fraction of requests, with the success rate and the attempts it took. Prints
/// numbers and asserts none of them. Knobs: `PIER_SYNC_BENCH_MIB` (the layer, default 512),
/// `PIER_SYNC_BENCH_FAULT_IMAGES` (default 50), `PIER_SYNC_BENCH_FAULT_PERCENT` (default 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_bench() {
    if std::env::var("PIER_SYNC_BENCH").as_deref() != Ok("1") {
        println!(
            "skipped: set PIER_SYNC_BENCH=1 to run the sync benchmark (scripts/sync-bench.sh)"
        );
        return;
    }
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let http = http_client();
    let mib = env_number("PIER_SYNC_BENCH_MIB", 512);
    let remote = Registry::start_in(tmp.path());
    let pier = start_pier(
        tmp.path(),
        &replicate_rule(
            "dc2",
            &remote.url(),
            "on_push = false\ninterval = \"24h\"\n",
        ),
    );
    let layout = one_image(
        &tmp.path().join("big"),
        "v1",
        vec![LayerSpec::new("big.bin", mib * MIB, 9)],
    );
    let image = layout.image("v1").clone();
    push_image(
        &http,
        &pier.url(),
        "team/big",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    let bytes: u64 = image.blobs().iter().map(|b| b.size).sum();

    let run = |name: &'static str| {
        let http = http.clone();
        let url = format!("{}/api/v1/sync/run/{name}", pier.url());
        async move {
            let resp = http.post(url).send().await.expect("run the rule");
            assert!(resp.status().is_success(), "run: {}", resp.status());
        }
    };
    // CPU, user + system, of pier and of the receiving registry over the replication.
    let cpu_of =
        |pid: Option<u32>| pid.and_then(|p| pier_bench::cpu::ServerCpu::new(&[p]).ok().flatten());
    let (pier_cpu, remote_cpu) = (cpu_of(Some(pier.pid())), cpu_of(remote.pid()));
    let seconds = |c: &Option<pier_bench::cpu::ServerCpu>| c.as_ref().map_or(0.0, |c| c.seconds());
    let (pier_before, remote_before) = (seconds(&pier_cpu), seconds(&remote_cpu));
    let started = Instant::now();
    run("dc2").await;
    let rows = wait_jobs(
        &http,
        &pier,
        Duration::from_secs(600),
        "the big image",
        |rows| all_succeeded(&of_kind(rows, "replicate")),
    )
    .await;
    let took = started.elapsed();
    let job = of_kind(&rows, "replicate")[0].clone();
    let ran_ms = job["updated_ms"].as_u64().unwrap_or(0) - job["created_ms"].as_u64().unwrap_or(0);
    println!("the job's own times: {ran_ms} ms from queued to succeeded");
    bench_line(format!(
        "sync: replication to one registry: {:.0} MiB in {:.2} s = {:.1} MB/s",
        bytes as f64 / MIB as f64,
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64()
    ));
    let per_gib = |s: f64| pier_bench::cpu::per_gib(s, bytes).unwrap_or(f64::NAN);
    bench_line(format!(
        "sync: CPU s/GiB replicated (user + system): pier {:.2}, the receiving registry {:.2}",
        per_gib(seconds(&pier_cpu) - pier_before),
        per_gib(seconds(&remote_cpu) - remote_before)
    ));

    // For scale: skopeo copying the same image from pier to the same registry.
    let skopeo = Skopeo::new(tmp.path());
    let started = Instant::now();
    skopeo
        .copy(
            &format!("docker://{}/team/big:1", pier.host()),
            &format!("docker://{}/skopeo/big:1", remote.host()),
        )
        .await;
    let took = started.elapsed();
    bench_line(format!(
        "sync: for scale, skopeo copy of the same image from pier to the registry: {:.2} s = {:.1} MB/s",
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64()
    ));

    // The same layer in a second repository: mounted, not sent.
    push_image(
        &http,
        &pier.url(),
        "team/big2",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    let started = Instant::now();
    run("dc2").await;
    wait_jobs(
        &http,
        &pier,
        Duration::from_secs(600),
        "the mounted image",
        |rows| {
            let pushes = of_kind(rows, "replicate");
            pushes.iter().any(|r| r["image"] == "team/big2:1") && all_succeeded(&pushes)
        },
    )
    .await;
    bench_line(format!(
        "sync: the same {:.0} MiB into a second repository (cross-repository mount): {:.2} s",
        bytes as f64 / MIB as f64,
        started.elapsed().as_secs_f64()
    ));

    // The fault run.
    let images = env_number("PIER_SYNC_BENCH_FAULT_IMAGES", 50);
    let percent = env_number("PIER_SYNC_BENCH_FAULT_PERCENT", 20);
    let proxy = FaultyProxy::start(&remote.url(), percent as f64 / 100.0, 0xfa17).await;
    let ftmp = tmp.path().join("fault");
    std::fs::create_dir_all(&ftmp).expect("fault dir");
    let fpier = start_pier(
        &ftmp,
        &replicate_rule("faulty", &proxy.url(), "concurrency = 4\n")
            .replace("retries = 20\n", "retries = 5\n"),
    );
    let started = Instant::now();
    for i in 0..images {
        let layout = one_image(
            &ftmp.join(format!("src{i}")),
            "v1",
            vec![
                LayerSpec::new("base.bin", 4 * MIB, 1),
                LayerSpec::new("own.bin", MIB + i, 1000 + i),
            ],
        );
        let image = layout.image("v1").clone();
        push_image(
            &http,
            &fpier.url(),
            &format!("team/f{i}"),
            "1",
            &layout,
            &image,
            Upload::Monolithic,
        )
        .await;
    }
    let rows = wait_jobs(
        &http,
        &fpier,
        Duration::from_secs(900),
        "the fault run",
        |rows| {
            let pushes = of_kind(rows, "replicate");
            pushes.len() as u64 == images
                && pushes
                    .iter()
                    .all(|r| r["state"] == "succeeded" || r["state"] == "failed")
        },
    )
    .await;
    let pushes = of_kind(&rows, "replicate");
    let ok = pushes.iter().filter(|r| r["state"] == "succeeded").count();
    let attempts: Vec<u64> = pushes
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap_or(0))
        .collect();
    let requests = proxy.requests.load(std::sync::atomic::Ordering::Relaxed);
    let failed = proxy.failed.load(std::sync::atomic::Ordering::Relaxed);
    bench_line(format!(
        "sync: fault run: {images} images, {percent} % of requests failed at random ({failed} of \
         {requests}): {ok}/{images} jobs succeeded ({:.1} %), attempts per job mean {:.2} max {}, \
         {:.1} s from the first push to the last job's end",
        100.0 * ok as f64 / images as f64,
        attempts.iter().sum::<u64>() as f64 / attempts.len().max(1) as f64,
        attempts.iter().max().copied().unwrap_or(0),
        started.elapsed().as_secs_f64()
    ));
}
