//! Auth with real programs: the `pier` binary started with `--htpasswd` (a file `htpasswd -B`
//! wrote) and `[auth]` rules, skopeo logging in through pier's token service to push and to
//! pull, the CLI's credentials, and a private upstream served by Debian's docker-registry
//! with htpasswd auth. Runs only with `PIER_INTEROP=1` (scripts/test.sh sets it and installs
//! skopeo, docker-registry and apache2-utils).

mod common;
mod mirror_support;

use std::process::Command;

use common::clients::{oci_ref, Skopeo};
use common::{digest_of, interop_tempdir, one_image, pier_cli_env, LayerSpec, Pier, Upload};
use mirror_support::{http_client, start_mirror, upstream_table, Registry};

const RULES: &str = r#"
[auth.groups]
readers = ["reader"]

[[auth.rule]]
repos = ["public/**"]
grant = ["pull"]
to = ["anonymous"]

[[auth.rule]]
repos = ["team/**"]
grant = ["pull"]
to = ["group:readers"]

[[auth.rule]]
repos = ["**"]
grant = ["pull", "push", "delete", "admin"]
to = ["user:writer"]
"#;

fn htpasswd(file: &std::path::Path, user: &str, password: &str, create: bool) {
    let mut cmd = Command::new("htpasswd");
    cmd.arg(if create { "-Bbc" } else { "-Bb" })
        .arg(file)
        .arg(user)
        .arg(password);
    let out = cmd.output().expect("run htpasswd");
    assert!(out.status.success(), "htpasswd: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_logs_in_through_the_token_service() {
    let Some(tmp) = interop_tempdir(&["skopeo", "htpasswd"]) else {
        return;
    };
    let users = tmp.path().join("htpasswd");
    htpasswd(&users, "writer", "writer-pw", true);
    htpasswd(&users, "reader", "reader-pw", false);
    let pier = Pier::with_config(
        tmp.path(),
        &format!("[auth]\n{RULES}"),
        &["--hosted", "**", "--htpasswd", &users.display().to_string()],
    );
    let host = pier.host();
    let skopeo = Skopeo::new(tmp.path());
    let layout = one_image(
        &tmp.path().join("src"),
        "app",
        vec![LayerSpec::new("app.bin", 300_000, 7)],
    );
    let image = layout.image("app").clone();
    let dest = format!("docker://{host}/team/app:v1");

    // The writer pushes: skopeo meets the Bearer challenge, asks /token with its Basic
    // credentials and retries with the token.
    skopeo
        .run(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-creds",
            "writer:writer-pw",
            &oci_ref(&layout.dir, "app"),
            &dest,
        ])
        .await;
    // The reader pulls the same bytes.
    let raw = skopeo
        .run(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            "reader:reader-pw",
            &dest,
        ])
        .await;
    assert_eq!(digest_of(&raw), image.manifest.digest);

    // Without credentials: the challenge skopeo followed, naming the scope.
    let http = reqwest::Client::new();
    let url = format!("{}/v2/team/app/manifests/v1", pier.url());
    let resp = http.get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii");
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"http://{host}/token\",service=\"{host}\",scope=\"repository:team/app:pull\""
        )
    );
    // The reader may not push.
    let resp = http
        .post(format!("{}/v2/team/app/blobs/uploads/", pier.url()))
        .basic_auth("reader", Some("reader-pw"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 403);

    // The CLI: `pier status` needs an admin, given in the environment.
    let url = pier.url();
    let status = |env: &[(&str, &str)]| pier_cli_env(&["status", "--url", &url], env);
    let out = status(&[]);
    assert!(!out.status.success(), "status without credentials: {out:?}");
    let out = status(&[("PIER_USERNAME", "reader"), ("PIER_PASSWORD", "reader-pw")]);
    assert!(!out.status.success(), "status as a non-admin: {out:?}");
    let out = status(&[("PIER_USERNAME", "writer"), ("PIER_PASSWORD", "writer-pw")]);
    assert!(out.status.success(), "status as admin: {out:?}");

    // The password from a file, so that it is in neither the process list nor the
    // environment of every child; a trailing newline (as `echo` writes) is not part of it.
    let password_file = tmp.path().join("admin-password");
    std::fs::write(&password_file, "writer-pw\n").expect("write the password file");
    let out = status(&[
        ("PIER_USERNAME", "writer"),
        ("PIER_PASSWORD_FILE", &password_file.display().to_string()),
    ]);
    assert!(out.status.success(), "status with a password file: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_upstream_serves_its_cached_image_only_to_its_own_users() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "htpasswd"]) else {
        return;
    };
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("secret.bin", 700_000, 31)],
    );
    let image = layout.image("v1").clone();
    let http = http_client();

    // The upstream's storage is filled without auth, then served with htpasswd auth: pier's
    // own robot user and alice may pull, nobody else.
    let storage = tmp.path().join("storage");
    {
        let open = Registry::start(&tmp.path().join("open-registry"), &storage, "");
        common::push_image(
            &http,
            &open.url(),
            "team/private",
            "v1",
            &layout,
            &image,
            Upload::PostThenPut,
        )
        .await;
    }
    let users = tmp.path().join("upstream-htpasswd");
    htpasswd(&users, "robot", "robot-pw", true);
    htpasswd(&users, "alice", "alice-pw", false);
    let registry = Registry::start(
        &tmp.path().join("registry"),
        &storage,
        &format!(
            "auth:\n  htpasswd:\n    realm: upstream\n    path: {}\n",
            users.display()
        ),
    );
    let table = upstream_table(
        "private.test",
        &[registry.url()],
        "username = \"robot\"\npassword = \"robot-pw\"\nprivate = true\nprivate_check_ttl = 60\n",
    );
    let (pier, _) = start_mirror(tmp.path(), false, &table, &[]);
    let layer = &image.layers[0].blob.digest;
    let get = |path: String, user: Option<(&str, &str)>| {
        let mut req = http
            .get(format!("{}{path}", pier.url()))
            .header(reqwest::header::ACCEPT, mirror_support::MANIFEST_ACCEPT);
        if let Some((u, p)) = user {
            req = req.basic_auth(u, Some(p));
        }
        async move {
            let resp = req.send().await.expect("GET through pier");
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            (status, headers, resp.bytes().await.expect("body"))
        }
    };
    let manifest = "/v2/private.test/team/private/manifests/v1".to_string();
    let blob = format!("/v2/private.test/team/private/blobs/{layer}");

    let (status, _, body) = get(manifest.clone(), Some(("alice", "alice-pw"))).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_ref(), image.manifest_bytes.as_slice());
    let (status, _, body) = get(blob.clone(), Some(("alice", "alice-pw"))).await;
    assert_eq!(status, 200);
    assert_eq!(digest_of(&body), *layer);

    // Cached now; still refused to a client the upstream does not accept.
    let (status, headers, _) = get(blob.clone(), None).await;
    assert_eq!(status, 401);
    assert_eq!(
        headers["www-authenticate"].to_str().expect("ascii"),
        "Basic realm=\"private.test\""
    );
    for path in [&blob, &manifest] {
        let (status, _, body) = get(path.clone(), Some(("mallory", "guess"))).await;
        assert_eq!(status, 403, "{path}");
        assert!(
            String::from_utf8_lossy(&body).contains("DENIED"),
            "{path}: {body:?}"
        );
    }
    let (status, _, body) = get(blob.clone(), Some(("alice", "alice-pw"))).await;
    assert_eq!(status, 200);
    assert_eq!(digest_of(&body), *layer);
    let gets = registry
        .wait_blob_gets("team/private", layer, |g| !g.is_empty())
        .await;
    assert_eq!(gets.len(), 1, "the upstream sent the blob once: {gets:?}");
}
