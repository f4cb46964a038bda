//! The `pier` command line as a user meets it: exit statuses and messages of `pier bench` and
//! `pier config`, run as the real binary.

mod common;

use common::{pier_cli, pier_cli_env};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn bench_where_every_operation_fails_exits_non_zero_after_the_report() {
    // A loopback port nothing listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let registry = format!("http://127.0.0.1:{port}");
    let digest = format!("sha256:{}", "0".repeat(64));
    let args = [
        "bench",
        "--registry",
        &registry,
        "--no-progress",
        "blob",
        "--repo",
        "a",
        "--digest",
        &digest,
        "-n",
        "3",
    ];
    let out = pier_cli(&args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("all 3 operations failed (connect: 3)"),
        "stderr: {stderr}"
    );
    assert!(
        stdout.contains("connect"),
        "the report is still printed: {stdout}"
    );
}

#[test]
fn config_pier_url_gets_http_only_without_a_scheme() {
    let out = pier_cli(&["config", "docker", "--pier", "pier.lan:5000"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let snippet: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("daemon.json snippet is JSON");
    assert_eq!(
        snippet["registry-mirrors"],
        serde_json::json!(["http://pier.lan:5000"])
    );

    let out = pier_cli(&["config", "docker", "--pier", "https://pier.lan"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let snippet: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("daemon.json snippet is JSON");
    assert_eq!(
        snippet["registry-mirrors"],
        serde_json::json!(["https://pier.lan"])
    );
}

#[test]
fn config_refuses_a_pier_url_with_another_scheme() {
    for client in ["docker", "podman", "containerd"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs.d");
        let certs = certs.to_str().expect("utf-8 path");
        let mut args = vec!["config", client, "--pier", "ftp://x"];
        if client == "containerd" {
            args.extend(["--certs-dir", certs]);
        }
        let out = pier_cli(&args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{client}: stdout: {stdout}");
        assert!(
            stderr.contains("--pier ftp://x: the scheme must be http:// or https://"),
            "{client}: stderr: {stderr}"
        );
        assert!(
            !stdout.contains("ftp"),
            "{client}: nothing printed: {stdout}"
        );
        assert!(
            !dir.path().join("certs.d").exists(),
            "{client}: nothing written"
        );
    }
}

#[test]
fn a_password_in_the_url_is_refused_by_every_command_that_takes_one() {
    // Nothing listens on port 9 of loopback; the refusal comes before any request.
    let url = "http://admin:s3cret-pw@127.0.0.1:9";
    let commands: &[&[&str]] = &[
        &["status", "--url", url],
        &["import", "--url", url, "image.tar"],
        &["export", "--url", url, "-o", "out.tar", "app:v1"],
        &["warm", "--url", url, "app:v1"],
        &["sync", "status", "--url", url],
        &["gc", "--url", url],
        &["check", "--url", url],
    ];
    for args in commands {
        let out = pier_cli(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("credentials in the URL are refused")
                && stderr.contains("PIER_USERNAME=admin")
                && stderr.contains("PIER_PASSWORD_FILE")
                && stderr.contains("http://127.0.0.1:9"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret-pw"),
            "{args:?} repeats the password: {stderr}"
        );
    }
}

#[test]
fn an_unreadable_password_file_is_named_before_anything_is_asked() {
    let out = pier_cli_env(
        &["status", "--url", "http://127.0.0.1:9"],
        &[
            ("PIER_USERNAME", "admin"),
            ("PIER_PASSWORD_FILE", "/nonexistent/pier-password"),
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("PIER_PASSWORD_FILE /nonexistent/pier-password: cannot read the password"),
        "{stderr}"
    );
}

#[test]
fn the_help_of_a_command_with_url_says_where_credentials_come_from() {
    for command in ["status", "import", "export", "warm", "gc", "check"] {
        let out = pier_cli(&[command, "--help"]);
        let help = text(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            help.contains("PIER_USERNAME with PIER_PASSWORD or PIER_PASSWORD_FILE"),
            "pier {command} --help: {help}"
        );
    }
}
