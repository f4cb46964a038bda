//! `pier config containerd|docker|podman`: the client configuration that sends pulls through
//! this pier, keeping each original registry as the fallback.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::UpstreamConfig;

/// `http://host:port` of this pier as clients reach it, from `--pier` or the listen address.
/// `--pier` may leave out the scheme (`pier.lan:5000` means plain HTTP); any scheme other than
/// http or https is refused, since every client file written from it would be wrong.
pub fn pier_url(explicit: Option<&str>, listen: std::net::SocketAddr) -> anyhow::Result<String> {
    let Some(given) = explicit else {
        let host = if listen.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            listen.ip().to_string()
        };
        return Ok(format!("http://{host}:{}", listen.port()));
    };
    let trimmed = given.trim();
    let (scheme, rest) = match trimmed.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("http".to_string(), trimmed),
    };
    let rest = rest.trim_end_matches('/');
    if scheme != "http" && scheme != "https" {
        anyhow::bail!(
            "--pier {given}: the scheme must be http:// or https:// (or none, for http), \
             not {scheme}://"
        );
    }
    if rest.is_empty() || rest.contains('/') {
        anyhow::bail!("--pier {given}: expected [http[s]://]host[:port], with no path");
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The `hosts.toml` for one upstream: pier first, the original registry as the `server`.
pub fn containerd_hosts(upstream: &UpstreamConfig, pier: &str) -> String {
    let server = upstream
        .endpoints
        .first()
        .cloned()
        .unwrap_or_else(|| format!("https://{}", upstream.name));
    let skip_verify = if pier.starts_with("https://") {
        "\n  skip_verify = false"
    } else {
        ""
    };
    format!(
        "# Written by `pier config containerd`: pull {name} through pier, falling back to\n\
         # the registry itself when pier cannot answer. containerd adds ?ns={name} to each\n\
         # request, which is how pier knows the upstream.\n\
         server = \"{server}\"\n\n\
         [host.\"{pier}\"]\n  capabilities = [\"pull\", \"resolve\"]{skip_verify}\n",
        name = upstream.name
    )
}

/// Write (or with `dry_run`, print) `<dir>/<registry>/hosts.toml` for every upstream.
pub fn containerd(
    upstreams: &[UpstreamConfig],
    pier: &str,
    dir: &Path,
    dry_run: bool,
) -> anyhow::Result<()> {
    for up in upstreams {
        let path: PathBuf = dir.join(&up.name).join("hosts.toml");
        let text = containerd_hosts(up, pier);
        if dry_run {
            println!("# {}\n{text}", path.display());
            continue;
        }
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if !dry_run {
        println!(
            "containerd reads these when its CRI registry config_path is {} \
             (ctr: pass --hosts-dir {})",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Docker's daemon.json snippet: Docker mirrors only Docker Hub, through pier's default upstream.
pub fn docker(pier: &str) -> String {
    let host = pier
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let insecure = if pier.starts_with("http://") {
        format!(",\n  \"insecure-registries\": [\"{host}\"]")
    } else {
        String::new()
    };
    format!("{{\n  \"registry-mirrors\": [\"{pier}\"]{insecure}\n}}\n")
}

/// registries.conf entries for podman, CRI-O and skopeo: each upstream mirrored through pier's
/// path prefix (`pier:5000/ghcr.io/...`).
pub fn podman(upstreams: &[UpstreamConfig], pier: &str) -> String {
    let host = pier
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let insecure = pier.starts_with("http://");
    let mut out =
        String::from("# Written by `pier config podman`: add to /etc/containers/registries.conf\n");
    for up in upstreams {
        out.push_str(&format!(
            "\n[[registry]]\nprefix = \"{name}\"\nlocation = \"{name}\"\n\n\
             [[registry.mirror]]\nlocation = \"{host}/{name}\"\ninsecure = {insecure}\n",
            name = up.name
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs() {
        let up = UpstreamConfig::new("docker.io", vec!["https://registry-1.docker.io".into()]);
        let pier = pier_url(None, "0.0.0.0:5000".parse().expect("addr")).expect("url");
        assert_eq!(pier, "http://127.0.0.1:5000");
        let hosts = containerd_hosts(&up, &pier);
        assert!(
            hosts.contains("server = \"https://registry-1.docker.io\""),
            "{hosts}"
        );
        assert!(
            hosts.contains("[host.\"http://127.0.0.1:5000\"]"),
            "{hosts}"
        );
        let parsed: toml::Value = toml::from_str(&hosts).expect("hosts.toml is TOML");
        assert!(parsed.get("host").is_some());
        let d = docker("http://pier:5000");
        let _: serde_json::Value = serde_json::from_str(&d).expect("daemon.json is JSON");
        assert!(
            d.contains("\"registry-mirrors\": [\"http://pier:5000\"]"),
            "{d}"
        );
        assert!(d.contains("insecure-registries"), "{d}");
        let p = podman(&[up], "http://pier:5000");
        let parsed: toml::Value = toml::from_str(&p).expect("registries.conf is TOML");
        assert!(parsed.get("registry").is_some());
        assert!(p.contains("location = \"pier:5000/docker.io\""), "{p}");
    }

    #[test]
    fn pier_url_adds_http_only_without_a_scheme() {
        let listen = "0.0.0.0:1".parse().expect("addr");
        let ok = |given: &str| pier_url(Some(given), listen).expect(given);
        assert_eq!(ok("pier.lan:5000"), "http://pier.lan:5000");
        assert_eq!(ok("pier.lan:5000/"), "http://pier.lan:5000");
        assert_eq!(ok("http://pier.lan:5000"), "http://pier.lan:5000");
        assert_eq!(ok("https://pier.lan"), "https://pier.lan");
        assert_eq!(ok("HTTPS://pier.lan"), "https://pier.lan");
        assert_eq!(ok("127.0.0.1:5000"), "http://127.0.0.1:5000");
        for bad in [
            "ftp://x",
            "unix:///run/pier.sock",
            "http://",
            "pier.lan:5000/v2",
        ] {
            let err = pier_url(Some(bad), listen).expect_err(bad).to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        let err = pier_url(Some("ftp://x"), listen)
            .expect_err("ftp")
            .to_string();
        assert!(err.contains("http:// or https://"), "{err}");
    }
}
