//! What `deploy/` ships, checked with the tools operators run them with: the systemd unit with
//! `systemd-analyze verify`, the alert rules with `promtool check rules` and, against metrics
//! scraped from real pier nodes, `promtool test rules` (a node that sees a dead member fires
//! `PierNodeDown`, a node answering 5xx fires `PierHigh5xxRate`, healthy nodes fire neither);
//! the Helm chart rendered, linted and schema-checked offline by `deploy/helm/check.py`; and
//! every metric the alerts and the Grafana dashboard use is one docs/metrics.md documents.
//!
//! The tool checks run with `PIER_INTEROP=1` (scripts/test.sh installs systemd, prometheus
//! and the Python packages); the documentation check always runs.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, require, Launch};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every `pier_…` metric name in `text`, with a counter's or histogram's sample suffix
/// (`_total`, `_bucket`, `_sum`, `_count`) kept as written.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("pier_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary && end > start + 5 {
            names.push(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn alerts_and_dashboard_use_only_documented_metrics() {
    let root = repo();
    let documented = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let documented: Vec<String> = metric_names(&documented);
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/pier-dashboard.json",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} uses no pier metric");
        for name in used {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                documented.iter().any(|d| d == base),
                "{file} uses {name}, which docs/metrics.md does not document"
            );
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/pier-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| p.len() >= 10));
}

#[test]
fn systemd_unit_verifies() {
    if !require(&["systemd-analyze"]) {
        return;
    }
    // verify wants the program it starts to exist: the built binary stands in for
    // /usr/local/bin/pier; nothing else of the unit changes.
    let tmp = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/pier.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/pier serve"));
    for needed in [
        "Restart=on-failure",
        "RestartSec=10s",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "User=pier",
        "StateDirectory=pier",
    ] {
        assert!(unit.contains(needed), "the unit sets {needed}");
    }
    let unit = unit.replace("/usr/local/bin/pier", env!("CARGO_BIN_EXE_pier"));
    let path = tmp.path().join("pier.service");
    std::fs::write(&path, unit).unwrap();
    let (ok, out) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning"));
    // On a machine not booted with systemd, verify also reports the host's own missing units;
    // only lines about pier.service count.
    let about_pier: Vec<&str> = out.lines().filter(|l| l.contains("pier.service")).collect();
    assert!(
        about_pier.is_empty(),
        "systemd-analyze verify (exit ok: {ok}) on the unit:\n{out}"
    );
}

#[test]
fn helm_chart_renders_lints_and_validates_offline() {
    if !require(&["python3"]) {
        return;
    }
    let (ok, out) = run(Command::new("python3").arg(repo().join("deploy/helm/check.py")));
    println!("{out}");
    assert!(ok, "deploy/helm/check.py failed:\n{out}");
}

#[test]
fn alert_rules_pass_promtool_check() {
    if !require(&["promtool"]) {
        return;
    }
    let (ok, out) = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(repo().join("deploy/prometheus/alerts.yml")));
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Samples of the metrics named in `wanted`, scraped from `url` once per call: each line's
/// series (name and labels, plus `instance` and `job` as Prometheus adds them) and value.
async fn scrape(
    http: &reqwest::Client,
    url: &str,
    instance: &str,
    wanted: &[&str],
) -> BTreeMap<String, f64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if !wanted.contains(&name) {
            continue;
        }
        let extra = format!("instance=\"{instance}\",job=\"pier\"");
        let series = match series.strip_suffix('}') {
            Some(s) => format!("{s},{extra}}}"),
            None => format!("{series}{{{extra}}}"),
        };
        out.insert(series, value.parse().unwrap());
    }
    out
}

/// The scrapes as promtool input series, one scrape per minute of promtool's clock; a series
/// missing from an early scrape (a counter that did not exist yet) is 0 there.
fn input_series(scrapes: &[BTreeMap<String, f64>]) -> String {
    let mut all: Vec<&String> = scrapes.iter().flat_map(|s| s.keys()).collect();
    all.sort();
    all.dedup();
    let mut out = String::new();
    for series in all {
        let values: Vec<String> = scrapes
            .iter()
            .map(|s| s.get(series).copied().unwrap_or(0.0).to_string())
            .collect();
        writeln!(
            out,
            "      - series: '{series}'\n        values: '{}'",
            values.join(" ")
        )
        .unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_and_5xx_alerts_fire_on_real_metrics() {
    if !require(&["promtool"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let secret = common::cluster_secret(tmp.path());
    let peer = [free_port(), free_port()];
    // An upstream nothing listens on: every mirrored pull fails with a 5xx.
    let dead_upstream = format!("http://127.0.0.1:{}", free_port());
    let node = |i: usize| {
        let name = format!("n{i}");
        let join = (i > 0).then_some(peer[0]);
        Launch::new(
            &tmp.path().join(&name),
            &tmp.path().join(format!("{name}.log")),
        )
        .args(["--upstream", &format!("down.example={dead_upstream}")])
        .member(&name, peer[i], &secret, join)
        .start()
    };
    let mut n0 = node(0);
    let n1 = node(1);
    let http = reqwest::Client::new();
    let members = &["pier_cluster_members"];
    let requests = &["pier_http_requests_total"];
    let started = Instant::now();
    loop {
        let m = scrape(&http, &n1.url(), "n1", members).await;
        if m.iter()
            .any(|(k, v)| k.contains("state=\"alive\"") && *v == 2.0)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "n1 never saw n0: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Healthy: both alive, and requests that succeed.
    let mut healthy = Vec::new();
    for _ in 0..8 {
        let r = http.get(format!("{}/v2/", n1.url())).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut s = scrape(&http, &n1.url(), "n1", members).await;
        s.extend(scrape(&http, &n1.url(), "n1", requests).await);
        healthy.push(s);
    }

    // n0 dies; n1 notices within seconds. Meanwhile n1's pulls from a dead upstream fail.
    n0.kill();
    let started = Instant::now();
    let mut failing = Vec::new();
    while failing.len() < 8 {
        for _ in 0..3 {
            let r = http
                .get(format!("{}/v2/down.example/app/manifests/v1", n1.url()))
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_server_error(),
                "a pull from a dead upstream: {}",
                r.status()
            );
        }
        let mut s = scrape(&http, &n1.url(), "n1", members).await;
        s.extend(scrape(&http, &n1.url(), "n1", requests).await);
        let dead = s
            .iter()
            .any(|(k, v)| k.contains("state=\"dead\"") && *v >= 1.0);
        if dead {
            failing.push(s);
        } else {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "n1 never saw n0 die: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let rules = repo().join("deploy/prometheus/alerts.yml");
    let test = format!(
        "rule_files:\n  - {rules:?}\nevaluation_interval: 1m\ntests:\n  \
         - name: healthy node\n    interval: 1m\n    input_series:\n{healthy}    \
         alert_rule_test:\n      - eval_time: 7m\n        alertname: PierNodeDown\n        \
         exp_alerts: []\n      - eval_time: 7m\n        alertname: PierHigh5xxRate\n        \
         exp_alerts: []\n  \
         - name: a member dead and every request failing\n    interval: 1m\n    input_series:\n\
         {failing}    alert_rule_test:\n      - eval_time: 7m\n        alertname: PierNodeDown\n        \
         exp_alerts:\n          - exp_labels: {{severity: warning, instance: n1}}\n            \
         exp_annotations:\n              summary: \"n1 sees 1 dead cluster member(s)\"\n              \
         description: \"A member stopped answering gossip probes. Its blobs are served by their other owners; bring it back or remove it (it is forgotten ten minutes after it died).\"\n      \
         - eval_time: 7m\n        alertname: PierHigh5xxRate\n        exp_alerts:\n          \
         - exp_labels: {{severity: critical, instance: n1}}\n            exp_annotations:\n              \
         summary: \"n1 answers 100% of requests with 5xx\"\n              \
         description: \"More than 5 % of registry requests failed on the server side for five minutes (upstream down with nothing cached, storage full, ...). See the log's warn lines.\"\n",
        healthy = input_series(&healthy),
        failing = input_series(&failing),
    );
    let path = tmp.path().join("alerts_test.yml");
    std::fs::write(&path, &test).unwrap();
    let (ok, out) = run(Command::new("promtool").arg("test").arg("rules").arg(&path));
    assert!(
        ok,
        "promtool test rules:\n{out}\n--- the test file:\n{test}"
    );
}
