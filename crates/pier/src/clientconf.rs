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
        "{WRITTEN_BY}: pull {name} through pier, falling back to\n\
         # the registry itself when pier cannot answer. containerd adds ?ns={name} to each\n\
         # request, which is how pier knows the upstream.\n\
         server = \"{server}\"\n\n\
         [host.\"{pier}\"]\n  capabilities = [\"pull\", \"resolve\"]{skip_verify}\n",
        name = upstream.name
    )
}

/// The first line of every hosts.toml pier writes: how a file is known to be pier's.
const WRITTEN_BY: &str = "# Written by `pier config containerd`";

/// Where a hosts.toml that was there before pier's is kept until `--restore`.
const BACKUP: &str = "hosts.toml.pier-backup";

/// Write (or with `dry_run`, print) `<dir>/<registry>/hosts.toml` for every upstream. A
/// hosts.toml that pier did not write is kept as `hosts.toml.pier-backup` first (once: a
/// second run does not overwrite the backup with pier's own file).
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
        let backup = parent.join(BACKUP);
        if !written_by_pier(&path)? && path.exists() && !backup.exists() {
            std::fs::rename(&path, &backup)
                .with_context(|| format!("cannot back up {}", path.display()))?;
            println!("kept {} as {}", path.display(), backup.display());
        }
        let tmp = parent.join("hosts.toml.pier-tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
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

/// Undo [`containerd`]: put every backed-up hosts.toml back, and remove the ones pier wrote
/// where nothing was before (with their directory, when it is left empty). Files pier did not
/// write are never touched.
pub fn containerd_restore(upstreams: &[UpstreamConfig], dir: &Path) -> anyhow::Result<()> {
    for up in upstreams {
        let parent = dir.join(&up.name);
        let path = parent.join("hosts.toml");
        let backup = parent.join(BACKUP);
        if backup.exists() {
            std::fs::rename(&backup, &path)
                .with_context(|| format!("cannot restore {}", backup.display()))?;
            println!("restored {}", path.display());
        } else if written_by_pier(&path)? {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
            // Only an empty directory goes; anything else in it stays.
            let _ = std::fs::remove_dir(&parent);
            println!("removed {}", path.display());
        }
    }
    Ok(())
}

fn written_by_pier(path: &Path) -> anyhow::Result<bool> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.starts_with(WRITTEN_BY)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        // Not UTF-8: not pier's.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
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
    fn containerd_backs_up_what_was_there_and_restores_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ups = [
            UpstreamConfig::new("docker.io", vec!["https://registry-1.docker.io".into()]),
            UpstreamConfig::new("ghcr.io", vec!["https://ghcr.io".into()]),
        ];
        let theirs = dir.path().join("docker.io/hosts.toml");
        std::fs::create_dir_all(theirs.parent().expect("parent")).expect("mkdir");
        std::fs::write(&theirs, "server = \"https://mine.example\"\n").expect("write");
        let pier = "http://127.0.0.1:5000";
        containerd(&ups, pier, dir.path(), false).expect("write");
        // Twice, as an init container does on every start: the backup stays the original.
        containerd(&ups, pier, dir.path(), false).expect("write again");
        let now = std::fs::read_to_string(&theirs).expect("read");
        assert!(now.starts_with(WRITTEN_BY), "{now}");
        assert!(dir.path().join("ghcr.io/hosts.toml").exists());
        containerd_restore(&ups, dir.path()).expect("restore");
        assert_eq!(
            std::fs::read_to_string(&theirs).expect("read"),
            "server = \"https://mine.example\"\n"
        );
        assert!(!dir.path().join("docker.io").join(BACKUP).exists());
        assert!(
            !dir.path().join("ghcr.io").exists(),
            "pier's own file and dir are gone"
        );
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
