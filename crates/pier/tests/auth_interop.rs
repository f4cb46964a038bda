//! Auth with a real client: the `pier` binary started with `--htpasswd` (a file `htpasswd -B`
//! wrote) and `[auth]` rules, skopeo logging in through pier's token service to push and to
//! pull, and the CLI's credentials. Runs only with `PIER_INTEROP=1` (scripts/test.sh sets it
//! and installs skopeo and apache2-utils).

mod common;

use std::process::Command;

use common::clients::{oci_ref, Skopeo};
use common::{digest_of, interop_tempdir, write_layout, Entry, ImageSpec, LayerSpec, Pier};

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
    let config = tmp.path().join("pier.toml");
    std::fs::write(&config, format!("[auth]\n{RULES}")).expect("write config");
    let pier = Pier::start_with(
        &tmp.path().join("data"),
        &tmp.path().join("pier.log"),
        &[
            "--hosted".into(),
            "**".into(),
            "--config".into(),
            config.display().to_string(),
            "--htpasswd".into(),
            users.display().to_string(),
        ],
    );
    let host = pier.host();
    let skopeo = Skopeo::new(tmp.path());
    let layout = write_layout(
        &tmp.path().join("src"),
        vec![(
            "app",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![LayerSpec::new("app.bin", 300_000, 7)],
            )),
        )],
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
    let status = |user: Option<(&str, &str)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pier"));
        cmd.args(["status", "--url", &pier.url()])
            .env_remove("PIER_USERNAME")
            .env_remove("PIER_PASSWORD");
        if let Some((u, p)) = user {
            cmd.env("PIER_USERNAME", u).env("PIER_PASSWORD", p);
        }
        cmd.output().expect("run pier status")
    };
    let out = status(None);
    assert!(!out.status.success(), "status without credentials: {out:?}");
    let out = status(Some(("reader", "reader-pw")));
    assert!(!out.status.success(), "status as a non-admin: {out:?}");
    let out = status(Some(("writer", "writer-pw")));
    assert!(out.status.success(), "status as admin: {out:?}");
}
